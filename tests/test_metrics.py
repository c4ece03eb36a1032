"""Segmentation and agreement metrics: analytic cases, empty-mask conventions, scikit-learn
AUCs, and the per-level evaluation of derivatives datasets (synthetic truth vs perturbed
copies) through the API and the command line."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist
from sklearn.metrics import average_precision_score, roc_auc_score

from spineqprep.cli.evaluate import main
from spineqprep.errors import InputError, UsageError
from spineqprep.metrics import (
    METRICS,
    binary_metrics,
    bland_altman,
    central_slices,
    confusion,
    dice,
    dice_2d,
    dice_central,
    dice_per_slice,
    evaluate_datasets,
    hausdorff_distance,
    mean_surface_distance,
    paired_t,
    pearson,
    pr_auc,
    precision,
    roc_auc,
    sagittal_axis,
    sensitivity,
    specificity,
    summarise_levels,
    surface_distances,
    surface_voxels,
    volume_difference_percent,
    voxel_spacing,
)
from spineqprep.stats.summary import parse_name
from spineqprep.synth import generate_dataset

SHAPE = (16, 16, 16)
NAN = float("nan")


def cube(shift: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """A 6 x 6 x 6 cube at [5, 11) on each axis, shifted by ``shift`` voxels."""
    mask = np.zeros(SHAPE, bool)
    mask[tuple(slice(5 + s, 11 + s) for s in shift)] = True
    return mask


# ---- overlap ------------------------------------------------------------------------------------
def test_cube_shifted_one_voxel_overlap():
    a, b = cube(), cube((1, 0, 0))
    assert dice(b, a) == pytest.approx(5 / 6)  # 180 shared voxels of 216 each
    c = confusion(b, a)
    assert c == (180, 36, 36, 16**3 - 252)
    assert sensitivity(c) == precision(c) == pytest.approx(5 / 6)
    assert specificity(c) == pytest.approx((16**3 - 252) / (16**3 - 216))
    assert volume_difference_percent(b, a) == 0.0
    # slices along the shift: 5 and 11 hold one cube only, 6..10 both, the rest none
    per = dice_per_slice(b, a, axis=0)
    assert np.isnan(per[:5]).all() and np.isnan(per[12:]).all()
    np.testing.assert_array_equal(per[5:12], [0, 1, 1, 1, 1, 1, 0])
    assert dice_2d(b, a, axis=0) == pytest.approx(5 / 7)
    # slices across the shift: every slice is two 6 x 6 squares overlapping on 5 x 6
    assert dice_2d(b, a, axis=1) == pytest.approx(5 / 6)
    assert dice_2d(b, a, axis=2) == pytest.approx(5 / 6)


def test_volume_difference_is_signed_percent_of_reference():
    ref = cube()
    bigger = ref.copy()
    bigger[:, 11:16] = ref[:, 5:10]  # 5/6 of a second cube
    bigger[:, 0] = ref[:, 10]  # and the last sixth: twice the volume
    assert volume_difference_percent(bigger, ref) == pytest.approx(100.0)
    assert volume_difference_percent(ref, bigger) == pytest.approx(-50.0)


def test_central_slices_and_central_dice():
    ref = np.zeros((14, 5, 5), bool)
    ref[2:12, 1:4, 1:4] = True  # 10 slices -> the middle 5: 4..8
    np.testing.assert_array_equal(np.flatnonzero(central_slices(ref, 0, 0.5)), [4, 5, 6, 7, 8])
    pred = ref.copy()
    pred[2:4] = False  # errors only outside the central half
    pred[10:12, 0] = True
    assert dice_central(pred, ref, 0, 0.5) == 1.0
    assert dice(pred, ref) < 0.9
    pred[6, 2, 2] = False  # one voxel of 45 central ones missing
    assert dice_central(pred, ref, 0, 0.5) == pytest.approx(2 * 44 / 89)
    with pytest.raises(ValueError, match="fraction"):
        central_slices(ref, 0, 0.0)


# ---- surface distances --------------------------------------------------------------------------
def test_cube_shifted_one_voxel_surface_distance_anisotropic():
    """Shift of one voxel along the finest axis (0.5 mm): of the 152 boundary voxels of each
    cube, the 36 of the trailing face and the 16 inner voxels of the leading face are 0.5 mm
    from the other surface, the 100 others lie on it."""
    a, b = cube(), cube((1, 0, 0))
    spacing = (0.5, 3.0, 2.0)
    assert surface_voxels(a).sum() == 6**3 - 4**3
    d_ba, d_ab = surface_distances(b, a, spacing)
    assert sorted(np.unique(d_ba)) == [0.0, 0.5] and (d_ba == 0.5).sum() == 52
    assert (d_ab == 0.5).sum() == 52
    assert mean_surface_distance(b, a, spacing) == pytest.approx(0.5 * 52 / 152)
    assert hausdorff_distance(b, a, spacing) == pytest.approx(0.5)
    assert hausdorff_distance(b, a, spacing, percentile=100) == pytest.approx(0.5)
    # the same geometry with the axes permuted gives the same distances
    a1, b1 = np.moveaxis(a, 0, 1), np.moveaxis(b, 0, 1)
    assert mean_surface_distance(b1, a1, (3.0, 0.5, 2.0)) == pytest.approx(0.5 * 52 / 152)
    # isotropic 1 mm: the same 52 voxels, 1 mm away; spacing scales distances
    assert mean_surface_distance(b, a, (1, 1, 1)) == pytest.approx(52 / 152)
    assert mean_surface_distance(b, a, (2, 2, 2)) == pytest.approx(2 * 52 / 152)
    # the shift along a coarse axis is seen at its size (3 mm), not in voxels
    assert hausdorff_distance(cube((0, 1, 0)), a, spacing, percentile=100) == pytest.approx(3.0)


def _boundary_points(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Boundary voxels by explicit face-neighbour tests (independent of the erosion)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner) * np.asarray(spacing)


def test_surface_distances_match_brute_force_on_random_shapes():
    rng = np.random.default_rng(3)
    spacing = (2.0, 0.5, 0.7)
    blobs = [ndimage.gaussian_filter(rng.normal(size=(12, 20, 18)), 2.0) > 0.05 for _ in
             range(2)]
    pred, ref = blobs
    p_pts, r_pts = _boundary_points(pred, spacing), _boundary_points(ref, spacing)
    expected_pr, expected_rp = cdist(p_pts, r_pts).min(1), cdist(r_pts, p_pts).min(1)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(np.sort(d_pr), np.sort(expected_pr), atol=1e-9)
    np.testing.assert_allclose(np.sort(d_rp), np.sort(expected_rp), atol=1e-9)
    pooled = np.r_[expected_pr, expected_rp].mean()
    assert mean_surface_distance(pred, ref, spacing) == pytest.approx(pooled)
    assert hausdorff_distance(pred, ref, spacing) == pytest.approx(
        max(np.percentile(expected_pr, 95), np.percentile(expected_rp, 95)))


def test_voxel_spacing_and_sagittal_axis_of_oblique_affines():
    theta = np.deg2rad(8)
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)],
                    [0, np.sin(theta), np.cos(theta)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([4.0, 3.2, 3.1])
    assert voxel_spacing(affine) == pytest.approx((4.0, 3.2, 3.1))
    assert sagittal_axis(affine) == 0
    affine[:3, :3] = affine[:3, [1, 2, 0]]  # the left-right axis is now the last array axis
    assert sagittal_axis(affine) == 2


# ---- empty masks --------------------------------------------------------------------------------
def test_empty_mask_conventions():
    empty, some = np.zeros(SHAPE, bool), cube()
    spacing = (1.0, 1.0, 1.0)
    both = binary_metrics(empty, empty, spacing)
    assert both["dice"] == both["dice_2d"] == both["dice_central50"] == 1.0
    assert both["msd_mm"] == both["hd95_mm"] == 0.0
    assert both["volume_diff_pct"] == 0.0
    assert np.isnan(both["sensitivity"]) and np.isnan(both["precision"])
    assert both["specificity"] == 1.0
    missed = binary_metrics(empty, some, spacing)  # nothing predicted
    assert missed["dice"] == missed["dice_2d"] == missed["dice_central50"] == 0.0
    assert np.isnan(missed["msd_mm"]) and np.isnan(missed["hd95_mm"])
    assert missed["volume_diff_pct"] == -100.0
    assert missed["sensitivity"] == 0.0 and np.isnan(missed["precision"])
    spurious = binary_metrics(some, empty, spacing)  # nothing to find
    assert spurious["dice"] == spurious["dice_2d"] == spurious["dice_central50"] == 0.0
    assert np.isnan(spurious["msd_mm"]) and np.isnan(spurious["volume_diff_pct"])
    assert np.isnan(spurious["sensitivity"]) and spurious["precision"] == 0.0
    scores = np.random.default_rng(0).random(SHAPE)
    assert np.isnan(roc_auc(scores, empty)) and np.isnan(pr_auc(scores, empty))
    assert np.isnan(roc_auc(scores, np.ones(SHAPE, bool)))
    assert pr_auc(scores, np.ones(SHAPE, bool)) == 1.0


# ---- AUCs against scikit-learn ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aucs_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    ref = rng.random((20, 30, 10)) < [0.02, 0.2, 0.5][seed]
    noise = rng.normal(size=ref.shape)
    scores = 1 / (1 + np.exp(-(2.0 * ref - 1 + noise)))
    scores = np.round(scores, 2)  # many ties: the mid-rank / threshold handling matters
    assert roc_auc(scores, ref) == pytest.approx(roc_auc_score(ref.ravel(), scores.ravel()),
                                                 abs=1e-12)
    assert pr_auc(scores, ref) == pytest.approx(
        average_precision_score(ref.ravel(), scores.ravel()), abs=1e-12)


def test_auc_limits():
    ref = cube()
    assert roc_auc(ref.astype(float), ref) == 1.0 and pr_auc(ref.astype(float), ref) == 1.0
    assert roc_auc(1.0 - ref, ref) == 0.0
    flat = np.full(SHAPE, 0.3)
    assert roc_auc(flat, ref) == 0.5
    assert pr_auc(flat, ref) == pytest.approx(ref.mean())  # prevalence
    with pytest.raises(ValueError, match="finite"):
        roc_auc(np.full(SHAPE, np.nan), ref)


# ---- agreement ----------------------------------------------------------------------------------
def test_bland_altman_pearson_paired_t_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0, NAN], [0.0, 2.0, 2.0, 5.0, 7.0]  # last pair dropped
    d = np.array([1.0, 0.0, 1.0, -1.0])
    sd = np.sqrt(((d - 0.25) ** 2).sum() / 3)
    ba = bland_altman(a, b)
    assert ba["n"] == 4 and ba["bias"] == pytest.approx(0.25) and ba["sd"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(0.25 - 1.96 * sd)
    assert ba["loa_high"] == pytest.approx(0.25 + 1.96 * sd)
    # t(0.975, 3) = 3.182446
    assert ba["bias_ci_high"] - 0.25 == pytest.approx(3.182446 * sd / 2, rel=1e-6)
    t = paired_t(a, b)
    assert t["t"] == pytest.approx(0.25 / (sd / 2)) and t["df"] == 3
    assert 0.6 < t["p"] < 0.7  # two-sided p of t = 0.522 with 3 df is 0.638
    r = pearson(a, b)
    assert r["r"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [0, 2, 2, 5])[0, 1])
    assert r["n"] == 4
    assert pearson([1, 2, 3], [2, 4, 6])["r"] == pytest.approx(1.0)


def test_agreement_degenerate_inputs():
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3])["r"])
    assert np.isnan(pearson([1, 2], [1, 2])["r"])
    assert np.isnan(paired_t([1, 2, 3], [1, 2, 3])["t"])
    one = bland_altman([2.0], [1.0])
    assert one["bias"] == 1.0 and np.isnan(one["sd"]) and one["n"] == 1
    with pytest.raises(ValueError, match="equal lengths"):
        bland_altman([1, 2], [1])


# ---- datasets -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    """The synthetic ground truth of 2 subjects (discs, vertebrae on 3 grids each)."""
    res = generate_dataset(tmp_path_factory.mktemp("synth") / "raw", n_subjects=2, n_sites=1,
                           seed=5)
    return res.truth_dir


def _main_dsegs(root: Path) -> list[Path]:
    """The ``_dseg`` images without ``desc`` (vertebrae and whole discs)."""
    return [p for p in sorted(root.glob("sub-*/**/*_dseg.nii.gz"))
            if "desc" not in parse_name(p.name)[0]]


Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _predicted(truth: Path, out: Path, transform: Transform | None = None) -> Path:
    """A 'prediction' dataset: the truth's ``_dseg`` images (through ``transform``) and its
    label table."""
    for path in _main_dsegs(truth):
        img = nib.load(path)
        data, affine = np.asarray(img.dataobj), img.affine
        if transform is not None:
            data, affine = transform(data, affine)
        target = out / path.relative_to(truth)
        target.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), target)
    shutil.copy(truth / "dseg.tsv", out / "dseg.tsv")
    shutil.copy(truth / "dataset_description.json", out / "dataset_description.json")
    return out


L1L2, L3, L4L5, L5S1 = 120, 22, 123, 124


def _perturb(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop L1L2, swap L4L5 and L5S1, move L3 one voxel along array axis 1."""
    out = data.copy()
    out[data == L1L2] = 0
    out[data == L4L5], out[data == L5S1] = L5S1, L4L5
    l3 = data == L3
    out[l3] = 0
    out[:, 1:][l3[:, :-1]] = L3
    return out, affine


def test_identical_datasets_agree_perfectly(truth, tmp_path, caplog):
    pred = _predicted(truth, tmp_path / "pred")
    with caplog.at_level(logging.WARNING, logger="spineqprep"):
        table = evaluate_datasets(pred, truth)
    assert "desc-tissues_dseg" in caplog.text  # the truth's detailed images have no prediction
    assert set(table["participant_id"]) == {"sub-01", "sub-02"}
    assert set(table["acq"]) == {"sag", "mapss", "ute"}
    assert table["session_id"].isna().all() and "desc" not in table.columns
    assert set(table["level"]) >= {"L1L2", "L4L5", "L5S1", "L3", "S1"}
    assert (table[["dice", "dice_2d", "dice_central50", "sensitivity", "precision",
                   "specificity"]] == 1.0).all().all()
    assert (table[["msd_mm", "hd95_mm", "volume_diff_pct"]] == 0.0).all().all()
    assert table[["roc_auc", "pr_auc"]].isna().all().all()
    assert not table["resampled"].any()
    summary = summarise_levels(table)
    assert set(summary["acq"]) == {"sag", "mapss", "ute"}
    per_level = summary.set_index(["acq", "level"])
    assert per_level.loc[("mapss", "L4L5"), "n"] == 2
    assert per_level.loc[("mapss", "L4L5"), "dice_mean"] == 1.0


def test_perturbed_prediction_gives_the_expected_metrics(truth, tmp_path):
    pred = _predicted(truth, tmp_path / "pred", _perturb)
    table = evaluate_datasets(pred, truth, labels=["L1L2", "L3", "L4L5", "L5S1"])
    assert list(table["level"].unique()) == ["L1L2", "L3", "L4L5", "L5S1"]
    for ref_file, rows in table.groupby("ref_file"):
        img = nib.load(truth / ref_file)
        ref = np.asarray(img.dataobj)
        spacing = voxel_spacing(img.affine)
        row = rows.set_index("level")
        if (ref == L1L2).any():
            assert row.loc["L1L2", "dice"] == 0.0 and row.loc["L1L2", "sensitivity"] == 0.0
            assert row.loc["L1L2", "volume_diff_pct"] == -100.0
            assert np.isnan(row.loc["L1L2", "precision"]) and np.isnan(row.loc["L1L2", "msd_mm"])
        for level in ("L4L5", "L5S1"):
            assert row.loc[level, "dice"] == 0.0
        l3 = ref == L3
        n = l3.sum()
        if n == 0:  # not on this grid (UTE crop): requested, so reported, as absent in both
            assert row.loc["L3", "dice"] == 1.0 and row.loc["L3", "pred_voxels"] == 0
            continue
        # same volume: Dice = fraction of L3 voxels whose neighbour along axis 1 is L3 too
        expected = (l3[:, 1:] & l3[:, :-1]).sum() / n
        assert row.loc["L3", "dice"] == pytest.approx(expected)
        assert row.loc["L3", "sensitivity"] == pytest.approx(expected)
        assert row.loc["L3", "pred_voxels"] == row.loc["L3", "ref_voxels"] == n
        # a one-voxel shift moves each boundary voxel onto the other boundary
        assert 0 < row.loc["L3", "msd_mm"] <= row.loc["L3", "hd95_mm"] <= spacing[1] + 1e-9
        assert row.loc["L3", "ref_volume_mm3"] == pytest.approx(n * np.prod(spacing))


def _upsample(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel split in 2 x 2 along axes 1 and 2 (the same labels on a finer grid)."""
    finer = np.repeat(np.repeat(data, 2, axis=1), 2, axis=2)
    return finer, affine @ np.array([[1, 0, 0, 0], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25],
                                     [0, 0, 0, 1]])


def test_prediction_on_another_grid_is_resampled(truth, tmp_path, caplog):
    pred = _predicted(truth, tmp_path / "pred", _upsample)
    with caplog.at_level(logging.WARNING, logger="spineqprep"):
        table = evaluate_datasets(pred, truth)
    assert "resampled onto it" in caplog.text
    assert table["resampled"].all()
    assert (table["dice"] == 1.0).all()


def test_levels_are_matched_by_abbreviation_across_numberings(truth, tmp_path):
    """A manual dataset numbering only the discs 1..5 compares with the truth's 120..124."""
    discs = {120: 1, 121: 2, 122: 3, 123: 4, 124: 5}

    def renumber(data, affine):
        out = np.zeros_like(data)
        for old, new in discs.items():
            out[data == old] = new
        return out, affine

    pred = _predicted(truth, tmp_path / "pred", renumber)
    lut = pd.read_csv(truth / "dseg.tsv", sep="\t")
    lut = lut[lut["index"].isin(discs)].assign(index=lambda t: t["index"].map(discs))
    lut[["index", "name", "abbreviation"]].to_csv(pred / "dseg.tsv", sep="\t", index=False)
    table = evaluate_datasets(pred, truth)
    labelled = table["level"].isin(["L1L2", "L2L3", "L3L4", "L4L5", "L5S1"])
    assert (table.loc[labelled, "dice"] == 1.0).all()
    assert set(table.loc[labelled, "index"]) <= set(discs)  # the reference's labels are reported
    # the truth's discs above L1L2 are missed discs (Dice 0); its vertebrae are not charged to
    # a disc-only prediction
    missed = table[~labelled]
    assert set(missed["level"]) == {"T11T12", "T12L1"}
    assert (missed["dice"] == 0).all() and (missed["pred_voxels"] == 0).all()


def test_probability_maps_give_aucs(truth, tmp_path):
    pred = _predicted(truth, tmp_path / "pred")
    ref_path = next(p for p in _main_dsegs(truth) if "acq-mapss" in p.name)
    img = nib.load(ref_path)
    ref = np.asarray(img.dataobj) == L4L5
    rng = np.random.default_rng(1)
    prob = np.clip(ndimage.gaussian_filter(ref.astype(float), 1.0)
                   + rng.normal(0, 0.1, ref.shape), 0, 1).astype(np.float32)
    name = ref_path.name.replace("_dseg", "_label-L4L5_probseg")
    nib.save(nib.Nifti1Image(prob, img.affine), pred / ref_path.relative_to(truth).parent / name)
    table = evaluate_datasets(pred, truth, labels=["L4L5"])
    row = table[table["ref_file"] == ref_path.relative_to(truth).as_posix()].iloc[0]
    assert row["roc_auc"] == pytest.approx(roc_auc_score(ref.ravel(), prob.ravel()), abs=1e-9)
    assert row["pr_auc"] == pytest.approx(average_precision_score(ref.ravel(), prob.ravel()),
                                          abs=1e-9)
    assert 0.9 < row["roc_auc"] < 1.0
    assert table.drop(index=row.name)["roc_auc"].isna().all()


def test_dataset_errors(truth, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        evaluate_datasets(tmp_path / "nowhere", truth)
    pred = _predicted(truth, tmp_path / "pred")
    with pytest.raises(UsageError, match="'L9L10' is in neither"):
        evaluate_datasets(pred, truth, labels=["L9L10"])
    with pytest.raises(UsageError, match="not label images"):
        evaluate_datasets(pred, truth, suffix="probseg")
    pd.DataFrame({"index": [1], "name": ["thing"], "abbreviation": ["X"]}).to_csv(
        pred / "dseg.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="share no abbreviation"):
        evaluate_datasets(pred, truth)


# ---- command line -------------------------------------------------------------------------------
def test_cli_writes_the_per_level_table(truth, tmp_path, capsys):
    pred = _predicted(truth, tmp_path / "pred", _perturb)
    out, summary = tmp_path / "eval" / "metrics.tsv", tmp_path / "summary.tsv"
    code = main([str(pred), str(truth), str(out), "--labels", "L3", "L4L5",
                 "--summary-tsv", str(summary)])
    assert code == 0
    table = pd.read_csv(out, sep="\t", na_values="n/a", keep_default_na=False)
    assert set(table["level"]) == {"L3", "L4L5"}
    assert len(table) == 2 * len(_main_dsegs(truth))
    assert set(METRICS) <= set(table.columns)
    assert (table.loc[table["level"] == "L4L5", "dice"] == 0).all()
    levels = pd.read_csv(summary, sep="\t", na_values="n/a", keep_default_na=False)
    assert set(levels["acq"]) == {"sag", "mapss", "ute"} and (levels["n"] == 2).all()
    shown = capsys.readouterr().out
    assert "L4L5" in shown and "dice_mean" in shown


@pytest.mark.parametrize("case", ["missing_dir", "unknown_level", "disjoint_tables"])
def test_cli_errors_are_one_message(truth, tmp_path, capsys, case):
    pred = _predicted(truth, tmp_path / "pred")
    args = [str(pred), str(truth), str(tmp_path / "out.tsv")]
    expected = {"missing_dir": (2, "does not exist"), "unknown_level": (2, "'XX' is in neither"),
                "disjoint_tables": (1, "share no abbreviation")}[case]
    if case == "missing_dir":
        args[0] = str(tmp_path / "missing")
    elif case == "unknown_level":
        args += ["--labels", "XX"]
    else:
        (pred / "dseg.tsv").write_text("index\tname\tabbreviation\n1\tthing\tX\n")
    assert main(args) == expected[0]
    err = capsys.readouterr().err
    assert err.startswith("spineqprep-evaluate: error:") and expected[1] in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.tsv").exists()
