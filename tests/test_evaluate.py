"""``spineqprep-evaluate`` on datasets shaped like spineqprep's own outputs (per-image
``dseg.tsv`` sidecars, desc-endplates, class probability maps) against the synthetic truth and
against manual labels with another numbering."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from spineqprep.cli.evaluate import main
from spineqprep.errors import InputError, UsageError
from spineqprep.metrics.evaluate import (
    CLASS_AUC_MARGIN_MM,
    CLASS_PROBSEGS,
    canonical_level,
    evaluate_datasets,
    probseg_level,
)
from spineqprep.metrics.surface import voxel_spacing
from spineqprep.segmentation.lut import lut_path
from spineqprep.segmentation.postprocess import label_table
from spineqprep.synth import generate_dataset

T10T11 = 117  # a disc above the truth's modelled column: the prediction's false positive


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    """The synthetic ground truth of one subject (3 grids: sag, mapss, ute)."""
    res = generate_dataset(tmp_path_factory.mktemp("synth") / "raw", n_subjects=1, n_sites=1,
                           seed=5)
    return res.truth_dir


def _truth_abbreviations(truth: Path) -> dict[int, str]:
    lut = pd.read_csv(truth / "dseg.tsv", sep="\t")
    return dict(zip(lut["index"], lut["abbreviation"], strict=True))


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _pipeline_like(truth: Path, out: Path, offset: int = 0, edit=None) -> Path:
    """spineqprep-shaped spine segmentations: each truth ``_dseg`` (labels + ``offset``, through
    ``edit(data, levels)`` which may change both) beside its own ``<stem>_dseg.tsv`` (the
    pipeline's :func:`label_table`), no root ``dseg.tsv``."""
    names = _truth_abbreviations(truth)
    for path in sorted(truth.glob("sub-*/anat/*_dseg.nii.gz")):
        if "_desc-" in path.name:
            continue
        img = nib.load(path)
        data = np.asarray(img.dataobj).astype(np.uint16)
        levels = {names[int(i)]: int(i) + offset for i in np.unique(data) if i}
        data[data > 0] += offset
        if edit is not None:
            data = edit(data, levels)
        target = _save(data, img.affine, out / path.relative_to(truth))
        pd.DataFrame(label_table(levels)).to_csv(
            target.with_name(target.name.replace(".nii.gz", ".tsv")), sep="\t", index=False)
    return out


def test_pipeline_outputs_use_per_image_tables_and_names(truth, tmp_path):
    """Issue 1: no root dseg.tsv; against itself, the truth, and a renumbered copy: Dice 1."""
    pred = _pipeline_like(truth, tmp_path / "pred")
    assert not (pred / "dseg.tsv").exists()
    itself = evaluate_datasets(pred, pred)
    assert (itself["dice"] == 1.0).all() and len(itself) > 20
    against_truth = evaluate_datasets(pred, truth)
    assert (against_truth["dice"] == 1.0).all()
    assert set(against_truth["level"]) >= {"T12", "L3", "S1", "T12L1", "L4L5", "L5S1"}
    shifted = _pipeline_like(truth, tmp_path / "renumbered", offset=500)
    table = evaluate_datasets(shifted, pred)  # other indices, same abbreviations
    assert (table["dice"] == 1.0).all()
    assert len(table) == len(itself)


def test_the_nearest_label_table_wins(truth, tmp_path):
    """BIDS inheritance: the image's own sidecar over a root dseg.tsv that numbers differently."""
    pred = _pipeline_like(truth, tmp_path / "pred")
    wrong = pd.DataFrame({"index": [123, 124], "name": ["x", "y"],
                          "abbreviation": ["L5S1", "L4L5"]})
    wrong.to_csv(pred / "dseg.tsv", sep="\t", index=False)
    table = evaluate_datasets(pred, truth)
    assert (table["dice"] == 1.0).all()
    image = next(pred.glob("sub-*/anat/*acq-ute_dseg.nii.gz"))
    assert lut_path(image, pred) == image.with_name(image.name.replace(".nii.gz", ".tsv"))
    image.with_name(image.name.replace(".nii.gz", ".tsv")).unlink()
    assert lut_path(image, pred) == pred / "dseg.tsv"
    (image.parent.parent / "sub-01_acq-ute_dseg.tsv").write_text("index\tname\n")
    assert lut_path(image, pred) == image.parent.parent / "sub-01_acq-ute_dseg.tsv"
    (image.parent / "sub-01_acq-mapss_dseg.tsv").write_text("index\tname\n")  # not this image's
    assert lut_path(image, pred) == image.parent.parent / "sub-01_acq-ute_dseg.tsv"


def test_extra_missed_and_shifted_levels(truth, tmp_path):
    """Issue 4: a level only the prediction has is a row (Dice 0, reference volume 0); a level
    it lacks is a row (Dice 0); a level shifted by one voxel has the expected Dice."""
    l1l2, l3 = 120, 22

    def edit(data, levels):
        out = data.copy()
        out[data == l1l2] = 0
        levels.pop("L1L2", None)
        out[data == l3] = 0  # L3 moved one voxel along axis 1
        out[:, 1:][(data == l3)[:, :-1]] = l3
        assert not data[:, -5:, -5:].any()  # background: the extra disc overwrites nothing
        out[:, -5:, -5:] = T10T11
        levels["T10T11"] = T10T11
        return out

    pred = _pipeline_like(truth, tmp_path / "pred", edit=edit)
    table = evaluate_datasets(pred, truth)
    for ref_file, rows in table.groupby("ref_file"):
        img = nib.load(truth / ref_file)
        ref = np.asarray(img.dataobj)
        voxel = np.prod(voxel_spacing(img.affine))
        row = rows.set_index("level")
        extra = row.loc["T10T11"]
        assert extra["dice"] == 0 and extra["ref_voxels"] == 0 and extra["ref_volume_mm3"] == 0
        assert extra["pred_voxels"] == 5 * 5 * ref.shape[0]
        assert extra["pred_volume_mm3"] == pytest.approx(extra["pred_voxels"] * voxel)
        assert np.isnan(extra["index"]) and extra["precision"] == 0
        if (ref == l1l2).any():
            assert row.loc["L1L2", "dice"] == 0 and row.loc["L1L2", "pred_voxels"] == 0
            assert row.loc["L1L2", "index"] == l1l2
        mask = ref == l3
        if mask.any():  # same volume: the fraction of L3 whose neighbour along axis 1 is L3
            expected = (mask[:, 1:] & mask[:, :-1]).sum() / mask.sum()
            assert row.loc["L3", "dice"] == pytest.approx(expected)
            assert 0.5 < expected < 1


def _endplates(truth: Path, out: Path, numbering: dict[str, int], abbreviations: dict[str, str],
               desc: str = "endplates", root_table: bool = False) -> Path:
    """Endplate segmentations from the truth's desc-tissues: CEP label -> ``numbering`` of its
    abbreviation (``abbreviations`` maps the truth's name to the one written)."""
    names = _truth_abbreviations(truth)
    rows = []
    for path in sorted(truth.glob("sub-*/anat/*acq-ute_desc-tissues_dseg.nii.gz")):
        img = nib.load(path)
        tissues = np.asarray(img.dataobj)
        data = np.zeros(tissues.shape, np.uint16)
        for truth_name, name in abbreviations.items():
            index = next(i for i, n in names.items() if n == truth_name)
            data[tissues == index] = numbering[name]
        target = _save(data, img.affine,
                       out / path.relative_to(truth).parent / path.name.replace("tissues", desc))
        rows = [{"index": numbering[n], "name": f"endplate {n}", "abbreviation": n}
                for n in abbreviations.values()]
        if not root_table:
            pd.DataFrame(rows).to_csv(target.with_name(target.name.replace(".nii.gz", ".tsv")),
                                      sep="\t", index=False)
    if root_table:
        pd.DataFrame(rows).to_csv(out / "dseg.tsv", sep="\t", index=False)
    return out


ENDPLATES = ("L4L5sup", "L4L5inf", "L5S1sup", "L5S1inf")
TRUTH_NAMES = {f"CEP{e[4:]}_{e[:4]}": e for e in ENDPLATES}


def test_pipeline_endplates_against_truth_and_manual_masks(truth, tmp_path):
    """Issue 2 (and 3 for the per-endplate maps): desc-endplates pairs with the truth's
    desc-tissues, CEPsup_L4L5 is L4L5sup; a manual mask numbered 1-4 in another order pairs by
    name; the pipeline's label-L4L5superior map gives that endplate's AUCs."""
    pipeline = {"L4L5sup": 423, "L4L5inf": 523, "L5S1sup": 424, "L5S1inf": 524}
    pred = _endplates(truth, tmp_path / "pred", pipeline, TRUTH_NAMES)
    (ref_path,) = truth.glob("sub-*/anat/*acq-ute_desc-tissues_dseg.nii.gz")
    img = nib.load(ref_path)
    ref = np.isin(np.asarray(img.dataobj), [423])
    rng = np.random.default_rng(3)
    prob = np.clip(ndimage.gaussian_filter(ref.astype(float), 1.0)
                   + rng.normal(0, 0.1, ref.shape), 0, 1).astype(np.float32)
    _save(prob, img.affine, pred / "sub-01/anat/sub-01_acq-ute_label-L4L5superior_probseg.nii.gz")
    table = evaluate_datasets(pred, truth)
    assert sorted(table["level"]) == sorted(ENDPLATES)
    assert (table["dice"] == 1.0).all() and (table["ref_voxels"] > 0).all()
    assert (table["desc"] == "endplates").all()
    assert table["ref_file"].str.endswith("acq-ute_desc-tissues_dseg.nii.gz").all()
    row = table.set_index("level").loc["L4L5sup"]
    assert row["roc_auc"] == pytest.approx(roc_auc_score(ref.ravel(), prob.ravel()), abs=1e-9)
    assert row["pr_auc"] == pytest.approx(average_precision_score(ref.ravel(), prob.ravel()),
                                          abs=1e-9)
    assert table.set_index("level").drop(index="L4L5sup")["roc_auc"].isna().all()

    # a manual mask numbered 1-4 in another order, named as the truth, one root table
    manual_numbers = {"CEPinf_L5S1": 1, "CEPsup_L5S1": 2, "CEPinf_L4L5": 3, "CEPsup_L4L5": 4}
    manual = _endplates(truth, tmp_path / "manual", manual_numbers,
                        {t: t for t in TRUTH_NAMES}, root_table=True)
    for ours, theirs in ((pred, manual), (manual, pred)):
        table = evaluate_datasets(ours, theirs)
        assert sorted(table["level"]) == sorted(ENDPLATES) and (table["dice"] == 1.0).all()


def test_class_probability_maps_are_scored_per_level(truth, tmp_path):
    """Issue 3: the pipeline's label-disc map scores each disc in the disc's box grown by the
    margin, without the other discs; no label-VB map: vertebrae have no AUC."""
    pred = _pipeline_like(truth, tmp_path / "pred")
    (ref_path,) = truth.glob("sub-*/anat/*acq-mapss_dseg.nii.gz")
    img = nib.load(ref_path)
    labels = np.asarray(img.dataobj)
    discs = (labels >= 118) & (labels <= 124)
    rng = np.random.default_rng(2)
    prob = np.clip(ndimage.gaussian_filter(discs.astype(float), 1.0)
                   + rng.normal(0, 0.1, discs.shape), 0, 1).astype(np.float32)
    _save(prob, img.affine, pred / "sub-01/anat/sub-01_acq-mapss_label-disc_probseg.nii.gz")
    table = evaluate_datasets(pred, truth)
    rows = table[table["acq"] == "mapss"].set_index("level")
    spacing = voxel_spacing(img.affine)
    grow = np.ceil(CLASS_AUC_MARGIN_MM / np.asarray(spacing)).astype(int)
    for level, index in (("L4L5", 123), ("T12L1", 119)):
        mask = labels == index
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        region = np.zeros(mask.shape, bool)
        grown = zip(box, grow, strict=True)
        region[tuple(slice(max(b.start - g, 0), b.stop + g) for b, g in grown)] = True
        region &= ~(discs & ~mask)
        assert (discs & ~mask & ~region).any()  # another disc was left out
        expected = roc_auc_score(mask[region], prob[region])
        assert rows.loc[level, "roc_auc"] == pytest.approx(expected, abs=1e-9)
        assert rows.loc[level, "pr_auc"] == pytest.approx(
            average_precision_score(mask[region], prob[region]), abs=1e-9)
    assert rows.loc[["L1", "L3", "S1"], "roc_auc"].isna().all()
    assert table[table["acq"] != "mapss"]["roc_auc"].isna().all()


def test_non_label_inputs_are_refused(truth, tmp_path, capsys):
    """Issue 5: --suffix T2map is refused with one message; a dseg holding a map too."""
    pred = _pipeline_like(truth, tmp_path / "pred")
    with pytest.raises(UsageError, match="_T2map images are not label images"):
        evaluate_datasets(pred, truth, suffix="T2map")
    out = tmp_path / "out.tsv"
    assert main([str(truth), str(truth), str(out), "--suffix", "T2map"]) == 2
    err = capsys.readouterr().err
    assert "not label images" in err and "Traceback" not in err and not out.exists()
    (path,) = pred.glob("sub-*/anat/*acq-ute_dseg.nii.gz")
    img = nib.load(path)
    _save(np.asarray(img.dataobj) * np.float32(0.37), img.affine, path)
    with pytest.raises(InputError, match="not a label image") as err:
        evaluate_datasets(pred, truth)
    assert path.name in str(err.value)


def test_names_follow_the_pipeline_and_the_truth():
    """The aliases and class maps are those the pipeline and the generator write."""
    from spineqprep.segmentation.endplates import CLASSES, endplate_table
    from spineqprep.synth.labels import dseg_rows
    from spineqprep.workflows.segmentation import PROBSEG_LABELS, _probseg_entities

    assert set(CLASS_PROBSEGS) == set(PROBSEG_LABELS.values())
    pipeline = [row["abbreviation"] for row in endplate_table()]
    assert sorted(pipeline) == sorted(ENDPLATES)
    truth = {row["abbreviation"] for row in dseg_rows()}
    assert {canonical_level(t) for t in TRUTH_NAMES if t in truth} == set(pipeline)
    written = _probseg_entities({"sub": "01"}, list(CLASSES[1:]), {})
    assert [probseg_level(e["label"]) for e in written] == pipeline
