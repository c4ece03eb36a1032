"""Reports and the group summary, built from small fake derivatives written to disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from spineqprep.errors import InputError
from spineqprep.reports import Section, build_group_report, build_subject_report
from spineqprep.reports.figures import (
    display_slice,
    map_views,
    plot_map_figure,
    sagittal_indices,
)
from spineqprep.stats.summary import find_maps, missing_maps, parse_name, summarise_maps

# x (left-right: the sagittal slices), y (posterior-anterior), z (inferior-superior)
SHAPE = (5, 40, 56)
RAS = np.array([[3.0, 0, 0, -6], [0, 0.8, 0, -16], [0, 0, 0.8, -22], [0, 0, 0, 1]])
# array axes (a, b, c) = (posterior, inferior, right): the common sagittal DICOM layout
TO_PIR = np.array([[0, 0, 1, 0], [-1, 0, 0, SHAPE[1] - 1], [0, -1, 0, SHAPE[2] - 1],
                   [0, 0, 0, 1]], dtype=float)
MARK = 3000.0  # S0 of the anterior-superior marker block


def to_pir(data: np.ndarray) -> np.ndarray:
    """RAS-ordered array -> the PIR array of the same world content (affine RAS @ TO_PIR)."""
    return data.transpose(1, 2, 0)[::-1, ::-1, :]


def phantom(seed: int, t_mean: float) -> dict[str, np.ndarray]:
    """Truth on the RAS grid: S0, map (s, NaN where the fit failed), validity, R^2."""
    rng = np.random.default_rng(seed)
    s0 = np.full(SHAPE, 50.0)
    body = np.zeros(SHAPE, bool)
    body[:, 8:30, 6:50] = True
    s0[body] = 1000.0
    s0[:, -6:, -6:] = MARK  # anterior (high y), superior (high z)
    t = rng.normal(t_mean, 0.2 * t_mean, SHAPE).clip(0.2 * t_mean)
    valid = body & (rng.random(SHAPE) > 0.1)
    t = np.where(valid, t, np.nan).astype(np.float32)
    rsq = np.where(body, rng.uniform(0.8, 1.0, SHAPE), rng.uniform(0, 0.3, SHAPE))
    return {"S0": s0, "T": t, "valid": valid, "R2": rsq}


def _write(path: Path, data: np.ndarray, affine: np.ndarray, meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data, affine).to_filename(path)
    if meta is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))


def write_map(out: Path, bids: Path, *, sub: str, ses: str | None, acq: str, suffix: str,
              seed: int, t_mean: float, pir: bool) -> dict:
    """Write one map, its fit by-products and its raw source series; return the truth."""
    truth = phantom(seed, t_mean)
    quantity = {"T2map": "T2", "T1rho": "T1rho", "T2starmap": "T2star"}[suffix]
    raw, entity, field = {"T2map": ("MESE", "echo", "EchoTime"),
                          "T1rho": ("MESL", "tsl", "SpinLockTime"),
                          "T2starmap": ("MEGRE", "echo", "EchoTime")}[suffix]
    times = [0.01, 0.02, 0.04, 0.08] if field == "EchoTime" else [0.0, 0.01, 0.04, 0.08]
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_acq-{acq}"
    rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / "anat"
    affine = RAS @ TO_PIR if pir else RAS
    orient = to_pir if pir else (lambda a: a)
    sources = []
    for k, t in enumerate(times, start=1):
        name = f"{prefix}_{entity}-{k}_{raw}.nii.gz"
        echo = truth["S0"] * np.exp(-t / np.nan_to_num(truth["T"], nan=0.05))
        _write(bids / rel / name, orient(echo).astype(np.float32), affine, {field: t})
        sources.append(f"bids:raw:{(rel / name).as_posix()}")
    meta = {"Units": "s", "Sources": sources, field: times, "FitModel": "monoexp",
            "FractionValid": float(truth["valid"].sum() / truth["valid"].size)}
    _write(out / rel / f"{prefix}_{suffix}.nii.gz", orient(truth["T"]), affine, meta)
    fit = out / rel / f"{prefix}_desc-{quantity}fit"
    _write(Path(f"{fit}_S0map.nii.gz"), orient(truth["S0"]).astype(np.float32), affine, {})
    _write(Path(f"{fit}_Rsquared.nii.gz"), orient(truth["R2"]).astype(np.float32), affine, {})
    _write(Path(f"{fit}_mask.nii.gz"), orient(truth["valid"]).astype(np.uint8), affine, {})
    return truth


def make_derivatives(root: Path) -> dict[tuple, dict]:
    """sub-01: two sessions (RAS); sub-02: no session (PIR), raw T1rho series but no T1rho map.

    Returns the truth per (participant, session, map, acq)."""
    out, bids = root / "out", root / "bids"
    bids.mkdir(parents=True)
    (bids / "participants.tsv").write_text("participant_id\tage\tsite\nsub-01\t30\tA\n"
                                           "sub-02\tn/a\tB\n")
    truths = {}
    specs = [("01", "1", "mese", "T2map", 0.060, False), ("01", "1", "mesl", "T1rho", 0.090, False),
             ("01", "2", "mese", "T2map", 0.070, False), ("02", None, "mese", "T2map", 0.050, True),
             ("02", None, "ute", "T2starmap", 0.012, True)]
    for seed, (sub, ses, acq, suffix, t_mean, pir) in enumerate(specs):
        truths[(f"sub-{sub}", f"ses-{ses}" if ses else None, suffix, acq)] = write_map(
            out, bids, sub=sub, ses=ses, acq=acq, suffix=suffix, seed=seed, t_mean=t_mean, pir=pir)
    # a raw T1rho series of sub-02 whose map was never written
    write_map(root / "unused", bids, sub="02", ses=None, acq="mesl", suffix="T1rho", seed=9,
              t_mean=0.09, pir=True)
    return truths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("reports")
    truths = make_derivatives(root)
    return root / "out", root / "bids", truths


def _ms(truth: dict, pct: float) -> float:
    return float(np.percentile(truth["T"][truth["valid"]].astype(np.float64) * 1e3, pct))


def test_parse_name() -> None:
    assert parse_name("sub-01_ses-2_acq-mese_desc-T2fit_mask.nii.gz") == (
        {"sub": "01", "ses": "2", "acq": "mese", "desc": "T2fit"}, "mask")
    assert parse_name("sub-01_T2map.json") is None
    assert parse_name("notbids_T2map.nii.gz") is None


def test_find_maps_pairs_by_products(dataset) -> None:
    out, _, _ = dataset
    maps = find_maps(out)
    assert len(maps) == 5
    t1rho = next(m for m in maps if m.suffix == "T1rho")
    assert t1rho.mask_path.name == "sub-01_ses-1_acq-mesl_desc-T1rhofit_mask.nii.gz"
    assert t1rho.rsquared_path.name.endswith("desc-T1rhofit_Rsquared.nii.gz")
    assert [m.session for m in find_maps(out, "01", ["ses-2"])] == ["2"]


def test_summary_values_match_numpy(dataset) -> None:
    out, bids, truths = dataset
    df = summarise_maps(out, bids)
    assert len(df) == 5
    for row in df.to_dict("records"):
        truth = truths[(row["participant_id"], row["session_id"], row["map"], row["acq"])]
        assert row["median_ms"] == pytest.approx(_ms(truth, 50), rel=1e-9)
        assert row["iqr_ms"] == pytest.approx(_ms(truth, 75) - _ms(truth, 25), rel=1e-9)
        assert row["p95_ms"] == pytest.approx(_ms(truth, 95), rel=1e-9)
        assert row["n_voxels_valid"] == int(truth["valid"].sum())
        assert row["site"] == {"sub-01": "A", "sub-02": "B"}[row["participant_id"]]
    t1rho = df[df["map"] == "T1rho"].iloc[0]
    assert t1rho["times_ms"] == "0,10,40,80" and t1rho["time_field"] == "SpinLockTime"
    assert summarise_maps(out)["site"].isna().all()


def test_missing_maps(dataset) -> None:
    out, bids, _ = dataset
    df = summarise_maps(out, bids)
    missing = missing_maps(df, bids)
    assert missing[["participant_id", "map", "acq"]].values.tolist() == [
        ["sub-02", "T1rho", "mesl"]]
    # without the raw dataset: every visit is expected to have every (map, acq) seen
    assert len(missing_maps(df)) == 3 * 3 - 5  # 3 visits x 3 (map, acq) kinds


def test_orientations_display_alike() -> None:
    """A RAS and a PIR image of the same content give the same canonical views, and the
    displayed slice has the anterior-superior marker in its top-left corner."""
    truth = phantom(0, 0.06)
    shown = []
    for affine, orient in ((RAS, lambda a: a), (RAS @ TO_PIR, to_pir)):
        views = map_views(nib.Nifti1Image(orient(truth["T"]), affine), orient(truth["valid"]),
                          nib.Nifti1Image(orient(truth["S0"]), affine))
        view = display_slice(views.background, SHAPE[0] // 2)
        assert view[0, 0] == MARK and view[-1, -1] != MARK
        shown.append(views)
    np.testing.assert_array_equal(shown[0].background, shown[1].background)
    np.testing.assert_array_equal(shown[0].map_ms, shown[1].map_ms)
    np.testing.assert_allclose(shown[0].affine, shown[1].affine)
    assert sagittal_indices(5) == [1, 2, 3] and sagittal_indices(1) == [0]


@pytest.mark.parametrize("shape", [(1, 40, 56), (40, 56)], ids=["one-slice", "2d"])
def test_single_slice_figure(shape: tuple[int, ...], tmp_path: Path) -> None:
    """A single sagittal slice (3D with one slice, or a 2D image) gives a one-column figure."""
    truth = phantom(3, 0.06)
    cut = {k: v[2].reshape(shape) for k, v in truth.items()}
    # a 2D image's axes are (y, z): its affine's first two columns point along y and z
    yzx = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    affine = RAS if len(shape) == 3 else RAS @ yzx
    views = map_views(nib.Nifti1Image(cut["T"], affine), cut["valid"],
                      nib.Nifti1Image(cut["S0"].astype(np.float32), affine),
                      nib.Nifti1Image(cut["R2"].astype(np.float32), affine))
    assert views.map_ms.shape == (1, 40, 56)
    assert display_slice(views.background, 0)[0, 0] == MARK
    png = mpimg.imread(plot_map_figure(views, tmp_path / "one.png", quantity="T2",
                                       background_label="S0"))
    assert png.shape[0] > png.shape[1] and png[..., :3].std() > 0.05  # one column, 3 rows


def test_map_without_valid_voxels(dataset, tmp_path: Path) -> None:
    out, _, _ = dataset
    empty = tmp_path / "out"
    shutil.copytree(out / "sub-02", empty / "sub-02")
    mask = empty / "sub-02" / "anat" / "sub-02_acq-ute_desc-T2starfit_mask.nii.gz"
    img = nib.load(mask)
    nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine).to_filename(mask)
    df = summarise_maps(empty)
    row = df[df["map"] == "T2starmap"].iloc[0]
    assert row["n_voxels_valid"] == 0 and np.isnan(row["median_ms"])
    missing = missing_maps(df)
    assert missing[["map", "reason"]].values.tolist() == [["T2starmap", "no valid voxel"]]
    html = build_subject_report(empty, "02").read_text()
    assert '<td class=num data-field="median_ms">n/a</td>' in html
    assert len(_img_sources(html)) == 2


def _img_sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_subject_report(dataset, tmp_path: Path) -> None:
    out, bids, truths = dataset
    path = build_subject_report(out, "sub-01", bids_dir=bids, errors=["fit <failed> on x"],
                                boilerplate="Maps were fitted.\n\nWith numpy.")
    assert path == out / "sub-01.html"
    html = path.read_text()
    for ident in ("summary", "ses-1", "ses-2", "methods", "errors"):
        assert f'<section id="{ident}">' in html
    assert "fit &lt;failed&gt; on x" in html and "<p>With numpy.</p>" in html
    for key in (("sub-01", "ses-1", "T2map", "mese"), ("sub-01", "ses-1", "T1rho", "mesl"),
                ("sub-01", "ses-2", "T2map", "mese")):
        assert f'<td class=num data-field="median_ms">{_ms(truths[key], 50):.2f}</td>' in html
    sources = _img_sources(html)
    assert len(sources) == 3
    assert "source images were not found" not in html  # the raw first echo was the background
    for src in sources:
        assert not Path(src).is_absolute() and src.startswith("sub-01/figures/")
        png = mpimg.imread(out / src)
        assert png.shape[0] > 200 and png.shape[1] > 400 and png[..., :3].std() > 0.05
    # the HTML and its figures work from anywhere (relative links)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert all((moved / src).is_file() for src in sources)


def test_subject_report_without_raw_and_sessions_filter(dataset) -> None:
    out, _, truths = dataset
    html = build_subject_report(out, "02").read_text()
    assert '<section id="maps">' in html and "ses-" not in html
    assert "the fitted S0 map is shown instead" in html
    assert "No errors were reported." in html and "No methods boilerplate" in html
    key = ("sub-02", None, "T2starmap", "ute")
    assert f">{_ms(truths[key], 50):.2f}</td>" in html
    only = build_subject_report(out, "01", sessions=["2"]).read_text()
    assert '<section id="ses-2">' in only and '<section id="ses-1">' not in only


def test_group_report(dataset) -> None:
    out, bids, truths = dataset
    df = summarise_maps(out, bids)
    build_subject_report(out, "01", bids_dir=bids)
    voxelwise = [Section("glm-age", "T2 vs age", "<p>stat map</p>")]
    path = build_group_report(out, df, bids_dir=bids, voxelwise=voxelwise)
    html = path.read_text()
    assert path == out / "group.html"
    for ident in ("overview", "sites", "maps", "missing", "voxelwise", "methods", "errors"):
        assert f'<section id="{ident}">' in html
    assert '<a href="sub-01.html">sub-01</a>' in html and "<p>stat map</p>" in html
    missing = html[html.index('<section id="missing">'):html.index('<section id="voxelwise">')]
    assert "sub-02" in missing and "T1rho" in missing and "sub-01" not in missing
    key = ("sub-02", None, "T2map", "mese")
    assert f">{_ms(truths[key], 50):.2f}</td>" in html
    (src,) = _img_sources(html)
    assert mpimg.imread(out / src)[..., :3].std() > 0.05
    empty = build_group_report(out, df.iloc[0:0]).read_text()
    assert "No relaxation maps were found." in empty and "No voxel-wise statistics" in empty


def test_user_errors(dataset, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        summarise_maps(tmp_path / "nope")
    out, _, _ = dataset
    broken = tmp_path / "broken"
    shutil.copytree(out / "sub-02", broken / "sub-02")
    (broken / "sub-02" / "anat" / "sub-02_acq-ute_T2starmap.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="cannot read the NIfTI") as err:
        summarise_maps(broken)
    assert "sub-02_acq-ute_T2starmap.nii.gz" in str(err.value) and "fix:" in str(err.value)
    bad = tmp_path / "bids"
    bad.mkdir()
    pd.DataFrame({"id": ["sub-01"]}).to_csv(bad / "participants.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="participant_id"):
        summarise_maps(out, bad)


def test_single_slice_registration_before_panel() -> None:
    """A single sagittal slice, slightly oblique (2 degrees about SI), shows the native map and
    the native disc outline in the registration report's "before" panel: the atlas plane lies
    within the slice's thickness, if not exactly on its centre plane."""
    from test_registration_engine import _rotation, make_case

    from spineqprep.reports.registration import before_panel, mid_sagittal_plane

    case = make_case(True)
    tilt = np.eye(4)
    tilt[:3, :3] = _rotation([0, 0, 2])
    native = nib.Nifti1Image(np.asarray(case["map"].dataobj), tilt @ case["map"].affine)
    dseg = nib.Nifti1Image(np.asarray(case["mask"].dataobj) * 7, tilt @ case["mask"].affine)
    plane, _ = mid_sagittal_plane(case["atlas"])
    values, disc = before_panel(native, dseg, 7, plane)
    assert np.isfinite(values).mean() > 0.8
    # the native outline: about the atlas disc's area (the native disc is scaled, then bent)
    atlas_area = (np.asarray(case["atlas"].dataobj)[0] > 0).sum()
    assert 0.7 < disc.sum() / atlas_area < 1.5
