"""The general linear model of every voxel-wise analysis, vectorised over voxels.

One design ``X`` (subjects x regressors) is shared by all voxels; a contrast ``c`` picks the
tested effect. Voxels may miss some subjects (outside the inclusion range, not registered):
complete voxels are fitted with one matrix product, the others with one batched solve over
their own subjects, so each voxel's numbers equal an OLS fit of that voxel alone.
Tests are two-sided t-tests; ``r`` is the partial correlation of the tested effect given the
other regressors (Pearson's r when the only other regressor is the intercept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

#: voxels per batched solve (bounds memory to about CHUNK * p * p doubles).
CHUNK = 65536


@dataclass(frozen=True)
class ContrastResult:
    """Per-voxel results of one t contrast (NaN where a voxel has too few subjects)."""

    effect: np.ndarray  # c' beta, in the units of Y per unit of the regressor
    t: np.ndarray
    p: np.ndarray  # two-sided, uncorrected
    r: np.ndarray  # partial correlation of the tested effect
    dof: np.ndarray
    n: np.ndarray  # subjects used at each voxel


def partition(design: np.ndarray, contrast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``design`` into the tested regressor ``x`` and the nuisance ``Z`` of ``contrast``.

    Beckmann partitioning (Winkler et al. 2014): the t of ``x`` given ``Z`` equals the t of
    ``c'beta`` in the full model, so permutation schemes can act on ``x`` and ``Z`` alone.
    """
    c = np.asarray(contrast, dtype=float).reshape(-1, 1)
    inv = np.linalg.pinv(design.T @ design)
    x = design @ inv @ c @ np.linalg.pinv(c.T @ inv @ c)
    null_c = _null_space(c.T)
    if null_c.shape[1] == 0:
        return x[:, 0], np.zeros((design.shape[0], 0))
    null_c = null_c - c @ np.linalg.pinv(c.T @ inv @ c) @ c.T @ inv @ null_c
    z = design @ inv @ null_c @ np.linalg.pinv(null_c.T @ inv @ null_c)
    return x[:, 0], z


def _null_space(a: np.ndarray) -> np.ndarray:
    _, s, vt = np.linalg.svd(a)
    rank = int((s > 1e-12 * max(s.max(initial=0.0), 1.0)).sum())
    return vt[rank:].T


def orthonormal_basis(z: np.ndarray) -> np.ndarray:
    """An orthonormal basis (n x rank) of the columns of ``z``."""
    if z.shape[1] == 0:
        return z
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    return u[:, s > 1e-10 * s.max()]


def fit_contrast(design: np.ndarray, data: np.ndarray, contrast: np.ndarray, *,
                 voxel_regressor: np.ndarray | None = None, column: int = 0) -> ContrastResult:
    """Fit ``data`` (subjects x voxels, NaN = missing) on ``design`` and test ``contrast``.

    With ``voxel_regressor`` (subjects x voxels), column ``column`` of the design is replaced,
    voxel by voxel, by that voxel's values (voxel-by-voxel analyses).
    """
    design = np.asarray(design, dtype=float)
    data = np.asarray(data, dtype=float)
    c = np.asarray(contrast, dtype=float)
    n_vox = data.shape[1]
    valid = np.isfinite(data)
    if voxel_regressor is not None:
        valid &= np.isfinite(voxel_regressor)
    complete = valid.all(axis=0) if voxel_regressor is None else np.zeros(n_vox, dtype=bool)
    effect, var = np.full(n_vox, np.nan), np.full(n_vox, np.nan)
    dof = np.zeros(n_vox)
    if complete.any():
        e, v, d = _fit_complete(design, data[:, complete], c)
        effect[complete], var[complete], dof[complete] = e, v, d
    for start in range(0, n_vox, CHUNK):
        idx = np.flatnonzero(~complete[start:start + CHUNK]) + start
        if idx.size == 0:
            continue
        x = design
        if voxel_regressor is not None:
            x = np.repeat(design[:, None, :], idx.size, axis=1)
            x[:, :, column] = np.nan_to_num(voxel_regressor[:, idx])
        e, v, d = _fit_missing(x, data[:, idx], valid[:, idx], c)
        effect[idx], var[idx], dof[idx] = e, v, d
    ok = (dof > 0) & np.isfinite(var) & (var > 0)
    t = np.full(n_vox, np.nan)
    t[ok] = effect[ok] / np.sqrt(var[ok])
    p_val = np.full(n_vox, np.nan)
    p_val[ok] = 2 * stats.t.sf(np.abs(t[ok]), dof[ok])
    r = np.full(n_vox, np.nan)
    r[ok] = t[ok] / np.sqrt(t[ok] ** 2 + dof[ok])
    effect[~ok] = np.nan
    return ContrastResult(effect=effect, t=t, p=p_val, r=r, dof=np.where(ok, dof, np.nan),
                          n=valid.sum(axis=0))


def _fit_complete(x: np.ndarray, y: np.ndarray, c: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inv = np.linalg.pinv(x.T @ x)
    beta = inv @ (x.T @ y)
    resid = y - x @ beta
    rank = np.linalg.matrix_rank(x)
    dof = x.shape[0] - rank
    sigma2 = (resid ** 2).sum(axis=0) / max(dof, 1)
    return c @ beta, sigma2 * float(c @ inv @ c), np.full(y.shape[1], float(dof))


def _fit_missing(x: np.ndarray, y: np.ndarray, valid: np.ndarray, c: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-voxel OLS on each voxel's own subjects, as one batched solve.

    ``x`` is one design (n x p) or one per voxel (n x V x p).
    """
    w = valid.astype(float)
    y0 = np.where(valid, y, 0.0)
    if x.ndim == 2:
        xtx = np.einsum("nv,ni,nj->vij", w, x, x, optimize=True)
        xty = np.einsum("nv,ni->vi", y0, x)
    else:
        xtx = np.einsum("nv,nvi,nvj->vij", w, x, x, optimize=True)
        xty = np.einsum("nv,nvi->vi", y0, x)
    n_v = w.sum(axis=0)
    p = x.shape[-1]
    ranks = np.linalg.matrix_rank(xtx)
    inv = np.linalg.pinv(xtx)
    beta = np.einsum("vij,vj->vi", inv, xty)
    fitted = x @ beta.T if x.ndim == 2 else np.einsum("nvi,vi->nv", x, beta)
    resid = np.where(valid, y - fitted, 0.0)
    dof = np.where(ranks == p, n_v - p, 0.0)
    sigma2 = (resid ** 2).sum(axis=0) / np.maximum(dof, 1)
    return beta @ c, sigma2 * np.einsum("i,vij,j->v", c, inv, c), dof
