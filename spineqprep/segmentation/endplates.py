"""Cartilage endplates (CEPs) on the first UTE echo (METHODS.md section 2).

The published pipeline crops the UTE images to 64 x 64 mm around the L5 vertebral body (found on
another image of the exam and carried over through the affines: :mod:`.localise`) and runs four
level-specific networks, one per endplate (L4-L5 superior and inferior, L5-S1 superior and
inferior), binarised at 0.24 / 0.32 / 0.24 / 0.30. spineqprep trains one 2D U-Net with the four
endplates as classes (plus background) on the same crop at the published 0.5 mm pixels: one pass
instead of four, and the softmax keeps the four masks disjoint. Each endplate's probability is
still binarised at its own cut-off, and the largest connected component(s) are kept.

Training data are synthetic: random sagittal planes through the L5 region of
``spineqprep.synth`` anatomies (crop centre jittered as a predicted L5 centroid would be),
domain-randomised like the spine network (:mod:`.trainset`), with UTE-like realistic contrasts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from spineqprep.errors import InputError
from spineqprep.segmentation import augment, model_io, trainset
from spineqprep.segmentation.infer import predict_probabilities, spatial_image
from spineqprep.segmentation.localise import CropBox, crop, crop_box, l5_crop_box
from spineqprep.segmentation.lut import ENDPLATE_LABELS as DSEG_LABELS
from spineqprep.segmentation.lut import endplate_table, label_mapping, read_lut
from spineqprep.segmentation.network import build_network, count_parameters
from spineqprep.synth import labels as lab
from spineqprep.synth.anatomy import build_anatomy, rotation_matrix
from spineqprep.synth.cohort import sample_cohort

#: Network classes, background first, in the published order of the four networks.
CLASSES = ("background", "L4L5_superior", "L4L5_inferior", "L5S1_superior", "L5S1_inferior")
#: Published binarisation cut-offs (maximised 3D Dice; METHODS.md section 2).
DEFAULT_CUTOFFS = {"L4L5_superior": 0.24, "L4L5_inferior": 0.32, "L5S1_superior": 0.24,
                   "L5S1_inferior": 0.30}
SPACING_MM = 0.5  # the published UTE pixel
CROP_PX = 128  # 64 mm at 0.5 mm
WINDOW = 160  # bank planes (80 mm), deformed and cropped to CROP_PX
#: UTE first echo (TE 0.248 ms), a later echo (5.2 ms) and proton density.
REALISTIC = ("UTE1", "UTE2", "PD")
BANK = (120, 10)
EVAL_SEED = 999
#: A quarter of the spine network's operations (8 base filters): thin, high-contrast plates
#: need resolution more than capacity, and it trains on 2 CPU cores in minutes.
DEFAULT_ARCHITECTURE = {"type": "unet2d", "in_channels": 1, "base_filters": 8, "depth": 4,
                        "n_classes": len(CLASSES)}
#: Smallest endplate component kept (mm^3): CEPs are 0.5-1 mm thick and ~15 mm across.
MIN_VOLUME_MM3 = 4.0
#: Cross-entropy weights (background first): endplates cover ~1 % of the crop, and unweighted
#: training settles on all-background.
CLASS_WEIGHTS = (1.0, 10.0, 10.0, 10.0, 10.0)


def _class_table() -> np.ndarray:
    """Compact bank label -> endplate class (0 for everything else)."""
    k45, k5s = lab.DISCS.index("L4L5"), lab.DISCS.index("L5S1")
    wanted = {lab.cep_superior(k45): 1, lab.cep_inferior(k45): 2, lab.cep_superior(k5s): 3,
              lab.cep_inferior(k5s): 4}
    return np.array([wanted.get(int(d), 0) for d in trainset.DETAILED], np.uint8)


CLASS_OF = _class_table()


def _signals(maps: dict[str, np.ndarray]) -> np.ndarray:
    """UTE-like weightings (``REALISTIC``) of per-point truth maps."""
    t2s = maps["T2star"]

    def decay(t: float) -> np.ndarray:
        return np.exp(-np.divide(t, t2s, out=np.full_like(t2s, np.inf), where=t2s > 0))

    return np.stack([maps["PD"] * decay(0.000248), maps["PD"] * decay(0.0052), maps["PD"]])


def make_bank(n_subjects: int, slices_per_subject: int, seed: int = trainset.TRAINING_SEED_BASE,
              size: int = WINDOW, spacing: float = SPACING_MM,
              progress: Callable[[str], None] | None = None) -> trainset.SliceBank:
    """Random sagittal planes around L5 of ``n_subjects`` synthetic anatomies (cohort
    ``seed``): centre jittered +-4 mm (SD) along and across the column, across the endplates'
    width (10 % beyond it), tilted a few degrees; three sub-slices over a 0.5-3 mm slice."""
    people = sample_cohort(n_subjects, min(3, n_subjects), 1, seed)
    labels = np.zeros((n_subjects * slices_per_subject, 3, size, size), np.uint8)
    images = np.zeros((len(labels), len(REALISTIC), size, size), np.float16)
    scale = np.zeros_like(labels)
    rng = np.random.default_rng([seed, 17])
    j5 = lab.VERTEBRAE.index("L5")
    idx = (np.arange(size) - (size - 1) / 2) * spacing
    a, b = (g.ravel() for g in np.meshgrid(idx, idx, indexing="ij"))
    for p, person in enumerate(people):
        visit = person.visits[0]
        anat = build_anatomy(person, visit, seed)
        for s in range(slices_per_subject):
            reach = 1.1 if rng.random() < 0.1 else 0.9
            centre = anat.world(np.array([anat.vert_u[j5] + rng.normal(0, 4.0)]),
                                np.array([rng.normal(0, 4.0)]),
                                np.array([rng.uniform(-reach, reach)
                                          * anat.vert_half_width[j5]]))[0]
            tilt = rotation_matrix(rng.normal(0, 4.0), rng.normal(0, 3.0), rng.normal(0, 3.0))
            rows, cols, normal = (tilt @ np.array(v) for v in ([0, 0, -1.0], [0, -1.0, 0],
                                                                [1.0, 0, 0]))
            thickness = rng.uniform(0.5, 3.0)
            flat = centre + np.outer(a, rows) + np.outer(b, cols)
            points = np.stack([flat + k * thickness / 3 * normal for k in (-1, 0, 1)])
            i = p * slices_per_subject + s
            labels[i], images[i], scale[i] = trainset.bank_slice(anat, points, visit, size,
                                                                 spacing, _signals)
        if progress and (p + 1) % max(1, n_subjects // 10) == 0:
            progress(f"endplate bank: {p + 1}/{n_subjects} subjects")
    return trainset.SliceBank(labels, images, scale)


def sample(bank: trainset.SliceBank, rng: np.random.Generator, size: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """One randomised (image, endplate target) pair: half realistic UTE-like contrast, half
    random contrast per tissue; 0.35-1.1 mm simulated pixels; published +-10 deg rotation."""
    return trainset.synthetic_sample(bank, rng, size, realistic_fraction=0.5, class_of=CLASS_OF,
                                     spacing_mm=SPACING_MM, spacing_range_mm=(0.35, 1.1),
                                     max_rotation_deg=10.0)


def load_labelled_crops(labels_dir: str | Path, min_foreground: int = 20
                        ) -> list[trainset.LabelledSlice]:
    """The sagittal slices with manual endplate labels of a derivatives folder: each
    ``*_desc-endplates_dseg`` (with its ``dseg.tsv``, named as for ``-d`` precomputed masks)
    on the first UTE echo of the raw dataset, both cut to a ``WINDOW`` (80 mm) square around
    the labelled endplates' centroid (about the L5 centre the pipeline crops on; the training
    deformation then moves the 64 mm crop by up to 8 mm) and resampled to 0.5 mm. Endplates
    that the table does not name are left undecided, never background; slices without labels
    are not used (a reader may label the central slices only)."""
    root = Path(labels_dir)
    class_of = {index: CLASSES.index(name) for name, index in DSEG_LABELS.items()}
    out = []
    for image_path, dseg_path in trainset.find_pairs(root, kind="endplates"):
        image, dseg = trainset.load_pair(image_path, dseg_path)
        data = np.rint(np.asarray(dseg.dataobj)).astype(np.int64)
        mapping = label_mapping(read_lut(trainset.lut_path(dseg_path, root)), np.unique(data),
                                kind="endplates", path=dseg_path)
        if not mapping:
            continue
        table = {label: class_of[row["index"]] for label, row in mapping.items()}
        centre = nib.affines.apply_affine(dseg.affine,
                                          np.argwhere(np.isin(data, list(table))).mean(axis=0))
        box = crop_box(image, centre, (WINDOW * SPACING_MM,) * 2)
        known, to_bits_of = trainset.label_bits(table, len(CLASSES))
        for img_slice, lab_slice in zip(trainset.canonical_slices(crop(image, box), 1,
                                                                  SPACING_MM),
                                        trainset.canonical_slices(crop(dseg, box), 0,
                                                                  SPACING_MM), strict=True):
            target = to_bits_of(lab_slice)
            if np.count_nonzero(target & known) >= min_foreground:
                out.append(trainset.LabelledSlice(img_slice, target, image_path.name))
    return out


def train_endplates(out: str | Path, steps: int, seed: int = 0, threads: int = 2,
                    init: str | Path | None = None, labels_dir: str | Path | None = None,
                    bank_size: tuple[int, int] = BANK, batch_size: int = 8,
                    lr: float | None = None, real_fraction: float = 0.5,
                    cutoffs: Mapping[str, float] | None = None,
                    test_time_spacings_mm: Sequence[float] | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the endplate network (``spineqprep-train endplates``), or fine-tune ``init`` on
    the manual endplate masks of ``labels_dir`` (:func:`load_labelled_crops`;
    ``real_fraction`` of each batch), and write a bundle. Its cut-offs are the published ones,
    overridden by those of ``init``, then by ``cutoffs``
    (:func:`model_io.inference_settings`)."""
    from spineqprep.segmentation.train import evaluate_slices, train

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = Path(out)
    if init is not None:
        model, base = model_io.load_bundle(init, name="endplates")
        architecture = base["architecture"]
    else:
        architecture, base = dict(DEFAULT_ARCHITECTURE), {}
        model = build_network(architecture)
    inference, inference_input = model_io.inference_settings(
        base, init, CLASSES, cutoffs=cutoffs, test_time_spacings_mm=test_time_spacings_mm)
    out.mkdir(parents=True, exist_ok=True)
    real = load_labelled_crops(labels_dir) if labels_dir else []
    if labels_dir and not real:
        raise InputError("no slice of its endplate masks has endplate labels", path=labels_dir,
                         fix="check the masks (*_desc-endplates_dseg.nii.gz) and dseg.tsv")
    if real:
        log(f"{len(real)} labelled UTE slices from {labels_dir}")
    bank_seed = trainset.TRAINING_SEED_BASE + seed
    log(f"endplate bank: {bank_size[0]} subjects x {bank_size[1]} planes (cohort seed "
        f"{bank_seed})")
    bank = make_bank(*bank_size, seed=bank_seed, progress=log)
    log(f"bank ready in {time.perf_counter() - start:.0f} s; network "
        f"{count_parameters(model) / 1e6:.2f} M parameters")
    stream = trainset.SampleStream(bank, seed, batch_size=batch_size, size=CROP_PX,
                                   real=real, real_fraction=real_fraction, sampler=sample)
    rate = lr if lr is not None else (2e-3 if init is None else 3e-4)
    history = train(model, stream, steps, rate, log, checkpoint=out / "checkpoint.pt",
                    classes=CLASSES, class_weights=CLASS_WEIGHTS)
    held_out = make_bank(16, 6, seed=EVAL_SEED)
    slice_dice = evaluate_slices(model, held_out, n=96, size=CROP_PX, classes=CLASSES,
                                 sampler=sample)
    log(f"held-out slice Dice: {slice_dice}")
    meta = {
        "name": "endplates", "version": 1, "architecture": architecture,
        "classes": list(CLASSES),
        "input": {"spacing_mm": SPACING_MM, "slice_axis": "sagittal",
                  "normalisation": model_io.NORMALISATION,
                  "multiple_of": 2 ** int(architecture["depth"]), "inplane": "IP",
                  "crop_mm": [CROP_PX * SPACING_MM, CROP_PX * SPACING_MM],
                  "image": "first UTE echo", **inference_input},
        **inference,
        "cutoffs": {**DEFAULT_CUTOFFS, **inference.get("cutoffs", {})},
        "class_weights": list(CLASS_WEIGHTS),
        "training": {"seed": seed, "steps": steps, "batch_size": batch_size,
                     "learning_rate": rate, "threads": threads,
                     "loss": f"soft Dice + cross-entropy, class weights {list(CLASS_WEIGHTS)}",
                     "data": f"synthetic: spineqprep.synth anatomies, cohort seed {bank_seed}, "
                             f"{bank_size[0]} subjects x {bank_size[1]} sagittal planes around "
                             "L5, domain-randomised" + (
                                 f"; fine-tuned on {len(real)} labelled UTE slices from "
                                 f"{labels_dir} ({real_fraction:.0%} of each batch)"
                                 if real else ""),
                     "augmentation": "random contrast per tissue label (50 %) or UTE-like "
                                     "contrasts (first echo, 5.2 ms echo, PD), 0.5-3 mm slices, "
                                     "bias, gamma, 0.35-1.1 mm pixels, Rician SNR "
                                     f"{augment.SNR_RANGE[0]:g}-{augment.SNR_RANGE[1]:g} "
                                     "(log-uniform), rotation +-10 deg, scaling, shear, elastic, "
                                     "FOV cuts",
                     "init": str(init) if init else None,
                     "seconds": round(time.perf_counter() - start, 1)},
        "metrics": {"slice_dice_heldout": slice_dice,
                    "final_loss": round(float(np.mean([h["loss"] for h in history[-20:]])), 4)},
    }
    model_io.save_bundle(model, meta, out)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    log(f"bundle written to {out} ({meta['training']['seconds']:.0f} s)")
    return meta


# ---- inference -------------------------------------------------------------------------------
@dataclass
class EndplateSegmentation:
    """``dseg_img`` (uint16, ``DSEG_LABELS``) and ``probseg_img`` (float32, one volume per
    class of ``classes``) on the full UTE grid, the crop used, and flags."""

    dseg_img: nib.Nifti1Image
    probseg_img: nib.Nifti1Image
    box: CropBox
    found: dict[str, int]
    cutoffs: dict[str, float]
    flags: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = CLASSES


def label_endplates(probs: np.ndarray, zooms: np.ndarray, classes: tuple[str, ...] = CLASSES,
                    cutoffs: Mapping[str, float] | None = None,
                    min_volume_mm3: float = MIN_VOLUME_MM3) -> tuple[np.ndarray, list[str]]:
    """Class probabilities (X, Y, Z, C) -> endplate labels: a voxel belongs to the most
    probable endplate whose probability reaches its cut-off; per endplate, the largest 3D
    component (26-connected) and any other above ``min_volume_mm3`` and half its size."""
    cut = {**DEFAULT_CUTOFFS, **(cutoffs or {})}
    fg = probs[..., 1:]
    passing = np.stack([fg[..., c] >= cut[name] for c, name in enumerate(classes[1:])], -1)
    best = np.argmax(np.where(passing, fg, -1.0), axis=-1)
    out = np.zeros(probs.shape[:3], np.uint16)
    flags = []
    voxel = float(np.prod(zooms))
    for c, name in enumerate(classes[1:]):
        mask = passing[..., c] & (best == c)
        comp, n = ndimage.label(mask, np.ones((3, 3, 3), bool))
        if n == 0:
            flags.append(f"{name.replace('_', ' ')} endplate not found")
            continue
        sizes = np.bincount(comp.ravel())[1:] * voxel
        keep = np.flatnonzero((sizes == sizes.max())
                              | ((sizes >= min_volume_mm3) & (sizes >= 0.5 * sizes.max()))) + 1
        out[np.isin(comp, keep)] = DSEG_LABELS[name]
    return out, flags


def segment_endplates(ute: nib.Nifti1Image, spine_dseg: nib.Nifti1Image, *,
                      bundle: str | Path | tuple[Any, Mapping[str, Any]] | None = None,
                      n_threads: int = 1, cutoffs: Mapping[str, float] | None = None
                      ) -> EndplateSegmentation:
    """Segment the four endplates on ``ute`` (its first echo) in the 64 x 64 mm crop centred
    on the L5 body of ``spine_dseg`` (any grid of the same exam: scanner coordinates). Without
    an L5 in ``spine_dseg`` nothing is segmented and a flag says why (the subject's other
    outputs are not held back by it)."""
    if bundle is None or isinstance(bundle, str | Path):
        model, meta = model_io.load_bundle(bundle, name="endplates")
    else:
        model, meta = bundle
    classes = tuple(meta["classes"])
    shape = ute.shape[:3] if len(ute.shape) >= 3 else (*ute.shape, 1)
    probs = np.zeros((*shape, len(classes)), np.float32)
    probs[..., 0] = 1.0
    cut = {**DEFAULT_CUTOFFS, **meta.get("cutoffs", {}), **(cutoffs or {})}
    try:
        box = l5_crop_box(spine_dseg, ute, meta["input"].get("crop_mm", (64.0, 64.0)))
    except InputError as err:  # no L5 on the locating image: flagged, the maps go on
        box = CropBox((0, 0, 0), (0, 0, 0), (np.nan,) * 3)
        return EndplateSegmentation(
            spatial_image(np.zeros(shape, np.uint16), ute), spatial_image(probs, ute), box,
            dict.fromkeys(classes[1:], 0), {k: float(v) for k, v in cut.items()},
            [f"endplates not segmented: {str(err).splitlines()[0]}"], classes)
    cropped = crop(ute, box)
    probs_crop = calibrate(predict_probabilities(cropped, model, meta, n_threads=n_threads),
                           meta.get("class_weights"))
    probs[box.slices] = probs_crop.reshape(*box.shape, len(classes))
    zooms = np.linalg.norm(np.asarray(ute.affine)[:3, :3], axis=0)
    dseg, flags = label_endplates(probs, zooms, classes, cut)
    found = {name: int(np.count_nonzero(dseg == DSEG_LABELS[name])) for name in classes[1:]}
    return EndplateSegmentation(spatial_image(dseg, ute), spatial_image(probs, ute), box, found,
                                {k: float(v) for k, v in cut.items()}, [*box.flags, *flags],
                                classes)


def calibrate(probs: np.ndarray, class_weights: Sequence[float] | None) -> np.ndarray:
    """Undo the class weights of the training loss: a weighted cross-entropy makes the network
    output p_c proportional to w_c q_c (q the true posterior), so q = (p / w) renormalised.
    Without it the endplates' probabilities are inflated about tenfold near their edges and
    every cut-off over-segments (measured: sensitivity 0.97-0.99, precision 0.69-0.74 at
    0.5)."""
    if not class_weights:
        return probs
    scaled = probs / np.asarray(class_weights, np.float32)
    return scaled / np.maximum(scaled.sum(axis=-1, keepdims=True), 1e-12)


__all__ = ["CLASSES", "DEFAULT_CUTOFFS", "DSEG_LABELS", "EndplateSegmentation",
           "endplate_table", "label_endplates", "make_bank", "sample", "segment_endplates",
           "train_endplates"]
