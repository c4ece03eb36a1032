"""Collecting participants, series and structural images with pybids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _bidsdata import SERIES, make_dataset, write_json, write_nifti

from spineqprep.bids.layout import (
    collect_participants,
    collect_series,
    collect_structurals,
    get_layout,
)
from spineqprep.errors import InputError, UsageError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("layout") / "ds", subjects=("01", "02"),
                        sessions=("1", "2"))


def test_participants_and_labels(dataset):
    assert collect_participants(dataset) == ["01", "02"]
    assert collect_participants(dataset, participant_label=["sub-02"]) == ["02"]
    assert collect_participants(dataset, "01", session_label="ses-2") == ["01"]


def test_unknown_labels_name_the_label_and_the_choices(dataset):
    with pytest.raises(UsageError, match=r"03.*\n.*fix: choose among: 01, 02"):
        collect_participants(dataset, participant_label=["01", "sub-03"])
    with pytest.raises(UsageError, match=r"(?s)session label\(s\) 9 .*choose among: 1, 2"):
        collect_participants(dataset, session_label=["9"])
    with pytest.raises(UsageError, match="unknown key 'MESX'"):
        collect_participants(dataset, bids_filters={"MESX": {"acq": "x"}})


def test_series_are_grouped_sorted_and_timed(dataset):
    series = collect_series(dataset, "sub-01")
    assert [(s.session, s.suffix) for s in series] == [
        ("1", "MEGRE"), ("1", "MESE"), ("1", "MESL"), ("2", "MEGRE"), ("2", "MESE"), ("2", "MESL")]
    mesl = series[2]
    assert mesl.target == "T1rho" and mesl.acq == "mapss" and mesl.subject == "01"
    assert mesl.time_field == "SpinLockTime" and mesl.index_entity == "tsl"
    assert mesl.times == tuple(SERIES["MESL"][3])
    assert [f.name for f in mesl.files] == [
        f"sub-01_ses-1_acq-mapss_tsl-{i}_MESL.nii.gz" for i in range(1, 5)]
    assert mesl.metadata["SpinLockTime"] == list(SERIES["MESL"][3])
    assert mesl.metadata["SpinLockFrequency"] == 300.0  # inherited sidecar
    assert mesl.entities == {"sub": "01", "ses": "1", "acq": "mapss"}
    assert {s.target for s in series} == {"T2map", "T1rho", "T2starmap"}
    assert len(collect_series(dataset, "01", sessions="2")) == 3


def test_filters_select_and_reject(dataset):
    only = collect_series(dataset, "01", bids_filters={"MESL": {"acq": "other"}})
    assert "MESL" not in {s.suffix for s in only} and len(only) == 4
    kept = collect_series(dataset, "01", bids_filters={"MESE": {"acquisition": "mese"}})
    assert len(kept) == 6
    assert len(collect_series(dataset, "01", bids_filters={"MESE": {"run": None}})) == 6
    with pytest.raises(UsageError, match="invalid query for MESL"):
        collect_series(dataset, "01", bids_filters={"MESL": {"nonsense": "1"}})
    with pytest.raises(UsageError, match="may not filter on 'subject'"):
        collect_series(dataset, "01", bids_filters={"MESL": {"subject": "02"}})


def test_structurals(dataset):
    found = collect_structurals(dataset, "02", sessions=["1"])
    assert [(s.suffix, s.acq, s.session) for s in found] == [("T1w", "sag", "1"),
                                                             ("T2w", "sag", "1")]
    assert all(s.path.is_file() for s in found)


def test_index_sorting_is_numeric_and_runs_must_be_disambiguated(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), suffixes=("MESE",))
    anat = root / "sub-01" / "anat"
    for i in (10, 11):  # tsl-10 sorts after tsl-2 only numerically
        write_nifti(anat / f"sub-01_acq-mese_echo-{i}_MESE.nii.gz", np.ones((6, 7, 3)))
        write_json(anat / f"sub-01_acq-mese_echo-{i}_MESE.json", {"EchoTime": 0.01 * i})
    (series,) = collect_series(root, "01")
    assert [int(f.name.split("echo-")[1].split("_")[0]) for f in series.files] == [
        1, 2, 3, 4, 10, 11]
    assert series.times[-1] == pytest.approx(0.11)

    root2 = make_dataset(tmp_path / "ds2", subjects=("01",), suffixes=())
    anat2 = root2 / "sub-01" / "anat"
    for run in (1, 2):
        for i in (1, 2):
            write_nifti(anat2 / f"sub-01_acq-mese_echo-{i}_run-{run}_MESE.nii.gz",
                        np.ones((6, 7, 3)))
            write_json(anat2 / f"sub-01_acq-mese_echo-{i}_run-{run}_MESE.json",
                       {"EchoTime": 0.01 * i})
    with pytest.raises(InputError, match="share acq-mese") as err:
        collect_series(root2, "01")
    assert "--bids-filter-file" in str(err.value)
    (one,) = collect_series(root2, "01", bids_filters={"MESE": {"run": 2}})
    assert all("run-2" in f.name for f in one.files)


def test_missing_time_is_nan_and_layout_is_cached_with_database(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), suffixes=("MEGRE",))
    sidecar = root / "sub-01" / "anat" / "sub-01_acq-ute_echo-2_MEGRE.json"
    meta = json.loads(sidecar.read_text())
    del meta["EchoTime"]
    sidecar.write_text(json.dumps(meta))
    db = tmp_path / "work" / "bids_db"
    layout = get_layout(root, database_path=db)
    assert get_layout(root) is layout
    assert any(db.iterdir())
    (series,) = collect_series(root, "01")
    assert np.isnan(series.times[1]) and not np.isnan(series.times[0])
    sidecar.write_text(json.dumps({**meta, "EchoTime": 0.0021}))  # a changed file: re-indexed
    (series,) = collect_series(root, "01")
    assert series.times[1] == pytest.approx(0.0021)
    assert get_layout(root) is not layout


def test_not_a_bids_dataset(tmp_path):
    with pytest.raises(InputError, match=r"dataset_description\.json is missing"):
        collect_participants(tmp_path)


QMRI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bids-examples-qmri"


@pytest.mark.realdata
@pytest.mark.skipif(not QMRI.is_dir(), reason="../shared/data/bids-examples-qmri is absent")
def test_official_qmri_examples_are_collected():
    """The BIDS qMRI example layouts (empty NIfTIs, real sidecars) read as our series."""
    from spineqprep.bids.validate import check_series

    (mese,) = collect_series(QMRI / "qmri_mese", "01")
    assert (mese.suffix, mese.acq, mese.target, len(mese.files)) == ("MESE", None, "T2map", 32)
    assert mese.times == pytest.approx([0.01 * i for i in range(1, 33)])
    assert mese.files[0].name == "sub-01_echo-01_MESE.nii.gz"
    assert mese.metadata["Manufacturer"] == "Siemens"
    (megre,) = collect_series(QMRI / "qmri_megre", "01")
    assert megre.times == pytest.approx([0.02 * i for i in range(1, 9)])
    assert megre.metadata["MagneticFieldStrength"] == 3  # from the top-level MEGRE.json
    errors = [p for p in check_series(mese) if p.severity == "error"]
    assert len(errors) == 32 and all("unreadable" in p.message for p in errors)  # 0-byte files
