"""Users' label tables -> spineqprep's label numbering (pure pandas/numpy; no torch).

A segmentation given with ``-d`` (manual masks, another tool's output) may number its labels in
any way; its ``dseg.tsv`` names them. :func:`standardise` translates such an image once, where it
enters the workflow, to the numbering every later step assumes (SPINEPS/VerSe: L5 = 24, S1 = 26,
disc = vertebra above + 100; endplates = disc + 300 superior, + 400 inferior), so region
statistics, the L5 crop and the disc registration never read the user's table.

A label is recognised by its ``abbreviation`` when the table has one, else (or when the
abbreviation is not recognised) by its ``name``; case, spaces, ``-`` and ``_`` are ignored.
Accepted names (:func:`vocabulary`):

- vertebral bodies ``T1`` ... ``T12``, ``L1`` ... ``L5``, ``S1`` (also ``sacrum``), or
  ``vertebral body L5``;
- discs ``T12L1`` ... ``L4L5``, ``L5S1`` (also ``L4-L5``, ``intervertebral disc L4-L5``);
- vertebrae and discs of unknown level as spineqprep writes them (``V1``, ``D1`` ...);
- cartilage endplates ``L4L5sup``, ``L4L5inf``, ``L5S1sup``, ``L5S1inf`` (also
  ``L4L5_superior``, ``superior cartilage endplate of disc L4-L5``);
- ``background`` (index 0).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from spineqprep.errors import InputError
from spineqprep.segmentation.postprocess import (
    GENERIC_BODY,
    GENERIC_DISC,
    VERTEBRA_NAMES_UP,
    disc_label,
    disc_name,
    label_table,
    vertebra_label,
    vertebra_name,
)
from spineqprep.stats.summary import parse_name

#: ``_dseg`` labels of the cartilage endplates: the schema numbering (disc label + 300
#: superior, + 400 inferior cartilage endplate).
ENDPLATE_LABELS = {"L4L5_superior": 423, "L4L5_inferior": 523, "L5S1_superior": 424,
                   "L5S1_inferior": 524}
#: What a precomputed mask may hold: vertebral bodies, sacrum and discs, or endplates.
KINDS = {"spine": "a spine segmentation", "endplates": "an endplate segmentation"}
_GENERIC = re.compile(r"([vd])(\d{1,2})")
_TSV_ENTITY = re.compile(r"([a-zA-Z0-9]+)-([a-zA-Z0-9]+)")


def endplate_table() -> list[dict[str, Any]]:
    """``dseg.tsv`` rows of the endplate labels (index, name, abbreviation)."""
    return [{"index": index, "name": f"{c.split('_')[1]} cartilage endplate of disc "
             f"{c[:2]}-{c[2:4]}", "abbreviation": c.replace("_superior", "sup").replace(
                 "_inferior", "inf")} for c, index in ENDPLATE_LABELS.items()]


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


def _tsv_entities(name: str) -> dict[str, str] | None:
    """Entities of a ``[<entities>_]dseg.tsv`` file name, ``None`` for another file."""
    if name == "dseg.tsv":
        return {}
    *parts, last = name.split("_")
    matches = [_TSV_ENTITY.fullmatch(part) for part in parts]
    if last != "dseg.tsv" or not all(matches):
        return None
    return {m[1]: m[2] for m in matches}


def lut_path(image: Path, root: Path) -> Path | None:
    """The ``dseg.tsv`` that applies to ``image`` by BIDS inheritance: in the image's folder,
    then each parent up to ``root``, the first folder holding a ``[<entities>_]dseg.tsv`` whose
    entities all belong to the image; there, the one with most entities (the image's own
    ``<image stem>_dseg.tsv`` sidecar first). ``None`` when there is none."""
    entities = parse_name(image.name)[0].items()
    folder = image.parent
    while True:
        found = [(len(ents), tsv) for tsv in folder.glob("*dseg.tsv")
                 if (ents := _tsv_entities(tsv.name)) is not None and ents.items() <= entities]
        if found:
            return max(found)[1]
        if folder == root or root not in folder.parents:
            return None
        folder = folder.parent


def _normal(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


@cache
def vocabulary() -> dict[str, dict[str, Any]]:
    """Every accepted (normalised) name -> its standard ``dseg.tsv`` row."""
    levels = {}
    for k in range(len(VERTEBRA_NAMES_UP) + 1):  # S1 (k = 0), L5, L4 ... T1
        levels[vertebra_name(k)] = vertebra_label(k)
        if k >= 1:
            levels[disc_name(k)] = disc_label(k)
    rows = label_table(levels) + endplate_table()
    words: dict[str, dict[str, Any]] = {}
    for row in rows:
        for alias in (row["abbreviation"], row["name"]):
            words[_normal(alias)] = row
    words["sacrum"] = words["s1"]
    for cls, index in ENDPLATE_LABELS.items():
        row = next(r for r in rows if r["index"] == index)
        disc, side = cls.split("_")
        words[_normal(cls)] = row
        words[_normal(f"CEP{side[:3]}_{disc}")] = row  # the synthetic truth's desc-tissues
    return words


def standard_row(name: str) -> dict[str, Any] | None:
    """The standard ``dseg.tsv`` row (index, name, abbreviation) a label name stands for, or
    ``None`` when the name is not recognised. ``background`` has index 0."""
    key = _normal(name)
    if key == "background":
        return {"index": 0, "name": "background", "abbreviation": "BG"}
    generic = _GENERIC.fullmatch(key)
    if generic:
        base = GENERIC_BODY if generic.group(1) == "v" else GENERIC_DISC
        abbr = f"{generic.group(1).upper()}{int(generic.group(2))}"
        return label_table({abbr: base + int(generic.group(2))})[0]
    return vocabulary().get(key)


def _kind_of(index: int) -> str:
    return "endplates" if index in ENDPLATE_LABELS.values() else "spine"


def label_mapping(table: pd.DataFrame, present: Iterable[int], *, kind: str = "spine",
                  path: str | Path | None = None) -> dict[int, dict[str, Any]]:
    """User label -> standard row for every non-zero label ``present`` in the image.

    ``table`` is a ``dseg.tsv`` as read by :func:`read_lut`
    (``index``, ``name``, optional ``abbreviation``); rows of labels absent from the image are
    ignored (one table may serve several images). ``InputError`` (naming ``path``) lists every
    label that has no row, a name that is not recognised, the wrong ``kind`` of structure, or
    two labels with one name."""
    problems, mapping = [], {}
    abbreviations = table["abbreviation"] if "abbreviation" in table.columns else None
    for label in sorted(int(v) for v in present if int(v) != 0):
        rows = table.index[table["index"] == label]
        if len(rows) == 0:
            problems.append(f"label {label} is in the image but has no row")
            continue
        if len(rows) > 1:
            problems.append(f"label {label} has {len(rows)} rows")
            continue
        names = [table.at[rows[0], "name"]]
        if abbreviations is not None and str(abbreviations[rows[0]]).strip():
            names.insert(0, abbreviations[rows[0]])
        row = next(filter(None, map(standard_row, names)), None)
        if row is None:
            problems.append(f"label {label} ({' / '.join(map(str, names))}) is not a level "
                            "name spineqprep knows")
        elif row["index"] == 0 or _kind_of(row["index"]) != kind:
            problems.append(f"label {label} ({row['abbreviation']}) does not belong in "
                            f"{KINDS[kind]}")
        else:
            mapping[label] = row
    taken: dict[int, int] = {}
    for label, row in mapping.items():
        if row["index"] in taken:
            problems.append(f"labels {taken[row['index']]} and {label} are both "
                            f"{row['abbreviation']}")
        taken[row["index"]] = label
    if problems:
        examples = ("L4L5sup, L4L5inf, L5S1sup, L5S1inf" if kind == "endplates"
                    else "L1 ... L5, S1, L1L2 ... L4L5, L5S1")
        raise InputError(
            "the label table does not name the labels of its segmentation: "
            + "; ".join(problems), path=path,
            fix=f"give each label of the image one row (index, name) whose abbreviation or "
            f"name is a level, e.g. {examples} (case-insensitive; see docs/segmentation.md)")
    return mapping


def standardise(dseg: nib.Nifti1Image, mapping: Mapping[int, Mapping[str, Any]]
                ) -> tuple[nib.Nifti1Image, list[dict[str, Any]]]:
    """``dseg`` relabelled by ``mapping`` (:func:`label_mapping`) as uint16, with the rows of
    its standard ``dseg.tsv``; labels absent from ``mapping`` become background."""
    data = np.rint(np.asarray(dseg.dataobj)).astype(np.int64)
    out = np.zeros(data.shape, np.uint16)
    for label, row in mapping.items():
        out[data == label] = row["index"]
    header = dseg.header.copy()
    header.set_data_dtype(np.uint16)
    header.set_slope_inter(1, 0)
    img = nib.Nifti1Image(out, dseg.affine, header)
    return img, sorted((dict(r) for r in mapping.values()), key=lambda r: r["index"])


def check_segmentation(dseg_path: str | Path, lut_path: str | Path, kind: str = "spine"
                       ) -> dict[int, dict[str, Any]]:
    """Read a precomputed segmentation and its table; the label mapping, or ``InputError``
    naming the file and the fix (an unreadable image or table, labels without known names)."""

    try:
        present = np.unique(np.rint(np.asarray(nib.load(dseg_path).dataobj)).astype(np.int64))
    except Exception as err:  # nibabel raises many types for a broken file
        raise InputError(f"cannot read the segmentation: {err}", path=dseg_path,
                         fix="give a readable NIfTI label image") from err
    return label_mapping(read_lut(lut_path), present, kind=kind, path=lut_path)
