"""The disc atlas (shipped, user, study-built) and the ground truth of disc deformations."""

from __future__ import annotations

import json
import shlex
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from spineqprep.cli.atlas import build_parser
from spineqprep.cli.atlas import main as atlas_main
from spineqprep.errors import InputError
from spineqprep.registration import atlas as A
from spineqprep.synth import labels as lab
from spineqprep.synth.anatomy import build_anatomy, canonical_disc
from spineqprep.synth.cohort import sample_cohort
from spineqprep.synth.discs import superellipse
from spineqprep.synth.truth import atlas_maps, sample_points

SEED = 77  # not used elsewhere in development


def _canonical_mask(mask: nib.Nifti1Image, level: str, scale) -> np.ndarray:
    ijk = np.indices(mask.shape).reshape(3, -1).T
    c = (ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]) / np.asarray(scale)
    n = canonical_disc(lab.DISCS.index(level)).normalise(c)
    return ((superellipse(n[:, 0], n[:, 1]) <= 1) & (np.abs(n[:, 2]) <= 1)).reshape(mask.shape)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_shipped_atlas_loads_with_one_disc_per_level() -> None:
    atlas = A.load_atlas()
    assert set(atlas.files) == set(A.LEVELS)
    total = sum(p.stat().st_size for p in A.shipped_atlas_dir().iterdir())
    assert total < 600_000  # a few 100 kB
    card = json.loads((A.shipped_atlas_dir() / "atlas.json").read_text())
    args = build_parser().parse_args(shlex.split(card["Command"])[1:])  # the card's command
    assert (args.source, args.seed, args.discs_per_level) == ("synthetic", A.SHIPPED_SEED, 8)
    assert (A.shipped_atlas_dir() / "README.md").exists()
    for level in A.LEVELS:
        img = atlas.mask(level)
        data = np.asarray(img.dataobj)
        assert data.ndim == 3 and set(np.unique(data)) == {0, 1}
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), 1.0)
        assert np.allclose(img.affine[:3, :3], np.diag(np.diag(img.affine)[:3]))  # RAS, unrotated
        centroid = img.affine[:3, :3] @ ndimage.center_of_mass(data) + img.affine[:3, 3]
        assert np.abs(centroid).max() < 1.0  # disc-centred
        assert ndimage.label(data)[1] == 1
        # the template is the (scaled) canonical disc the generator deforms
        dice = _dice(data > 0, _canonical_mask(img, level, atlas.canonical_scale[level]))
        assert dice >= 0.95, (level, dice)
        plane = atlas.mask_like(level, single_slice=True)
        assert plane.shape[0] == 1 and plane.shape[1:] == img.shape[1:]
        assert np.asarray(plane.dataobj).sum() > 0
        assert abs(plane.affine[0, 3]) <= 0.5  # the x = 0 plane


def test_load_atlas_reports_a_missing_or_empty_folder_and_loads_a_partial_one(tmp_path
                                                                              ) -> None:
    with pytest.raises(InputError, match="does not exist"):
        A.load_atlas(tmp_path / "nope")
    partial = tmp_path / "atlas"
    shutil.copytree(A.shipped_atlas_dir(), partial)
    (partial / A.mask_name("L4L5")).unlink()
    atlas = A.load_atlas(partial)  # e.g. spineqprep-atlas study --levels: the levels it has
    assert set(atlas.files) == set(A.LEVELS) - {"L4L5"}
    with pytest.raises(InputError, match="L4L5"):
        atlas.mask("L4L5")
    for path in partial.glob("*_mask.nii.gz"):
        path.unlink()
    with pytest.raises(InputError, match="no atlas disc"):
        A.load_atlas(partial)


def test_template_construction_is_reproducible_and_close_to_the_discs() -> None:
    masks = A.synthetic_healthy_masks(3, SEED, spacing=1.5, levels=("L3L4",))["L3L4"]
    first = A.build_template(masks, spacing=1.5, iterations=1, seed=5)
    second = A.build_template(masks, spacing=1.5, iterations=1, seed=5)
    assert np.array_equal(np.asarray(first[0].dataobj), np.asarray(second[0].dataobj))
    template = np.asarray(first[1].dataobj) > 0
    # every input disc, aligned on its own frame, overlaps the template well
    for m in masks:
        aligned = A.resample_to_frame(m, A.disc_frame(m), first[1].affine, template.shape) > 0.5
        assert _dice(aligned, template) > 0.85
    assert _dice(template, _canonical_mask(first[1], "L3L4", (1.0, 1.0, 0.93))) > 0.85


def test_disc_frame_follows_the_disc_whatever_the_grid() -> None:
    person = sample_cohort(1, 1, 1, SEED)[0]
    anat = build_anatomy(person, person.visits[0], SEED)
    k = lab.DISCS.index("L5S1")
    mask = A.synthetic_healthy_masks(1, SEED, levels=("L5S1",))["L5S1"][0]
    frame = A.disc_frame(mask)
    axes = anat.frame(float(anat.disc_u[k]))  # superior, anterior, right
    assert np.linalg.det(frame[:3, :3]) > 0
    assert frame[:3, 2] @ axes[0] > 0.97  # the thinnest axis is the spine's direction
    assert frame[:3, 1] @ axes[1] > 0.97
    assert frame[:3, 0] @ axes[2] > 0.97
    assert np.linalg.norm(frame[:3, 3] - anat.disc_centre(k)) < 1.5


@pytest.mark.parametrize("index", [0, 1, 2])
def test_ground_truth_disc_deformation_is_smooth_and_invertible(index) -> None:
    person = sample_cohort(3, 3, 1, SEED)[index]
    visit = person.visits[0]
    anat = build_anatomy(person, visit, SEED)
    rng = np.random.default_rng(index)
    for level in lab.SCHEMA_DISCS:
        k = lab.DISCS.index(level)
        disc = canonical_disc(k)
        # displacement: det J of n -> n + d(n) well above 0 (bound: >= 1/8) on a dense grid
        grid = np.stack(np.meshgrid(*[np.linspace(-1.5, 1.5, 13)] * 3, indexing="ij"), -1)
        det = np.linalg.det(anat.disc_shapes.jacobian(k, grid.reshape(-1, 3)))
        assert det.min() > 0.125
        # world <-> canonical round trip
        c = rng.uniform(-1, 1, (500, 3)) * disc.extent()
        world = anat.from_canonical(k, c)
        assert np.abs(anat.to_canonical(k, world) - c).max() < 1e-6
        # the whole native -> canonical map keeps orientation (finite differences, in the disc)
        inside = c[np.abs(c[:, 2]) < disc.rim_half_height][:100]
        x = anat.from_canonical(k, inside)
        jac = np.stack([(anat.to_canonical(k, x + 0.05 * e) - anat.to_canonical(k, x - 0.05 * e))
                        / 0.1 for e in np.eye(3)], axis=-1)
        assert np.linalg.det(jac).min() > 0


def test_atlas_truth_is_the_native_pattern_carried_by_the_deformation() -> None:
    """Every atlas voxel's true value is the subject's continuous model at the native point the
    deformation maps it to (exactly, wherever that point lies in the disc)."""
    atlas = A.load_atlas()
    person = sample_cohort(2, 2, 1, SEED)[1]
    visit = person.visits[0]
    anat = build_anatomy(person, visit, SEED)
    for level in ("L1L2", "L4L5"):
        k = lab.DISCS.index(level)
        mask = atlas.mask(level)
        scale = atlas.canonical_scale[level]
        truth = atlas_maps(anat, visit, k, mask, scale)
        inside = np.isfinite(truth["T1rho"])
        assert np.array_equal(inside, np.asarray(mask.dataobj) > 0)
        ijk = np.argwhere(inside)
        c = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
        labels, maps = sample_points(anat, anat.from_canonical(k, c / np.asarray(scale)),
                                     visit.discs)
        in_disc = (labels == lab.nucleus(k)) | (labels == lab.annulus(k))
        assert in_disc.mean() > 0.9
        for q in ("T2", "T1rho"):
            assert np.allclose(maps[q][in_disc], truth[q][inside][in_disc], rtol=1e-5)
        # the nucleus (long T1rho) sits at the centre, the annulus at the rim
        t1rho = truth["T1rho"]
        centre = tuple(np.round(np.linalg.solve(mask.affine, [0, 0, 0, 1])[:3]).astype(int))
        assert t1rho[centre] > np.nanpercentile(t1rho, 90)


def test_study_atlas_from_a_datasets_healthy_discs(tmp_path) -> None:
    from spineqprep.synth import generate_dataset

    synth = generate_dataset(tmp_path / "bids", n_subjects=3, n_sites=1, seed=SEED)
    grades = synth.raw_dir / "phenotype" / "disc_grades.tsv"
    out = tmp_path / "atlas"
    code = atlas_main(["study", str(synth.truth_dir), str(grades), str(out), "--acq", "mapss",
                       "--levels", "L1L2", "--max-grade", "2", "--iterations", "1"])
    assert code == 0
    card = json.loads((out / "atlas.json").read_text())
    assert card["DiscsPerLevel"]["L1L2"] >= 2
    mask = nib.load(out / A.mask_name("L1L2"))
    assert np.asarray(mask.dataobj).sum() > 0
    assert set(A.load_atlas(out).files) == {"L1L2"}  # usable with --atlas
    # too strict a filter is a clear user error, not a traceback
    assert atlas_main(["study", str(synth.truth_dir), str(grades), str(tmp_path / "x"),
                       "--max-grade", "0"]) != 0


def test_disc_masks_read_any_numbering_and_tune_over_a_dataset(tmp_path) -> None:
    """Discs of a derivatives dataset are found by their names (a manual mask numbered its
    own way, with an index/name table) and become spineqprep-tune's pairs."""
    from spineqprep.registration.tune import main as tune_main
    from spineqprep.synth import generate_dataset

    synth = generate_dataset(tmp_path / "bids", n_subjects=1, n_sites=1, seed=SEED)
    truth = synth.truth_dir / "sub-01" / "anat" / "sub-01_acq-mapss_dseg.nii.gz"
    manual = tmp_path / "manual" / "sub-01" / "anat"
    manual.mkdir(parents=True)
    (tmp_path / "manual" / "dataset_description.json").write_text(json.dumps(
        {"Name": "manual", "BIDSVersion": "1.10.1", "DatasetType": "derivative"}))
    img = nib.load(truth)
    data = np.asarray(img.dataobj)
    renumbered = np.zeros(data.shape, np.uint8)
    rows = ["index\tname"]
    for new, level in enumerate(A.LEVELS, start=1):
        renumbered[data == lab.disc(lab.DISCS.index(level))] = new
        rows.append(f"{new}\tintervertebral disc {level[:2]}-{level[2:]}")
    nib.save(nib.Nifti1Image(renumbered, img.affine), manual / "sub-01_acq-mapss_dseg.nii.gz")
    (manual / "sub-01_acq-mapss_dseg.tsv").write_text("\n".join(rows) + "\n")

    found = A.disc_masks(tmp_path / "manual")
    assert [level for _, level, _ in found] == list(A.LEVELS)
    for _, level, mask in found:
        expected = data == lab.disc(lab.DISCS.index(level))
        assert np.array_equal(np.asarray(mask.dataobj) > 0, expected)
    assert len(A.disc_masks(synth.truth_dir, acq="mapss")) == len(A.LEVELS)

    out = tmp_path / "tuned"
    assert tune_main([str(tmp_path / "manual"), str(out), "--trials", "1",
                      "--max-discs", "2", "--seed", "1"]) == 0
    pairs = (out / "pairs" / "pairs.tsv").read_text().splitlines()
    assert len(pairs) == 3 and pairs[0] == "moving\tatlas"
    assert json.loads((out / "tuning.json").read_text())["best"]["loss"] < 0.5
    assert (out / "elastix_bspline.txt").is_file()
    # options of the folder mode with a pairs table: a usage error, no work
    (tmp_path / "pairs.tsv").write_text("moving\tatlas\n")
    assert tune_main([str(tmp_path / "pairs.tsv"), str(tmp_path / "x"), "--acq", "mapss"]) == 2
    assert tune_main([str(tmp_path / "bids"), str(tmp_path / "y")]) == 1  # no segmentation
