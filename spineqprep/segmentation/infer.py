"""Run a 2D segmentation network over the sagittal slices of an image, on any grid.

The network sees every sagittal slice in one canonical in-plane orientation and pixel size
(the bundle's ``meta["input"]``): rows run along ``inplane[0]`` and columns along ``inplane[1]``
(nibabel axis codes, default ``"IP"``: top row superior, anterior on the left, the radiological
sagittal view), resampled linearly to ``spacing_mm`` and padded to a multiple of
``multiple_of``. Its softmax probabilities are cropped and resampled back to the native pixels of
each slice, so the result lies exactly on the input grid whatever its orientation (RAS, LPS, PSR,
AIL, oblique) or voxel size. Slices are not interpolated across: the networks are 2D, as
published; a bundle may average each slice's probabilities with its neighbours' afterwards
(:func:`average_neighbour_slices`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

#: In-plane orientation of the network input when the bundle does not give one.
DEFAULT_INPLANE = "IP"
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def sagittal_axis(affine: np.ndarray) -> int:
    """The array axis closest to the scanner's left-right axis (slices along it are sagittal)."""
    cols = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(cols[0]) / np.linalg.norm(cols, axis=0)))


def image_array(img: nib.Nifti1Image) -> np.ndarray:
    """The image as float32 (X, Y, Z): the first volume of a 4-D series, a trailing axis of
    length 1 added to a 2-D image."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 2:
        data = data[..., None]
    while data.ndim > 3:
        data = data[..., 0]
    return data


def plane_layout(affine: np.ndarray, inplane: str = DEFAULT_INPLANE
                 ) -> tuple[int, tuple[int, int], tuple[bool, bool]]:
    """``(slice_axis, (row_axis, col_axis), (flip_rows, flip_cols))``: which array axes become
    the rows and columns of the network input and whether each must be reversed so that rows
    increase towards ``inplane[0]`` and columns towards ``inplane[1]``."""
    codes = nib.aff2axcodes(affine)
    sag = sagittal_axis(affine)
    others = [a for a in range(3) if a != sag]
    cols = np.asarray(affine, float)[:3, :3]
    world = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    row_world = world[inplane[0]]
    # the in-plane axis closer to the rows' world direction carries the rows
    row_axis = max(others, key=lambda a: abs(cols[row_world, a]) / np.linalg.norm(cols[:, a]))
    col_axis = others[0] if row_axis == others[1] else others[1]

    def flip(axis: int, code: str) -> bool:
        direction = np.sign(cols[world[code], axis])
        want = 1.0 if code in "RAS" else -1.0
        if direction == 0:  # fall back on the axis code when the cosine vanishes
            return codes[axis] == _OPPOSITE[code]
        return bool(direction != want)

    return sag, (row_axis, col_axis), (flip(row_axis, inplane[0]), flip(col_axis, inplane[1]))


def _resample_coords(n_in: int, spacing_in: float, spacing_out: float) -> tuple[int, np.ndarray]:
    """Size of the resampled axis and the input coordinate of each output sample (pixel edges
    aligned, centres at ``(j + 0.5) * out / in - 0.5``)."""
    n_out = max(1, round(n_in * spacing_in / spacing_out))
    scale = n_in / n_out
    return n_out, (np.arange(n_out) + 0.5) * scale - 0.5


def _zoom2d(stack: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Linear resampling of every (H, W) plane of ``stack`` (N, H, W[, C]) at ``rows`` x
    ``cols`` (input coordinates), edges repeated."""
    grid = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty((stack.shape[0], rows.size, cols.size, *stack.shape[3:]), np.float32)
    for n in range(stack.shape[0]):
        if stack.ndim == 4:
            for c in range(stack.shape[3]):
                out[n, ..., c] = ndimage.map_coordinates(stack[n, ..., c], grid, order=1,
                                                         mode="nearest")
        else:
            out[n] = ndimage.map_coordinates(stack[n], grid, order=1, mode="nearest")
    return out


def _network_input(meta: Mapping[str, Any]) -> tuple[tuple[float, ...], int, str]:
    """Pixel sizes the network runs at (``test_time_spacings_mm``, else ``spacing_mm``), the
    multiple the input is padded to, and the in-plane orientation."""
    spec = meta.get("input", {})
    spacings = spec.get("test_time_spacings_mm") or [spec.get("spacing_mm", 1.0)]
    return (tuple(float(s) for s in spacings), int(spec.get("multiple_of", 1)),
            str(spec.get("inplane", DEFAULT_INPLANE)))


def predict_probabilities(img: nib.Nifti1Image, model: Any, meta: Mapping[str, Any], *,
                          n_threads: int = 1, batch_size: int = 16,
                          normaliser: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
                          | None = None) -> np.ndarray:
    """Class probabilities (X, Y, Z, n_classes), float32, on the grid of ``img``.

    ``model`` maps a float tensor (N, 1, H, W), normalised with the bundle's ``normalise``, to
    logits (N, n_classes, H, W); it runs in batches of ``batch_size`` slices under
    ``torch.inference_mode`` with ``n_threads`` intra-op threads (restored afterwards).
    ``normaliser(slice, meta)`` defaults to the bundle's ``model_io.normalise`` (applied to each
    resampled 2D slice). A bundle whose ``input`` lists ``test_time_spacings_mm`` is run at each
    of those pixel sizes and the probabilities averaged on the native grid (test-time scale
    augmentation: boundaries placed finer than one network pixel). Deterministic for a given
    model and thread count."""
    import torch

    if normaliser is None:
        from spineqprep.segmentation.model_io import normalise as normaliser
    data = image_array(img)
    affine = np.asarray(img.affine, float)
    spacings, multiple, inplane = _network_input(meta)
    sag, (row_ax, col_ax), (flip_r, flip_c) = plane_layout(affine, inplane)
    stack = np.transpose(data, (sag, row_ax, col_ax))
    if flip_r:
        stack = stack[:, ::-1]
    if flip_c:
        stack = stack[:, :, ::-1]
    stack = np.ascontiguousarray(stack)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n_threads)))
    was_training = model.training
    model.eval()
    try:
        native = sum(_predict_stack(stack, (zooms[row_ax], zooms[col_ax]), spacing, multiple,
                                    model, meta, normaliser, batch_size)
                     for spacing in spacings) / len(spacings)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous)
    if flip_r:
        native = native[:, ::-1]
    if flip_c:
        native = native[:, :, ::-1]
    order = np.argsort((sag, row_ax, col_ax))
    out = np.transpose(native, (*order, 3))
    total = out.sum(-1, keepdims=True)
    return np.ascontiguousarray(out / np.where(total > 0, total, 1.0), dtype=np.float32)


def _predict_stack(stack: np.ndarray, zooms: tuple[float, float], spacing_mm: float,
                   multiple: int, model: Any, meta: Mapping[str, Any],
                   normaliser: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray],
                   batch_size: int) -> np.ndarray:
    """Softmax of ``model`` over the slices of ``stack`` (N, H, W) with pixels ``zooms`` mm,
    run at ``spacing_mm`` and resampled back: (N, H, W, n_classes)."""
    import torch

    h_out, rows = _resample_coords(stack.shape[1], zooms[0], spacing_mm)
    w_out, cols = _resample_coords(stack.shape[2], zooms[1], spacing_mm)
    slices = _zoom2d(stack, rows, cols)
    pad_h, pad_w = (-h_out) % multiple, (-w_out) % multiple
    top, left = pad_h // 2, pad_w // 2
    batch = np.empty((slices.shape[0], 1, h_out + pad_h, w_out + pad_w), np.float32)
    for n, plane in enumerate(slices):
        norm = np.asarray(normaliser(plane, meta), np.float32)
        batch[n, 0] = np.pad(norm, ((top, pad_h - top), (left, pad_w - left)),
                             constant_values=float(norm.min()))
    probs = np.empty((slices.shape[0], h_out, w_out, len(meta["classes"])), np.float32)
    step = max(1, int(batch_size))
    with torch.inference_mode():
        for b in range(0, batch.shape[0], step):
            p = torch.softmax(model(torch.from_numpy(batch[b:b + step])).float(), dim=1).numpy()
            probs[b:b + step] = np.moveaxis(p[:, :, top:top + h_out, left:left + w_out], 1, -1)
    return _zoom2d(probs, _native(stack.shape[1], h_out), _native(stack.shape[2], w_out))


def average_neighbour_slices(probs: np.ndarray, axis: int, weight: float) -> np.ndarray:
    """Class probabilities averaged across slices (``axis``) with weights (``weight``,
    1 - 2 ``weight``, ``weight``), the edge slices repeated; sums over classes stay 1. A 2D
    network predicts each slice of a thick-slice image on its own, so its boundary errors
    differ from slice to slice while the anatomy hardly does: averaging neighbours cancels part
    of them (calibrated per contrast, model card)."""
    if not 0.0 <= weight < 0.5:
        raise ValueError(f"neighbour weight {weight} outside [0, 0.5)")
    if weight == 0.0 or probs.shape[axis] < 2:
        return probs
    kernel = np.array([weight, 1.0 - 2.0 * weight, weight])
    return ndimage.convolve1d(probs, kernel, axis=axis, mode="nearest").astype(probs.dtype)


def on_one_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage) -> bool:
    """Whether two images share a voxel grid (spatial shape, and affine to 1 um): their
    probabilities can be averaged voxel for voxel."""
    return a.shape[:3] == b.shape[:3] and bool(np.allclose(a.affine, b.affine, atol=1e-3))


def shares_slices(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
                  tolerance: float = 0.1) -> bool:
    """Whether every sagittal slice of ``a`` is a slice of ``b`` (the same plane, to
    ``tolerance`` of ``b``'s slice spacing at the corners of each slice of ``a``), whatever
    their in-plane pixels and fields of view: a T1w and a T2w prescribed on the same slices.
    ``b``'s 2D probabilities then resample onto ``a`` within each slice
    (:func:`probabilities_on`), with no interpolation across slices."""
    if on_one_grid(a, b):
        return True
    axis, own = sagittal_axis(b.affine), sagittal_axis(a.affine)
    corners = np.stack(np.meshgrid(*[range(n) if i == own else [0, n - 1]
                                     for i, n in enumerate(_shape3(a))], indexing="ij"), -1)
    inside_b = nib.affines.apply_affine(np.linalg.inv(b.affine) @ a.affine,
                                        corners.reshape(-1, 3))[:, axis]
    return bool(np.all(np.abs(inside_b - np.rint(inside_b)) <= tolerance)
                and inside_b.min() > -0.5 and inside_b.max() < _shape3(b)[axis] - 0.5)


def probabilities_on(probs: np.ndarray, source: nib.spatialimages.SpatialImage,
                     target: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Class probabilities ``probs`` (X, Y, Z, C) on the grid of ``source`` carried onto the grid
    of ``target`` (:func:`shares_slices`): linear within each slice, the slice itself taken
    whole; NaN where ``target`` lies outside ``source``'s field of view."""
    if on_one_grid(source, target):
        return probs
    axis, shape = sagittal_axis(source.affine), _shape3(target)
    matrix = np.linalg.inv(source.affine) @ target.affine
    coords = nib.affines.apply_affine(matrix, np.indices(shape).reshape(3, -1).T).T
    coords[axis] = np.rint(coords[axis])
    out = np.stack([ndimage.map_coordinates(probs[..., c], coords, order=1, mode="nearest")
                    for c in range(probs.shape[-1])], axis=-1).astype(np.float32)
    outside = np.any((coords < -0.5) | (coords > np.array(probs.shape[:3])[:, None] - 0.5), 0)
    out[outside] = np.nan
    return out.reshape(*shape, probs.shape[-1])


def _shape3(img: nib.spatialimages.SpatialImage) -> tuple[int, int, int]:
    """The spatial shape of ``img`` as three axes (a 2-D image has one slice)."""
    return (*img.shape[:3], 1, 1)[:3]


def spatial_image(data: np.ndarray, img: nib.Nifti1Image) -> nib.Nifti1Image:
    """``data`` on the grid of ``img`` (its affine and spatial units, no intensity scaling)."""
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units(*img.header.get_xyzt_units())
    return out


def _native(n_native: int, n_resampled: int) -> np.ndarray:
    """Coordinates in the resampled axis of the native pixel centres (inverse of
    :func:`_resample_coords`)."""
    scale = n_resampled / n_native
    return (np.arange(n_native) + 0.5) * scale - 0.5
