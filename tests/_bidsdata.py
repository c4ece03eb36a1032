"""Tiny spine-BIDS datasets for the tests of ``spineqprep.bids`` (a few KB each, built in ms).

Not a generator of realistic images (that is ``spineqprep.synth``): the arrays are small random
volumes with a true exponential decay, enough for naming, metadata, validation and a fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SERIES = {
    "MESE": ("mese", "echo", "EchoTime", [0.010, 0.030, 0.050, 0.080]),
    "MESL": ("mapss", "tsl", "SpinLockTime", [0.0, 0.010, 0.040, 0.080]),
    "MEGRE": ("ute", "echo", "EchoTime", [0.0005, 0.002, 0.005]),
}
SHAPE = (6, 7, 3)
AFFINE = np.diag([0.8, 0.8, 4.0, 1.0])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write ``data`` as a NIfTI-1 image (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def make_dataset(
    root: Path,
    subjects: tuple[str, ...] = ("01", "02"),
    sessions: tuple[str, ...] = (),
    suffixes: tuple[str, ...] = ("MESE", "MESL", "MEGRE"),
    inherit_mesl: bool = True,
    bidsignore: bool = True,
    seed: int = 0,
) -> Path:
    """A valid spine-BIDS dataset at ``root``: T1w/T2w and the series of ``suffixes``.

    With ``inherit_mesl`` the constant ``SpinLockFrequency`` sits in a top-level
    ``acq-mapss_MESL.json`` (sidecar inheritance) and each file's sidecar holds its time only.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "dataset_description.json", {
        "Name": "tiny spine test", "BIDSVersion": "1.10.1", "DatasetType": "raw",
        "License": "CC0", "Authors": ["A. Tester", "B. Tester"]})
    (root / "README").write_text("A tiny spine-BIDS dataset written by the spineqprep tests.\n"
                                 "It has structural images and relaxometry series.\n")
    rows = ["participant_id\tage\tsex\tsite"]
    rows += [f"sub-{s}\t{30 + i}\t{'MF'[i % 2]}\tA" for i, s in enumerate(subjects)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    if bidsignore:
        (root / ".bidsignore").write_text("**/*_MESL.nii.gz\n**/*_MESL.nii\n**/*_MESL.json\n")
    if "MESL" in suffixes and inherit_mesl:
        write_json(root / "acq-mapss_MESL.json", {"SpinLockFrequency": 300.0})
    for sub in subjects:
        for ses in sessions or (None,):
            base = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            for suffix in ("T1w", "T2w"):
                write_nifti(base / f"{prefix}_acq-sag_{suffix}.nii.gz", rng.random(SHAPE) * 100)
                write_json(base / f"{prefix}_acq-sag_{suffix}.json",
                           {"MagneticFieldStrength": 3, "RepetitionTime": 2.0})
            t_true = rng.uniform(0.03, 0.1, SHAPE)
            for suffix in suffixes:
                acq, index, field, times = SERIES[suffix]
                for i, t in enumerate(times, start=1):
                    name = f"{prefix}_acq-{acq}_{index}-{i}_{suffix}"
                    write_nifti(base / f"{name}.nii.gz", 1000 * np.exp(-t / t_true))
                    meta = {field: t, "MagneticFieldStrength": 3, "RepetitionTime": 1.5}
                    if suffix == "MESL" and not inherit_mesl:
                        meta["SpinLockFrequency"] = 300.0
                    write_json(base / f"{name}.json", meta)
    return root
