"""Atlas space end to end: discs registered, echoes warped and fitted, against the truth.

Held-out data: generator seed 2031 and site B (development used seed 3, site A).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from spineqprep.bids.schema import load_schema
from spineqprep.bids.staging import commit_staged
from spineqprep.bids.validate_derivatives import check_derivatives
from spineqprep.cli.run import main
from spineqprep.errors import InputError
from spineqprep.interfaces.registration import RegisterDiscs
from spineqprep.registration import DiscTransform, apply_transform
from spineqprep.registration import pipeline as grid_pipeline
from spineqprep.registration.atlas import LEVELS as ALL_LEVELS
from spineqprep.registration.atlas import load_atlas, space_name
from spineqprep.registration.isolate import Crash, run_forked
from spineqprep.registration.pipeline import (
    QC_COLUMNS,
    DiscResult,
    SeriesInput,
    disc_labels,
    register_grid,
    stage_results,
)
from spineqprep.registration.quality import DiscQuality, cut_by_fov
from spineqprep.relaxometry import fit_images
from spineqprep.synth import generate_dataset

HELD_OUT_SEED = 2031
LEVELS = ("L3L4", "L4L5")
#: Dice bar of a true disc mask on a 3-5 mm grid (measured: 0.892-0.927 on these held-out
#: grids, 0.857-0.928 on the 60 discs of the README demo dataset)
COARSE_DICE = 0.86


def _pattern_r(estimate: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """Pearson r over the atlas disc's interior (one voxel in from its outline: the outline
    layer mixes in the native grid's partial volume) where the fit is valid."""
    inside = ndimage.binary_erosion(np.isfinite(truth)) & valid & np.isfinite(estimate)
    return float(np.corrcoef(estimate[inside], truth[inside])[0, 1])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg_held_out")
    return generate_dataset(root / "bids", n_subjects=2, n_sites=2, seed=HELD_OUT_SEED,
                            size="medium")


def test_discs_in_atlas_space_match_the_truth(held_out, tmp_path) -> None:
    subject = next(s for s, site in held_out.sites.items() if site == "B")
    anat = held_out.raw_dir / f"sub-{subject}" / "anat"
    files = sorted(anat.glob(f"sub-{subject}_acq-mese_echo-*_MESE.nii.gz"))
    times = [json.loads(f.with_name(f.name.replace(".nii.gz", ".json")).read_text())["EchoTime"]
             for f in files]
    images = tuple(nib.load(f) for f in files)
    native = fit_images(images, times, t_range=(0.001, 1.0))
    truth = held_out.truth_dir / f"sub-{subject}" / "anat"
    dseg = nib.load(truth / f"sub-{subject}_acq-mese_dseg.nii.gz")
    series = SeriesInput("T2map", images, tuple(times), native)
    atlas = load_atlas()
    results = register_grid(dseg, [series], atlas, tmp_path, disc_labels=disc_labels(),
                            fit_kw={"t_range": (0.001, 1.0)}, levels=LEVELS)
    for r in results:
        q = r.quality
        assert q.passed, (r.level, q)
        assert q.dice >= 0.95, (r.level, q.dice)
        assert q.folded_fraction == 0
        assert q.histogram_distance is not None and q.histogram_distance < 0.1
        fitted = r.maps["T2map"]["echoes"]
        estimate = np.asarray(fitted["T"].dataobj)
        true = np.asarray(nib.load(
            truth / f"sub-{subject}_acq-mese_space-{space_name(r.level)}_T2map.nii.gz").dataobj)
        assert estimate.shape == true.shape
        # NaN off the disc, and where the atlas disc maps outside the native field of view (the
        # L4L5 disc reaches the last of the 14 slices: 107 of its 15273 atlas voxels have no
        # data); finite everywhere else
        ones = nib.Nifti1Image(np.ones(dseg.shape, np.float32), dseg.affine)
        covered = np.asarray(apply_transform(r.transform, ones, atlas.mask(r.level)).dataobj)
        assert np.array_equal(np.isfinite(estimate), np.isfinite(true) & (covered > 0.5))
        assert (np.isfinite(true) & (covered <= 0.5)).mean() < 0.01 * np.isfinite(true).mean()
        r_value = _pattern_r(estimate, true, np.asarray(fitted["mask"].dataobj) > 0)
        assert r_value >= 0.9, (r.level, r_value)


@pytest.fixture(scope="module")
def held_out_coarse(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg_held_out_coarse")
    return generate_dataset(root / "bids", n_subjects=2, n_sites=2, seed=HELD_OUT_SEED,
                            size="small")


@pytest.mark.parametrize(("site", "acq"), [("A", "mapss"), ("B", "fse")])
def test_discs_on_coarse_grids_register(held_out_coarse, tmp_path, site, acq) -> None:
    """Clinical grids (A: 4 x 3.2 x 3.1 mm, B: 5 x 3.4 x 3.4 mm; each disc 3-4 voxels tall and
    cut by the field of view left-right): every level of the true segmentation registers with
    elastix alone, without folding, collapse or reflection. Before the smoothing pyramid and
    1 mm region of interest, 28 of 60 such discs passed
    (benchmarks/bench_registration_coarse.py)."""
    subject = next(s for s, where in held_out_coarse.sites.items() if where == site)
    dseg = nib.load(held_out_coarse.truth_dir / f"sub-{subject}" / "anat"
                    / f"sub-{subject}_acq-{acq}_dseg.nii.gz")
    results = register_grid(dseg, [], load_atlas(), tmp_path, disc_labels=disc_labels())
    for r in results:
        q = r.quality
        assert q.passed, (r.level, q)
        assert r.transform.backend == "elastix", (r.level, q)
        assert q.folded_fraction == 0
        assert 0.5 < q.jacobian_mean < 2.0, (r.level, q.jacobian_mean)
        assert q.dice >= COARSE_DICE, (r.level, q.dice)
        assert q.fov_cut, r.level  # the 40-50 mm left-right field of view cuts every disc


def test_fov_cut_is_a_mask_touching_an_image_face() -> None:
    mask = np.zeros((6, 7, 5), bool)
    mask[2:4, 2:5, 1:4] = True
    assert not cut_by_fov(mask)
    for axis in range(3):
        cut = mask.copy()
        cut[(slice(None),) * axis + (-1,)] = True
        assert cut_by_fov(cut), axis
    assert not cut_by_fov(mask[:, :, 2:3])  # a single slice is not cut along its normal


def test_qc_table_names_each_disc_backend(tmp_path) -> None:
    """A disc the ANTs fallback registered says so in the QC table, not only in its sidecars;
    the schema lists the table's columns."""
    quality = DiscQuality(0.9, 1.0, 0.1, 0.0, None, True, "")
    failed = DiscQuality(0.5, 1.0, 0.1, 0.0, None, False, "Dice 0.50 < 0.85")
    results = [DiscResult("L4L5", DiscTransform("ants", ()), quality, {}, {}),
               DiscResult("L5S1", DiscTransform("elastix", ()), failed, {}, {})]
    qc = stage_results(results, {}, {"sub": "01", "acq": "mese"}, tmp_path, "echoes")[-1]
    table = pd.read_csv(qc, sep="\t", na_values="n/a", keep_default_na=False)
    assert list(table.columns) == list(QC_COLUMNS)
    assert list(table["backend"]) == ["ants", "elastix"]
    assert list(QC_COLUMNS) == load_schema()["atlas"]["registration_qc_columns"]


def test_discs_of_levels_missing_from_the_atlas_are_flagged(tmp_path) -> None:
    """An atlas of some levels only (spineqprep-atlas study --levels): the other levels' discs
    get a QC row "no atlas level" and no map; nothing crashes."""
    atlas = tmp_path / "atlas"
    atlas.mkdir()
    shutil.copy(load_atlas().files["L1L2"], atlas)
    dseg = np.zeros((20, 20, 20), np.uint8)
    dseg[5:15, 5:15, 8:12] = disc_labels()["L4L5"]
    results = register_grid(nib.Nifti1Image(dseg, np.eye(4)), [], load_atlas(atlas),
                            tmp_path / "work", disc_labels=disc_labels(), levels=("L4L5",))
    qc = stage_results(results, {}, {"sub": "01", "acq": "mese"}, tmp_path / "out", "echoes")
    table = pd.read_csv(qc[-1], sep="\t", na_values="n/a", keep_default_na=False)
    assert len(qc) == 1 and list(table["level"]) == ["L4L5"]
    assert not table.loc[0, "passed"] and table.loc[0, "reason"].startswith("no atlas level")


def test_boilerplate_names_the_ants_fallback(tmp_path) -> None:
    """The methods text says when a disc may have been registered by ANTs instead of elastix:
    with the packaged elastix parameters only (register_disc's fallback condition)."""
    from spineqprep.workflows.registration import init_disc_registration_wf

    def desc(**kw) -> str:
        return init_disc_registration_wf({"sub": "01"}, [], staging_dir=tmp_path,
                                         raw_dir=tmp_path, **kw).__desc__

    assert "registered with ANTsPy (affine, then SyN) instead" in desc()
    assert "backend column" in desc()
    assert "instead when" not in desc(backend="ants")
    assert "ANTsPy" not in desc(parameter_maps=[tmp_path / "elastix_bspline.txt"])


def test_participant_level_writes_atlas_space_maps_and_flags_a_failed_disc(tmp_path) -> None:
    synth = generate_dataset(tmp_path / "bids", n_subjects=1, n_sites=1, seed=HELD_OUT_SEED)
    subject = synth.participants[0]
    # segmentations given as derivatives (the truth's), with the L1L2 disc erased: that disc
    # must be flagged and skipped while the others go on
    given = tmp_path / "given"
    given.mkdir()
    for name in ("dataset_description.json", "dseg.tsv"):
        shutil.copy(synth.truth_dir / name, given)
    for path in (synth.truth_dir / f"sub-{subject}" / "anat").glob("*_dseg.nii.gz"):
        if "desc-" in path.name:
            continue
        img = nib.load(path)
        data = np.asarray(img.dataobj).copy()
        data[data == disc_labels()["L1L2"]] = 0
        out = given / path.relative_to(synth.truth_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, img.affine, img.header), out)
    out, work = tmp_path / "out", tmp_path / "work"
    code = main([str(synth.raw_dir), str(out), "participant", "-w", str(work), "--nprocs", "2",
                 "--derivatives", str(given)])
    assert code == 0
    anat = out / f"sub-{subject}" / "anat"
    qc = pd.read_csv(anat / f"sub-{subject}_acq-mapss_desc-registration_qc.tsv", sep="\t",
                     na_values="n/a", keep_default_na=False)
    assert list(qc.columns) == ["level", "dice", "jacobian_mean", "jacobian_sd",
                                "folded_fraction", "histogram_distance", "fov_cut", "passed",
                                "reason", "backend"]
    failed = qc.set_index("level").loc["L1L2"]
    assert str(failed["passed"]).lower() == "false" and "empty" in failed["reason"]
    assert not list(anat.glob("*_space-SpineDiscL1L2_*"))
    for row in qc.itertuples():
        if str(row.passed).lower() != "true":
            continue
        for suffix in ("T2map", "T1rho"):
            path = anat / f"sub-{subject}_acq-mapss_space-{space_name(row.level)}_{suffix}.nii.gz"
            assert path.exists()
            meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
            assert meta["RegistrationQC"]["Passed"] is True
            assert meta["RegistrationQC"]["FoldedFraction"] == 0
            for transform in meta["Transforms"]:
                assert (out / transform.removeprefix("bids::")).exists()
            assert nib.load(path).shape == load_atlas().mask(row.level).shape
    assert (qc["passed"].astype(str).str.lower() == "true").sum() >= 1
    assert not check_derivatives(out)
    report = (out / f"sub-{subject}.html").read_text()
    assert "Atlas space" in report and "registration.png" in report
    assert (out / f"sub-{subject}" / "figures" /
            f"sub-{subject}_acq-mapss_registration.png").exists()


def test_single_slice_mapping_series_run_end_to_end_from_raw(tmp_path) -> None:
    """A mapping series of one sagittal slice (common in clinical T2 mapping), from the raw
    dataset through segmentation, fitting and 2D registration: each disc is mapped onto the
    mid-sagittal slice of its atlas disc."""
    synth = generate_dataset(tmp_path / "bids", n_subjects=1, n_sites=1, seed=HELD_OUT_SEED)
    subject = synth.participants[0]
    for path in synth.raw_dir.rglob("*_acq-mapss_*.nii.gz"):
        img = nib.load(path)
        keep = [slice(None)] * 3
        axis = int(np.argmax(np.abs(img.affine[0, :3])))  # the left-right axis
        keep[axis] = slice(img.shape[axis] // 2, img.shape[axis] // 2 + 1)
        nib.save(img.slicer[tuple(keep)], path)
    out = tmp_path / "out"
    assert main([str(synth.raw_dir), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--nprocs", "2"]) == 0
    anat = out / f"sub-{subject}" / "anat"
    native = nib.load(anat / f"sub-{subject}_acq-mapss_T2map.nii.gz")
    assert sorted(native.shape)[0] == 1
    qc = pd.read_csv(anat / f"sub-{subject}_acq-mapss_desc-registration_qc.tsv", sep="\t",
                     na_values="n/a", keep_default_na=False)
    print(qc[["level", "dice", "passed"]])
    passed = qc[qc["passed"].astype(str).str.lower() == "true"]
    assert len(passed) >= 4, qc  # measured: 5 of 5, Dice 0.90-0.95
    assert (passed["folded_fraction"] == 0).all() and (passed["dice"] >= 0.85).all()
    for level in passed["level"]:
        atlas_map = nib.load(anat / f"sub-{subject}_acq-mapss_space-{space_name(level)}_"
                                    "T2map.nii.gz")
        assert atlas_map.shape == load_atlas().mask_like(level, True).shape
        values = atlas_map.get_fdata()
        assert 0.03 < np.nanmedian(values) < 0.2  # a disc's T2 in seconds, not noise
    assert not check_derivatives(out)


def _segfault() -> None:
    """Die as an itk-elastix crash does (no core file)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signal.SIGSEGV)


def _raise() -> None:
    raise ValueError("bad\nthing")


def test_run_forked_returns_the_result_of_the_child() -> None:
    pid, files = run_forked(lambda: (os.getpid(), ["a", "b"]))
    assert pid != os.getpid() and files == ["a", "b"]


def _hang_with_a_worker(pid_file: Path) -> None:
    """Fork a worker (as the fitter does), note its pid, then hang."""
    worker = os.fork()
    if worker == 0:
        time.sleep(600)  # outlives its parent unless killed with it
        os._exit(0)
    pid_file.write_text(str(worker))
    time.sleep(60)


def test_run_forked_stops_a_child_that_hangs_and_its_workers(tmp_path) -> None:
    pid_file = tmp_path / "worker.pid"
    crash = run_forked(lambda: _hang_with_a_worker(pid_file), timeout_s=1.0)
    assert isinstance(crash, Crash)
    assert crash.message == "did not finish within 1 s and was stopped"
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):  # killed: gone, or a zombie until something reaps it
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the worker of the stopped child still runs: {stat.read_text()}")


@pytest.mark.parametrize(("fn", "message"), [
    (_raise, "raised ValueError: bad thing"),
    (lambda: os._exit(3), "exited with code 3 without a result"),
    (_segfault, "was killed by signal 11 (Segmentation fault)"),
])
def test_run_forked_describes_a_child_that_raises_or_dies(fn, message) -> None:
    crash = run_forked(fn)
    assert isinstance(crash, Crash)
    assert crash.message == message
    assert ("ValueError: bad" in crash.traceback) == (fn is _raise)


def _two_disc_grid() -> tuple[nib.Nifti1Image, SeriesInput]:
    """A 20-voxel cube with the L3L4 and L4L5 discs and a T2 series of T = 80 ms everywhere."""
    dseg = np.zeros((20, 20, 20), np.uint8)
    dseg[5:15, 5:15, 4:7] = disc_labels()["L3L4"]
    dseg[5:15, 5:15, 12:15] = disc_labels()["L4L5"]
    times = (0.01, 0.03, 0.05)
    echoes = tuple(nib.Nifti1Image(np.full(dseg.shape, 1000 * np.exp(-t / 0.08), np.float32),
                                   np.eye(4)) for t in times)
    native = {key: nib.Nifti1Image(np.full(dseg.shape, value, np.float32), np.eye(4))
              for key, value in (("T", 0.08), ("S0", 1000.0), ("Rsquared", 1.0), ("mask", 1))}
    return nib.Nifti1Image(dseg, np.eye(4)), SeriesInput("T2map", echoes, times, native)


def test_an_unexpected_error_fails_its_disc_only(tmp_path, monkeypatch) -> None:
    """An exception (a bug) while warping one disc fails that disc, with the error as its
    one-line reason, and the next disc is registered, warped and fitted; an InputError (bad
    arguments) still raises. Registration and warping are stand-ins (no ITK): a passing
    transform per disc, and a warp that spreads an image's mean over the atlas grid."""

    def register(moving, atlas_mask, out_dir, **kw):
        return (DiscTransform("elastix", (Path(out_dir) / "xfm.txt",)),
                DiscQuality(0.95, 1.0, 0.05, 0.0, None, True, ""))

    def warp(transform, image, atlas_mask, *, interpolation="linear"):
        if transform.files[0].parent.name == "L3L4":
            raise error
        value = np.float32(np.mean(np.asarray(image.dataobj)))
        return nib.Nifti1Image(np.full(atlas_mask.shape, value), atlas_mask.affine)

    monkeypatch.setattr(grid_pipeline, "register_disc", register)
    monkeypatch.setattr(grid_pipeline, "apply_transform", warp)
    dseg, series = _two_disc_grid()
    error = ZeroDivisionError("a\n  bug")
    results = register_grid(dseg, [series], load_atlas(), tmp_path, disc_labels=disc_labels(),
                            levels=LEVELS)
    bad, good = results
    assert bad.level == "L3L4" and not bad.quality.passed and bad.maps == {}
    assert bad.quality.reason == ("unexpected error (a bug: please report it): "
                                  "ZeroDivisionError: a bug")
    assert good.level == "L4L5" and good.quality.passed
    t2 = np.asarray(good.maps["T2map"]["echoes"]["T"].dataobj)
    inside = np.asarray(load_atlas().mask("L4L5").dataobj) > 0.5
    assert np.allclose(t2[inside], 0.08, rtol=1e-3)
    assert good.quality.histogram_distance is not None and good.quality.histogram_distance < 1e-3
    error = InputError("an echo is 4D")
    with pytest.raises(InputError, match="an echo is 4D"):
        register_grid(dseg, [series], load_atlas(), tmp_path, disc_labels=disc_labels(),
                      levels=LEVELS)


def test_a_crashed_registration_process_flags_every_disc(tmp_path, monkeypatch) -> None:
    """itk-elastix may segfault: the node survives, lists only the grid's QC table (every
    level failed, saying why) and never a file the dead process staged, so publishing the
    subject commits that table alone."""
    staging = tmp_path / "staging"
    stale = staging / "sub-01" / "anat" / "sub-01_acq-mese_space-SpineDiscL4L5_T2map.nii.gz"

    def crash(*args, **kwargs):
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"half")
        _segfault()

    monkeypatch.setattr("spineqprep.interfaces.registration.register_grid", crash)
    dseg, series = _two_disc_grid()
    nib.save(dseg, tmp_path / "dseg.nii.gz")
    files = []
    for i, img in enumerate([*series.images, *series.native_maps.values()]):
        files.append(tmp_path / f"image{i}.nii.gz")
        nib.save(img, files[-1])
    node = RegisterDiscs(
        in_dseg=str(tmp_path / "dseg.nii.gz"), in_fits=[str(f) for f in files[3:]],
        series=[{"suffix": "T2map", "files": [str(f) for f in files[:3]],
                 "times": list(series.times), "sidecar": {}}],
        entities={"sub": "01", "acq": "mese"}, staging_dir=str(staging))
    outputs = node.run(cwd=str(tmp_path)).outputs
    assert stale.exists() and outputs.out_files == [outputs.out_qc]
    qc = pd.read_csv(outputs.out_qc, sep="\t", na_values="n/a", keep_default_na=False)
    assert list(qc["level"]) == list(ALL_LEVELS) and not qc["passed"].any()
    assert set(qc["reason"]) == {"registration process was killed by signal 11 (Segmentation "
                                 "fault) (a bug: please report it)"}
    published = commit_staged(outputs.out_files, staging, tmp_path / "out")
    assert [p.name for p in published] == ["sub-01_acq-mese_desc-registration_qc.tsv"]
