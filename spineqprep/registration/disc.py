"""Disc-by-disc mask-guided registration to an atlas disc, behind one interface.

METHODS.md section 1: each disc mask is registered to the same level's atlas disc (centroid
translation, four-resolution affine, B-spline with a rigidity penalty; mean squares of the
smoothed masks here, mutual information in the publication), then every image of that disc is
warped with the resulting transform. Two backends share this interface: itk-elastix (the
published method, default) and ANTsPy (Affine then SyN).

Both backends work in physical space, so voxel size and orientation never matter: a 3D image is
handed over in ITK's LPS world coordinates (so the elastix / ANTs transform files apply to the
NIfTI files with any ITK tool), and a single slice (2D data, e.g. one 8 mm sagittal slice) is
expressed in the in-plane coordinates (mm) of the atlas slice, onto which it is projected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from spineqprep.errors import InputError, UsageError, one_line
from spineqprep.registration.params import elastix_parameter_files
from spineqprep.registration.quality import DiscQuality, assess, failed

BACKENDS = ("elastix", "ants")
INTERPOLATIONS = ("linear", "nearest", "bspline")
# the widest angle between a slice and the atlas slice that still counts as the same plane
MAX_PLANE_ANGLE_DEG = 30.0
# Gaussian smoothing of the binary masks before registration: the smoothed, rescaled masks give
# the similarity metric a gradient (binary masks let the rigidity term swamp it). Sigma per axis
# is MASK_SIGMA_MM or MASK_SIGMA_VOXELS native voxels, whichever is wider: on a coarse grid
# (3-5 mm voxels) 1 mm leaves the voxel staircase, which the B-spline then fits
MASK_SIGMA_MM = 1.0
MASK_SIGMA_VOXELS = 0.5
MASK_SCALE = 1.0
# registration runs on a bounded region around each disc (margin, mm) resampled to
# REGISTRATION_SPACING_MM: no finer, because the rigidity penalty's cost grows with the number
# of B-spline control points (a 3D disc within seconds, docs/registration.md); no coarser,
# because a disc 3 native voxels tall vanishes in the coarse levels of the 4-level pyramid
ROI_MARGIN_MM = 4.0
REGISTRATION_SPACING_MM = 1.0


@dataclass(frozen=True)
class DiscTransform:
    """Transform files from a native disc to its atlas disc, in the order a user applies them.

    elastix: ``TransformParameters.N.txt`` (affine then B-spline; each names its predecessor in
    ``InitialTransformParameterFileName``); ANTs: the ``fwdtransforms`` list of
    ``ants.registration`` (warp field, affine .mat), as ``antsApplyTransforms -t`` takes them.
    """

    backend: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Grid:
    """An image in the registration's physical frame: ITK-style origin, spacing, direction.

    ``data`` is indexed (i, j[, k]) like the NIfTI voxel axes that were kept; physical point =
    origin + direction @ (spacing * index).
    """

    data: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray


#: Further attempts (other random samples) for a disc whose registration fails its quality
#: check: the stochastic optimiser occasionally lands in a reflected or collapsed solution;
#: with elastix, ANTs is then tried once before the disc is flagged.
RETRIES = 2


def register_disc(
    moving_mask: nib.Nifti1Image,
    atlas_mask: nib.Nifti1Image,
    out_dir: Path,
    *,
    backend: str = "elastix",
    parameter_maps: Sequence[Path] | None = None,
    min_dice: float = 0.85,
) -> tuple[DiscTransform, DiscQuality]:
    """Register one native disc mask to its atlas disc; write the transform files to out_dir.

    ``moving_mask`` is the binary mask of one disc on its native grid (any affine / voxel
    size; a single slice registers in 2D against a single-slice atlas). ``parameter_maps``
    replaces the packaged elastix maps (elastix only). A disc that cannot be registered (empty
    mask, a single slice more than ``MAX_PLANE_ANGLE_DEG`` off the atlas plane, backend
    failure) gets a failed quality record saying why and no files, never an exception; bad
    arguments (options, an atlas disc that is empty or of the other dimension) raise
    UsageError / InputError.
    """
    check_options(backend, parameter_maps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    moving = np.asarray(moving_mask.dataobj) > 0.5
    atlas = np.asarray(atlas_mask.dataobj) > 0.5
    if not atlas.any():
        raise InputError("the atlas disc mask is empty", fix="pass the atlas disc of this level")
    if not moving.any():
        return DiscTransform(backend, ()), failed("empty disc mask")
    _check_dimensions(moving_mask, atlas_mask)
    try:
        moving_grid = to_grid(moving_mask, atlas_mask, smooth=True)
    except InputError as err:  # this disc's own geometry (a slice far off the atlas plane)
        fix = f" (fix: {err.fix})" if err.fix else ""
        return DiscTransform(backend, ()), failed(f"{str(err).splitlines()[0]}{fix}")
    engine = _engine(backend)
    result = (DiscTransform(backend, ()), failed(f"{backend} was not run"))
    for attempt in range(RETRIES + 1):
        try:
            files = engine.register(
                region_of_interest(moving_grid),
                region_of_interest(to_grid(atlas_mask, atlas_mask, smooth=True)),
                out_dir,
                parameter_maps=parameter_maps,
                attempt=attempt,
            )
            reference = to_grid(atlas_mask, atlas_mask, smooth=False)
            # the anti-aliased mask (smoothed, not rescaled; its 0.5 level is the disc's edge)
            # follows the true outline better than the binary voxel staircase does
            warped = engine.apply(files, to_grid(moving_mask, atlas_mask, smooth=True,
                                                 rescale=False), reference, "linear")
            det_j = engine.det_jacobian(files, reference)
        except (RuntimeError, ValueError) as err:  # a backend failure fails this disc only
            result = (DiscTransform(backend, ()), failed(f"{backend} failed: {one_line(err)}"))
            continue
        quality = assess(warped > 0.5, reference.data > 0.5, det_j, min_dice=min_dice)
        result = (DiscTransform(backend, tuple(files)), quality)
        if quality.passed:
            break
    if not result[1].passed and backend == "elastix" and parameter_maps is None:
        # the other engine as the last resort; the transform records which one it is
        fallback = register_disc(moving_mask, atlas_mask, out_dir / "ants", backend="ants",
                                 min_dice=min_dice)
        if fallback[1].passed:
            return fallback
    return result


def apply_transform(
    transform: DiscTransform,
    image: nib.Nifti1Image,
    atlas_mask: nib.Nifti1Image,
    *,
    interpolation: str = "linear",
) -> nib.Nifti1Image:
    """Warp a native image of the disc (echo, map, mask) onto the atlas grid.

    The result has the atlas mask's shape and affine, float32, 0 outside the native field of
    view. ``interpolation``: "linear" (images, maps), "nearest" (label masks) or "bspline"
    (cubic; elastix and ANTs both offer it).
    """
    _check_backend(transform.backend)
    if interpolation not in INTERPOLATIONS:
        raise UsageError(f"unknown interpolation {interpolation!r}",
                         fix=f"use one of {', '.join(INTERPOLATIONS)}")
    if not transform.files:
        raise UsageError("this disc has no transform (its registration failed)",
                         fix="skip discs whose quality did not pass")
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim > 3:
        raise InputError(f"expected one 3D volume, got shape {data.shape}",
                         fix="warp each echo / volume separately")
    grid = to_grid(image, atlas_mask, smooth=False)
    reference = to_grid(atlas_mask, atlas_mask, smooth=False)
    warped = _engine(transform.backend).apply(transform.files, grid, reference, interpolation)
    shape = atlas_mask.shape[:3]
    out = warped.astype(np.float32).reshape(shape)
    header = atlas_mask.header.copy()
    header.set_data_dtype(np.float32)
    return nib.Nifti1Image(out, atlas_mask.affine, header)


def is_single_slice(img: nib.Nifti1Image) -> bool:
    """True for one slice (one spatial axis of length 1): registered in 2D."""
    return len(img.shape) >= 3 and min(img.shape[:3]) == 1


def to_grid(img: nib.Nifti1Image, atlas: nib.Nifti1Image, *, smooth: bool,
            rescale: bool = True) -> Grid:
    """Express a NIfTI image in the registration frame fixed by the atlas (see module doc).

    ``smooth`` turns a binary mask into the registration input: Gaussian-smoothed
    (``MASK_SIGMA_MM`` or ``MASK_SIGMA_VOXELS``, the wider, along every in-plane / in-volume
    axis) and, with ``rescale``, rescaled to 0..MASK_SCALE.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(f"expected a 3D image, got shape {data.shape}")
    affine = img.affine
    _check_dimensions(img, atlas)
    if smooth:
        data = smoothed_mask(data, affine)
        peak = float(data.max())
        data = MASK_SCALE * data / peak if rescale and peak > 0 else data
    if not is_single_slice(img):
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        spacing, direction = _polar(lps[:3, :3])
        return Grid(data, lps[:3, 3].copy(), spacing, direction)
    origin, axes = _plane_frame(atlas)
    keep = [a for a in range(3) if data.shape[a] != 1]
    columns = axes.T @ affine[:3, keep]  # voxel steps of the kept axes, in plane coordinates
    normal_atlas = _normal(atlas.affine, atlas.shape)
    normal_img = _normal(affine, data.shape)
    angle = np.degrees(np.arccos(min(1.0, abs(float(normal_atlas @ normal_img)))))
    if angle > MAX_PLANE_ANGLE_DEG:
        raise InputError(
            f"the slice is {angle:.0f} degrees away from the atlas slice plane",
            fix="use an atlas slice in the same orientation as the data (e.g. sagittal)",
        )
    spacing, direction = _polar(columns)
    plane_origin = axes.T @ (affine[:3, 3] - origin)
    return Grid(data.reshape([data.shape[a] for a in keep]), plane_origin, spacing, direction)


def smoothed_mask(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A binary mask (> 0.5) smoothed with a Gaussian of sigma ``MASK_SIGMA_MM`` or
    ``MASK_SIGMA_VOXELS`` voxels, the wider, along every axis longer than one voxel.

    Its 0.5 level is the anti-aliased outline: the voxel staircase averaged away.
    """
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sigma = [0.0 if n == 1 else max(MASK_SIGMA_MM / z, MASK_SIGMA_VOXELS)
             for n, z in zip(data.shape, zooms, strict=True)]
    return ndimage.gaussian_filter((data > 0.5).astype(np.float32), sigma, mode="constant")


def region_of_interest(
    grid: Grid,
    margin_mm: float = ROI_MARGIN_MM,
    spacing_mm: float = REGISTRATION_SPACING_MM,
) -> Grid:
    """The part of a (smoothed) mask grid around the disc, resampled to spacing_mm.

    The box is the disc's bounding box (smoothed value > 1e-4 of its peak) grown by margin_mm,
    within the grid. Linear interpolation (finer grids are downsampled, coarser ones upsampled).
    """
    inside = np.argwhere(grid.data > 1e-4 * grid.data.max())
    pad = np.ceil(margin_mm / grid.spacing).astype(int)
    start = np.maximum(inside.min(axis=0) - pad, 0)
    stop = np.minimum(inside.max(axis=0) + pad, np.array(grid.data.shape) - 1)
    spacing = np.full(grid.spacing.shape, float(spacing_mm))
    size = np.floor((stop - start) * grid.spacing / spacing).astype(int) + 1
    axes = [start[a] + np.arange(size[a]) * spacing[a] / grid.spacing[a] for a in range(len(size))]
    coords = np.meshgrid(*axes, indexing="ij")
    data = ndimage.map_coordinates(grid.data, coords, order=1, mode="constant")
    origin = grid.origin + grid.direction @ (grid.spacing * start)
    return Grid(data.astype(np.float32), origin, spacing, grid.direction)


def _plane_frame(atlas: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Origin (mm) and two orthonormal in-plane axes (3 x 2) of a single-slice atlas."""
    keep = [a for a in range(3) if atlas.shape[a] != 1]
    first = atlas.affine[:3, keep[0]] / np.linalg.norm(atlas.affine[:3, keep[0]])
    second = atlas.affine[:3, keep[1]] - (atlas.affine[:3, keep[1]] @ first) * first
    second /= np.linalg.norm(second)
    return atlas.affine[:3, 3].copy(), np.stack([first, second], axis=1)


def _normal(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Unit normal of a single slice's plane."""
    keep = [a for a in range(3) if shape[a] != 1]
    normal = np.cross(affine[:3, keep[0]], affine[:3, keep[1]])
    return normal / np.linalg.norm(normal)


def _polar(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split voxel-step columns into spacing and the nearest orthonormal direction matrix.

    ITK images need an orthonormal direction; sheared affines (rare) lose their shear here,
    as they do when ITK reads such a NIfTI file.
    """
    spacing = np.sqrt((matrix**2).sum(axis=0))
    u, _, vt = np.linalg.svd(matrix / spacing)
    return spacing, u @ vt


def _engine(backend: str):
    """The backend module (imported on first use: ITK / ANTs load slowly)."""
    if backend == "elastix":
        from spineqprep.registration import elastix

        return elastix
    from spineqprep.registration import ants

    return ants


def check_options(backend: str, parameter_maps: Sequence[Path] | None) -> None:
    """Refuse an unknown backend, elastix parameter files with ANTs, and parameter files that
    are missing or not elastix's: before any disc is registered (the command line checks its
    options with this before it starts)."""
    _check_backend(backend)
    if parameter_maps is not None:
        if backend != "elastix":
            raise UsageError(f"parameter maps are elastix files; backend {backend!r} takes none",
                             fix="drop --registration-params or use --registration-backend "
                                 "elastix")
        elastix_parameter_files(parameter_maps)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"unknown registration backend {backend!r}",
                         fix=f"use one of {', '.join(BACKENDS)}")


def _check_dimensions(img: nib.Nifti1Image, atlas: nib.Nifti1Image) -> None:
    """An image and its atlas disc are both single slices (2D) or both volumes (3D)."""
    if is_single_slice(atlas) != is_single_slice(img):
        raise InputError(
            "the image and the atlas disc must both be single slices (2D) or both volumes (3D): "
            f"got shapes {img.shape[:3]} and {atlas.shape[:3]}",
            fix="use a single-slice atlas for single-slice data and a 3D atlas for volumes",
        )
