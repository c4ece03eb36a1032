"""Users' label tables translated to spineqprep's numbering (spineqprep.segmentation.lut)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from spineqprep.errors import InputError
from spineqprep.segmentation.localise import crop_box, l5_crop_box, label_centroid
from spineqprep.segmentation.lut import (
    check_segmentation,
    endplate_table,
    label_mapping,
    read_lut,
    standard_row,
    standardise,
)


@pytest.mark.parametrize("name, index", [
    ("L5", 24), ("l5", 24), ("vertebral body L5", 24), ("S1", 26), ("Sacrum", 26),
    ("T11", 18), ("L4L5", 123), ("l4-l5", 123), ("intervertebral disc L5-S1", 124),
    ("T12L1", 119), ("L4L5sup", 423), ("L4L5_inferior", 523),
    ("superior cartilage endplate of disc L5-S1", 424), ("V2", 1002), ("D1", 1101),
    ("background", 0),
])
def test_accepted_names(name: str, index: int) -> None:
    assert standard_row(name)["index"] == index


@pytest.mark.parametrize("name", ["L4L6", "disc", "nucleus", "L5S2", ""])
def test_unknown_names(name: str) -> None:
    assert standard_row(name) is None


def _renumbered() -> tuple[nib.Nifti1Image, nib.Nifti1Image, pd.DataFrame]:
    """A standard labelling and the same image renumbered 1..n, with an index/name table."""
    data = np.zeros((4, 30, 30), np.uint8)
    for j, label in enumerate((26, 124, 24, 123, 23)):
        data[:, 2 + 5 * j: 6 + 5 * j, 10:20] = label
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    new = {26: 3, 124: 1, 24: 7, 123: 2, 23: 5}  # L5 = 7
    names = {3: "sacrum", 1: "l5-s1", 7: "vertebral body L5", 2: "L4L5", 5: "l4"}
    renumbered = np.vectorize(lambda v: new.get(int(v), 0))(data).astype(np.uint8)
    table = pd.DataFrame({"index": list(names), "name": list(names.values())})
    return (nib.Nifti1Image(data, affine), nib.Nifti1Image(renumbered, affine), table)


def test_renumbered_mask_translates_to_the_standard_labels() -> None:
    standard, renumbered, table = _renumbered()
    mapping = label_mapping(table, np.unique(renumbered.dataobj))
    img, rows = standardise(renumbered, mapping)
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(standard.dataobj))
    assert img.get_data_dtype() == np.uint16
    assert [(r["index"], r["abbreviation"]) for r in rows] == [
        (23, "L4"), (24, "L5"), (26, "S1"), (123, "L4L5"), (124, "L5S1")]
    # the L5 crop centre comes from the translated image as from the standard one
    assert np.allclose(label_centroid(img), label_centroid(standard))
    box = l5_crop_box(img, standard, size_mm=(10, 10))
    assert box == crop_box(standard, label_centroid(standard), (10, 10))


def test_abbreviation_first_then_name() -> None:
    table = pd.DataFrame({"index": [4, 9], "name": ["my L5", "intervertebral disc L4-L5"],
                          "abbreviation": ["L5", "custom"]})
    mapping = label_mapping(table, [0, 4, 9])
    assert {k: v["index"] for k, v in mapping.items()} == {4: 24, 9: 123}


@pytest.mark.parametrize("rows, present, kind, words", [
    ({1: "L5", 2: "kidney"}, [1, 2], "spine", "label 2 (kidney) is not a level"),
    ({1: "L5"}, [1, 3], "spine", "label 3 is in the image but has no row"),
    ({1: "L5", 2: "vertebral body L5"}, [1, 2], "spine", "labels 1 and 2 are both L5"),
    ({1: "L4L5sup"}, [1], "spine", "does not belong in a spine segmentation"),
    ({1: "L5"}, [1], "endplates", "does not belong in an endplate segmentation"),
])
def test_bad_tables_name_the_problem_and_the_fix(rows, present, kind, words) -> None:
    table = pd.DataFrame({"index": list(rows), "name": list(rows.values())})
    with pytest.raises(InputError) as err:
        label_mapping(table, present, kind=kind, path="manual/dseg.tsv")
    message = str(err.value)
    assert message.startswith("manual/dseg.tsv: ") and words in message
    assert "fix:" in message


def test_rows_of_absent_labels_are_ignored() -> None:
    """One dataset-wide dseg.tsv may list tissues of other images."""
    table = pd.DataFrame({"index": [1, 24], "name": ["muscle", "vertebral body L5"]})
    assert list(label_mapping(table, [0, 24])) == [24]


def test_check_segmentation_reads_both_files(tmp_path) -> None:
    _, renumbered, table = _renumbered()
    renumbered.to_filename(tmp_path / "dseg.nii.gz")
    table.to_csv(tmp_path / "dseg.tsv", sep="\t", index=False)
    mapping = check_segmentation(tmp_path / "dseg.nii.gz", tmp_path / "dseg.tsv")
    assert mapping[7]["abbreviation"] == "L5"
    (tmp_path / "bad.tsv").write_text("index\tlabel\n7\tL5\n")
    with pytest.raises(InputError, match=r"bad\.tsv.*no column"):
        check_segmentation(tmp_path / "dseg.nii.gz", tmp_path / "bad.tsv")


def test_endplate_table_names_round_trip() -> None:
    """spineqprep's own endplate table (a previous run given with -d) reads back unchanged."""
    table = pd.DataFrame(endplate_table())
    mapping = label_mapping(table, table["index"], kind="endplates")
    assert all(k == v["index"] for k, v in mapping.items()) and len(mapping) == 4


def test_read_lut_table_with_index_and_name_only(tmp_path) -> None:
    path = tmp_path / "dseg.tsv"
    path.write_text("index\tname\n7\tL5\n2\tL4-L5\n")
    mapping = label_mapping(read_lut(path), [2, 7])
    assert {k: v["index"] for k, v in mapping.items()} == {2: 123, 7: 24}
