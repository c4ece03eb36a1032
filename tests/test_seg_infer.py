"""Inference on native grids with stand-in networks that follow the bundle contract."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from spineqprep.errors import InputError
from spineqprep.segmentation import joint_contrast, segment_spine
from spineqprep.segmentation.infer import (
    average_neighbour_slices,
    plane_layout,
    predict_probabilities,
    probabilities_on,
    sagittal_axis,
    shares_slices,
)
from spineqprep.segmentation.postprocess import inplane_spacing
from spineqprep.synth.anatomy import rotation_matrix

META = {"classes": ["background", "vertebral_body", "sacrum", "disc"],
        "input": {"spacing_mm": 1.25, "slice_axis": "sagittal",
                  "normalisation": "percentile-1-99", "multiple_of": 16}}
_DIRS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0),
         "I": (2, -1.0)}


def scale(x: np.ndarray, meta) -> np.ndarray:
    """A normaliser that keeps intensities comparable across slices (for exact checks)."""
    return np.asarray(x, np.float32) / 100.0


class Pointwise(nn.Module):
    """Logits a fixed function of each pixel's intensity (-(x - c)^2 per class c); records its
    input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return -4.0 * (x - self.centres) ** 2


def expected(values: np.ndarray) -> np.ndarray:
    logits = -4.0 * (values[..., None] / 100.0 - np.arange(4)) ** 2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def grid(codes: str, zooms: tuple[float, float, float], shape: tuple[int, int, int],
         oblique: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    rot = rotation_matrix(*oblique)
    cols = [rot[:, _DIRS[c][0]] * _DIRS[c][1] * z for c, z in zip(codes, zooms, strict=True)]
    affine = np.eye(4)
    affine[:3, :3] = np.stack(cols, axis=1)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def world(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1).T
    return nib.affines.apply_affine(affine, ijk).reshape(*shape, 3)


CASES = [("RAS", (4.0, 0.9, 0.7), (9, 70, 90), (3.0, 0.0, 0.0)),
         ("LPS", (3.0, 1.1, 1.3), (7, 60, 64), (0.0, 0.0, 0.0)),
         ("PSR", (3.4, 3.1, 5.0), (48, 52, 8), (-5.0, 2.0, 1.5)),
         ("AIL", (2.9, 2.9, 4.5), (64, 56, 6), (4.0, 0.0, -3.0))]


@pytest.mark.parametrize(("codes", "zooms", "shape", "oblique"), CASES)
def test_round_trip_on_native_grid(codes, zooms, shape, oblique):
    """Intensity a smooth function of scanner position: the probabilities resampled back to the
    native pixels equal the model applied to the native voxels, in any orientation."""
    affine = grid(codes, zooms, shape, oblique)
    xyz = world(affine, shape)
    values = 150 + 100 * np.sin(xyz[..., 2] / 25.0) * np.cos(xyz[..., 1] / 30.0)
    img = nib.Nifti1Image(values.astype(np.float32), affine)
    model = Pointwise()
    probs = predict_probabilities(img, model, META, normaliser=scale, batch_size=4)
    assert probs.shape == (*shape, 4) and probs.dtype == np.float32
    err = np.abs(probs - expected(values))
    assert err.mean() < 0.005 and err.max() < 0.06, (err.mean(), err.max())
    # batched: every sagittal slice once, padded to the multiple, rows superior -> inferior
    seen = torch.cat(model.seen)
    sag = int(np.argmax(np.abs(affine[0, :3])))
    assert seen.shape[0] == shape[sag]
    assert seen.shape[2] % 16 == 0 and seen.shape[3] % 16 == 0


@pytest.mark.parametrize(("codes", "zooms", "shape", "oblique"), CASES)
def test_network_sees_canonical_orientation(codes, zooms, shape, oblique):
    """Rows run superior -> inferior and columns anterior -> posterior (trainset's
    ``canonical_slices``), at the bundle's pixel size."""
    affine = grid(codes, zooms, shape, oblique)
    xyz = world(affine, shape)
    for coord, dim in ((2, 2), (1, 3)):  # scanner z along rows, scanner y along columns
        model = Pointwise()
        img = nib.Nifti1Image((200 + xyz[..., coord]).astype(np.float32), affine)
        predict_probabilities(img, model, META, normaliser=scale)
        x = torch.cat(model.seen)[0, 0].numpy()
        centre = x[x.shape[0] // 4: 3 * x.shape[0] // 4, x.shape[1] // 4: 3 * x.shape[1] // 4]
        profile = centre.mean(axis=1 if dim == 2 else 0)
        assert np.all(np.diff(profile) < 0), (codes, coord)
    _, (r, _), _ = plane_layout(affine)
    h_expected = round(shape[r] * zooms[r] / 1.25)
    assert abs(torch.cat(model.seen).shape[2] - h_expected) < 16


def test_single_slice_and_4d_and_determinism():
    affine = grid("PSR", (1.0, 1.0, 8.0), (40, 50, 1))
    values = np.linspace(0, 300, 2000, dtype=np.float32).reshape(40, 50, 1)
    model = Pointwise()
    one = predict_probabilities(nib.Nifti1Image(values, affine), model, META, normaliser=scale)
    assert one.shape == (40, 50, 1, 4)
    four = np.concatenate([values[..., None], 0 * values[..., None]], axis=-1)
    again = predict_probabilities(nib.Nifti1Image(four, affine), model, META, normaliser=scale)
    np.testing.assert_array_equal(one, again)  # first volume used, bit-identical
    flat = predict_probabilities(nib.Nifti1Image(values[..., 0], affine), model, META,
                                 normaliser=scale)
    assert flat.shape == (40, 50, 1, 4)


def test_threads_restored_and_no_grad():
    before = torch.get_num_threads()
    affine = grid("RAS", (3.0, 1.0, 1.0), (3, 32, 32))
    img = nib.Nifti1Image(np.full((3, 32, 32), 100.0, np.float32), affine)
    model = Pointwise()
    predict_probabilities(img, model, META, n_threads=1, normaliser=scale)
    assert torch.get_num_threads() == before
    assert not model.seen[0].requires_grad


class Coder(nn.Module):
    """Stand-in network for the whole pipeline: the intensity codes the class (0 background,
    1/3 body, 2/3 disc, 1 sacrum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor([0.0, 1.0, 3.0, 2.0]).view(1, 4, 1, 1)
        return -8.0 * (x * 3.0 - centres) ** 2


def test_segment_spine_with_stand_in_bundle(tmp_path, monkeypatch):
    """``segment_spine`` on a synthetic subject whose image codes the truth classes: levels
    right and images on the input grid (the bundle's per-slice percentile normalisation would
    rescale the codes slice by slice, so it is replaced by the identity here)."""
    from spineqprep.segmentation import model_io
    from spineqprep.synth import generate_dataset

    monkeypatch.setattr(model_io, "normalise", lambda x, meta: np.asarray(x, np.float32))

    res = generate_dataset(tmp_path / "raw", n_subjects=2, n_sites=2, seed=5, size="small")
    path = next(res.truth_dir.glob("sub-02/anat/*_acq-mese_dseg.nii.gz"))  # PSR, oblique
    dseg = nib.load(path)
    d = np.asarray(dseg.dataobj).astype(int)
    code = np.zeros(d.shape, np.float32)
    code[(d >= 8) & (d <= 25)] = 1.0
    code[(d > 100) & (d < 200)] = 2.0
    code[d == 26] = 3.0
    img = nib.Nifti1Image(code / 3.0, dseg.affine)
    out = segment_spine(img, bundle=(Coder(), META))
    assert out.dseg_img.shape == d.shape and np.allclose(out.dseg_img.affine, dseg.affine)
    assert out.probseg_img.shape == (*d.shape, 4)
    assert np.allclose(np.asarray(out.probseg_img.dataobj).sum(-1), 1.0, atol=1e-4)
    pred = np.asarray(out.dseg_img.dataobj)
    for label in (24, 23, 22, 21, 20, 124, 123, 122, 121, 120):
        assert np.bincount(pred[d == label]).argmax() == label, (label, out.flags)
    # the bundle's own cut-offs apply unless the caller gives one: a disc cut-off above every
    # disc probability of the stand-in empties the discs, the caller's 0.5 restores them
    peak = float(np.asarray(out.probseg_img.dataobj)[..., 3].max())
    strict = (Coder(), {**META, "cutoffs": {"disc": min(1.0, peak + 1e-3)}})
    assert not (np.asarray(segment_spine(img, bundle=strict).dseg_img.dataobj) > 100).any()
    relaxed = segment_spine(img, bundle=strict, cutoffs={"disc": 0.5})
    assert np.array_equal(np.asarray(relaxed.dseg_img.dataobj), pred)
    # a contrast's own cut-offs in the bundle apply to images of that contrast only
    per_contrast = (Coder(), {**strict[1], "cutoffs_by_contrast": {"T2w": {"disc": 0.5}}})
    t2w = segment_spine(img, bundle=per_contrast, contrast="T2w")
    assert np.array_equal(np.asarray(t2w.dseg_img.dataobj), pred)
    mese = segment_spine(img, bundle=per_contrast, contrast="MESE")
    assert not (np.asarray(mese.dseg_img.dataobj) > 100).any()
    # a contrast's slice averaging in the bundle averages that contrast's probabilities
    # across neighbouring slices (before the cut-offs), and no other's
    averaging = (Coder(), {**META, "slice_averaging_by_contrast": {"T2w": 0.25}})
    probs = np.asarray(out.probseg_img.dataobj)
    averaged = segment_spine(img, bundle=averaging, contrast="T2w")
    expected = average_neighbour_slices(probs, sagittal_axis(img.affine), 0.25)
    assert np.allclose(np.asarray(averaged.probseg_img.dataobj), expected, atol=1e-6)
    assert not np.allclose(expected, probs, atol=1e-3)
    assert np.array_equal(np.asarray(segment_spine(img, bundle=averaging, contrast="MESE")
                                     .dseg_img.dataobj), pred)
    # another contrast on the same grid: the probabilities of both are averaged (each with
    # its own slice averaging), then the joint contrast's cut-offs apply
    blank = nib.Nifti1Image(np.where(code == 2.0, 0.0, code / 3.0).astype(np.float32),
                            dseg.affine)
    blank_probs = np.asarray(segment_spine(blank, bundle=(Coder(), META)).probseg_img.dataobj)
    joint = (Coder(), {**strict[1], "slice_averaging_by_contrast": {"T2w": 0.25},
                       "cutoffs_by_contrast": {"T1w+T2w": {"disc": 0.3}}})
    fused = segment_spine(img, bundle=joint, contrast="T2w", same_slices=[(blank, "T1w")])
    assert np.allclose(np.asarray(fused.probseg_img.dataobj), (expected + blank_probs) / 2,
                       atol=1e-6)
    assert (np.asarray(fused.dseg_img.dataobj) > 100).any()  # 0.3, not the strict cut-off
    assert joint_contrast(["T2w", "T1w"]) == "T1w+T2w"
    # the same T1w on 2x finer in-plane pixels (PSR: axes 0 and 1 in-plane), cut at the top:
    # its probabilities are carried onto the T2w's slices, and where it does not reach, the
    # T2w's own probabilities stand alone
    fine = np.repeat(np.repeat(blank.get_fdata(), 2, axis=0), 2, axis=1)[:, :-8]
    to_coarse = np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 1, 0], [0, 0, 0, 1]])
    finer = nib.Nifti1Image(fine.astype(np.float32), dseg.affine @ to_coarse)
    fused_fine = segment_spine(img, bundle=joint, contrast="T2w", same_slices=[(finer, "T1w")])
    probs_fine = np.asarray(fused_fine.probseg_img.dataobj)
    reached = np.arange(d.shape[1]) < d.shape[1] - 4  # fine centre 2c + 0.5 inside
    assert np.allclose(probs_fine[:, ~reached], expected[:, ~reached], atol=1e-6)
    agree = np.asarray(fused_fine.dseg_img.dataobj) == np.asarray(fused.dseg_img.dataobj)
    assert agree[:, reached].mean() > 0.98, agree[:, reached].mean()
    shifted = nib.Nifti1Image(blank.get_fdata(), dseg.affine @ np.diag([1, 1, 1.5, 1]))
    nib.save(shifted, tmp_path / "sub-02_acq-other_T1w.nii.gz")
    with pytest.raises(InputError, match="not lie on the sagittal slices") as err:
        segment_spine(img, bundle=joint, contrast="T2w",
                      same_slices=[(nib.load(tmp_path / "sub-02_acq-other_T1w.nii.gz"), "T1w")])
    assert "sub-02_acq-other_T1w.nii.gz" in str(err.value)
    # pixels coarser than the bundle's validated grid are flagged; the segmentation is the same
    pixel = inplane_spacing(img.affine)
    assert 3.0 < pixel < 3.6 and not any("validated" in f for f in out.flags)
    for limit, flagged in ((2.0, True), (4.0, False)):
        seg = segment_spine(img, bundle=(Coder(), {**META, "validated_max_pixel_mm": limit}))
        assert any(f"coarser than the {limit} mm" in f for f in seg.flags) is flagged
        assert np.array_equal(np.asarray(seg.dseg_img.dataobj), pred)
        assert seg.confident == out.confident


def test_probabilities_carried_onto_another_grid_of_the_same_slices():
    """A map linear in world coordinates on an oblique grid lands exactly on a grid of other
    in-plane pixels and field of view but the same slices (linear interpolation is exact for
    it); NaN beyond the source's field of view; the slice itself is taken whole."""
    source_affine = np.eye(4)
    source_affine[:3, :3] = rotation_matrix(4.0, 0.0, -3.0) @ np.diag([4.0, 1.0, 1.2])
    source = nib.Nifti1Image(np.zeros((6, 40, 30), np.float32), source_affine)
    to_target = np.array([[1, 0, 0, 0], [0, 0.7, 0, 6.3], [0, 0, 0.8, -4.1], [0, 0, 0, 1]])
    target = nib.Nifti1Image(np.zeros((6, 60, 50), np.float32), source_affine @ to_target)
    moved = to_target.copy()
    moved[0, 3] = 0.3  # 1.2 mm off the slices
    assert shares_slices(target, source)
    assert not shares_slices(nib.Nifti1Image(np.zeros((6, 60, 50)), source_affine @ moved), source)
    world = nib.affines.apply_affine(source_affine, np.indices((6, 40, 30)).reshape(3, -1).T)
    ramp = (world @ [0.3, -0.2, 0.5] + 7.0).reshape(6, 40, 30)
    probs = np.stack([ramp, 2 * ramp], -1).astype(np.float32)
    out = probabilities_on(probs, source, target)
    assert out.shape == (6, 60, 50, 2)
    coords = nib.affines.apply_affine(to_target, np.indices((6, 60, 50)).reshape(3, -1).T)
    coords = coords.reshape(6, 60, 50, 3)
    inside = np.all((coords[..., 1:] >= 0) & (coords[..., 1:] <= [39, 29]), -1)
    outside = np.any((coords[..., 1:] < -0.5) | (coords[..., 1:] > [39.5, 29.5]), -1)
    assert inside.sum() > 1000 and outside.sum() > 1000
    expected = (nib.affines.apply_affine(source_affine @ to_target, np.indices(
        (6, 60, 50)).reshape(3, -1).T) @ [0.3, -0.2, 0.5] + 7.0).reshape(6, 60, 50)
    assert np.allclose(out[inside][:, 0], expected[inside], atol=1e-3)
    assert np.allclose(out[inside][:, 1], 2 * expected[inside], atol=2e-3)
    assert np.isnan(out[outside]).all() and np.isfinite(out[~outside]).all()
    assert probabilities_on(probs, source, source) is probs


def test_neighbour_slice_averaging():
    """Weights (w, 1 - 2w, w) across the slice axis only, edges repeated, class sums kept; a
    single slice and w = 0 are unchanged; w outside [0, 0.5) is refused."""
    probs = np.zeros((4, 3, 2, 2), np.float32)
    probs[..., 0] = 1.0
    probs[:, 1, :, :] = [0.0, 1.0]  # one row of class 1 in every slice
    probs[2, 1] = [[1.0, 0.0], [1.0, 0.0]]  # ... but class 0 in slice 2
    out = average_neighbour_slices(probs, 0, 0.25)
    assert np.allclose(out.sum(-1), 1.0)
    assert np.allclose(out[:, 1, 0, 1], [1.0, 0.75, 0.5, 0.75])  # slice 3 repeats at the edge
    assert np.allclose(out[:, 0], probs[:, 0]) and np.allclose(out[:, 2], probs[:, 2])
    assert np.array_equal(average_neighbour_slices(probs[:1], 0, 0.25), probs[:1])
    assert np.array_equal(average_neighbour_slices(probs, 0, 0.0), probs)
    with pytest.raises(ValueError, match="outside"):
        average_neighbour_slices(probs, 0, 0.5)


def test_segment_interface_passes_the_bids_suffix_as_contrast():
    """The bundle's per-contrast cut-offs are keyed by the BIDS suffix of the segmented file."""
    from spineqprep.interfaces.segmentation import _bids_suffix

    assert _bids_suffix("/d/sub-01/anat/sub-01_acq-fse_echo-1_MESE.nii.gz") == "MESE"
    assert _bids_suffix("sub-01_ses-1_acq-sag_T2w.nii") == "T2w"


def test_test_time_spacings_average_the_runs_at_each_pixel_size():
    """A bundle listing ``test_time_spacings_mm`` runs the network once per pixel size (the
    network sees each grid) and returns the mean of those runs' probabilities."""
    affine = grid("RAS", (4.0, 0.8, 0.8), (5, 80, 96))
    xyz = world(affine, (5, 80, 96))
    values = (150 + 120 * np.tanh(xyz[..., 2] / 4.0)).astype(np.float32)  # a sharp edge
    img = nib.Nifti1Image(values, affine)
    singles = []
    for spacing in (1.0, 1.5):
        meta = {**META, "input": {**META["input"], "spacing_mm": spacing}}
        singles.append(predict_probabilities(img, Pointwise(), meta, normaliser=scale))
    assert np.abs(singles[0] - singles[1]).max() > 0.01  # the two grids differ at the edge
    model = Pointwise()
    meta = {**META, "input": {**META["input"], "test_time_spacings_mm": [1.0, 1.5]}}
    both = predict_probabilities(img, model, meta, normaliser=scale)
    np.testing.assert_allclose(both, (singles[0] + singles[1]) / 2, atol=1e-6)
    assert sorted({x.shape[2] for x in model.seen}) == [64, 80]  # 77 mm of rows, padded to 16


@pytest.mark.parametrize("codes", ["RAS", "PSR", "AIL"])
def test_inplane_pixel_is_the_larger_pixel_of_the_sagittal_plane(codes):
    """Whatever the axis order and a 10 degree obliquity, the slice thickness (along left-right)
    is left out."""
    zooms = {"R": 4.5, "L": 4.5, "A": 0.8, "P": 0.8, "S": 1.2, "I": 1.2}
    affine = grid(codes, tuple(zooms[c] for c in codes), (8, 8, 8), oblique=(10.0, 0.0, 5.0))
    assert inplane_spacing(affine) == pytest.approx(1.2)
