"""Spine segmentation: seconds per image and accuracy, on held-out synthetic subjects and on
real labelled data when ../shared/data/lumbar-fastcleverseg is present.

    python benchmarks/bench_segmentation.py [--bundle DIR] [--subjects 4] [--size small]
        [--seed 999] [--disc-cutoff P] [--no-real] [--shifted-protocols] [--pixel-scale F]
        [--t1w-pixel-scale F] [--table TSV]

Synthetic: ``generate_dataset(seed=999)`` (anatomy seeds never used in training), every T1w,
T2w and first mapping image segmented by ``segment_spine`` (network, components, levels), and
each T2w again together with the T1w on its grid (``T1w+T2w``, as the pipeline does), and
compared per level with the truth, and the disc-mean T2 / T1rho of the true maps over the
predicted vs the true discs (Bland-Altman; ``--seed 123 --disc-cutoff P`` is how the packaged
disc cut-off was chosen, on subjects other than the held-out ones; ``--shifted-protocols``:
every site's TR / TE, spin-lock times and SNR moved away from what training saw;
``--pixel-scale F``: every grid's in-plane pixels F times coarser, fields of view and slices
unchanged, which is how the bundle's ``validated_max_pixel_mm`` is measured between the sizes;
``--t1w-pixel-scale F``: each T2w also segmented with its T1w re-gridded to in-plane pixels F
times coarser on the same slices, rows ``T1w~+T2w``, the pipeline's path for a T1w prescribed
on the T2w's slices with its own matrix).
Real (inference only): lumbar-fastcleverseg volumes, class Dice within the span of the
labelled levels (each set labels only some), and Dice per level where a set names its levels
(IVD discs, VB3 bodies). Timings are wall clock of ``segment_spine`` with 2
threads, printed as seconds per image and per slice, with the published figure (0.39 s per
slice for all discs) as the reference ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from spineqprep.metrics import bland_altman, dice
from spineqprep.segmentation import external, segment_spine
from spineqprep.segmentation.infer import sagittal_axis
from spineqprep.segmentation.model_io import load_bundle
from spineqprep.synth import generate_dataset, protocols

LEVELS = {"L1L2": 120, "L2L3": 121, "L3L4": 122, "L4L5": 123, "L5S1": 124,
          "T12": 19, "L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24, "S1": 26}
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "lumbar-fastcleverseg"
PUBLISHED_S_PER_SLICE = 0.393


def shifted_protocols() -> tuple[protocols.SiteProtocol, ...]:
    """Every site's protocol moved away from what training saw: T1w TR 0.45 s / TE 14 ms and
    T2w TR 4.5 s / TE 110 ms (training and the sites: 0.6 / 10 and 3.5 / 95), the mapping
    series' echo / spin-lock times x 1.2, and every SNR x 0.6."""
    structurals = {"T1w": (0.45, 0.014), "T2w": (4.5, 0.110)}

    def series(s: protocols.Series) -> protocols.Series:
        return replace(s, times_s=tuple(1.2 * t for t in s.times_s), snr=0.6 * s.snr)

    return tuple(replace(
        site,
        structurals=tuple(replace(x, repetition_time=structurals[x.suffix][0],
                                  echo_time=structurals[x.suffix][1], snr=0.6 * x.snr)
                          for x in site.structurals),
        acquisitions=tuple(replace(a, series=tuple(series(x) for x in a.series))
                           for a in site.acquisitions))
        for site in protocols.PROTOCOLS)


def synthetic(bundle, subjects: int, size: str, seed: int = 999,
              cutoffs: dict[str, float] | None = None,
              t1w_pixel_scale: float | None = None) -> pd.DataFrame:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        res = generate_dataset(Path(tmp) / "bids", n_subjects=subjects,
                               n_sites=min(3, subjects), seed=seed, size=size)
        images = sorted([*res.raw_dir.rglob("*_T1w.nii.gz"), *res.raw_dir.rglob("*_T2w.nii.gz"),
                         *res.raw_dir.rglob("*_echo-1_MESE.nii.gz"),
                         *res.raw_dir.rglob("*_tsl-1_MESL.nii.gz")])
        # the pipeline segments a T2w together with the T1w on its slices: scored as
        # "T1w+T2w", and with that T1w re-gridded in-plane (--t1w-pixel-scale) as "T1w~+T2w"
        jobs = []
        for path in images:
            suffix = path.name.split("_")[-1][:-7]
            jobs.append((path, suffix, [], suffix))
            t1w = path.with_name(path.name.replace("_T2w", "_T1w"))
            if suffix == "T2w" and t1w.exists():
                jobs.append((path, suffix, [(nib.load(t1w), "T1w")], "T1w+T2w"))
                if t1w_pixel_scale:
                    jobs.append((path, suffix, [(regrid_inplane(nib.load(t1w), t1w_pixel_scale),
                                                 "T1w")], "T1w~+T2w"))
        for path, suffix, same_slices, contrast in jobs:
            img = nib.load(path)
            start = time.perf_counter()
            seg = segment_spine(img, bundle=bundle, n_threads=2, cutoffs=cutoffs,
                                contrast=suffix, same_slices=same_slices)
            seconds = time.perf_counter() - start
            stem = path.name.split("_acq-")[0] + "_acq-" + path.name.split("_acq-")[1].split("_")[0]
            truth = np.asarray(nib.load(res.truth_dir / path.parent.relative_to(res.raw_dir) /
                                        f"{stem}_dseg.nii.gz").dataobj)
            pred = np.asarray(seg.dseg_img.dataobj)
            right = levels_right(pred, truth)
            true_map = _true_map(res.truth_dir / path.parent.relative_to(res.raw_dir), stem,
                                 contrast)
            si_axis = [c in "SI" for c in nib.aff2axcodes(img.affine)].index(True)
            for level, index in LEVELS.items():
                if (truth == index).sum() > 20:
                    rows.append({"image": path.name, "contrast": contrast,
                                 "level": level, "dice": dice(pred == index, truth == index),
                                 "cut": cut_by_view(truth == index, si_axis),
                                 "confident": seg.confident, "right": right,
                                 "seconds": seconds,
                                 "slices": img.shape[0],
                                 **_disc_means(true_map, pred == index, truth == index)})
    return pd.DataFrame(rows)


def regrid_inplane(img: nib.Nifti1Image, factor: float) -> nib.Nifti1Image:
    """``img`` as if acquired on the same slices and field of view with in-plane pixels
    ``factor`` times larger (blurred by a Gaussian of FWHM ``factor`` pixels where coarser,
    sampled linearly at the new pixel centres): a T1w on its own in-plane grid."""
    data = np.asarray(img.dataobj, np.float32)
    sag = sagittal_axis(img.affine)
    inplane = [a for a in range(3) if a != sag]
    shape = list(data.shape)
    for a in inplane:
        shape[a] = round(data.shape[a] / factor)
    steps = np.array([data.shape[a] / shape[a] if a in inplane else 1.0 for a in range(3)])
    if factor > 1:
        sigma = [0.0 if a == sag else np.sqrt(factor ** 2 - 1) / 2.355 for a in range(3)]
        data = ndimage.gaussian_filter(data, sigma)
    grid = (np.indices(shape).reshape(3, -1) + 0.5) * steps[:, None] - 0.5
    out = ndimage.map_coordinates(data, grid, order=1, mode="nearest").reshape(shape)
    affine = img.affine @ np.vstack([np.hstack([np.diag(steps), (steps[:, None] - 1) / 2]),
                                     [0, 0, 0, 1]])
    return nib.Nifti1Image(out, affine)


def cut_by_view(mask: np.ndarray, axis: int) -> bool:
    """Whether a structure reaches the first or last plane of the image along ``axis`` (the
    superior-inferior one): the field of view cuts it, and what is left (a sliver of T12 at
    the top of a mapping grid) is not a level's segmentation to score."""
    ends = np.take(mask, [0, mask.shape[axis] - 1], axis=axis)
    return bool(ends.any())


def _true_map(folder: Path, stem: str, contrast: str) -> np.ndarray | None:
    """The true T2 (MESE) or T1rho (MESL) map (ms) of a mapping image's grid, else None."""
    suffix = {"MESE": "T2map", "MESL": "T1rho"}.get(contrast)
    return None if suffix is None else 1000 * np.asarray(
        nib.load(folder / f"{stem}_{suffix}.nii.gz").dataobj, np.float64)


def _disc_means(true_map: np.ndarray | None, pred: np.ndarray, truth: np.ndarray) -> dict:
    """Mean of the true map over the predicted and over the true structure (the ROI baseline
    of METHODS 1: a segmentation error shows as a biased region mean)."""
    if true_map is None or not pred.any():
        return {}
    return {"mean_pred_ms": float(true_map[pred].mean()),
            "mean_true_ms": float(true_map[truth].mean())}


def levels_right(pred: np.ndarray, truth: np.ndarray, min_voxels: int = 20) -> bool:
    """Whether every level-labelled structure of ``pred`` lies mostly on the true structure of
    the same label (and at least one was found): a shifted or generic labelling is wrong."""
    found = [index for index in LEVELS.values() if (pred == index).sum() > min_voxels]
    for index in found:
        under = truth[(pred == index) & (truth > 0)]
        if under.size == 0 or np.bincount(under).argmax() != index:
            return False
    return bool(found)


def real(bundle) -> pd.DataFrame:
    """Class Dice on the held-out cases of lumbar-fastcleverseg (``external.SETS``
    test_cases, never used in fine-tuning), within the superior-inferior span of the reference
    labels +- 5 mm (each set labels only some structures); vertebral body = body + sacrum."""
    rows = []
    for case, label_set, path in external.cases(REAL, "test"):
        image, truth = external.load_case(path)
        kind = "disc" if label_set.folder.startswith("IVD") else "VB"
        seg = segment_spine(nib.Nifti1Image(image, external.AFFINE), bundle=bundle, n_threads=2,
                            contrast=label_set.suffix)
        labels = np.asarray(seg.dseg_img.dataobj)
        pred = ((labels >= 100) & (labels < 1000)) | (labels >= 1100) if kind == "disc" \
            else ((labels > 0) & (labels < 100)) | ((labels >= 1000) & (labels < 1100))
        span = np.flatnonzero((truth > 0).any(axis=(1, 2)))
        lo, hi = max(span.min() - 5, 0), span.max() + 6
        rows.append({"set": label_set.prefix, "case": case, "class": kind, "level": None,
                     "dice": dice(pred[lo:hi], truth[lo:hi] > 0)})
        # sets whose labels name the level (IVD: L5S1 ... L1L2, VB3: L1 ... L5): per level,
        # which also checks the level labels
        rows += [{"set": label_set.prefix, "case": case, "class": kind, "level": abbr,
                  "dice": dice(labels == LEVELS[abbr], truth == index)}
                 for index, _, abbr in label_set.rows if abbr in LEVELS]
    return pd.DataFrame(rows)


def coarser_pixels(sites: tuple[protocols.SiteProtocol, ...], factor: float
                   ) -> tuple[protocols.SiteProtocol, ...]:
    """``sites`` with every grid's in-plane matrix divided by ``factor`` (pixels ``factor``
    times coarser over the same field of view; slices unchanged)."""

    def grid(g: protocols.Grid) -> protocols.Grid:
        return replace(g, matrix={size: (round(n_si / factor), round(n_ap / factor), n_lr)
                                  for size, (n_si, n_ap, n_lr) in g.matrix.items()})

    return tuple(replace(site, structural_grid=grid(site.structural_grid),
                         acquisitions=tuple(replace(a, grid=grid(a.grid))
                                            for a in site.acquisitions))
                 for site in sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle (default: packaged)")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--size", default="small", choices=["small", "medium", "bench"])
    parser.add_argument("--seed", type=int, default=999,
                        help="cohort seed: 999 held out; 123 for choosing cut-offs")
    parser.add_argument("--disc-cutoff", type=float, help="disc cut-off (default: the bundle's)")
    parser.add_argument("--no-real", action="store_true", help="skip the real data")
    parser.add_argument("--shifted-protocols", action="store_true",
                        help="TR / TE / spin-lock times and SNR unlike training's and the sites'")
    parser.add_argument("--pixel-scale", type=float, default=1.0, metavar="F",
                        help="in-plane pixels F times coarser than the size's (default 1)")
    parser.add_argument("--t1w-pixel-scale", type=float, metavar="F",
                        help="also score each T2w with its T1w re-gridded to in-plane pixels F "
                        "times coarser (rows T1w~+T2w: a T1w on the slices, not the grid)")
    parser.add_argument("--table", metavar="TSV", help="also write the per-image, per-level rows")
    args = parser.parse_args()
    if args.shifted_protocols:
        protocols.PROTOCOLS = shifted_protocols()
    if args.pixel_scale != 1.0:
        protocols.PROTOCOLS = coarser_pixels(protocols.PROTOCOLS, args.pixel_scale)
    bundle = load_bundle(args.bundle)
    cutoffs = None if args.disc_cutoff is None else {"disc": args.disc_cutoff}
    table = synthetic(bundle, args.subjects, args.size, args.seed, cutoffs,
                      args.t1w_pixel_scale)
    if args.table:
        table.to_csv(args.table, sep="\t", index=False)
    cut = table[table["cut"]]
    if len(cut):
        print(f"{len(cut)} structures cut by the field of view, not in the tables below: "
              + ", ".join(f"{r.level} {r.contrast} {r.dice:.2f}" for r in cut.itertuples()))
    table = table[~table["cut"]]
    print(f"## synthetic (seed {args.seed}): median Dice per level and contrast")
    print(table.pivot_table(index="level", columns="contrast", values="dice",
                            aggfunc="median").round(3).to_string())
    for name in ("mean", "min"):
        print(f"\n{name} Dice per level and contrast")
        print(table.pivot_table(index="level", columns="contrast", values="dice",
                                aggfunc=name).round(3).to_string())
    per_image = table.drop_duplicates(["image", "contrast"])
    print(f"\nlevels right in {per_image['right'].mean():.0%} of {len(per_image)} images; "
          f"confident (no flag) in {per_image['confident'].mean():.0%}; wrong but not flagged "
          f"in {(~per_image['right'] & per_image['confident']).mean():.0%}")
    print(per_image.groupby("contrast")[["right", "confident"]].mean().round(2).to_string())
    means = table[table["level"].str.len() == 4].dropna(subset=["mean_pred_ms"])
    if len(means):
        ba = bland_altman(means["mean_pred_ms"], means["mean_true_ms"])
        print(f"\ndisc mean T2 / T1rho (true map) over predicted vs true masks, {len(means)} discs "
              f"of the mapping series: Bland-Altman bias {ba['bias']:+.2f} ms, limits "
              f"{ba['loa_low']:+.2f} to {ba['loa_high']:+.2f} ms")
    s_per_slice = (per_image["seconds"] / per_image["slices"]).median()
    print(f"seconds per image {per_image['seconds'].median():.2f} (median), per sagittal slice "
          f"{s_per_slice:.3f}; published 0.393 s per slice for all discs: ratio "
          f"{PUBLISHED_S_PER_SLICE / s_per_slice:.1f}x faster")
    if args.no_real:
        return
    if REAL.is_dir():
        table = real(bundle)
        print("\n## real (lumbar-fastcleverseg, held-out cases): Dice per case")
        print(table[table["level"].isna()].groupby(["set", "class"])["dice"]
              .agg(["mean", "min", "count"]).round(3).to_string())
        print("\nper level (sets that name the levels)")
        print(table.dropna(subset=["level"]).groupby(["set", "level"])["dice"]
              .agg(["mean", "min", "count"]).round(3).to_string())
    else:
        print("\n(real data absent: ../shared/data/lumbar-fastcleverseg)")


if __name__ == "__main__":
    main()
