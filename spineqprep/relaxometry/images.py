"""From a list of NIfTI images (one per echo / spin-lock time) to fitted maps, and back.

Pure function around :func:`fit_monoexp`: it checks that the images belong together (shape,
affine, times), reads their scaled data (``scl_slope`` / ``scl_inter`` applied) and returns
float32 NIfTI maps on the grid of the first image. Every user-caused problem raises
:class:`spineqprep.errors.InputError` naming the file and the fix.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from spineqprep.errors import InputError
from spineqprep.relaxometry.monoexp import _check_times, fit_monoexp

__all__ = ["fit_images"]

_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)


Image = nib.spatialimages.SpatialImage


def _name(img: Image, names: Sequence[str] | None, i: int) -> str:
    if names is not None and i < len(names):
        return str(names[i])
    return img.get_filename() or f"image #{i + 1}"


def load_image(item: Image | str | Path, name: str | None) -> Image:
    """An image as given, or loaded (lazily) from a path."""
    if isinstance(item, Image):
        return item
    name = name or str(item)
    if not Path(item).is_file():
        raise InputError("file not found", path=name, fix="check the path")
    try:
        return nib.load(item)
    except (*_READ_ERRORS, nib.filebasedimages.ImageFileError) as err:
        raise InputError(
            f"cannot read the image header ({type(err).__name__}: {err})",
            path=name,
            fix="the file is truncated or corrupt: re-export/copy the file",
        ) from err


def _frames(img: Image, name: str) -> int:
    """Number of time frames an image contributes: 1 for 2-D/3-D, shape[3] for 4-D."""
    shape = img.shape
    if len(shape) <= 3:
        return 1
    if len(shape) == 4:
        return shape[3]
    raise InputError(
        f"image has {len(shape)} dimensions {shape}",
        path=name,
        fix="give 3-D images (one per time) or one 4-D series",
    )


def read_image(img: Image, name: str) -> np.ndarray:
    """Scaled float32 data; a truncated or corrupt file becomes an InputError."""
    try:
        return np.asanyarray(img.get_fdata(dtype=np.float32))
    except _READ_ERRORS as err:
        raise InputError(
            f"cannot read the image data ({type(err).__name__}: {err})",
            path=name,
            fix="the file is truncated or corrupt: re-export/copy the file",
        ) from err


def fit_images(
    images: Sequence[Image | str | Path],
    times: Sequence[float],
    *,
    names: Sequence[str] | None = None,
    mask: Image | np.ndarray | None = None,
    **fit_kw: Any,
) -> dict[str, nib.Nifti1Image]:
    """Fit every voxel of a multi-echo series and return the maps as NIfTI images.

    images: one 3-D image per time point (or 4-D images whose frames are time points), all on
    one grid, as nibabel images or paths; times: one value per frame in seconds; names: file
    names for messages (default: the images' own file names); mask: optional boolean
    image/array on the grid; fit_kw: passed to :func:`fit_monoexp` (model, t_range, n_threads, ...).
    Returns 'T' (seconds), 'S0', 'Rsquared', 'mask' (uint8 validity) and, for the offset
    model, 'offset' -- float32 images with the first image's affine and header.
    """
    if not images:
        raise InputError("no images given", fix="pass one image per echo / spin-lock time")
    images = [
        load_image(item, None if names is None or i >= len(names) else str(names[i]))
        for i, item in enumerate(images)
    ]
    ref = images[0]
    ref_name = _name(ref, names, 0)
    grid = ref.shape[:3]
    n_frames = 0
    for i, img in enumerate(images):
        name = _name(img, names, i)
        if img.shape[:3] != grid:
            raise InputError(
                f"image shape {img.shape[:3]} differs from {grid} of {ref_name}",
                path=name,
                fix="all echoes must come from one acquisition on one grid (resample first)",
            )
        if not np.allclose(img.affine, ref.affine, rtol=0, atol=1e-4):
            raise InputError(
                f"image affine differs from the affine of {ref_name}",
                path=name,
                fix="all echoes must share one voxel grid (check the conversion or resample)",
            )
        n_frames += _frames(img, name)
    model = fit_kw.get("model", "monoexp")
    try:
        tk = _check_times(times, n_frames, model)
    except InputError as err:
        listed = ", ".join(_name(img, names, i) for i, img in enumerate(images))
        raise InputError(f"{err} (images: {listed})") from err

    signal = np.empty((*grid, n_frames), dtype=np.float32)
    k = 0
    for i, img in enumerate(images):
        data = read_image(img, _name(img, names, i))
        data = data.reshape(*grid, -1)
        signal[..., k : k + data.shape[-1]] = data
        k += data.shape[-1]
    del data

    mask_arr = None
    if mask is not None:
        mask_arr = np.asarray(mask.dataobj) if hasattr(mask, "dataobj") else np.asarray(mask)
        if mask_arr.shape != grid:
            raise InputError(
                f"mask shape {mask_arr.shape} differs from the image grid {grid}",
                path=getattr(mask, "get_filename", lambda: None)() or "mask",
                fix="give a mask on the grid of the echoes",
            )
        mask_arr = mask_arr > 0

    fit = fit_monoexp(signal, tk, mask=mask_arr, dtype=np.float32, **fit_kw)
    maps = {"T": fit.t, "S0": fit.s0, "Rsquared": fit.r2, "mask": fit.valid.astype(np.uint8)}
    if fit.offset is not None:
        maps["offset"] = fit.offset
    out = {}
    for key, arr in maps.items():
        hdr = ref.header.copy() if isinstance(ref, nib.Nifti1Image) else None
        img = nib.Nifti1Image(arr, ref.affine, header=hdr)
        img.set_data_dtype(arr.dtype)
        img.header.set_slope_inter(1.0, 0.0)
        out[key] = img
    return out
