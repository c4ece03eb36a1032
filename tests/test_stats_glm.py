"""The voxel-wise GLM against scipy / statsmodels fitted one voxel at a time, and the FDR and
Bonferroni corrections against statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests

from spineqprep.stats.glm import fit_contrast, partition
from spineqprep.stats.inference import bonferroni, fdr_bh

TOL = 1e-6


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(7)
    n, v = 40, 60
    age, bmi = rng.normal(45, 10, n), rng.normal(25, 3, n)
    sex = (rng.random(n) < 0.5).astype(float)
    odi = rng.normal(30, 12, n) + 0.3 * (age - 45)
    y = (rng.normal(0.1, 0.01, (n, v)) + 0.0004 * odi[:, None] * (np.arange(v) < 20)
         + 0.0003 * (age[:, None] - 45))
    missing = rng.random((n, v)) < 0.08
    missing[:, :10] = False  # complete voxels take the fast path, the others the batched one
    y[missing] = np.nan
    return {"n": n, "v": v, "age": age, "bmi": bmi, "sex": sex, "odi": odi, "y": y}


def test_partial_correlation_matches_statsmodels_per_voxel(cohort) -> None:
    c = cohort
    design = np.column_stack([np.ones(c["n"]), c["odi"], c["age"], c["sex"], c["bmi"]])
    res = fit_contrast(design, c["y"], np.array([0, 1, 0, 0, 0.0]))
    for v in range(c["v"]):
        ok = np.isfinite(c["y"][:, v])
        fit = sm.OLS(c["y"][ok, v], design[ok]).fit()
        assert res.effect[v] == pytest.approx(fit.params[1], abs=TOL * abs(fit.params[1]) + 1e-12)
        assert res.t[v] == pytest.approx(fit.tvalues[1], abs=TOL)
        assert res.p[v] == pytest.approx(fit.pvalues[1], abs=TOL)
        assert res.n[v] == ok.sum()
        # partial correlation: correlation of the residuals of y and odi given the covariates
        nuisance = design[ok][:, [0, 2, 3, 4]]
        ry = sm.OLS(c["y"][ok, v], nuisance).fit().resid
        rx = sm.OLS(c["odi"][ok], nuisance).fit().resid
        assert res.r[v] == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=TOL)


def test_pearson_and_two_sample_match_scipy(cohort) -> None:
    c = cohort
    corr = fit_contrast(np.column_stack([np.ones(c["n"]), c["odi"]]), c["y"], np.array([0, 1.0]))
    group = c["odi"] > 40
    ttest = fit_contrast(np.column_stack([np.ones(c["n"]), group]), c["y"], np.array([0, 1.0]))
    for v in range(c["v"]):
        ok = np.isfinite(c["y"][:, v])
        r, p = stats.pearsonr(c["odi"][ok], c["y"][ok, v])
        assert corr.r[v] == pytest.approx(r, abs=TOL)
        assert corr.p[v] == pytest.approx(p, abs=TOL)
        t, p = stats.ttest_ind(c["y"][ok & group, v], c["y"][ok & ~group, v])
        assert ttest.t[v] == pytest.approx(t, abs=TOL)
        assert ttest.p[v] == pytest.approx(p, abs=TOL)
    assert (corr.p[:20] < 0.05).mean() > 0.8  # the planted voxels are found


def test_voxel_regressor_matches_pearson_per_voxel(cohort) -> None:
    c = cohort
    rng = np.random.default_rng(3)
    other = c["y"] * 0.5 + rng.normal(0, 0.01, c["y"].shape)
    other[rng.random(other.shape) < 0.05] = np.nan
    res = fit_contrast(np.column_stack([np.ones(c["n"]), np.zeros(c["n"])]), c["y"],
                       np.array([0, 1.0]), voxel_regressor=other, column=1)
    for v in range(c["v"]):
        ok = np.isfinite(c["y"][:, v]) & np.isfinite(other[:, v])
        r, p = stats.pearsonr(other[ok, v], c["y"][ok, v])
        assert res.r[v] == pytest.approx(r, abs=TOL)
        assert res.p[v] == pytest.approx(p, abs=TOL)


def test_partition_keeps_the_contrast_t(cohort) -> None:
    c = cohort
    design = np.column_stack([np.ones(c["n"]), c["odi"] > 30, c["age"], c["sex"]])
    contrast = np.array([0, 1.0, 0.5, 0])
    x, z = partition(design, contrast)
    full = fit_contrast(design, c["y"][:, :10], contrast)
    split = fit_contrast(np.column_stack([x, z]), c["y"][:, :10], np.r_[1.0, np.zeros(z.shape[1])])
    np.testing.assert_allclose(split.t, full.t, atol=1e-8)


def test_fdr_and_bonferroni_match_statsmodels() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 400), rng.uniform(0, 1e-3, 40), [np.nan] * 5])
    ok = np.isfinite(p)
    np.testing.assert_allclose(fdr_bh(p)[ok], multipletests(p[ok], method="fdr_bh")[1],
                               atol=1e-12)
    np.testing.assert_allclose(bonferroni(p)[ok], multipletests(p[ok], method="bonferroni")[1],
                               atol=1e-12)
    assert np.isnan(fdr_bh(p)[~ok]).all()
