"""``spineqprep-synth``: write a synthetic spine-extended BIDS dataset and its ground truth."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spineqprep import __version__
from spineqprep.errors import SpineqprepError
from spineqprep.synth.protocols import SIZES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="spineqprep-synth",
        description="Generate a synthetic multi-site lumbar spine dataset in spine-extended "
        "BIDS (sagittal T1w/T2w, MESE, MESL, MEGRE) and, in a separate derivatives dataset, "
        "its exact ground truth (T2, T1rho, T2* and PD maps, segmentations, disc grades, "
        "planted clinical associations).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", type=Path, help="the raw dataset to create (new, empty, or an "
                   "earlier spineqprep-synth output, which is replaced)")
    p.add_argument("--subjects", type=int, default=4, metavar="N", help="number of participants")
    p.add_argument("--sites", type=int, default=2, metavar="K",
                   help="number of sites (protocols cycle through 3 site types)")
    p.add_argument("--sessions", type=int, default=1, metavar="S",
                   help="sessions per participant (S > 1 adds change over time)")
    p.add_argument("--seed", type=int, default=0, metavar="X", help="random seed")
    p.add_argument("--size", choices=SIZES, default="small",
                   help="image sizes: small (tests), medium (demos), bench (benchmarks)")
    p.add_argument("--truth-dir", type=Path, metavar="DIR",
                   help="where the ground truth goes (default: OUT_DIR_truth next to OUT_DIR; "
                   "never inside OUT_DIR)")
    p.add_argument("--version", action="version", version=f"spineqprep-synth {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Generate; one progress line per participant on stderr; user errors end in one message
    and a non-zero exit code, without a traceback."""
    args = build_parser().parse_args(argv)
    from spineqprep.synth import generate_dataset

    try:
        result = generate_dataset(
            args.out_dir, n_subjects=args.subjects, n_sites=args.sites,
            n_sessions=args.sessions, seed=args.seed, size=args.size, truth_dir=args.truth_dir,
            progress=lambda line: print(line, file=sys.stderr, flush=True))
    except SpineqprepError as err:
        print(f"spineqprep-synth: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"spineqprep-synth: wrote {result.n_files} files to {result.raw_dir} and the ground "
          f"truth to {result.truth_dir} in {result.seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
