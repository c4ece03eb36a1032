"""Derivative names, atomic writers, and a derivatives dataset the BIDS validator accepts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _bidsdata import AFFINE, make_dataset
from bids import BIDSLayout

from spineqprep.bids.derivatives import (
    atomic_write_json,
    atomic_write_nifti,
    atomic_write_text,
    bids_uri,
    build_path,
    default_dseg_labels,
    map_metadata,
    write_bidsignore,
    write_dataset_description,
    write_dseg_tsv,
)
from spineqprep.bids.layout import collect_series
from spineqprep.bids.schema import load_schema, pybids_config
from spineqprep.bids.validator import run_bids_validator


def test_build_path_orders_entities_from_the_schema():
    assert build_path({"acq": "mese", "sub": "01", "ses": "1"}, "T2map", ".nii.gz") == \
        "sub-01/ses-1/anat/sub-01_ses-1_acq-mese_T2map.nii.gz"
    assert build_path({"desc": "T2fit", "subject": "sub-01", "acquisition": "mese",
                       "session": None}, "Rsquared", ".json") == \
        "sub-01/anat/sub-01_acq-mese_desc-T2fit_Rsquared.json"
    assert build_path({"sub": "01", "acq": "mese", "label": "L4L5", "space": "spine"},
                      "probseg", ".nii.gz") == \
        "sub-01/anat/sub-01_acq-mese_space-spine_label-L4L5_probseg.nii.gz"
    for bad in ({"sub": "0_1"}, {"acq": "x"}, {"sub": "01", "run": "1"}, {"sub": "01", "tsl": "a"}):
        with pytest.raises(ValueError):
            build_path(bad, "T2map", ".nii.gz")


def test_atomic_writers_leave_no_partial_file(tmp_path):
    target = tmp_path / "a" / "x.json"
    atomic_write_json({"Units": "s"}, target)
    assert json.loads(target.read_text()) == {"Units": "s"}
    assert oct(target.stat().st_mode & 0o777) == "0o644"

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        atomic_write_json({"bad": Unserialisable()}, target)
    assert json.loads(target.read_text()) == {"Units": "s"}  # old content intact
    img = nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), AFFINE)
    out = atomic_write_nifti(img, tmp_path / "a" / "m.nii.gz")
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the name says
    assert np.array_equal(nib.load(out).get_fdata(), img.get_fdata())
    atomic_write_text("hello\n", tmp_path / "a" / "t.txt")
    assert sorted(os.listdir(tmp_path / "a")) == ["m.nii.gz", "t.txt", "x.json"]


def test_dataset_description_bidsignore_and_dseg(tmp_path):
    raw = make_dataset(tmp_path / "raw", subjects=("01",), suffixes=())
    desc = json.loads((raw / "dataset_description.json").read_text())
    desc["DatasetDOI"] = "doi:10.1234/abcd"
    (raw / "dataset_description.json").write_text(json.dumps(desc))
    out = tmp_path / "out"
    (out).mkdir()
    (out / ".bidsignore").write_text("mine.txt\n")
    write_dataset_description(out, version="9.9", bids_dir=raw,
                              container={"Type": "docker", "Tag": "spineqprep/spineqprep:9.9"})
    written = json.loads((out / "dataset_description.json").read_text())
    assert written["DatasetType"] == "derivative"
    assert written["GeneratedBy"] == [{"Name": "spineqprep", "Version": "9.9", "Container": {
        "Type": "docker", "Tag": "spineqprep/spineqprep:9.9"}}]
    assert written["DatasetLinks"] == {"raw": str(raw.resolve())}
    assert written["SourceDatasets"] == [{"URL": "bids:raw:", "DOI": "doi:10.1234/abcd"}]
    lines = (out / ".bidsignore").read_text().splitlines()
    assert lines[0] == "mine.txt" and "**/*_Rsquared.nii.gz" in lines
    write_bidsignore(out)
    assert (out / ".bidsignore").read_text().splitlines() == lines  # idempotent
    write_dseg_tsv(out)
    rows = (out / "dseg.tsv").read_text().splitlines()
    assert rows[0] == "index\tname\tabbreviation"
    assert "123\tintervertebral disc L4-L5\tL4L5" in rows
    assert len(rows) == 1 + len(default_dseg_labels())
    with pytest.raises(ValueError):
        write_dseg_tsv(out, [{"index": 1, "name": "a"}, {"index": 1, "name": "b"}])


def test_map_metadata():
    meta = map_metadata("T1rho", ["bids:raw:sub-01/anat/x.nii.gz"], SpinLockFrequency=300.0)
    assert meta == {"Units": "s", "SkullStripped": False,
                    "Sources": ["bids:raw:sub-01/anat/x.nii.gz"], "SpinLockFrequency": 300.0}
    with pytest.raises(ValueError):
        map_metadata("MESE")


def test_derivatives_dataset_passes_the_bids_validator(tmp_path):
    """Maps, fit by-products and segmentations named by build_path are valid BIDS-Derivatives."""
    raw = make_dataset(tmp_path / "raw", subjects=("01",), sessions=("1",))
    out = tmp_path / "derivatives" / "spineqprep"
    write_dataset_description(out, bids_dir=raw)
    write_dseg_tsv(out)
    maps = load_schema()["derivatives"]["maps"]
    written = []
    for series in collect_series(raw, "01"):
        sources = [bids_uri(f, raw) for f in series.files]
        assert sources[0].startswith("bids:raw:sub-01/ses-1/anat/sub-01_ses-1_acq-")
        # a log-linear fit of the first and last image: the map is in seconds
        first, last = (nib.load(series.files[i]) for i in (0, -1))
        dt = series.times[-1] - series.times[0]
        t_map = dt / np.log(first.get_fdata() / last.get_fdata())
        desc = maps[series.target]["desc"]
        ents = series.entities
        items = [
            (ents, series.target, t_map.astype(np.float32),
             map_metadata(series.target, sources, **{series.time_field: list(series.times)})),
            ({**ents, "desc": desc}, "S0map", first.get_fdata().astype(np.float32),
             {"Sources": sources, "SkullStripped": False}),
            ({**ents, "desc": desc}, "Rsquared", np.ones(t_map.shape, np.float32), {}),
            ({**ents, "desc": desc}, "mask", np.ones(t_map.shape, np.uint8),
             {"Sources": sources, "Type": "ROI"}),
        ]
        for entities, suffix, data, meta in items:
            img = nib.Nifti1Image(data, first.affine)
            img.header.set_xyzt_units("mm")
            rel = build_path(entities, suffix, ".nii.gz")
            written.append(atomic_write_nifti(img, out / rel))
            atomic_write_json(meta, out / rel.replace(".nii.gz", ".json"))
        assert float(np.median(t_map)) == pytest.approx(0.065, abs=0.035)  # truth 30-100 ms
    seg = nib.Nifti1Image(np.full((6, 7, 3), 123, np.uint8), AFFINE)
    seg.header.set_xyzt_units("mm")
    atomic_write_nifti(seg, out / build_path({"sub": "01", "ses": "1", "acq": "mese"}, "dseg",
                                             ".nii.gz"))
    (out / "sub-01.html").write_text("<html></html>")
    for folder in ("figures", "log/run1"):
        (out / "sub-01" / folder).mkdir(parents=True)
        (out / "sub-01" / folder / "x.svg").write_text("<svg/>")
    (out / "logs").mkdir()
    (out / "logs" / "CITATION.md").write_text("cite")
    report = run_bids_validator(out)
    assert report.errors == [], "\n".join(map(str, report.errors))
    # pybids reads the names back with the same entities
    layout = BIDSLayout(out, config=["bids", "derivatives", pybids_config()], validate=False)
    found = layout.get(subject="01", session="1", desc="T1rhofit", suffix="Rsquared",
                       extension=".nii.gz")
    assert [Path(f.path).name for f in found] == [
        "sub-01_ses-1_acq-mapss_desc-T1rhofit_Rsquared.nii.gz"]
    assert len(written) == 12
