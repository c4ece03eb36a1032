"""``spineqprep-evaluate``: per-level segmentation metrics of a predicted vs a reference
derivatives dataset."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spineqprep import __version__
from spineqprep.errors import SpineqprepError

#: Metrics printed in the per-level summary on stdout (all are in the table).
_SHOWN = ("dice", "dice_2d", "msd_mm", "hd95_mm", "volume_diff_pct", "sensitivity", "precision")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="spineqprep-evaluate",
        description="Compare the label images of a predicted derivatives dataset with those of a "
        "reference dataset (manual labels, synthetic ground truth) file by file, paired by their "
        "BIDS entities (else by the same entities but desc, e.g. desc-endplates against the "
        "truth's desc-tissues), levels matched by name through each image's dseg.tsv, and write "
        "one row per image and level (also levels only one side has) with Dice (3D, per slice, "
        "central 50 %%), surface distances (mm), percent volume difference, sensitivity, "
        "specificity, precision and, from the prediction's _probseg maps (per level, or the "
        "disc/VB/sacrum class maps), ROC-AUC and PR-AUC. See docs/metrics.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("pred_dir", type=Path, help="the predicted derivatives dataset (root)")
    p.add_argument("ref_dir", type=Path, help="the reference derivatives dataset (root)")
    p.add_argument("out_tsv", type=Path, help="the per-image, per-level table to write")
    p.add_argument("--suffix", default="dseg",
                   help="suffix of the label images to compare (label images only: dseg)")
    p.add_argument("--labels", nargs="+", metavar="LEVEL",
                   help="levels to evaluate (dseg.tsv abbreviations, e.g. L1L2 L2L3); default: "
                   "the levels of either table present in either image, see docs/metrics.md")
    p.add_argument("--slice-axis", type=int, choices=(0, 1, 2), metavar="{0,1,2}",
                   help="array axis of the 2D slices for the per-slice Dice (default: the "
                   "sagittal axis of each reference image)")
    p.add_argument("--summary-tsv", type=Path, metavar="PATH",
                   help="also write the per-level mean and SD across subjects here")
    p.add_argument("--version", action="version", version=f"spineqprep-evaluate {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluate, write the table(s), print the per-level means; user errors end in one message
    and a non-zero exit code, without a traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="spineqprep-evaluate: %(message)s")
    from spineqprep.metrics.evaluate import evaluate_datasets, summarise_levels, write_table

    try:
        table = evaluate_datasets(args.pred_dir, args.ref_dir, suffix=args.suffix,
                                  labels=args.labels, slice_axis=args.slice_axis,
                                  out_tsv=args.out_tsv)
        summary = summarise_levels(table)
        if args.summary_tsv is not None:
            write_table(summary, args.summary_tsv)
    except SpineqprepError as err:
        print(f"spineqprep-evaluate: error: {err}", file=sys.stderr)
        return err.exit_code
    keys = list(summary.columns[:list(summary.columns).index("n")])
    shown = summary[[*keys, "n", *(f"{m}_mean" for m in _SHOWN)]]
    print(shown.to_string(index=False, na_rep="n/a", float_format=lambda v: f"{v:.3f}"))
    print(f"spineqprep-evaluate: {len(table)} rows from {table['ref_file'].nunique()} image "
          f"pair(s) written to {args.out_tsv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
