"""Per-level evaluation of label images and of whole derivatives datasets.

A predicted and a reference derivatives dataset are paired file by file through their BIDS
entities (``sub``, ``ses``, ``acq``, ``desc`` ...): ``sub-01_acq-mese_dseg.nii.gz`` in one is
compared with the same name in the other; a prediction without such a counterpart is compared
with the reference that differs only in ``desc`` and shares the most levels with it (the
pipeline's ``desc-endplates`` against the synthetic truth's ``desc-tissues``). Each image's
look-up table is its nearest ``dseg.tsv`` (BIDS inheritance: the image's own sidecar, else one
in a parent folder up to the dataset root). Levels are matched by abbreviation (by name when a
table has no ``abbreviation`` column), never by index, so a manual segmentation with its own
numbering compares with spineqprep's; names are read as the precomputed-mask import reads them
(:func:`canonical_level`), so ``L4-L5`` and the synthetic truth's ``CEPsup_L4L5`` match the
pipeline's ``L4L5`` and ``L4L5sup``. A prediction on another grid is resampled (nearest neighbour)
onto the reference grid, with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from spineqprep.bids.derivatives import atomic_write_text
from spineqprep.bids.schema import load_schema
from spineqprep.errors import InputError, UsageError
from spineqprep.metrics import overlap, surface
from spineqprep.segmentation.lut import lut_path, read_lut, standard_row
from spineqprep.stats.summary import parse_name

LOG = logging.getLogger("spineqprep")

#: Metric columns of a per-level table, in order.
METRICS: tuple[str, ...] = (
    "dice", "dice_2d", "dice_central50", "msd_mm", "hd95_mm", "volume_diff_pct",
    "sensitivity", "specificity", "precision", "roc_auc", "pr_auc",
)
#: Affine entries closer than this (mm) are the same grid.
GRID_TOLERANCE = 1e-3
#: Suffixes of label images (integer labels listed in a ``dseg.tsv``): the only ones compared.
LABEL_SUFFIXES: tuple[str, ...] = ("dseg",)
#: The spine network's class probability maps (``label-`` of workflows.segmentation
#: PROBSEG_LABELS) and the level abbreviations each scores (``V<k>``/``D<k>``: vertebrae and
#: discs whose level the pipeline could not name).
CLASS_PROBSEGS: dict[str, re.Pattern[str]] = {
    "disc": re.compile(r"(?:[TLS]\d+){2}|D\d+"),
    "VB": re.compile(r"[TL]\d+|V\d+"),
    "sacrum": re.compile(r"S1"),
}
#: A class probability map is scored in the level's bounding box grown by this margin (mm).
CLASS_AUC_MARGIN_MM = 5.0


class Level(NamedTuple):
    """One structure to evaluate: its abbreviation and name, and its label in each image
    (``None`` when that image's table does not list it: an empty mask)."""

    level: str
    name: str
    ref_index: int | None
    pred_index: int | None


def canonical_level(name: str) -> str:
    """The name a level is matched by: the standard abbreviation of a name
    :func:`spineqprep.segmentation.lut.standard_row` recognises (``L4-L5``, ``vertebral body
    L5``, the synthetic truth's ``CEPsup_L4L5`` ...), else the name itself."""
    row = standard_row(name)
    return str(row["abbreviation"]) if row and row["index"] else name


def probseg_level(label: str) -> str:
    """The level a ``_label-<label>_probseg`` map scores: the label itself, a per-endplate map's
    ``L4L5superior`` / ``L4L5inferior`` (the pipeline's) read as ``L4L5sup`` / ``L4L5inf``."""
    match = re.fullmatch(r"(.+?)(superior|inferior)", label)
    return canonical_level(f"{match[1]}{match[2][:3]}" if match else label)


def probseg_class(level: str) -> str | None:
    """The class probability map (:data:`CLASS_PROBSEGS`) that scores ``level``, if any."""
    return next((c for c, pattern in CLASS_PROBSEGS.items() if pattern.fullmatch(level)), None)


def sagittal_axis(affine: np.ndarray) -> int:
    """The array axis closest to the scanner's left-right (x) axis: slices along it are
    sagittal."""
    columns = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(columns[0]) / np.linalg.norm(columns, axis=0)))


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *,
                   slice_axis: int = 0, scores: np.ndarray | None = None,
                   score_region: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one binary prediction against its reference, plus
    the voxel counts (``pred_voxels``, ``ref_voxels``). ``spacing`` is the voxel size in mm per
    axis, ``slice_axis`` the axis of the 2D slices; ``scores`` (a probability map of the
    prediction, same shape) gives ROC-AUC and PR-AUC over the voxels of ``score_region`` (a
    mask; the whole image without it), NaN without scores. Empty-mask conventions are those of
    :mod:`overlap` and :mod:`surface`."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    union = pred | ref
    if union.any():  # everything but TN and the AUCs lives in the union's bounding box
        box = ndimage.find_objects(union.astype(np.uint8))[0]
        p, r = pred[box], ref[box]
    else:
        p, r = pred, ref
    counts = overlap.confusion(p, r)
    counts = counts._replace(tn=pred.size - counts.tp - counts.fp - counts.fn)
    nan = float("nan")
    if scores is not None and score_region is not None:
        scores, ref = scores[score_region], ref[score_region]
    return {
        "ref_voxels": counts.tp + counts.fn,
        "pred_voxels": counts.tp + counts.fp,
        "dice": overlap.dice(p, r),
        "dice_2d": overlap.dice_2d(p, r, slice_axis),
        "dice_central50": overlap.dice_central(p, r, slice_axis, 0.5),
        "msd_mm": surface.mean_surface_distance(p, r, spacing),
        "hd95_mm": surface.hausdorff_distance(p, r, spacing, 95.0),
        "volume_diff_pct": overlap.volume_difference_percent(p, r),
        "sensitivity": overlap.sensitivity(counts),
        "specificity": overlap.specificity(counts),
        "precision": overlap.precision(counts),
        "roc_auc": nan if scores is None else overlap.roc_auc(scores, ref),
        "pr_auc": nan if scores is None else overlap.pr_auc(scores, ref),
    }


def class_score_region(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                       others: np.ndarray) -> np.ndarray:
    """Where a class probability map is scored for one level: the bounding box of the level's
    predicted and reference voxels grown by :data:`CLASS_AUC_MARGIN_MM` on every side, less
    ``others`` (the reference's other structures of the same class, which the map rightly
    scores high). Empty when both masks are."""
    region = np.zeros(ref.shape, bool)
    union = (pred | ref).astype(np.uint8)
    if not union.any():
        return region
    grow = np.ceil(CLASS_AUC_MARGIN_MM / np.asarray(spacing, float)).astype(int)
    box = ndimage.find_objects(union)[0]
    region[tuple(slice(max(b.start - g, 0), b.stop + g) for b, g in zip(box, grow, strict=True))] \
        = True
    return region & ~others


def evaluate_labels(pred: np.ndarray, ref: np.ndarray, levels: Sequence[Level],
                    spacing: Sequence[float], *, slice_axis: int = 0,
                    probabilities: Mapping[str, np.ndarray] | None = None,
                    class_maps: Mapping[str, Sequence[int]] | None = None,
                    keep_absent: bool = False) -> pd.DataFrame:
    """One row per level of two label images on the same grid: ``level``, ``name``, ``index``
    (reference label; ``None`` for a level only the prediction's table lists), voxel counts,
    volumes (mm^3) and :data:`METRICS`. A level whose label an image's table lacks is empty in
    that image. Levels absent from both images are left out unless ``keep_absent``.
    ``probabilities`` maps a level to its probability map (for the AUCs), scored over the whole
    image, or, for the levels of ``class_maps`` (a class map: level -> the reference labels of
    the class's other structures), over :func:`class_score_region`."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    voxel_mm3 = float(np.prod(spacing))
    probabilities, class_maps = probabilities or {}, class_maps or {}
    empty = np.zeros(ref.shape, bool)
    rows = []
    for lv in levels:
        p = empty if lv.pred_index is None else pred == lv.pred_index
        r = empty if lv.ref_index is None else ref == lv.ref_index
        if not keep_absent and not (p.any() or r.any()):
            continue
        region = None
        if lv.level in class_maps:
            region = class_score_region(p, r, spacing, np.isin(ref, class_maps[lv.level]))
        values = binary_metrics(p, r, spacing, slice_axis=slice_axis,
                                scores=probabilities.get(lv.level), score_region=region)
        rows.append({"level": lv.level, "name": lv.name, "index": lv.ref_index, **values,
                     "ref_volume_mm3": values["ref_voxels"] * voxel_mm3,
                     "pred_volume_mm3": values["pred_voxels"] * voxel_mm3})
    columns = ["level", "name", "index", "ref_voxels", "pred_voxels", "ref_volume_mm3",
               "pred_volume_mm3", *METRICS]
    return pd.DataFrame(rows, columns=columns)


# -- look-up tables --------------------------------------------------------------------------

def _lut_for(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Rows of the table that describe images of ``kind`` (``dseg``, ``desc-tissues`` ...):
    those whose ``image`` column lists it, or every row when no row does."""
    if "image" not in table.columns:
        return table
    listed = table["image"].str.split().apply(lambda kinds: kind in kinds)
    return table[listed] if listed.any() else table


def _label_key(pred_lut: pd.DataFrame, ref_lut: pd.DataFrame) -> str:
    both = "abbreviation" in pred_lut.columns and "abbreviation" in ref_lut.columns
    return "abbreviation" if both else "name"


def _by_level(table: pd.DataFrame, key: str) -> dict[str, tuple[int, str]]:
    """Canonical level name -> (label, name) of a table's non-background rows."""
    rows = table[table["index"] > 0]
    return {canonical_level(str(level)): (int(index), str(name))
            for level, index, name in zip(rows[key], rows["index"], rows["name"], strict=True)}


def match_levels(pred_lut: pd.DataFrame, ref_lut: pd.DataFrame,
                 labels: Sequence[str] | None = None) -> list[Level]:
    """The levels to evaluate, matched by abbreviation (name when a table has none) through
    :func:`canonical_level`, never by index: those named in ``labels`` (abbreviation, name or
    reference index), else the reference table's levels in its order, then the levels only the
    prediction's table lists (false positives). A level only the reference lists (a missed
    structure) is scored only when the prediction has a level of the same kind
    (:func:`probseg_class`): a disc-only prediction, or an endplate mask paired with a tissue
    map, is not charged with the vertebrae.
    ``InputError`` when the tables share no level (without ``labels``)."""
    key = _label_key(pred_lut, ref_lut)
    pred, ref = _by_level(pred_lut, key), _by_level(ref_lut, key)
    kinds = {probseg_class(lv) for lv in pred} - {None}

    def scored(lv: str) -> bool:  # in the prediction, or a miss of a kind it segments
        return lv in pred or (lv in ref and probseg_class(lv) in kinds)

    if labels is None:
        if not set(pred) & set(ref):
            raise InputError(
                f"the predicted and reference label tables share no {key}",
                fix=f"label both datasets' dseg.tsv with the same {key}s "
                f"(reference: {', '.join(list(ref)[:8])} ...)")
        chosen = [lv for lv in ref if scored(lv)]
        chosen += [lv for lv in pred if lv not in ref]
    else:
        names = {str(n): lv for lv, (i, n) in (*pred.items(), *ref.items())}
        names.update({str(i): lv for lv, (i, _) in ref.items()})
        chosen = [names.get(label, canonical_level(label)) for label in labels]
        chosen = [lv for lv in dict.fromkeys(chosen) if scored(lv)]
    return [Level(lv, (ref.get(lv) or pred[lv])[1],
                  ref[lv][0] if lv in ref else None, pred[lv][0] if lv in pred else None)
            for lv in chosen]


# -- images ----------------------------------------------------------------------------------

def _load(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for unreadable files
        raise InputError(f"cannot read the image: {err}", path=path) from err
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise InputError(f"expected a 3D image, got shape {data.shape}", path=path)
    return nib.Nifti1Image(data, img.affine)


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    """Same shape and affines equal within :data:`GRID_TOLERANCE`."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=GRID_TOLERANCE)


def resample_to(img: nib.Nifti1Image, target: nib.Nifti1Image, order: int) -> np.ndarray:
    """``img``'s data on ``target``'s grid through both affines (``order`` 0 = nearest
    neighbour for labels, 1 = linear for probabilities); 0 beyond the outer faces of ``img``'s
    edge voxels (``grid-constant``, so that rounding noise at an edge voxel's centre does not
    drop it)."""
    matrix = np.linalg.inv(img.affine) @ target.affine
    data = np.asarray(img.dataobj)
    if order > 0:
        data = data.astype(np.float64)
    return ndimage.affine_transform(data, matrix, output_shape=target.shape, order=order,
                                    mode="grid-constant", cval=0)


def _on_ref_grid(img: nib.Nifti1Image, ref: nib.Nifti1Image, order: int, path: Path,
                 ref_path: Path) -> tuple[np.ndarray, bool]:
    if same_grid(img, ref):
        return np.asarray(img.dataobj), False
    LOG.warning("%s is not on the grid of %s: resampled onto it (%s) before evaluation",
                path, ref_path, "nearest neighbour" if order == 0 else "linear")
    return resample_to(img, ref, order), True


def _labels_of(data: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels of a label image; ``InputError`` for non-integer values (a map, not a
    segmentation)."""
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.allclose(rounded, data, rtol=0, atol=1e-3, equal_nan=False):
            raise InputError("holds non-integer values: not a label image", path=path,
                             fix="compare segmentations (_dseg with a dseg.tsv), not maps")
        data = rounded
    return data.astype(np.int64)


def evaluate_pair(pred_path: str | Path, ref_path: str | Path, levels: Sequence[Level], *,
                  slice_axis: int | None = None, probseg: Mapping[str, Path] | None = None,
                  class_maps: Mapping[str, Sequence[int]] | None = None,
                  keep_absent: bool = False) -> pd.DataFrame:
    """Per-level table of one predicted label image against its reference (files). The
    prediction (and the ``probseg`` maps, per level; ``class_maps`` as in
    :func:`evaluate_labels`) is resampled onto the reference grid when needed (column
    ``resampled``). ``slice_axis`` defaults to the sagittal axis."""
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    ref_img, pred_img = _load(ref_path), _load(pred_path)
    pred, resampled = _on_ref_grid(pred_img, ref_img, 0, pred_path, ref_path)
    loaded: dict[Path, np.ndarray] = {}
    for path in set((probseg or {}).values()):
        data, _ = _on_ref_grid(_load(path), ref_img, 1, path, ref_path)
        loaded[path] = np.nan_to_num(data.astype(np.float64))
    probabilities = {level: loaded[path] for level, path in (probseg or {}).items()}
    axis = sagittal_axis(ref_img.affine) if slice_axis is None else slice_axis
    table = evaluate_labels(_labels_of(pred, pred_path),
                            _labels_of(np.asarray(ref_img.dataobj), ref_path), levels,
                            surface.voxel_spacing(ref_img.affine), slice_axis=axis,
                            probabilities=probabilities, class_maps=class_maps,
                            keep_absent=keep_absent)
    table["resampled"] = resampled
    return table


# -- datasets --------------------------------------------------------------------------------

Key = tuple[tuple[str, str], ...]


def _files(root: Path, suffix: str) -> dict[Key, Path]:
    """BIDS files ``sub-*/.../*_<suffix>.nii[.gz]`` under ``root``, keyed by their entities."""
    found = {}
    for path in sorted(root.glob(f"sub-*/**/*_{suffix}.nii*")):
        parsed = parse_name(path.name)
        if parsed is not None and parsed[1] == suffix:
            found[tuple(sorted(parsed[0].items()))] = path
    return found


def _without(key: Key, entity: str) -> Key:
    return tuple(item for item in key if item[0] != entity)


def _probseg_index(root: Path) -> dict[Key, dict[str, Path]]:
    """``_label-<label>_probseg`` maps under ``root``: entities without ``label`` -> label ->
    file."""
    index: dict[Key, dict[str, Path]] = {}
    for key, path in _files(root, "probseg").items():
        level = dict(key).get("label")
        if level is not None:
            index.setdefault(_without(key, "label"), {})[level] = path
    return index


class _Tables:
    """Look-up tables of one dataset's images, read once per file; an image without a table
    borrows its counterpart's in the other dataset (warning)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._read: dict[Path, pd.DataFrame] = {}

    def get(self, image: Path, other: Path, other_root: Path) -> pd.DataFrame:
        """The table of ``image`` (rows of its kind, see :func:`_lut_for`)."""
        path = lut_path(image, self.root)
        if path is None:
            path = lut_path(other, other_root)
            if path is None:
                raise InputError(
                    "neither this image nor its counterpart has a dseg.tsv look-up table",
                    path=image, fix="write the label table (index, name, abbreviation) as "
                    f"{image.name.split('.')[0]}.tsv beside it or as dseg.tsv at the root")
            if path not in self._read:
                LOG.warning("%s has no dseg.tsv: using the labels of %s", image, path)
        if path not in self._read:
            self._read[path] = read_lut(path)
        desc = parse_name(image.name)[0].get("desc")
        return _lut_for(self._read[path], f"desc-{desc}" if desc else "dseg")


def _pair_files(pred_files: dict[Key, Path], ref_files: dict[Key, Path],
                level_count: Callable[[Path, Path], int]) -> dict[Key, Key]:
    """Prediction key -> reference key: the same entities, else (for a prediction that has
    none) the reference differing only in ``desc`` with which ``level_count`` (shared levels)
    is largest and positive."""
    pairs = {key: key for key in pred_files if key in ref_files}
    for key in pred_files.keys() - pairs.keys():
        stem = _without(key, "desc")
        candidates = [(level_count(pred_files[key], ref_files[ref]), ref)
                      for ref in ref_files if _without(ref, "desc") == stem]
        best = max(candidates, default=(0, None))
        if best[0] > 0:
            pairs[key] = best[1]
            LOG.warning("%s has no reference of the same name: compared with %s (%d shared "
                        "levels)", pred_files[key].name, ref_files[best[1]].name, best[0])
    return dict(sorted(pairs.items()))


def _class_maps(levels: Sequence[Level], ref_lut: pd.DataFrame, pred_lut: pd.DataFrame,
                maps: Mapping[str, Path]) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """The class probability map of each level that has no map of its own, and the reference
    labels of the other structures of its class (left out of its scoring)."""
    key = _label_key(pred_lut, ref_lut)
    ref_classes: dict[str, list[tuple[str, int]]] = {}
    for level, (index, _) in _by_level(ref_lut, key).items():
        ref_classes.setdefault(probseg_class(level), []).append((level, index))
    probseg, others = {}, {}
    for lv in levels:
        cls = probseg_class(lv.level)
        if cls in maps:
            probseg[lv.level] = maps[cls]
            others[lv.level] = [i for level, i in ref_classes.get(cls, []) if level != lv.level]
    return probseg, others


def _check_dir(path: Path, role: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"the {role} dataset folder does not exist", path=path,
                         fix="give the root of a BIDS-Derivatives dataset (holding sub-*/)")
    return path


def _entity_columns(keys: Sequence[Key]) -> list[str]:
    present = {k for key in keys for k, _ in key} - {"sub", "ses"}
    order = [k for k in load_schema()["entity_order"] if k in present]
    return order + sorted(present - set(order))


def evaluate_datasets(pred_dir: str | Path, ref_dir: str | Path, *, suffix: str = "dseg",
                      labels: Sequence[str] | None = None, slice_axis: int | None = None,
                      out_tsv: str | Path | None = None) -> pd.DataFrame:
    """Evaluate every ``_<suffix>`` label image of ``pred_dir`` against its reference in
    ``ref_dir`` (same entities, else see :func:`_pair_files`): one row per image and level with
    ``participant_id``, ``session_id``, the other entities of the prediction (``acq``, ``desc``
    ...), the level columns of :func:`evaluate_labels`, ``resampled`` and both files (relative
    paths). Levels: :func:`match_levels` on the two images' tables (:func:`lut_path`). AUCs
    come from the prediction's probability maps with its entities: ``_label-<level>_probseg``
    (also without the image's ``desc``, as the pipeline writes the endplates') over the whole
    image, else the class map (``label-disc``, ``label-VB``, ``label-sacrum``) over
    :func:`class_score_region`. Written to ``out_tsv`` (``n/a`` for missing values) when given.

    ``UsageError`` for a missing folder, a non-label suffix or a requested level in no table,
    ``InputError`` when nothing pairs up, the label tables share no level or an image is not a
    label image; unpaired files are logged.
    """
    if suffix not in LABEL_SUFFIXES:
        raise UsageError(f"_{suffix} images are not label images", fix="compare segmentations: "
                         f"--suffix {' or '.join(LABEL_SUFFIXES)} (integer labels and dseg.tsv)")
    pred_dir, ref_dir = _check_dir(pred_dir, "predicted"), _check_dir(ref_dir, "reference")
    pred_tables, ref_tables = _Tables(pred_dir), _Tables(ref_dir)
    pred_files, ref_files = _files(pred_dir, suffix), _files(ref_dir, suffix)

    def tables(pred: Path, ref: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        return pred_tables.get(pred, ref, ref_dir), ref_tables.get(ref, pred, pred_dir)

    def shared(pred: Path, ref: Path) -> int:
        pred_lut, ref_lut = tables(pred, ref)
        key = _label_key(pred_lut, ref_lut)
        return len(_by_level(pred_lut, key).keys() & _by_level(ref_lut, key).keys())

    pairs = _pair_files(pred_files, ref_files, shared)
    if not pairs:
        example = next(iter(ref_files.values())).name if ref_files else f"sub-01_{suffix}.nii.gz"
        raise InputError(
            f"no _{suffix} image of the prediction has a reference with the same entities "
            f"({len(pred_files)} predicted, {len(ref_files)} reference files)", path=pred_dir,
            fix=f"name the predictions like the reference files, e.g. {example}")
    for what, files, used in (("reference", ref_files, set(pairs.values())),
                              ("predicted", pred_files, set(pairs))):
        unpaired = [p.name for k, p in files.items() if k not in used]
        if unpaired:
            LOG.warning("%d %s file(s) without a counterpart, not evaluated: %s", len(unpaired),
                        what, ", ".join(unpaired))
    probsegs = _probseg_index(pred_dir)
    columns = _entity_columns(list(pairs))
    tables_out, found = [], set()
    for key, ref_key in pairs.items():
        pred_lut, ref_lut = tables(pred_files[key], ref_files[ref_key])
        levels = match_levels(pred_lut, ref_lut, labels)
        found.update(lv.level for lv in levels)
        if not levels:  # none of the requested levels is in these tables
            continue
        own = {probseg_level(k): v for k, v in
               {**probsegs.get(_without(key, "desc"), {}), **probsegs.get(key, {})}.items()}
        probseg = {lv.level: own[lv.level] for lv in levels if lv.level in own}
        by_class, others = _class_maps([lv for lv in levels if lv.level not in probseg],
                                       ref_lut, pred_lut, probsegs.get(key, {}))
        table = evaluate_pair(pred_files[key], ref_files[ref_key], levels, slice_axis=slice_axis,
                              probseg={**probseg, **by_class}, class_maps=others,
                              keep_absent=labels is not None)
        entities = dict(key)
        ses = entities.get("ses")
        table.insert(0, "participant_id", f"sub-{entities['sub']}")
        table.insert(1, "session_id", f"ses-{ses}" if ses else None)
        for i, column in enumerate(columns, start=2):
            table.insert(i, column, entities.get(column))
        table["ref_file"] = ref_files[ref_key].relative_to(ref_dir).as_posix()
        table["pred_file"] = pred_files[key].relative_to(pred_dir).as_posix()
        tables_out.append(table)
    result = pd.concat(tables_out, ignore_index=True) if tables_out else None
    if labels is not None:
        known = set() if result is None else {
            *result["level"], *result["name"], *result["index"].dropna().astype(int).astype(str)}
        missing = [label for label in labels
                   if label not in known and canonical_level(label) not in known]
        if missing:
            raise UsageError(f"level {missing[0]!r} is in neither dataset's dseg.tsv",
                             fix=f"choose among: {' '.join(sorted(found)) or '(none)'}")
    if out_tsv is not None:
        write_table(result, out_tsv)
    return result


def summarise_levels(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD of every metric per level (and per ``acq``/``desc`` ... grid) across
    subjects and sessions: columns ``<metric>_mean``, ``<metric>_sd`` and ``n``."""
    skip = {"participant_id", "session_id"}
    first = list(table.columns).index("level")
    groups = [c for c in table.columns[:first] if c not in skip] + ["level"]
    grouped = table.groupby(groups, dropna=False, sort=False)
    stats = grouped[list(METRICS)].agg(["mean", "std"])
    stats.columns = [f"{m}_{'sd' if s == 'std' else s}" for m, s in stats.columns]
    stats.insert(0, "n", grouped.size())
    return stats.reset_index()


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as TSV (``n/a`` for missing values, parents created) atomically."""
    path = Path(path)
    if path.is_dir():
        raise UsageError("the output table is a folder", path=path,
                         fix="give a file name ending in .tsv")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(table.to_csv(sep="\t", index=False, na_rep="n/a",
                                          float_format="%.6g"), path)
