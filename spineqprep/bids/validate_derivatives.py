"""The spine extension's check of a spineqprep derivatives dataset.

The official validator checks names and sidecars it knows; this check adds what the extension
promises of every relaxation map: the schema's naming, a sidecar with ``Units`` in seconds and
resolvable ``Sources``, the times it was fitted from, float32 values in seconds, and its fit
by-products (S0, R^2, validity mask) on the same grid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from spineqprep.bids.schema import load_schema
from spineqprep.bids.validate import Problem

_BY_PRODUCTS = ("S0map", "Rsquared", "mask")


def check_derivatives(out_dir: str | Path) -> list[Problem]:
    """All problems of the derivatives dataset at ``out_dir`` (empty when it is sound)."""
    root = Path(out_dir)
    problems = _check_description(root)
    links = _dataset_links(root)
    schema = load_schema()
    maps = schema["derivatives"]["maps"]
    keys = "|".join(schema["entity_order"])
    name_re = re.compile(rf"^sub-[A-Za-z0-9]+(?:_(?:{keys})-[A-Za-z0-9]+)*_({'|'.join(maps)})"
                         r"\.nii\.gz$")
    found = 0
    for path in sorted(root.glob("sub-*/**/anat/*.nii.gz")):
        match = name_re.match(path.name)
        if not match:
            continue
        found += 1
        problems += _check_map(path, match.group(1), maps[match.group(1)], links)
    if not found:
        problems.append(Problem(str(root), "no relaxation map (T2map, T1rho, T2starmap) found",
                                "run the participant level first"))
    return problems


def _check_description(root: Path) -> list[Problem]:
    path = root / "dataset_description.json"
    try:
        desc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [Problem(str(path), f"missing or unreadable ({err})",
                        "rerun spineqprep to write the derivatives' dataset_description.json")]
    problems = []
    if desc.get("DatasetType") != "derivative":
        problems.append(Problem(str(path), "DatasetType is not 'derivative'"))
    if not any(g.get("Name") == "spineqprep" for g in desc.get("GeneratedBy", [])):
        problems.append(Problem(str(path), "GeneratedBy does not name spineqprep"))
    return problems


def _dataset_links(root: Path) -> dict[str, Path]:
    try:
        links = json.loads((root / "dataset_description.json").read_text()).get("DatasetLinks", {})
    except (OSError, json.JSONDecodeError):
        links = {}
    # "bids::<path>" points into this dataset itself
    return {"": root, **{name: (root / target).resolve() for name, target in links.items()}}


def _check_map(path: Path, suffix: str, spec: dict, links: dict[str, Path]) -> list[Problem]:
    problems: list[Problem] = []
    stem = path.name.removesuffix(f"_{suffix}.nii.gz")
    sidecar = path.with_name(path.name.replace(".nii.gz", ".json"))
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [Problem(str(sidecar), f"missing or unreadable sidecar ({err})")]
    if meta.get("Units") != spec["units"]:
        problems.append(Problem(str(sidecar), f"Units is {meta.get('Units')!r}, "
                                f"not {spec['units']!r}"))
    times = [meta.get(f) for f in ("EchoTime", "SpinLockTime") if isinstance(meta.get(f), list)]
    if not times or len(set(times[0])) < 2:
        problems.append(Problem(str(sidecar), "no list of at least two fitted times "
                                "(EchoTime or SpinLockTime)"))
    problems += _check_sources(sidecar, meta.get("Sources"), links)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    if data.dtype != np.float32:
        problems.append(Problem(str(path), f"stored as {data.dtype}, not float32"))
    finite = data[np.isfinite(data) & (data > 0)]
    if finite.size and np.median(finite) > 2.0:
        problems.append(Problem(str(path), f"median {np.median(finite):.3g}: values do not look "
                                "like seconds", "write relaxation times in seconds"))
    for by_product in _BY_PRODUCTS:
        other = path.with_name(f"{stem}_desc-{spec['desc']}_{by_product}.nii.gz")
        if not other.exists():
            problems.append(Problem(str(other), f"missing {by_product} of the fit"))
        elif nib.load(other).shape != img.shape or not np.allclose(nib.load(other).affine,
                                                                     img.affine, atol=1e-4):
            problems.append(Problem(str(other), "not on the grid of its map"))
    return problems


def _check_sources(sidecar: Path, sources: object, links: dict[str, Path]) -> list[Problem]:
    if not isinstance(sources, list) or not sources:
        return [Problem(str(sidecar), "no Sources list")]
    problems = []
    for source in sources:
        match = re.match(r"^bids:([^:]*):(.+)$", str(source))
        if match and match.group(1) in links:
            target = links[match.group(1)] / match.group(2)
        else:
            target = Path(str(source))
        if not target.exists():
            problems.append(Problem(str(sidecar), f"source {source} does not resolve"))
    return problems
