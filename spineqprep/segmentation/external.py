"""Public labelled lumbar MRI as spine-BIDS, for fine-tuning and for held-out evaluation.

FastCleverSeg's redistribution (Ramos et al., Magn Reson Imaging 2024; the underlying datasets'
authors must be cited, see their PROVENANCE) ships MATLAB files with an image ``I`` and labels
``GT`` at 1 mm isotropic and no affine: axis 0 superior -> inferior, axis 1 anterior ->
posterior, axis 2 left-right (handedness unknown; assumed left -> right). :func:`convert`
writes them as a raw BIDS dataset (``sub-<set><case>/anat/..._acq-sag_T2w.nii.gz``, or ``_T1w``
for the water-fat T1 set) and a derivatives dataset ``derivatives/manual`` with each label map
as ``_dseg.nii.gz`` and its own ``_dseg.tsv``, which ``spineqprep-train spine --labels-dir``
reads. A set that labels only vertebral bodies (or only discs) says so through its table: the
other structures stay undecided in training (partial labels), never background.

    python -m spineqprep.segmentation.external SRC OUT [--split train|test|all]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from spineqprep.bids.derivatives import atomic_write_json, atomic_write_nifti, write_dseg_tsv
from spineqprep.errors import InputError, SpineqprepError

#: voxel (row S->I, column A->P, slice L->R) at 1 mm -> RAS mm (orientation assumed)
AFFINE = np.array([[0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1.0]])


@dataclass(frozen=True)
class LabelSet:
    """One FastCleverSeg set: folder, subject prefix, image suffix and label table."""

    folder: str
    prefix: str
    suffix: str
    rows: tuple[tuple[int, str, str], ...]  # (index, name, abbreviation)
    test_cases: tuple[str, ...]  # held out from fine-tuning, evaluated only


_VB_INSTANCES = tuple((i, f"vertebral body (instance {i}, level not named)", f"VB{i}")
                      for i in range(1, 10))
SETS = {
    "IVD": LabelSet("IVD/Isotropic/Matlab", "ivd", "T2w",
                    tuple((i, f"intervertebral disc {d[:2]}-{d[2:]}", d) for i, d in
                          enumerate(("L5S1", "L4L5", "L3L4", "L2L3", "L1L2"), start=1)),
                    ("20", "25")),
    "VB1": LabelSet("VBs/VB1/Isotropic/Matlab", "vbone", "T2w", _VB_INSTANCES, ("07", "08", "10")),
    "VB2": LabelSet("VBs/VB2/Isotropic/Matlab", "vbtwo", "T2w", _VB_INSTANCES[:7],
                    ("09", "10", "12")),
    "VB3": LabelSet("VBs/VB3/Isotropic/Matlab", "vbthree", "T1w",
                    tuple((i, f"vertebral body L{i}", f"L{i}") for i in range(1, 6)),
                    ("25", "26", "27", "28", "29", "30", "31", "32", "34", "35", "36")),
}


def cases(src: Path, split: str = "all") -> list[tuple[str, LabelSet, Path]]:
    """(case, set, .mat path) of every case in ``src`` (the dataset's ``ImageDatasets``
    folder or its parent) in ``split``: ``train``, ``test`` (held out) or ``all``."""
    root = src / "ImageDatasets" if (src / "ImageDatasets").is_dir() else src
    out = []
    for label_set in SETS.values():
        for path in sorted((root / label_set.folder).glob("*.mat")):
            case = "".join(ch for ch in path.stem if ch.isdigit())[-2:]
            held_out = case in label_set.test_cases
            if split == "all" or (split == "test") == held_out:
                out.append((case, label_set, path))
    return out


def load_case(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image and label arrays of one .mat file (labels cropped to the image: some label
    volumes are one slice larger)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        image = np.asarray(mat["I"], np.float32)
        labels = np.asarray(mat["GT"])[: image.shape[0], : image.shape[1], : image.shape[2]]
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"not a FastCleverSeg case ({err})", path=path,
                         fix="point to the dataset's ImageDatasets folder") from err
    return image, np.rint(labels).astype(np.uint8)


def convert(src: Path, out: Path, split: str = "all") -> list[Path]:
    """Write the cases of ``split`` as raw BIDS in ``out`` with labels in
    ``out/derivatives/manual``; returns the label files."""
    found = cases(src, split)
    if not found:
        raise InputError("no FastCleverSeg .mat files found", path=src,
                         fix="give the folder holding ImageDatasets/")
    manual = out / "derivatives" / "manual"
    written = []
    for case, label_set, path in found:
        image, labels = load_case(path)
        subject = f"{label_set.prefix}{case}"
        anat = Path(f"sub-{subject}") / "anat"
        stem = f"sub-{subject}_acq-sag"
        atomic_write_nifti(nib.Nifti1Image(image, AFFINE), out / anat / f"{stem}_"
                           f"{label_set.suffix}.nii.gz")
        atomic_write_nifti(nib.Nifti1Image(labels, AFFINE), manual / anat / f"{stem}_dseg.nii.gz")
        write_dseg_tsv(manual / anat, [{"index": i, "name": n, "abbreviation": a}
                                       for i, n, a in label_set.rows], f"{stem}_dseg.tsv")
        written.append(manual / anat / f"{stem}_dseg.nii.gz")
    atomic_write_json({"Name": "FastCleverSeg lumbar MRI (converted by spineqprep)",
                       "BIDSVersion": "1.10.0", "DatasetType": "raw",
                       "License": "research use; cite the source datasets (PROVENANCE.md)"},
                      out / "dataset_description.json")
    atomic_write_json({"Name": "manual labels of FastCleverSeg", "BIDSVersion": "1.10.0",
                       "DatasetType": "derivative", "DatasetLinks": {"raw": "../.."},
                       "GeneratedBy": [{"Name": "manual"}]},
                      manual / "dataset_description.json")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="FastCleverSeg folder (holding ImageDatasets/)")
    p.add_argument("out", type=Path, help="BIDS folder to write")
    p.add_argument("--split", choices=["train", "test", "all"], default="train")
    args = p.parse_args(argv)
    try:
        files = convert(args.src, args.out, args.split)
    except SpineqprepError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps({"cases": len(files), "labels": str(args.out / "derivatives/manual")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
