"""The group level: summarise the participant-level maps across subjects, sessions and sites,
and run the voxel-wise statistics of the atlas-space maps (``spineqprep.stats.run``).

Without atlas-space maps the voxel-wise part says so in one line and the summary is still
written; without any analysis requested, a default set runs (see :func:`default_model`).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pandas as pd

from spineqprep.bids.derivatives import atomic_write_text
from spineqprep.config import RunConfig
from spineqprep.errors import UsageError
from spineqprep.stats.model import GroupModel, Inference, load_model, shortcut_model
from spineqprep.stats.run import AtlasMap, find_atlas_maps, read_variables

LOG = logging.getLogger("spineqprep")
DEFAULT_COVARIATES = ("age", "sex", "bmi")


def _columns(config: RunConfig) -> set[str]:
    subjects, sessions, phenotype = read_variables(config.bids_dir)
    names = set(subjects.columns) | set(sessions.columns)
    for table in phenotype:
        names |= set(table.columns)
    return names


def default_model(config: RunConfig, maps: list[AtlasMap], inference: Inference) -> GroupModel:
    """The analyses of the command line; when none is named: ODI correlation, ODI 0-40 vs > 40,
    T1rho vs T2 and the change between sessions, each where its data exist."""
    columns = _columns(config)
    covariates = (config.group_covariates if config.group_covariates is not None
                  else [c for c in DEFAULT_COVARIATES if c in columns])
    asked = (config.group_correlate or config.group_compare or config.group_map_pair
             or config.group_longitudinal is not None)
    suffixes = {m.suffix for m in maps}
    longitudinal = config.group_longitudinal
    if not asked and config.group_model is None:
        correlate = ["odi"] if "odi" in columns else []
        compare = ["odi:40"] if "odi" in columns else []
        pairs = ["T1rho:T2map"] if {"T1rho", "T2map"} <= suffixes else []
        sessions = {(m.participant_id, m.session_id) for m in maps}
        multi = len(sessions) > len({pid for pid, _ in sessions})
        longitudinal = (["odi"] if "odi" in columns else []) if multi else None
        return shortcut_model(variables=correlate, compare=compare, map_pairs=pairs,
                              longitudinal=longitudinal, covariates=covariates,
                              site=config.group_site, inference=inference)
    return shortcut_model(variables=config.group_correlate, compare=config.group_compare,
                          map_pairs=config.group_map_pair, longitudinal=longitudinal,
                          covariates=covariates, site=config.group_site, inference=inference)


def group_model(config: RunConfig, maps: list[AtlasMap]) -> GroupModel:
    """The model file (when given, with its own inference settings) plus the shortcut
    analyses of the command line."""
    inference = Inference(permutations=config.group_permutations, seed=config.random_seed,
                          tfce=config.group_tfce, min_subjects=config.group_min_subjects)
    shortcuts = default_model(config, maps, inference)
    if config.group_model is None:
        return shortcuts
    model = load_model(config.group_model)
    names = {a.name for a in model.analyses}
    return replace(model, analyses=model.analyses + tuple(
        a for a in shortcuts.analyses if a.name not in names))


def run_group(config: RunConfig) -> int:
    """Summarise the participant-level derivatives in ``config.output_dir``; run the
    voxel-wise analyses of its atlas-space maps."""
    from spineqprep.reports import build_group_report
    from spineqprep.reports.group import voxelwise_sections
    from spineqprep.stats.run import run_analyses, summary_table
    from spineqprep.stats.summary import summarise_maps

    summary = summarise_maps(config.output_dir, bids_dir=config.bids_dir)
    maps = find_atlas_maps(config.output_dir, warped=config.group_warped_maps)
    if config.participant_label:
        wanted = [f"sub-{s}" for s in config.participant_label]
        summary = summary[summary["participant_id"].isin(wanted)]
        maps = [m for m in maps if m.participant_id in wanted]
    if summary.empty and not maps:
        raise UsageError(
            "no participant-level maps found in the output folder", path=config.output_dir,
            fix="run 'spineqprep BIDS_DIR OUTPUT_DIR participant' first",
        )
    table = config.output_dir / "group" / "desc-summary_maps.tsv"
    atomic_write_text(summary.to_csv(sep="\t", index=False, na_rep="n/a"), table)
    outcomes = []
    if not maps:
        kind = "label-warped " if config.group_warped_maps else ""
        print(f"spineqprep: no {kind}atlas-space maps (space-SpineDisc<LEVEL>) in the output "
              "folder: voxel-wise statistics skipped")
    else:
        model = group_model(config, maps)
        outcomes = run_analyses(config.output_dir, config.bids_dir, model,
                                n_procs=config.nprocs, participants=config.participant_label,
                                warped=config.group_warped_maps)
        stats_table = config.output_dir / "group" / "desc-voxelwise_statistics.tsv"
        frame = summary_table(outcomes) if outcomes else pd.DataFrame()
        atomic_write_text(frame.to_csv(sep="\t", index=False, na_rep="n/a"), stats_table)
        print(f"spineqprep: {len(model.analyses)} voxel-wise analyses, {len(outcomes)} maps "
              f"tested: {stats_table}")
    report = build_group_report(config.output_dir, summary, bids_dir=config.bids_dir,
                                voxelwise=voxelwise_sections(config.output_dir, outcomes))
    n_subjects = len(set(summary["participant_id"]) | {m.participant_id for m in maps})
    print(f"spineqprep: group summary of {n_subjects} participant(s): {table}, {report}")
    return 0
