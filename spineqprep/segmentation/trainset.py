"""Training samples: sagittal slices of the synthetic anatomy and, for fine-tuning, of a user's
manually labelled images (BIDS derivatives).

Synthetic slices are label maps of ``spineqprep.synth`` anatomies evaluated on random, slightly
oblique sagittal planes on the network's grid (``SPACING_MM``), three sub-slices across a random
slice thickness of 3-6 mm (partial volume), stored once in a ``SliceBank`` together with the
generator's own contrasts (T1w, T2w, proton density = first echo of MESE/MESL/UTE, and a
T2-weighted later echo). ``SampleStream`` turns the bank into an endless, seeded stream of
randomised (image, target) batches: step ``s`` of seed ``S`` is always the same batch.

Targets: 0 background, 1 vertebral body (every modelled vertebra above the sacrum, Modic lesions
included), 2 sacrum (S1), 3 intervertebral disc (nucleus and annulus); cartilage endplates are
background, as in the truth ``_dseg``. Orientation of every slice: rows superior -> inferior,
columns anterior -> posterior (``canonical_slices``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from spineqprep.errors import InputError
from spineqprep.segmentation import augment
from spineqprep.synth import labels as lab
from spineqprep.synth.anatomy import Anatomy, build_anatomy, rotation_matrix
from spineqprep.synth.cohort import Visit, sample_cohort
from spineqprep.synth.truth import sample_points

CLASSES = ("background", "vertebral_body", "sacrum", "disc")
SPACING_MM = 1.25
#: Training subjects are drawn with cohort seeds from here on; evaluation uses other seeds
#: (generate_dataset(seed=999), seed 2024 ...), so no training anatomy is ever evaluated.
TRAINING_SEED_BASE = 1000
WINDOW = 144  # bank slices (px), cropped / deformed to the training size
REALISTIC = ("T1w", "T2w", "PD", "T2prep")


def _compact_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detailed synth labels -> compact uint8 index, and per compact index its class (0-3) and
    tissue group (labels of one tissue may share a random intensity)."""
    tissue = lab.tissue_classes()
    detailed = sorted(tissue)
    to_compact = np.zeros(lab.MAX_LABEL + 1, np.uint8)
    to_compact[detailed] = np.arange(len(detailed))
    sacrum = lab.vertebra(len(lab.VERTEBRAE) - 1)
    cls = np.zeros(len(detailed), np.uint8)
    for i, d in enumerate(detailed):
        main = int(lab.main_labels(np.array([d]))[0])
        if main == sacrum:
            cls[i] = 2
        elif main in {lab.vertebra(j) for j in range(len(lab.VERTEBRAE))}:
            cls[i] = 1
        elif main:
            cls[i] = 3
    names = sorted(set(tissue.values()))
    group = np.array([names.index(tissue[d]) for d in detailed], np.int64)
    return to_compact, cls, group, np.array(detailed)


TO_COMPACT, CLASS_OF, GROUP_OF, DETAILED = _compact_tables()


@dataclass(frozen=True)
class SliceBank:
    """Sub-slice label maps (N, 3, H, W, compact uint8), the generator's contrasts
    (N, 4, H, W, float16, thickness-averaged, in ``REALISTIC`` order) and the non-bone share
    of each sub-slice pixel (N, 3, H, W, uint8 0-255: the cortical bone's signal void)."""

    labels: np.ndarray
    images: np.ndarray
    pd_scale: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _plane(anat: Anatomy, rng: np.random.Generator, size: int, spacing: float
           ) -> tuple[np.ndarray, float]:
    """World points (3, size * size, 3) of three sub-slices of a random sagittal plane through
    the lumbar spine, and the slice thickness (mm)."""
    top, bottom = anat.vert_u[lab.VERTEBRAE.index("T12")], anat.vert_u[-1] + 10.0
    j3 = lab.VERTEBRAE.index("L3")
    centre = anat.world(np.array([rng.uniform(bottom, top)]), np.array([rng.uniform(-30, 15)]),
                        np.array([rng.uniform(-1.15, 1.15) * anat.vert_half_width[j3]]))[0]
    tilt = rotation_matrix(rng.normal(0, 6.0), rng.normal(0, 4.0), rng.normal(0, 4.0))
    rows, cols, normal = tilt @ np.array([0, 0, -1.0]), tilt @ np.array([0, -1.0, 0]), \
        tilt @ np.array([1.0, 0, 0])
    thickness = rng.uniform(3.0, 6.0)
    idx = (np.arange(size) - (size - 1) / 2) * spacing
    a, b = (g.ravel() for g in np.meshgrid(idx, idx, indexing="ij"))
    flat = centre + np.outer(a, rows) + np.outer(b, cols)
    return np.stack([flat + k * thickness / 3 * normal for k in (-1, 0, 1)]), thickness


#: Acquisition times drawn per bank slice for the generator's contrasts (seconds): T1w TR /
#: TE, T2w TR / TE and the T2-prep time, uniform in these ranges, so the network sees a range
#: of protocols rather than the sites' (T1w 0.6 / 0.010, T2w 3.5 / 0.095).
TIMES_RANGE_S = {"T1w": ((0.4, 0.8), (0.006, 0.020)), "T2w": ((2.5, 5.5), (0.070, 0.130)),
                 "T2prep": ((0.0, 0.0), (0.030, 0.080))}


def random_times(rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """One (TR, TE) per generator contrast, drawn from ``TIMES_RANGE_S``."""
    return {name: (rng.uniform(*tr), rng.uniform(*te))
            for name, (tr, te) in TIMES_RANGE_S.items()}


def _signals(maps: dict[str, np.ndarray], times: dict[str, tuple[float, float]] | None = None
             ) -> np.ndarray:
    """The generator's weightings (``REALISTIC``) of per-point truth maps at acquisition
    ``times`` ({contrast: (TR, TE)} in seconds; default the sites' own)."""
    times = times or {"T1w": (0.6, 0.010), "T2w": (3.5, 0.095), "T2prep": (0.0, 0.05)}
    pd, t1, t2 = maps["PD"], maps["T1"], maps["T2"]

    def decay(t: float, relax: np.ndarray) -> np.ndarray:
        return np.exp(-np.divide(t, relax, out=np.full_like(relax, np.inf), where=relax > 0))

    (tr1, te1), (tr2, te2) = times["T1w"], times["T2w"]
    return np.stack([pd * (1 - decay(tr1, t1)) * decay(te1, t2),
                     pd * (1 - decay(tr2, t1)) * decay(te2, t2), pd,
                     pd * decay(times["T2prep"][1], t2)])


def make_bank(n_subjects: int, slices_per_subject: int, seed: int = TRAINING_SEED_BASE,
              size: int = WINDOW, spacing: float = SPACING_MM,
              progress: Callable[[str], None] | None = None) -> SliceBank:
    """Sample ``slices_per_subject`` random sagittal planes of each of ``n_subjects`` synthetic
    anatomies (cohort seed ``seed``, three sites' worth of subject variation), each with its
    own random acquisition times (``TIMES_RANGE_S``)."""
    people = sample_cohort(n_subjects, min(3, n_subjects), 1, seed)
    labels = np.zeros((n_subjects * slices_per_subject, 3, size, size), np.uint8)
    images = np.zeros((len(labels), len(REALISTIC), size, size), np.float16)
    scale = np.zeros_like(labels)
    rng = np.random.default_rng([seed, 7])
    for p, person in enumerate(people):
        visit = person.visits[0]
        anat = build_anatomy(person, visit, seed)
        for s in range(slices_per_subject):
            points, _ = _plane(anat, rng, size, spacing)
            i = p * slices_per_subject + s
            labels[i], images[i], scale[i] = bank_slice(
                anat, points, visit, size, spacing, partial(_signals, times=random_times(rng)))
        if progress and (p + 1) % max(1, n_subjects // 10) == 0:
            progress(f"slice bank: {p + 1}/{n_subjects} subjects")
    return SliceBank(labels, images, scale)


def bank_slice(anat: Anatomy, points: np.ndarray, visit: Visit, size: int, spacing: float,
               signals: Callable[[dict[str, np.ndarray]], np.ndarray] = _signals
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact labels, contrasts (``signals`` of the truth maps, thickness-averaged) and
    non-bone share (uint8) of three sub-slices of world ``points`` (3, size * size, 3)
    sampled every ``spacing`` mm."""
    det, maps = sample_points(anat, points.reshape(-1, 3), visit.discs, footprint_mm=spacing)
    contrasts = signals(maps)
    signal = contrasts.reshape(len(contrasts), 3, size, size).mean(axis=1)
    scale = np.round(255 * maps["PDscale"]).astype(np.uint8).reshape(3, size, size)
    return TO_COMPACT[det].reshape(3, size, size), signal.astype(np.float16), scale


def to_bits(target: np.ndarray) -> np.ndarray:
    """Class labels -> bitmasks of allowed classes (``1 << class``); ``augment.IGNORE`` (255,
    every bit set) stays: any class allowed, i.e. unknown."""
    target = np.asarray(target)
    return np.where(target == augment.IGNORE, augment.IGNORE,
                    np.left_shift(1, np.minimum(target, 7))).astype(np.int64)


def definite_classes(bits: np.ndarray) -> np.ndarray:
    """Bitmasks -> the class where exactly one is allowed, ``augment.IGNORE`` elsewhere."""
    bits = np.asarray(bits, np.int64)
    single = (bits > 0) & ((bits & (bits - 1)) == 0)
    return np.where(single, np.log2(np.maximum(bits, 1)).round().astype(np.int64),
                    augment.IGNORE)


def normalise_array(x: np.ndarray) -> np.ndarray:
    """Robust min-max: (x - p1) / (p99 - p1) over the whole array, clipped to [-0.5, 2]."""
    x = np.asarray(x, np.float32)
    lo, hi = np.percentile(x, [1.0, 99.0])
    return np.clip((x - lo) / max(float(hi - lo), 1e-6), -0.5, 2.0).astype(np.float32)


def synthetic_sample(bank: SliceBank, rng: np.random.Generator, size: int,
                     realistic_fraction: float = 0.3, class_of: np.ndarray = CLASS_OF,
                     spacing_mm: float = SPACING_MM,
                     spacing_range_mm: tuple[float, float] = augment.SPACING_RANGE_MM,
                     max_rotation_deg: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """One randomised (normalised image, target) pair of ``size`` x ``size`` from the bank;
    ``class_of`` maps compact labels to the network's classes."""
    i = int(rng.integers(len(bank)))
    coords = augment.deformation(rng, bank.labels.shape[2:], (size, size),
                                 max_rotation_deg=max_rotation_deg)
    sub = augment.warp(bank.labels[i], coords, order=0)
    target = class_of[sub[1]]
    if rng.random() < realistic_fraction:
        image = augment.warp(bank.images[i, int(rng.integers(bank.images.shape[1]))].astype(
            np.float32), coords, order=1)
        if rng.random() < 0.15:
            image = image.max() - image
    else:
        scale = augment.warp(bank.pd_scale[i].astype(np.float32) / 255, coords, order=1,
                             fill=1.0)
        image = augment.random_contrast(rng, sub, GROUP_OF, len(CLASS_OF), scale)
    image = augment.degrade(rng, image, spacing_mm, spacing_range_mm)
    if rng.random() < 0.2:
        image, target = augment.cut_field_of_view(rng, image, target)
    return normalise_array(image), target


# ---- real labelled slices (fine-tuning) ----------------------------------------------------
@dataclass(frozen=True)
class LabelledSlice:
    """A canonical sagittal slice on the network grid and its target as bitmasks of allowed
    classes (:func:`to_bits`): a manual label set that names only some structures (vertebral
    bodies, or discs) leaves the others undecided, never background."""

    image: np.ndarray
    target: np.ndarray
    source: str


def canonical_slices(img: nib.spatialimages.SpatialImage, order: int,
                     spacing: float = SPACING_MM) -> list[np.ndarray]:
    """Sagittal slices of a 3D image, rows superior -> inferior, columns anterior ->
    posterior, resampled in-plane to ``spacing`` mm (``order`` 0 for labels, 1 for images).
    The image is reoriented to the closest RAS axes first (oblique tilts are ignored)."""
    ras = nib.as_closest_canonical(img)
    data = np.asarray(ras.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise InputError(f"expected a 3D image, got shape {data.shape}",
                         path=img.get_filename(), fix="give one 3D volume per file")
    zooms = ras.header.get_zooms()[:3]
    factors = (zooms[2] / spacing, zooms[1] / spacing)
    return [ndimage.zoom(data[i].T[::-1, ::-1], factors, order=order)
            for i in range(data.shape[0])]


def label_classes(rows: Sequence[dict[str, str]]) -> dict[int, int]:
    """``dseg.tsv`` rows -> {index: class}: T12 and the lumbar vertebrae (and any thoracic
    vertebra) 1, S1 / sacrum 2, discs (e.g. L4L5, L5S1, T12L1) 3; anything else background."""
    out = {}
    for row in rows:
        abbr = (row.get("abbreviation") or "").strip()
        try:
            index = int(row["index"])
        except (KeyError, ValueError):
            continue
        if re.fullmatch(r"(T\d{1,2}|L\d)(L\d|S1|T\d{1,2})", abbr):
            out[index] = 3
        elif abbr in {"S1", "S", "sacrum"}:
            out[index] = 2
        elif re.fullmatch(r"T\d{1,2}|L\d|VB\d*", abbr):  # VB<n>: a body of unnamed level
            out[index] = 1
    return out


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _raw_roots(labels_dir: Path) -> list[Path]:
    """Where the images of a derivatives dataset may be: its DatasetLinks / SourceDatasets,
    the raw dataset it sits in (``<raw>/derivatives/<name>``), and itself."""
    roots = []
    try:
        desc = json.loads((labels_dir / "dataset_description.json").read_text())
    except (OSError, ValueError):
        desc = {}
    links = desc.get("DatasetLinks") or {}
    urls = [u for u in links.values() if isinstance(u, str)]
    urls += [s.get("URL", "") for s in desc.get("SourceDatasets") or [] if isinstance(s, dict)]
    for url in urls:
        url = url.removeprefix("file://")
        if url and not url.startswith(("bids:", "http", "doi:")):
            roots.append((labels_dir / url).resolve())
    if labels_dir.parent.name == "derivatives":
        roots.append(labels_dir.parent.parent)
    roots.append(labels_dir)
    return [r for r in roots if r.is_dir()]


#: Images a manual segmentation may be drawn on, per network: the spine network's contrasts
#: (and the first echo / spin-lock of a mapping series), the endplate network's first UTE echo.
IMAGES = {"spine": re.compile(r"_(T1w|T2w|echo-1_MESE|tsl-1_MESL|echo-1_MEGRE)\.nii(\.gz)?$"),
          "endplates": re.compile(r"_echo-1_MEGRE\.nii(\.gz)?$")}
#: The ``desc`` of an endplate segmentation (as the pipeline writes and accepts them).
ENDPLATE_DESC = "_desc-endplates_"


def find_pairs(labels_dir: str | Path, kind: str = "spine") -> list[tuple[Path, Path]]:
    """(image, dseg) pairs of a derivatives folder: ``sub-01_acq-sag_dseg.nii.gz`` pairs with
    ``sub-01_acq-sag_T2w.nii.gz`` / ``_T1w`` (and with the first echo / spin-lock of a mapping
    series ``sub-01_acq-mapss_echo-1_MESE`` ...) in the same relative folder of the raw
    dataset; for ``kind="endplates"``, ``sub-01_acq-ute_desc-endplates_dseg.nii.gz`` pairs
    with ``sub-01_acq-ute_echo-1_MEGRE.nii.gz`` (endplate masks are never used for the spine
    network). Other ``desc-`` entities of the dseg are ignored; ``_probseg`` files are not
    used."""
    root = Path(labels_dir)
    if not root.is_dir():
        raise InputError("the labels folder does not exist", path=root,
                         fix="give a BIDS derivatives folder with *_dseg.nii.gz files")
    raws = _raw_roots(root)
    images = IMAGES[kind]
    pairs = []
    for dseg in sorted(root.rglob("*_dseg.nii*")):
        if (ENDPLATE_DESC in dseg.name) != (kind == "endplates"):
            continue
        stem = re.sub(r"_desc-[A-Za-z0-9]+", "", dseg.name.split("_dseg.nii")[0])
        rel = dseg.parent.relative_to(root)
        for raw in raws:
            found = sorted(p for p in (raw / rel).glob(f"{stem}_*.nii*") if images.search(p.name)
                           and "_dseg" not in p.name)
            if found:
                pairs += [(image, dseg) for image in found]
                break
    if not pairs:
        example = ("sub-01_acq-ute_desc-endplates_dseg.nii.gz <-> "
                   "sub-01_acq-ute_echo-1_MEGRE.nii.gz" if kind == "endplates" else
                   "sub-01_acq-sag_dseg.nii.gz <-> sub-01_acq-sag_T2w.nii.gz")
        raise InputError(f"no *_dseg.nii.gz with a matching raw image (e.g. {example})",
                         path=root,
                         fix="put the derivatives inside <raw>/derivatives/, or set DatasetLinks "
                             "{'raw': '<path>'} in its dataset_description.json")
    return pairs


def lut_path(dseg: Path, root: Path) -> Path:
    """The look-up table of a dseg file: its own ``<stem>_dseg.tsv`` or the nearest dseg.tsv
    upwards to the dataset ``root``."""
    own = dseg.with_name(dseg.name.split(".nii")[0] + ".tsv")
    candidates = [own] + [d / "dseg.tsv" for d in [dseg.parent, *dseg.parent.parents]
                          if d == root or root in d.parents]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise InputError("no dseg.tsv look-up table for this segmentation", path=dseg,
                         fix="add dseg.tsv (index, name, abbreviation) at the derivatives root")
    return found


def _lookup(dseg: Path, root: Path) -> dict[int, int]:
    """The class table of a dseg file (:func:`lut_path`, :func:`label_classes`)."""
    path = lut_path(dseg, root)
    table = label_classes(_read_tsv(path))
    if not table:
        raise InputError("dseg.tsv names no vertebra (T12..L5), sacrum (S1) or disc "
                         "(e.g. L4L5)", path=path,
                         fix="use the schema abbreviations in the abbreviation column")
    return table


def label_bits(table: Mapping[int, int], n_classes: int
               ) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """For a manual label set (``table``: dseg index -> class): the bitmask of the classes it
    labels, and a function turning a label slice into target bitmasks (:func:`to_bits`). A
    pixel of an index outside ``table`` may be background or any class the set does not
    label."""
    known = sum(1 << c for c in set(table.values()))
    unlabelled = ((1 << n_classes) - 1) & ~known
    lut = np.full(int(max(table) + 1), unlabelled, np.uint8)
    for index, cls in table.items():
        lut[index] = 1 << cls

    def convert(lab_slice: np.ndarray) -> np.ndarray:
        idx = np.rint(lab_slice).astype(np.int64)
        inside = (idx >= 0) & (idx < len(lut))
        return np.where(inside, lut[np.clip(idx, 0, len(lut) - 1)], unlabelled).astype(np.uint8)

    return known, convert


def load_pair(image_path: Path, dseg_path: Path
              ) -> tuple[nib.spatialimages.SpatialImage, nib.spatialimages.SpatialImage]:
    """An image and its manual segmentation, read and checked to share a grid."""
    try:
        image, dseg = nib.load(image_path), nib.load(dseg_path)
    except Exception as err:  # nibabel raises many types for unreadable files
        raise InputError(f"cannot read: {err}", path=image_path,
                         fix="check the NIfTI files") from err
    if image.shape[:3] != dseg.shape[:3]:
        raise InputError(f"segmentation shape {dseg.shape} differs from the image "
                         f"{image_path.name} {image.shape}", path=dseg_path,
                         fix="a manual segmentation must be on the grid of its image")
    return image, dseg


def load_labelled_slices(labels_dir: str | Path, min_foreground: int = 50
                         ) -> list[LabelledSlice]:
    """Every sagittal slice with some labelled structure of every (image, dseg) pair.

    The classes a look-up table names are labelled; the others are not. Between the most
    superior and the most inferior labelled voxel of the volume an unlabelled pixel is known
    not to be a labelled class (it may be background or an unlabelled class); above and below
    that span nothing is known (e.g. an unlabelled T12 above labels that stop at L1)."""
    root = Path(labels_dir)
    out = []
    for image_path, dseg_path in find_pairs(root):
        table = _lookup(dseg_path, root)
        image, dseg = load_pair(image_path, dseg_path)
        known, to_bits_of = label_bits(table, len(CLASSES))
        bits = [to_bits_of(lab_slice) for lab_slice in canonical_slices(dseg, 0)]
        rows = np.flatnonzero(np.any([(b & known) > 0 for b in bits], axis=(0, 2)))
        if rows.size == 0:
            continue
        for img_slice, target in zip(canonical_slices(image, 1), bits, strict=True):
            target[: rows[0]] = augment.IGNORE
            target[rows[-1] + 1:] = augment.IGNORE
            if np.count_nonzero(target & known) >= min_foreground:
                out.append(LabelledSlice(img_slice, target, image_path.name))
    return out


def real_sample(slices: Sequence[LabelledSlice], rng: np.random.Generator, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """A randomised (normalised image, target) pair from a labelled slice: deformation and
    crop, bias field, gamma and a little noise (the contrast itself is real)."""
    item = slices[int(rng.integers(len(slices)))]
    coords = augment.deformation(rng, item.image.shape, (size, size), max_rotation_deg=10.0)
    target = augment.warp(item.target, coords, order=0, fill=augment.IGNORE)
    image = augment.warp(item.image.astype(np.float32), coords, order=1)
    image = image * augment.bias_field(rng, image.shape, 0.2)
    image = np.clip(image / (np.percentile(image, 99.5) or 1.0), 0, None)
    image = image ** np.exp(rng.normal(0.0, 0.15))
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.03), image.shape)
    return normalise_array(image), target


class SampleStream:
    """Seeded batches of (image, target bitmask, :func:`to_bits`): ``batch(step)`` depends
    only on (seed, step), never on earlier calls."""

    def __init__(self, bank: SliceBank, seed: int, batch_size: int = 8, size: int = 128,
                 real: Sequence[LabelledSlice] = (), real_fraction: float = 0.5,
                 sampler: Callable[[SliceBank, np.random.Generator, int],
                                   tuple[np.ndarray, np.ndarray]] = synthetic_sample):
        self.bank, self.seed, self.batch_size, self.size = bank, seed, batch_size, size
        self.real, self.real_fraction = list(real), real_fraction if real else 0.0
        self.sampler = sampler

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, 11])
        pairs = []
        for _ in range(self.batch_size):
            if rng.random() < self.real_fraction:
                pairs.append(real_sample(self.real, rng, self.size))
            else:
                image, target = self.sampler(self.bank, rng, self.size)
                pairs.append((image, to_bits(target)))
        images = np.stack([p[0] for p in pairs])[:, None]
        targets = np.stack([p[1] for p in pairs]).astype(np.int64)
        return torch.from_numpy(images), torch.from_numpy(targets)
