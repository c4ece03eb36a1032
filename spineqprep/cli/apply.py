"""``spineqprep-apply``: reapply a disc's transforms from a spineqprep run to another image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spineqprep import __version__
from spineqprep.errors import SpineqprepError, UsageError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="spineqprep-apply",
        description="Warp an image on a disc's native grid (mask, map, echo series) onto the "
        "level's atlas disc with the transforms a participant run wrote, as the run applied "
        "them (2D single slices included).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"spineqprep-apply {__version__}")
    p.add_argument("sidecar", type=Path,
                   help="the .json of any atlas-space map of that disc from the run "
                        "(..._space-SpineDisc<LEVEL>_<map>.json: it names the transforms)")
    p.add_argument("in_file", type=Path, help="the native image to warp (3D, or 4D: each volume)")
    p.add_argument("out_file", type=Path, help="the atlas-space NIfTI to write")
    p.add_argument("--atlas", type=Path, help="the atlas the run used (its --atlas), default "
                   "the packaged one")
    p.add_argument("--interpolation", default="linear", choices=("linear", "nearest", "bspline"),
                   help="nearest for label masks")
    return p


def main(argv: list[str] | None = None) -> int:
    """Warp and write; user errors end in one message and a non-zero exit code."""
    args = build_parser().parse_args(argv)
    from spineqprep.bids.derivatives import atomic_write_nifti
    from spineqprep.registration.reapply import reapply

    try:
        if args.out_file.resolve() == args.in_file.resolve():
            raise UsageError("the output would overwrite the input", path=args.out_file,
                             fix="write to another file")
        if not args.out_file.name.endswith((".nii", ".nii.gz")):
            raise UsageError("the output must be a NIfTI file", path=args.out_file,
                             fix="end its name in .nii.gz")
        atomic_write_nifti(reapply(args.sidecar, args.in_file, atlas_dir=args.atlas,
                                   interpolation=args.interpolation), args.out_file)
    except SpineqprepError as err:
        print(f"spineqprep-apply: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"spineqprep-apply: wrote {args.out_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
