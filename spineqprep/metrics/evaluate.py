"""Per-level evaluation of label images and of whole derivatives datasets.

A predicted and a reference derivatives dataset are paired file by file through their BIDS
entities (``sub``, ``ses``, ``acq``, ``desc`` ...): ``sub-01_acq-mese_dseg.nii.gz`` in one is
compared with the same name in the other. Levels are matched through the ``dseg.tsv`` look-up
tables by abbreviation (by name when a table has no ``abbreviation`` column), so a manual
segmentation with its own numbering compares with spineqprep's. A prediction on another grid is
resampled (nearest neighbour) onto the reference grid, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
from spineqprep.stats.summary import parse_name

LOG = logging.getLogger("spineqprep")

#: Metric columns of a per-level table, in order.
METRICS: tuple[str, ...] = (
    "dice", "dice_2d", "dice_central50", "msd_mm", "hd95_mm", "volume_diff_pct",
    "sensitivity", "specificity", "precision", "roc_auc", "pr_auc",
)
#: Affine entries closer than this (mm) are the same grid.
GRID_TOLERANCE = 1e-3


class Level(NamedTuple):
    """One structure to evaluate: its abbreviation and name, and its label in each image."""

    level: str
    name: str
    ref_index: int
    pred_index: int


def sagittal_axis(affine: np.ndarray) -> int:
    """The array axis closest to the scanner's left-right (x) axis: slices along it are
    sagittal."""
    columns = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(columns[0]) / np.linalg.norm(columns, axis=0)))


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *,
                   slice_axis: int = 0, scores: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one binary prediction against its reference, plus
    the voxel counts (``pred_voxels``, ``ref_voxels``). ``spacing`` is the voxel size in mm per
    axis, ``slice_axis`` the axis of the 2D slices; ``scores`` (a probability map of the
    prediction, same shape) gives ROC-AUC and PR-AUC, NaN without it. Empty-mask conventions are
    those of :mod:`overlap` and :mod:`surface`."""
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


def evaluate_labels(pred: np.ndarray, ref: np.ndarray, levels: Sequence[Level],
                    spacing: Sequence[float], *, slice_axis: int = 0,
                    probabilities: Mapping[str, np.ndarray] | None = None,
                    keep_absent: bool = False) -> pd.DataFrame:
    """One row per level of two label images on the same grid: ``level``, ``name``, ``index``
    (reference label), voxel counts, volumes (mm^3) and :data:`METRICS`. Levels absent from
    both images are left out unless ``keep_absent``. ``probabilities`` maps a level to its
    probability map (for the AUCs)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    voxel_mm3 = float(np.prod(spacing))
    probabilities = probabilities or {}
    rows = []
    for lv in levels:
        p, r = pred == lv.pred_index, ref == lv.ref_index
        if not keep_absent and not (p.any() or r.any()):
            continue
        values = binary_metrics(p, r, spacing, slice_axis=slice_axis,
                                scores=probabilities.get(lv.level))
        rows.append({"level": lv.level, "name": lv.name, "index": lv.ref_index, **values,
                     "ref_volume_mm3": values["ref_voxels"] * voxel_mm3,
                     "pred_volume_mm3": values["pred_voxels"] * voxel_mm3})
    columns = ["level", "name", "index", "ref_voxels", "pred_voxels", "ref_volume_mm3",
               "pred_volume_mm3", *METRICS]
    return pd.DataFrame(rows, columns=columns)


# -- look-up tables --------------------------------------------------------------------------

def read_lut(path: str | Path) -> pd.DataFrame:
    """A ``dseg.tsv`` look-up table (``index``, ``name``, optional ``abbreviation`` and
    ``image``); ``InputError`` when it cannot be read or lacks a required column."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"cannot read the label table: {err}", path=path) from err
    missing = {"index", "name"} - set(table.columns)
    if missing:
        raise InputError(f"the label table has no column {sorted(missing)}", path=path,
                         fix="a dseg.tsv needs the columns index, name (and abbreviation)")
    if not table["index"].str.fullmatch(r"\d+").all():
        raise InputError("the index column must hold non-negative integers", path=path)
    table["index"] = table["index"].astype(int)
    return table


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


def match_levels(pred_lut: pd.DataFrame, ref_lut: pd.DataFrame,
                 labels: Sequence[str] | None = None) -> list[Level]:
    """The levels to evaluate, in reference-table order: those named in ``labels``
    (abbreviation, name or reference index), else every level of the reference table that the
    prediction's table also has. ``UsageError`` names a requested level missing from a table;
    ``InputError`` when the tables share no level."""
    key = _label_key(pred_lut, ref_lut)
    pred_index = dict(zip(pred_lut[key], pred_lut["index"], strict=True))
    if labels is None:
        chosen = ref_lut[ref_lut[key].isin(pred_index) & (ref_lut["index"] > 0)]
        if chosen.empty:
            raise InputError(
                f"the predicted and reference label tables share no {key}",
                fix=f"label both datasets' dseg.tsv with the same {key}s "
                f"(reference: {', '.join(ref_lut[key].head(8))} ...)")
    else:
        picked = []
        for label in labels:
            hit = ref_lut[(ref_lut[key] == label) | (ref_lut["name"] == label)
                          | (ref_lut["index"].astype(str) == label)]
            if hit.empty or hit.iloc[0][key] not in pred_index:
                where = "reference" if hit.empty else "predicted"
                raise UsageError(
                    f"level {label!r} is not in the {where} dataset's dseg.tsv",
                    fix=f"choose among: {' '.join(ref_lut[ref_lut[key].isin(pred_index)][key])}")
            picked.append(hit.iloc[0])
        chosen = pd.DataFrame(picked)
    return [Level(str(row[key]), str(row["name"]), int(row["index"]), int(pred_index[row[key]]))
            for _, row in chosen.iterrows()]


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


def _labels_of(data: np.ndarray) -> np.ndarray:
    return np.rint(data).astype(np.int64) if data.dtype.kind == "f" else data.astype(np.int64)


def evaluate_pair(pred_path: str | Path, ref_path: str | Path, levels: Sequence[Level], *,
                  slice_axis: int | None = None, probseg: Mapping[str, Path] | None = None,
                  keep_absent: bool = False) -> pd.DataFrame:
    """Per-level table of one predicted label image against its reference (files). The
    prediction (and the ``probseg`` maps, per level) is resampled onto the reference grid when
    needed (column ``resampled``). ``slice_axis`` defaults to the sagittal axis."""
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    ref_img, pred_img = _load(ref_path), _load(pred_path)
    pred, resampled = _on_ref_grid(pred_img, ref_img, 0, pred_path, ref_path)
    probabilities = {}
    for level, path in (probseg or {}).items():
        probabilities[level], _ = _on_ref_grid(_load(path), ref_img, 1, path, ref_path)
        probabilities[level] = np.nan_to_num(probabilities[level].astype(np.float64))
    axis = sagittal_axis(ref_img.affine) if slice_axis is None else slice_axis
    table = evaluate_labels(_labels_of(pred), _labels_of(np.asarray(ref_img.dataobj)), levels,
                            surface.voxel_spacing(ref_img.affine), slice_axis=axis,
                            probabilities=probabilities, keep_absent=keep_absent)
    table["resampled"] = resampled
    return table


# -- datasets --------------------------------------------------------------------------------

def _files(root: Path, suffix: str) -> dict[tuple[tuple[str, str], ...], Path]:
    """BIDS files ``sub-*/.../*_<suffix>.nii[.gz]`` under ``root``, keyed by their entities."""
    found = {}
    for path in sorted(root.glob(f"sub-*/**/*_{suffix}.nii*")):
        parsed = parse_name(path.name)
        if parsed is not None and parsed[1] == suffix:
            found[tuple(sorted(parsed[0].items()))] = path
    return found


def _probseg_index(root: Path) -> dict[tuple[tuple[str, str], ...], dict[str, Path]]:
    """``_label-<level>_probseg`` maps under ``root``: entities without ``label`` -> level ->
    file."""
    index: dict[tuple[tuple[str, str], ...], dict[str, Path]] = {}
    for key, path in _files(root, "probseg").items():
        entities = dict(key)
        level = entities.pop("label", None)
        if level is not None:
            index.setdefault(tuple(sorted(entities.items())), {})[level] = path
    return index


def _dataset_lut(root: Path, other: Path) -> pd.DataFrame:
    """The root ``dseg.tsv`` of ``root``, or the other dataset's (same numbering assumed, with
    a warning) when it has none."""
    if (root / "dseg.tsv").is_file():
        return read_lut(root / "dseg.tsv")
    if (other / "dseg.tsv").is_file():
        LOG.warning("%s has no dseg.tsv: using the labels of %s", root, other / "dseg.tsv")
        return read_lut(other / "dseg.tsv")
    raise InputError("neither dataset has a dseg.tsv look-up table at its root", path=root,
                     fix="write the label table (index, name, abbreviation) as dseg.tsv")


def _check_dir(path: Path, role: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"the {role} dataset folder does not exist", path=path,
                         fix="give the root of a BIDS-Derivatives dataset (holding sub-*/)")
    return path


def _entity_columns(keys: Sequence[tuple[tuple[str, str], ...]]) -> list[str]:
    present = {k for key in keys for k, _ in key} - {"sub", "ses"}
    order = [k for k in load_schema()["entity_order"] if k in present]
    return order + sorted(present - set(order))


def evaluate_datasets(pred_dir: str | Path, ref_dir: str | Path, *, suffix: str = "dseg",
                      labels: Sequence[str] | None = None, slice_axis: int | None = None,
                      out_tsv: str | Path | None = None) -> pd.DataFrame:
    """Evaluate every ``_<suffix>`` image of ``pred_dir`` against the file with the same
    entities in ``ref_dir``: one row per image and level with ``participant_id``,
    ``session_id``, the other entities (``acq``, ``desc`` ...), the level columns of
    :func:`evaluate_labels`, ``resampled`` and both files (relative paths). AUCs come from
    ``_label-<level>_probseg`` maps of the prediction with the same entities, when present.
    Written to ``out_tsv`` (``n/a`` for missing values) when given.

    ``UsageError`` for a missing folder or an unknown requested level, ``InputError`` when
    nothing pairs up or the label tables share no level; unpaired files are logged.
    """
    pred_dir, ref_dir = _check_dir(pred_dir, "predicted"), _check_dir(ref_dir, "reference")
    pred_lut, ref_lut = _dataset_lut(pred_dir, ref_dir), _dataset_lut(ref_dir, pred_dir)
    pred_files, ref_files = _files(pred_dir, suffix), _files(ref_dir, suffix)
    pairs = [key for key in ref_files if key in pred_files]
    if not pairs:
        example = next(iter(ref_files.values())).name if ref_files else f"sub-01_{suffix}.nii.gz"
        raise InputError(
            f"no _{suffix} image of the prediction has a reference with the same entities "
            f"({len(pred_files)} predicted, {len(ref_files)} reference files)", path=pred_dir,
            fix=f"name the predictions like the reference files, e.g. {example}")
    for what, files in (("reference", ref_files), ("predicted", pred_files)):
        unpaired = [p.name for k, p in files.items() if k not in pairs]
        if unpaired:
            LOG.warning("%d %s file(s) without a counterpart, not evaluated: %s", len(unpaired),
                        what, ", ".join(unpaired))
    probsegs = _probseg_index(pred_dir)
    columns = _entity_columns(pairs)
    tables = []
    for key in pairs:
        entities = dict(key)
        kind = f"desc-{entities['desc']}" if "desc" in entities else suffix
        levels = match_levels(_lut_for(pred_lut, kind), _lut_for(ref_lut, kind), labels)
        maps = probsegs.get(key, {})
        probseg = {lv.level: maps[lv.level] for lv in levels if lv.level in maps}
        table = evaluate_pair(pred_files[key], ref_files[key], levels, slice_axis=slice_axis,
                              probseg=probseg, keep_absent=labels is not None)
        ses = entities.get("ses")
        ids = {"participant_id": f"sub-{entities['sub']}",
               "session_id": f"ses-{ses}" if ses else None,
               **{c: entities.get(c) for c in columns}}
        table.insert(0, "participant_id", ids["participant_id"])
        for i, column in enumerate(["session_id", *columns], start=1):
            table.insert(i, column, ids[column])
        table["ref_file"] = ref_files[key].relative_to(ref_dir).as_posix()
        table["pred_file"] = pred_files[key].relative_to(pred_dir).as_posix()
        tables.append(table)
    result = pd.concat(tables, ignore_index=True)
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
