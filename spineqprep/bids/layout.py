"""Finding the inputs of a run in a spine-BIDS dataset with pybids.

One ``BIDSLayout`` is built per dataset and process (indexing is the slow part), optionally
stored in a SQLite database in the work folder so that a re-run skips indexing. The layout
knows the extension's entities through :func:`spineqprep.bids.schema.pybids_config`.

``--bids-filter-file`` (as in fMRIPrep): a JSON object whose keys are the suffixes of the
extension (``MESE``, ``MESL``, ``MEGRE``, ``T1w``, ``T2w``) and whose values are pybids queries
added to the search for that suffix, e.g. ``{"MESL": {"acq": "mapss"}, "MEGRE": {"part": "mag"}}``.
Entities are written as file keys (``acq``) or pybids names (``acquisition``); a value may be a
string, a list of alternatives, ``null`` (the entity must be absent) or ``"*"`` (present, any
value).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids import BIDSLayout
from bids.exceptions import BIDSValidationError
from bids.layout import Query

from spineqprep.bids.schema import (
    load_schema,
    pybids_config,
    pybids_name,
    series_suffixes,
    structural_suffixes,
)
from spineqprep.errors import InputError, UsageError

_LAYOUTS: dict[Path, tuple[str, BIDSLayout]] = {}
#: top-level folders pybids does not index (its defaults), left out of the fingerprint too
_NOT_INDEXED = {"derivatives", "sourcedata", "code", "stimuli", "models"}
_IMAGE_EXTENSIONS = [".nii.gz", ".nii"]


@dataclass(frozen=True)
class Series:
    """One relaxometry series: the images of one suffix and acquisition of one session."""

    suffix: str
    subject: str
    session: str | None
    acq: str | None
    files: tuple[Path, ...]
    #: the time of each file (seconds, ``nan`` when its sidecar lacks it), in file order
    times: tuple[float, ...]
    #: sidecar of the first file (inheritance resolved), with ``time_field`` set to all times
    metadata: dict[str, Any] = field(hash=False)
    #: the output map suffix (``T2map``, ``T1rho``, ``T2starmap``)
    target: str = ""
    #: the full sidecar of every file, in file order (for per-file checks)
    file_metadata: tuple[dict[str, Any], ...] = field(default=(), hash=False, repr=False)

    @property
    def time_field(self) -> str:
        """The sidecar field that holds the times (``EchoTime`` or ``SpinLockTime``)."""
        return series_suffixes()[self.suffix]["time_field"]

    @property
    def index_entity(self) -> str:
        """The entity that numbers the images (``echo`` or ``tsl``)."""
        return series_suffixes()[self.suffix]["index_entity"]

    @property
    def entities(self) -> dict[str, str]:
        """The entities shared by the series and its derivatives (``sub``, ``ses``, ``acq``)."""
        ents = {"sub": self.subject, "ses": self.session, "acq": self.acq}
        return {k: v for k, v in ents.items() if v}

    @property
    def name(self) -> str:
        """A readable name, e.g. ``sub-01_ses-1_acq-mapss_MESL``."""
        return "_".join(f"{k}-{v}" for k, v in self.entities.items()) + f"_{self.suffix}"


@dataclass(frozen=True)
class Structural:
    """A structural image (T1w, T2w) used for reports and, later, segmentation."""

    suffix: str
    subject: str
    session: str | None
    acq: str | None
    path: Path


def get_layout(bids_dir: str | Path, database_path: str | Path | None = None) -> BIDSLayout:
    """The (cached) pybids layout of ``bids_dir``, indexed once per process.

    With ``database_path`` the index is saved there (SQLite) and an existing one is loaded
    as is: pybids does not notice files added since, so use a folder per run (fMRIPrep's
    ``<work_dir>/<run_uuid>/bids_db``) unless the dataset is known to be unchanged. In one
    process the layout is rebuilt when a file of the dataset changed (see ``_fingerprint``).
    """
    root = Path(bids_dir).resolve()
    fingerprint = _fingerprint(root)
    if root not in _LAYOUTS or _LAYOUTS[root][0] != fingerprint:
        if not (root / "dataset_description.json").is_file():
            raise InputError("not a BIDS dataset: dataset_description.json is missing", path=root,
                             fix="add a dataset_description.json with Name and BIDSVersion")
        kwargs: dict[str, Any] = {}
        if database_path is not None:
            kwargs["database_path"] = str(database_path)
            kwargs["reset_database"] = root in _LAYOUTS  # stale: the dataset changed
        try:
            layout = BIDSLayout(
                root, config=["bids", "derivatives", pybids_config()], validate=False, **kwargs)
        except (BIDSValidationError, ValueError, json.JSONDecodeError) as err:
            raise InputError(f"pybids cannot index the dataset ({err})", path=root,
                             fix="check dataset_description.json and the sidecars") from None
        _LAYOUTS[root] = (fingerprint, layout)
    return _LAYOUTS[root][1]


def _fingerprint(root: Path) -> str:
    """Names, sizes and modification times of the indexed files: a layout is rebuilt when a
    file was added, removed or changed since it was indexed (e.g. between two runs in one
    process). Stat-only, much cheaper than indexing."""
    digest = hashlib.sha1()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (
            folder == str(root) and d in _NOT_INDEXED))
        for name in sorted(files):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(folder, name))
                digest.update(f"{folder}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _as_layout(layout_or_dir: BIDSLayout | str | Path) -> BIDSLayout:
    if isinstance(layout_or_dir, BIDSLayout):
        return layout_or_dir
    return get_layout(layout_or_dir)


def _labels(value: str | Sequence[str] | None, prefix: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).removeprefix(prefix) for v in values] or None


def collect_participants(
    bids_dir: BIDSLayout | str | Path,
    participant_label: str | Sequence[str] | None = None,
    session_label: str | Sequence[str] | None = None,
    bids_filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """The subject labels to process (without ``sub-``), sorted.

    Labels may carry the ``sub-``/``ses-`` prefix. An unknown participant or session label, or
    a selected participant without any of the selected sessions, raises ``UsageError`` naming it
    and listing the available ones. ``bids_filters`` is checked here so that a wrong filter
    file fails before any processing.
    """
    layout = _as_layout(bids_dir)
    if bids_filters:
        normalise_filters(bids_filters)
    available = sorted(layout.get_subjects())
    if not available:
        raise InputError("no sub-<label> folders with images found", path=layout.root,
                         fix="name subject folders sub-<label>, e.g. sub-01/anat/")
    wanted = _labels(participant_label, "sub-") or available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise UsageError(
            f"participant label(s) {', '.join(unknown)} not found in {layout.root}",
            fix=f"choose among: {', '.join(available)}",
        )
    sessions = _labels(session_label, "ses-")
    if not sessions:
        return sorted(set(wanted))
    all_sessions = sorted(layout.get_sessions())
    missing = [s for s in sessions if s not in all_sessions]
    if missing:
        raise UsageError(
            f"session label(s) {', '.join(missing)} not found in {layout.root}",
            fix=f"choose among: {', '.join(all_sessions) or '(the dataset has no sessions)'}",
        )
    selected = [s for s in wanted if set(layout.get_sessions(subject=s)) & set(sessions)]
    if participant_label is not None and len(selected) < len(set(wanted)):
        lacking = sorted(set(wanted) - set(selected))
        raise UsageError(f"participant(s) {', '.join(lacking)} have none of the sessions "
                         f"{', '.join(sessions)}", fix="drop them or change --session-label")
    return sorted(set(selected))


def normalise_filters(bids_filters: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check a ``--bids-filter-file`` object and turn it into pybids queries per suffix."""
    schema = load_schema()
    suffixes = sorted(schema["raw"]["suffixes"])
    keys = {spec["key"] for spec in schema["entities"].values()}
    out: dict[str, dict[str, Any]] = {}
    for suffix, query in bids_filters.items():
        if suffix not in suffixes:
            raise UsageError(f"--bids-filter-file: unknown key {suffix!r}",
                             fix=f"use the suffixes {', '.join(suffixes)} as keys")
        if not isinstance(query, Mapping):
            raise UsageError(f"--bids-filter-file: the query of {suffix} is not an object",
                             fix='write e.g. {"MESL": {"acq": "mapss"}}')
        converted: dict[str, Any] = {}
        for entity, value in query.items():
            if entity in {"suffix", "extension", "subject", "session", "sub", "ses"}:
                raise UsageError(f"--bids-filter-file: {suffix} may not filter on {entity!r}",
                                 fix="select subjects and sessions with --participant-label "
                                 "and --session-label")
            name = pybids_name(entity) if entity in keys else entity
            if value is None:
                value = Query.NONE
            elif value == "*":
                value = Query.REQUIRED
            converted[name] = value
        out[suffix] = converted
    return out


def _query(layout: BIDSLayout, suffix: str, subject: str, sessions: list[str] | None,
           filters: dict[str, dict[str, Any]]) -> list[Any]:
    query: dict[str, Any] = {"subject": subject, "suffix": suffix,
                             "extension": _IMAGE_EXTENSIONS, **filters.get(suffix, {})}
    if sessions:
        query["session"] = sessions
    try:
        return layout.get(**query)
    except (ValueError, KeyError) as err:
        raise UsageError(f"--bids-filter-file: invalid query for {suffix} ({err})",
                         fix="use entities of the dataset, e.g. acq, echo, tsl, run") from None


def collect_series(
    layout_or_dir: BIDSLayout | str | Path,
    subject: str,
    sessions: str | Sequence[str] | None = None,
    bids_filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Series]:
    """The relaxometry series of one subject (all sessions, or ``sessions``), sorted by session,
    suffix and acquisition.

    Files are grouped by every entity except the index (``echo``/``tsl``) and sorted by the
    index. Missing or non-numeric times become ``nan`` (reported by
    :func:`spineqprep.bids.validate.check_series`). Two series that would give the same output
    name (e.g. ``run-1`` and ``run-2`` of one acquisition) raise ``InputError``.
    """
    layout = _as_layout(layout_or_dir)
    subject = subject.removeprefix("sub-")
    session_list = _labels(sessions, "ses-")
    filters = normalise_filters(bids_filters or {})
    out: list[Series] = []
    for suffix, spec in series_suffixes().items():
        index_name = pybids_name(spec["index_entity"])
        groups: dict[tuple, list[Any]] = defaultdict(list)
        for f in _query(layout, suffix, subject, session_list, filters):
            ents = f.get_entities()
            key = tuple(sorted((k, str(v)) for k, v in ents.items()
                               if k not in {index_name, "extension"}))
            groups[key].append(f)
        made: dict[tuple, tuple] = {}
        for key, files in sorted(groups.items()):
            series = _make_series(suffix, spec, index_name, files)
            ident = (series.session, series.acq)
            if ident in made:
                raise InputError(
                    f"two {suffix} series of sub-{subject} share acq-{series.acq}: "
                    f"{dict(made[ident])} and {dict(key)}",
                    path=series.files[0].parent,
                    fix="give them different acq- labels, or select one with "
                    f'--bids-filter-file (e.g. {{"{suffix}": {{"run": 1}}}})',
                )
            made[ident] = key
            out.append(series)
    return sorted(out, key=lambda s: (s.session or "", s.suffix, s.acq or ""))


def _make_series(suffix: str, spec: dict[str, Any], index_name: str, files: list[Any]) -> Series:
    def order(f: Any) -> tuple[int, str]:
        value = f.get_entities().get(index_name)
        return (int(value) if value is not None and str(value).isdigit() else -1, f.path)

    files = sorted(files, key=order)
    field_name = spec["time_field"]
    metas = tuple(dict(f.get_metadata()) for f in files)
    times = tuple(_as_seconds(m.get(field_name)) for m in metas)
    first = files[0].get_entities()
    metadata = {**metas[0], field_name: list(times)}
    return Series(
        suffix=suffix, subject=str(first["subject"]),
        session=str(first["session"]) if first.get("session") else None,
        acq=str(first["acquisition"]) if first.get("acquisition") else None,
        files=tuple(Path(f.path) for f in files), times=times, metadata=metadata,
        target=spec["fits"], file_metadata=metas,
    )


def _as_seconds(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def collect_structurals(
    layout_or_dir: BIDSLayout | str | Path,
    subject: str,
    sessions: str | Sequence[str] | None = None,
    bids_filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Structural]:
    """The structural images (T1w, T2w) of one subject, sorted by session, suffix and path."""
    layout = _as_layout(layout_or_dir)
    subject = subject.removeprefix("sub-")
    filters = normalise_filters(bids_filters or {})
    out = []
    for suffix in structural_suffixes():
        for f in _query(layout, suffix, subject, _labels(sessions, "ses-"), filters):
            ents = f.get_entities()
            out.append(Structural(
                suffix=suffix, subject=subject,
                session=str(ents["session"]) if ents.get("session") else None,
                acq=str(ents["acquisition"]) if ents.get("acquisition") else None,
                path=Path(f.path)))
    return sorted(out, key=lambda s: (s.session or "", s.suffix, str(s.path)))
