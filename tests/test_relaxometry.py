"""Mono-exponential relaxometry: exactness against per-voxel curve_fit, validity, I/O checks."""

from __future__ import annotations

import gzip
import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.optimize import OptimizeWarning, curve_fit

from spineqprep.errors import InputError, SpineqprepError, UsageError
from spineqprep.relaxometry import REASONS, crlb_monoexp, fit_images, fit_monoexp, monoexp
from spineqprep.relaxometry.regions import INCLUSION_RANGES, region_statistics

T2PREP = np.array([0.0, 12.0, 25.0, 51.0]) / 1000
UTE = np.array([0.248, 5.2, 10.2, 15.2, 20.2, 25.2]) / 1000
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _curve_fit(y: np.ndarray, t: np.ndarray, offset: bool = False) -> np.ndarray:
    """Per-voxel scipy reference (Levenberg-Marquardt, unbounded), T in seconds."""
    out = np.full(len(y), np.nan)
    for i, yi in enumerate(y):
        p0 = [yi[0], 0.5 * (t[-1] - t[0])] + ([0.0] if offset else [])

        def model(tt, s0, tau, *c):
            return s0 * np.exp(-tt / tau) + (c[0] if c else 0.0)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(model, t, yi, p0=p0, maxfev=10000)
        except RuntimeError:
            continue
        out[i] = p[1]
    return out


def _synth(n: int, t: np.ndarray, tmean: float, tsd: float, snr: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = np.clip(rng.normal(tmean, tsd, n), 0.3 * tmean, 3 * tmean)
    s0 = 1000.0
    y = s0 * np.exp(-t / truth[:, None]) + rng.normal(0, s0 / snr, (n, t.size))
    return y, truth


@pytest.mark.parametrize(("t", "tmean", "tsd"), [(T2PREP, 0.09, 0.025), (UTE, 0.019, 0.0047)])
def test_same_optimum_as_curve_fit(t, tmean, tsd):
    y, truth = _synth(300, t, tmean, tsd, snr=50)
    fit = fit_monoexp(y, t)
    ref = _curve_fit(y, t)
    both = fit.valid & np.isfinite(ref)
    assert both.mean() > 0.97
    assert np.max(np.abs(fit.t[both] - ref[both])) < 1e-4  # < 0.1 ms, voxel by voxel
    err, err_ref = fit.t[both] - truth[both], ref[both] - truth[both]
    assert abs(err.mean() - err_ref.mean()) < 1e-4
    assert abs(err.std() - err_ref.std()) < 1e-4
    # the fitter's spread is that of the least-squares estimator: near the Cramer-Rao bound
    bound = np.sqrt(np.mean(crlb_monoexp(t, truth[both], 50) ** 2))
    assert 0.8 * bound < err.std() < 1.5 * bound


@pytest.mark.parametrize(
    ("t", "tmean", "tsd"),
    [
        (T2PREP, 0.09, 0.025),
        (np.array([0.0, 10, 40, 80]) / 1000, 0.10, 0.03),
        (np.array([0.0, 40, 80, 120]) / 1000, 0.10, 0.03),
        (UTE, 0.0189, 0.0047),
    ],
)
def test_region_mean_within_one_percent(t, tmean, tsd):
    y, truth = _synth(40_000, t, tmean, tsd, snr=50, seed=11)
    fit = fit_monoexp(y, t)
    assert fit.summary["fraction_valid"] > 0.999
    assert np.mean(fit.t[fit.valid]) == pytest.approx(truth[fit.valid].mean(), rel=0.01)


def test_noiseless_recovery_and_s0_r2():
    truth = np.linspace(0.02, 0.2, 50)
    y = 700.0 * np.exp(-T2PREP / truth[:, None])
    fit = fit_monoexp(y.astype(np.float32), T2PREP, tol=1e-10)
    np.testing.assert_allclose(fit.t, truth, rtol=1e-5)
    np.testing.assert_allclose(fit.s0, 700.0, rtol=1e-5)
    assert fit.valid.all() and fit.converged.all()
    assert np.all(fit.r2 > 0.999999)
    assert fit.summary["fraction_valid"] == 1.0


def test_offset_model_matches_curve_fit():
    t = np.array([0.0, 10, 20, 40, 60, 80, 120, 160]) / 1000
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.03, 0.08, 200)
    y = 900 * np.exp(-t / truth[:, None]) + 80 + rng.normal(0, 3, (200, t.size))
    fit = fit_monoexp(y, t, model="offset", tol=1e-10)
    ref = _curve_fit(y, t, offset=True)
    both = fit.valid & np.isfinite(ref)
    assert both.mean() > 0.95
    assert np.max(np.abs(fit.t[both] - ref[both])) < 1e-4
    assert abs(np.nanmedian(fit.offset) - 80) < 5
    # without the offset term the same data give biased (longer) T
    plain = fit_monoexp(y, t)
    assert np.nanmedian(plain.t - truth) > 0.005
    assert np.nanmedian(fit.t - truth) == pytest.approx(0, abs=0.002)


def test_validity_reasons():
    good = 1000 * np.exp(-T2PREP / 0.08)
    rows = {
        "valid": good,
        "nonfinite_signal": np.where(np.arange(4) == 2, np.nan, good),
        "nonpositive_signal": -good,
        "flat_signal": np.full(4, 500.0),
        "no_decay": 1000 * np.exp(T2PREP / 0.08),  # growing signal: R < 0
        "t_out_of_range": 1000 * np.exp(-T2PREP / 30.0),  # T = 30 s
    }
    y = np.stack(list(rows.values()))
    fit = fit_monoexp(y, T2PREP, t_range=(0.001, 1.0))
    got = [REASONS[c] for c in fit.reason]
    assert got == list(rows)
    assert fit.valid.tolist() == [True] + [False] * 5
    # failed fits are non-finite; out-of-range ones keep the fitted value (not clipped)
    assert np.isnan(fit.t[1:5]).all()
    assert fit.t[5] == pytest.approx(30.0, rel=1e-3)
    assert fit.summary["reasons"] == {k: 1 for k in list(rows)[1:]}


def test_not_converged_is_flagged():
    y, _ = _synth(50, UTE, 0.019, 0.004, snr=50)
    fit = fit_monoexp(y, UTE, max_iter=1, tol=1e-14)
    assert not fit.converged.any()
    assert set(fit.reason.tolist()) == {REASONS.index("not_converged")}
    assert np.isnan(fit.t).all()


def test_chunks_and_shape_identical():
    y, _ = _synth(5000, UTE, 0.019, 0.005, snr=30, seed=7)
    y[17] = np.nan
    y[99] = 1.0
    ref = fit_monoexp(y, UTE)
    for kw in ({"chunk_size": 333}, {"chunk_size": 1000, "n_threads": 2}, {"chunk_size": 1}):
        fit = fit_monoexp(y, UTE, **kw)
        assert fit.summary["n_workers"] == 1  # 5 chunks: too few to fork workers for
        for key in ("reason", "n_iter", "converged", "valid"):
            np.testing.assert_array_equal(getattr(fit, key), getattr(ref, key), err_msg=key)
        # same iterations, same numbers: BLAS edge kernels may differ in the last bit only
        for key in ("t", "s0", "r2"):
            np.testing.assert_allclose(getattr(fit, key), getattr(ref, key), rtol=1e-13)
    vol = fit_monoexp(y.reshape(10, 25, 20, 6), UTE, chunk_size=777)
    np.testing.assert_allclose(vol.t.ravel(), ref.t, rtol=1e-13)
    assert vol.t.shape == (10, 25, 20)


MAPS = ("t", "s0", "offset", "r2", "valid", "converged", "n_iter", "reason")


def _workers_case(model: str = "monoexp", masked: bool = False):
    """40+ chunks of 256 voxels (enough for 2 workers) with a few failing voxels."""
    y, _ = _synth(12_000, UTE, 0.019, 0.005, snr=30, seed=5)
    y[17] = np.nan
    y[4321] = -y[4321]
    mask = (np.arange(12_000) % 7 != 3).reshape(100, 120) if masked else None
    return y.reshape(100, 120, UTE.size), {"model": model, "mask": mask, "chunk_size": 256}


def _assert_same_maps(fit, ref):
    for key in MAPS:
        a, b = getattr(fit, key), getattr(ref, key)
        assert (a is None) == (b is None), key
        if a is not None:
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), key  # bit for bit


@pytest.mark.parametrize(("model", "masked"), [("monoexp", False), ("offset", True)])
def test_workers_bitwise_equal_to_serial(model, masked):
    y, kw = _workers_case(model, masked)
    ref = fit_monoexp(y, UTE, **kw)
    calls = []
    fit = fit_monoexp(y, UTE, n_threads=2, progress=lambda d, n: calls.append((d, n)), **kw)
    assert fit.summary["n_workers"] == 2 and ref.summary["n_workers"] == 1
    _assert_same_maps(fit, ref)
    assert fit.summary == {**ref.summary, "n_workers": 2}
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (ref.summary["n_voxels_fitted"],) * 2


def _fit_in_pool_worker() -> tuple:
    y, kw = _workers_case()
    fit = fit_monoexp(y, UTE, n_threads=2, **kw)
    return fit, len(multiprocessing.active_children())


def test_workers_inside_a_process_pool_worker():
    # Nipype MultiProc runs interfaces in ProcessPoolExecutor workers (non-daemonic)
    with ProcessPoolExecutor(1) as pool:
        fit, left = pool.submit(_fit_in_pool_worker).result()
    assert fit.summary["n_workers"] == 2 and left == 0
    y, kw = _workers_case()
    _assert_same_maps(fit, fit_monoexp(y, UTE, **kw))


def _fit_in_daemon(_: int) -> int:
    y, kw = _workers_case()
    return fit_monoexp(y, UTE, n_threads=2, **kw).summary["n_workers"]


def test_workers_fall_back_to_serial(monkeypatch, caplog):
    # a daemonic process (multiprocessing.Pool worker) may not have children
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_fit_in_daemon, [0]) == [1]
    y, kw = _workers_case()
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with caplog.at_level(logging.WARNING, logger="spineqprep.relaxometry.monoexp"):
        fit = fit_monoexp(y, UTE, n_threads=2, **kw)
    assert fit.summary["n_workers"] == 1 and "cannot fork" in caplog.text


def test_worker_errors_surface_and_leave_nothing(monkeypatch):
    y, kw = _workers_case()
    parent = os.getpid()
    fit_block = monoexp._fit_block

    def failing(block, opt, kern):
        if os.getpid() != parent:
            raise RuntimeError("boom in a worker")
        return fit_block(block, opt, kern)

    monkeypatch.setattr(monoexp, "_fit_block", failing)
    with pytest.raises(RuntimeError, match="boom in a worker"):
        fit_monoexp(y, UTE, n_threads=2, **kw)
    assert multiprocessing.active_children() == []

    class Local(Exception):  # defined in a function: does not pickle
        pass

    def unpicklable(block, opt, kern):
        raise Local("local boom")

    monkeypatch.setattr(monoexp, "_fit_block", unpicklable)
    with pytest.raises(RuntimeError, match="local boom"):
        fit_monoexp(y, UTE, n_threads=2, **kw)
    assert multiprocessing.active_children() == []

    def dying(block, opt, kern):  # a worker killed (e.g. out of memory)
        os._exit(9)

    monkeypatch.setattr(monoexp, "_fit_block", dying)
    with pytest.raises(SpineqprepError, match="worker process died"):
        fit_monoexp(y, UTE, n_threads=2, **kw)
    assert multiprocessing.active_children() == []


def test_fork_failure_is_a_clear_error(monkeypatch):
    y, kw = _workers_case()

    def no_fork(process):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "_Popen", staticmethod(no_fork))
    with pytest.raises(SpineqprepError, match="cannot start a fitting worker"):
        fit_monoexp(y, UTE, n_threads=2, **kw)


def test_mask_and_progress():
    y, _ = _synth(1000, T2PREP, 0.08, 0.02, snr=50)
    vol = y.reshape(10, 100, 4)
    mask = np.zeros((10, 100), bool)
    mask[2:5, 10:60] = True
    calls = []
    fit = fit_monoexp(vol, T2PREP, mask=mask, chunk_size=64, progress=lambda d, n: calls.append(d))
    assert np.isnan(fit.t[~mask]).all() and not fit.valid[~mask].any()
    assert (fit.reason[~mask] == REASONS.index("outside_mask")).all()
    full = fit_monoexp(vol, T2PREP)
    np.testing.assert_allclose(fit.t[mask], full.t[mask], rtol=1e-13)
    assert calls[-1] == mask.sum() and fit.summary["n_voxels_fitted"] == mask.sum()


def test_crlb_published_protocols():
    # a nucleus T2 of 100 ms from echoes up to 51 ms: about 5 % at SNR 50 (issue text)
    rel = crlb_monoexp(T2PREP, 0.1, 50) / 0.1
    assert 0.04 < rel < 0.09
    # more / longer spin-lock times constrain T1rho better
    mapss = crlb_monoexp(np.array([0, 10, 40, 80]) / 1000, 0.1, 50)
    fse = crlb_monoexp(np.array([0, 40, 80, 120]) / 1000, 0.1, 50)
    assert fse < mapss < crlb_monoexp(T2PREP, 0.1, 50)


def test_api_errors():
    y = np.ones((3, 4))
    with pytest.raises(InputError, match="time points"):
        fit_monoexp(y, T2PREP[:3])
    with pytest.raises(InputError, match="non-negative"):
        fit_monoexp(y, [0, -0.01, 0.02, 0.03])
    with pytest.raises(InputError, match="distinct"):
        fit_monoexp(y, [0.01, 0.01, 0.01, 0.01])
    with pytest.raises(InputError, match="milliseconds"):
        fit_monoexp(y, [0, 12, 25, 51])
    with pytest.raises(InputError, match="mask shape"):
        fit_monoexp(y, T2PREP, mask=np.ones(4, bool))
    with pytest.raises(UsageError):
        fit_monoexp(y, T2PREP, model="biexp")
    with pytest.raises(UsageError):
        fit_monoexp(y, T2PREP, t_range=(1.0, 0.1))


def _echo_images(shape=(6, 5, 4), affine=None):
    y, truth = _synth(int(np.prod(shape)), T2PREP, 0.08, 0.02, snr=200)
    affine = np.diag([0.5, 0.5, 3.0, 1.0]) if affine is None else affine
    imgs = []
    for k in range(T2PREP.size):
        img = nib.Nifti1Image(y[:, k].reshape(shape).astype(np.float32), affine)
        imgs.append(img)
    return imgs, truth.reshape(shape)


def test_fit_images_roundtrip_and_scaling(tmp_path):
    imgs, truth = _echo_images()
    # store echo 2 as scaled int16: the reader must apply scl_slope / scl_inter
    data = np.asarray(imgs[1].dataobj)
    scaled = nib.Nifti1Image(np.round((data - 10) / 0.5).astype(np.int16), imgs[1].affine)
    scaled.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "echo-2.nii.gz"
    nib.save(scaled, path)
    imgs[1] = nib.load(path)
    maps = fit_images(imgs, T2PREP, names=[f"echo-{i}" for i in range(1, 5)])
    assert set(maps) == {"T", "S0", "Rsquared", "mask"}
    t = maps["T"].get_fdata()
    assert maps["T"].get_data_dtype() == np.float32
    np.testing.assert_allclose(maps["T"].affine, imgs[0].affine)
    assert np.nanmedian(np.abs(t - truth) / truth) < 0.03
    assert maps["mask"].get_fdata().all()
    offset = fit_images(imgs, T2PREP, model="offset")
    assert "offset" in offset


def test_fit_images_checks(tmp_path):
    imgs, _ = _echo_images()
    names = ["e1.nii.gz", "e2.nii.gz", "e3.nii.gz", "e4.nii.gz"]
    moved = nib.Nifti1Image(np.asarray(imgs[2].dataobj), np.diag([0.5, 0.5, 3.5, 1.0]))
    with pytest.raises(InputError, match=r"e3\.nii\.gz.*affine"):
        fit_images([*imgs[:2], moved, imgs[3]], T2PREP, names=names)
    small = nib.Nifti1Image(np.zeros((6, 5, 3), np.float32), imgs[0].affine)
    with pytest.raises(InputError, match=r"e4\.nii\.gz.*shape"):
        fit_images([*imgs[:3], small], T2PREP, names=names)
    with pytest.raises(InputError, match="distinct"):
        fit_images(imgs, [0.01] * 4, names=names)
    with pytest.raises(InputError, match="time points"):
        fit_images(imgs, T2PREP[:3], names=names)
    # truncated files: InputError naming the file, with the fix, whether the header or only
    # the data is cut (paths are loaded here; loaded images are read here)
    path = tmp_path / "trunc.nii.gz"
    nib.save(imgs[0], path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    with pytest.raises(InputError, match=r"(?s)trunc\.nii\.gz.*re-export/copy") as err:
        fit_images([nib.load(path), *imgs[1:]], T2PREP)
    assert err.value.path == str(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match=r"(?s)trunc\.nii\.gz.*re-export/copy"):
        fit_images([path, *imgs[1:]], T2PREP)
    with pytest.raises(InputError, match=r"missing\.nii\.gz"):
        fit_images([tmp_path / "missing.nii.gz", *imgs[1:]], T2PREP)


# ---------------------------------------------------------------- real signal (skipped if absent)
QMRLAB = DATA / "qmrlab-mese-megre" / "Data"
KNEE = DATA / "pykneer-knee-t1rho-dess" / "code" / "demo" / "original" / "01" / "cubeQuant"


@pytest.mark.realdata
@pytest.mark.skipif(not QMRLAB.is_dir(), reason="shared/data/qmrlab-mese-megre absent")
def test_real_mese_matches_curve_fit():
    from scipy.io import loadmat

    data = loadmat(QMRLAB / "MWF_demo" / "MET2data.mat")["MET2data"][:, :, 0, :]
    mask = loadmat(QMRLAB / "MWF_demo" / "Mask.mat")["Mask"] > 0
    te = np.arange(10, 330, 10) / 1000
    # stimulated-echo zig-zag: drop echo 1 (PROVENANCE.md), fit echoes 2..32
    sig, t = data[..., 1:], te[1:]
    fit = fit_monoexp(sig, t, mask=mask)
    assert fit.summary["fraction_valid"] > 0.95
    vox = np.flatnonzero(mask.ravel())[::10]
    ref = _curve_fit(sig.reshape(-1, t.size)[vox].astype(np.float64), t)
    got = fit.t.ravel()[vox]
    ok = np.isfinite(ref) & np.isfinite(got)
    assert ok.mean() > 0.95
    assert np.max(np.abs(got[ok] - ref[ok])) < 1e-4


@pytest.mark.realdata
@pytest.mark.skipif(not QMRLAB.is_dir(), reason="shared/data/qmrlab-mese-megre absent")
def test_real_megre_nifti_matches_curve_fit():
    img = nib.load(QMRLAB / "B0_DEM_demo" / "Magn.nii.gz")  # 4-D, 8 echoes, dTE 1.9 ms
    te = 0.0019 * np.arange(1, 9)  # TE1 unknown: T2* does not depend on it
    maps = fit_images([img], te, names=["Magn.nii.gz"], t_range=(1e-3, 1.0))
    t2s = maps["T"].get_fdata()[..., 0]
    sig = img.get_fdata()[:, :, 0, :]
    bright = sig[..., 0] > np.percentile(sig[..., 0], 80)
    vox = np.flatnonzero(bright.ravel())[::5]
    ref = _curve_fit(sig.reshape(-1, 8)[vox], te)
    got = t2s.ravel()[vox]
    ok = np.isfinite(ref) & np.isfinite(got) & (ref > 0) & (ref < 1.0)
    assert ok.sum() > 50
    assert np.max(np.abs(got[ok] - ref[ok])) < 1e-4
    # many specimen voxels do not decay over 15 ms: flagged, where curve_fit runs off to
    # T < 0 or T of kiloseconds
    nodecay = np.isnan(got) & (maps["mask"].get_fdata()[..., 0].ravel()[vox] == 0)
    assert nodecay.sum() > 10
    assert not np.any((ref[nodecay] > 0) & (ref[nodecay] < 10.0))


@pytest.mark.realdata
@pytest.mark.skipif(not KNEE.is_dir(), reason="shared/data/pykneer-knee-t1rho-dess absent")
def test_real_knee_t1rho_dicom_matches_curve_fit():
    pydicom = pytest.importorskip("pydicom")
    series, tsl = [], []
    for folder in sorted(KNEE.iterdir()):
        dss = sorted(
            (pydicom.dcmread(f) for f in folder.glob("*.dcm")),
            key=lambda d: float(d.SliceLocation),
        )
        series.append(np.stack([d.pixel_array.astype(np.float32) for d in dss], axis=-1))
        tsl.append(float(dss[0].EchoTime) / 1000)  # GE CubeQuant stores TSL as EchoTime
    sig = np.stack(series, axis=-1)[::4, ::4]  # subsample the 512^2 grid: fast test
    t = np.array(tsl)
    assert t.tolist() == [0.001, 0.01, 0.03, 0.06]
    bright = sig[..., 1] > np.percentile(sig[..., 1], 95)
    for first in (0, 1):  # with and without the odd-contrast first TSL (PROVENANCE.md)
        fit = fit_monoexp(sig[..., first:], t[first:], mask=bright)
        vox = np.flatnonzero(bright.ravel())[::3]
        ref = _curve_fit(sig[..., first:].reshape(-1, t.size - first)[vox], t[first:])
        got = fit.t.ravel()[vox]
        ok = np.isfinite(ref) & np.isfinite(got) & (ref > 0)
        assert ok.mean() > 0.8
        # T far beyond the sampled 60 ms leaves the cost flat: compare where T is measurable
        ok &= ref < 0.3
        assert np.max(np.abs(got[ok] - ref[ok])) < 1e-4


def test_region_statistics_keep_the_published_inclusion_range() -> None:
    """ROI means use the voxels the publications keep (T2 < 150 ms): a valid fit of 400 ms in
    a disc counts in n_valid but not in the mean; invalid fits count in neither."""
    affine = np.eye(4)
    t2 = np.full((4, 4, 1), 0.080)
    t2[0, 0, 0] = 0.400  # valid but outside the published range
    t2[1, 0, 0] = 0.050  # invalid fit
    valid = np.ones(t2.shape, np.uint8)
    valid[1, 0, 0] = 0
    labels = np.zeros(t2.shape, np.uint8)
    labels[:2] = 123
    table = region_statistics(nib.Nifti1Image(t2, affine), nib.Nifti1Image(valid, affine),
                              nib.Nifti1Image(labels, affine), {123: "L4L5"},
                              INCLUSION_RANGES["T2map"]).set_index("region")
    row = table.loc["L4L5"]
    assert (row["n_voxels"], row["n_valid"], row["n_included"]) == (8, 7, 6)
    assert row["mean"] == pytest.approx(0.080)
    everything = region_statistics(nib.Nifti1Image(t2, affine), nib.Nifti1Image(valid, affine),
                                   nib.Nifti1Image(labels, affine), {123: "L4L5"})
    assert everything.loc[0, "mean"] == pytest.approx((6 * 0.080 + 0.400) / 7)
