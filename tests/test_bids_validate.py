"""The extension's own checks and the official BIDS validator on spine datasets."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from _bidsdata import AFFINE, make_dataset, write_nifti

import spineqprep.bids.validator as validator_mod
from spineqprep.bids.layout import collect_series
from spineqprep.bids.validate import Problem, check_dataset, check_series, raise_for_problems
from spineqprep.bids.validator import run_bids_validator
from spineqprep.errors import InputError, SpineqprepError


def _errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def _edit(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", subjects=("01",))


def anat(root: Path, sub: str = "01") -> Path:
    return root / f"sub-{sub}" / "anat"


def test_clean_dataset_passes_both_validators(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01", "02"), sessions=("1",),
                        bidsignore=False)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert _errors(check_dataset(root)) == []
    report = run_bids_validator(root)
    assert report.errors == [], "\n".join(map(str, report.errors))
    assert sorted(report.summary["subjects"]) == ["01", "02"]
    assert report.summary["sessions"] == ["1"]
    # the dataset had no .bidsignore: the validator ran on a shadow tree, nothing was written
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_official_validator_sees_mesl_without_bidsignore_only_through_us(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), bidsignore=False)
    (root / ".bidsignore").write_text("extra_notes.txt\n")
    (root / "extra_notes.txt").write_text("notes")
    report = run_bids_validator(root)
    assert report.errors == []
    assert (root / ".bidsignore").read_text() == "extra_notes.txt\n"


def test_official_validator_reports_an_empty_image(ds):
    (anat(ds) / "sub-01_acq-sag_T1w.nii.gz").write_bytes(b"")
    report = run_bids_validator(ds)
    codes = {p.message.split(":")[0] for p in report.errors}
    assert "BIDS validator EMPTY_FILE" in codes
    assert all(p.path.endswith("sub-01_acq-sag_T1w.nii.gz") for p in report.errors)


def test_validator_that_cannot_run_suggests_skipping(ds, monkeypatch):
    monkeypatch.setattr(validator_mod, "validator_command", lambda: ["/nonexistent/validator"])
    with pytest.raises(SpineqprepError, match="--skip-bids-validation"):
        run_bids_validator(ds)


def test_missing_spin_lock_time_and_frequency(ds):
    _edit(anat(ds) / "sub-01_acq-mapss_tsl-3_MESL.json", SpinLockTime=None)
    (ds / "acq-mapss_MESL.json").unlink()
    errors = _errors(check_dataset(ds))
    missing_tsl = [p for p in errors if "SpinLockTime" in p.message]
    assert [Path(p.path).name for p in missing_tsl] == ["sub-01_acq-mapss_tsl-3_MESL.json"]
    assert "add \"SpinLockTime\"" in missing_tsl[0].fix
    assert len([p for p in errors if "SpinLockFrequency" in p.message]) == 4
    assert len(errors) == 5


def test_echo_time_in_milliseconds(ds):
    _edit(anat(ds) / "sub-01_acq-mese_echo-2_MESE.json", EchoTime=30)
    (error,) = _errors(check_dataset(ds))
    assert error.path.endswith("sub-01_acq-mese_echo-2_MESE.json")
    assert "EchoTime = 30 is outside 0-1 s" in error.message
    assert "milliseconds" in error.fix and "0.03" in error.fix


def test_non_numeric_and_out_of_range_frequency(ds):
    _edit(ds / "acq-mapss_MESL.json", SpinLockFrequency="300 Hz")
    errors = _errors(check_dataset(ds))
    assert len(errors) == 4 and all("must be a number" in p.message for p in errors)
    _edit(ds / "acq-mapss_MESL.json", SpinLockFrequency=0.3)  # the cached layout sees it
    errors = _errors(check_dataset(ds))
    assert len(errors) == 4 and all("outside 1-5000 Hz" in p.message for p in errors)


def test_single_echo_and_duplicated_times(ds):
    for i in (2, 3):
        for ext in (".nii.gz", ".json"):
            (anat(ds) / f"sub-01_acq-ute_echo-{i}_MEGRE{ext}").unlink()
    _edit(anat(ds) / "sub-01_acq-mese_echo-3_MESE.json", EchoTime=0.03)
    errors = _errors(check_dataset(ds))
    assert len(errors) == 2
    single = next(p for p in errors if "MEGRE" in p.message)
    assert "has 1 echo(s); a relaxation fit needs at least 2" in single.message
    dupe = next(p for p in errors if "MESE" in p.message)
    assert "EchoTime 0.03 s appears more than once" in dupe.message


def test_unequal_grids(ds):
    write_nifti(anat(ds) / "sub-01_acq-mese_echo-2_MESE.nii.gz", np.ones((6, 7, 4)))
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    write_nifti(anat(ds) / "sub-01_acq-mapss_tsl-4_MESL.nii.gz", np.ones((6, 7, 3)), shifted)
    errors = _errors(check_dataset(ds))
    assert len(errors) == 2
    shape = next(p for p in errors if "shape" in p.message)
    assert shape.path.endswith("echo-2_MESE.nii.gz") and "(6, 7, 4)" in shape.message
    affine = next(p for p in errors if "affine" in p.message)
    assert affine.path.endswith("tsl-4_MESL.nii.gz") and "voxel grid" in affine.fix


def test_truncated_corrupt_and_4d_images(ds):
    path = anat(ds) / "sub-01_acq-mese_echo-3_MESE.nii.gz"
    write_nifti(path, np.random.default_rng(1).random((40, 40, 20)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # header intact, data cut: load() succeeds
    (anat(ds) / "sub-01_acq-ute_echo-2_MEGRE.nii.gz").write_bytes(gzip.compress(b"garbage" * 50))
    write_nifti(anat(ds) / "sub-01_acq-sag_T2w.nii.gz", np.ones((6, 7, 3, 2)))
    errors = _errors(check_dataset(ds))
    by_name = {Path(p.path).name: p for p in errors}
    assert "unreadable, truncated or corrupt" in by_name[path.name].message
    assert "unreadable" in by_name["sub-01_acq-ute_echo-2_MEGRE.nii.gz"].message
    assert "expected a 3-D image" in by_name["sub-01_acq-sag_T2w.nii.gz"].message
    assert len(errors) == 3


def test_varying_spin_lock_frequency(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), inherit_mesl=False)
    _edit(anat(root) / "sub-01_acq-mapss_tsl-2_MESL.json", SpinLockFrequency=500.0)
    (error,) = _errors(check_dataset(root))
    assert "SpinLockFrequency differs" in error.message and "acq-" in error.fix


def test_check_series_directly(ds):
    series = {s.suffix: s for s in collect_series(ds, "01")}
    assert _errors(check_series(series["MESE"])) == []
    warnings = [p for p in check_series(series["MEGRE"]) if p.severity == "warning"]
    assert any("FlipAngle" in p.message for p in warnings)


def test_missing_description(ds):
    (ds / "dataset_description.json").unlink()
    (error,) = check_dataset(ds)
    assert "dataset_description.json is missing" in error.message and "BIDSVersion" in error.fix


def test_participants_table(ds):
    (ds / "participants.tsv").write_text(
        "participant_id\tage\tsex\todi\tvas\tbmi\n"
        "sub-01\told\tX\t150\tn/a\t24.5\n"
        "02\t40\tF\t20\t3\tn/a\n")
    errors = _errors(check_dataset(ds))
    text = "\n".join(p.message for p in errors)
    assert "column age: 'old' is not a number" in text
    assert "column sex: 'X' is not one of M, F, O" in text
    assert "column odi: 150 is outside 0-100" in text
    assert "not of the form sub-<label>: 02" in text
    assert len(errors) == 4
    (ds / "participants.tsv").write_text("subject\tage\nsub-01\t30\n")
    (error,) = _errors(check_dataset(ds))
    assert "required column(s) missing: participant_id" in error.message


def test_disc_grades_and_sessions(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), sessions=("1",))
    (root / "phenotype").mkdir()
    (root / "phenotype" / "disc_grades.tsv").write_text(
        "participant_id\tsession_id\tlevel\tpfirrmann\tmodified_pfirrmann\n"
        "sub-01\tses-1\tL4L5\t3\t4\n"
        "sub-01\tses-1\tL6S1\t7\t2.5\n"
        "sub-01\tses-2\tL5S1\tn/a\tn/a\n")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\nses-1\nses-3\n")
    wrong = root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-2_acq-sag_T1w.json"
    wrong.write_text("{}")
    noindex = root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_acq-mapss_MESL.json"
    noindex.write_text("{}")
    errors = _errors(check_dataset(root))
    text = "\n".join(str(p) for p in errors)
    assert "level 'L6S1' is not a lumbar disc level" in text
    assert "column pfirrmann: 7 is outside 1-5" in text
    assert "column modified_pfirrmann: '2.5' is not an integer" in text
    assert "line 4: session mismatch, sub-01 has no ses-2" in text
    assert "ses-3 have no folder" in text
    assert f"{wrong}: session mismatch" in text
    assert f"{noindex}: a MESL file without the tsl- entity" in text
    assert len(errors) == 7


def test_raise_for_problems_lists_errors_and_logs_warnings(caplog):
    problems = [Problem("a.json", "bad A", "fix A"), Problem("b.json", "meh", None, "warning"),
                Problem("c.nii.gz", "bad C", "fix C")]
    with caplog.at_level(logging.WARNING, logger="spineqprep"), \
            pytest.raises(InputError) as err:
        raise_for_problems(problems)
    text = str(err.value)
    assert "2 problem(s)" in text and "a.json: bad A\n  fix: fix A" in text and "c.nii.gz" in text
    assert "meh" not in text and "b.json: meh" in caplog.text
    raise_for_problems(problems[1:2])  # warnings alone do not raise


def test_ambiguous_series_is_an_error_unless_filtered(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=("01",), suffixes=())
    for run in (1, 2):
        for i, te in ((1, 0.01), (2, 0.02)):
            stem = anat(root) / f"sub-01_acq-mese_echo-{i}_run-{run}_MESE"
            write_nifti(Path(f"{stem}.nii.gz"), np.ones((6, 7, 3)))
            Path(f"{stem}.json").write_text(json.dumps({"EchoTime": te}))
    (error,) = _errors(check_dataset(root))
    assert "share acq-mese" in error.message and "--bids-filter-file" in error.fix
    assert not error.message.startswith(str(error.path))
    assert _errors(check_dataset(root, bids_filters={"MESE": {"run": 1}})) == []
    assert _errors(check_dataset(root, participants=["sub-02"])) == []


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic dataset (2 subjects, 2 sites, 2 sessions) and its truth."""
    synth = pytest.importorskip("spineqprep.synth")
    if not hasattr(synth, "generate_dataset"):
        pytest.skip("spineqprep.synth.generate_dataset is not there yet")
    out = synth.generate_dataset(tmp_path_factory.mktemp("synth") / "raw", n_subjects=2,
                                 n_sites=2, n_sessions=2, seed=0, size="small")
    return Path(out.raw_dir), Path(out.truth_dir)


def test_synthetic_raw_dataset_passes_both_validators(synthetic):
    raw, _ = synthetic
    problems = check_dataset(raw)
    assert _errors(problems) == [], "\n".join(map(str, _errors(problems)))
    report = run_bids_validator(raw)
    assert report.errors == [], "\n".join(map(str, report.errors))
    assert len(report.summary["subjects"]) == 2 and len(report.summary["sessions"]) == 2


def test_synthetic_truth_is_valid_and_named_as_our_outputs(synthetic):
    from spineqprep.bids.derivatives import build_path
    from spineqprep.bids.layout import collect_participants

    raw, truth = synthetic
    suffixes = set()
    for sub in collect_participants(raw):
        for s in collect_series(raw, sub):
            suffixes.add(s.suffix)
            assert (truth / build_path(s.entities, s.target, ".nii.gz")).is_file(), s.name
    assert suffixes == {"MESE", "MESL", "MEGRE"}
    report = run_bids_validator(truth)
    assert report.errors == [], "\n".join(map(str, report.errors))
