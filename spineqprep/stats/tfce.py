"""Threshold-free cluster enhancement and cluster extents for batches of statistic maps.

A batch of B maps is one 4D array (B, x, y, z); labelling it with a structuring element that
does not connect along the batch axis labels every map at once, and ``np.bincount`` gives all
cluster sizes in one call. Conventions follow nilearn (and fslmaths): face connectivity (6
neighbours), 100 height steps from 0 to the map's largest absolute value, the sum over steps
of extent**E * h**H (not multiplied by dh), positive and negative clusters enhanced
separately for two-sided tests (the negative ones keep their sign).
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage, sparse

#: published TFCE defaults for 3D images (Smith & Nichols 2009).
TFCE_E = 0.5
TFCE_H = 2.0
TFCE_STEPS = 100


def _structure() -> np.ndarray:
    """Face connectivity within each 3D map, none across the batch axis."""
    out = np.zeros((3, 3, 3, 3), dtype=bool)
    out[1] = ndimage.generate_binary_structure(3, 1)
    return out


def _label_batch(above: np.ndarray, mask3d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels of the in-mask voxels (B, V), size of each label) of a batch of binary maps."""
    vol = np.zeros((above.shape[0], *mask3d.shape), dtype=bool)
    vol[:, mask3d] = above
    labels, n_labels = ndimage.label(vol, _structure())
    flat = labels[:, mask3d]
    return flat, np.bincount(flat.ravel(), minlength=n_labels + 1)


def face_edges(mask3d: np.ndarray) -> np.ndarray:
    """(E, 2) in-mask voxel index pairs (C order) that share a face."""
    index = np.full(mask3d.shape, -1, dtype=np.int64)
    index[mask3d] = np.arange(int(mask3d.sum()))
    pairs = []
    for axis in range(3):
        lo = np.take(index, np.arange(mask3d.shape[axis] - 1), axis=axis).ravel()
        hi = np.take(index, np.arange(1, mask3d.shape[axis]), axis=axis).ravel()
        keep = (lo >= 0) & (hi >= 0)
        pairs.append(np.stack([lo[keep], hi[keep]], axis=1))
    return np.concatenate(pairs)


def tfce_batch(stat: np.ndarray, mask3d: np.ndarray, *, two_sided: bool = True,
               e: float = TFCE_E, h: float = TFCE_H, n_steps: int = TFCE_STEPS,
               edges: np.ndarray | None = None) -> np.ndarray:
    """TFCE of each row of ``stat`` (B maps x V in-mask voxels, in ``mask3d``'s C order).

    The compiled :func:`_tfce_maps` sweeps each map once from the top height down (one
    union-find pass per map and sign, maps in parallel), so the cost is one pass over the
    voxels and face pairs, not one labelling of the volume per height.
    """
    stat = np.nan_to_num(np.atleast_2d(np.asarray(stat, dtype=float)))
    n_vox = stat.shape[1]
    pairs = face_edges(mask3d) if edges is None else edges
    top = np.abs(stat).max(axis=1) if two_sided else stat.max(axis=1)
    heights = np.maximum(top, 0.0)[:, None] * (np.arange(1, n_steps + 1) / n_steps)[None]
    ends = np.concatenate([pairs, pairs[:, ::-1]])
    adjacency = sparse.csr_matrix((np.ones(len(ends), dtype=np.int8), (ends[:, 0], ends[:, 1])),
                                  shape=(n_vox, n_vox))
    return _tfce_maps(stat, heights, adjacency.indptr.astype(np.int64),
                      adjacency.indices.astype(np.int64), float(e), float(h), two_sided)


@numba.njit(cache=True)
def _level(value: float, heights: np.ndarray) -> int:  # pragma: no cover (compiled)
    """How many of ``heights`` (ascending, equally spaced from top/n) ``value`` reaches."""
    n_steps = heights.size
    top = heights[n_steps - 1]
    if top <= 0.0 or value < heights[0]:
        return 0
    lev = min(int(value / top * n_steps), n_steps)  # rounding may err by one step
    while lev < n_steps and heights[lev] <= value:
        lev += 1
    while lev > 0 and heights[lev - 1] > value:
        lev -= 1
    return lev


@numba.njit(cache=True)
def _root(link: np.ndarray, v: int) -> int:  # pragma: no cover (compiled)
    """Root of ``v`` in the union-find forest ``link``, halving the path on the way."""
    while link[v] != v:
        link[v] = link[link[v]]
        v = link[v]
    return v


@numba.njit(parallel=True, cache=True)
def _tfce_maps(stat: np.ndarray, heights: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
               e: float, h: float, two_sided: bool) -> np.ndarray:  # pragma: no cover
    """TFCE (B x V) of each map's positive (and, two-sided, negative) clusters.

    Per map and sign, from the top step down: the voxels of that step join the forest, each
    merges with its face neighbours already in (union by size), and every root gathers
    extent**e * height**h. A root that joins another drops what the other had gathered so
    far, so a voxel's TFCE is the sum of ``gathered`` along its path to the root in
    ``parent`` (the merge tree); ``link`` is the same forest with compressed paths.
    """
    n_maps, n_vox = stat.shape
    n_steps = heights.shape[1]
    out = np.zeros((n_maps, n_vox))
    for m in numba.prange(n_maps):
        weight = heights[m] ** h
        for side in range(2 if two_sided else 1):
            sign = 1.0 - 2.0 * side
            lev = np.empty(n_vox, dtype=np.int64)
            start = np.zeros(n_steps + 2, dtype=np.int64)  # counting sort, highest first
            for v in range(n_vox):
                lev[v] = _level(sign * stat[m, v], heights[m])
                start[n_steps - lev[v] + 1] += 1
            for k in range(1, n_steps + 2):
                start[k] += start[k - 1]
            order = np.empty(n_vox, dtype=np.int64)
            fill = start.copy()
            for v in range(n_vox):
                order[fill[n_steps - lev[v]]] = v
                fill[n_steps - lev[v]] += 1
            parent = np.arange(n_vox)
            link = np.arange(n_vox)
            size = np.ones(n_vox)
            gathered = np.zeros(n_vox)
            roots = np.empty(n_vox, dtype=np.int64)
            n_roots = 0
            for step in range(n_steps, 0, -1):
                first, stop = start[n_steps - step], start[n_steps - step + 1]
                for k in range(first, stop):
                    roots[n_roots] = order[k]
                    n_roots += 1
                for k in range(first, stop):
                    v = order[k]
                    for j in range(indptr[v], indptr[v + 1]):
                        u = indices[j]
                        if lev[u] < step:
                            continue
                        a, b = _root(link, v), _root(link, u)
                        if a == b:
                            continue
                        if size[a] > size[b]:
                            a, b = b, a
                        parent[a] = b
                        link[a] = b
                        size[b] += size[a]
                        gathered[a] -= gathered[b]
                kept = 0
                for k in range(n_roots):
                    r = roots[k]
                    if parent[r] == r:
                        gathered[r] += size[r] ** e * weight[step - 1]
                        roots[kept] = r
                        kept += 1
                n_roots = kept
            for k in range(start[n_steps]):
                v = order[k]
                total = gathered[v]
                while parent[v] != v:
                    v = parent[v]
                    total += gathered[v]
                out[m, order[k]] += sign * total
    return out


def max_cluster_size(stat: np.ndarray, mask3d: np.ndarray, threshold: float, *,
                     two_sided: bool = True) -> np.ndarray:
    """Largest cluster (voxels) of ``|stat| >= threshold`` (or ``stat >=``) in each row."""
    stat = np.nan_to_num(np.atleast_2d(np.asarray(stat, dtype=float)))
    best = np.zeros(stat.shape[0])
    for sign in (1.0, -1.0) if two_sided else (1.0,):
        flat, sizes = _label_batch(stat * sign >= threshold, mask3d)
        sizes[0] = 0
        best = np.maximum(best, sizes[flat].max(axis=1, initial=0))
    return best


def clusters(stat: np.ndarray, mask3d: np.ndarray, threshold: float, *,
             two_sided: bool = True) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Clusters of one map: (label per in-mask voxel, [(sign, voxel indices) per cluster]).

    Labels are 1..K, ordered by decreasing size; 0 is no cluster.
    """
    stat = np.nan_to_num(np.asarray(stat, dtype=float))
    found: list[tuple[int, np.ndarray]] = []
    for sign in (1, -1) if two_sided else (1,):
        flat, sizes = _label_batch((stat * sign >= threshold)[None], mask3d)
        for lab in range(1, sizes.size):
            found.append((sign, np.flatnonzero(flat[0] == lab)))
    found.sort(key=lambda item: -item[1].size)
    labels = np.zeros(stat.shape, dtype=int)
    for k, (_, idx) in enumerate(found, start=1):
        labels[idx] = k
    return labels, found
