"""The synthetic dataset generator: naming, metadata, orientation, truth and planted effects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from spineqprep.bids.schema import load_schema
from spineqprep.bids.validate import check_dataset
from spineqprep.cli.synth import main
from spineqprep.errors import UsageError
from spineqprep.synth import generate_dataset
from spineqprep.synth import labels as lab
from spineqprep.synth.cohort import PLANTED_EFFECTS, sample_cohort

SCHEMA = load_schema()


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """The default dataset: 4 subjects, 2 sites, 1 session, small."""
    return generate_dataset(tmp_path_factory.mktemp("a") / "ds", seed=0)


@pytest.fixture(scope="module")
def longitudinal(tmp_path_factory):
    """3 sites (every protocol type), 2 sessions."""
    return generate_dataset(tmp_path_factory.mktemp("long") / "ds", n_subjects=3, n_sites=3,
                            n_sessions=2, seed=3)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


def _truth(res, rel: str) -> Path:
    return res.truth_dir / rel


# ---- files and metadata ------------------------------------------------------------------------
def test_deterministic(default, tmp_path):
    again = generate_dataset(tmp_path / "ds", seed=0)
    for first, second in ((default.raw_dir, again.raw_dir), (default.truth_dir, again.truth_dir)):
        a, b = _tree(first), _tree(second)
        assert a.keys() == b.keys()
        assert [k for k in a if a[k] != b[k]] == []
    other = generate_dataset(tmp_path / "other" / "ds", n_subjects=1, n_sites=1, seed=1)
    name = "sub-01/anat/sub-01_acq-sag_T1w.nii.gz"
    assert (other.raw_dir / name).read_bytes() != (default.raw_dir / name).read_bytes()


def test_names_follow_schema(default, longitudinal):
    suffixes = SCHEMA["raw"]["suffixes"]
    pattern = re.compile(
        r"^sub-(?P<sub>[A-Za-z0-9]+)/(?:ses-(?P<ses>[A-Za-z0-9]+)/)?anat/"
        r"sub-(?P=sub)(?:_ses-(?P=ses))?_acq-(?P<acq>[A-Za-z0-9]+)"
        r"(?:_(?P<key>echo|tsl)-(?P<index>[0-9]+))?_(?P<suffix>[A-Za-z0-9]+)\.(nii\.gz|json)$")
    for res in (default, longitudinal):
        names = [n for n in _tree(res.raw_dir) if n.startswith("sub-") and "/anat/" in n]
        assert names
        for name in names:
            m = pattern.match(name)
            assert m, name
            spec = suffixes[m["suffix"]]
            if spec["kind"] == "structural":
                assert m["acq"] == "sag" and m["key"] is None
            else:
                assert m["key"] == spec["index_entity"], name
            if res is longitudinal:
                assert m["ses"] in res.sessions
        for sub in res.participants:
            for sessions in (res.sessions or (None,)):
                folder = res.raw_dir / f"sub-{sub}" / (f"ses-{sessions}" if sessions else "")
                found = {p.name.split("_")[-1] for p in (folder / "anat").iterdir()}
                assert {"T1w.nii.gz", "T2w.nii.gz"} <= found
        assert check_dataset(res.raw_dir) == []


def test_dataset_files(default):
    raw = json.loads((default.raw_dir / "dataset_description.json").read_text())
    assert raw["DatasetType"] == "raw" and raw["BIDSVersion"] and raw["License"]
    assert raw["Authors"] and raw["Name"]
    truth = json.loads((default.truth_dir / "dataset_description.json").read_text())
    assert truth["DatasetType"] == "derivative"
    assert truth["GeneratedBy"][0]["Name"] == "spineqprep-synth"
    ignore = (default.raw_dir / ".bidsignore").read_text().splitlines()
    assert set(SCHEMA["raw"]["bidsignore"]) <= set(ignore)
    assert (default.raw_dir / "README").read_text().strip()
    # the truth is a separate dataset next to the raw one, never inside it
    assert default.truth_dir.parent == default.raw_dir.parent
    assert not any(p.name.endswith(("_T2map.nii.gz", "_dseg.nii.gz"))
                   for p in default.raw_dir.rglob("*"))


def test_sidecars(default, longitudinal):
    for res in (default, longitudinal):
        for path in res.raw_dir.rglob("sub-*_*.nii.gz"):
            meta = _sidecar(path)
            suffix = path.name.removesuffix(".nii.gz").split("_")[-1]
            for key in ("RepetitionTime", "MagneticFieldStrength", "Manufacturer",
                        "ManufacturersModelName", "SliceThickness", "InstitutionName"):
                assert key in meta, (path.name, key)
            spec = SCHEMA["raw"]["suffixes"][suffix]
            for key, rule in spec.get("required_metadata", {}).items():
                assert rule["min"] <= meta[key] <= rule["max"], (path.name, key)
            if suffix in ("MESE", "MEGRE"):
                assert meta["EchoTime"] > 0  # the official validator requires it
            header = nib.load(path).header
            assert header["sform_code"] == 1 and header["qform_code"] == 1
            assert np.isclose(header.get_zooms()[np.argmax(
                np.abs(nib.load(path).affine[0, :3]))], meta["SliceThickness"])
    times = [_sidecar(p)["SpinLockTime"] for p in
             sorted(default.raw_dir.glob("sub-01/anat/*_MESL.nii.gz"))]
    assert times == [0.0, 0.010, 0.040, 0.080]
    assert {_sidecar(p)["SpinLockFrequency"]
            for p in default.raw_dir.glob("sub-01/anat/*_MESL.nii.gz")} == {300.0}
    ute = [_sidecar(p)["EchoTime"] for p in
           sorted(default.raw_dir.glob("sub-01/anat/*_acq-ute_*_MEGRE.nii.gz"))]
    assert ute == [0.000248, 0.0052, 0.0102, 0.0152, 0.0202, 0.0252]


def test_orientation_and_storage_differ_between_sites(default, longitudinal):
    codes, dets, obliques, dtypes = {}, {}, {}, {}
    for res in (default, longitudinal):
        for sub, site in res.sites.items():
            for path in res.raw_dir.glob(f"sub-{sub}/**/*.nii.gz"):
                img = nib.load(path)
                codes.setdefault(site, set()).add(nib.aff2axcodes(img.affine))
                dets.setdefault(site, set()).add(bool(np.linalg.det(img.affine[:3, :3]) > 0))
                unit = img.affine[:3, :3] / nib.affines.voxel_sizes(img.affine)
                obliques.setdefault(site, []).append(np.degrees(np.arccos(
                    np.clip(np.abs(unit).max(axis=0).min(), -1, 1))))
                dtypes.setdefault(site, set()).add((img.get_data_dtype().name,
                                                    float(img.dataobj.slope)))
    assert codes["A"] != codes["B"] != codes["C"] and codes["A"] != codes["C"]
    assert dets["A"] == {True} and dets["B"] == {False}
    assert all(1.0 < np.median(v) < 8.0 for v in obliques.values())  # oblique by a few degrees
    assert dtypes["A"] == {("float32", 1.0)}
    assert dtypes["B"] == {("int16", 0.25)}


# ---- truth ---------------------------------------------------------------------------------
def test_truth_maps_realistic(default):
    tissues = {}
    for path in default.truth_dir.glob("sub-*/anat/*_desc-tissues_dseg.nii.gz"):
        labels = _load(path).astype(int)
        stem = path.name.replace("_desc-tissues_dseg.nii.gz", "")
        main_labels = _load(path.with_name(f"{stem}_dseg.nii.gz")).astype(int)
        assert np.array_equal(lab.main_labels(labels), main_labels)
        for suffix in ("T2map", "T1rho", "T2starmap", "PDmap"):
            map_path = path.with_name(f"{stem}_{suffix}.nii.gz")
            if map_path.exists():
                values = _load(map_path)
                assert values.shape == labels.shape
                assert np.all(values[labels == 0] == 0)
                for name, sel in (("nucleus", (labels >= 218) & (labels < 300)),
                                  ("annulus", (labels >= 318) & (labels < 400)),
                                  ("cep", (labels >= 418) & (labels < 600)),
                                  ("marrow", (labels >= 18) & (labels <= 26)),
                                  ("muscle", labels == lab.MUSCLE)):
                    tissues.setdefault((suffix, name), []).extend(values[sel].tolist())
    med = {k: float(np.median(v)) for k, v in tissues.items()}
    assert 0.060 < med["T2map", "nucleus"] < 0.130
    assert 0.040 < med["T2map", "annulus"] < 0.060
    assert 0.030 < med["T2map", "muscle"] < 0.040
    assert 0.070 < med["T1rho", "nucleus"] < 0.150
    assert med["T1rho", "annulus"] < med["T1rho", "nucleus"]
    assert 0.012 < med["T2starmap", "cep"] < 0.026
    assert np.min(tissues["T2starmap", "cep"]) > 0.006
    assert np.max(tissues["T2starmap", "cep"]) < 0.036
    assert med["T2starmap", "marrow"] < 0.012 < med["T2starmap", "nucleus"]
    assert 0.5 < med["PDmap", "nucleus"] <= 1.0
    rows = pd.read_csv(default.truth_dir / "dseg.tsv", sep="\t")
    assert {"index", "name", "abbreviation"} <= set(rows.columns)
    for path in default.truth_dir.glob("sub-*/anat/*dseg.nii.gz"):
        assert set(np.unique(_load(path)).astype(int)) - {0} <= set(rows["index"])


def test_truth_tables_match_maps(default):
    discs = pd.read_csv(default.truth_dir / "discs.tsv", sep="\t")
    assert len(discs) == 5 * len(default.participants)
    for sub in default.participants:
        tissues = next(default.truth_dir.glob(
            f"sub-{sub}/anat/*_acq-m*_desc-tissues_dseg.nii.gz"))
        stem = tissues.name.replace("_desc-tissues_dseg.nii.gz", "")
        suffix = "T1rho" if tissues.with_name(f"{stem}_T1rho.nii.gz").exists() else "T2map"
        column = "nucleus_t1rho_mean" if suffix == "T1rho" else "nucleus_t2_mean"
        values, labels = _load(tissues.with_name(f"{stem}_{suffix}.nii.gz")), _load(tissues)
        for k, level in enumerate(lab.DISCS):
            if level not in lab.SCHEMA_DISCS:
                continue
            sel = labels == lab.nucleus(k)
            row = discs[(discs.participant_id == f"sub-{sub}") & (discs.level == level)]
            if sel.sum() >= 5:
                assert values[sel].mean() == pytest.approx(row[column].item(), rel=0.12)


def test_degeneration_drives_height_and_t1rho():
    rows = []
    for p in sample_cohort(60, 2, 1, seed=4):
        for d in p.visits[0].discs:
            rows.append((d.modified_pfirrmann, d.height_factor, d.t1rho_np, d.t2_np))
    grade, height, t1rho, t2 = np.array(rows).T
    assert np.corrcoef(grade, height)[0, 1] < -0.99
    assert np.corrcoef(grade, t1rho)[0, 1] < -0.9
    assert np.corrcoef(grade, t2)[0, 1] < -0.8
    assert len(set(grade)) >= 6  # the cohort spans the grades


def test_grades_and_phases_in_tables(default, longitudinal):
    discs = pd.concat([pd.read_csv(r.truth_dir / "discs.tsv", sep="\t")
                       for r in (default, longitudinal)])
    assert discs["modified_pfirrmann"].between(1, 8).all()
    assert (discs["pfirrmann"] == discs["modified_pfirrmann"].map(
        dict(enumerate((1, 2, 3, 3, 4, 4, 5, 5), start=1)))).all()
    low, high = discs[discs.modified_pfirrmann <= 2], discs[discs.modified_pfirrmann >= 4]
    assert low["nucleus_t1rho_center"].mean() > high["nucleus_t1rho_center"].mean() + 0.015
    assert low["disc_height_mm"].mean() > high["disc_height_mm"].mean()
    expected = np.where(discs.nucleus_t1rho_center > 0.110, 1,
                        np.where(discs.nucleus_t1rho_center >= 0.080, 2, 3))
    assert (discs["t1rho_phase"] == expected).all()
    assert discs["cep_sup_t2star"].between(0.0068, 0.032).all()
    assert (discs["cep_sup_thickness_mm"].between(0.5, 1.0)).all()


def test_planted_associations():
    people = sample_cohort(400, 2, 1, seed=11)
    level = lab.DISCS.index("L4L5")
    odi = np.array([p.visits[0].odi for p in people])
    t1rho = np.array([p.visits[0].discs[level].t1rho_np * 1000 for p in people])
    patient = np.array([p.group == "patient" for p in people], float)
    keep = (odi > 0) & (odi < 100)  # clipping at the floor would bias the slope
    x = np.column_stack([np.ones(keep.sum()), t1rho[keep], patient[keep]])
    coef = np.linalg.lstsq(x, odi[keep], rcond=None)[0]
    planted = PLANTED_EFFECTS["odi_vs_nucleus_t1rho_L4L5"]
    assert coef[1] == pytest.approx(planted["slope_per_ms"], abs=0.12)
    assert coef[2] == pytest.approx(planted["group_effect"], abs=3.0)
    assert np.corrcoef(odi, t1rho)[0, 1] < -0.3

    rows = [(p.age, d.modified_pfirrmann, d.t2_np * 1000)
            for p in people for d in p.visits[0].discs]
    age, grade, t2 = np.array(rows).T
    dummies = (grade[:, None] == np.arange(1, 9)[None, :]).astype(float)
    slope = np.linalg.lstsq(np.column_stack([dummies, age]), t2, rcond=None)[0][-1]
    assert slope == pytest.approx(PLANTED_EFFECTS["nucleus_t2_vs_age"]["slope_ms_per_year"],
                                  abs=0.08)
    groups = np.array([p.group for p in people])
    assert {"control", "patient"} == set(groups)
    missing = sum(len(p.missing) for p in people)
    assert 0 < missing < 0.2 * 3 * len(people)


def test_tables_carry_planted_effects(default):
    participants = pd.read_csv(default.raw_dir / "participants.tsv", sep="\t",
                               na_values="n/a", keep_default_na=False)
    assert list(participants.columns) == ["participant_id", *SCHEMA["tabular"][
        "participants.tsv"]["optional"]]
    assert participants.isna().any().any()  # a few n/a
    discs = pd.read_csv(default.truth_dir / "discs.tsv", sep="\t")
    l45 = discs[discs.level == "L4L5"].set_index("participant_id")
    planted = PLANTED_EFFECTS["odi_vs_nucleus_t1rho_L4L5"]
    for _, row in participants.dropna(subset=["odi"]).iterrows():
        predicted = (28 + planted["slope_per_ms"] * (l45.loc[row.participant_id,
                                                              "nucleus_t1rho"] * 1000 - 100)
                     + planted["group_effect"] * (row.group == "patient"))
        assert abs(np.clip(predicted, 0, 100) - row.odi) < 4 * planted["residual_sd"]
    stored = json.loads((default.truth_dir / "planted_effects.json").read_text())
    assert stored["odi_vs_nucleus_t1rho_L4L5"]["slope_per_ms"] == planted["slope_per_ms"]
    grades = pd.read_csv(default.raw_dir / "phenotype" / "disc_grades.tsv", sep="\t")
    assert list(grades.columns) == ["participant_id", "level", "pfirrmann",
                                    "modified_pfirrmann"]
    assert len(grades) == 5 * len(default.participants)


def test_longitudinal_change(longitudinal):
    discs = pd.read_csv(longitudinal.truth_dir / "discs.tsv", sep="\t")
    sessions = pd.read_csv(longitudinal.raw_dir / "sub-01" / "sub-01_sessions.tsv", sep="\t")
    assert list(sessions.session_id) == ["ses-01", "ses-02"]
    l45 = discs[(discs.participant_id == "sub-01") & (discs.level == "L4L5")]
    first, second = l45.iloc[0], l45.iloc[1]
    if first.modified_pfirrmann < 8:  # sub-01 always progresses at L4L5
        assert second.modified_pfirrmann == first.modified_pfirrmann + 1
        assert second.nucleus_t1rho < first.nucleus_t1rho
        assert second.disc_height_mm < first.disc_height_mm
    other = discs[(discs.participant_id == "sub-01") & (discs.level == "L1L2")]
    assert other.modified_pfirrmann.nunique() == 1


def test_modic_contrast(default):
    """Modic type 1: T1 hypo / T2 hyper; type 2: T1 hyper; type 3: hypo on both (vs marrow)."""
    modic = pd.read_csv(default.truth_dir / "modic.tsv", sep="\t")
    assert set(modic.modic_type) == {1, 2, 3}
    found = set()
    for sub in default.participants:
        labels = _load(next(default.truth_dir.glob(f"sub-{sub}/anat/*acq-sag_desc-tissues*")))
        t1w = _load(next(default.raw_dir.glob(f"sub-{sub}/anat/*_T1w.nii.gz")))
        t2w = _load(next(default.raw_dir.glob(f"sub-{sub}/anat/*_T2w.nii.gz")))
        marrow = (labels >= 18) & (labels <= 26)
        for t in (1, 2, 3):
            sel = (labels >= 500 + 100 * t) & (labels < 600 + 100 * t)
            if sel.sum() < 3:
                continue
            found.add(t)
            r1 = t1w[sel].mean() / t1w[marrow].mean()
            r2 = t2w[sel].mean() / t2w[marrow].mean()
            assert {1: r1 < 0.9 and r2 > 1.3, 2: r1 > 1.1 and r2 > 1.0,
                    3: r1 < 0.6 and r2 < 0.8}[t], (t, r1, r2)
    assert found == {1, 2, 3}


# ---- signal and noise ----------------------------------------------------------------------
def test_rician_background(default):
    ratios, means = [], []
    for path in default.raw_dir.glob("sub-0[13]/anat/*_acq-mapss_echo-*_MESE.nii.gz"):
        stem = path.name.split("_echo-")[0]
        labels = _load(_truth(default, f"{path.parent.relative_to(default.raw_dir)}/"
                                       f"{stem}_desc-tissues_dseg.nii.gz"))
        sigma = json.loads(_truth(default, f"{path.parent.relative_to(default.raw_dir)}/"
                                           f"{stem}_T2map.json").read_text())["NoiseSigma"]
        air = _load(path)[labels == 0]
        assert air.size > 200
        ratios.append(air.mean() / air.std())
        means.append(air.mean() / (sigma * np.sqrt(np.pi / 2)))
    # Rayleigh: mean / SD = sqrt(pi / (4 - pi)) = 1.913; mean = sigma sqrt(pi / 2)
    assert np.mean(ratios) == pytest.approx(1.913, abs=0.08)
    assert np.mean(means) == pytest.approx(1.0, abs=0.05)


def test_fit_error_is_noise_only(default):
    """A log-linear fit of the stored echoes at the stored times recovers the truth T2 in
    high-SNR voxels: the series obeys S = Gain PD exp(-t / T2) + noise exactly."""
    for sub in ("01", "02"):
        paths = sorted(default.raw_dir.glob(f"sub-{sub}/anat/*_MESE.nii.gz"))
        times = np.array([_sidecar(p)["EchoTime"] for p in paths])
        signal = np.stack([_load(p) for p in paths], axis=-1)
        stem = paths[0].name.split("_echo-")[0]
        folder = paths[0].parent.relative_to(default.raw_dir)
        t2 = _load(_truth(default, f"{folder}/{stem}_T2map.nii.gz"))
        meta = json.loads(_truth(default, f"{folder}/{stem}_T2map.json").read_text())
        pd_map = _load(_truth(default, f"{folder}/{stem}_PDmap.nii.gz"))
        last = meta["Gain"] * pd_map * np.exp(-times[-1] / np.where(t2 > 0, t2, np.inf))
        sel = (t2 > 0.02) & (t2 < 0.15) & (last > 15 * meta["NoiseSigma"])  # on the truth
        assert sel.sum() > 100
        slope, intercept = np.polyfit(times, np.log(signal[sel]).T, 1)
        error = -1 / slope / t2[sel] - 1
        assert abs(np.median(error)) < 0.01  # no bias: the error is noise
        assert np.median(np.abs(error)) < 0.10  # of the size SNR 40-45 gives
        assert np.median(np.exp(intercept) / (meta["Gain"] * pd_map[sel])) == pytest.approx(
            1.0, abs=0.02)


# ---- folders and command line ----------------------------------------------------------------
def test_folders_refused(tmp_path):
    with pytest.raises(UsageError, match="inside the raw dataset"):
        generate_dataset(tmp_path / "ds", n_subjects=1, n_sites=1, truth_dir=tmp_path / "ds" / "t")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        generate_dataset(foreign, n_subjects=1, n_sites=1)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UsageError, match="--sites"):
        generate_dataset(tmp_path / "x", n_subjects=1, n_sites=2)
    with pytest.raises(UsageError, match="--size"):
        generate_dataset(tmp_path / "x", size="huge")


def test_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main([str(out), "--subjects", "2", "--sites", "2", "--seed", "7"]) == 0
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("sub-")]) == 2
    assert (tmp_path / "ds_truth" / "discs.tsv").exists()
    # an earlier synthetic output is replaced
    assert main([str(out), "--subjects", "1", "--sites", "1", "--truth-dir",
                 str(tmp_path / "t")]) == 0
    assert not (out / "sub-02").exists()
    assert main([str(out), "--truth-dir", str(out / "truth")]) == 2
    assert "inside the raw dataset" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bids-validator-deno") is None,
                    reason="bids-validator-deno is not installed")
def test_official_validator(longitudinal):
    proc = subprocess.run(["bids-validator-deno", str(longitudinal.raw_dir), "--json"],
                          capture_output=True, text=True, timeout=300)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert errors == []


def test_cortical_bone_is_a_partial_volume_signal_void() -> None:
    """The bony endplate fills its share of each voxel: a point sample is in or out; a voxel
    three times the layer's thickness, centred on it, is a third bone; and along a line from a
    disc's centre into the vertebra above, the effective PD dips (the dark endplate line) while
    the labels stay disc then vertebra."""
    from spineqprep.synth.anatomy import _layer, build_anatomy

    assert _layer(np.array([-0.1, 0.5, 1.1]), 1.0, 0.0).tolist() == [0.0, 1.0, 0.0]
    assert _layer(np.array([0.5]), 1.0, 3.0)[0] == pytest.approx(1 / 3)
    assert _layer(np.array([-2.0, 3.0]), 1.0, 1.0).tolist() == [0.0, 0.0]
    person = sample_cohort(1, 1, 1, 7)[0]
    anat = build_anatomy(person, person.visits[0], 7)
    k = lab.DISCS.index("L3L4")
    u = anat.disc_u[k] + np.linspace(0.0, 12.0, 241)
    points = anat.world(u, np.zeros_like(u), np.zeros_like(u))
    fine, coarse = anat.evaluate(points, 0.1), anat.evaluate(points, 3.0)
    assert fine.labels[0] == lab.nucleus(k) and fine.labels[-1] == lab.vertebra(k)
    assert fine.pd_scale.min() < 0.05 and coarse.pd_scale.min() > 0.6  # a line vs a shadow
    assert fine.pd_scale[0] == fine.pd_scale[-1] == 1.0
    assert np.array_equal(fine.labels, coarse.labels)
