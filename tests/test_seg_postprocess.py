"""Level labelling from class probabilities, against the synthetic truth on every grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from spineqprep.segmentation.localise import crop, l5_crop_box, label_centroid
from spineqprep.segmentation.postprocess import (
    CLASSES,
    CORE_SHARE,
    GENERIC_BODY,
    class_map,
    label_spine,
    label_table,
    split_joined_bodies,
)
from spineqprep.synth import generate_dataset


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    res = generate_dataset(tmp_path_factory.mktemp("synth") / "raw", n_subjects=3, n_sites=3,
                           seed=11, size="small")
    return res.truth_dir


def _dsegs(truth: Path) -> list[Path]:
    return sorted(p for p in truth.glob("sub-*/anat/*_dseg.nii.gz") if "tissues" not in p.name)


def classes_of(d: np.ndarray) -> np.ndarray:
    cls = np.zeros(d.shape, int)
    cls[(d >= 8) & (d <= 25)] = 1
    cls[d == 26] = 2
    cls[(d > 100) & (d < 200)] = 3
    return cls


def perturbed_probs(d: np.ndarray, rng: np.random.Generator, noise: float = 1.5,
                    sigma: float = 0.6) -> np.ndarray:
    """Softmax of noisy, smoothed one-hot logits of the truth classes."""
    logits = 4.0 * np.eye(4)[classes_of(d)] + rng.normal(0, noise, (*d.shape, 4))
    logits = ndimage.gaussian_filter(logits, (sigma, sigma, sigma, 0))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def wrong_levels(pred: np.ndarray, d: np.ndarray) -> dict[int, int]:
    """Truth label -> majority predicted label, for every truth structure predicted wrongly."""
    wrong = {}
    for label in np.unique(d):
        if label < 8:
            continue
        got = pred[d == label]
        got = got[got > 0]
        majority = int(np.bincount(got).argmax()) if got.size else 0
        if majority != label:
            wrong[int(label)] = majority
    return wrong


def _world_z(img: nib.Nifti1Image) -> np.ndarray:
    ijk = np.indices(img.shape[:3]).reshape(3, -1).T
    return nib.affines.apply_affine(img.affine, ijk)[:, 2].reshape(img.shape[:3])


def test_every_level_right_on_every_grid(truth):
    """All sites (RAS, PSR, AIL, oblique), all grids (T1w/T2w, mapping series, UTE crop)."""
    rng = np.random.default_rng(0)
    paths = _dsegs(truth)
    assert len(paths) >= 9
    for path in paths:
        img = nib.load(path)
        d = np.asarray(img.dataobj).astype(int)
        res = label_spine(perturbed_probs(d, rng), img.affine)
        assert res.confident, (path.name, res.flags)
        assert wrong_levels(res.dseg, d) == {}, path.name
        present = {int(v) for v in np.unique(d) if v >= 8}
        assert present <= set(res.levels.values()), path.name


def test_reoriented_image_same_labels(truth):
    img = nib.load(_dsegs(truth)[0])
    for codes in (("L", "P", "S"), ("P", "S", "R"), ("I", "A", "L")):
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes))
        other = img.as_reoriented(ornt)
        od = np.asarray(other.dataobj).astype(int)
        res = label_spine(perturbed_probs(od, np.random.default_rng(1)), other.affine)
        assert res.confident and wrong_levels(res.dseg, od) == {}, codes


def test_no_sacrum_is_flagged_and_left_unlabelled(truth):
    img = nib.load(next(p for p in _dsegs(truth) if "acq-sag" in p.name))
    d = np.asarray(img.dataobj).astype(int)
    z = _world_z(img)
    d[z < z[d == 26].max() + 2] = 0  # field of view ending above the sacrum
    res = label_spine(perturbed_probs(d, np.random.default_rng(2)), img.affine)
    assert not res.confident
    assert any("no sacrum" in f for f in res.flags)
    assert all(v >= GENERIC_BODY for v in res.levels.values())
    bodies = sorted(v for v in res.levels.values() if v < GENERIC_BODY + 100)
    assert bodies == list(range(GENERIC_BODY + 1, GENERIC_BODY + 1 + len(bodies)))
    assert int(res.dseg.max()) >= GENERIC_BODY and not np.isin(res.dseg, [19, 24, 124]).any()


@pytest.mark.parametrize("case", ["merged_discs", "missing_body", "merged_bodies",
                                  "missing_disc"])
def test_anomalies_are_flagged_and_levels_above_kept(truth, case):
    img = nib.load(next(p for p in _dsegs(truth) if "acq-sag" in p.name))
    d = np.asarray(img.dataobj).astype(int)
    broken = d.copy()
    if case == "merged_discs":
        broken[d == 22] = 123  # L3 body read as disc: L3L4, L3, L2L3 one component
    elif case == "missing_body":
        broken[d == 22] = 0
    elif case == "merged_bodies":
        broken[d == 122] = 22  # L3L4 disc read as bone: L3 and L4 one component
    else:
        broken[d == 122] = 0
    res = label_spine(perturbed_probs(broken, np.random.default_rng(3)), img.affine)
    assert not res.confident and res.flags
    for label in (24, 21, 20, 19, 124, 121, 120, 119):  # below and above the damage
        assert wrong_levels(np.where(d == label, res.dseg, 0), np.where(d == label, d, 0)) \
            == {}, (case, label, res.flags)
    if case == "merged_bodies":
        assert any("merged vertebral bodies" in f for f in res.flags), res.flags


def _lateral_rims(img: nib.Nifti1Image, d: np.ndarray, discs: list[int]) -> np.ndarray:
    """The outermost sagittal slice of each of ``discs`` on both sides."""
    lateral = int(np.argmax(np.abs(img.affine[0, :3])))
    side = np.moveaxis(np.indices(d.shape), 0, -1)[..., lateral]
    rims = np.zeros(d.shape, bool)
    for disc in discs:
        rims |= (d == disc) & np.isin(side, [side[d == disc].min(), side[d == disc].max()])
    return rims


@pytest.mark.parametrize("discs", [[122], [120, 121, 122, 123]])
def test_bodies_joined_around_their_discs_are_split_and_labelled(truth, discs):
    """Seen on real 1 mm T1w and T2w: the discs' lateral slices read as bone join the bodies
    above and below into one component (four bodies in one). Each body's core is its own
    vertebra: every level right, the discs between them keep their levels, no doubt raised."""
    img = nib.load(next(p for p in _dsegs(truth) if "sub-02_acq-sag" in p.name))
    d = np.asarray(img.dataobj).astype(int)
    rims = _lateral_rims(img, d, discs)
    broken = np.where(rims, 22, d)
    assert (broken == 122).any()
    joined = ndimage.label(classes_of(broken) == 1, ndimage.generate_binary_structure(3, 1))[0]
    for disc in discs:  # the bodies above and below each disc are one component
        above, below = disc - 100, disc - 99
        assert np.intersect1d(joined[d == above], joined[d == below]).any(), disc
    res = label_spine(perturbed_probs(broken, np.random.default_rng(3)), img.affine)
    assert res.confident, res.flags
    kept = ~rims
    assert wrong_levels(np.where(kept, res.dseg, 0), np.where(kept, d, 0)) == {}, res.flags


def test_split_joined_bodies_splits_at_cores_but_not_a_banded_body():
    """Two 25 mm bodies 10 mm apart joined by a 2 mm lateral plate are two; one body with a
    2 mm dark band across 90 % of it has two cores too, 16 mm apart, closer than any two
    vertebrae, so it stays one. 1 mm grid, axes (left-right, anterior-posterior, S-I)."""
    affine = np.eye(4)
    joined = np.zeros((44, 44, 64), bool)
    joined[2:42, 2:42, 2:27] = joined[2:42, 2:42, 37:62] = True  # two bodies
    joined[2:4, 2:42, 27:37] = True  # bridge on the outermost sagittal slices
    parts = split_joined_bodies(joined, affine, 800.0)
    assert sorted(len(p) for p in parts) == [40 * 40 * 25 + 40 * 2 * 5] * 2
    assert all(np.ptp(p[:, 2]) < 30 for p in parts)
    assert sum(len(p) for p in parts) == joined.sum()

    banded = np.zeros((44, 44, 34), bool)
    banded[2:42, 2:42, 2:32] = True
    banded[2:42, 2:38, 16:18] = False  # a band across, a 4 mm rim left at one side
    depth = ndimage.distance_transform_edt(np.pad(banded, 1))
    cores = ndimage.label(depth >= CORE_SHARE * depth.max())[1]
    assert cores == 2
    assert [len(p) for p in split_joined_bodies(banded, affine, 800.0)] == [banded.sum()]


def test_off_spine_blob_removed_and_flagged_small_one_dropped(truth):
    img = nib.load(next(p for p in _dsegs(truth) if "acq-sag" in p.name))
    d = np.asarray(img.dataobj).astype(int)
    probs = perturbed_probs(d, np.random.default_rng(4))
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    # a big "disc" far anterior in air, and a tiny one (below the mm^3 limit)
    blob = np.zeros(d.shape, bool)
    anterior = int(np.argmax(np.abs(img.affine[1, :3])))
    idx = [slice(s // 2 - 2, s // 2 + 2) for s in d.shape]
    idx[anterior] = slice(0, max(2, round(12 / zooms[anterior])))
    blob[tuple(idx)] = True
    probs[blob] = [0.0, 0.0, 0.0, 1.0]
    res = label_spine(probs, img.affine)
    assert any("off the spinal column" in f for f in res.flags)
    assert not res.dseg[blob].any()
    assert wrong_levels(res.dseg, d) == {}
    assert res.confident  # a removed stray component is a note, not a doubt on the levels


@pytest.mark.parametrize("case", ["body_touches_sacrum", "sacrum_fragment",
                                  "split_sacrum_and_fragments", "sacrum_top_as_body"])
def test_l5s1_kept_on_coarse_mapping_grids(truth, case):
    """Seen on 3-3.5 mm grids: the L5 body touching the sacrum as closely as the L5S1 disc
    (through the disc's rim), a piece of sacrum classed as body beside it, or a sacrum split
    in halves by thick slices with a bit of L5 classed as sacrum, must not start the column
    one level off or drop the L5S1 disc."""
    img = nib.load(next(p for p in _dsegs(truth) if "acq-mese" in p.name))
    d = np.asarray(img.dataobj).astype(int)
    xyz = nib.affines.apply_affine(img.affine, np.indices(d.shape).reshape(3, -1).T
                                   ).reshape(*d.shape, 3)
    broken = d.copy()
    if case == "body_touches_sacrum":  # the disc's anterior rim read as L5 body
        rim = (d == 124) & (xyz[..., 1] >= np.quantile(xyz[d == 124][:, 1], 0.8))
        broken[rim] = 24
    elif case == "sacrum_top_as_body":  # the top of the sacrum, 40 % of a body, read as body
        sacrum = d == 26
        gap = np.linalg.norm(xyz - xyz[d == 124].mean(0), axis=-1)
        n = int(0.4 * (d == 23).sum())
        broken[sacrum & (gap <= np.sort(gap[sacrum])[n])] = 24
    else:  # the sacrum's most lateral voxels above its centroid read as a vertebral body
        sacrum = d == 26
        if case == "split_sacrum_and_fragments":
            mid = np.abs(xyz[..., 0] - xyz[sacrum][:, 0].mean()) < 0.6 * np.linalg.norm(
                img.affine[:3, :3], axis=0).max()
            broken[sacrum & mid] = 0
            l5 = d == 24  # and L5's most lateral tenth read as sacrum
            broken[l5 & (xyz[..., 0] >= np.quantile(xyz[l5][:, 0], 0.9))] = 26
        centre = xyz[sacrum].mean(0)
        lateral = np.abs(xyz[..., 0] - centre[0])
        upper = sacrum & (xyz[..., 2] > centre[2])
        voxel_mm3 = abs(np.linalg.det(img.affine[:3, :3]))
        n = int(np.ceil(1000 / voxel_mm3))
        broken[upper & (lateral >= np.sort(lateral[upper])[-n])] = 24
    res = label_spine(perturbed_probs(broken, np.random.default_rng(5), noise=0.5), img.affine)
    assert (res.dseg[d == 124] == 124).mean() > 0.5, res.flags
    assert not any("sacrum component" in f for f in res.flags), res.flags
    for label in (24, 23, 123, 22):
        assert wrong_levels(np.where(d == label, res.dseg, 0), np.where(d == label, d, 0)) \
            == {}, (case, label, res.flags)


def test_small_sacrum_blob_behind_the_column_is_not_the_anchor(truth):
    """Seen on a 3 mm T2w: a small blob classed as sacrum behind and below the sacrum, with a
    "disc" and a "body" blob above it, gave the longer chain (those blobs, then the column) and
    so became the anchor: every level one off. A sacrum under a quarter of the largest is not a
    candidate."""
    img = nib.load(next(p for p in _dsegs(truth) if "acq-sag" in p.name))
    d = np.asarray(img.dataobj).astype(int)
    xyz = nib.affines.apply_affine(img.affine, np.indices(d.shape).reshape(3, -1).T
                                   ).reshape(*d.shape, 3)
    sacrum = xyz[d == 26].mean(0)
    voxel_mm3 = abs(np.linalg.det(img.affine[:3, :3]))
    broken = d.copy()
    # behind and below the sacrum, in a line that leads up to the L5S1 disc
    for cls, offset, mm3 in ((26, (0, -70, -30), 3600), (124, (0, -55, -12), 500),
                             (24, (0, -40, 6), 1200)):
        dist = np.linalg.norm(xyz - (sacrum + offset), axis=-1)
        blob = (d == 0) & (dist <= np.sort(dist[d == 0])[int(mm3 / voxel_mm3)])
        assert dist[blob].max() < 15  # inside the field of view
        broken[blob] = cls
    res = label_spine(perturbed_probs(broken, np.random.default_rng(6), noise=0.5), img.affine)
    assert wrong_levels(np.where(d > 0, res.dseg, 0), d) == {}, res.flags


def test_sacrum_blob_off_the_column_leaves_levels_generic_not_the_column_dropped(truth):
    """Seen on a real T1w: the true sacrum was missed and a small "sacrum" in front of the
    column became the anchor; the chain from it took one body, and the other 17 components
    were removed as off the column. A sacrum whose column holds under half of what a chain from
    the lowest component holds is not the anchor: the column is kept with generic levels."""
    img = nib.load(next(p for p in _dsegs(truth) if "acq-sag" in p.name))
    d = np.asarray(img.dataobj).astype(int)
    xyz = nib.affines.apply_affine(img.affine, np.indices(d.shape).reshape(3, -1).T
                                   ).reshape(*d.shape, 3)
    broken = np.where(d == 26, 0, d)  # the network missed the sacrum
    centre = xyz[d == 22].mean(0) + np.array([0.0, 70.0, -10.0])  # in front of L3
    dist = np.linalg.norm(xyz - centre, axis=-1)
    blob = (d == 0) & (dist <= 9.0)
    assert blob.sum() * abs(np.linalg.det(img.affine[:3, :3])) > 1000  # above the size limit
    broken[blob] = 26
    res = label_spine(perturbed_probs(broken, np.random.default_rng(3), noise=0.5),
                      img.affine)
    assert not res.confident
    assert any("not at the lower end" in f for f in res.flags), res.flags
    assert all(v >= GENERIC_BODY for v in res.levels.values()), res.levels
    column = (broken > 0) & (broken != 26)
    assert (res.dseg[column] > 0).mean() > 0.9  # the column is kept
    assert not res.dseg[blob].any()


def test_min_volume_is_in_mm3_whatever_the_voxel_size():
    for voxel in (0.5, 1.0, 2.0):
        affine = np.diag([voxel, voxel, voxel, 1.0])
        n = round(6 / voxel)  # a 6 mm cube = 216 mm^3 of disc
        probs = np.zeros((3 * n, 3 * n, 3 * n, 4))
        probs[..., 0] = 1
        probs[n:2 * n, n:2 * n, n:2 * n] = [0, 0, 0, 1]
        kept = label_spine(probs, affine, min_volume_mm3={"disc": 200.0})
        dropped = label_spine(probs, affine, min_volume_mm3={"disc": 250.0})
        assert kept.dseg.any() and not dropped.dseg.any(), voxel


def test_class_map_cutoffs_per_structure():
    probs = np.array([[0.5, 0.3, 0.0, 0.2], [0.2, 0.45, 0.0, 0.35], [0.9, 0.0, 0.0, 0.1]])
    assert class_map(probs).tolist() == [0, 0, 0]
    assert class_map(probs, cutoffs={"vertebral_body": 0.3}).tolist() == [1, 1, 0]
    assert class_map(probs, cutoffs={"disc": 0.1, "vertebral_body": 0.3}).tolist() == [1, 1, 3]
    with pytest.raises(ValueError, match="unknown"):
        class_map(probs, CLASSES, {"endplate": 0.3})


def test_label_table_names():
    rows = label_table({"T12": 19, "L5S1": 124, "T12L1": 119, "V1": 1001, "D1": 1101})
    names = {r["abbreviation"]: r["name"] for r in rows}
    assert names["T12"] == "vertebral body T12"
    assert names["L5S1"] == "intervertebral disc L5-S1"
    assert names["T12L1"] == "intervertebral disc T12-L1"
    assert [r["index"] for r in rows] == [19, 119, 124, 1001, 1101]


def test_l5_crop_from_t2w_grid_holds_the_endplates(truth):
    """The L5 centroid of the T2w truth, carried to the UTE grid, lands within a voxel of the
    UTE L5 in the sagittal plane, and the 64 mm crop holds the L4L5/L5S1 endplates (>= 98 % of
    each: the generator's UTE field of view is itself 64 mm, centred on L5 +- 3 mm)."""
    for sub in sorted(p.name for p in truth.glob("sub-*")):
        anat = truth / sub / "anat"
        sag = nib.load(anat / f"{sub}_acq-sag_dseg.nii.gz")
        ute = nib.load(anat / f"{sub}_acq-ute_desc-tissues_dseg.nii.gz")
        box = l5_crop_box(sag, ute)
        ute_l5 = label_centroid(nib.load(anat / f"{sub}_acq-ute_dseg.nii.gz"))
        err = np.linalg.solve(ute.affine[:3, :3], label_centroid(sag) - ute_l5)
        inplane = [a for a in range(3) if a != int(np.argmax(np.abs(ute.affine[0, :3])))]
        assert np.all(np.abs(err[inplane]) < 1.0), (sub, err)
        cropped = crop(ute, box)
        full, part = np.asarray(ute.dataobj), np.asarray(cropped.dataobj)
        for label in (423, 523, 424, 524):  # sup/inf endplates of L4L5 and L5S1
            assert (part == label).sum() >= 0.98 * (full == label).sum() > 0, (sub, label)
        # every kept voxel keeps its scanner position
        ijk = np.array(box.start) + 1
        assert np.allclose(nib.affines.apply_affine(cropped.affine, [1, 1, 1]),
                           nib.affines.apply_affine(ute.affine, ijk))
        assert part[1, 1, 1] == full[tuple(ijk)]
