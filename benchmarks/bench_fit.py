"""Speed and accuracy of the mono-exponential fitter against per-voxel fitters, same voxels.

Usage: python benchmarks/bench_fit.py [--voxels N] [--sample N] [--no-peers]

For each published protocol (T2-prep MAPSS, T1rho MAPSS, T1rho FSE, UTE T2*) it simulates
realistic relaxation-time distributions at SNR 50 (S0 / noise SD, Gaussian noise), stores them
as float32 like NIfTI data, and times in the same run:

- spineqprep.relaxometry.fit_monoexp with 2 workers (``n_threads=2``: forked processes; the
  headline) and 1 worker on all N voxels, best of 3, worker start-up included;
- scipy.optimize.curve_fit per voxel (Levenberg-Marquardt) on a subsample, best of 3,
  extrapolated;
- qmrpy (T2Mono, a port of qMRLab mono_t2: scipy least_squares per voxel);
- ukat (UK Renal Imaging Network, T2 '2p_exp': bounded curve_fit per voxel), run in its own
  venv (~/.cache/spineqprep-bench/ukat-venv, created on first use) in a subprocess.

Bias and SD of T against the truth are computed on the same subsample for every method, next
to the Cramer-Rao lower bound. The memory bandwidth of this machine is measured in the same run
(large numpy copy / add) and compared with the bytes the fitter must move (float32 signal in,
float64 maps and flags out). Timings are best-of-3 wall clock; other load on the machine
inflates them, so the load average is printed at the start and the end. The last table is the
headline: the 2-worker fitter's voxels/s over curve_fit's, per protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spineqprep.relaxometry import crlb_monoexp, fit_monoexp

SNR = 50.0
PROTOCOLS = {
    # name: (times in s, mean T s, SD T s, clip range s) -- discs: METHODS.md sections 1-2
    "T2 MAPSS (TE 0/12/25/51)": ([0, 12e-3, 25e-3, 51e-3], 0.090, 0.025, (0.03, 0.15)),
    "T1rho MAPSS (TSL 0/10/40/80)": ([0, 10e-3, 40e-3, 80e-3], 0.100, 0.030, (0.04, 0.20)),
    "T1rho FSE (TSL 0/40/80/120)": ([0, 40e-3, 80e-3, 120e-3], 0.100, 0.030, (0.04, 0.25)),
    "T2* UTE (TE 0.248..25.2)": (
        [0.248e-3, 5.2e-3, 10.2e-3, 15.2e-3, 20.2e-3, 25.2e-3],
        0.0189,
        0.0047,
        (0.0068, 0.032),
    ),
}
UKAT_VENV = Path.home() / ".cache" / "spineqprep-bench" / "ukat-venv"
# ukat imports its whole package (kidney segmentation, diffusion...); these make the T2 fit
# importable; ``segment`` (renalsegmentor: Keras) is stubbed, the T2 fit never uses it
UKAT_DEPS = ["dipy", "pathos", "scikit-image", "tabulate", "numba"]
UKAT_RUNNER = """
import json, sys, time, types
import numpy as np
sys.modules["segment"] = types.ModuleType("segment"); sys.modules["segment"].Tkv = None
from ukat.mapping.t2 import T2
out = {}
for name, (path, te_ms) in json.loads(sys.argv[1]).items():
    y = np.load(path).astype(np.float64)
    t0 = time.perf_counter()
    fit = T2(y[:, None, None, :], np.array(te_ms), np.eye(4), multithread=False)
    dt = time.perf_counter() - t0
    out[name] = {"seconds": dt, "t2_ms": fit.t2_map.ravel().tolist()}
print(json.dumps(out))
"""


def simulate(times, mean, sd, clip, n, rng):
    """float32 signals (n, n_times), true T (s) and S0: lognormal-ish T, S0 500-1500."""
    t = np.asarray(times)
    truth = np.clip(rng.normal(mean, sd, n), *clip)
    s0 = rng.uniform(500, 1500, n)
    sig = s0[:, None] * np.exp(-t / truth[:, None])
    sig += rng.normal(0.0, 1.0, sig.shape) * (s0[:, None] / SNR)
    return sig.astype(np.float32), truth, s0


def best_of(fn, repeat=3):
    best, out = np.inf, None
    for _ in range(repeat):
        out = None  # free the previous result outside the timed call
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def per_voxel_curve_fit(y, t):
    def model(tt, s0, tau):
        return s0 * np.exp(-tt / tau)

    out = np.full(len(y), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        for i, yi in enumerate(y.astype(np.float64)):
            with contextlib.suppress(RuntimeError):
                out[i] = curve_fit(model, t, yi, p0=(yi[0], 0.5 * t[-1]))[0][1]
    return out


def per_voxel_qmrpy(y, t):
    from qmrpy.models.t2.mono_t2 import T2Mono

    model = T2Mono(te_ms=np.asarray(t) * 1000)
    out = np.full(len(y), np.nan)
    for i, yi in enumerate(y.astype(np.float64)):
        out[i] = model.fit(yi)["t2_ms"] / 1000
    return out


def ukat_python() -> tuple[Path | None, str]:
    """The ukat venv's python, creating the venv on first use; or None and the reason."""
    py = UKAT_VENV / "bin" / "python"
    probe = [str(py), "-c", UKAT_RUNNER.split("out = {}")[0]]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py, ""
    try:
        print(f"# setting up ukat in {UKAT_VENV} (once) ...", flush=True)
        UKAT_VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(UKAT_VENV)], check=True
        )
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", "ukat"], check=True, timeout=600)
        subprocess.run([*pip, *UKAT_DEPS], check=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"ukat venv setup failed: {err}"
    res = subprocess.run(probe, capture_output=True, text=True)
    if res.returncode:
        return None, "ukat does not import: " + res.stderr.strip().splitlines()[-1]
    return py, ""


def run_ukat(samples: dict[str, tuple[np.ndarray, list[float]]]):
    py, why = ukat_python()
    if py is None:
        return None, why
    with tempfile.TemporaryDirectory() as tmp:
        job = {}
        for i, (name, (y, t)) in enumerate(samples.items()):
            path = Path(tmp) / f"{i}.npy"
            np.save(path, y)
            job[name] = (str(path), [v * 1000 for v in t])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        res = subprocess.run(
            [str(py), "-c", UKAT_RUNNER, json.dumps(job)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    if res.returncode:
        return None, "ukat run failed: " + res.stderr.strip().splitlines()[-1]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: (v["seconds"], np.array(v["t2_ms"]) / 1000) for k, v in out.items()}, ""


def memory_bandwidth() -> float:
    """Bytes/s of a large numpy copy and add (best of both): read + write traffic counted."""
    n = 32 * 1024 * 1024  # 256 MiB per float64 array
    a, b, c = np.ones(n), np.ones(n), np.empty(n)
    copy_s, _ = best_of(lambda: np.copyto(c, a))
    add_s, _ = best_of(lambda: np.add(a, b, out=c))
    return max(2 * 8 * n / copy_s, 3 * 8 * n / add_s)


def load() -> str:
    """The 1, 5 and 15 minute load averages (other jobs on a shared machine slow every row)."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def stats(est, truth):
    ok = np.isfinite(est)
    err = (est[ok] - truth[ok]) * 1000
    return err.mean(), err.std(), ok.mean()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=2_000_000, help="voxels per protocol")
    ap.add_argument("--sample", type=int, default=2000, help="voxels for per-voxel fitters")
    ap.add_argument("--no-peers", action="store_true", help="skip qmrpy and ukat")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    bandwidth = memory_bandwidth()
    print(f"# machine: {os.cpu_count()} CPUs, numpy {np.__version__}; load average {load()}")
    print(f"# memory bandwidth (numpy copy/add, same run): {bandwidth / 1e9:.1f} GB/s")
    print(f"# {args.voxels} voxels per protocol, SNR {SNR:g}; per-voxel fitters on {args.sample}")

    data, samples = {}, {}
    for name, (times, mean, sd, clip) in PROTOCOLS.items():
        y, truth, _ = simulate(times, mean, sd, clip, args.voxels, rng)
        data[name] = (y, truth, np.asarray(times))
        samples[name] = (y[: args.sample], times)
    ukat, ukat_why = (None, "--no-peers") if args.no_peers else run_ukat(samples)

    headline = []
    for name, (y, truth, t) in data.items():
        sub = slice(0, args.sample)
        out_bytes = y.shape[0] * (3 * 8 + 2 + 2 + 1)  # t, s0, r2 float64; flags; n_iter; reason
        fit_monoexp(y[:50_000], t)  # warm-up
        secs2, fit2 = best_of(lambda y=y, t=t: fit_monoexp(y, t, n_threads=2))
        secs1, fit = best_of(lambda y=y, t=t: fit_monoexp(y, t, n_threads=1))
        identical = all(
            np.array_equal(getattr(fit, k), getattr(fit2, k), equal_nan=True)
            for k in ("t", "s0", "r2")
        ) and np.array_equal(fit.reason, fit2.reason)
        cf_secs, cf = best_of(lambda y=y[sub], t=t: per_voxel_curve_fit(y, t))
        cf_rate = args.sample / cf_secs
        moved = y.nbytes + out_bytes
        bound = np.sqrt(np.mean(crlb_monoexp(t, truth[sub], SNR) ** 2)) * 1000
        b_all, s_all, v_all = stats(np.where(fit.valid, fit.t, np.nan), truth)
        rows = [
            (
                f"spineqprep, {fit2.summary['n_workers']} workers",
                y.shape[0] / secs2,
                np.where(fit2.valid, fit2.t, np.nan)[sub],
                moved / secs2,
            ),
            (
                "spineqprep, 1 worker",
                y.shape[0] / secs1,
                np.where(fit.valid, fit.t, np.nan)[sub],
                moved / secs1,
            ),
            ("scipy curve_fit per voxel", cf_rate, cf, None),
        ]
        if not args.no_peers:
            q_y = y[: args.sample // 4]
            q_secs, q = best_of(lambda y=q_y, t=t: per_voxel_qmrpy(y, t), repeat=1)
            rows.append(("qmrpy T2Mono per voxel", args.sample // 4 / q_secs, q, None))
        if ukat is not None:
            u_secs, u = ukat[name]
            rows.append(("ukat T2 2p_exp per voxel", args.sample / u_secs, u, None))
        print(f"\n## {name}  (CRLB SD of T on these voxels: {bound:.2f} ms)")
        print(
            f"{'method':28s} {'voxels/s':>12s} {'x curve_fit':>11s} {'bias ms':>8s} "
            f"{'SD ms':>7s} {'SD/CRLB':>7s} {'ok %':>6s} {'% of mem BW':>11s}"
        )
        for label, rate, est, bps in rows:
            n = len(est)
            bias, sd, ok = stats(est, truth[:n])
            bw = f"{100 * bps / bandwidth:10.1f}%" if bps else f"{'':11s}"
            print(
                f"{label:28s} {rate:12.4g} {rate / cf_rate:11.1f} {bias:8.3f} {sd:7.3f} "
                f"{sd / bound:7.2f} {100 * ok:6.1f} {bw}"
            )
        diff = np.nanmax(np.abs(rows[0][2] - cf)) * 1000
        print(
            f"all {y.shape[0]} voxels: bias {b_all:.3f} ms, SD {s_all:.3f} ms, "
            f"valid {100 * v_all:.2f} %, mean T {np.nanmean(fit.t[fit.valid]) * 1000:.2f} ms vs "
            f"true {truth.mean() * 1000:.2f} ms; max |T - curve_fit T| {diff:.2e} ms; "
            f"2-worker maps bit-identical to 1-worker: {identical}"
        )
        headline.append((name, rows[0][1], rows[1][1], cf_rate))

    print(f"\n## Headline: spineqprep with 2 workers vs per-voxel curve_fit (load {load()})")
    print(
        f"{'protocol':30s} {'2 workers':>10s} {'x curve_fit':>11s} {'1 worker':>10s} "
        f"{'x curve_fit':>11s} {'curve_fit us/voxel':>18s}"
    )
    for name, r2w, r1w, rcf in headline:
        print(
            f"{name:30s} {r2w / 1e6:8.2f} M {r2w / rcf:11.0f} {r1w / 1e6:8.2f} M "
            f"{r1w / rcf:11.0f} {1e6 / rcf:18.1f}"
        )
    if ukat is None:
        print(f"\n# ukat skipped: {ukat_why}")


if __name__ == "__main__":
    main()
