"""Permutation inference: Freedman-Lane max-T against nilearn (same permutations) and a
literal refit, the null family-wise error rate, TFCE and cluster extents against slow
references, and reruns with one seed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage, stats

from spineqprep.stats.glm import fit_contrast, orthonormal_basis
from spineqprep.stats.inference import Transforms, freedman_lane, make_transforms
from spineqprep.stats.tfce import clusters, max_cluster_size, tfce_batch

permuted_ols = pytest.importorskip("nilearn.mass_univariate").permuted_ols


def nilearn_transforms(n: int, n_perm: int, random_state: int, *,
                       sign_flip: bool = False) -> Transforms:
    """The permutations nilearn's ``permuted_ols(n_jobs=1)`` draws, as our transforms.

    nilearn seeds its one job from ``RandomState(random_state)`` and applies each draw to the
    previous order (shuffles and sign flips accumulate).
    """
    parent = np.random.RandomState(random_state)
    rng = np.random.RandomState(parent.randint(1, np.iinfo(np.int32).max - 1))
    order, signs = np.arange(n), np.ones(n)
    orders, flips = [], []
    for _ in range(n_perm):
        if sign_flip:
            signs = signs * (rng.randint(2, size=(n, 1)) * 2 - 1)[:, 0]
        else:
            order = order[rng.permutation(n)]
        orders.append(order.copy())
        flips.append(signs.copy())
    return Transforms(np.array(orders), np.array(flips, dtype=float))


@pytest.fixture(scope="module")
def strong_covariate():
    """Small n, a strong covariate correlated with the tested regressor, a planted effect."""
    rng = np.random.default_rng(1)
    n, v = 20, 400
    z = rng.normal(size=(n, 4))
    x = z[:, 0] + 0.5 * rng.normal(size=n)
    y = rng.normal(size=(n, v)) + 3 * z[:, [0]] + 2 * z[:, [1]]
    y[:, :15] += 1.2 * x[:, None]
    return {"n": n, "x": x, "z": z, "y": y}


def _naive_h0(x, z, y, transforms):
    """max |t| when the permuted design is NOT re-residualised against the covariates."""
    q = orthonormal_basis(np.column_stack([np.ones(len(x)), z]))
    r = y - q @ (q.T @ y)
    xr = x - q @ (q.T @ x)
    xr /= np.linalg.norm(xr)
    dof = len(x) - q.shape[1] - 1
    num = transforms.apply(xr, slice(0, transforms.count)) @ r
    t = num * np.sqrt(dof / ((r ** 2).sum(0) - num ** 2))
    return np.abs(t).max(axis=1)


def test_max_t_equals_nilearn_with_the_same_permutations(strong_covariate) -> None:
    d = strong_covariate
    n_perm = 500
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = permuted_ols(d["x"][:, None], d["y"], confounding_vars=d["z"],
                           model_intercept=True, n_perm=n_perm, random_state=4, n_jobs=1,
                           output_type="dict", verbose=0)
    transforms = nilearn_transforms(d["n"], n_perm, 4)
    ours = freedman_lane(d["x"], np.column_stack([np.ones(d["n"]), d["z"]]), d["y"], transforms)
    np.testing.assert_allclose(ours.t, ref["t"][0], atol=1e-6)
    np.testing.assert_allclose(ours.h0_max_t, ref["h0_max_t"][0], atol=1e-6)
    np.testing.assert_allclose(-np.log10(ours.p_fwe), ref["logp_max_t"][0], atol=1e-6)
    # skipping the re-residualisation gives a smaller null (anti-conservative): caught here
    naive = _naive_h0(d["x"], d["z"], d["y"], transforms)
    assert np.abs(naive - ref["h0_max_t"][0]).max() > 0.1
    assert np.quantile(naive, 0.95) < 0.95 * np.quantile(ref["h0_max_t"][0], 0.95)


def test_sign_flips_equal_nilearn_intercept_test() -> None:
    rng = np.random.default_rng(2)
    n, v = 16, 200
    z = rng.normal(size=(n, 2))
    y = rng.normal(size=(n, v)) + 0.4 + z[:, [0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = permuted_ols(np.ones((n, 1)), y, confounding_vars=z, model_intercept=False,
                           n_perm=300, random_state=9, n_jobs=1, output_type="dict", verbose=0)
    ours = freedman_lane(np.ones(n), z, y, nilearn_transforms(n, 300, 9, sign_flip=True))
    np.testing.assert_allclose(ours.h0_max_t, ref["h0_max_t"][0], atol=1e-6)
    np.testing.assert_allclose(ours.p_fwe, 10 ** -ref["logp_max_t"][0], atol=1e-6)


def test_fast_path_equals_literal_freedman_lane(strong_covariate) -> None:
    """Fit the full model on P R + H_Z Y, one permutation at a time."""
    d = strong_covariate
    n = d["n"]
    zz = np.column_stack([np.ones(n), d["z"]])
    design = np.column_stack([d["x"], zz])
    transforms = make_transforms(n, 20, seed=3)
    fast = freedman_lane(d["x"], zz, d["y"][:, :50], transforms)
    hat = zz @ np.linalg.pinv(zz)
    resid = d["y"][:, :50] - hat @ d["y"][:, :50]
    contrast = np.r_[1.0, np.zeros(zz.shape[1])]
    for b in range(transforms.count):
        # our transform acts on the design rows; the same as the inverse on the data rows
        inverse = np.argsort(transforms.order[b])
        data = resid[inverse] + hat @ d["y"][:, :50]
        t = fit_contrast(design, data, contrast).t
        assert np.abs(t).max() == pytest.approx(fast.h0_max_t[b], abs=1e-8)


def test_null_family_wise_error_rate_is_at_most_five_percent() -> None:
    """200 null simulations with a strong covariate: FWER of max-T at 0.05 is not above 5 %
    (one-sided binomial test), while the naive scheme's is."""
    rng = np.random.default_rng(11)
    n, v, n_sim, n_perm = 20, 300, 200, 200
    hits = naive_hits = 0
    for sim in range(n_sim):
        z = rng.normal(size=(n, 3))
        x = z[:, 0] + 0.6 * rng.normal(size=n)
        smooth = ndimage.gaussian_filter1d(rng.normal(size=(n, v)), 2, axis=1)
        y = smooth / smooth.std() + 2 * z[:, [0]] + z[:, [1]]
        transforms = make_transforms(n, n_perm, seed=sim)
        res = freedman_lane(x, np.column_stack([np.ones(n), z]), y, transforms)
        hits += bool((res.p_fwe < 0.05).any())
        naive = _naive_h0(x, z, y, transforms)
        naive_hits += bool(np.abs(res.t).max() > np.quantile(naive, 0.95))
    fwer = hits / n_sim
    print(f"null FWER {fwer:.3f} (naive {naive_hits / n_sim:.3f}) over {n_sim} simulations")
    assert stats.binomtest(hits, n_sim, 0.05, alternative="greater").pvalue > 0.05
    assert naive_hits > hits


def _tfce_reference(stat: np.ndarray, e: float = 0.5, h: float = 2.0, steps: int = 100,
                    two_sided: bool = True) -> np.ndarray:
    """The definition, voxel by voxel and step by step (fslmaths/nilearn conventions)."""
    out = np.zeros_like(stat)
    top = np.abs(stat).max() if two_sided else stat.max()
    for sign in (1, -1) if two_sided else (1,):
        for k in range(1, steps + 1):
            height = top * (k / steps)  # the top step is exactly the maximum
            labels, _ = ndimage.label(sign * stat >= height,
                                      ndimage.generate_binary_structure(3, 1))
            for index in np.ndindex(stat.shape):
                if labels[index]:
                    out[index] += sign * (labels == labels[index]).sum() ** e * height ** h
    return out


def test_tfce_matches_the_definition_and_nilearn() -> None:
    rng = np.random.default_rng(5)
    shape = (6, 5, 4)
    mask = np.ones(shape, dtype=bool)
    mask[0, 0] = False
    maps = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 1) * 4 * mask
                     for _ in range(3)])
    ours = tfce_batch(maps[:, mask], mask)
    for b in range(3):
        ref = _tfce_reference(maps[b])
        np.testing.assert_allclose(ours[b], ref[mask], rtol=1e-9, atol=1e-9)
    one_sided = tfce_batch(maps[:, mask], mask, two_sided=False, e=0.6, h=1.5, n_steps=40)
    for b in range(3):
        ref = _tfce_reference(maps[b], e=0.6, h=1.5, steps=40, two_sided=False)
        np.testing.assert_allclose(one_sided[b], ref[mask], rtol=1e-9, atol=1e-9)
    calculate_tfce = pytest.importorskip("nilearn.mass_univariate._utils").calculate_tfce
    big = np.stack([ndimage.gaussian_filter(rng.normal(size=(14, 12, 8)), 1.2) * 5
                    for _ in range(2)])
    full = np.ones(big.shape[1:], dtype=bool)
    ours = tfce_batch(big.reshape(2, -1), full)
    for b in range(2):
        ref = calculate_tfce(big[b][..., None], ndimage.generate_binary_structure(3, 1))
        np.testing.assert_allclose(ours[b], ref[..., 0].ravel(), rtol=1e-9, atol=1e-7)


def test_cluster_extent_matches_labelling_each_map() -> None:
    rng = np.random.default_rng(6)
    shape = (10, 8, 6)
    mask = np.ones(shape, dtype=bool)
    maps = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 1) * 6 for _ in range(5)])
    ours = max_cluster_size(maps.reshape(5, -1), mask, 1.5)
    struct = ndimage.generate_binary_structure(3, 1)
    for b in range(5):
        best = 0
        for sign in (1, -1):
            labels, count = ndimage.label(sign * maps[b] >= 1.5, struct)
            if count:
                best = max(best, np.bincount(labels.ravel())[1:].max())
        assert ours[b] == best
    labels, found = clusters(maps[0].ravel(), mask, 1.5)
    assert [idx.size for _, idx in found] == sorted((idx.size for _, idx in found), reverse=True)
    assert labels.max() == len(found)


def test_same_seed_same_result(strong_covariate) -> None:
    d = strong_covariate
    mask = np.ones((20, 20, 1), dtype=bool)
    zz = np.column_stack([np.ones(d["n"]), d["z"]])
    runs = [freedman_lane(d["x"], zz, d["y"], make_transforms(d["n"], 50, seed=8),
                          mask3d=mask, tfce=True, cluster_threshold=3.0) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].h0_max_t, runs[1].h0_max_t)
    np.testing.assert_array_equal(runs[0].h0_max_tfce, runs[1].h0_max_tfce)
    np.testing.assert_array_equal(runs[0].h0_max_cluster, runs[1].h0_max_cluster)
    other = freedman_lane(d["x"], zz, d["y"], make_transforms(d["n"], 50, seed=9))
    assert not np.array_equal(other.h0_max_t, runs[0].h0_max_t)
    assert runs[0].p_fwe[:15].mean() < runs[0].p_fwe[15:].mean()  # the planted voxels


def test_family_wise_p_equals_nilearn_non_parametric_inference(strong_covariate) -> None:
    """The public nilearn entry point, on images, with the permutations it draws."""
    import nibabel as nib
    import pandas as pd

    glm = pytest.importorskip("nilearn.glm.second_level")
    d = strong_covariate
    shape = (20, 20, 1)
    images = [nib.Nifti1Image(d["y"][k].reshape(shape).astype(np.float64), np.eye(4))
              for k in range(d["n"])]
    mask = nib.Nifti1Image(np.ones(shape, dtype=np.uint8), np.eye(4))
    design = pd.DataFrame({"x": d["x"], **{f"z{k}": d["z"][:, k] for k in range(4)},
                           "intercept": np.ones(d["n"])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logp = glm.non_parametric_inference(images, design_matrix=design,
                                            second_level_contrast="x", mask=mask, n_perm=300,
                                            random_state=12, n_jobs=1, smoothing_fwhm=None,
                                            two_sided_test=True,
                                            verbose=0)
    # nilearn 0.14 switches to sign flipping when the design holds an explicit intercept
    # column (permuted_ols: one constant confound -> intercept_test = True)
    ours = freedman_lane(d["x"], np.column_stack([np.ones(d["n"]), d["z"]]), d["y"],
                         nilearn_transforms(d["n"], 300, 12, sign_flip=True))
    np.testing.assert_allclose(-np.log10(ours.p_fwe),
                               np.asarray(logp.get_fdata()).reshape(-1), atol=1e-6)
