"""Reapplying a run's staged disc transforms (spineqprep-apply) reproduces the run's maps.

The single-slice (2D) case is the one transformix on the NIfTI cannot redo: the registration
works in the atlas slice's in-plane frame, which only the package knows.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from spineqprep.cli.apply import main
from spineqprep.registration.atlas import load_atlas
from spineqprep.registration.pipeline import (
    SeriesInput,
    disc_labels,
    register_grid,
    stage_results,
)
from spineqprep.synth import generate_dataset

LEVEL = "L4L5"


def _mid_sagittal_slice(img: nib.Nifti1Image, label: int, dseg: np.ndarray) -> tuple[int, slice]:
    """The sagittal axis, and the one-slice range through the disc's centre along it."""
    axis = int(np.argmax(np.abs(img.affine[0, :3])))
    centre = round(float(np.argwhere(dseg == label)[:, axis].mean()))
    return axis, slice(centre, centre + 1)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """One disc of a single sagittal slice registered and staged as a participant run does."""
    root = tmp_path_factory.mktemp("reapply")
    synth = generate_dataset(root / "bids", n_subjects=1, n_sites=1, seed=77, size="medium")
    anat = synth.truth_dir / "sub-01" / "anat"
    dseg3d = nib.load(anat / "sub-01_acq-mapss_dseg.nii.gz")
    t2_3d = nib.load(anat / "sub-01_acq-mapss_T2map.nii.gz")
    label = disc_labels()[LEVEL]
    axis, one = _mid_sagittal_slice(dseg3d, label, np.asarray(dseg3d.dataobj))
    index = tuple(one if a == axis else slice(None) for a in range(3))
    dseg, t2 = dseg3d.slicer[index], t2_3d.slicer[index]
    valid = nib.Nifti1Image((np.asarray(t2.dataobj) > 0).astype(np.uint8), t2.affine)
    ones = nib.Nifti1Image(np.ones(t2.shape, np.float32), t2.affine)
    series = SeriesInput("T2map", (t2,), (0.0,),
                         {"T": t2, "S0": ones, "Rsquared": ones, "mask": valid})
    results = register_grid(dseg, [series], load_atlas(), root / "work",
                            disc_labels=disc_labels(), warp="maps", levels=(LEVEL,))
    assert results[0].quality.passed, results[0].quality.reason
    out = root / "derivatives"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "test", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    meta = {"T2map": {"Sources": [], "Description": "T2.", "EchoTime": [0.0]}}
    stage_results(results, meta, {"sub": "01", "acq": "mapss"}, out, "maps")
    native = root / "native_T2map.nii.gz"
    nib.save(t2, native)
    return out / "sub-01" / "anat", native


def test_reapply_reproduces_the_runs_2d_map(staged, tmp_path) -> None:
    anat, native = staged
    run_map = anat / f"sub-01_acq-mapss_space-SpineDisc{LEVEL}_T2map.nii.gz"
    sidecar = run_map.with_name(run_map.name.replace(".nii.gz", ".json"))
    out = tmp_path / "again.nii.gz"
    assert main([str(sidecar), str(native), str(out)]) == 0
    expected = nib.load(run_map).get_fdata()
    got = nib.load(out)
    assert got.shape == expected.shape and np.allclose(got.affine, nib.load(run_map).affine)
    inside = np.isfinite(expected)
    assert inside.sum() > 100
    assert np.allclose(got.get_fdata()[inside], expected[inside], atol=1e-5)


def test_reapply_warps_each_volume_of_a_series(staged, tmp_path) -> None:
    anat, native = staged
    sidecar = anat / f"sub-01_acq-mapss_space-SpineDisc{LEVEL}_T2map.json"
    img = nib.load(native)
    t2 = np.asarray(img.dataobj, np.float32)
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([t2, 2 * t2], axis=-1), img.affine), series)
    out = tmp_path / "series_atlas.nii.gz"
    assert main([str(sidecar), str(series), str(out)]) == 0
    data = nib.load(out).get_fdata()
    assert data.shape[-1] == 2
    assert np.allclose(data[..., 1], 2 * data[..., 0], atol=1e-4)


def test_reapply_errors_name_the_file(staged, tmp_path, capsys) -> None:
    anat, native = staged
    sidecar = anat / f"sub-01_acq-mapss_space-SpineDisc{LEVEL}_T2map.json"
    not_atlas = tmp_path / "sub-01_T2map.json"
    not_atlas.write_text("{}")
    assert main([str(not_atlas), str(native), str(tmp_path / "o.nii.gz")]) == 1
    assert "not the sidecar of an atlas-space map" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti")
    assert main([str(sidecar), str(corrupt), str(tmp_path / "o.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert "corrupt.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "o.nii.gz").exists()
    assert main([str(sidecar), str(native), str(native)]) == 2
    assert "overwrite the input" in capsys.readouterr().err
