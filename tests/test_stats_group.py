"""End to end: simulated atlas-space derivatives -> ``spineqprep ... group`` -> statistic maps,
tables and report; planted regions recovered, nothing found where nothing was planted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from spineqprep.cli.run import main
from spineqprep.stats.model import load_model
from spineqprep.synth.groupmaps import GroupMapsSpec, generate_group_maps

PERMS = "200"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("groupstats")
    truth = generate_group_maps(root / "raw", root / "out",
                                GroupMapsSpec(n_subjects=40, n_sites=2, n_sessions=2, seed=3))
    code = main([str(root / "raw"), str(root / "out"), "group", "-w", str(root / "work"),
                 "--group-permutations", PERMS, "--random-seed", "5", "--nprocs", "1"])
    return {"root": root, "truth": truth, "code": code, "out": root / "out"}


def _map(out: Path, analysis: str, level: str, acq: str, desc: str, contrast: str,
         stat: str) -> np.ndarray:
    path = (out / "group" / analysis / f"{analysis}_space-SpineDisc{level}_acq-{acq}_desc-{desc}"
            f"_contrast-{contrast}_stat-{stat}_statmap.nii.gz")
    return np.asarray(nib.load(path).get_fdata())


def _recovery(p: np.ndarray, disc: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity) of P < 0.05 within the disc against the true-effect mask."""
    significant = np.nan_to_num(p[disc], nan=1.0) < 0.05
    return (significant[truth].mean(), 1 - significant[~truth].mean())


def test_group_level_writes_every_analysis(study) -> None:
    assert study["code"] == 0
    out = study["out"]
    table = pd.read_csv(out / "group" / "desc-voxelwise_statistics.tsv", sep="\t")
    assert set(table["kind"]) == {"variable", "group", "map", "time"}
    assert set(table["map"]) == {"T1rho", "T2map"}
    prefix = "corrodi_space-SpineDiscL4L5_acq-mapss_desc-T1rho_contrast-odi"
    for stat in ("effect", "t", "r", "p", "pfdr", "pbonferroni", "pfwe", "tfce", "ptfce",
                 "pcluster", "meanall", "sdall", "n"):
        assert (out / "group" / "corrodi" / f"{prefix}_stat-{stat}_statmap.nii.gz").exists()
    meta = json.loads((out / "group" / "corrodi" / f"{prefix}_stat-pfwe_statmap.json")
                      .read_text())
    assert meta["Permutation"]["Count"] == int(PERMS)
    assert meta["Permutation"]["Scheme"] == "Freedman-Lane"
    assert meta["Test"] == "t, two-sided"
    assert "site[B]" in meta["DesignColumns"]
    # sub-001's T1rho failed registration QC, sub-003 has no BMI (a default covariate) and
    # sub-004 no ODI: out of this analysis only
    reasons = {e["participant_id"]: e["reason"] for e in meta["Excluded"]}
    assert reasons["sub-001"].startswith("RegistrationQC failed")
    assert reasons["sub-003"] == "missing bmi"
    assert reasons["sub-004"] == "missing odi"
    assert meta["NSubjects"] == 37 and len(meta["Subjects"]) == 37
    t2meta = json.loads((out / "group" / "corrodi" / prefix.replace("mapss", "mese").replace(
        "T1rho", "T2map") .__add__("_stat-t_statmap.json")).read_text())
    assert "sub-001" not in {e["participant_id"] for e in t2meta["Excluded"]}
    subjects = pd.read_csv(out / "group" / "corrodi" / "corrodi_subjects.tsv", sep="\t")
    assert subjects["used"].sum() == 37 + 38
    clusters = pd.read_csv(out / "group" / "corrodi" / f"{prefix}_clusters.tsv", sep="\t")
    assert len(clusters) >= 1 and clusters.loc[0, "p_fwe_cluster"] < 0.05
    assert clusters.loc[0, "sign"] == "-"  # T1rho falls with ODI
    model = load_model(next((out / "group").glob("model-*_smdl.json")))
    assert {a.kind for a in model.analyses} == {"variable", "group", "map", "time"}
    html = (out / "group.html").read_text()
    assert "voxel-by-variable" in html and "voxel-by-time" in html
    assert "Whole-disc ROI mean" in html
    figures = list((out / "group" / "figures").glob("*_stat-t.png"))
    assert len(figures) == len(table)


def test_planted_regions_are_recovered_at_fwe(study) -> None:
    out, truth = study["out"], study["truth"]
    disc = truth.disc
    checks = {
        "odi (max-T)": (_map(out, "corrodi", "L4L5", "mapss", "T1rho", "odi", "pfwe"),
                        truth.truth["odi"]),
        "odi (TFCE)": (_map(out, "corrodi", "L4L5", "mapss", "T1rho", "odi", "ptfce"),
                       truth.truth["odi"]),
        "odi > 40 (TFCE)": (_map(out, "compareodi", "L4L5", "mapss", "T1rho", "odi", "ptfce"),
                            truth.truth["odi"]),
        "T1rho-T2 (TFCE)": (_map(out, "coupleT1rhoT2map", "L4L5", "mapss", "T1rho", "T2map",
                                 "ptfce"), truth.truth["coupling"]),
        "ODI change (max-T)": (_map(out, "changeodi", "L4L5", "mapss", "T1rho", "odi", "pfwe"),
                               truth.truth["change"]),
    }
    for name, (p, mask) in checks.items():
        sensitivity, specificity = _recovery(p, disc, mask)
        print(f"{name}: sensitivity {sensitivity:.2f}, specificity {specificity:.3f}")
        assert specificity >= 0.95, name
        assert sensitivity >= 0.5, name
    # whole-disc ROI means wash the local ODI effect out; the voxel-wise map does not
    row = pd.read_csv(out / "group" / "desc-voxelwise_statistics.tsv", sep="\t").query(
        "analysis == 'corrodi' and map == 'T1rho'").iloc[0]
    assert row["roi_p"] > 0.05 and row["n_fwe"] > 0
    # T2 has no ODI association: nothing survives FWE
    assert np.nanmin(_map(out, "corrodi", "L4L5", "mese", "T2map", "odi", "pfwe")) >= 0.05


def test_rerun_is_identical_and_combat_reduces_the_site_effect(study, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(study["out"], out, ignore=shutil.ignore_patterns("group"))
    model = {
        "Name": "odi", "BIDSModelVersion": "1.0.0",
        "Nodes": [{"Level": "Dataset", "Name": "odi",
                   "Model": {"Type": "glm", "X": [1, "odi", "age"]},
                   "Contrasts": [{"Name": "odi", "ConditionList": ["odi"], "Weights": [1],
                                  "Test": "t"}],
                   "spineqprep": {"Analysis": "variable", "Maps": ["T1rho"], "Site": "combat"}}],
        "spineqprep": {"Permutations": int(PERMS), "Seed": 5, "TFCE": False},
    }
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    raw = study["root"] / "raw"
    assert main([str(raw), str(out), "group", "-w", str(tmp_path / "w"), "--group-model",
                 str(path)]) == 0
    table = pd.read_csv(out / "group" / "desc-voxelwise_statistics.tsv", sep="\t")
    assert list(table["analysis"]) == ["odi"]
    row = table.iloc[0]
    assert row["site_eta2_after"] < 0.5 * row["site_eta2_before"]
    first = _map(out, "odi", "L4L5", "mapss", "T1rho", "odi", "pfwe")
    assert main([str(raw), str(out), "group", "-w", str(tmp_path / "w"), "--group-model",
                 str(path)]) == 0
    np.testing.assert_array_equal(first, _map(out, "odi", "L4L5", "mapss", "T1rho", "odi",
                                              "pfwe"))


def test_null_study_finds_nothing(tmp_path) -> None:
    generate_group_maps(tmp_path / "raw", tmp_path / "out",
                        GroupMapsSpec(n_subjects=30, seed=8, null=True))
    assert main([str(tmp_path / "raw"), str(tmp_path / "out"), "group", "-w",
                 str(tmp_path / "w"), "--group-correlate", "odi", "--group-permutations", PERMS,
                 "--group-no-tfce"]) == 0
    table = pd.read_csv(tmp_path / "out" / "group" / "desc-voxelwise_statistics.tsv", sep="\t")
    assert (table["n_fwe"] == 0).all()


def test_without_atlas_maps_the_group_level_says_so(tmp_path, capsys) -> None:
    generate_group_maps(tmp_path / "raw", tmp_path / "out", GroupMapsSpec(n_subjects=4))
    for path in (tmp_path / "out").rglob("*_space-*"):
        path.unlink()
    args = [str(tmp_path / "raw"), str(tmp_path / "out"), "group", "-w", str(tmp_path / "w")]
    assert main(args) == 2  # no maps at all: the usual error
    assert "no participant-level maps" in capsys.readouterr().err
    native = tmp_path / "out" / "sub-001" / "anat" / "sub-001_acq-mese_T2map.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), 0.08, dtype=np.float32), np.eye(4)), native)
    assert main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "voxel-wise" in ln]
    assert len(lines) == 1 and "skipped" in lines[0]
    assert (tmp_path / "out" / "group" / "desc-summary_maps.tsv").exists()
    assert "No voxel-wise statistics" in (tmp_path / "out" / "group.html").read_text()


def test_bad_model_is_a_usage_error(tmp_path, capsys) -> None:
    generate_group_maps(tmp_path / "raw", tmp_path / "out", GroupMapsSpec(n_subjects=12))
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"Nodes": [{"Name": "x", "Model": {"X": [1, "nosuch"]},
                                           "Contrasts": [{"ConditionList": ["nosuch"],
                                                          "Weights": [1]}]}]}))
    code = main([str(tmp_path / "raw"), str(tmp_path / "out"), "group", "-w",
                 str(tmp_path / "w"), "--group-model", str(path)])
    assert code == 2
    assert "no column 'nosuch'" in capsys.readouterr().err


def test_acquisitions_of_one_quantity_are_pooled(study, tmp_path) -> None:
    """Sites run their own protocols: half the subjects' T1rho maps under another acq label
    still enter one analysis (named without acq), each subject once, the acq recorded."""
    out = tmp_path / "out"
    shutil.copytree(study["out"], out, ignore=shutil.ignore_patterns("group"))
    subjects = sorted(p.name for p in out.glob("sub-*") if p.is_dir())
    for sub in subjects[::2]:
        for path in (out / sub).rglob("*_acq-mapss_*"):
            path.rename(path.with_name(path.name.replace("_acq-mapss_", "_acq-fse_")))
    raw = study["root"] / "raw"
    assert main([str(raw), str(out), "group", "-w", str(tmp_path / "w"), "--group-correlate",
                 "odi", "--group-no-tfce", "--group-permutations", "50"]) == 0
    stat = next((out / "group" / "corrodi").glob(
        "corrodi_space-SpineDiscL4L5_desc-T1rho_contrast-odi_stat-t_statmap.json"))
    sidecar = json.loads(stat.read_text())
    assert sidecar["Acquisition"] == ["fse", "mapss"]
    used = pd.read_csv(out / "group" / "corrodi" / "corrodi_subjects.tsv", sep="\t").query(
        "used and level == 'L4L5' and map == 'T1rho'")
    assert set(used["acq"]) == {"fse", "mapss"}
    assert used["participant_id"].is_unique and len(used) == sidecar["NSubjects"]
    assert sidecar["NSubjects"] >= 0.8 * len(subjects)


def _atlas_map(out: Path, sub: str, ses: str | None, value: float, *extra: str) -> Path:
    """A hand-made L4L5 T2map in atlas space; ``extra`` entities (e.g. ``label-warped``, what
    ``--warp both`` gives the warped native maps) go before ``space``."""
    parts = [sub] + ([ses] if ses else [])
    name = "_".join([*parts, "acq-mese", *extra, "space-SpineDiscL4L5", "T2map.nii.gz"])
    path = out.joinpath(*parts, "anat", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 2), value, dtype=np.float32), np.eye(4)), path)
    path.with_name(name.replace(".nii.gz", ".json")).write_text(
        json.dumps({"RegistrationQC": {"Passed": True}}))
    return path


def test_warp_both_maps_are_not_mixed_and_time_pairs_distinct_sessions(tmp_path) -> None:
    """``--warp both`` writes a fitted and a warped copy of every map: the group level uses one
    kind, so a single-session subject is no fake longitudinal pair of the two copies."""
    from spineqprep.stats.run import _units, find_atlas_maps

    out = tmp_path / "out"
    fitted = {key: _atlas_map(out, *key, 0.08) for key in
              [("sub-01", None), ("sub-02", "ses-1"), ("sub-02", "ses-2")]}
    warped = {key: _atlas_map(out, *key, 0.09, "label-warped") for key in fitted}
    assert {m.path for m in find_atlas_maps(out)} == set(fitted.values())
    assert {m.path for m in find_atlas_maps(out, warped=True)} == set(warped.values())
    units, excluded = _units(find_atlas_maps(out), "time")
    assert excluded == [{"participant_id": "sub-01",
                         "reason": "only one session (no session entity)"}]
    assert list(units["participant_id"]) == ["sub-02"]
    assert (units.loc[0, "path"], units.loc[0, "path_last"]) == (
        fitted["sub-02", "ses-1"], fitted["sub-02", "ses-2"])
    units, excluded = _units(find_atlas_maps(out), "variable")
    assert list(units["participant_id"]) == ["sub-01", "sub-02"] and not excluded
    # two maps of one session (two runs) are no pair either
    for run in ("run-1", "run-2"):
        _atlas_map(out, "sub-03", "ses-1", 0.08, run)
    units, excluded = _units([m for m in find_atlas_maps(out) if m.participant_id == "sub-03"],
                             "time")
    assert units.empty and excluded[0]["reason"] == "only one session (ses-1)"


def test_group_warped_maps_option_analyses_the_warped_copies(tmp_path) -> None:
    """By default the maps fitted in atlas space enter, each subject once; with
    ``--group-warped-maps`` the ``label-warped`` ones (here 0.8 times the fitted values, inside
    the inclusion range). One session each: nobody enters the time analysis."""
    generate_group_maps(tmp_path / "raw", tmp_path / "out",
                        GroupMapsSpec(n_subjects=12, n_sites=1, seed=2, qc_fail=0))
    for path in list((tmp_path / "out").rglob("*_space-SpineDisc*_T1rho.*")):
        copy = path.with_name(path.name.replace("_space-", "_label-warped_space-"))
        if path.name.endswith(".json"):
            copy.write_text(path.read_text())
        else:
            img = nib.load(path)
            nib.save(nib.Nifti1Image(img.get_fdata(dtype=np.float32) * 0.8, img.affine), copy)
    means = []
    for extra in ([], ["--group-warped-maps"]):
        assert main([str(tmp_path / "raw"), str(tmp_path / "out"), "group", "-w",
                     str(tmp_path / "w"), "--group-correlate", "odi", "--group-longitudinal",
                     "--group-covariates", "--group-permutations", "20", "--group-no-tfce",
                     *extra]) == 0
        prefix = (tmp_path / "out" / "group" / "corrodi" /
                  "corrodi_space-SpineDiscL4L5_acq-mapss_desc-T1rho_contrast-odi_stat-")
        meta = json.loads(Path(f"{prefix}t_statmap.json").read_text())
        assert meta["Excluded"] == [{"participant_id": "sub-004", "reason": "missing odi"}]
        assert meta["NSubjects"] == 11 and len(set(meta["Subjects"])) == 11
        # Sources: the 11 maps analysed, of the kind asked for, each in the output dataset
        assert len(meta["Sources"]) == 11
        assert all(("_label-warped_" in uri) == bool(extra) for uri in meta["Sources"])
        assert all((tmp_path / "out" / uri.removeprefix("bids::")).is_file()
                   for uri in meta["Sources"])
        means.append(np.nanmean(nib.load(f"{prefix}meanall_statmap.nii.gz").get_fdata()))
        change = pd.read_csv(tmp_path / "out" / "group" / "change" / "change_subjects.tsv",
                             sep="\t")
        assert not change["used"].any()
        assert set(change["reason"]) == {"only one session (no session entity)"}
    assert means[1] == pytest.approx(0.8 * means[0], rel=1e-4)
