"""Cartilage endplates: training samples, post-processing with per-endplate cut-offs, and the
packaged network on held-out synthetic UTE images (crop found through the L5 centroid)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spineqprep.errors import InputError
from spineqprep.metrics import dice
from spineqprep.segmentation import endplates as ep
from spineqprep.synth import generate_dataset
from spineqprep.synth import labels as lab


def test_class_table_names_the_four_endplates() -> None:
    k45, k5s = lab.DISCS.index("L4L5"), lab.DISCS.index("L5S1")
    detailed = {int(d): int(c) for d, c in zip(ep.trainset.DETAILED, ep.CLASS_OF, strict=True)}
    assert detailed[lab.cep_superior(k45)] == 1 and detailed[lab.cep_inferior(k45)] == 2
    assert detailed[lab.cep_superior(k5s)] == 3 and detailed[lab.cep_inferior(k5s)] == 4
    assert sum(c > 0 for c in detailed.values()) == 4  # every other label is background
    assert ep.DSEG_LABELS["L4L5_superior"] == lab.cep_superior(k45)
    assert ep.DSEG_LABELS["L5S1_inferior"] == lab.cep_inferior(k5s)


def test_samples_are_seeded_and_show_every_endplate() -> None:
    bank = ep.make_bank(3, 4, seed=5)
    first = [ep.sample(bank, np.random.default_rng(s), 128) for s in range(8)]
    again = [ep.sample(bank, np.random.default_rng(s), 128) for s in range(8)]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert x1.shape == y1.shape == (128, 128)
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    counts = np.bincount(np.concatenate([y.ravel() for _, y in first]), minlength=5)
    assert (counts[1:] > 50).all(), counts


def _probs(shape=(6, 40, 40)) -> np.ndarray:
    probs = np.zeros((*shape, 5), np.float32)
    probs[..., 0] = 1.0
    return probs


def test_label_endplates_applies_each_cutoff_and_keeps_the_largest_component() -> None:
    probs = _probs()
    probs[:, 10, 5:30, 1] = 0.28  # above 0.24 (L4L5 superior), below 0.32
    probs[:, 20, 5:30, 2] = 0.28  # the same value is below L4L5 inferior's 0.32
    probs[:, 30, 5:30, 3] = 0.9
    probs[0, 35, 0:2, 3] = 0.9  # a speck far away: not the largest component
    dseg, flags = ep.label_endplates(probs, np.ones(3))
    assert (dseg == 423).sum() == 6 * 25
    assert not (dseg == 523).any() and not (dseg == 524).any()
    assert (dseg == 424).sum() == 6 * 25  # the speck is gone
    assert any("L4L5 inferior" in f for f in flags) and any("L5S1 inferior" in f for f in flags)
    lowered, _ = ep.label_endplates(probs, np.ones(3), cutoffs={"L4L5_inferior": 0.25})
    assert (lowered == 523).sum() == 6 * 25


def test_label_endplates_gives_a_voxel_to_its_most_probable_endplate() -> None:
    probs = _probs()
    probs[:, 10, 5:30, 1] = 0.5
    probs[:, 10, 5:30, 2] = 0.45
    dseg, _ = ep.label_endplates(probs, np.ones(3))
    assert (dseg == 423).sum() == 6 * 25 and not (dseg == 523).any()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Two held-out subjects (seed 999, never used in training), UTE at 0.5 mm (medium)."""
    return generate_dataset(tmp_path_factory.mktemp("cep") / "bids", n_subjects=2, n_sites=2,
                            seed=999, size="medium")


def test_packaged_network_finds_the_endplates(held_out) -> None:
    """The true T2w segmentation locates L5; the packaged network on the first UTE echo."""
    bundle = ep.model_io.load_bundle(None, name="endplates")
    scores = []
    for first in sorted(held_out.raw_dir.rglob("*_acq-ute_echo-1_MEGRE.nii.gz")):
        rel = first.parent.relative_to(held_out.raw_dir)
        stem = first.name.split("_acq-")[0]
        locator = nib.load(held_out.truth_dir / rel / f"{stem}_acq-sag_dseg.nii.gz")
        ute = nib.load(first)
        seg = ep.segment_endplates(ute, locator, bundle=bundle, n_threads=2)
        assert seg.dseg_img.shape == ute.shape and np.allclose(seg.dseg_img.affine, ute.affine)
        probs = seg.probseg_img.get_fdata()
        outside = np.ones(ute.shape, bool)
        outside[seg.box.slices] = False
        assert np.all(probs[outside][:, 0] == 1.0)  # nothing outside the crop
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        ref = np.asarray(nib.load(held_out.truth_dir / rel /
                                  f"{stem}_acq-ute_desc-tissues_dseg.nii.gz").dataobj)
        pred = np.asarray(seg.dseg_img.dataobj)
        scores += [dice(pred == index, ref == index) for index in ep.DSEG_LABELS.values()]
    print("endplate Dice", np.round(scores, 3))
    assert len(scores) == 4 * 2
    assert np.median(scores) >= 0.8, scores  # measured 0.89 (0.75-0.94)
    assert min(scores) >= 0.6, scores


def test_missing_l5_is_flagged_not_fatal(held_out) -> None:
    first = next(held_out.raw_dir.rglob("*_acq-ute_echo-1_MEGRE.nii.gz"))
    ute = nib.load(first)
    empty = nib.Nifti1Image(np.zeros(ute.shape, np.uint8), ute.affine)
    with pytest.raises(InputError, match="L5"):
        ep.l5_crop_box(empty, ute)
    seg = ep.segment_endplates(ute, empty)
    assert not np.asarray(seg.dseg_img.dataobj).any()
    assert any("L5" in f for f in seg.flags) and set(seg.found.values()) == {0}


def test_finetuned_endplate_bundle_keeps_the_cutoffs_of_its_init(tmp_path) -> None:
    """Fine-tuning keeps the --init bundle's cut-offs (they were reset to the published ones)
    and test-time pixel sizes, and a cut-off given when training wins; the validated pixel
    limit of the init weights is not carried over."""
    init = tmp_path / "init"
    shutil.copytree(Path(ep.__file__).parents[1] / "data" / "models" / "endplates", init)
    meta = json.loads((init / "model.json").read_text())
    meta["cutoffs"]["L5S1_inferior"] = 0.41
    meta["input"]["test_time_spacings_mm"] = [0.45, 0.5]
    meta["validated_max_pixel_mm"] = 0.8
    (init / "model.json").write_text(json.dumps(meta))
    ep.train_endplates(tmp_path / "tuned", steps=1, threads=2, init=init, bank_size=(1, 2),
                       batch_size=2, cutoffs={"L4L5_superior": 0.3}, log=lambda _: None)
    _, tuned = ep.model_io.load_bundle(tmp_path / "tuned", name="endplates")
    assert tuned["cutoffs"] == {**ep.DEFAULT_CUTOFFS, "L5S1_inferior": 0.41,
                                "L4L5_superior": 0.3}
    assert tuned["input"]["test_time_spacings_mm"] == [0.45, 0.5]
    assert "validated_max_pixel_mm" not in tuned and str(init) in tuned["inference_note"]
