"""Segmentation of the lumbar spine: vertebral bodies, sacrum and discs labelled by level.

``segment_spine`` runs the packaged (or a user's) network over the sagittal slices of an image
(:mod:`.infer`), labels the components inferior to superior from the sacrum (:mod:`.postprocess`)
and returns the ``_dseg`` and ``_probseg`` images on the image's own grid; :mod:`.localise`
finds the cartilage-endplate crop. torch and the network load only when a segmentation is made,
so importing this package stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from spineqprep.errors import InputError
from spineqprep.segmentation.infer import (
    average_neighbour_slices,
    predict_probabilities,
    probabilities_on,
    sagittal_axis,
    shares_slices,
    spatial_image,
)
from spineqprep.segmentation.postprocess import (
    CLASSES,
    SpineLabels,
    inplane_spacing,
    label_spine,
    label_table,
)


@dataclass
class SpineSegmentation:
    """``dseg_img`` (uint16 schema labels), ``probseg_img`` (float32, one volume per class in
    ``classes`` order, background first), the labelled ``levels`` (abbreviation -> label),
    ``flags`` and whether the level labelling is ``confident``."""

    dseg_img: nib.Nifti1Image
    probseg_img: nib.Nifti1Image
    levels: dict[str, int]
    flags: list[str] = field(default_factory=list)
    confident: bool = True
    classes: tuple[str, ...] = CLASSES


def segment_spine(img: nib.Nifti1Image, *,
                  bundle: str | Path | tuple[Any, Mapping[str, Any]] | None = None,
                  n_threads: int = 1, cutoffs: Mapping[str, float] | None = None,
                  min_volume_mm3: Mapping[str, float] | None = None,
                  batch_size: int = 16, contrast: str | None = None,
                  same_slices: Sequence[tuple[nib.Nifti1Image, str]] = ()) -> SpineSegmentation:
    """Segment and level-label the spine on ``img`` (3-D, a single slice, or the first volume
    of a 4-D series). ``bundle``: ``None`` for the packaged model, a bundle folder / ``.pt``
    file, or an already loaded ``(model, meta)`` pair; ``cutoffs`` / ``min_volume_mm3``: per
    structure (``vertebral_body``, ``sacrum``, ``disc``); cut-offs default to the bundle's
    ``cutoffs`` (``model.json``), else 0.5, and for an image of ``contrast`` (its BIDS suffix:
    T1w, T2w, MESE, MESL) to the bundle's ``cutoffs_by_contrast`` for it; the bundle's
    ``slice_averaging_by_contrast`` for that contrast, if any, averages the probabilities of
    neighbouring slices before the cut-offs (and in ``probseg_img``). An image whose
    in-plane pixels are coarser than the bundle's ``validated_max_pixel_mm`` (the coarsest grid
    on which its model card shows the accuracy bar met) is flagged, not refused.

    ``same_slices``: other contrasts acquired on the sagittal slices of ``img``
    (``(image, contrast)``, e.g. the T1w of a T2w; same grid, or other in-plane pixels and
    field of view: :func:`.infer.shares_slices`). Each is run through the network on its own
    grid (with its own neighbour-slice averaging), its probabilities carried onto ``img``'s
    grid within each slice, and the class probabilities of all are averaged voxel for voxel
    (where an image's field of view does not reach, without it) before the cut-offs, which
    are then the bundle's for the joint contrast (:func:`joint_contrast`, e.g. ``T1w+T2w``):
    a boundary that one contrast shows poorly (the annulus against marrow on a long-TE T2w)
    the other usually shows (model card). Raises ``InputError`` if the slices differ."""
    if bundle is None or isinstance(bundle, str | Path):
        from spineqprep.segmentation.model_io import load_bundle

        model, meta = load_bundle(bundle)
    else:
        model, meta = bundle
    classes = tuple(meta["classes"])
    for other, name in same_slices:
        if not shares_slices(img, other):
            raise InputError(f"the {name} image does not lie on the sagittal slices of the "
                             f"{contrast} image (other slice positions or orientation)",
                             path=other.get_filename(),
                             fix="segment images on different slices separately")
    probs = _probabilities(img, contrast, model, meta, n_threads, batch_size)
    if same_slices:
        probs = np.nanmean([probs, *(probabilities_on(_probabilities(
            other, name, model, meta, n_threads, batch_size), other, img)
            for other, name in same_slices)], axis=0).astype(np.float32)
        contrast = joint_contrast([contrast, *(name for _, name in same_slices)])
    # the bundle's own cut-offs (chosen on its calibration subjects, model card), those for
    # this contrast, then the user's
    cutoffs = {**meta.get("cutoffs", {}), **meta.get("cutoffs_by_contrast", {}).get(contrast, {}),
               **(cutoffs or {})}
    labels: SpineLabels = label_spine(probs, img.affine, classes=classes, cutoffs=cutoffs,
                                      min_volume_mm3=min_volume_mm3,
                                      slice_axis=sagittal_axis(img.affine))
    flags = list(labels.flags)
    pixel, validated = inplane_spacing(img.affine), meta.get("validated_max_pixel_mm")
    if validated is not None and pixel > float(validated):
        flags.append(f"in-plane pixels of {pixel:.2f} mm are coarser than the {validated} mm "
                     "this network was validated on (model card): expect lower Dice")
    return SpineSegmentation(
        dseg_img=spatial_image(labels.dseg, img),
        probseg_img=spatial_image(probs, img),
        levels=labels.levels, flags=flags, confident=labels.confident, classes=classes)


def joint_contrast(contrasts: Sequence[str | None]) -> str:
    """The name under which a bundle keeps the cut-offs of contrasts segmented together:
    sorted and joined by ``+`` (``["T2w", "T1w"]`` -> ``"T1w+T2w"``)."""
    return "+".join(sorted(str(c) for c in contrasts))


def _probabilities(img: nib.Nifti1Image, contrast: str | None, model: Any,
                   meta: Mapping[str, Any], n_threads: int, batch_size: int) -> np.ndarray:
    """The network's class probabilities on ``img``, averaged across neighbouring slices when
    the bundle says so for ``contrast``."""
    probs = predict_probabilities(img, model, meta, n_threads=n_threads, batch_size=batch_size)
    weight = meta.get("slice_averaging_by_contrast", {}).get(contrast)
    if weight:
        probs = average_neighbour_slices(probs, sagittal_axis(img.affine), float(weight))
    return probs


__all__ = ["SpineLabels", "SpineSegmentation", "joint_contrast", "label_spine", "label_table",
           "predict_probabilities", "segment_spine"]
