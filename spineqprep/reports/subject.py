"""The per-subject HTML report, rebuilt from the derivatives on disk."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from spineqprep.errors import InputError
from spineqprep.reports.figures import map_views, plot_dseg_figure, plot_map_figure
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
from spineqprep.reports.registration import registration_blocks
from spineqprep.stats.summary import (
    MapFiles,
    find_maps,
    load_image,
    statistics_of,
    times_of,
    valid_voxels,
)

#: how each quantity is written in the report.
DISPLAY: dict[str, str] = {"T2": "T2", "T1rho": "T1ρ", "T2star": "T2*"}
_TIME_LABEL = {"EchoTime": "TE", "SpinLockTime": "TSL"}

SUBJECT_COLUMNS = [
    ("session", "session", fmt_text), ("acq", "acq", fmt_text), ("quantity", "map", fmt_text),
    ("median_ms", "median (ms)", fmt_ms), ("iqr_ms", "IQR (ms)", fmt_ms),
    ("p5_ms", "p5 (ms)", fmt_ms), ("p95_ms", "p95 (ms)", fmt_ms),
    ("n_voxels_valid", "valid voxels", fmt_int), ("fraction_valid", "fraction valid", fmt_fraction),
    ("times_ms", "times (ms)", fmt_text), ("fit_model", "fit model", fmt_text),
]


def resolve_source(uri: str, bids_dir: Path | None, output_dir: Path) -> Path | None:
    """Path of a ``Sources`` entry: ``bids::<rel>`` is in ``output_dir``, ``bids:<name>:<rel>``
    (and a bare relative path) in the raw dataset ``bids_dir``; ``None`` if not on disk."""
    if uri.startswith("bids::"):
        path = output_dir / uri.removeprefix("bids::")
    elif uri.startswith("bids:") and uri.count(":") >= 2:
        path = None if bids_dir is None else bids_dir / uri.split(":", 2)[2]
    elif "://" not in uri and not Path(uri).is_absolute():
        path = None if bids_dir is None else bids_dir / uri
    else:
        path = None
    return path if path is not None and path.is_file() else None


def first_source(meta: dict[str, Any], bids_dir: Path | None,
                 output_dir: Path) -> tuple[Path | None, str]:
    """(path, label) of the source image with the shortest echo/spin-lock time."""
    sources = [s for s in meta.get("Sources", []) if isinstance(s, str)]
    if not sources:
        return None, ""
    field, times = times_of(meta)
    k = int(np.argmin(times)) if len(times) == len(sources) else 0
    label = (f"{_TIME_LABEL.get(field, field)} {times[k] * 1e3:g} ms image"
             if len(times) == len(sources) else "first source image")
    return resolve_source(sources[k], bids_dir, output_dir), label


def _background(files: MapFiles, meta: dict[str, Any], bids_dir: Path | None,
                output_dir: Path) -> tuple[nib.Nifti1Image | None, str, str]:
    """(image, label, note): the first-echo source, else the fitted S0, else nothing."""
    path, label = first_source(meta, bids_dir, output_dir)
    note = ""
    if path is not None:
        try:
            return load_image(path), label, ""
        except InputError as err:
            note = f"The source image could not be read ({err}); "
    elif meta.get("Sources"):
        note = ("The source images were not found (give the raw BIDS folder); " if bids_dir is None
                else "The source images were not found in the raw BIDS folder; ")
    if files.s0_path is not None:
        return load_image(files.s0_path), "fitted S0", note + "the fitted S0 map is shown instead."
    return None, "no background", note + "no background image is available."


def _map_block(files: MapFiles, stats: dict[str, Any], figure: Path, output_dir: Path,
               note: str) -> str:
    quantity = DISPLAY[files.quantity]
    src = esc(figure.relative_to(output_dir).as_posix())
    acq = f", acq-{files.acq}" if files.acq else ""
    caption = (f"{quantity} map{acq}: {fmt_int(stats['n_voxels_valid'])} valid voxels "
               f"(fraction {fmt_fraction(stats['fraction_valid'])}), median "
               f"{fmt_ms(stats['median_ms'])} ms, IQR {fmt_ms(stats['iqr_ms'])} ms. "
               "Sagittal slices in canonical orientation: anterior (A) left, superior (S) top; "
               "the red line in the top row outlines the fit's validity mask. " + note)
    return (f'<h3 id="{esc(files.stem)}">{esc(quantity)} map{esc(acq)}</h3>\n'
            f'<figure><img src="{src}" alt="{esc(quantity)} map of {esc(files.stem)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def build_subject_report(output_dir: Path, subject: str, *, sessions: Sequence[str] | None = None,
                         bids_dir: Path | None = None, errors: Sequence[str] | None = None,
                         boilerplate: str | None = None) -> Path:
    """Write ``output_dir/sub-<subject>.html`` and its figures under ``sub-<subject>/figures/``.

    Everything is read from the derivatives in ``output_dir`` (and the first-echo source
    images from ``bids_dir``), so the report can be rebuilt without rerunning the workflow.
    """
    output_dir = Path(output_dir)
    bids_dir = None if bids_dir is None else Path(bids_dir)
    subject = subject.removeprefix("sub-")
    maps = find_maps(output_dir, subject, None if sessions is None else list(sessions))
    figures = output_dir / f"sub-{subject}" / "figures"
    rows: list[dict[str, Any]] = []
    blocks: dict[str | None, list[str]] = {}
    for files in maps:
        values, valid = valid_voxels(files)
        meta = files.metadata()
        stats = statistics_of(values, valid, meta)
        background, bg_label, note = _background(files, meta, bids_dir, output_dir)
        rsq = None if files.rsquared_path is None else load_image(files.rsquared_path)
        views = map_views(load_image(files.map_path), valid, background, rsq)
        figure = plot_map_figure(views, figures / f"{files.stem}.png",
                                 quantity=DISPLAY[files.quantity], background_label=bg_label)
        rows.append({"session": files.session, "acq": files.acq,
                     "quantity": DISPLAY[files.quantity], **stats})
        blocks.setdefault(files.session, []).append(
            _map_block(files, stats, figure, output_dir, note))
    for session, block in _segmentation_blocks(output_dir, subject, sessions, bids_dir,
                                               figures):
        blocks.setdefault(session, []).append(block)
    for session, block in registration_blocks(output_dir, subject, figures,
                                              None if sessions is None else list(sessions)):
        blocks.setdefault(session, []).append(block)
    sections = [_summary_section(subject, output_dir, rows)]
    for session, html_blocks in blocks.items():
        ident, title = (f"ses-{session}", f"Session {session}") if session else ("maps", "Maps")
        sections.append(Section(ident, title, "\n".join(html_blocks)))
    sections += [methods_section(boilerplate), errors_section(errors)]
    return render_page(output_dir / f"sub-{subject}.html", f"spineqprep: sub-{subject}", sections)


def _segmentation_blocks(output_dir: Path, subject: str, sessions: Sequence[str] | None,
                         bids_dir: Path | None, figures: Path) -> list[tuple[str | None, str]]:
    """(session, HTML) per segmentation of the subject: the labels over their image, the
    level check, and the whole-region statistics of the maps on the same grid."""
    out = []
    for path in sorted((output_dir / f"sub-{subject}").glob("**/anat/*_dseg.nii.gz")):
        stem = path.name.removesuffix("_dseg.nii.gz")
        session = next((p[4:] for p in stem.split("_") if p.startswith("ses-")), None)
        if sessions is not None and session not in sessions:
            continue
        sidecar = path.with_name(f"{stem}_dseg.json")
        meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        lut = path.with_name(f"{stem}_dseg.tsv")
        lut = lut if lut.exists() else output_dir / "dseg.tsv"
        names = ({int(i): str(a) for i, a in pd.read_csv(lut, sep="\t")[
            ["index", "abbreviation"]].itertuples(index=False)} if lut.exists() else {})
        sources = meta.get("Sources") or []
        source = resolve_source(sources[0], bids_dir, output_dir) if sources else None
        figure = plot_dseg_figure(load_image(source) if source else None, load_image(path),
                                  names, figures / f"{stem}_dseg.png")
        if "VoxelsFound" in meta:  # cartilage endplates
            flags = meta.get("Flags") or []
            found = [k.replace("_", " ") for k, n in meta["VoxelsFound"].items() if n]
            check = (f"{len(found)} of {len(meta['VoxelsFound'])} endplates found"
                     + (": " + "; ".join(flags) if flags else ""))
        else:
            flags = meta.get("LevelFlags") or []
            check = ("levels confident" if meta.get("LevelsConfident", True) else
                     "LEVELS DOUBTFUL") + (": " + "; ".join(flags) if flags else "")
        html = [f'<h3 id="{esc(stem)}_dseg">Segmentation {esc(stem)}</h3>',
                f'<figure><img src="{esc(figure.relative_to(output_dir).as_posix())}" '
                f'alt="segmentation {esc(stem)}"><figcaption>{esc(check)}. Labels over '
                f"{esc(Path(sources[0]).name if sources else 'no image')}.</figcaption></figure>"]
        pattern = f"{stem}_*map.tsv" if "_desc-" in stem else f"{stem}_desc-regions_*.tsv"
        for regions in sorted(path.parent.glob(pattern)):
            table_ = pd.read_csv(regions, sep="\t", na_values="n/a")
            for col in ("mean", "sd", "median"):
                table_[f"{col}_ms"] = table_[col] * 1e3
            html.append(f"<h4>{esc(regions.stem.split('_')[-1])} by region</h4>" + table(
                table_, [("region", "region", fmt_text), ("n_included", "voxels used", fmt_int),
                         ("mean_ms", "mean (ms)", fmt_ms), ("sd_ms", "SD (ms)", fmt_ms),
                         ("median_ms", "median (ms)", fmt_ms)], "regions"))
        out.append((session, "\n".join(html)))
    return out


def _summary_section(subject: str, output_dir: Path, rows: list[dict[str, Any]]) -> Section:
    if not rows:
        body = (f'<p class="note">No relaxation maps of sub-{esc(subject)} were found in '
                f"{esc(output_dir)}.</p>")
    else:
        body = ("<p>Valid voxels are those in the fit's validity mask with a finite value; "
                "percentiles and the interquartile range (IQR) are over those voxels.</p>\n"
                + table(pd.DataFrame(rows), SUBJECT_COLUMNS, "summary"))
    return Section("summary", "Summary", body)
