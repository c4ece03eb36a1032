"""Threshold-free cluster enhancement and cluster extents for batches of statistic maps.

A batch of B maps is one 4D array (B, x, y, z); labelling it with a structuring element that
does not connect along the batch axis labels every map at once, and ``np.bincount`` gives all
cluster sizes in one call. Conventions follow nilearn (and fslmaths): face connectivity (6
neighbours), 100 height steps from 0 to the map's largest absolute value, the sum over steps
of extent**E * h**H (not multiplied by dh), positive and negative clusters enhanced
separately for two-sided tests (the negative ones keep their sign).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

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

    Each voxel's level is the number of height steps it survives; :func:`_tfce_levels` sweeps
    all B maps at once (one union-find pass from the top height down, per sign), so the cost is
    one pass over the voxels and face pairs, not one labelling of the volume per height.
    """
    stat = np.nan_to_num(np.atleast_2d(np.asarray(stat, dtype=float)))
    n_maps, n_vox = stat.shape
    pairs = face_edges(mask3d) if edges is None else edges
    top = np.abs(stat).max(axis=1) if two_sided else stat.max(axis=1)
    heights = np.maximum(top, 0.0)[:, None] * (np.arange(1, n_steps + 1) / n_steps)[None]
    offsets = (np.arange(n_maps) * n_vox)[:, None]
    ends = np.stack([(pairs[:, 0][None] + offsets).ravel(),
                     (pairs[:, 1][None] + offsets).ravel()], axis=1)
    out = np.zeros(n_maps * n_vox)
    for sign in (1.0, -1.0) if two_sided else (1.0,):
        out += sign * _tfce_levels(_levels(stat * sign, heights), ends, heights, e, h)
    return out.reshape(n_maps, n_vox)


def _levels(signed: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Per voxel, how many of its map's heights it reaches (``searchsorted(..., "right")``):
    the rounded ratio to the top height, corrected by one step where rounding erred."""
    n_steps = heights.shape[1]
    top = heights[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(top > 0, signed / top * n_steps, 0.0)
    level = np.clip(np.floor(ratio), 0, n_steps).astype(np.int64)
    padded = np.concatenate([heights, np.full((heights.shape[0], 1), np.inf)], axis=1)
    rows = np.arange(heights.shape[0])[:, None]
    level += padded[rows, level] <= signed
    level -= (level > 0) & (padded[rows, np.maximum(level - 1, 0)] > signed)
    level[top[:, 0] <= 0] = 0
    return level


def _tfce_levels(level: np.ndarray, ends: np.ndarray, heights: np.ndarray, e: float,
                 h: float) -> np.ndarray:
    """Unsigned TFCE of voxels given the number of steps each survives (``level``, B x V).

    Kruskal-style, from the top step down: each step adds the voxels and face pairs of that
    level and merges the components they touch (union-find; the few touched components are
    grouped by one small sparse labelling). Every root gathers extent**e * height**h at each
    step; a voxel's TFCE is the sum of ``gathered`` along its path to the root (pointer
    jumping), see :func:`_merge`. Cost: each voxel and pair once, plus the current components
    at each step.
    """
    n_vox = level.shape[1]
    node_level = level.ravel()
    n_nodes = node_level.size
    edge_level = np.minimum(node_level[ends[:, 0]], node_level[ends[:, 1]])
    n_steps = heights.shape[1]
    dtype = np.uint8 if n_steps < 256 else np.uint16
    node_order = np.argsort(node_level.astype(dtype), kind="stable")
    edge_order = np.argsort(edge_level.astype(dtype), kind="stable")
    node_bounds = np.searchsorted(node_level[node_order], np.arange(n_steps + 2))
    edge_bounds = np.searchsorted(edge_level[edge_order], np.arange(n_steps + 2))
    parent = np.arange(n_nodes)  # the component tree (for the path sums)
    link = np.arange(n_nodes)  # the same forest with compressed paths (to find roots)
    size = np.ones(n_nodes)
    gathered = np.zeros(n_nodes)
    owner = np.arange(n_nodes) // n_vox
    roots = np.zeros(0, dtype=np.int64)
    for step in range(n_steps, 0, -1):
        new_nodes = node_order[node_bounds[step]:node_bounds[step + 1]]
        new_pairs = ends[edge_order[edge_bounds[step]:edge_bounds[step + 1]]]
        if new_pairs.size:
            a, b = _find(link, new_pairs.ravel()).reshape(-1, 2).T
            apart = a != b
            if apart.any():
                _merge(a[apart], b[apart], parent, link, size, gathered)
        candidates = np.concatenate([roots, new_nodes])
        roots = candidates[parent[candidates] == candidates]
        gathered[roots] += size[roots] ** e * heights[owner[roots], step - 1] ** h
    # path sums to the root: value(c) = gathered(c) + value(parent(c)), by pointer jumping
    sentinel = n_nodes
    up = np.append(parent, sentinel)
    up[:n_nodes][parent == np.arange(n_nodes)] = sentinel
    value = np.append(gathered, 0.0)
    while (up[:n_nodes] != sentinel).any():
        value, up = value + value[up], up[up]
    return value[:n_nodes]


def _merge(a: np.ndarray, b: np.ndarray, parent: np.ndarray, link: np.ndarray,
           size: np.ndarray, gathered: np.ndarray) -> None:
    """Join the roots paired in ``a``/``b``: each group under its largest root (union by
    size). A joining root's ``gathered`` drops what its new parent had gathered so far, so the
    path sum from it counts the parent's contributions from this step on only."""
    ids, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    graph = sparse.csr_matrix(
        (np.ones(a.size, dtype=np.int8), (inverse[:a.size], inverse[a.size:])),
        shape=(ids.size, ids.size))
    n_groups, group = csgraph.connected_components(graph, directed=False)
    order = np.lexsort((-size[ids], group))
    first = np.ones(ids.size, dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    head = np.empty(n_groups, dtype=np.int64)
    head[group[order][first]] = ids[order][first]
    totals = np.bincount(group, weights=size[ids], minlength=n_groups)
    target = head[group]
    joining = ids != target
    gathered[ids[joining]] -= gathered[target[joining]]
    parent[ids[joining]] = target[joining]
    link[ids[joining]] = target[joining]
    size[head] = totals


def _find(link: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Roots of ``items`` in the union-find forest ``link`` (compressing their paths)."""
    root = link[items]
    todo = np.flatnonzero(link[root] != root)
    while todo.size:
        root[todo] = link[root[todo]]
        todo = todo[link[root[todo]] != root[todo]]
    link[items] = root
    return root


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
