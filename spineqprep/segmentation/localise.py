"""The cartilage-endplate crop (METHODS.md section 2): find the L5 vertebral body on one image,
carry its centroid into another image's voxels through the two affines (scanner coordinates),
and cut a 64 x 64 mm sagittal-plane box around it (128 x 128 pixels at the published 0.5 mm;
computed in mm for any voxel size). All sagittal slices are kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from spineqprep.errors import InputError
from spineqprep.segmentation.infer import sagittal_axis
from spineqprep.segmentation.postprocess import vertebra_label

#: L5 in the standard numbering (24); a mask given with ``-d`` is translated to it on entry
#: (:mod:`spineqprep.segmentation.lut`), so no user table is read here.
L5_LABEL = vertebra_label(1)
#: Published crop: 128 x 128 pixels of 0.5 mm (METHODS.md section 2).
CROP_MM = (64.0, 64.0)


@dataclass(frozen=True)
class CropBox:
    """Voxel index ranges ``[start, stop)`` per spatial axis of the image it was made for, the
    target centre in that image's voxel coordinates, and flags (the crop was clipped)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    centre_voxel: tuple[float, float, float]
    flags: list[str] = field(default_factory=list)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))


def label_centroid(dseg: nib.Nifti1Image, label: int = L5_LABEL) -> np.ndarray:
    """Centroid (scanner mm, RAS) of ``label`` in a segmentation image. Raises ``InputError``
    if the label is absent."""
    data = np.asarray(dseg.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    voxels = np.argwhere(np.rint(data).astype(np.int64) == label)
    if voxels.size == 0:
        raise InputError(f"label {label} (the L5 vertebral body) is not in the segmentation",
                         path=dseg.get_filename(),
                         fix="check the vertebral levels of this segmentation (its flags), or "
                             "give the crop centre by hand")
    return nib.affines.apply_affine(dseg.affine, voxels.mean(axis=0))


def crop_box(img: nib.Nifti1Image, centre_world: Sequence[float],
             size_mm: Sequence[float] = CROP_MM) -> CropBox:
    """The box of ``size_mm`` (two in-plane sizes, mm) centred on ``centre_world`` (scanner mm)
    in the sagittal plane of ``img``, every sagittal slice kept: ``round(size / voxel size)``
    pixels per in-plane axis, clipped to the image with a flag when it leaves the field of
    view."""
    affine = np.asarray(img.affine, float)
    shape = img.shape[:3] if len(img.shape) >= 3 else (*img.shape, 1)
    centre = nib.affines.apply_affine(np.linalg.inv(affine), np.asarray(centre_world, float))
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    sag = sagittal_axis(affine)
    start, stop, flags = [0, 0, 0], list(shape), []
    if np.any(centre < -0.5) or np.any(centre > np.asarray(shape) - 0.5):
        flags.append("the crop centre lies outside the image")
    sizes = iter(size_mm)
    for axis in range(3):
        if axis == sag:
            continue
        n = max(1, round(next(sizes) / zooms[axis]))
        lo = round(centre[axis] - n / 2 + 0.5)
        hi = lo + n
        if lo < 0 or hi > shape[axis]:
            flags.append(f"the {n * zooms[axis]:.0f} mm crop leaves the field of view along "
                         f"array axis {axis}: clipped to the image")
        start[axis], stop[axis] = max(lo, 0), min(max(hi, 0), shape[axis])
        if stop[axis] <= start[axis]:
            start[axis], stop[axis] = 0, 0
    return CropBox(tuple(start), tuple(stop), tuple(float(c) for c in centre), flags)


def crop(img: nib.Nifti1Image, box: CropBox) -> nib.Nifti1Image:
    """``img`` restricted to ``box`` (all volumes of a 4-D image), with the affine moved so that
    every kept voxel keeps its scanner position (nibabel's slicer: header and scaling kept)."""
    if 0 in box.shape:
        raise InputError("the crop box is empty: the crop centre is outside the image",
                         path=img.get_filename(),
                         fix="check that both images come from the same exam")
    return img.slicer[box.slices]


def l5_crop_box(dseg: nib.Nifti1Image, target: nib.Nifti1Image,
                size_mm: Sequence[float] = CROP_MM) -> CropBox:
    """The endplate crop of ``target`` (e.g. the first UTE echo) centred on the L5 body of
    ``dseg`` (a labelled segmentation on another grid of the same exam, e.g. T2w or water-fat)."""
    return crop_box(target, label_centroid(dseg, L5_LABEL), size_mm)
