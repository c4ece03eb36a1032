"""The group HTML report: the per-map summary table, medians per site, missing maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from spineqprep.reports.figures import plot_group_figure
from spineqprep.reports.html import (
    Section,
    errors_section,
    esc,
    fmt_fraction,
    fmt_int,
    fmt_ms,
    fmt_text,
    methods_section,
    render_page,
    table,
)
from spineqprep.stats.summary import missing_maps

GROUP_FIGURE = Path("group") / "figures" / "group_desc-mediansbysite_boxplot.png"

ROW_COLUMNS = [
    ("participant_id", "participant", fmt_text), ("session_id", "session", fmt_text),
    ("site", "site", fmt_text), ("map", "map", fmt_text), ("acq", "acq", fmt_text),
    ("median_ms", "median (ms)", fmt_ms), ("iqr_ms", "IQR (ms)", fmt_ms),
    ("p5_ms", "p5 (ms)", fmt_ms), ("p95_ms", "p95 (ms)", fmt_ms),
    ("n_voxels_valid", "valid voxels", fmt_int), ("fraction_valid", "fraction valid", fmt_fraction),
    ("times_ms", "times (ms)", fmt_text),
]
SITE_COLUMNS = [
    ("map", "map", fmt_text), ("acq", "acq", fmt_text), ("site", "site", fmt_text),
    ("n", "maps", fmt_int), ("median_ms", "median of medians (ms)", fmt_ms),
    ("iqr_ms", "IQR of medians (ms)", fmt_ms),
]
MISSING_COLUMNS = [
    ("participant_id", "participant", fmt_text), ("session_id", "session", fmt_text),
    ("map", "map", fmt_text), ("acq", "acq", fmt_text), ("reason", "reason", fmt_text),
]


def site_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per map/acq/site: number of maps, median and IQR of the per-map medians (ms)."""
    frame = summary.assign(site=summary["site"].fillna("n/a"), acq=summary["acq"].fillna(""),
                           median_ms=pd.to_numeric(summary["median_ms"], errors="coerce"))
    frame = frame[frame["median_ms"].notna()]
    grouped = frame.groupby(["map", "acq", "site"])["median_ms"]
    out = pd.DataFrame({
        "n": grouped.size(), "median_ms": grouped.median(),
        "iqr_ms": grouped.quantile(0.75) - grouped.quantile(0.25),
    }).reset_index()
    return out.assign(acq=out["acq"].replace("", None))


def _linked(summary: pd.DataFrame, output_dir: Path) -> str:
    """The per-row table, participants linked to their report when it exists."""
    html = table(summary, ROW_COLUMNS, "summary")
    for pid in sorted(summary["participant_id"].unique()):
        if (output_dir / f"{pid}.html").is_file():
            cell = f'<td data-field="participant_id">{esc(pid)}</td>'
            link = f'<td data-field="participant_id"><a href="{esc(pid)}.html">{esc(pid)}</a></td>'
            html = html.replace(cell, link)
    return html


def build_group_report(output_dir: Path, summary: pd.DataFrame, *,
                       bids_dir: Path | None = None, errors: Sequence[str] | None = None,
                       boilerplate: str | None = None,
                       voxelwise: Sequence[Section] = ()) -> Path:
    """Write ``output_dir/group.html`` (figure under ``group/figures/``) from ``summary``.

    ``summary`` is :func:`spineqprep.stats.summary.summarise_maps`'s table. ``voxelwise``
    holds the sections of voxel-wise statistics (a later stage); without them the report says
    none were computed.
    """
    output_dir = Path(output_dir)
    missing = missing_maps(summary, bids_dir)
    n_sub = summary["participant_id"].nunique()
    n_sites = summary["site"].dropna().nunique()
    overview = (f"<p>{n_sub} participants, {len(summary)} maps"
                + (f", {n_sites} sites" if n_sites else ", no site information (participants.tsv)")
                + f"; maps missing or empty: {len(missing)}.</p>")
    sections = [Section("overview", "Overview", overview)]
    if len(summary):
        figure = plot_group_figure(summary, output_dir / GROUP_FIGURE)
        src = esc(figure.relative_to(output_dir).as_posix())
        sections.append(Section("sites", "Medians per site", (
            f'<figure><img src="{src}" alt="median relaxation time per site and map">'
            "<figcaption>Each point is one map's median over its valid voxels; boxes show the "
            "quartiles per site.</figcaption></figure>\n"
            + table(site_table(summary), SITE_COLUMNS, "sites"))))
        sections.append(Section("maps", "All maps", _linked(summary, output_dir)))
    else:
        sections.append(Section("maps", "All maps",
                                '<p class="note">No relaxation maps were found.</p>'))
    sections.append(Section("missing", "Missing maps", (
        table(missing, MISSING_COLUMNS, "missing") if len(missing)
        else '<p class="ok">Every expected map is present and has valid voxels.</p>')))
    voxel_body = ("\n".join(f'<h3 id="{esc(s.ident)}">{esc(s.title)}</h3>\n{s.body}'
                            for s in voxelwise)
                  if voxelwise else
                  '<p class="note">No voxel-wise statistics were computed in this run.</p>')
    sections.append(Section("voxelwise", "Voxel-wise statistics", voxel_body))
    sections += [methods_section(boilerplate), errors_section(errors)]
    return render_page(output_dir / "group.html", "spineqprep: group report", sections)
