"""The group level: summarise the participant-level maps across subjects, sessions and sites.

Voxel-wise group statistics (issue: group level) will be added here; for now the group level
collects one row per subject, session and map, writes it as a table and a group report.
"""

from __future__ import annotations

import logging

from spineqprep.bids.derivatives import atomic_write_text
from spineqprep.config import RunConfig
from spineqprep.errors import UsageError

LOG = logging.getLogger("spineqprep")


def run_group(config: RunConfig) -> int:
    """Summarise the participant-level derivatives in ``config.output_dir``."""
    from spineqprep.reports import build_group_report
    from spineqprep.stats.summary import summarise_maps

    summary = summarise_maps(config.output_dir, bids_dir=config.bids_dir)
    if config.participant_label:
        summary = summary[summary["participant_id"].isin(
            [f"sub-{s}" for s in config.participant_label])]
    if summary.empty:
        raise UsageError(
            "no participant-level maps found in the output folder", path=config.output_dir,
            fix="run 'spineqprep BIDS_DIR OUTPUT_DIR participant' first",
        )
    table = config.output_dir / "group" / "desc-summary_maps.tsv"
    atomic_write_text(summary.to_csv(sep="\t", index=False, na_rep="n/a"), table)
    report = build_group_report(config.output_dir, summary, bids_dir=config.bids_dir)
    n_subjects = summary["participant_id"].nunique()
    print(f"spineqprep: group summary of {n_subjects} participant(s): {table}, {report}")
    return 0
