"""The machine-readable schema of the spine extension of BIDS, and views derived from it.

The canonical file is ``bids_spec/schema/spine-bids.json`` at the top of the repository; the
package ships it as ``spineqprep/data/spine-bids.json`` (a symbolic link in the source tree whose
target a wheel build copies), so a source checkout and an installed package read the same text.
Entities, suffixes, required metadata, tabular columns and derivative names are all taken from
it, never repeated in code.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from spineqprep.errors import SpineqprepError

#: Where the schema is looked for, first hit wins: the packaged copy, then the source tree.
SCHEMA_LOCATIONS = (
    Path(__file__).resolve().parent.parent / "data" / "spine-bids.json",
    Path(__file__).resolve().parents[2] / "bids_spec" / "schema" / "spine-bids.json",
)

#: Names pybids gives to BIDS entities whose schema name differs (the rest are identical).
_PYBIDS_NAMES = {"description": "desc"}


def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    """The schema as a dict (cached per path); ``path=None`` reads the shipped schema."""
    if path is None:
        found = next((p for p in SCHEMA_LOCATIONS if p.is_file()), None)
        if found is None:
            raise SpineqprepError(
                "the spine-BIDS schema is missing from the installation",
                path=SCHEMA_LOCATIONS[0],
                fix="reinstall spineqprep (pip install spineqprep) or run from a source checkout",
            )
        path = found
    return _load(str(Path(path).resolve()))


@functools.cache
def _load(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpineqprepError(f"cannot read the spine-BIDS schema ({err})", path=path) from None




def pybids_name(key: str, schema: dict[str, Any] | None = None) -> str:
    """The pybids entity name of a file-name key (``acq`` -> ``acquisition``)."""
    schema = schema or load_schema()
    for name, spec in schema["entities"].items():
        if spec["key"] == key:
            return _PYBIDS_NAMES.get(name, name)
    raise KeyError(key)


def series_suffixes(schema: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Raw suffixes that form a relaxometry series (MESE, MESL, MEGRE) -> their schema entry."""
    schema = schema or load_schema()
    return {s: spec for s, spec in schema["raw"]["suffixes"].items() if spec["kind"] == "series"}


def structural_suffixes(schema: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Raw structural suffixes (T1w, T2w) -> their schema entry."""
    schema = schema or load_schema()
    return {s: spec for s, spec in schema["raw"]["suffixes"].items()
            if spec["kind"] == "structural"}


def pybids_config(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pybids layout configuration for the entities of the extension.

    Use it after pybids' own configurations, which define the plain-BIDS entities the same way:
    ``BIDSLayout(root, config=["bids", "derivatives", pybids_config()])``. Only the entities the
    schema marks ``new`` are added (re-declaring a pybids entity would change its dtype); index
    entities are integers so that ``layout.get(tsl=2)`` matches ``tsl-2`` and ``tsl-02``.
    """
    schema = schema or load_schema()
    entities = []
    for name, spec in schema["entities"].items():
        if not spec.get("new"):
            continue
        value = "[0-9]+" if spec["format"] == "index" else "[a-zA-Z0-9+]+"
        entry: dict[str, Any] = {"name": name, "pattern": rf"[_/\\]+{spec['key']}-({value})"}
        if spec["format"] == "index":
            entry["dtype"] = "int"
        entities.append(entry)
    return {"name": schema["name"], "entities": entities}
