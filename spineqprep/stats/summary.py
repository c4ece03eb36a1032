"""Region-free summaries of the relaxation maps on disk: one row per subject/session/map/acq.

Everything here reads the derivatives folder (never the workflow's memory) so that the
reports and the group table can be rebuilt from the outputs alone (``--reports-only``).
Values are read in seconds (as written) and summarised in milliseconds (as reported).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from spineqprep.errors import InputError

#: map suffix -> quantity; the fit by-products are named ``desc-<quantity>fit``.
MAP_QUANTITIES: dict[str, str] = {"T2map": "T2", "T1rho": "T1rho", "T2starmap": "T2star"}
#: raw series suffix -> the map fitted from it (to list maps that should exist but do not).
SOURCE_MAPS: dict[str, str] = {"MESE": "T2map", "MESL": "T1rho", "MEGRE": "T2starmap"}
#: sidecar field holding the times of each map's source series.
TIME_FIELDS: tuple[str, ...] = ("EchoTime", "SpinLockTime")

SUMMARY_COLUMNS: list[str] = [
    "participant_id", "session_id", "site", "map", "acq", "n_voxels", "n_voxels_valid",
    "fraction_valid", "median_ms", "iqr_ms", "p5_ms", "p95_ms", "time_field", "times_ms",
    "fit_model", "path",
]

TEXT_COLUMNS: list[str] = [
    "participant_id", "session_id", "site", "map", "acq", "time_field", "times_ms", "fit_model",
    "path",
]

_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")
_NIFTI = re.compile(r"\.nii(\.gz)?$")


def parse_name(name: str) -> tuple[dict[str, str], str] | None:
    """Split a BIDS NIfTI file name into (entities, suffix); ``None`` if it is not one."""
    if not _NIFTI.search(name):
        return None
    *parts, suffix = _NIFTI.sub("", name).split("_")
    entities: dict[str, str] = {}
    for part in parts:
        match = _ENTITY.match(part)
        if match is None:
            return None
        entities[match.group(1)] = match.group(2)
    if "sub" not in entities or not suffix.isalnum():
        return None
    return entities, suffix


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar beside a NIfTI file."""
    return path.with_name(_NIFTI.sub("", path.name) + ".json")


@dataclass(frozen=True)
class MapFiles:
    """One native-space relaxation map and its fit by-products (``None`` when absent)."""

    subject: str
    session: str | None
    acq: str | None
    suffix: str
    map_path: Path
    mask_path: Path | None
    s0_path: Path | None
    rsquared_path: Path | None

    @property
    def quantity(self) -> str:
        """T2, T1rho or T2star."""
        return MAP_QUANTITIES[self.suffix]

    @property
    def stem(self) -> str:
        """``sub-X[_ses-Y][_acq-Z]_desc-<quantity>fit_<suffix>``: names the map's figures."""
        parts = [f"sub-{self.subject}"]
        parts += [f"ses-{self.session}"] if self.session else []
        parts += [f"acq-{self.acq}"] if self.acq else []
        return "_".join([*parts, f"desc-{self.quantity}fit", self.suffix])

    def metadata(self) -> dict[str, Any]:
        """The map's JSON sidecar ({} when there is none)."""
        return read_json(sidecar_path(self.map_path))


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON sidecar; a missing file is {} and a broken one an :class:`InputError`."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the JSON sidecar ({err})", path=path,
                         fix="repair or delete it and rerun spineqprep for this subject") from err
    return data if isinstance(data, dict) else {}


def load_image(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI image with its data, turning unreadable files into an :class:`InputError`."""
    try:
        img = nib.load(path)
        img.get_fdata(dtype=np.float32)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error)
        raise InputError(f"cannot read the NIfTI image ({err})", path=path,
                         fix="delete the file and rerun spineqprep for this subject") from err
    return img


def _anat_dirs(output_dir: Path, subject: str | None) -> list[Path]:
    sub = f"sub-{subject}" if subject else "sub-*"
    dirs = list(output_dir.glob(f"{sub}/anat")) + list(output_dir.glob(f"{sub}/ses-*/anat"))
    return sorted(d for d in dirs if d.is_dir())


def find_maps(output_dir: Path, subject: str | None = None,
              sessions: list[str] | None = None) -> list[MapFiles]:
    """All native-space maps under ``output_dir`` (optionally one subject / some sessions).

    Maps with a ``space-`` entity (atlas space, a later stage) are not native and are skipped.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputError("the derivatives folder does not exist", path=output_dir,
                         fix="give the output folder of a spineqprep run")
    wanted = None if sessions is None else {s.removeprefix("ses-") for s in sessions}
    found: list[MapFiles] = []
    for anat in _anat_dirs(output_dir, subject):
        index: dict[tuple[tuple[tuple[str, str], ...], str], Path] = {}
        for path in anat.iterdir():
            parsed = parse_name(path.name)
            if parsed is not None:
                index[(tuple(sorted(parsed[0].items())), parsed[1])] = path
        for (key, suffix), path in sorted(index.items(), key=lambda item: str(item[1])):
            entities = dict(key)
            if suffix not in MAP_QUANTITIES or "desc" in entities or "space" in entities:
                continue
            if wanted is not None and entities.get("ses") not in wanted:
                continue
            fit_key = tuple(sorted({**entities, "desc": f"{MAP_QUANTITIES[suffix]}fit"}.items()))
            found.append(MapFiles(
                subject=entities["sub"], session=entities.get("ses"), acq=entities.get("acq"),
                suffix=suffix, map_path=path, mask_path=index.get((fit_key, "mask")),
                s0_path=index.get((fit_key, "S0map")),
                rsquared_path=index.get((fit_key, "Rsquared")),
            ))
    return found


def valid_voxels(files: MapFiles) -> tuple[np.ndarray, np.ndarray]:
    """(map in seconds, boolean validity) on the map's grid.

    Valid means in the fit's validity mask (when written) and finite.
    """
    values = np.asarray(load_image(files.map_path).get_fdata(dtype=np.float32))
    valid = np.isfinite(values)
    if files.mask_path is not None:
        mask = np.asarray(load_image(files.mask_path).dataobj)
        if mask.shape != values.shape:
            raise InputError(f"validity mask shape {mask.shape} differs from the map's "
                             f"{values.shape}", path=files.mask_path,
                             fix="rerun spineqprep for this subject")
        valid &= mask > 0
    return values, valid


def times_of(meta: dict[str, Any]) -> tuple[str | None, list[float]]:
    """(sidecar field name, times in seconds) of the series a map was fitted from."""
    for field in TIME_FIELDS:
        value = meta.get(field)
        if isinstance(value, list | tuple) and value:
            return field, [float(v) for v in value]
        if isinstance(value, int | float):
            return field, [float(value)]
    return None, []


def format_times_ms(times_s: list[float]) -> str:
    """Times in seconds -> ``"10,20,40"`` (milliseconds)."""
    return ",".join(f"{t * 1e3:g}" for t in times_s)


def map_statistics(files: MapFiles) -> dict[str, Any]:
    """:func:`statistics_of` one map read from disk."""
    values, valid = valid_voxels(files)
    return statistics_of(values, valid, files.metadata())


def statistics_of(values: np.ndarray, valid: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Counts and percentiles (ms) of the valid voxels of a map in seconds, plus sidecar facts.

    ``fraction_valid`` is the sidecar's ``FractionValid`` (the fitter knows which voxels it
    fitted); without one it is the valid fraction of all voxels.
    """
    ms = values[valid].astype(np.float64) * 1e3
    field, times = times_of(meta)
    n_valid = int(valid.sum())
    if n_valid:
        p5, p25, p50, p75, p95 = np.percentile(ms, [5, 25, 50, 75, 95])
    else:
        p5 = p25 = p50 = p75 = p95 = math.nan
    fraction = meta.get("FractionValid")
    if not isinstance(fraction, int | float):
        fraction = n_valid / values.size if values.size else math.nan
    return {
        "n_voxels": int(values.size), "n_voxels_valid": n_valid, "fraction_valid": float(fraction),
        "median_ms": float(p50), "iqr_ms": float(p75 - p25), "p5_ms": float(p5),
        "p95_ms": float(p95), "time_field": field, "times_ms": format_times_ms(times),
        "fit_model": meta.get("FitModel"),
    }


def read_participants(bids_dir: Path) -> pd.DataFrame | None:
    """``participants.tsv`` of a BIDS dataset as strings (``n/a`` -> missing), or ``None``."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the table ({err})", path=path,
                         fix="write a tab-separated table with a participant_id column") from err
    if "participant_id" not in table.columns:
        raise InputError("participants.tsv has no participant_id column", path=path,
                         fix="add a participant_id column (values like sub-01)")
    return table


def _sites(bids_dir: Path | None) -> dict[str, str]:
    table = None if bids_dir is None else read_participants(bids_dir)
    if table is None or "site" not in table.columns:
        return {}
    return {pid: site for pid, site in zip(table["participant_id"], table["site"], strict=True)
            if isinstance(site, str)}


def _text_na_none(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``frame`` with ``columns`` as object dtype holding ``None`` (not NaN) where missing."""
    out = frame.copy()
    for column in columns:
        out[column] = out[column].astype(object).where(out[column].notna(), None)
    return out


def summarise_maps(output_dir: Path, bids_dir: Path | None = None) -> pd.DataFrame:
    """One row per subject/session/map/acq with the statistics of its valid voxels (ms).

    Columns are :data:`SUMMARY_COLUMNS`; missing text (no session, no site) is ``None`` and
    missing numbers NaN (write with ``na_rep="n/a"``). ``path`` is the map relative to
    ``output_dir``.
    """
    output_dir = Path(output_dir)
    sites = _sites(bids_dir)
    rows = []
    for files in find_maps(output_dir):
        pid = f"sub-{files.subject}"
        rows.append({
            "participant_id": pid,
            "session_id": f"ses-{files.session}" if files.session else None,
            "site": sites.get(pid), "map": files.suffix, "acq": files.acq,
            **map_statistics(files),
            "path": files.map_path.relative_to(output_dir).as_posix(),
        })
    table = _text_na_none(pd.DataFrame(rows, columns=SUMMARY_COLUMNS), TEXT_COLUMNS)
    table = table.astype({"n_voxels": int, "n_voxels_valid": int, "fraction_valid": float,
                          "median_ms": float, "iqr_ms": float, "p5_ms": float, "p95_ms": float})
    table = table.sort_values(["participant_id", "session_id", "map", "acq"],
                              na_position="first", kind="stable")
    return table.reset_index(drop=True)


def expected_maps(bids_dir: Path) -> pd.DataFrame:
    """(participant_id, session_id, map, acq) of every map the raw series of ``bids_dir`` allow."""
    rows = set()
    for anat in _anat_dirs(Path(bids_dir), None):
        for path in anat.iterdir():
            parsed = parse_name(path.name)
            if parsed is None or parsed[1] not in SOURCE_MAPS:
                continue
            entities = parsed[0]
            ses = entities.get("ses")
            rows.add((f"sub-{entities['sub']}", f"ses-{ses}" if ses else None,
                      SOURCE_MAPS[parsed[1]], entities.get("acq")))
    keys = ["participant_id", "session_id", "map", "acq"]
    return _text_na_none(pd.DataFrame(sorted(rows, key=str), columns=keys), keys)


def missing_maps(summary: pd.DataFrame, bids_dir: Path | None = None) -> pd.DataFrame:
    """Maps that should exist but are absent from ``summary``, with the reason.

    With ``bids_dir``, expected = one map per raw series set (MESE -> T2map ...); without it,
    every subject/session is expected to have every (map, acq) some other subject has.
    Maps present but with no valid voxel are listed too.
    """
    keys = ["participant_id", "session_id", "map", "acq"]
    summary = _text_na_none(summary, keys)
    have = {tuple(row) for row in summary[keys].astype(object).itertuples(index=False)}
    if bids_dir is not None:
        expected = {tuple(row) for row in expected_maps(bids_dir).itertuples(index=False)}
    else:
        visits = {tuple(row) for row in summary[keys[:2]].astype(object).itertuples(index=False)}
        kinds = {tuple(row) for row in summary[keys[2:]].astype(object).itertuples(index=False)}
        expected = {(*visit, *kind) for visit in visits for kind in kinds}
    rows = [(*key, "not written") for key in expected - have]
    empty = summary[summary["n_voxels_valid"] == 0]
    rows += [(*row, "no valid voxel") for row in empty[keys].itertuples(index=False)]
    return _text_na_none(pd.DataFrame(sorted(rows, key=str), columns=[*keys, "reason"]),
                         [*keys, "reason"])
