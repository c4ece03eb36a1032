"""Multiple-comparison corrections: FDR, Bonferroni and permutation inference (max-T, TFCE,
cluster extent) with the Freedman-Lane scheme.

Freedman-Lane: the data are residualised against the nuisance regressors Z (basis Q), the
residuals R are permuted (or sign-flipped), and the full model is refitted. Because the
tested regressor's residual x_r is orthogonal to Q and a signed permutation T is orthogonal,
the refit needs only ``T(x_r)' R`` and ``T(Q)' R``: a batch of B transforms is one
(B*(1+q) x n) @ (n x V) matrix product. This equals fitting ``T R + H_Z Y`` literally, and
(with the same transforms) nilearn's ``permuted_ols``. Every random draw comes from one seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

from spineqprep.stats.glm import orthonormal_basis
from spineqprep.stats.tfce import TFCE_E, TFCE_H, face_edges, max_cluster_size, tfce_batch

#: upper bound of the floats held by one batch of permuted statistics.
BATCH_FLOATS = 2**24
#: voxels (maps x voxels) per TFCE call: its output and working arrays take ~60 B per voxel.
TFCE_VOXELS = 2**21


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted P (q-values) of the finite entries of ``p``; NaN stays."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    values = p[ok]
    m = values.size
    if m == 0:
        return out
    order = np.argsort(values)
    scaled = values[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    result = np.empty(m)
    result[order] = np.minimum(adjusted, 1.0)
    out[ok] = result
    return out


def bonferroni(p: np.ndarray) -> np.ndarray:
    """Bonferroni adjusted P over the finite entries of ``p``."""
    p = np.asarray(p, dtype=float)
    return np.minimum(p * np.isfinite(p).sum(), 1.0)


@dataclass(frozen=True)
class Transforms:
    """B signed permutations of n rows: ``T_b(v) = signs[b] * v[order[b]]``."""

    order: np.ndarray  # (B, n) int
    signs: np.ndarray  # (B, n) float, +-1

    @property
    def count(self) -> int:
        """Number of transforms."""
        return int(self.order.shape[0])

    def apply(self, v: np.ndarray, rows: slice) -> np.ndarray:
        """T_b applied to ``v`` (n, ...) for the transforms in ``rows``: (b, n, ...)."""
        order, signs = self.order[rows], self.signs[rows]
        out = v[order]
        return out * signs.reshape(*signs.shape, *([1] * (v.ndim - 1)))


def make_transforms(n: int, n_perm: int, seed: int, *, sign_flip: bool = False) -> Transforms:
    """``n_perm`` random permutations (or sign flips, for one-sample tests) from ``seed``."""
    rng = np.random.default_rng(seed)
    if sign_flip:
        order = np.tile(np.arange(n), (n_perm, 1))
        signs = rng.integers(0, 2, size=(n_perm, n)) * 2.0 - 1.0
    else:
        order = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)
        signs = np.ones((n_perm, n))
    return Transforms(order=order, signs=signs)


@dataclass(frozen=True)
class PermutationResult:
    """Observed statistics and their permutation P (family-wise over the voxels)."""

    t: np.ndarray
    p_fwe: np.ndarray
    h0_max_t: np.ndarray
    tfce: np.ndarray | None = None
    p_tfce: np.ndarray | None = None
    h0_max_tfce: np.ndarray | None = None
    cluster_threshold: float | None = None
    h0_max_cluster: np.ndarray | None = None

    def cluster_p(self, size: int) -> float:
        """Family-wise P of a cluster of ``size`` voxels."""
        if self.h0_max_cluster is None:
            raise ValueError("no cluster-level null distribution was computed")
        h0 = self.h0_max_cluster
        return float((1 + (h0 >= size).sum()) / (1 + h0.size))


@contextmanager
def _numba_threads(n_procs: int) -> Iterator[None]:
    """Run the compiled TFCE kernel on at most ``n_procs`` threads."""
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n_procs, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _residualise(q: np.ndarray, a: np.ndarray) -> np.ndarray:
    return a - q @ (q.T @ a) if q.shape[1] else a.copy()


def _exceed(h0: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """(1 + #null >= observed) / (1 + B), vectorised with a sorted null."""
    srt = np.sort(h0)
    count = srt.size - np.searchsorted(srt, observed, side="left")
    return (1.0 + count) / (1.0 + srt.size)


def freedman_lane(x: np.ndarray, z: np.ndarray, data: np.ndarray, transforms: Transforms, *,
                  two_sided: bool = True, mask3d: np.ndarray | None = None,
                  tfce: bool = False, cluster_threshold: float | None = None,
                  n_procs: int = 1) -> PermutationResult:
    """Permutation inference of the t of ``x`` given ``z`` on complete ``data`` (n x V).

    ``x`` is one regressor (n,) shared by all voxels, or one per voxel (n x V, voxel-by-voxel
    analyses). ``mask3d`` (needed for TFCE and clusters) holds the V voxels in C order.
    ``cluster_threshold`` is the |t| forming clusters for cluster-extent inference.
    """
    data = np.asarray(data, dtype=float)
    n, n_vox = data.shape
    q = orthonormal_basis(np.asarray(z, dtype=float).reshape(n, -1))
    resid = _residualise(q, data)
    xr = _residualise(q, np.asarray(x, dtype=float).reshape(n, -1))
    norms = np.linalg.norm(xr, axis=0)
    xr = xr / np.where(norms > 0, norms, 1.0)
    dof = n - q.shape[1] - 1
    ss = (resid ** 2).sum(axis=0)
    identity = Transforms(order=np.arange(n)[None], signs=np.ones((1, n)))
    with threadpool_limits(limits=max(n_procs, 1)), _numba_threads(n_procs):
        t_obs = _t_batch(identity, slice(0, 1), xr, q, resid, ss, dof)[0]
        obs_score = np.abs(t_obs) if two_sided else t_obs
        per_t = n_vox * (1 + q.shape[1]) + (n * n_vox if xr.shape[1] > 1 else 0)
        step = max(1, min(transforms.count, BATCH_FLOATS // max(per_t, 1)))
        h0_t = np.empty(transforms.count)
        h0_tfce = np.empty(transforms.count) if tfce else None
        edges = face_edges(mask3d) if tfce else None
        h0_cluster = np.empty(transforms.count) if cluster_threshold is not None else None
        for start in range(0, transforms.count, step):
            rows = slice(start, min(start + step, transforms.count))
            t_perm = _t_batch(transforms, rows, xr, q, resid, ss, dof)
            score = np.abs(t_perm) if two_sided else t_perm
            h0_t[rows] = np.nanmax(score, axis=1)
            if h0_tfce is not None:
                h0_tfce[rows] = _max_tfce(t_perm, mask3d, edges, two_sided)
            if h0_cluster is not None:
                h0_cluster[rows] = max_cluster_size(t_perm, mask3d, cluster_threshold,
                                                    two_sided=two_sided)
    result = PermutationResult(t=t_obs, p_fwe=_exceed(h0_t, obs_score), h0_max_t=h0_t,
                               cluster_threshold=cluster_threshold, h0_max_cluster=h0_cluster)
    if h0_tfce is None:
        return result
    tfce_obs = tfce_batch(t_obs[None], mask3d, two_sided=two_sided)[0]
    return PermutationResult(
        t=t_obs, p_fwe=result.p_fwe, h0_max_t=h0_t, tfce=tfce_obs,
        p_tfce=_exceed(h0_tfce, np.abs(tfce_obs)), h0_max_tfce=h0_tfce,
        cluster_threshold=cluster_threshold, h0_max_cluster=h0_cluster)


def _max_tfce(t_perm: np.ndarray, mask3d: np.ndarray, edges: np.ndarray, two_sided: bool
              ) -> np.ndarray:
    """max |TFCE| of each row, in sub-batches of at most TFCE_VOXELS voxels (memory)."""
    step = max(1, TFCE_VOXELS // t_perm.shape[1])
    return np.concatenate([
        np.abs(tfce_batch(t_perm[k:k + step], mask3d, two_sided=two_sided, edges=edges)).max(1)
        for k in range(0, t_perm.shape[0], step)])


def _t_batch(transforms: Transforms, rows: slice, xr: np.ndarray, q: np.ndarray,
             resid: np.ndarray, ss: np.ndarray, dof: int) -> np.ndarray:
    """t (b, V) of the refitted model for the transforms in ``rows``."""
    b = rows.stop - rows.start
    if q.shape[1]:
        tq = transforms.apply(q, rows).transpose(0, 2, 1).reshape(b * q.shape[1], -1)
        proj = (tq @ resid).reshape(b, q.shape[1], -1)
        ss_null = ss - (proj ** 2).sum(axis=1)
    else:
        ss_null = np.broadcast_to(ss, (b, ss.size))
    if xr.shape[1] == 1:
        num = transforms.apply(xr[:, 0], rows) @ resid
    else:  # one regressor per voxel: T acts on the design rows, voxel by voxel
        num = np.einsum("bnv,nv->bv", transforms.apply(xr, rows), resid)
    rss = ss_null - num ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return num * np.sqrt(dof / rss)


def t_threshold(p: float, dof: float, *, two_sided: bool = True) -> float:
    """The |t| of an uncorrected P (cluster-forming threshold)."""
    return float(stats.t.isf(p / 2 if two_sided else p, dof))


__all__ = ["TFCE_E", "TFCE_H", "PermutationResult", "Transforms", "bonferroni", "fdr_bh",
           "freedman_lane", "make_transforms", "t_threshold"]
