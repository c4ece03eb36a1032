"""The schema file, its packaged copy and the pybids configuration generated from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _bidsdata import make_dataset
from bids import BIDSLayout

from spineqprep.bids.schema import (
    SCHEMA_LOCATIONS,
    load_schema,
    pybids_config,
    pybids_name,
    series_suffixes,
)

REPO = Path(__file__).resolve().parents[1]
CANONICAL = REPO / "bids_spec" / "schema" / "spine-bids.json"


def test_packaged_schema_is_the_canonical_file():
    packaged = REPO / "spineqprep" / "data" / "spine-bids.json"
    assert packaged.resolve() == CANONICAL.resolve()
    assert load_schema() == json.loads(CANONICAL.read_text())
    assert load_schema() is load_schema()  # cached


def test_schema_is_self_consistent():
    schema = load_schema()
    keys = [spec["key"] for spec in schema["entities"].values()]
    assert sorted(keys) == sorted(schema["entity_order"])
    maps = schema["derivatives"]["maps"]
    for suffix, spec in series_suffixes().items():
        assert spec["index_entity"] in keys
        assert spec["time_field"] in spec["required_metadata"]
        assert spec["required_metadata"][spec["time_field"]]["units"] == "s"
        assert maps[spec["fits"]]["source_suffix"] == suffix
        assert maps[spec["fits"]]["units"] == "s"
    assert schema["entities"]["tsl"]["new"] is True
    discs = schema["anatomy"]["discs"]
    abbreviations = [row["abbreviation"] for row in schema["anatomy"]["dseg_labels"]]
    assert set(discs) <= set(abbreviations)


def test_pybids_config_indexes_the_extension(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01", "02"))
    config = pybids_config()
    assert [e["name"] for e in config["entities"]] == ["tsl"]
    layout = BIDSLayout(root, config=["bids", "derivatives", config], validate=False)
    files = layout.get(suffix="MESL", tsl=2, extension=".nii.gz")
    assert sorted(Path(f.path).name for f in files) == [
        "sub-01_acq-mapss_tsl-2_MESL.nii.gz", "sub-02_acq-mapss_tsl-2_MESL.nii.gz"]
    assert files[0].get_entities()["tsl"] == 2
    meta = files[0].get_metadata()
    assert meta["SpinLockTime"] == pytest.approx(0.010)
    assert meta["SpinLockFrequency"] == 300.0  # inherited from the top-level acq-mapss_MESL.json
    assert pybids_name("acq") == "acquisition" and pybids_name("desc") == "desc"


def test_wheel_ships_the_schema(tmp_path):
    """A wheel built from the source tree contains the schema as a regular file."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "spineqprep", src / "spineqprep", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "bids_spec", src / "bids_spec")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    wheel = next((tmp_path / "dist").glob("spineqprep-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        shipped = json.loads(zf.read("spineqprep/data/spine-bids.json"))
    assert shipped == json.loads(CANONICAL.read_text())
    assert SCHEMA_LOCATIONS[0].name == "spine-bids.json"
