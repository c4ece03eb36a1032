"""The checks of the spine extension that the official BIDS validator cannot make.

The official validator (``spineqprep.bids.validator``) checks the plain-BIDS part; this module
checks what the extension adds and what a fit needs: the required sidecar fields of each series
and their units, at least two distinct times, one voxel grid per series, readable 3-D images,
and the tabular files of the schema. Every :class:`Problem` names the file and the fix.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from spineqprep.bids.layout import Series, collect_series, collect_structurals, get_layout
from spineqprep.bids.schema import load_schema, series_suffixes
from spineqprep.errors import InputError, SpineqprepError

LOG = logging.getLogger("spineqprep")
_SUB = re.compile(r"^sub-([A-Za-z0-9]+)$")
_SES = re.compile(r"^ses-([A-Za-z0-9]+)$")
_AFFINE_TOL = 1e-3


@dataclass(frozen=True)
class Problem:
    """One finding: ``severity`` is ``"error"`` (the run cannot use the data) or ``"warning"``."""

    path: str | None
    message: str
    fix: str | None = None
    severity: str = "error"

    def __str__(self) -> str:
        text = self.message if self.path is None else f"{self.path}: {self.message}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text


def raise_for_problems(problems: Iterable[Problem]) -> None:
    """Log the warnings; raise one ``InputError`` listing every error, if there are any."""
    problems = list(problems)
    for p in problems:
        if p.severity != "error":
            LOG.warning("%s", p)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        listing = "\n".join(f"- {p}" for p in errors)
        raise InputError(f"{len(errors)} problem(s) in the input dataset:\n{listing}")


# --- images -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _image_info(path: str, size: int, mtime_ns: int) -> tuple[tuple[int, ...], np.ndarray, str]:
    """Shape, affine and an error text ('' when fine) of an image, reading all of its data.

    ``size``/``mtime_ns`` are part of the cache key so that a changed file is read again.
    """
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for a damaged file; all mean "unusable"
        return (), np.eye(4), f"{type(err).__name__}: {err}"
    if data.size and not np.isfinite(data).all():
        return data.shape, img.affine, "nonfinite"
    return data.shape, img.affine, ""


def check_image(path: str | Path) -> tuple[list[Problem], tuple[int, ...], np.ndarray | None]:
    """Read a NIfTI image completely; problems, its 3-D shape and affine (``None`` if unusable)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        return [Problem(str(path), f"cannot access the image ({err})",
                        "restore the file or remove it and its sidecar")], (), None
    shape, affine, error = _image_info(str(path), stat.st_size, stat.st_mtime_ns)
    if error and error != "nonfinite":
        return [Problem(str(path), f"unreadable, truncated or corrupt NIfTI ({error})",
                        "convert the series from DICOM again (e.g. dcm2niix) and replace the "
                        "file")], (), None
    problems = []
    if error == "nonfinite":
        problems.append(Problem(str(path), "the image contains NaN or infinite voxels",
                                "check the conversion; those voxels are excluded from the fit",
                                "warning"))
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        problems.append(Problem(
            str(path), f"expected a 3-D image, found shape {shape}",
            "store one 3-D volume per echo / spin-lock time (split a 4-D file with "
            "fslsplit or nibabel and name the volumes echo-1, echo-2 ... or tsl-1, tsl-2 ...)"))
        return problems, (), None
    return problems, tuple(shape), affine


# --- series ------------------------------------------------------------------------------------


def check_series(series: Series) -> list[Problem]:
    """Problems of one relaxometry series (sidecar fields, times, images and their grids)."""
    spec = series_suffixes()[series.suffix]
    problems: list[Problem] = []
    where = str(series.files[0].parent) if series.files else series.name
    metas = series.file_metadata or tuple({} for _ in series.files)
    for path, meta in zip(series.files, metas, strict=True):
        sidecar = _sidecar_of(path)
        for fieldname, rng in spec["required_metadata"].items():
            problems += _check_field(sidecar, series, meta, fieldname, rng)
    for fieldname in spec.get("constant_metadata", []):
        values = {json.dumps(m.get(fieldname)) for m in metas if m.get(fieldname) is not None}
        if len(values) > 1:
            problems.append(Problem(
                where, f"{fieldname} differs between the images of {series.name} "
                f"({', '.join(sorted(values))})",
                f"one series has one {fieldname}; split it into two acq- labels"))
    n = len(series.files)
    if n < spec["min_points"]:
        what = "spin-lock time" if spec["index_entity"] == "tsl" else "echo"
        problems.append(Problem(
            where, f"{series.name} has {n} {what}(s); a relaxation fit needs at least "
            f"{spec['min_points']}",
            f"add the other {what}s of the series ({spec['index_entity']}-1, "
            f"{spec['index_entity']}-2 ...) or remove it with --bids-filter-file"))
    finite = [t for t in series.times if math.isfinite(t)]
    dupes = sorted({t for t in finite if finite.count(t) > 1})
    if dupes:
        problems.append(Problem(
            where, f"{series.name}: {series.time_field} {', '.join(f'{t:g}' for t in dupes)} s "
            "appears more than once",
            f"each {spec['index_entity']}- file needs its own {series.time_field}; check the "
            "sidecars (a repeated acquisition belongs in its own acq- or run-)"))
    problems += _check_grids(series)
    recommended = [f for f in spec.get("recommended_metadata", []) if f not in series.metadata]
    if recommended:
        problems.append(Problem(
            str(_sidecar_of(series.files[0])) if series.files else where,
            f"recommended sidecar field(s) missing: {', '.join(recommended)}",
            "add them from the DICOM header (dcm2niix writes most of them)", "warning"))
    return problems


def _sidecar_of(path: Path) -> Path:
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    return path.with_name(name + ".json")


def _check_field(sidecar: Path, series: Series, meta: dict[str, Any], fieldname: str,
                 rng: dict[str, Any]) -> list[Problem]:
    units = rng.get("units", "")
    if fieldname not in meta:
        return [Problem(str(sidecar), f"required field {fieldname} ({units}) is missing",
                        f'add "{fieldname}": <value in {units}> to {sidecar.name} (or to a '
                        f"top-level acq-{series.acq}_{series.suffix}.json when it is the same "
                        "for every image)")]
    value = meta[fieldname]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [Problem(str(sidecar), f"{fieldname} must be a number in {units}, found "
                        f"{value!r}", f'write "{fieldname}": <number> in {units}')]
    lo, hi = rng.get("min", -math.inf), rng.get("max", math.inf)
    if lo <= value <= hi:
        return []
    fix = f"give {fieldname} in {units}, between {lo:g} and {hi:g}"
    if units == "s" and value > hi and lo <= value / 1000 <= hi:
        fix = (f"{value:g} looks like milliseconds: BIDS times are in seconds, write "
               f"{value / 1000:g}")
    return [Problem(str(sidecar), f"{fieldname} = {value:g} is outside {lo:g}-{hi:g} {units}",
                    fix)]


def _check_grids(series: Series) -> list[Problem]:
    problems: list[Problem] = []
    grids: list[tuple[Path, tuple[int, ...], np.ndarray]] = []
    for path in series.files:
        found, shape, affine = check_image(path)
        problems += found
        if affine is not None:
            grids.append((path, shape, affine))
    if not grids:
        return problems
    ref_path, ref_shape, ref_affine = grids[0]
    for path, shape, affine in grids[1:]:
        if shape != ref_shape:
            problems.append(Problem(
                str(path), f"image shape {shape} differs from {ref_shape} of {ref_path.name}",
                "all images of a series must share one voxel grid: re-export them from the same "
                "acquisition, or resample them to the first image"))
        elif not np.allclose(affine, ref_affine, atol=_AFFINE_TOL):
            problems.append(Problem(
                str(path), f"the affine (voxel-to-world) differs from that of {ref_path.name}",
                "all images of a series must share one voxel grid: check the conversion or "
                "resample them to the first image"))
    return problems


# --- dataset -----------------------------------------------------------------------------------


def check_dataset(
    bids_dir: str | Path,
    participants: Sequence[str] | None = None,
    bids_filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Problem]:
    """All extension problems of a dataset: description, tables, names, every series.

    ``participants`` (labels, with or without ``sub-``) limits the per-subject checks;
    ``bids_filters`` (the ``--bids-filter-file`` object) selects the series that are checked.
    """
    root = Path(bids_dir)
    problems = _check_description(root)
    if any(p.severity == "error" for p in problems):
        return problems
    subjects = _subject_sessions(root)
    problems += _check_participants_tsv(root, subjects)
    wanted = ({s.removeprefix("sub-") for s in participants} if participants
              else set(subjects))
    for sub in sorted(wanted & set(subjects)):
        problems += _check_sessions_tsv(root, sub, subjects[sub])
        problems += _check_names(root, sub)
    problems += _check_disc_grades(root, subjects)
    try:
        layout = get_layout(root)
    except SpineqprepError as err:
        return [*problems, Problem(str(root), str(err))]
    for sub in sorted(wanted & set(subjects)):
        try:
            for series in collect_series(layout, sub, bids_filters=bids_filters):
                problems += check_series(series)
            for structural in collect_structurals(layout, sub, bids_filters=bids_filters):
                problems += check_image(structural.path)[0]
        except SpineqprepError as err:
            problems.append(_as_problem(err))
    return problems


def _as_problem(err: SpineqprepError) -> Problem:
    """A raised error as a problem (its message without the path and fix it already carries)."""
    text = str(err).removesuffix(f"\n  fix: {err.fix}" if err.fix else "")
    return Problem(err.path, text.removeprefix(f"{err.path}: "), err.fix)


def _check_description(root: Path) -> list[Problem]:
    path = root / "dataset_description.json"
    if not path.is_file():
        return [Problem(str(path), "dataset_description.json is missing: not a BIDS dataset",
                        'create it with at least {"Name": "...", "BIDSVersion": "1.10.1"}')]
    try:
        desc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [Problem(str(path), f"not valid JSON ({err})", "fix the JSON syntax")]
    if not isinstance(desc, dict):
        return [Problem(str(path), "must hold a JSON object", 'write {"Name": ..., ...}')]
    missing = [k for k in ("Name", "BIDSVersion") if k not in desc]
    if missing:
        return [Problem(str(path), f"required field(s) missing: {', '.join(missing)}",
                        'add e.g. "Name": "my study", "BIDSVersion": "1.10.1"')]
    return []


def _subject_sessions(root: Path) -> dict[str, list[str]]:
    """Subject label -> its session labels, from the folder names."""
    out = {}
    for sub_dir in sorted(root.glob("sub-*")):
        match = _SUB.match(sub_dir.name)
        if sub_dir.is_dir() and match:
            out[match.group(1)] = sorted(
                m.group(1) for d in sub_dir.iterdir() if d.is_dir() and (m := _SES.match(d.name)))
    return out


def _read_tsv(path: Path) -> tuple[pd.DataFrame | None, list[Problem]]:
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        return None, [Problem(str(path), f"not a readable tab-separated table ({err})",
                              "save it as UTF-8 text with tab separators and one header row")]
    return table, []


def _check_columns(path: Path, table: pd.DataFrame, spec: dict[str, Any]) -> list[Problem]:
    """Required columns present; typed optional columns within the schema's ranges/levels."""
    na = load_schema()["tabular"]["na_value"]
    problems = []
    missing = [c for c in spec.get("required", []) if c not in table.columns]
    if missing:
        problems.append(Problem(str(path), f"required column(s) missing: {', '.join(missing)}",
                                f"add the column(s); header found: {', '.join(table.columns)}"))
    for column, rules in spec.get("optional", {}).items():
        if column not in table.columns:
            continue
        for row, raw in enumerate(table[column], start=2):
            value = raw.strip()
            if value in ("", na):
                continue
            bad = _bad_value(value, rules)
            if bad:
                problems.append(Problem(str(path), f"line {row}, column {column}: {bad}",
                                        f"write a valid value or {na}"))
    return problems


def _bad_value(value: str, rules: dict[str, Any]) -> str:
    kind = rules.get("type", "string")
    if "levels" in rules and value not in rules["levels"]:
        return f"{value!r} is not one of {', '.join(rules['levels'])}"
    if kind not in ("number", "integer"):
        return ""
    try:
        number = float(value)
    except ValueError:
        return f"{value!r} is not a number"
    if kind == "integer" and not number.is_integer():
        return f"{value!r} is not an integer"
    lo, hi = rules.get("min", -math.inf), rules.get("max", math.inf)
    if not lo <= number <= hi:
        return f"{value} is outside {lo:g}-{hi:g}" + (f" {rules['units']}" if "units" in rules
                                                       else "")
    return ""


def _check_participants_tsv(root: Path, subjects: dict[str, list[str]]) -> list[Problem]:
    path = root / "participants.tsv"
    if not path.is_file():
        return [Problem(str(path), "participants.tsv is missing",
                        "add it (participant_id, age, sex, ... ; n/a for unknown values)",
                        "warning")]
    table, problems = _read_tsv(path)
    if table is None:
        return problems
    problems += _check_columns(path, table, load_schema()["tabular"]["participants.tsv"])
    if "participant_id" not in table.columns:
        return problems
    ids = [v.strip() for v in table["participant_id"]]
    bad = [v for v in ids if not _SUB.match(v)]
    if bad:
        problems.append(Problem(str(path), f"participant_id values not of the form sub-<label>: "
                                f"{', '.join(bad[:5])}", "write e.g. sub-01"))
    dupes = sorted({v for v in ids if ids.count(v) > 1})
    if dupes:
        problems.append(Problem(str(path), f"participant_id repeated: {', '.join(dupes)}",
                                "keep one row per participant"))
    listed = {v.removeprefix("sub-") for v in ids}
    unlisted = sorted(set(subjects) - listed)
    if unlisted:
        problems.append(Problem(str(path), f"subject folder(s) not listed: "
                                f"{', '.join('sub-' + s for s in unlisted)}",
                                "add a row for each subject", "warning"))
    return problems


def _check_sessions_tsv(root: Path, sub: str, sessions: list[str]) -> list[Problem]:
    path = root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv"
    if not path.is_file():
        return []
    table, problems = _read_tsv(path)
    if table is None:
        return problems
    problems += _check_columns(path, table, load_schema()["tabular"]["sessions.tsv"])
    if "session_id" not in table.columns:
        return problems
    listed = {v.strip().removeprefix("ses-") for v in table["session_id"]}
    extra = sorted(listed - set(sessions))
    if extra:
        problems.append(Problem(str(path), f"session(s) {', '.join('ses-' + s for s in extra)} "
                                f"have no folder in sub-{sub}/",
                                "fix the session_id values or add the session folders"))
    unlisted = sorted(set(sessions) - listed)
    if unlisted:
        problems.append(Problem(str(path), f"session folder(s) not listed: "
                                f"{', '.join('ses-' + s for s in unlisted)}",
                                "add a row per session", "warning"))
    return problems


def _check_names(root: Path, sub: str) -> list[Problem]:
    """File names agree with their folders; series files carry their index entity."""
    problems = []
    index_of = {s: spec["index_entity"] for s, spec in series_suffixes().items()}
    for path in sorted((root / f"sub-{sub}").rglob("sub-*")):
        if path.is_dir():
            continue
        rel = path.relative_to(root)
        name = path.name
        name_sub = re.match(r"^sub-([A-Za-z0-9]+)", name)
        if name_sub and name_sub.group(1) != sub:
            problems.append(Problem(str(path), f"file of sub-{name_sub.group(1)} in the folder "
                                    f"of sub-{sub}", "move or rename it"))
        folder_ses = next((m.group(1) for part in rel.parts[1:-1] if (m := _SES.match(part))),
                          None)
        name_ses = re.search(r"_ses-([A-Za-z0-9]+)", name)
        if (name_ses.group(1) if name_ses else None) != folder_ses and not name.endswith(
                "_sessions.tsv"):
            problems.append(Problem(
                str(path), f"session mismatch: the name says "
                f"{'ses-' + name_ses.group(1) if name_ses else 'no session'}, the folder "
                f"{'ses-' + folder_ses if folder_ses else 'no session'}",
                "name the file with the session of its folder (sub-<l>_ses-<l>_...)"))
        stem = name.removesuffix(".gz").removesuffix(".nii").removesuffix(".json")
        suffix = stem.rsplit("_", 1)[-1]
        if suffix in index_of and f"_{index_of[suffix]}-" not in stem:
            problems.append(Problem(
                str(path), f"a {suffix} file without the {index_of[suffix]}- entity",
                f"number the images of the series: ..._{index_of[suffix]}-1_{suffix}.nii.gz, "
                f"..._{index_of[suffix]}-2_{suffix}.nii.gz"))
        if name.endswith(".json"):
            try:
                json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append(Problem(str(path), f"sidecar is not valid JSON ({err})",
                                        "fix the JSON syntax"))
    return problems


def _check_disc_grades(root: Path, subjects: dict[str, list[str]]) -> list[Problem]:
    rel = "phenotype/disc_grades.tsv"
    path = root / rel
    if not path.is_file():
        return []
    table, problems = _read_tsv(path)
    if table is None:
        return problems
    schema = load_schema()
    problems += _check_columns(path, table, schema["tabular"][rel])
    discs = schema["anatomy"]["discs"]
    if "level" in table.columns:
        for row, level in enumerate(table["level"], start=2):
            if level.strip() not in discs:
                problems.append(Problem(str(path), f"line {row}: level {level!r} is not a "
                                        f"lumbar disc level", f"use one of {', '.join(discs)}"))
    if "participant_id" not in table.columns:
        return problems
    has_ses = "session_id" in table.columns
    for row, rec in enumerate(table.to_dict("records"), start=2):
        sub = rec["participant_id"].strip().removeprefix("sub-")
        if sub not in subjects:
            problems.append(Problem(str(path), f"line {row}: {rec['participant_id']} has no "
                                    "subject folder", "fix the participant_id", "warning"))
            continue
        ses = rec["session_id"].strip().removeprefix("ses-") if has_ses else ""
        if ses and ses != schema["tabular"]["na_value"] and ses not in subjects[sub]:
            problems.append(Problem(
                str(path), f"line {row}: session mismatch, sub-{sub} has no ses-{ses}",
                f"use one of: {', '.join('ses-' + s for s in subjects[sub]) or 'n/a'}"))
    return problems
