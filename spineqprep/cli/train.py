"""``spineqprep-train``: train or fine-tune a segmentation network and write a model bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spineqprep import __version__
from spineqprep.cli.parser import parse_cutoffs
from spineqprep.errors import SpineqprepError, UsageError
from spineqprep.segmentation import joint_contrast

NETWORKS = ("spine", "endplates")
#: BIDS suffixes of the images spineqprep segments: per-contrast cut-offs key on them.
CONTRASTS = ("T1w", "T2w", "MESE", "MESL")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="spineqprep-train",
        description="Train a segmentation network on domain-randomised synthetic anatomy: "
        "'spine' (background, vertebral body, sacrum, disc; 2D per sagittal slice) or "
        "'endplates' (the four L4-L5 / L5-S1 cartilage endplates on the first UTE echo, 64 x 64 "
        "mm crop around L5, 0.5 mm pixels); either also fine-tunes on your own manual labels "
        "(BIDS derivatives: *_dseg.nii.gz + dseg.tsv; endplates: "
        "*_desc-endplates_dseg.nii.gz on the UTE grid). Writes a bundle folder (weights.pt + "
        "model.json) that --seg-weights / --cep-weights accept.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("network", choices=NETWORKS, help="which network to train")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="bundle folder to write (created)")
    p.add_argument("--steps", type=int, default=1800, metavar="N", help="optimisation steps")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the sample stream, the weights and the synthetic cohort "
                   "(cohort seed 1000 + S)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="CPU threads")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="slices per step")
    p.add_argument("--bank-subjects", type=int, metavar="N",
                   help="synthetic subjects in the slice bank (default: 150 subjects x 12 "
                   "planes for spine, 120 x 10 for endplates)")
    p.add_argument("--init", type=Path, metavar="BUNDLE",
                   help="start from this bundle (folder or .pt with .json) instead of random "
                   "weights")
    p.add_argument("--labels-dir", type=Path, metavar="DERIV_DIR",
                   help="BIDS derivatives with manual *_dseg.nii.gz (+ dseg.tsv) to fine-tune "
                   "on (endplates: *_desc-endplates_dseg.nii.gz, paired with the first UTE "
                   "echo); images are found in the raw dataset (DatasetLinks 'raw' or the "
                   "dataset the derivatives folder sits in)")
    p.add_argument("--real-fraction", type=float, default=0.5, metavar="F",
                   help="(with --labels-dir) share of each batch from the labelled "
                   "slices; the rest stays synthetic so that other contrasts are not forgotten")
    p.add_argument("--realistic-fraction", type=float, default=0.3, metavar="F",
                   help="(spine) share of synthetic samples drawn in the generator's own "
                   "contrasts (T1w / T2w / PD / T2-prep at random TR / TE) rather than a random "
                   "contrast per tissue")
    p.add_argument("--lr", type=float, metavar="RATE",
                   help="learning rate (default 2e-3, 3e-4 with --init)")
    g = p.add_argument_group(
        "inference settings recorded in model.json (default: those of --init, else none; the "
        "--init bundle's validated_max_pixel_mm is never carried over: it was measured for its "
        "weights only)")
    g.add_argument("--cutoff", action="append", metavar="[CONTRAST:]STRUCTURE=P",
                   help="probability cut-off of one class (repeatable), e.g. disc=0.68, or for "
                   f"one contrast ({', '.join(CONTRASTS)}, or T1w+T2w segmented together; spine) "
                   "T2w:disc=0.35; endplates "
                   "default to the published 0.24 / 0.32 / 0.24 / 0.30")
    g.add_argument("--test-time-spacings", nargs="+", type=float, metavar="MM",
                   help="pixel sizes (mm) the network runs at, its probabilities averaged (e.g. "
                   "1.1 1.25 1.4); without any, the training pixel only")
    p.add_argument("--version", action="version", version=f"spineqprep-train {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (user errors: message only, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        for name in ("steps", "threads", "batch_size", "bank_subjects"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 < args.real_fraction <= 1.0:
            raise UsageError("--real-fraction must lie in (0, 1]")
        if not 0.0 <= args.realistic_fraction <= 1.0:
            raise UsageError("--realistic-fraction must lie in [0, 1]")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError("exists and is not a folder", path=args.out,
                             fix="choose a new folder for the bundle")
        cutoffs, by_contrast = _split_cutoffs(args.cutoff or [])
        if args.network == "endplates" and by_contrast:
            raise UsageError("per-contrast cut-offs apply to the spine network only",
                             fix="give endplate cut-offs as STRUCTURE=P")

        def log(msg: str) -> None:
            print(msg, flush=True)

        if args.network == "endplates":
            from spineqprep.segmentation.endplates import BANK, train_endplates

            train_endplates(args.out, args.steps, seed=args.seed, threads=args.threads,
                            init=args.init, labels_dir=args.labels_dir,
                            bank_size=(args.bank_subjects or BANK[0], BANK[1]),
                            batch_size=args.batch_size, lr=args.lr,
                            real_fraction=args.real_fraction, cutoffs=cutoffs,
                            test_time_spacings_mm=args.test_time_spacings, log=log)
        else:
            from spineqprep.segmentation.train import BANK, train_spine

            train_spine(args.out, args.steps, seed=args.seed, threads=args.threads,
                        init=args.init, labels_dir=args.labels_dir,
                        bank_size=(args.bank_subjects or BANK[0], BANK[1]),
                        batch_size=args.batch_size, lr=args.lr,
                        real_fraction=args.real_fraction,
                        realistic_fraction=args.realistic_fraction, cutoffs=cutoffs,
                        cutoffs_by_contrast=by_contrast,
                        test_time_spacings_mm=args.test_time_spacings, log=log)
    except SpineqprepError as err:
        print(f"spineqprep-train: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def _split_cutoffs(items: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``["disc=0.68", "T2w:disc=0.35"]`` -> ({disc: 0.68}, {T2w: {disc: 0.35}}), checked."""
    cutoffs: dict[str, float] = {}
    by_contrast: dict[str, dict[str, float]] = {}
    for item in items:
        contrast, _, cutoff = item.rpartition(":")
        parts = contrast.split("+") if contrast else []
        if not set(parts) <= set(CONTRASTS):
            raise UsageError(f"--cutoff {item}: unknown contrast {contrast!r}",
                             fix=f"use one of {', '.join(CONTRASTS)}, or several segmented "
                             "together joined by + (T1w+T2w)")
        contrast = joint_contrast(parts) if parts else ""
        (by_contrast.setdefault(contrast, {}) if contrast else cutoffs).update(
            parse_cutoffs([cutoff]))
    return cutoffs, by_contrast


if __name__ == "__main__":
    sys.exit(main())
