"""``spineqprep-atlas``: build a level-specific disc atlas (synthetic, or from a study)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spineqprep import __version__
from spineqprep.errors import SpineqprepError
from spineqprep.registration.atlas import (
    LEVELS,
    SHIPPED_DISCS_PER_LEVEL,
    SHIPPED_SEED,
    TEMPLATE_ITERATIONS,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="spineqprep-atlas",
        description="Build a level-specific lumbar disc atlas (one template disc per level, "
        "space SpineDisc<LEVEL>) by ANTsPy group-wise template construction over healthy "
        "discs; use it with `spineqprep ... --atlas OUT_DIR`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"spineqprep-atlas {__version__}")
    sub = p.add_subparsers(dest="source", required=True)
    s = sub.add_parser("synthetic", help="from healthy synthetic discs (how the packaged atlas "
                       "was made)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("out_dir", type=Path, help="the atlas folder to write")
    s.add_argument("--discs-per-level", type=int, default=SHIPPED_DISCS_PER_LEVEL, metavar="N")
    s.add_argument("--seed", type=int, default=SHIPPED_SEED, help="synthetic cohort seed")
    s.add_argument("--iterations", type=int, default=TEMPLATE_ITERATIONS,
                   help="template construction iterations")
    st = sub.add_parser("study", help="from a dataset's own healthy discs",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    st.add_argument("derivatives", type=Path,
                    help="a derivatives folder holding the discs' _dseg images (e.g. spineqprep's "
                         "output)")
    st.add_argument("grades", type=Path,
                    help="disc grade table (participant_id, [session_id,] level, grade), e.g. "
                         "the raw dataset's phenotype/disc_grades.tsv")
    st.add_argument("out_dir", type=Path, help="the atlas folder to write")
    st.add_argument("--column", default="pfirrmann", help="grade column of the table")
    st.add_argument("--max-grade", type=float, default=2.0,
                    help="discs with a grade up to this count as healthy")
    st.add_argument("--acq", help="only segmentations of this acquisition label")
    st.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS),
                    help="levels to build; with an atlas of some levels, the discs of the "
                    "others are not registered (QC reason 'no atlas level')")
    st.add_argument("--seed", type=int, default=0, help="registration seed")
    st.add_argument("--iterations", type=int, default=TEMPLATE_ITERATIONS,
                    help="template construction iterations")
    return p


def main(argv: list[str] | None = None) -> int:
    """Build the atlas; user errors end in one message and a non-zero exit code."""
    args = build_parser().parse_args(argv)
    from spineqprep.registration import atlas

    try:
        if args.source == "synthetic":
            out = atlas.build_synthetic_atlas(
                args.out_dir, n_per_level=args.discs_per_level, seed=args.seed,
                iterations=args.iterations,
                progress=lambda line: print(line, file=sys.stderr, flush=True))
        else:
            out = atlas.build_study_atlas(
                args.derivatives, args.grades, args.out_dir, max_grade=args.max_grade,
                column=args.column, acq=args.acq, iterations=args.iterations, seed=args.seed,
                levels=args.levels)
    except SpineqprepError as err:
        print(f"spineqprep-atlas: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"spineqprep-atlas: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
