"""The BIDS-App end to end on real signal: real multi-echo spin echo and gradient echo (qMRLab
specimen) and real T1rho (pyKNEEr knee, GE CubeQuant), wrapped as a spine-BIDS dataset.

The data come from ../shared/data (never copied into the repository); the tests skip when it
is absent. The maps written by the app must equal per-voxel curve_fit on the same voxels.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.optimize import curve_fit

from spineqprep.cli.run import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QMRLAB = DATA / "qmrlab-mese-megre" / "Data"
KNEE = DATA / "pykneer-knee-t1rho-dess" / "code" / "demo" / "original" / "01" / "cubeQuant"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not QMRLAB.is_dir() or not KNEE.is_dir(),
                       reason="../shared/data (qMRLab, pyKNEEr) absent"),
]


def _write_series(anat: Path, stem: str, entity: str, suffix: str, volumes: list[np.ndarray],
                  affine: np.ndarray, field: str, times: list[float], extra: dict) -> None:
    anat.mkdir(parents=True, exist_ok=True)
    for i, (vol, t) in enumerate(zip(volumes, times, strict=True), start=1):
        name = f"{stem}_{entity}-{i}_{suffix}"
        nib.Nifti1Image(vol.astype(np.float32), affine).to_filename(anat / f"{name}.nii.gz")
        (anat / f"{name}.json").write_text(json.dumps({field: t, **extra}))


def _knee_volumes() -> tuple[list[np.ndarray], np.ndarray]:
    pydicom = pytest.importorskip("pydicom")
    volumes = []
    for folder in sorted(KNEE.iterdir()):
        slices = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
        slices.sort(key=lambda d: float(d.ImagePositionPatient[0]))
        volumes.append(np.stack([d.pixel_array.astype(np.float32) for d in slices], axis=-1))
    # voxel (row, column, slice) -> scanner LPS from the DICOM geometry, then to RAS (NIfTI)
    first = slices[0]
    row_cos, col_cos = np.array(first.ImageOrientationPatient[:3]), np.array(
        first.ImageOrientationPatient[3:])
    d_row, d_col = (float(v) for v in first.PixelSpacing)
    step = (np.array(slices[-1].ImagePositionPatient, float)
            - np.array(first.ImagePositionPatient, float)) / (len(slices) - 1)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = col_cos * d_row, row_cos * d_col, step
    affine[:3, 3] = np.array(first.ImagePositionPatient, float)
    return volumes, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory) -> Path:
    from scipy.io import loadmat

    root = tmp_path_factory.mktemp("real") / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "real signal", "BIDSVersion": "1.10.1", "DatasetType": "raw"}))
    (root / "participants.tsv").write_text("participant_id\nsub-specimen\nsub-knee\n")
    (root / ".bidsignore").write_text("**/*_MESL.nii.gz\n**/*_MESL.json\n")
    anat = root / "sub-specimen" / "anat"
    mese = loadmat(QMRLAB / "MWF_demo" / "MET2data.mat")["MET2data"]  # (64, 64, 1, 32)
    # echo 1 carries the stimulated-echo artefact (PROVENANCE.md): the series starts at echo 2
    _write_series(anat, "sub-specimen_acq-cpmg", "echo", "MESE",
                  [mese[..., k] for k in range(1, 32)], np.eye(4), "EchoTime",
                  [round(0.01 * (k + 1), 3) for k in range(1, 32)], {"RepetitionTime": 2.0})
    gre = nib.load(QMRLAB / "B0_DEM_demo" / "Magn.nii.gz").get_fdata()  # (64, 64, 1, 8)
    _write_series(anat, "sub-specimen_acq-ute", "echo", "MEGRE",
                  [gre[..., k] for k in range(8)], np.eye(4), "EchoTime",
                  [round(0.0019 * (k + 1), 4) for k in range(8)], {"RepetitionTime": 0.05})
    knee, affine = _knee_volumes()
    _write_series(root / "sub-knee" / "anat", "sub-knee_acq-cubequant", "tsl", "MESL", knee,
                  affine, "SpinLockTime", [0.001, 0.01, 0.03, 0.06],
                  {"SpinLockFrequency": 500.0, "RepetitionTime": 1.302})
    return root


def _curve_fit_t(y: np.ndarray, t: np.ndarray) -> float:
    def model(tt, s0, r):
        return s0 * np.exp(-r * tt)

    try:
        p, _ = curve_fit(model, t, y, p0=(y[0] * 1.1, 1 / 0.05), maxfev=20000)
    except RuntimeError:
        return np.nan
    return 1 / p[1]


def test_app_maps_on_real_signal_equal_curve_fit(real_dataset, tmp_path) -> None:
    out = tmp_path / "out"
    code = main([str(real_dataset), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--no-registration"])
    assert code == 0
    rng = np.random.default_rng(1)
    for rel, span in [("sub-specimen/anat/sub-specimen_acq-cpmg_T2map.nii.gz", 0.31),
                      ("sub-specimen/anat/sub-specimen_acq-ute_T2starmap.nii.gz", 0.0133),
                      ("sub-knee/anat/sub-knee_acq-cubequant_T1rho.nii.gz", 0.059)]:
        path = out / rel
        meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        times = np.array(meta.get("EchoTime") or meta["SpinLockTime"])
        signal = np.stack([nib.load(real_dataset / s.removeprefix("bids:raw:")).get_fdata()
                           for s in meta["Sources"]], axis=-1).reshape(-1, times.size)
        fitted = nib.load(path).get_fdata().ravel()
        valid = np.isfinite(fitted)
        # voxels with signal whose T the times can measure (a T far beyond the sampled span is
        # not identifiable, by curve_fit or anyone)
        bright = signal[:, 0] > np.percentile(signal[:, 0], 75)
        candidates = np.flatnonzero(valid & bright & (fitted > 0) & (fitted < 2 * span))
        assert candidates.size > 50, rel
        pick = rng.choice(candidates, size=min(200, candidates.size), replace=False)
        ref = np.array([_curve_fit_t(signal[i], times) for i in pick])
        ok = np.isfinite(ref)
        assert ok.mean() > 0.95
        assert np.max(np.abs(fitted[pick][ok] - ref[ok])) < 1e-4, rel  # 0.1 ms
