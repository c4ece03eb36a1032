"""Surface distances between binary masks, in millimetres on anisotropic voxel grids.

The surface of a mask is its boundary voxels: the voxels of the mask that have at least one
face neighbour (connectivity 1: 6 in 3D, 4 in 2D) outside it, found by a binary erosion with
the face-connected structuring element; the image border counts as outside. Distances are
Euclidean between voxel centres, with the voxel spacing of each axis (``sampling`` of
``scipy.ndimage.distance_transform_edt``), so a 4 mm slice gap weighs four times a 1 mm pixel.

Conventions: both masks empty -> 0.0 (the surfaces agree); exactly one empty -> NaN (no
surface to measure to).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) along each array axis: the norms of the affine's columns (the NIfTI
    zooms for any rotation; assumes no shear, as scanner grids have none)."""
    affine = np.asarray(affine, float)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def surface_voxels(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Boundary voxels of ``mask``: mask minus its erosion by the structuring element of
    ``connectivity`` (1 = face neighbours; ``mask.ndim`` = also edge/corner neighbours)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _crop(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one voxel (clipped to the image):
    every surface voxel of either mask lies inside, so the distances do not change."""
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n))
                for s, n in zip(box, pred.shape, strict=True))
    return pred[box], ref[box]


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                      connectivity: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm): from every surface voxel of ``pred`` to the nearest surface
    voxel of ``ref``, and from every surface voxel of ``ref`` to the nearest of ``pred``.
    Both arrays are empty when either mask is."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if len(spacing) != pred.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {tuple(spacing)} must give {pred.ndim} positive sizes")
    if not (pred.any() and ref.any()):
        return np.empty(0), np.empty(0)
    pred, ref = _crop(pred, ref)
    s_pred, s_ref = surface_voxels(pred, connectivity), surface_voxels(ref, connectivity)
    to_ref = ndimage.distance_transform_edt(~s_ref, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    return to_ref[s_pred], to_pred[s_ref]


def _empty_value(pred: np.ndarray, ref: np.ndarray) -> float:
    return 0.0 if not (np.any(pred) or np.any(ref)) else float("nan")


def mean_surface_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                          connectivity: int = 1) -> float:
    """Mean absolute symmetric surface distance (mm): the mean over the surface voxels of both
    masks of the distance to the other mask's surface (sum of both directed sums divided by the
    number of surface voxels of both)."""
    d_pred, d_ref = surface_distances(pred, ref, spacing, connectivity)
    if d_pred.size == 0:
        return _empty_value(pred, ref)
    return float((d_pred.sum() + d_ref.sum()) / (d_pred.size + d_ref.size))


def hausdorff_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                       percentile: float = 95.0, connectivity: int = 1) -> float:
    """Symmetric Hausdorff distance (mm) at ``percentile``: the larger of the two directed
    distances' percentiles (95 = the robust 'HD95'; 100 = the classical Hausdorff distance)."""
    d_pred, d_ref = surface_distances(pred, ref, spacing, connectivity)
    if d_pred.size == 0:
        return _empty_value(pred, ref)
    return float(max(np.percentile(d_pred, percentile), np.percentile(d_ref, percentile)))
