"""End to end: the BIDS-App on a synthetic multi-site, multi-session dataset, against the truth."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from container_helpers import tree_digest
from scipy.optimize import curve_fit

from spineqprep.bids.validate_derivatives import check_derivatives
from spineqprep.bids.validator import run_bids_validator
from spineqprep.cli.run import main
from spineqprep.relaxometry.regions import INCLUSION_RANGES
from spineqprep.synth import generate_dataset

MAPS = {"MESE": "T2map", "MESL": "T1rho", "MEGRE": "T2starmap"}
DESC = {"T2map": "T2fit", "T1rho": "T1rhofit", "T2starmap": "T2starfit"}
SERIES = re.compile(
    r"(sub-[^_]+(?:_ses-[^_]+)?_acq-[^_]+)_(?:echo|tsl)-1_(MESE|MESL|MEGRE)\.nii\.gz")


def expected_maps(raw: Path) -> list[tuple[Path, str]]:
    """(relative output path of the map, map suffix) for every series of the raw dataset."""
    out = []
    for suffix in MAPS:
        for path in raw.rglob(f"*_{suffix}.nii.gz"):
            match = SERIES.fullmatch(path.name)
            if match:
                rel = path.parent.relative_to(raw) / f"{match.group(1)}_{MAPS[suffix]}.nii.gz"
                out.append((rel, MAPS[suffix]))
    return sorted(out)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return generate_dataset(root / "bids", n_subjects=3, n_sites=3, n_sessions=2, seed=11)


@pytest.fixture(scope="module")
def processed(synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_out")
    before = tree_digest(synth.raw_dir)
    out, work = root / "out", root / "work"
    # registration has its own end-to-end test (test_registration_pipeline.py)
    code = main([str(synth.raw_dir), str(out), "participant", "-w", str(work), "--nprocs", "2",
                 "--no-registration"])
    return {"code": code, "out": out, "work": work, "before": before}


def test_participant_level_writes_every_map(synth, processed) -> None:
    assert processed["code"] == 0
    out = processed["out"]
    wanted = expected_maps(synth.raw_dir)
    # 3 subjects x 2 sessions x (T2, T1rho, T2*): every subject, session and site
    assert len(wanted) == 18
    assert {s for _, s in wanted} == set(MAPS.values())
    for rel, suffix in wanted:
        path = out / rel
        assert path.exists(), rel
        img = nib.load(path)
        assert img.get_data_dtype() == np.float32
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert meta["Units"] == "s"
        for source in meta["Sources"]:
            assert (synth.raw_dir / source.removeprefix("bids:raw:")).exists()
        stem = path.name.removesuffix(f"_{suffix}.nii.gz")
        for by_product in ("S0map", "Rsquared", "mask"):
            assert (path.parent / f"{stem}_desc-{DESC[suffix]}_{by_product}.nii.gz").exists()
    for subject in synth.participants:
        assert (out / f"sub-{subject}.html").exists()
        assert list((out / f"sub-{subject}" / "log").glob("*/spineqprep.toml"))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "spineqprep"
    assert "EchoTime" in (out / "logs" / "CITATION.md").read_text()


def test_raw_dataset_is_untouched(synth, processed) -> None:
    assert tree_digest(synth.raw_dir) == processed["before"]


def test_derivatives_pass_the_bids_validator_and_our_check(processed) -> None:
    report = run_bids_validator(processed["out"])
    assert not report.errors, report.errors
    assert check_derivatives(processed["out"]) == []


def test_our_derivatives_check_catches_a_broken_map(processed, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(processed["out"], copy)
    sidecar = next(copy.rglob("*_T2map.json"))
    meta = json.loads(sidecar.read_text())
    meta["Units"] = "ms"
    sidecar.write_text(json.dumps(meta))
    next(copy.rglob("*_desc-T1rhofit_Rsquared.nii.gz")).unlink()
    found = "\n".join(str(p) for p in check_derivatives(copy))
    assert "Units is 'ms'" in found and "missing Rsquared" in found


def test_whole_disc_means_match_the_truth(synth, processed) -> None:
    """Whole-disc mean T2 / T1rho against the truth, at the generator's default SNR.

    Noise is the only error source: the systematic error over all discs stays well within 1 %,
    90 % of the discs are within 1 %, and every disc is within 1 % plus three standard errors of
    its mean (per-voxel spread / sqrt(voxels); the discs of this small test grid are small)."""
    lut = pd.read_csv(synth.truth_dir / "dseg.tsv", sep="\t")
    discs = lut[lut["abbreviation"].isin(["L1L2", "L2L3", "L3L4", "L4L5", "L5S1"])]
    errors, limits = [], []
    for rel, suffix in expected_maps(synth.raw_dir):
        if suffix == "T2starmap":
            continue
        fitted = nib.load(processed["out"] / rel).get_fdata()
        truth = nib.load(synth.truth_dir / rel).get_fdata()
        labels = np.asarray(nib.load(synth.truth_dir / str(rel).replace(
            f"_{suffix}.nii.gz", "_dseg.nii.gz")).dataobj)
        for index in discs["index"]:
            inside = labels == index
            if inside.sum() < 20:
                continue
            ratio = fitted[inside] / truth[inside]
            errors.append(fitted[inside].mean() / truth[inside].mean() - 1)
            limits.append(0.01 + 3 * ratio.std() / np.sqrt(inside.sum()))
    errors = np.array(errors)
    assert len(errors) >= 40
    assert abs(errors.mean()) < 0.005, errors.mean()
    assert np.mean(np.abs(errors) < 0.01) >= 0.9
    assert np.all(np.abs(errors) < np.array(limits)), errors


TISSUES = {"nucleus": (218, 224), "annulus": (318, 324), "endplate": (418, 524)}


def test_per_voxel_bias_and_spread_equal_curve_fit(synth, processed) -> None:
    """Inside each tissue, the pipeline's per-voxel bias and spread against the truth equal those
    of scipy's curve_fit run voxel by voxel on the same raw images (to 0.1 ms)."""
    rng = np.random.default_rng(0)
    checked = 0
    for rel, suffix in expected_maps(synth.raw_dir):
        out_map = processed["out"] / rel
        meta = json.loads(out_map.with_name(out_map.name.replace(".nii.gz", ".json")).read_text())
        times = np.array(meta.get("EchoTime") or meta["SpinLockTime"])
        signal = np.stack([nib.load(synth.raw_dir / src.removeprefix("bids:raw:")).get_fdata()
                           for src in meta["Sources"]], axis=-1)
        fitted = nib.load(out_map).get_fdata()
        truth = nib.load(synth.truth_dir / rel).get_fdata()
        tissues = np.asarray(nib.load(synth.truth_dir / str(rel).replace(
            f"_{suffix}.nii.gz", "_desc-tissues_dseg.nii.gz")).dataobj)
        for lo, hi in TISSUES.values():
            where = np.flatnonzero((tissues.ravel() >= lo) & (tissues.ravel() <= hi))
            if where.size < 50:
                continue
            pick = rng.choice(where, size=min(150, where.size), replace=False)
            y = signal.reshape(-1, times.size)[pick]
            ref = np.array([curve_fit(lambda t, s0, r: s0 * np.exp(-r * t), times, yi,
                                      p0=(yi[0], 20.0), maxfev=5000)[0][1] for yi in y])
            err_ours = fitted.ravel()[pick] - truth.ravel()[pick]
            err_ref = 1 / ref - truth.ravel()[pick]
            assert abs(err_ours.mean() - err_ref.mean()) < 1e-4  # bias, to 0.1 ms
            assert abs(err_ours.std() - err_ref.std()) < 1e-4  # spread, to 0.1 ms
            checked += 1
    assert checked >= 30


def test_endplate_t2star_matches_the_truth(synth, processed) -> None:
    """Mean T2* (UTE) over the cartilage endplates (0.5-1 mm, on the UTE grid) within 1 %."""
    ratios = []
    for rel, suffix in expected_maps(synth.raw_dir):
        if suffix != "T2starmap":
            continue
        fitted = nib.load(processed["out"] / rel).get_fdata()
        truth = nib.load(synth.truth_dir / rel).get_fdata()
        tissues = np.asarray(nib.load(synth.truth_dir / str(rel).replace(
            "_T2starmap", "_desc-tissues_dseg")).dataobj)
        endplates = ((tissues >= 418) & (tissues <= 424)) | ((tissues >= 518) & (tissues <= 524))
        assert endplates.sum() > 500
        ratios.append(fitted[endplates].mean() / truth[endplates].mean())
    assert len(ratios) == 6
    assert np.all(np.abs(np.array(ratios) - 1) < 0.01), ratios


def test_rerun_resumes_from_the_work_dir(synth, processed) -> None:
    fits = sorted(processed["work"].rglob("fit/result_fit.pklz"))
    assert len(fits) == 18
    stamps = [f.stat().st_mtime_ns for f in fits]
    code = main([str(synth.raw_dir), str(processed["out"]), "participant", "-w",
                 str(processed["work"]), "--participant-label", synth.participants[0]])
    assert code == 0
    assert [f.stat().st_mtime_ns for f in fits] == stamps


def test_group_level_summarises_every_map(synth, processed) -> None:
    code = main([str(synth.raw_dir), str(processed["out"]), "group", "-w",
                 str(processed["work"])])
    assert code == 0
    table = pd.read_csv(processed["out"] / "group" / "desc-summary_maps.tsv", sep="\t")
    assert len(table) == 18
    assert set(table["site"]) == set(synth.sites.values())
    assert "maps missing or empty: 0" in (processed["out"] / "group.html").read_text()


def test_reports_only_and_boilerplate_only(synth, processed, tmp_path) -> None:
    report = processed["out"] / f"sub-{synth.participants[0]}.html"
    report.unlink()
    code = main([str(synth.raw_dir), str(processed["out"]), "participant", "--reports-only",
                 "-w", str(tmp_path / "w"), "--skip-bids-validation"])
    assert code == 0 and report.exists()
    assert not (tmp_path / "w").exists() or not list((tmp_path / "w").rglob("result_fit.pklz"))
    out = tmp_path / "boiler"
    code = main([str(synth.raw_dir), str(out), "participant", "--boilerplate-only",
                 "-w", str(tmp_path / "w2")])
    assert code == 0
    assert "Levenberg-Marquardt" in (out / "logs" / "CITATION.md").read_text()
    assert not list(out.rglob("*.nii.gz"))


def test_config_file_replays_the_run(synth, processed, tmp_path) -> None:
    # the first run's configuration (log folders are named by start time)
    saved = sorted((processed["out"] / f"sub-{synth.participants[0]}" / "log").glob(
        "*/spineqprep.toml"))[0]
    out = tmp_path / "replay"
    code = main([str(synth.raw_dir), str(out), "participant", "--config-file", str(saved),
                 "--participant-label", synth.participants[1]])
    assert code == 0
    assert list(out.rglob("*_T2map.nii.gz"))


# ---- bad input ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A dataset where sub-01 is fine and each other subject has one typical mistake."""
    root = tmp_path_factory.mktemp("broken")
    res = generate_dataset(root / "bids", n_subjects=6, n_sites=1, seed=3)
    anat = {s: res.raw_dir / f"sub-{s}" / "anat" for s in res.participants}
    # sub-02: a spin-lock sidecar without SpinLockTime
    side = anat["02"] / "sub-02_acq-mapss_tsl-2_MESL.json"
    meta = json.loads(side.read_text())
    del meta["SpinLockTime"]
    side.write_text(json.dumps(meta))
    # sub-03: a single echo left in the T2 series
    for path in anat["03"].glob("*_echo-[2-9]_MESE.*"):
        path.unlink()
    # sub-04: one echo on a different grid
    path = anat["04"] / "sub-04_acq-mapss_echo-3_MESE.nii.gz"
    img = nib.load(path)
    nib.Nifti1Image(np.asanyarray(img.dataobj)[:-4], img.affine, img.header).to_filename(path)
    # sub-05: a truncated NIfTI
    path = anat["05"] / "sub-05_acq-ute_echo-2_MEGRE.nii.gz"
    path.write_bytes(path.read_bytes()[:2000])
    # sub-06: an echo time in milliseconds
    side = anat["06"] / "sub-06_acq-ute_echo-4_MEGRE.json"
    meta = json.loads(side.read_text())
    meta["EchoTime"] = meta["EchoTime"] * 1000
    side.write_text(json.dumps(meta))
    return res


def test_bad_input_fails_only_its_subject(broken, tmp_path, capsys) -> None:
    before = tree_digest(broken.raw_dir)
    out = tmp_path / "out"
    code = main([str(broken.raw_dir), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--no-registration"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "5 of 6 participant(s) failed" in err
    expectations = {
        "02": ("sub-02_acq-mapss_tsl-2_MESL.json", "SpinLockTime"),
        "03": ("MESE", "1 echo"),
        "04": ("sub-04_acq-mapss_echo-3_MESE.nii.gz", "shape"),
        "05": ("sub-05_acq-ute_echo-2_MEGRE.nii.gz", "truncated"),
        "06": ("sub-06_acq-ute_echo-4_MEGRE.json", "0.0"),
    }
    blocks = re.split(r"\n(?=  sub-)", err)
    for subject, (name, word) in expectations.items():
        mine = "\n".join(b for b in blocks if b.startswith(f"  sub-{subject}"))
        assert name in mine and word.lower() in mine.lower(), (subject, mine)
        assert not (out / f"sub-{subject}" / "anat").exists()
    assert len(list((out / "sub-01" / "anat").glob("*_T2map.nii.gz"))) == 1
    assert tree_digest(broken.raw_dir) == before


def test_failure_inside_the_workflow_is_isolated(broken, tmp_path, capsys, monkeypatch) -> None:
    """With the input checks disabled, a truncated file fails in the fitting step: that subject
    gets a crash file and no derivatives; the other subject is published."""
    monkeypatch.setattr("spineqprep.cli.participant.check_series", lambda series: [])
    out = tmp_path / "out"
    code = main([str(broken.raw_dir), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--skip-bids-validation", "--participant-label", "01", "05",
                 "--no-registration"])
    err = capsys.readouterr().err
    assert code == 1
    assert "sub-05" in err and "sub-05_acq-ute_echo-2_MEGRE.nii.gz" in err
    assert "Traceback" not in err
    assert not (out / "sub-05" / "anat").exists()
    assert list((out / "sub-05" / "log").glob("*/crash-*.txt"))
    assert len(list((out / "sub-01" / "anat").glob("*fit_*.nii.gz"))) == 9  # S0, R2, mask x 3


@pytest.mark.parametrize("args, message", [
    (["--participant-label", "99"], "99"),
    (["--session-label", "zz"], "zz"),
])
def test_unknown_labels(broken, tmp_path, capsys, args, message) -> None:
    code = main([str(broken.raw_dir), str(tmp_path / "out"), "participant", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_stop_on_first_crash(broken, tmp_path, capsys) -> None:
    code = main([str(broken.raw_dir), str(tmp_path / "out"), "participant",
                 "--stop-on-first-crash", "-w", str(tmp_path / "w")])
    assert code == 1
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_copy_of_dataset_with_derivatives_reused(synth, processed, tmp_path) -> None:
    """``-d`` reuses maps of an earlier run instead of fitting."""
    subject = synth.participants[0]
    out = tmp_path / "out"
    work = tmp_path / "w"
    code = main([str(synth.raw_dir), str(out), "participant", "-w", str(work),
                 "--participant-label", subject, "-d", str(processed["out"]),
                 "--skip-bids-validation"])
    assert code == 0
    assert not list(work.rglob("result_fit.pklz"))
    for rel, _ in expected_maps(synth.raw_dir):
        if rel.parts[0] == f"sub-{subject}":
            assert (out / rel).read_bytes() == (processed["out"] / rel).read_bytes()
    shutil.rmtree(out)


# ---- segmentation and region statistics ----------------------------------------------------

def test_manual_masks_from_derivatives_give_region_statistics(synth, processed, tmp_path) -> None:
    """``-d`` with a derivatives dataset of manual labels (here: the truth's label maps) uses
    them instead of the network; the region tables equal the statistics computed directly."""
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(synth.truth_dir / "dseg.tsv", manual / "dseg.tsv")
    (manual / "dataset_description.json").write_text(json.dumps(
        {"Name": "manual", "BIDSVersion": "1.10.1", "DatasetType": "derivative"}))
    subject = synth.participants[1]
    for path in (synth.truth_dir / f"sub-{subject}").rglob("*_dseg.nii.gz"):
        if "_desc-" not in path.name:
            target = manual / path.relative_to(synth.truth_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    out = tmp_path / "out"
    code = main([str(synth.raw_dir), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--participant-label", subject, "-d", str(manual), "--skip-bids-validation",
                 "--no-registration"])
    assert code == 0
    tables = sorted(out.rglob("*_desc-regions_*.tsv"))
    assert len(tables) == 4  # T2 and T1rho of both sessions (UTE is not segmented)
    for path in tables:
        suffix = path.stem.split("_")[-1]
        stem = path.name.split("_desc-regions_")[0]
        table = pd.read_csv(path, sep="\t")
        values = nib.load(path.with_name(f"{stem}_{suffix}.nii.gz")).get_fdata()
        valid = np.asarray(nib.load(path.with_name(
            f"{stem}_desc-{DESC[suffix]}_mask.nii.gz")).dataobj) > 0
        labels = np.asarray(nib.load(manual / path.relative_to(out).parent /
                                     f"{stem}_dseg.nii.gz").dataobj)
        l4l5 = table.set_index("region").loc["L4L5"]
        inside = (labels == 123) & valid
        low, high = json.loads(path.with_suffix(".json").read_text())["InclusionRange"]
        assert (low, high) == INCLUSION_RANGES[suffix]
        kept = inside & (values > low) & (values < high)
        assert l4l5["n_valid"] == inside.sum() and l4l5["n_included"] == kept.sum()
        assert l4l5["mean"] == pytest.approx(values[kept].mean(), rel=1e-5)
        assert {"L1L2", "L5S1", "L3", "S1"} <= set(table["region"])
    assert check_derivatives(out) == []
    assert not run_bids_validator(out).errors


def test_network_segmentation_against_the_truth(synth, processed) -> None:
    """Every mapping grid and sagittal T2w (with its T1w) is segmented with labelled levels;
    per-level Dice against the truth, and disc means of the maps from predicted vs true
    masks."""
    from spineqprep.metrics.agreement import bland_altman
    from spineqprep.metrics.evaluate import evaluate_datasets

    out = processed["out"]
    dsegs = sorted(p for p in out.rglob("*_dseg.nii.gz") if "_desc-" not in p.name)
    # one per mapping grid (MESE and MESL of one acq share it) and per sagittal T2w
    grids = {(p.parent, p.name.split("_acq-")[0], p.name.split("_acq-")[1].split("_")[0])
             for p in synth.raw_dir.rglob("*_MES[EL].nii.gz")}
    assert len(dsegs) == len(grids) + 6
    # the sagittal T2w is segmented together with the T1w on its grid
    for path in (p for p in dsegs if "_acq-sag_" in p.name):
        sources = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())[
            "Sources"]
        assert [s.rsplit("_", 1)[-1] for s in sources] == ["T2w.nii.gz", "T1w.nii.gz"], sources
    # the methods text says so for those, and only for those
    lines = [line for line in (out / "logs" / "CITATION.md").read_text().splitlines()
             if "2D U-Net" in line]
    assert len(lines) == len(dsegs)
    assert all(("averaged on the grid" in line) == ("_T1w.nii.gz" in line) for line in lines)
    table = evaluate_datasets(out, synth.truth_dir, labels=["L1L2", "L2L3", "L3L4", "L4L5",
                                                            "L5S1", "L1", "L2", "L3", "L4", "L5"])
    assert len(table) == len(dsegs) * 10
    dice = table["dice"].to_numpy()
    # measured 0.85-0.87 before the generator's discs became deformations of a canonical disc
    # (issue 4), 0.83 after: a regression guard; the issue's 0.93 per level is not met yet
    assert np.median(dice) >= 0.8, table.groupby("level")["dice"].median()
    confident = [json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())[
        "LevelsConfident"] for p in dsegs]
    # measured 0.50 with the synthetic-only model, 0.43 after the real-data fine-tuning on this
    # dataset (0.58 -> 0.67 on the benchmark's held-out set): a guard, not the issue's 98 %
    assert np.mean(confident) >= 0.4
    # disc means (ms) of the fitted maps over predicted vs true masks
    pred, true = [], []
    for path in sorted(out.rglob("*_desc-regions_*.tsv")):
        stem, suffix = path.name.split("_desc-regions_")[0], path.stem.split("_")[-1]
        values = nib.load(path.with_name(f"{stem}_{suffix}.nii.gz")).get_fdata()
        labels = np.asarray(nib.load(synth.truth_dir / path.relative_to(out).parent /
                                     f"{stem}_dseg.nii.gz").dataobj)
        ours = pd.read_csv(path, sep="\t").set_index("region")
        # the level check of the segmentation travels with the region table
        seg_meta = json.loads((path.parent / f"{stem}_dseg.json").read_text())
        table_meta = json.loads(path.with_suffix(".json").read_text())
        assert table_meta["LevelsConfident"] == seg_meta["LevelsConfident"]
        assert table_meta["LevelFlags"] == seg_meta["LevelFlags"]
        for level, index in zip(("L1L2", "L2L3", "L3L4", "L4L5", "L5S1"), range(120, 125),
                                strict=True):
            if level in ours.index and (labels == index).sum() > 20:
                pred.append(ours.loc[level, "mean"] * 1e3)
                true.append(values[labels == index].mean() * 1e3)
    agreement = bland_altman(np.array(pred), np.array(true))
    print("per-level Dice", table.groupby("level")["dice"].median().round(3).to_dict(),
          "confident", np.mean(confident), "Bland-Altman (ms)", agreement)
    assert agreement["n"] >= 30
    assert abs(agreement["bias"]) < 5.0, agreement


def test_endplates_on_every_ute_series(synth, processed) -> None:
    """The four endplates on each first UTE echo (crop from the session's T2w L5), with their
    T2* per endplate; Dice against the truth on the small test grid (0.73-0.89 mm pixels)."""
    from spineqprep.metrics import dice

    out = processed["out"]
    utes = sorted(synth.raw_dir.rglob("*_acq-ute_echo-1_MEGRE.nii.gz"))
    assert len(utes) == 6
    scores, pred_ms, true_ms = [], [], []
    for ute in utes:
        rel = ute.parent.relative_to(synth.raw_dir)
        stem = ute.name.removesuffix("_echo-1_MEGRE.nii.gz")
        dseg = out / rel / f"{stem}_desc-endplates_dseg.nii.gz"
        meta = json.loads(dseg.with_suffix("").with_suffix(".json").read_text())
        assert set(meta["Cutoffs"]) == {"L4L5_superior", "L4L5_inferior", "L5S1_superior",
                                        "L5S1_inferior"}
        for label in ("L4L5superior", "L4L5inferior", "L5S1superior", "L5S1inferior"):
            assert (out / rel / f"{stem}_label-{label}_probseg.nii.gz").exists()
        pred = np.asarray(nib.load(dseg).dataobj)
        ref = np.asarray(nib.load(synth.truth_dir / rel /
                                  f"{stem}_desc-tissues_dseg.nii.gz").dataobj)
        scores += [dice(pred == i, ref == i) for i in (423, 523, 424, 524)]
        table = pd.read_csv(out / rel / f"{stem}_desc-endplates_T2starmap.tsv", sep="\t",
                            na_values="n/a").set_index("index")
        t2s = nib.load(out / rel / f"{stem}_T2starmap.nii.gz").get_fdata()
        valid = np.asarray(nib.load(out / rel / f"{stem}_desc-T2starfit_mask.nii.gz").dataobj) > 0
        for i in (423, 523, 424, 524):
            found = i in table.index and np.isfinite(table.loc[i, "mean"])
            if found and (valid & (ref == i)).any():
                pred_ms.append(table.loc[i, "mean"] * 1e3)
                true_ms.append(t2s[valid & (ref == i)].mean() * 1e3)
    print("endplate Dice", np.round(scores, 3), "T2* pred - true (ms)",
          np.round(np.subtract(pred_ms, true_ms), 2))
    assert np.median(scores) >= 0.6, scores
    assert len(pred_ms) >= 18
    assert abs(np.mean(np.subtract(pred_ms, true_ms))) < 1.5


def test_app_runs_in_a_process_that_has_run_torch(tmp_path) -> None:
    """Called from a process whose torch thread pool has run (a notebook, a test session):
    the workflow's workers start from a forkserver. Forked from such a process, the first
    worker to load the network hung for ever (seen when this suite ran in another order)."""
    res = generate_dataset(tmp_path / "bids", n_subjects=1, n_sites=1, seed=5, size="small")
    args = [str(res.raw_dir), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
            "--no-registration", "--nprocs", "2"]
    script = ("import sys, torch\n"
              "torch.set_num_threads(2)\n"
              "(torch.rand(4_000_000) * 2).sum(); torch.ones(512, 512) @ torch.ones(512, 512)\n"
              "from spineqprep.cli.run import main\n"
              f"sys.exit(main({args!r}))\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=900, env=env)  # a hang fails here, not the whole suite
    assert proc.returncode == 0, proc.stderr[-3000:]
    anat = tmp_path / "out" / "sub-01" / "anat"
    for name in ("sub-01_acq-sag_dseg.nii.gz", "sub-01_acq-mapss_dseg.nii.gz",
                 "sub-01_acq-mapss_T2map.nii.gz"):
        assert (anat / name).is_file(), name


# ---- precomputed masks in any numbering ------------------------------------------------------

def _manual_dataset(root: Path, name: str) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": name, "BIDSVersion": "1.10.1", "DatasetType": "derivative"}))
    return root


def _write_mask(data: np.ndarray, like: Path, path: Path, rows: dict[int, str]) -> None:
    """A label image on the grid of ``like`` and its per-image table (index, name only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data.astype(np.uint16), nib.load(like).affine).to_filename(path)
    pd.DataFrame({"index": list(rows), "name": list(rows.values())}).to_csv(
        path.with_name(path.name.replace(".nii.gz", ".tsv")), sep="\t", index=False)


def _endplates(truth_anat: Path, stem: str) -> np.ndarray:
    """The four L4-L5 / L5-S1 cartilage endplates of the truth (423, 523, 424, 524)."""
    tissues = np.asarray(nib.load(truth_anat / f"{stem}_desc-tissues_dseg.nii.gz").dataobj)
    return np.where(np.isin(tissues, [423, 523, 424, 524]), tissues, 0)


@pytest.fixture(scope="module")
def manual_masks(tmp_path_factory):
    """Truth masks as a user would give them: once in the standard numbering with the standard
    table, once renumbered (L5 = 7) with index/name tables; plus subjects with bad tables."""
    root = tmp_path_factory.mktemp("manual")
    res = generate_dataset(root / "bids", n_subjects=4, n_sites=1, seed=5, size="small")
    standard = _manual_dataset(root / "standard", "standard")
    renumbered = _manual_dataset(root / "renumbered", "renumbered")
    table = pd.read_csv(res.truth_dir / "dseg.tsv", sep="\t")
    abbr = dict(zip(table["index"], table["abbreviation"], strict=True))
    ep_names = {"L4L5_superior": 423, "L4L5_inferior": 523, "superior cartilage endplate of "
                "disc L5-S1": 424, "l5s1INF": 524}
    for subject in ("01", "02", "03", "04"):
        truth = res.truth_dir / f"sub-{subject}" / "anat"
        for grid in ("sag", "mapss"):
            dseg = truth / f"sub-{subject}_acq-{grid}_dseg.nii.gz"
            data = np.asarray(nib.load(dseg).dataobj)
            labels = [int(v) for v in np.unique(data) if v]
            assert 24 in labels
            rel = Path(f"sub-{subject}") / "anat" / dseg.name
            if subject == "01":  # standard numbering, the network's own table
                (standard / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(dseg, standard / rel)
                table[table["index"].isin(labels)][["index", "name", "abbreviation"]].to_csv(
                    standard / rel.with_name(dseg.name.replace(".nii.gz", ".tsv")), sep="\t",
                    index=False)
            # renumbered: L5 = 7, the others 20, 21 ... in reverse order; names only
            new = {24: 7, **{v: 20 + i for i, v in enumerate(sorted(set(labels) - {24},
                                                                       reverse=True))}}
            names = {new[v]: (f"vertebral body {abbr[v]}" if v < 100 else abbr[v].lower())
                     for v in labels}
            if subject == "03" and grid == "mapss":
                names[new[123]] = "disc between L4 and L5"
            path = renumbered / rel
            _write_mask(np.vectorize(lambda v, new=new: new.get(int(v), 0))(data), dseg, path,
                        names)
            if subject == "04" and grid == "sag":
                path.with_name(path.name.replace(".nii.gz", ".tsv")).unlink()
        stem = f"sub-{subject}_acq-ute"
        if subject == "01":
            cep = _endplates(truth, stem)
            name = f"{stem}_desc-endplates_dseg.nii.gz"
            standard_rows = {v: k for k, v in {"L4L5sup": 423, "L4L5inf": 523, "L5S1sup": 424,
                                               "L5S1inf": 524}.items()}
            like = truth / f"{stem}_desc-tissues_dseg.nii.gz"
            _write_mask(cep, like, standard / "sub-01" / "anat" / name, standard_rows)
            _write_mask(np.select([cep == v for v in ep_names.values()], [1, 2, 3, 4]), like,
                        renumbered / "sub-01" / "anat" / name,
                        dict(zip([1, 2, 3, 4], ep_names, strict=True)))
    return {"res": res, "standard": standard, "renumbered": renumbered}


def test_renumbered_masks_with_index_and_name_give_the_standard_results(
        manual_masks, tmp_path, capsys) -> None:
    """A manual mask whose dseg.tsv has only index/name and its own numbering (L5 = 7) gives
    the region tables of the standard numbering; the renumbered locator still finds L5 for the
    endplate crop; a precomputed endplate mask replaces the endplate network; a table with an
    unknown name or no table fails only its participant, before any work, naming the file."""
    res = manual_masks["res"]
    out_std, out_new = tmp_path / "standard", tmp_path / "renumbered"
    code = main([str(res.raw_dir), str(out_std), "participant", "-w", str(tmp_path / "w1"),
                 "--participant-label", "01", "-d", str(manual_masks["standard"]),
                 "--skip-bids-validation", "--no-registration", "--nprocs", "2"])
    assert code == 0
    capsys.readouterr()
    work = tmp_path / "w2"
    code = main([str(res.raw_dir), str(out_new), "participant", "-w", str(work),
                 "-d", str(manual_masks["renumbered"]), "--skip-bids-validation",
                 "--no-registration", "--nprocs", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "2 of 4 participant(s) failed" in err and "report of" not in err
    blocks = re.split(r"\n(?=  sub-)", err)
    bad = "\n".join(b for b in blocks if b.startswith("  sub-03"))
    assert "sub-03_acq-mapss_dseg.tsv" in bad and "disc between L4 and L5" in bad
    assert "fix:" in bad and "L4L5" in bad
    missing = "\n".join(b for b in blocks if b.startswith("  sub-04"))
    assert "sub-04_acq-sag_dseg.nii.gz" in missing and "look-up table" in missing
    for subject in ("03", "04"):  # stopped before any work
        assert not (out_new / f"sub-{subject}" / "anat").exists()
        assert not list(work.glob(f"spineqprep_wf/sub_{subject}_wf"))

    anat_std, anat_new = out_std / "sub-01" / "anat", out_new / "sub-01" / "anat"
    tables = sorted(p.name for p in anat_std.glob("*_desc-*_*.tsv") if "dseg" not in p.name)
    assert len(tables) == 3  # regions of T2 and T1rho, endplate T2*
    for name in tables:
        pd.testing.assert_frame_equal(pd.read_csv(anat_new / name, sep="\t"),
                                      pd.read_csv(anat_std / name, sep="\t"))
    regions = pd.read_csv(anat_new / "sub-01_acq-mapss_desc-regions_T2map.tsv", sep="\t")
    assert {"L5", "L4L5", "S1"} <= set(regions["region"])
    assert regions.set_index("region").loc["L5", "index"] == 24
    for grid in ("sag", "mapss"):  # the published segmentation is in the standard numbering
        stem = f"sub-01_acq-{grid}_dseg"
        assert np.array_equal(np.asarray(nib.load(anat_new / f"{stem}.nii.gz").dataobj),
                              np.asarray(nib.load(anat_std / f"{stem}.nii.gz").dataobj))
        assert (anat_new / f"{stem}.tsv").read_text() == (anat_std / f"{stem}.tsv").read_text()

    # the endplate mask was used: provenance, no network, no probability maps
    meta = json.loads((anat_new / "sub-01_acq-ute_desc-endplates_dseg.json").read_text())
    assert "--derivatives" in meta["Description"] and "Model" not in meta
    given = manual_masks["renumbered"] / "sub-01" / "anat"
    assert str(given / "sub-01_acq-ute_desc-endplates_dseg.nii.gz") in meta["Sources"]
    assert str(given / "sub-01_acq-ute_desc-endplates_dseg.tsv") in meta["Sources"]
    assert meta["Levels"] == {"L4L5sup": 423, "L5S1sup": 424, "L4L5inf": 523, "L5S1inf": 524}
    assert not list(anat_new.glob("*_acq-ute_label-*_probseg.nii.gz"))
    assert not list(work.glob("spineqprep_wf/sub_01_wf/endplates_acq_ute_wf/segment"))
    assert np.array_equal(
        np.asarray(nib.load(anat_new / "sub-01_acq-ute_desc-endplates_dseg.nii.gz").dataobj),
        _endplates(res.truth_dir / "sub-01" / "anat", "sub-01_acq-ute"))

    # sub-02 (renumbered locator, no endplate mask): the network's crop centres on the true L5
    from spineqprep.segmentation.localise import l5_crop_box

    anat = "sub-02/anat/sub-02_acq-"
    meta = json.loads((out_new / f"{anat}ute_desc-endplates_dseg.json").read_text())
    box = l5_crop_box(nib.load(res.truth_dir / f"{anat}sag_dseg.nii.gz"),
                      nib.load(res.raw_dir / f"{anat}ute_echo-1_MEGRE.nii.gz"))
    assert (meta["CropStart"], meta["CropStop"]) == (list(box.start), list(box.stop))
    assert not any("not segmented" in flag for flag in meta["Flags"])
    assert check_derivatives(out_new) == []


def test_a_t1w_joins_the_t2w_only_on_its_slices(tmp_path) -> None:
    """A T1w is segmented with the T2w when it lies on the T2w's sagittal slices, whatever its
    in-plane pixels and field of view; not when a slice is moved or tilted; an unreadable
    image shares none (its own node reports it)."""
    from spineqprep.cli.participant import _shares_slices

    affine = np.diag([4.0, 0.8, 0.8, 1.0])
    angle = np.deg2rad(2.0)  # the slice planes turned about AP by 2 degrees
    tilt = np.eye(4)
    tilt[np.ix_([0, 2], [0, 2])] = [[np.cos(angle), np.sin(angle)],
                                    [-np.sin(angle), np.cos(angle)]]
    paths = {}
    finer = affine @ np.diag([1, 0.8, 0.8, 1])
    finer[:3, 3] = [0.0, -5.0, 3.0]
    for name, shape, aff in (("t2", (5, 40, 40), affine), ("t1", (5, 40, 40), affine),
                             ("finer", (5, 52, 48), finer),
                             ("fewer", (3, 40, 40), affine @ _shifted(1)),
                             ("moved", (5, 40, 40), affine @ _shifted(0.5)),
                             ("tilted", (5, 40, 40), tilt @ affine)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), aff), paths[name])
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti")
    assert _shares_slices(paths["t2"], paths["t1"])
    assert _shares_slices(paths["t2"], paths["finer"])
    assert not _shares_slices(paths["t2"], paths["fewer"])  # two T2w slices it lacks
    assert not _shares_slices(paths["t2"], paths["moved"])  # half a slice over
    assert not _shares_slices(paths["t2"], paths["tilted"])
    assert not _shares_slices(paths["t2"], tmp_path / "corrupt.nii.gz")


def _shifted(slices: float) -> np.ndarray:
    """A voxel-to-voxel shift of ``slices`` along the first (sagittal) axis."""
    out = np.eye(4)
    out[0, 3] = slices
    return out



def test_plan_pairs_a_t1w_on_the_t2w_slices(synth, tmp_path) -> None:
    """The plan segments a T2w with every T1w of its session on its slices, whatever their
    ``acq`` or matrix (each T1w of another ``acq`` still gets its own segmentation); a T1w off
    the slices joins nothing."""
    from spineqprep.cli.participant import _plan_subject
    from spineqprep.config import RunConfig
    from spineqprep.segmentation.infer import sagittal_axis

    raw = tmp_path / "raw"
    shutil.copytree(synth.raw_dir, raw)
    t1w = sorted(raw.glob("sub-01/ses-*/anat/*_acq-sag_T1w.nii.gz"))[0]
    session = t1w.name.split("_ses-")[1].split("_")[0]
    img = nib.load(t1w)
    axis = sagittal_axis(img.affine)
    finer = img.affine @ np.diag([*np.where(np.arange(3) == axis, 1.0, 0.8), 1.0])
    matrix = np.where(np.arange(3) == axis, img.shape, 120)  # another matrix and field of view
    moved = img.affine.copy()
    moved[:3, 3] += img.affine[:3, axis] * 0.5  # half a slice over
    for acq, shape, affine in (("hires", tuple(matrix), finer), ("moved", img.shape, moved)):
        path = t1w.with_name(t1w.name.replace("acq-sag", f"acq-{acq}"))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine) if acq == "moved" else
                 nib.Nifti1Image(np.zeros(shape, np.float32), affine), path)
        shutil.copy(t1w.with_suffix("").with_suffix(".json"),
                    path.with_suffix("").with_suffix(".json"))
    config = RunConfig(bids_dir=raw, output_dir=tmp_path / "out",
                       analysis_level="participant", work_dir=tmp_path / "work")
    plan = _plan_subject(config, "01")
    paired = plan.same_slices[(session, "sag")]
    assert sorted(p.name for p in paired) == sorted(
        [t1w.name, t1w.name.replace("acq-sag", "acq-hires")])
    assert plan.segment[(session, "sag")].name.endswith("_T2w.nii.gz")
    assert {(session, "hires"), (session, "moved")} <= set(plan.segment)
    assert not any("acq-moved" in p.name for ps in plan.same_slices.values() for p in ps)
