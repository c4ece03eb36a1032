"""The BIDS-App command line: ``spineqprep bids_dir output_dir {participant,group}``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spineqprep import __version__
from spineqprep.config import RunConfig, load_toml
from spineqprep.errors import UsageError

#: Settings that belong to one run and are never replayed from ``--config-file``.
_NOT_REPLAYED = {"run_uuid", "version", "bids_dir", "output_dir", "analysis_level"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="spineqprep",
        description="spineqprep: quantitative MRI of the lumbar spine, as a BIDS-App. "
        "Reads a spine-extended BIDS dataset and writes BIDS derivatives "
        "(T2, T1rho and T2* maps, reports).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the raw spine-extended BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, help="where the derivatives dataset is written")
    p.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    p.add_argument("--version", action="version", version=f"spineqprep {__version__}")
    p.add_argument("-v", "--verbose", dest="verbosity", action="count", default=None,
                   help="more log output (repeat for more)")

    g = p.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="participants to process (with or without 'sub-'); default all")
    g.add_argument("--session-label", nargs="+", metavar="LABEL",
                   help="sessions to process (with or without 'ses-'); default all")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help="JSON file of pybids queries per series suffix (MESE, MESL, MEGRE, T1w, "
                   "T2w), e.g. {\"MESL\": {\"acq\": \"mapss\"}}")
    g.add_argument("--skip-bids-validation", action="store_true", default=None,
                   help="skip the official BIDS validator and the spine-extension check")
    g.add_argument("-d", "--derivatives", nargs="+", type=Path, metavar="PATH",
                   help="derivatives datasets with precomputed outputs to reuse: maps, "
                   "segmentations (_dseg + dseg.tsv with index, name; any numbering) and "
                   "endplate masks (_desc-endplates_dseg)")

    g = p.add_argument_group("performance and execution")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="Nipype working directory; reusing it resumes an interrupted run "
                   "(default ./work)")
    g.add_argument("--nprocs", "--n-cpus", type=int, metavar="N",
                   help="maximum number of processes (default: all available CPUs)")
    g.add_argument("--omp-nthreads", type=int, metavar="N",
                   help="threads per process (fitting); default min(nprocs, 8)")
    g.add_argument("--mem-mb", "--mem_mb", type=int, metavar="MB",
                   help="upper bound of memory for the workflow scheduler")
    g.add_argument("--plugin", metavar="NAME",
                   help="Nipype execution plugin: MultiProc (default), Linear, SLURM, "
                   "SLURMGraph, SGE, PBS ...")
    g.add_argument("--plugin-settings", "--use-plugin", type=Path, metavar="FILE",
                   help="YAML/JSON/TOML file with 'plugin' and 'plugin_args' (Nipype)")
    g.add_argument("--stop-on-first-crash", action="store_true", default=None,
                   help="stop at the first failing step instead of finishing other subjects")
    g.add_argument("--random-seed", type=int, metavar="SEED",
                   help="seed of every random step (recorded in the run configuration)")
    g.add_argument("--config-file", type=Path, metavar="FILE",
                   help="replay the settings of a spineqprep.toml saved by an earlier run; "
                   "options given on this command line win")

    g = p.add_argument_group("what to produce")
    g.add_argument("--fit-model", choices=["monoexp", "offset"],
                   help="S0 exp(-t/T) (default, as published) or with a constant offset "
                   "(noise floor)")
    g.add_argument("--seg-weights", type=Path, metavar="PATH",
                   help="a spine segmentation model bundle (folder with weights.pt and "
                   "model.json, e.g. from spineqprep-train) instead of the packaged one")
    g.add_argument("--cep-weights", type=Path, metavar="PATH",
                   help="a cartilage-endplate model bundle (spineqprep-train endplates) instead "
                   "of the packaged one")
    g.add_argument("--cutoff", action="append", metavar="STRUCTURE=P", default=None,
                   help="probability cut-off of one structure (repeatable): vertebral_body, "
                   "sacrum, disc (default: the model's own, model.json 'cutoffs', else 0.5) or an "
                   "endplate L4L5_superior, L4L5_inferior, L5S1_superior, L5S1_inferior "
                   "(published defaults 0.24, 0.32, 0.24, 0.30)")
    g.add_argument("--no-segmentation", dest="segmentation", action="store_false", default=None,
                   help="maps only: no segmentation and no region statistics")
    g.add_argument("--no-registration", dest="registration", action="store_false",
                   default=None, help="no atlas-space maps: skip disc-by-disc registration")
    g.add_argument("--atlas", type=Path, metavar="DIR",
                   help="a disc atlas folder (e.g. from spineqprep-atlas) instead of the "
                   "packaged SpineDisc<LEVEL> atlas")
    g.add_argument("--registration-backend", choices=["elastix", "ants"],
                   help="disc registration engine: itk-elastix (default, as published) or ANTsPy")
    g.add_argument("--registration-params", nargs="+", type=Path, metavar="FILE",
                   help="elastix parameter files, in the order they run (e.g. from "
                   "spineqprep-tune), instead of the packaged ones")
    g.add_argument("--warp", choices=["echoes", "maps", "both"],
                   help="into atlas space: warp the echoes and fit there (default, as "
                   "published), warp the native maps, or both (warped maps get label-warped)")
    g.add_argument("--reports-only", action="store_true", default=None,
                   help="only rebuild the HTML reports from existing derivatives")
    g.add_argument("--boilerplate-only", "--boilerplate", action="store_true", default=None,
                   help="only write the methods boilerplate (logs/CITATION.md)")

    g = p.add_argument_group("group level: voxel-wise statistics of the atlas-space maps")
    g.add_argument("--group-model", type=Path, metavar="FILE",
                   help="BIDS Stats Models JSON file of the analyses (docs/statistics.md); "
                   "the shortcuts below add to it")
    g.add_argument("--group-correlate", nargs="+", metavar="COLUMN",
                   help="voxel-by-variable: correlate each voxel with these columns of "
                   "participants.tsv, sessions.tsv or phenotype/ (e.g. odi pfirrmann)")
    g.add_argument("--group-compare", nargs="+", metavar="COLUMN[:THRESHOLD]",
                   help="voxel-by-group: two groups of a column (e.g. group) or a threshold on "
                   "one (odi:40 = ODI > 40 vs <= 40)")
    g.add_argument("--group-map-pair", nargs="+", metavar="MAP:MAP",
                   help="voxel-by-voxel: per voxel, the first map against the second "
                   "(e.g. T1rho:T2map)")
    g.add_argument("--group-longitudinal", nargs="*", metavar="COLUMN",
                   help="voxel-by-time: change from first to last session (mean change, and "
                   "its association with the change of these columns)")
    g.add_argument("--group-covariates", nargs="*", metavar="COLUMN",
                   help="covariates of the shortcut analyses (default: those of age, sex, bmi "
                   "present)")
    g.add_argument("--group-site", choices=["covariate", "combat", "none"],
                   help="multi-site data: site as a covariate (default), ComBat "
                   "harmonisation of the maps, or nothing")
    g.add_argument("--group-permutations", type=int, metavar="N",
                   help="permutations for max-T, TFCE and cluster inference (default 1000; "
                   "seeded by --random-seed)")
    g.add_argument("--group-min-subjects", type=int, metavar="N",
                   help="analyse a voxel only when at least N subjects have a value there "
                   "(default 10)")
    g.add_argument("--group-warped-maps", action="store_true", default=None,
                   help="analyse the native maps warped into atlas space (label-warped, from "
                   "--warp both) instead of the maps fitted in atlas space (default, as "
                   "published)")
    g.add_argument("--group-no-tfce", dest="group_tfce", action="store_false", default=None,
                   help="skip threshold-free cluster enhancement")
    return p


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse the command line (and a replayed configuration) into a :class:`RunConfig`."""
    ns = build_parser().parse_args(argv)
    settings: dict[str, Any] = {}
    if ns.config_file is not None:
        settings = {k: v for k, v in load_toml(ns.config_file).items() if k not in _NOT_REPLAYED}
    cli = {
        "participant_label": ns.participant_label,
        "session_label": ns.session_label,
        "work_dir": ns.work_dir,
        "nprocs": ns.nprocs,
        "omp_nthreads": ns.omp_nthreads,
        "mem_mb": ns.mem_mb,
        "skip_bids_validation": ns.skip_bids_validation,
        "stop_on_first_crash": ns.stop_on_first_crash,
        "random_seed": ns.random_seed,
        "reports_only": ns.reports_only,
        "boilerplate_only": ns.boilerplate_only,
        "derivatives": ns.derivatives,
        "fit_model": ns.fit_model,
        "segmentation": ns.segmentation,
        "seg_weights": ns.seg_weights,
        "cep_weights": ns.cep_weights,
        "cutoffs": parse_cutoffs(ns.cutoff) if ns.cutoff else None,
        "registration": ns.registration,
        "atlas": ns.atlas,
        "registration_backend": ns.registration_backend,
        "registration_params": ns.registration_params,
        "warp": ns.warp,
        "verbosity": ns.verbosity,
        "plugin": ns.plugin,
        "group_model": ns.group_model,
        "group_correlate": ns.group_correlate,
        "group_compare": ns.group_compare,
        "group_map_pair": ns.group_map_pair,
        "group_longitudinal": ns.group_longitudinal,
        "group_covariates": ns.group_covariates,
        "group_site": ns.group_site,
        "group_permutations": ns.group_permutations,
        "group_min_subjects": ns.group_min_subjects,
        "group_tfce": ns.group_tfce,
        "group_warped_maps": ns.group_warped_maps,
    }
    settings.update({k: v for k, v in cli.items() if v is not None})
    if ns.bids_filter_file is not None:
        settings["bids_filters"] = _read_filters(ns.bids_filter_file)
    if ns.plugin_settings is not None:
        plugin, plugin_args = _read_plugin(ns.plugin_settings)
        settings.setdefault("plugin", plugin)
        settings["plugin_args"] = plugin_args
    for key in ("nprocs", "omp_nthreads", "mem_mb", "group_permutations",
                "group_min_subjects"):
        if settings.get(key, 0) < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive")
    return RunConfig(
        bids_dir=ns.bids_dir, output_dir=ns.output_dir, analysis_level=ns.analysis_level,
        **settings,
    )


def _read_filters(path: Path) -> dict[str, Any]:
    try:
        filters = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError("BIDS filter file not found", path=path) from None
    except json.JSONDecodeError as err:
        raise UsageError(f"not valid JSON ({err})", path=path,
                         fix='write a JSON object such as {"MESL": {"acq": "mapss"}}') from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError("a BIDS filter file maps series suffixes to query objects", path=path,
                         fix='write a JSON object such as {"MESL": {"acq": "mapss"}}')
    return filters


def _read_plugin(path: Path) -> tuple[str | None, dict[str, Any]]:
    """Read a Nipype plugin settings file (YAML, JSON or TOML)."""
    import tomllib

    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError("plugin settings file not found", path=path) from None
    try:
        # YAML is a superset of JSON
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"cannot parse plugin settings ({err})", path=path) from None
    if not isinstance(data, dict):
        raise UsageError("plugin settings must be a mapping with 'plugin' and 'plugin_args'",
                         path=path)
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError("'plugin_args' must be a mapping", path=path)
    return data.get("plugin"), args


#: Structures whose probability cut-off ``--cutoff`` sets.
CUTOFF_STRUCTURES = ("vertebral_body", "sacrum", "disc", "L4L5_superior", "L4L5_inferior",
                     "L5S1_superior", "L5S1_inferior")


def parse_cutoffs(items: list[str]) -> dict[str, float]:
    """``["disc=0.4", "L4L5_superior=0.3"]`` -> {structure: cut-off}, checked."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in CUTOFF_STRUCTURES:
            raise UsageError(f"--cutoff {item}: unknown structure {name!r}",
                             fix=f"use one of {', '.join(CUTOFF_STRUCTURES)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--cutoff {item}: {value!r} is not a number",
                             fix="write STRUCTURE=P with P between 0 and 1") from None
        if not 0.0 < out[name] < 1.0:
            raise UsageError(f"--cutoff {item}: the cut-off must lie between 0 and 1")
    return out
