"""Naming and writing of BIDS-Derivatives outputs (spineqprep's maps, the synthetic truth).

Names follow BIDS-Derivatives: ``sub-<l>/[ses-<l>/]anat/sub-<l>[_ses-<l>]_acq-<l>[_space-<l>]
[_label-<l>][_desc-<l>]_<suffix><extension>``, entity order from the schema. Every writer here is
atomic (a temporary file in the target folder, then ``os.replace``), so a reader never meets a
half-written file, even when a run is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

from spineqprep import __version__
from spineqprep.bids.schema import load_schema

_LABEL = re.compile(r"^[A-Za-z0-9+]+$")
_INDEX = re.compile(r"^[0-9]+$")


def _entity_aliases() -> dict[str, str]:
    """Every accepted spelling of an entity (file key, schema name, pybids name) -> file key."""
    aliases = {}
    for name, spec in load_schema()["entities"].items():
        aliases[name] = aliases[spec["key"]] = spec["key"]
    return aliases


def build_path(entities: Mapping[str, Any], suffix: str, extension: str) -> str:
    """The relative path of a derivative.

    E.g. ``sub-01/ses-1/anat/sub-01_ses-1_acq-mese_T2map.nii.gz``.

    ``entities`` uses file keys (``sub``, ``acq``) or entity names (``subject``,
    ``acquisition``); empty values are left out. Raises ``ValueError`` for an unknown entity, a
    value that is not a BIDS label/index, or a missing subject (programming errors, not user
    errors).
    """
    schema = load_schema()
    aliases = _entity_aliases()
    formats = {spec["key"]: spec["format"] for spec in schema["entities"].values()}
    values: dict[str, str] = {}
    for name, value in entities.items():
        if value is None or value == "":
            continue
        if name not in aliases:
            raise ValueError(f"unknown BIDS entity {name!r} (known: {sorted(set(aliases))})")
        key = aliases[name]
        text = str(value)
        if text.startswith(f"{key}-"):
            text = text[len(key) + 1:]
        pattern = _INDEX if formats[key] == "index" else _LABEL
        if not pattern.match(text):
            raise ValueError(f"{key}-{text}: a BIDS {formats[key]} must match {pattern.pattern}")
        values[key] = text
    if "sub" not in values:
        raise ValueError("a derivative path needs the subject entity ('sub')")
    if not re.match(r"^[A-Za-z0-9]+$", suffix) or not extension.startswith("."):
        raise ValueError(f"bad suffix {suffix!r} or extension {extension!r}")
    name = "_".join(f"{k}-{values[k]}" for k in schema["entity_order"] if k in values)
    folders = [f"sub-{values['sub']}"]
    if "ses" in values:
        folders.append(f"ses-{values['ses']}")
    folders.append(schema["derivatives"]["datatype"])
    return "/".join([*folders, f"{name}_{suffix}{extension}"])


def map_metadata(suffix: str, sources: Sequence[str] = (), **fields: Any) -> dict[str, Any]:
    """The sidecar of a parametric map (``T2map``, ``T1rho``, ``T2starmap``): the fields BIDS and
    the validator require for it (``Units`` in seconds, ``SkullStripped``), ``Sources`` and
    ``fields``."""
    maps = load_schema()["derivatives"]["maps"]
    if suffix not in maps:
        raise ValueError(f"{suffix!r} is not a parametric map of the schema ({sorted(maps)})")
    meta: dict[str, Any] = dict(load_schema()["derivatives"]["map_metadata"]["required"])
    meta["Units"] = maps[suffix]["units"]
    if sources:
        meta["Sources"] = list(sources)
    meta.update(fields)
    return meta


@contextlib.contextmanager
def _atomic_target(path: Path, suffix: str) -> Iterator[Path]:
    """A temporary path next to ``path``, moved onto it when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with _atomic_target(Path(path), ".tmp") as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns the path."""
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def atomic_write_nifti(img: nib.spatialimages.SpatialImage, path: str | Path) -> Path:
    """Save a NIfTI image to ``path`` atomically (the extension of ``path`` decides gzip)."""
    path = Path(path)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with _atomic_target(path, ext) as tmp:
        nib.save(img, tmp)
    return path


def write_bidsignore(out_dir: str | Path, patterns: Sequence[str] | None = None) -> Path:
    """Add ``patterns`` (default: the schema's derivative patterns) to ``out_dir/.bidsignore``,
    keeping the lines already there."""
    path = Path(out_dir) / ".bidsignore"
    wanted = list(patterns if patterns is not None else
                  load_schema()["derivatives"]["bidsignore"])
    lines = path.read_text().splitlines() if path.exists() else []
    lines += [p for p in wanted if p not in lines]
    return atomic_write_text("\n".join(lines) + "\n", path)


def write_dataset_description(
    out_dir: str | Path,
    name: str = "spineqprep",
    version: str = __version__,
    container: Mapping[str, str] | None = None,
    source_datasets: Sequence[Mapping[str, str]] | None = None,
    *,
    bids_dir: str | Path | None = None,
    dataset_links: Mapping[str, str] | None = None,
) -> Path:
    """Write ``dataset_description.json`` (and the ``.bidsignore``) of a derivatives dataset.

    ``GeneratedBy`` names ``name``/``version`` and, when given, the ``container`` (``Type``,
    ``Tag``). ``bids_dir`` becomes ``DatasetLinks["raw"]`` so that sidecars can cite inputs as
    BIDS URIs (``bids:raw:sub-01/anat/...``); the raw dataset's DOI, if it declares one, goes
    into ``SourceDatasets``.
    """
    out_dir = Path(out_dir)
    generated: dict[str, Any] = {"Name": name, "Version": version}
    if container:
        generated["Container"] = dict(container)
    description: dict[str, Any] = {
        "Name": f"{name} outputs",
        "BIDSVersion": load_schema()["bids_version"],
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
    }
    links = dict(dataset_links or {})
    sources = [dict(s) for s in source_datasets or ()]
    if bids_dir is not None:
        bids_dir = Path(bids_dir).resolve()
        links.setdefault("raw", str(bids_dir))
        if not sources:
            sources = [_source_of(bids_dir)]
    if sources:
        description["SourceDatasets"] = sources
    if links:
        description["DatasetLinks"] = links
    write_bidsignore(out_dir)
    return atomic_write_json(description, out_dir / "dataset_description.json")


def _source_of(bids_dir: Path) -> dict[str, str]:
    """A ``SourceDatasets`` entry for a raw dataset: its DOI when declared, else its BIDS URI."""
    entry = {"URL": "bids:raw:"}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        raw = json.loads((bids_dir / "dataset_description.json").read_text())
        if raw.get("DatasetDOI"):
            entry["DOI"] = raw["DatasetDOI"]
    return entry


def default_dseg_labels() -> list[dict[str, Any]]:
    """The schema's segmentation labels (SPINEPS/VerSe numbering: vertebrae, discs = +100)."""
    return [dict(row) for row in load_schema()["anatomy"]["dseg_labels"]]


def write_dseg_tsv(
    out_dir: str | Path, labels: Sequence[Mapping[str, Any]] | None = None,
    filename: str = "dseg.tsv",
) -> Path:
    """Write the ``dseg.tsv`` look-up table (``index``, ``name``, ``abbreviation`` ...) of the
    ``_dseg`` images of a derivatives dataset (at its root, where BIDS inheritance finds it)."""
    rows = list(labels if labels is not None else default_dseg_labels())
    columns = list(load_schema()["derivatives"]["dseg_tsv_columns"])
    columns += [c for row in rows for c in row if c not in columns]
    columns = list(dict.fromkeys(columns))
    indices = [int(row["index"]) for row in rows]
    if len(set(indices)) != len(indices) or min(indices, default=1) < 1:
        raise ValueError("dseg label indices must be unique integers >= 1 (0 is background)")
    text = "\t".join(columns) + "\n" + "".join(
        "\t".join(_tsv_value(row.get(c)) for c in columns) + "\n" for row in rows)
    return atomic_write_text(text, Path(out_dir) / filename)


def _tsv_value(value: Any) -> str:
    na = load_schema()["tabular"]["na_value"]
    return na if value is None or value == "" else str(value)


def bids_uri(path: str | Path, dataset_root: str | Path, dataset_name: str = "raw") -> str:
    """The BIDS URI of a file of a linked dataset, e.g. ``bids:raw:sub-01/anat/x.nii.gz``."""
    rel = Path(path).resolve().relative_to(Path(dataset_root).resolve())
    return f"bids:{dataset_name}:{rel.as_posix()}"
