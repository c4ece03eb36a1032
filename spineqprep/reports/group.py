"""The group HTML report: the per-map summary table, medians per site, missing maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from spineqprep.reports.figures import plot_group_figure, plot_stat_figure
from spineqprep.reports.html import (
    Section,
    errors_section,
    esc,
    fmt_fraction,
    fmt_int,
    fmt_ms,
    fmt_text,
    is_missing,
    methods_section,
    render_page,
    table,
)
from spineqprep.stats.summary import missing_maps

if TYPE_CHECKING:
    from spineqprep.stats.run import Outcome

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


KIND_TITLES = {"variable": "voxel-by-variable", "group": "voxel-by-group",
               "map": "voxel-by-voxel", "time": "voxel-by-time"}
CLUSTER_COLUMNS = [
    ("cluster", "cluster", fmt_int), ("sign", "sign", fmt_text), ("n_voxels", "voxels", fmt_int),
    ("p_fwe_cluster", "P (FWE, cluster)", fmt_fraction), ("peak_t", "peak t", fmt_ms),
    ("peak_r", "peak r", fmt_fraction), ("peak_p_fwe", "peak P (FWE)", fmt_fraction),
    ("peak_x_mm", "x (mm)", fmt_ms), ("peak_y_mm", "y (mm)", fmt_ms),
    ("peak_z_mm", "z (mm)", fmt_ms), ("mean_effect_ms", "mean effect (ms)", fmt_ms),
]


def _fmt_p(value: object) -> str:
    return "n/a" if is_missing(value) else f"{float(value):.2g}"


def voxelwise_sections(output_dir: Path, outcomes: Sequence[Outcome]) -> list[Section]:
    """One report section per analysis x level x map x contrast: figure, counts, ROI
    baseline, site effect and the cluster table."""
    sections = []
    for k, o in enumerate(outcomes):
        title = (f"{o.analysis} ({KIND_TITLES.get(o.kind, o.kind)}), {o.level}, {o.map}"
                 + (f" acq-{o.acq}" if o.acq else "") + f", contrast {o.contrast}")
        if not o.summary:
            sections.append(Section(f"vw{k}", title, f'<p class="note">{esc(o.note)}</p>'))
            continue
        s = o.summary
        threshold = "P(FWE, TFCE) < 0.05" if s.get("n_tfce") is not None else "P(FWE) < 0.05"
        figure = output_dir / "group" / "figures" / f"{o.prefix.name}_stat-t.png"
        plot_stat_figure(o.background, o.stat, o.significant, o.affine, figure,
                         title=f"{o.analysis}: {o.map} {o.level}, t ({o.n_subjects} subjects)",
                         threshold=threshold)
        src = esc(figure.relative_to(output_dir).as_posix())
        counts = (f"<p>{o.n_subjects} subjects, {o.n_voxels} voxels analysed; max |t| "
                  f"{s['max_abs_t']:.2f}. Significant voxels (P &lt; 0.05): FDR {s['n_fdr']}, "
                  f"Bonferroni {s['n_bonferroni']}, max-T FWE {s['n_fwe']}"
                  + (f", TFCE FWE {s['n_tfce']}" if s.get("n_tfce") is not None else "")
                  + f"; significant clusters {s['n_clusters']}.</p>")
        roi = (f"<p>Whole-disc ROI mean (baseline): effect {s['roi_effect_ms']:.2f} ms, "
               f"t {s['roi_t']:.2f}, r {s['roi_r']:.3f}, P {_fmt_p(s['roi_p'])}.</p>")
        site = ""
        if not is_missing(s.get("site_eta2_before")):
            site = (f"<p>Site effect (median partial eta&sup2; of site per voxel): "
                    f"{s['site_eta2_before']:.3f} before"
                    + ("" if is_missing(s.get("site_eta2_after"))
                       else f", {s['site_eta2_after']:.3f} after ComBat") + ".</p>")
        clusters = (table(o.clusters, CLUSTER_COLUMNS, "clusters") if len(o.clusters)
                    else '<p class="note">No supra-threshold cluster.</p>')
        body = (f'<figure><img src="{src}" alt="{esc(title)}"><figcaption>t map over the '
                f"mean map of the atlas disc; bottom row: {esc(threshold)} (two-sided). Files: "
                f"group/{esc(o.analysis)}/{esc(o.prefix.name)}_*</figcaption></figure>\n"
                + counts + roi + site + clusters)
        sections.append(Section(f"vw{k}", title, body))
    return sections
