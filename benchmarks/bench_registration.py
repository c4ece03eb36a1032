"""Seconds per disc and accuracy of the disc registration backends, side by side.

Usage: python benchmarks/bench_registration.py [--repeats N]

Cases (the synthetic discs of tests/test_registration_engine.py: a known smooth deformation of
a superellipse disc on an oblique, anisotropic native grid): 3D (atlas 1 mm grid, disc
30 x 40 x 12 mm) and 2D (one 8 mm sagittal slice, 1 mm atlas grid). Backends: itk-elastix with
the packaged maps (final grid 4 mm, 100 iterations), itk-elastix with the published 2 mm grid
and 200 iterations, ANTsPy
(affine + SyN). Each backend is warmed up once (ITK / ANTs load excluded), then timed
``--repeats`` times (best wall clock, and the process CPU seconds of that run, all threads).
Columns: seconds per disc, ratio to ANTs, Dice with the atlas disc, det J mean / SD over the
atlas disc, folded fraction, Pearson r of the warped pattern with the true atlas-space pattern,
normalised histogram distance. Threads: 2 (ITK global default, ANTs
ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS). The load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from test_registration_engine import make_case  # noqa: E402

from spineqprep.registration import apply_transform, histogram_distance, register_disc  # noqa: E402
from spineqprep.registration.params import (  # noqa: E402
    default_parameter_files,
    published_parameter_files,
)

SETTINGS = {
    "elastix (4 mm, 100 it)": ("elastix", None),
    "elastix (published 2 mm, 200 it)": ("elastix", "published"),
    "ANTsPy (affine+SyN)": ("ants", None),
}


def run(case: dict, backend: str, maps, out: Path) -> dict:
    """One registration + warp of the pattern; its timing and accuracy."""
    wall, cpu = time.perf_counter(), time.process_time()
    transform, quality = register_disc(case["mask"], case["atlas"], out, backend=backend,
                                       parameter_maps=maps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    warped = apply_transform(transform, case["map"], case["atlas"]).get_fdata()
    inside = np.isfinite(case["truth"])
    native = case["map"].get_fdata()[case["mask"].get_fdata() > 0]
    return {
        "s": wall, "cpu": cpu, "dice": quality.dice, "jm": quality.jacobian_mean,
        "jsd": quality.jacobian_sd, "fold": quality.folded_fraction,
        "r": float(np.corrcoef(warped[inside], case["truth"][inside])[0, 1]),
        "hist": histogram_distance(native, warped[case["atlas"].get_fdata() > 0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    cases = {"3D": make_case(False), "2D": make_case(True)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (backend, maps_key) in SETTINGS.items():
            maps = published_parameter_files() if maps_key else None
            run(cases["2D"], backend, maps, Path(tmp) / "warm")  # load ITK / ANTs
            for dim, case in cases.items():
                runs = [run(case, backend, maps, Path(tmp) / f"{name}{dim}{i}")
                        for i in range(args.repeats)]
                rows.append((dim, name, min(runs, key=lambda r: r["s"])))
    ants_s = {dim: r["s"] for dim, name, r in rows if name.startswith("ANTs")}
    print("\n| case | backend | s / disc | CPU s | x ANTs | Dice | det J mean | det J SD | "
          "folded | pattern r | hist. dist. |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dim, name, r in sorted(rows, key=lambda row: row[0], reverse=True):
        print(f"| {dim} | {name} | {r['s']:.2f} | {r['cpu']:.2f} | {r['s'] / ants_s[dim]:.2f} | "
              f"{r['dice']:.3f} | {r['jm']:.3f} | {r['jsd']:.3f} | {r['fold']:.4f} | "
              f"{r['r']:.3f} | {r['hist']:.4f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    print(f"packaged maps: {', '.join(p.name for p in default_parameter_files())}")


if __name__ == "__main__":
    main()
