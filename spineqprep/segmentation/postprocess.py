"""From class probabilities to an anatomically labelled spine segmentation (pure numpy/scipy).

As published (METHODS.md section 1): threshold each class (cut-off per structure, 0.5 by
default), keep 3D connected components above a size, and label the levels inferior to superior.
The size limit is a volume in mm^3 (the published 125 voxels were at one resolution) so that it
means the same on every grid. Levels are anchored on the sacrum: the components are chained from
the sacrum upwards along the column, following its curve in scanner (world, mm) coordinates, and
named L5, L4, ... T12 (T11 and above with the same SPINEPS/VerSe numbering); a disc takes the
label of the vertebra above it plus 100. Every doubt (no sacrum, a missing or extra component,
merged bodies, a disc without its neighbours, implausible spacing) is written to ``flags``; the
labelling is ``confident`` only when there is none (components removed off the column are a
note: they take no part in the labelling). Without a sacrum the vertebrae get generic indices
(:data:`GENERIC_BODY` + i, :data:`GENERIC_DISC` + i, counted from the lowest one seen) because
no other cue in these images tells the level reliably.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

#: Class order of the segmentation networks (the bundle's ``meta["classes"]``).
CLASSES: tuple[str, ...] = ("background", "vertebral_body", "sacrum", "disc")
BODY, SACRUM, DISC = "vertebral_body", "sacrum", "disc"
#: Published binarisation cut-off (METHODS.md section 1); one per structure.
DEFAULT_CUTOFFS: dict[str, float] = {BODY: 0.5, SACRUM: 0.5, DISC: 0.5}
#: Smallest component kept, mm^3. The published 125 voxels for discs (data set B, about
#: 0.8 x 1.6 mm in plane) are 300-600 mm^3 for plausible slice thicknesses; a whole lumbar disc is
#: 5-15 cm^3 and a vertebral body 20-40 cm^3, so these drop only noise and slivers.
DEFAULT_MIN_VOLUME_MM3: dict[str, float] = {BODY: 800.0, SACRUM: 800.0, DISC: 300.0}
#: SPINEPS/VerSe numbering: T1-T12 = 8-19, L1-L5 = 20-24, S1 = 26; disc = vertebra above + 100.
SACRUM_LABEL = 26
VERTEBRA_NAMES_UP: tuple[str, ...] = ("L5", "L4", "L3", "L2", "L1",
                                      *(f"T{i}" for i in range(12, 0, -1)))
#: Generic indices when the level is unknown: body i (1 = lowest seen) = 1000 + i, the disc
#: below body i = 1100 + i.
GENERIC_BODY, GENERIC_DISC = 1000, 1100
#: Spacing of consecutive vertebral bodies (centroid to centroid, mm) regarded as plausible for
#: an adult lumbar/thoracolumbar spine, and the priors used when fewer than two bodies are seen.
PLAUSIBLE_SPACING_MM = (18.0, 60.0)
PRIOR_SPACING_MM, PRIOR_GAP_MM = 38.0, 10.0


@dataclass
class SpineLabels:
    """Result of :func:`label_spine`.

    ``dseg``: uint16 labels on the input grid; ``levels``: abbreviation -> label of every
    structure in ``dseg`` (e.g. ``{"S1": 26, "L5": 24, "L5S1": 124}``); ``flags``: reasons the
    labelling is doubtful; ``confident``: no flag."""

    dseg: np.ndarray
    levels: dict[str, int]
    flags: list[str] = field(default_factory=list)
    confident: bool = True


@dataclass
class _Component:
    cls: str
    voxels: np.ndarray  # (n, 3) int
    points: np.ndarray  # (n, 3) world mm
    centroid: np.ndarray
    touches_border: bool
    level: int = 0  # 0 = sacrum, k >= 1 = k-th vertebra above it
    parts: list[tuple[np.ndarray, int]] = field(default_factory=list)  # (voxels, level) if split


def vertebra_label(k: int) -> int:
    """Label of the ``k``-th vertebra above the sacrum (1 = L5 = 24, 6 = T12 = 19)."""
    return 25 - k if k >= 1 else SACRUM_LABEL


def vertebra_name(k: int) -> str:
    return VERTEBRA_NAMES_UP[k - 1] if k >= 1 else "S1"


def disc_label(k: int) -> int:
    """Label of the disc below the ``k``-th vertebra (1 = L5S1 = 124)."""
    return vertebra_label(k) + 100


def disc_name(k: int) -> str:
    return vertebra_name(k) + vertebra_name(k - 1)


def class_map(probs: np.ndarray, classes: Sequence[str] = CLASSES,
              cutoffs: Mapping[str, float] | None = None) -> np.ndarray:
    """Index into ``classes`` per voxel: among the structures whose probability reaches their
    cut-off, the most probable; background (0) where none does. ``probs``: (..., n_classes)."""
    cut = {**DEFAULT_CUTOFFS, **(cutoffs or {})}
    unknown = set(cut) - set(classes)
    if unknown:
        raise ValueError(f"cut-offs for unknown structures {sorted(unknown)}; "
                         f"structures are {list(classes[1:])}")
    scores = np.where(np.stack([probs[..., i] >= cut.get(c, 0.5) if i else
                                np.zeros(probs.shape[:-1], bool)
                                for i, c in enumerate(classes)], axis=-1), probs, -1.0)
    best = np.argmax(scores, axis=-1)
    return np.where(np.take_along_axis(scores, best[..., None], -1)[..., 0] >= 0, best, 0)




def _world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def _components(cmap: np.ndarray, affine: np.ndarray, classes: Sequence[str],
                min_volume: Mapping[str, float], inplane: Sequence[int]) -> list[_Component]:
    """Face-connected components of each structure at least ``min_volume`` mm^3."""
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    structure = ndimage.generate_binary_structure(3, 1)
    found = []
    for i, cls in enumerate(classes):
        if i == 0 or cls not in (BODY, SACRUM, DISC):
            continue
        labels, _ = ndimage.label(cmap == i, structure)
        for j, sl in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[sl] == j
            if np.count_nonzero(mask) * voxel_mm3 < min_volume[cls]:
                continue
            pieces = split_joined_bodies(mask, affine, min_volume[cls]) if cls == BODY \
                else [np.argwhere(mask)]
            corner = np.array([s.start for s in sl])
            for local in pieces:
                voxels = local + corner
                points = _world(affine, voxels.astype(float))
                border = any(voxels[:, a].min() == 0 or voxels[:, a].max() == cmap.shape[a] - 1
                             for a in inplane)
                found.append(_Component(cls, voxels, points, points.mean(0), border))
    return found


#: the core of a vertebral body: its voxels at least this share of the component's largest
#: distance to the surface (bodies joined by a thin bridge have one core each); a core under
#: this share of the largest core's volume is a speck, not a body
CORE_SHARE = 0.4


def split_joined_bodies(mask: np.ndarray, affine: np.ndarray, min_volume_mm3: float
                         ) -> list[np.ndarray]:
    """Voxels (n, 3) of each vertebral body in a body component ``mask``: one array, or one per
    core when bodies are joined by a bridge (seen on real 1 mm images: lateral slices read as
    bone around the discs chain four bodies into one component). The cores are the parts of the
    component deeper than :data:`CORE_SHARE` of its deepest point; every voxel goes to the
    nearest core. Split only when every part holds ``min_volume_mm3`` and every two cores lie
    at least a plausible vertebral spacing apart, so that a body with a dark band across it
    (a vein, a lesion) stays whole."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=zooms)[1:-1, 1:-1, 1:-1]
    cores = ndimage.label(depth >= CORE_SHARE * depth.max())[0]
    sizes = np.bincount(cores.ravel())[1:]
    kept = np.flatnonzero(sizes >= CORE_SHARE * sizes.max()) + 1  # specks are no cores
    cores = np.where(np.isin(cores, kept), cores, 0)
    voxels = np.argwhere(mask)
    if len(kept) < 2:
        return [voxels]
    centres = np.array(ndimage.center_of_mass(mask, cores, kept)) * zooms
    if min(np.linalg.norm(a - b) for k, a in enumerate(centres) for b in centres[k + 1:]) \
            < PLAUSIBLE_SPACING_MM[0]:
        return [voxels]
    core_voxels = np.argwhere(cores > 0)
    nearest = cKDTree(core_voxels * zooms).query(voxels * zooms)[1]
    owner = cores[tuple(core_voxels[nearest].T)]
    parts = [voxels[owner == k] for k in kept]
    voxel_mm3 = float(np.prod(zooms))
    if min(len(p) for p in parts) * voxel_mm3 < min_volume_mm3:
        return [voxels]
    return parts


def _gap(a: _Component, b: _Component) -> float:
    """Smallest distance (mm) between the voxel centres of two components."""
    small, big = (a, b) if len(a.points) < len(b.points) else (b, a)
    return float(cKDTree(big.points).query(small.points, k=1)[0].min())


def _chain(start: np.ndarray, direction: np.ndarray, nodes: list[_Component],
           first: int | None = None) -> list[int]:
    """Order ``nodes`` upwards from ``start``: ``first`` (if given), then repeatedly the nearest
    unvisited component ahead of the current direction (within 60 degrees, at most 120 mm), the
    direction following the steps so that the chain bends with the lordosis instead of running
    along scanner z."""
    cur, order = start, []
    remaining = set(range(len(nodes)))
    if first is not None:
        step = nodes[first].centroid - start
        direction = step / np.linalg.norm(step)
        cur = nodes[first].centroid
        order.append(first)
        remaining.discard(first)
    while remaining:
        best, best_cost = None, np.inf
        for i in remaining:
            v = nodes[i].centroid - cur
            dist = float(np.linalg.norm(v))
            cos = float(v @ direction) / dist if dist > 0 else 0.0
            if cos < 0.5 or dist > 120.0:
                continue
            cost = dist * (2.0 - cos)
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        step = nodes[best].centroid - cur
        direction = direction + step / np.linalg.norm(step)
        direction /= np.linalg.norm(direction)
        cur = nodes[best].centroid
        order.append(best)
        remaining.discard(best)
    return order


def _axis_at(chain: list[_Component], i: int, start: np.ndarray) -> np.ndarray:
    """Local direction of the column at chain position ``i`` (from its neighbours)."""
    lo = chain[i - 1].centroid if i > 0 else start
    hi = chain[i + 1].centroid if i + 1 < len(chain) else chain[i].centroid
    if np.allclose(hi, lo):
        hi, lo = chain[i].centroid, lo
    v = hi - lo
    n = np.linalg.norm(v)
    return v / n if n > 0 else np.array([0.0, 0.0, 1.0])


def _extent(comp: _Component, axis: np.ndarray, affine: np.ndarray) -> float:
    """Length (mm) of a component along ``axis``, voxel size included."""
    proj = comp.points @ axis
    return float(proj.max() - proj.min() + np.abs(affine[:3, :3].T @ axis).sum() / 3)


def _joint_extent(a: _Component, b: _Component, axis: np.ndarray) -> float:
    """Length (mm) along ``axis`` of two components together."""
    proj = np.concatenate([a.points @ axis, b.points @ axis])
    return float(proj.max() - proj.min())


def _inside(affine: np.ndarray, shape: Sequence[int], point: np.ndarray) -> bool:
    ijk = np.linalg.solve(affine[:3, :3], point - affine[:3, 3])
    return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.asarray(shape) - 0.5))


def _stats(bodies: list[_Component], gaps: list[float], axes: list[np.ndarray],
           affine: np.ndarray) -> tuple[float, float]:
    """Level spacing ``s`` (body height + disc gap) and disc gap ``d`` (body surface to body
    surface): medians over the bodies not cut by the field of view, priors if there are none.
    Heights, not centroid distances, so that one merged or missing body does not move ``s``."""
    heights = [_extent(b, a, affine) for b, a in zip(bodies, axes, strict=True)
               if not b.touches_border]
    gap = float(np.median(gaps)) if gaps else PRIOR_GAP_MM
    spacing = float(np.median(heights)) + gap if heights else PRIOR_SPACING_MM
    return spacing, gap


def label_spine(probs: np.ndarray, affine: np.ndarray, *, classes: Sequence[str] = CLASSES,
                cutoffs: Mapping[str, float] | None = None,
                min_volume_mm3: Mapping[str, float] | None = None,
                slice_axis: int | None = None) -> SpineLabels:
    """Label vertebral bodies, sacrum and discs by anatomical level from class probabilities
    ``probs`` (X, Y, Z, n_classes; softmax output or any per-class probability) on the grid of
    ``affine``. ``cutoffs`` and ``min_volume_mm3`` override the defaults per structure
    (keys of ``classes``); ``slice_axis`` is the sagittal array axis (found from the affine if
    omitted) and only serves to tell in-plane field-of-view cuts from slab ends."""
    probs = np.asarray(probs, float)
    affine = np.asarray(affine, float)
    if probs.ndim != 4 or probs.shape[-1] != len(classes):
        raise ValueError(f"probabilities of shape {probs.shape} do not match {len(classes)} "
                         "classes (expected X, Y, Z, n_classes)")
    shape = probs.shape[:3]
    if slice_axis is None:
        cols = affine[:3, :3]
        slice_axis = int(np.argmax(np.abs(cols[0]) / np.linalg.norm(cols, axis=0)))
    inplane = [a for a in range(3) if a != slice_axis]
    min_volume = {**DEFAULT_MIN_VOLUME_MM3, **(min_volume_mm3 or {})}
    comps = _components(class_map(probs, classes, cutoffs), affine, classes, min_volume, inplane)
    flags: list[str] = []
    sacra, others = _sacrum_pieces(comps, affine)
    anchored = bool(sacra)
    if not others:
        return SpineLabels(np.zeros(shape, np.uint16), {"S1": SACRUM_LABEL} if anchored else {},
                           ["no vertebral body or disc found"], False)
    up = np.array([0.0, 0.0, 1.0])
    lowest = int(np.argmin([c.centroid @ up for c in others]))
    start = others[lowest].centroid - 5.0 * up  # the chain without a sacrum
    order = _chain(start, up, others, lowest)
    if anchored:  # the first step: normally the L5S1 disc, see _first_step
        sacra = _anchor_first(sacra, others, up)
        from_sacrum = _chain(sacra[0].centroid, up, others, _first_step(sacra[0], others, up))
        if _volume(others, from_sacrum) >= COLUMN_SHARE * _volume(others, order):
            start, order = sacra[0].centroid, from_sacrum
        else:
            anchored = False
            flags.append("the sacrum found is not at the lower end of the spinal column: "
                         "vertebral levels left unlabelled (generic indices)")
    else:
        flags.append("no sacrum in the field of view: vertebral levels left unlabelled "
                     "(generic indices)")
    chain = [others[i] for i in order]
    # small sacrum-class pieces besides the anchor are misread bits of bone, not a sacrum
    stray = [c for c in sacra[1:] if len(c.points) < SACRUM_FRAGMENT * len(sacra[0].points)]
    sacra = [c for c in sacra if all(c is not x for x in stray)]
    off = len(others) - len(chain) + len(stray) + (0 if anchored else len(sacra))
    if off:
        flags.append(f"{off} component(s) off the spinal column removed")
    _assign_levels(chain, sacra[0] if anchored else None, start, affine, shape, flags)
    if anchored:
        for extra in sacra[1:]:
            if chain and any(c.cls == BODY for c in chain) and \
                    (extra.centroid - start) @ _axis_at(chain, 0, start) > 15.0:
                flags.append("a sacrum component lies above the lowest vertebral body")
    return _write(chain, sacra if anchored else [], anchored, shape, flags)


def _merge(parts: list[_Component], cls: str) -> _Component:
    voxels = np.concatenate([c.voxels for c in parts])
    points = np.concatenate([c.points for c in parts])
    return _Component(cls, voxels, points, points.mean(0), any(c.touches_border for c in parts))


#: a vertebral body under this fraction of the median body volume that touches the sacrum is
#: a piece of the sacrum (an L5 body is never that small unless the field of view cuts it)
SACRUM_FRAGMENT = 0.25


def _sacrum_pieces(comps: list[_Component], affine: np.ndarray
                   ) -> tuple[list[_Component], list[_Component]]:
    """(sacrum components, largest first; the other components). Touching sacrum components
    are one sacrum (thick sagittal slices split it in halves), and a small "vertebral body"
    touching the sacrum joins it: on coarse grids either one made the column start one level
    off."""
    touch = float(np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)))  # voxel diagonal
    sacra = [c for c in comps if c.cls == SACRUM]
    others = [c for c in comps if c.cls != SACRUM]
    volumes = [len(c.points) for c in others if c.cls == BODY and not c.touches_border]
    small = SACRUM_FRAGMENT * float(np.median(volumes)) if volumes else 0.0
    pieces = [c for c in others if c.cls == BODY and len(c.points) < small
              and any(_gap(c, s) <= touch for s in sacra)]
    others = [c for c in others if all(c is not p for p in pieces)]
    groups: list[list[_Component]] = []
    for c in sorted(sacra + pieces, key=lambda c: c.cls != SACRUM):  # sacrum parts first
        near = [g for g in groups if any(_gap(c, m) <= touch for m in g)]
        merged = [c] + [m for g in near for m in g]
        groups = [g for g in groups if all(g is not n for n in near)] + [merged]
    joined = [_merge(g, SACRUM) if len(g) > 1 else g[0] for g in groups
              if any(m.cls == SACRUM for m in g)]
    return sorted(joined, key=lambda c: -len(c.points)), others


def _anchor_first(sacra: list[_Component], others: list[_Component], up: np.ndarray
                  ) -> list[_Component]:
    """The sacrum components with the anchor first: of the three largest, the one whose chain
    upwards takes in the most bodies and discs (then the most inferior), so that a spurious
    "sacrum" higher up the column (seen on real images) cannot cut the column in two. A
    candidate under SACRUM_FRAGMENT of the largest is a misread blob, not a sacrum: off the
    column it can chain through other blobs into the column and win (seen on a 3 mm T2w)."""
    def score(i: int) -> tuple[int, float]:
        first = _first_step(sacra[i], others, up)
        return len(_chain(sacra[i].centroid, up, others, first)), -float(sacra[i].centroid @ up)

    candidates = [i for i in range(min(3, len(sacra)))
                  if len(sacra[i].points) >= SACRUM_FRAGMENT * len(sacra[0].points)]
    best = max(candidates, key=score)
    return [sacra[best], *sacra[:best], *sacra[best + 1:]]


#: components this far (mm) beyond the one nearest the sacrum may still be the column's first
FIRST_STEP_MM = 15.0


def _first_step(sacrum: _Component, others: list[_Component], up: np.ndarray) -> int:
    """The component the column starts from above the sacrum: of those near it (within
    FIRST_STEP_MM of the nearest) and above its centroid, the one whose chain takes in the most
    components, then the nearer centroid; a body whose chain goes on to a disc near the sacrum
    is a piece of the sacrum, and the column starts at that disc. The nearest alone fails on
    coarse grids, where the L5S1 disc and the L5 body both touch the sacrum (the body first
    drops the disc below it) and a sacrum fragment classed as body can touch it closest."""
    gaps = np.array([_gap(sacrum, c) for c in others])
    near = [i for i, c in enumerate(others) if gaps[i] <= gaps.min() + FIRST_STEP_MM
            and (c.centroid - sacrum.centroid) @ up > 0] or [int(np.argmin(gaps))]

    chains = {i: _chain(sacrum.centroid, up, others, i) for i in near}
    best = max(near, key=lambda i: (len(chains[i]), -float(
        np.linalg.norm(others[i].centroid - sacrum.centroid))))
    chain = chains[best]
    if others[best].cls == BODY and len(chain) > 1 and chain[1] in near and \
            others[chain[1]].cls == DISC:
        return chain[1]  # a "body" below the L5S1 disc is a piece of the sacrum
    return best


#: the column chained from the sacrum must hold at least this share of the body and disc
#: volume that a chain from the lowest component holds; less means the "sacrum" is a blob off
#: the column (seen on a real T1w: a small one in front of the column kept one body out of 18)
COLUMN_SHARE = 0.5


def _volume(comps: list[_Component], order: Sequence[int]) -> int:
    """Voxels of the components ``order`` of ``comps``."""
    return sum(len(comps[i].points) for i in order)


#: a flag ending so is a note: those components took no part in the labelling
_INFORMATIONAL = "off the spinal column removed"


def _assign_levels(chain: list[_Component], sacrum: _Component | None, start: np.ndarray,
                   affine: np.ndarray, shape: Sequence[int], flags: list[str]) -> None:
    """Set ``level`` (and ``parts`` of merged bodies) of every chained component, walking up
    from the sacrum: a body one level above the previous, more when the gap between them holds
    a missing body; discs the level of the body they touch above, else one above the body
    below. Every inconsistency is flagged."""
    axes = [_axis_at(chain, i, start) for i in range(len(chain))]
    body_idx = [i for i, c in enumerate(chain) if c.cls == BODY]
    bodies = [chain[i] for i in body_idx]
    previous = [sacrum, *bodies[:-1]] if bodies else []
    gaps = [_gap(p, b) for p, b in zip(previous, bodies, strict=True) if p is not None]
    spacing, gap = _stats(bodies, gaps, [axes[i] for i in body_idx], affine)
    if any(not b.touches_border for b in bodies) and \
            not PLAUSIBLE_SPACING_MM[0] <= spacing <= PLAUSIBLE_SPACING_MM[1]:
        flags.append(f"implausible vertebral spacing {spacing:.0f} mm")
    name = vertebra_name if sacrum is not None else (lambda k: f"vertebra {k}")
    spacing_in = inplane_spacing(affine)
    tol = max(3.0, 2.0 * spacing_in)
    level, prev_pos = 0, -1
    for b_i, (pos, body) in enumerate(zip(body_idx, bodies, strict=True)):
        prev = previous[b_i]
        discs_between = any(c.cls == DISC for c in chain[prev_pos + 1:pos])
        if prev is None:
            step = 1
        else:
            g = _gap(prev, body)
            if prev.cls == BODY and not discs_between and \
                    _joint_extent(prev, body, axes[pos]) + gap < 1.5 * spacing:
                flags.append(f"{name(level)} is split into two components")
                step = 0
            else:
                step = 1 + max(0, round((g - gap) / spacing))
                if step > 1:
                    flags.append(f"{step - 1} vertebral body(ies) missing below "
                                 f"{name(level + step)}")
        level += step
        n_merged = 1
        if not body.touches_border:
            n_merged = max(1, round((_extent(body, axes[pos], affine) + gap) / spacing))
        if n_merged > 1:
            flags.append(f"merged vertebral bodies {name(level)}-{name(level + n_merged - 1)}"
                         " split evenly along the column")
            proj = body.points @ axes[pos]
            part = np.minimum(((proj - proj.min()) / (np.ptp(proj) + 1e-9) * n_merged)
                              .astype(int), n_merged - 1)
            body.parts = [(body.voxels[part == j], level + j) for j in range(n_merged)]
        body.level = level
        level += n_merged - 1
        prev_pos = pos
    _assign_discs(chain, axes, sacrum, affine, shape, tol, gap, spacing, name, flags)


def inplane_spacing(affine: np.ndarray) -> float:
    """Largest voxel size (mm) in the sagittal plane of the grid."""
    cols = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    sag = int(np.argmax(np.abs(cols[0]) / norms))
    return float(max(norms[a] for a in range(3) if a != sag))


def _part_positions(body: _Component, axis: np.ndarray, affine: np.ndarray
                    ) -> list[tuple[float, int]]:
    """(position along ``axis``, level) of each level of a body, lowest first: of every part
    of a merged body, so that a disc lying between its parts (bodies joined around the disc on
    lateral slices) takes the level between them, not the level above the whole component."""
    if not body.parts:
        return [(float(body.centroid @ axis), body.level)]
    return [(float(_world(affine, voxels.mean(0).astype(float)) @ axis), level)
            for voxels, level in body.parts]


def _assign_discs(chain: list[_Component], axes: list[np.ndarray], sacrum: _Component | None,
                  affine: np.ndarray, shape: Sequence[int], tol: float, gap: float,
                  spacing: float, name, flags: list[str]) -> None:
    disc_name_of = (lambda k: name(k) + name(k - 1)) if sacrum is not None else \
        (lambda k: f"disc below vertebra {k}")
    seen: dict[int, int] = {}
    for i, c in enumerate(chain):
        if c.cls != DISC:
            continue
        below = next((chain[j] for j in range(i - 1, -1, -1) if chain[j].cls == BODY), sacrum)
        above = next((chain[j] for j in range(i + 1, len(chain)) if chain[j].cls == BODY), None)
        touch_below = below is not None and _gap(c, below) <= tol
        touch_above = above is not None and _gap(c, above) <= tol
        up = float(c.centroid @ axes[i])
        if touch_above:
            parts = _part_positions(above, axes[i], affine)
            c.level = min((lv for pos, lv in parts if pos > up), default=parts[0][1])
        elif below is not None:
            parts = _part_positions(below, axes[i], affine)
            c.level = 1 + max((lv for pos, lv in parts if pos < up), default=parts[-1][1])
        else:
            c.level = 1
        seen[c.level] = seen.get(c.level, 0) + 1
        if below is None or not touch_below:
            if below is None and sacrum is None and not touch_above:
                flags.append(f"{disc_name_of(c.level)} has no vertebral body next to it")
            elif below is not None:
                flags.append(f"{disc_name_of(c.level)} does not touch the vertebra below it")
        if not touch_above:
            expected = c.centroid + axes[i] * (gap / 2 + (spacing - gap) / 2)
            if above is not None or _inside(affine, shape, expected):
                flags.append(f"{disc_name_of(c.level)} does not touch the vertebra above it")
    for k, n in seen.items():
        if n > 1:
            flags.append(f"{n} disc components at {disc_name_of(k)}")
    levels_seen = sorted({lv for c in chain if c.cls == BODY
                          for lv in ([p[1] for p in c.parts] or [c.level])})
    lowest = 1 if sacrum is not None else (levels_seen[0] + 1 if levels_seen else 1)
    for k in range(lowest, (levels_seen[-1] if levels_seen else 0) + 1):
        if k not in seen:
            flags.append(f"no disc found at {disc_name_of(k)}")


def _write(chain: list[_Component], sacra: list[_Component], anchored: bool,
           shape: Sequence[int], flags: list[str]) -> SpineLabels:
    dseg = np.zeros(shape, np.uint16)
    levels: dict[str, int] = {}

    def put(voxels: np.ndarray, label: int, abbreviation: str) -> None:
        dseg[tuple(voxels.T)] = label
        levels[abbreviation] = label

    for s in sacra:
        put(s.voxels, SACRUM_LABEL, "S1")
    for c in chain:
        for voxels, k in c.parts or [(c.voxels, c.level)]:
            if c.cls == BODY:
                label, abbr = ((vertebra_label(k), vertebra_name(k)) if anchored
                               else (GENERIC_BODY + k, f"V{k}"))
            else:
                label, abbr = ((disc_label(k), disc_name(k)) if anchored
                               else (GENERIC_DISC + k, f"D{k}"))
            put(voxels, label, abbr)
    return SpineLabels(dseg, dict(sorted(levels.items(), key=lambda kv: kv[1])),
                       list(dict.fromkeys(flags)),
                       not any(not f.endswith(_INFORMATIONAL) for f in flags))


def label_table(levels: Mapping[str, int]) -> list[dict[str, object]]:
    """Rows (``index``, ``name``, ``abbreviation``) of a ``dseg.tsv`` for ``levels``."""
    rows = []
    for abbr, index in sorted(levels.items(), key=lambda kv: kv[1]):
        if index >= GENERIC_DISC:
            name = f"intervertebral disc below unlabelled vertebra {index - GENERIC_DISC}"
        elif index >= GENERIC_BODY:
            name = f"unlabelled vertebral body {index - GENERIC_BODY} (counted upwards)"
        elif index >= 100:
            upper = abbr[:3] if abbr.startswith("T") and abbr[2].isdigit() else abbr[:2]
            name = f"intervertebral disc {upper}-{abbr[len(upper):]}"
        else:
            name = f"vertebral body {abbr}"
        rows.append({"index": index, "name": name, "abbreviation": abbr})
    return rows
