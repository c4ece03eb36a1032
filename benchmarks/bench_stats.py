"""Speed of spineqprep's permutation inference against nilearn, same data, in one run.

Usage: python benchmarks/bench_stats.py [--nilearn-perms N] [--nprocs N] [--quick]

1. max-T: 100 subjects x 50,000 voxels x 5,000 permutations (two covariates + intercept,
   Freedman-Lane) with ``spineqprep.stats.inference.freedman_lane`` against nilearn's
   ``permuted_ols`` (what ``non_parametric_inference`` runs), nilearn on ``--nilearn-perms``
   permutations and scaled linearly (its cost is linear in the permutations).
2. TFCE: 30 subjects x 20,000 voxels (40 x 25 x 20 grid) x 1,000 permutations, both with TFCE
   (E 0.5, H 2, 100 steps, 6-connectivity), nilearn again on fewer permutations, scaled.

Both use ``--nprocs`` cores (nilearn: ``n_jobs``; spineqprep: BLAS threads and, for TFCE, the
compiled kernel's threads). The two must give the same observed t (and TFCE) maps. Printed: wall
seconds (nilearn's scaled) and the ratio nilearn / spineqprep; with ``--nprocs 1`` also CPU
seconds, which a loaded machine distorts less. The load average is printed at the start and
the end.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import nibabel as nib
import numpy as np


def _data(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, ...]:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n_vox = int(np.prod(shape))
    z = rng.normal(size=(n, 2))
    x = z[:, 0] * 0.5 + rng.normal(size=n)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, *shape)), (0, 1, 1, 1))
    y = noise.reshape(n, n_vox) / noise.std() + z[:, [1]]
    y[:, : n_vox // 50] += 0.5 * x[:, None]
    return x, z, y.astype(np.float64)


def _nilearn(x: np.ndarray, z: np.ndarray, y: np.ndarray, n_perm: int, n_jobs: int,
             masker=None, tfce: bool = False) -> tuple[float, float, dict]:
    """(wall s, CPU s of this process, outputs) of nilearn's permuted_ols."""
    from nilearn.mass_univariate import permuted_ols

    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = permuted_ols(x[:, None], y, confounding_vars=z, model_intercept=True,
                           n_perm=n_perm, two_sided_test=True, random_state=0, n_jobs=n_jobs,
                           tfce=tfce, masker=masker, output_type="dict", verbose=0)
    return time.perf_counter() - start, time.process_time() - cpu, out


def _ours(x: np.ndarray, z: np.ndarray, y: np.ndarray, n_perm: int, n_procs: int,
          mask3d: np.ndarray | None = None, tfce: bool = False):
    """(wall s, CPU s, result) of spineqprep's Freedman-Lane inference."""
    from spineqprep.stats.inference import freedman_lane, make_transforms

    start, cpu = time.perf_counter(), time.process_time()
    transforms = make_transforms(len(x), n_perm, seed=0)
    out = freedman_lane(x, np.column_stack([np.ones(len(x)), z]), y, transforms,
                        mask3d=mask3d, tfce=tfce, n_procs=n_procs)
    return time.perf_counter() - start, time.process_time() - cpu, out


def _report(title: str, ours: tuple, ref: tuple, scale: float, n_procs: int) -> None:
    """Print wall (and, single-process, CPU) seconds, nilearn scaled, and the ratios."""
    print(f"{title}:")
    print(f"  wall: spineqprep {ours[0]:8.1f} s   nilearn {ref[0] * scale:8.1f} s (scaled from "
          f"{ref[0]:.1f} s)   ratio nilearn/spineqprep {ref[0] * scale / ours[0]:6.1f}")
    if n_procs == 1:  # with workers, nilearn's CPU time is spent in other processes
        print(f"  CPU:  spineqprep {ours[1]:8.1f} s   nilearn {ref[1] * scale:8.1f} s"
              f"   ratio nilearn/spineqprep {ref[1] * scale / ours[1]:6.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nilearn-perms", type=int, default=100,
                   help="permutations nilearn runs (its time is scaled to the full count)")
    p.add_argument("--nprocs", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--quick", action="store_true", help="a tenth of the permutations")
    args = p.parse_args()
    scale = 10 if args.quick else 1
    print(f"load average at start: {os.getloadavg()[0]:.2f}; cores: {args.nprocs}")

    # 1. max-T
    n_perm = 5000 // scale
    x, z, y = _data(100, (50, 40, 25), seed=1)
    ours = _ours(x, z, y, n_perm, args.nprocs)
    ref = _nilearn(x, z, y, args.nilearn_perms, args.nprocs)
    assert np.allclose(ours[2].t, ref[2]["t"][0], atol=1e-6), "observed t differs from nilearn"
    _report(f"max-T, 100 subjects x {y.shape[1]} voxels x {n_perm} permutations", ours, ref,
            n_perm / args.nilearn_perms, args.nprocs)

    # 2. TFCE
    from nilearn.maskers import NiftiMasker

    n_perm = 1000 // scale
    shape = (40, 25, 20)
    x, z, y = _data(30, shape, seed=2)
    mask3d = np.ones(shape, dtype=bool)
    masker = NiftiMasker(nib.Nifti1Image(mask3d.astype(np.uint8), np.eye(4))).fit()
    ours = _ours(x, z, y, n_perm, args.nprocs, mask3d=mask3d, tfce=True)
    nil_perms = max(args.nilearn_perms // 2, 10)
    ref = _nilearn(x, z, y, nil_perms, args.nprocs, masker=masker, tfce=True)
    assert np.allclose(ours[2].tfce, ref[2]["tfce"][0], rtol=1e-6, atol=1e-6), "TFCE differs"
    _report(f"TFCE, 30 subjects x {y.shape[1]} voxels x {n_perm} permutations", ours, ref,
            n_perm / nil_perms, args.nprocs)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
