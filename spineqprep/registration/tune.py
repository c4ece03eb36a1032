"""``spineqprep-tune``: choose the elastix disc-registration parameters by Bayesian optimisation.

As published (METHODS.md section 1): minimise L = (1/N) sum_i (1 - Dice_i + SD(det J)_i) over
N (disc mask, atlas disc mask) pairs with a tree-structured Parzen estimator (optuna), over the
B-spline stage's rigidity weight, final grid spacing (mm) and iterations, then write the chosen
parameter maps (pass them back with ``--registration-params``). A disc that fails to register
scores 2 (Dice 0, SD 1). The pairs come from a table, or from a derivatives dataset: every disc
of every segmentation in it (spineqprep's output or manual masks), against its level's atlas
disc (``pairs_from_derivatives``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from spineqprep import __version__
from spineqprep.errors import InputError, SpineqprepError, UsageError
from spineqprep.registration.params import (
    DEFAULT_FILES,
    elastix_parameter_files,
    set_parameters,
)

GRID_SPACINGS_MM = (2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class TuneResult:
    """The chosen values, their loss, and the written parameter files."""

    values: dict
    loss: float
    files: tuple[Path, ...]


def read_pairs(table: Path) -> list[tuple[Path, Path]]:
    """(moving mask, atlas mask) paths from a TSV with columns ``moving`` and ``atlas``.

    Relative paths are relative to the table's folder.
    """
    table = Path(table)
    if not table.is_file():
        raise UsageError("pairs table not found", path=table,
                         fix="write a TSV with columns 'moving' and 'atlas' (one disc a row)")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or not {"moving", "atlas"} <= set(rows[0]):
        raise InputError("the pairs table needs columns 'moving' and 'atlas' and one row a disc",
                         path=table, fix="add a header line 'moving<TAB>atlas'")
    pairs = []
    for row in rows:
        moving, atlas = (table.parent / row[key] for key in ("moving", "atlas"))
        for path in (moving, atlas):
            if not path.is_file():
                raise InputError(f"mask listed in the pairs table not found: {path}", path=table,
                                 fix="fix the path (relative paths start at the table's folder)")
        pairs.append((moving, atlas))
    return pairs


def pairs_from_derivatives(derivatives: Path, folder: Path, *, atlas_dir: Path | None = None,
                           acq: str | None = None, max_discs: int | None = None,
                           seed: int = 0) -> list[tuple[Path, Path]]:
    """Every disc of the segmentations under ``derivatives`` (3D and single-slice), paired with
    its level's atlas disc (the 3D disc, or its mid-sagittal slice): the masks and
    ``pairs.tsv`` are written to ``folder`` (the record of what was tuned on). ``max_discs``:
    a random subset of that many (seeded), since each trial registers every pair."""
    from spineqprep.registration.atlas import disc_masks, load_atlas
    from spineqprep.registration.disc import is_single_slice

    derivatives = Path(derivatives)
    if not derivatives.is_dir():
        raise UsageError("the derivatives folder does not exist", path=derivatives,
                         fix="pass a folder of _dseg segmentations (e.g. spineqprep's output)")
    discs = disc_masks(derivatives, acq=acq, single_slices=True)
    atlas = load_atlas(atlas_dir)
    discs = [d for d in discs if d[1] in atlas.files]
    if not discs:
        raise InputError("no disc of an atlas level in any segmentation here", path=derivatives,
                         fix="pass a derivatives folder with sub-*_dseg.nii.gz disc labels"
                             + (f" of acq-{acq}" if acq else ""))
    if max_discs is not None and max_discs < len(discs):
        keep = np.random.default_rng(seed).choice(len(discs), max_discs, replace=False)
        discs = [discs[i] for i in sorted(keep)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["moving\tatlas"]
    for entities, level, mask in discs:
        single = is_single_slice(mask)
        atlas_name = f"atlas_{level}{'_2d' if single else ''}.nii.gz"
        if not (folder / atlas_name).exists():
            nib.save(atlas.mask_like(level, single), folder / atlas_name)
        name = "_".join(f"{k}-{v}" for k, v in entities.items()) + f"_{level}_mask.nii.gz"
        nib.save(mask, folder / name)
        rows.append(f"{name}\t{atlas_name}")
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n")
    return read_pairs(folder / "pairs.tsv")


def loss(pairs: Sequence[tuple[nib.Nifti1Image, nib.Nifti1Image]], parameter_maps: Sequence[Path],
         work_dir: Path) -> float:
    """L = mean over pairs of (1 - Dice + SD(det J)); a failed registration counts 2."""
    from spineqprep.registration.disc import register_disc

    terms = []
    for index, (moving, atlas) in enumerate(pairs):
        _, quality = register_disc(moving, atlas, Path(work_dir) / f"pair{index}",
                                   parameter_maps=parameter_maps, min_dice=0.0)
        sd = quality.jacobian_sd if np.isfinite(quality.jacobian_sd) else 1.0
        terms.append(1.0 - quality.dice + sd)
    return float(np.mean(terms))


def tune(
    pairs: Sequence[tuple[Path, Path]],
    out_dir: Path,
    *,
    trials: int = 30,
    seed: int = 0,
    base_maps: Sequence[Path] | None = None,
) -> TuneResult:
    """Run the optimisation and write the two chosen parameter files plus tuning.json."""
    import optuna

    if trials < 1:
        raise UsageError(f"--trials must be at least 1, got {trials}")
    affine_file, bspline_file = _two_maps(base_maps)
    images = [(nib.load(m), nib.load(a)) for m, a in pairs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine_text = set_parameters(affine_file.read_text(), {"RandomSeed": seed})
    bspline_base = set_parameters(bspline_file.read_text(), {"RandomSeed": seed})

    def objective(trial: optuna.Trial) -> float:
        values = _trial_values(trial)
        with tempfile.TemporaryDirectory() as tmp:
            files = _write(Path(tmp), affine_text, set_parameters(bspline_base, values))
            return loss(images, files, Path(tmp))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    best = _trial_values(study.best_trial)
    header = (
        f"spineqprep-tune {__version__}: the B-spline stage of {bspline_file} with rigidity "
        f"weight Metric1Weight {best['Metric1Weight']:.4g}, final grid spacing "
        f"{best['FinalGridSpacingInPhysicalUnits']:g} mm and "
        f"{best['MaximumNumberOfIterations']} iterations, chosen by TPE (optuna, seed {seed}, "
        f"{trials} trials) minimising mean(1 - Dice + SD(det J)) over {len(pairs)} disc / "
        f"atlas mask pairs: L = {study.best_value:.4f}. Every trial and pair: tuning.json "
        "beside this file.")
    files = _write(out_dir, affine_text,
                   _with_header(set_parameters(bspline_base, best), header))
    record = {
        "loss": "mean(1 - Dice + SD(detJ))",
        "best": {"values": best, "loss": study.best_value},
        "trials": [{"values": _trial_values(t), "loss": t.value} for t in study.trials],
        "pairs": [[str(m), str(a)] for m, a in pairs],
        "seed": seed,
        "spineqprep": __version__,
    }
    (out_dir / "tuning.json").write_text(json.dumps(record, indent=2) + "\n")
    return TuneResult(best, float(study.best_value), files)


def _trial_values(trial) -> dict:
    """The B-spline parameters a trial sets (the search space)."""
    return {
        "Metric1Weight": trial.suggest_float("Metric1Weight", 0.05, 5.0, log=True),
        "FinalGridSpacingInPhysicalUnits": trial.suggest_categorical(
            "FinalGridSpacingInPhysicalUnits", GRID_SPACINGS_MM),
        "MaximumNumberOfIterations": trial.suggest_int("MaximumNumberOfIterations", 50, 300,
                                                       step=50),
    }


def _with_header(text: str, header: str) -> str:
    """Parameter-file text whose leading comment block (which describes the values it started
    from) is replaced by ``header``, wrapped into comment lines."""
    lines = text.splitlines(keepends=True)
    start = next((k for k, line in enumerate(lines) if not line.lstrip().startswith("//")),
                 len(lines))
    return ("".join(f"// {line}\n" for line in textwrap.wrap(header, 94, break_on_hyphens=False))
            + "".join(lines[start:]))


def _two_maps(base_maps: Sequence[Path] | None) -> tuple[Path, Path]:
    files = elastix_parameter_files(base_maps)
    if len(files) != 2:
        raise UsageError(f"tuning needs two base parameter files (affine, B-spline), got "
                         f"{len(files)}", fix="pass the affine file then the B-spline file")
    return files[0], files[1]


def _write(folder: Path, affine_text: str, bspline_text: str) -> tuple[Path, ...]:
    paths = tuple(folder / name for name in DEFAULT_FILES)
    paths[0].write_text(affine_text)
    paths[1].write_text(bspline_text)
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``spineqprep-tune``."""
    p = argparse.ArgumentParser(
        prog="spineqprep-tune",
        description="Tune the elastix disc registration (rigidity weight, final grid spacing, "
        "iterations) by Bayesian optimisation of mean(1 - Dice + SD(det J)) over disc / atlas "
        "mask pairs, and write the chosen parameter files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("pairs", type=Path, help="a TSV with columns 'moving' (a disc mask, NIfTI) "
                   "and 'atlas' (that level's atlas disc mask; paths relative to the TSV), or "
                   "a derivatives folder: every disc of its sub-*_dseg segmentations against "
                   "its level's atlas disc (the pairs are written to OUT_DIR/pairs)")
    p.add_argument("out_dir", type=Path, help="where elastix_affine.txt, elastix_bspline.txt "
                   "and tuning.json go")
    p.add_argument("--trials", type=int, default=30, help="optimisation trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of elastix")
    p.add_argument("--base-params", type=Path, nargs=2, metavar=("AFFINE", "BSPLINE"),
                   help="parameter files to start from (default: the packaged ones)")
    p.add_argument("--atlas", type=Path, help="with a derivatives folder: the atlas (default "
                   "the packaged one)")
    p.add_argument("--acq", help="with a derivatives folder: only segmentations of this acq")
    p.add_argument("--max-discs", type=int, metavar="N",
                   help="with a derivatives folder: a random subset of N discs (seeded)")
    p.add_argument("--version", action="version", version=f"spineqprep-tune {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Tune; print the chosen values; user errors end in one message without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        folder_only = [o for o, v in (("--atlas", args.atlas), ("--acq", args.acq),
                                       ("--max-discs", args.max_discs)) if v is not None]
        if folder_only and not args.pairs.is_dir():
            raise UsageError(f"{', '.join(folder_only)} apply to a derivatives folder, not a "
                             "pairs table", path=args.pairs,
                             fix="drop them, or pass the derivatives folder")
        if args.max_discs is not None and args.max_discs < 1:
            raise UsageError(f"--max-discs must be at least 1, got {args.max_discs}")
        pairs = (pairs_from_derivatives(args.pairs, args.out_dir / "pairs", atlas_dir=args.atlas,
                                        acq=args.acq, max_discs=args.max_discs, seed=args.seed)
                 if args.pairs.is_dir() else read_pairs(args.pairs))
        result = tune(pairs, args.out_dir, trials=args.trials, seed=args.seed,
                      base_maps=args.base_params)
    except SpineqprepError as err:
        print(f"spineqprep-tune: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"spineqprep-tune: L = {result.loss:.4f} with {json.dumps(result.values)}; wrote "
          f"{', '.join(str(f) for f in result.files)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
