"""Report section of the atlas-space stage: each disc before and after registration.

Read from the derivatives only: per grid, the ``desc-registration_qc.tsv``, the ``_dseg``, a
native map and the atlas-space maps. "Before" is the native map on the atlas disc's mid-sagittal
plane moved onto the native disc's centroid (translation only: what registration starts from);
"after" is the atlas-space map. Both carry the atlas disc outline (the finite region of the
atlas-space map, i.e. the atlas disc) in white and, before, the native disc outline in red.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from spineqprep.registration.atlas import LEVELS, space_name
from spineqprep.registration.pipeline import disc_labels
from spineqprep.reports.html import esc, fmt_text, table

_MAP_SUFFIXES = ("T1rho", "T2map")
_DISPLAY = {"T1rho": "T1ρ", "T2map": "T2"}
_ATLAS_OUTLINE = "white"
_NATIVE_OUTLINE = "#ff2d2d"


def registration_blocks(output_dir: Path, subject: str, figures: Path,
                        sessions: list[str] | None = None) -> list[tuple[str | None, str]]:
    """(session, HTML) per registered grid of the subject: QC table and before/after figure."""
    out = []
    for qc_path in sorted((output_dir / f"sub-{subject}").glob(
            "**/anat/*_desc-registration_qc.tsv")):
        stem = qc_path.name.removesuffix("_desc-registration_qc.tsv")
        session = next((p[4:] for p in stem.split("_") if p.startswith("ses-")), None)
        if sessions is not None and session not in sessions:
            continue
        qc = pd.read_csv(qc_path, sep="\t", na_values="n/a", keep_default_na=False)
        suffix = next((s for s in _MAP_SUFFIXES
                       if (qc_path.parent / f"{stem}_{s}.nii.gz").exists()), None)
        html = [f'<h3 id="{esc(stem)}_registration">Atlas space {esc(stem)}</h3>']
        dseg = qc_path.parent / f"{stem}_dseg.nii.gz"
        if suffix is not None and dseg.exists():
            figure = plot_registration_figure(qc_path.parent, stem, suffix, qc,
                                              figures / f"{stem}_registration.png")
            html.append(
                f'<figure><img src="{esc(figure.relative_to(output_dir).as_posix())}" '
                f'alt="registration {esc(stem)}"><figcaption>{esc(_DISPLAY[suffix])} of each '
                "disc on the atlas disc's mid-sagittal plane (anterior left, superior up). "
                "Before: native map, disc centroid on the atlas centroid, native disc in red. "
                "After: the map in atlas space. White: atlas disc outline. Failed discs are "
                "marked and excluded from atlas-space outputs.</figcaption></figure>")
        shown = qc.assign(passed=qc["passed"].astype(str).str.lower().map(
            {"true": "yes", "false": "FAILED"}))
        html.append(table(shown, [(c, c.replace("_", " "), fmt_text) for c in qc.columns],
                          "registration"))
        out.append((session, "\n".join(html)))
    return out


def plot_registration_figure(folder: Path, stem: str, suffix: str, qc: pd.DataFrame,
                             out_path: Path) -> Path:
    """Write a PNG with one row per disc level: before | after, with outlines."""
    native_map = nib.load(folder / f"{stem}_{suffix}.nii.gz")
    dseg = nib.load(folder / f"{stem}_dseg.nii.gz")
    labels = disc_labels()
    passed = {str(r.level): str(r.passed).lower() == "true" for r in qc.itertuples()}
    reasons = {str(r.level): str(r.reason) for r in qc.itertuples()}
    fig = Figure(figsize=(4.6, 1.5 * len(LEVELS) + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(LEVELS), 2, squeeze=False)
    for row, level in enumerate(LEVELS):
        atlas_path = folder / f"{stem}_space-{space_name(level)}_{suffix}.nii.gz"
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(level, fontsize=8)
        if not atlas_path.exists():
            why = reasons.get(level, "not registered") if not passed.get(level, False) else ""
            for ax in axes[row]:
                ax.text(0.5, 0.5, f"FAILED\n{why}"[:80], ha="center", va="center", fontsize=6,
                        color=_NATIVE_OUTLINE, transform=ax.transAxes, wrap=True)
            continue
        after = nib.load(atlas_path)
        plane, extent = mid_sagittal_plane(after)
        after_values = _plane_values(after, plane)
        atlas_disc = np.isfinite(after_values)
        before_values, before_disc = before_panel(native_map, dseg, labels[level], plane)
        finite = after_values[atlas_disc]
        lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 0.2))
        for ax, values, title in ((axes[row][0], before_values, "before"),
                                  (axes[row][1], after_values, "after")):
            ax.imshow(np.nan_to_num(values).T, origin="lower", extent=extent, cmap="plasma",
                      vmin=lo, vmax=hi, interpolation="nearest")
            ax.contour(atlas_disc.T.astype(float), levels=[0.5], colors=_ATLAS_OUTLINE,
                       linewidths=0.8, extent=extent, origin="lower")
            ax.set_aspect("equal")
            if row == 0:
                ax.set_title(title, fontsize=8)
        if before_disc.any():
            axes[row][0].contour(before_disc.T.astype(float), levels=[0.5],
                                 colors=_NATIVE_OUTLINE, linewidths=0.8, extent=extent,
                                 origin="lower")
        axes[row][0].invert_xaxis()  # anterior on the left
        axes[row][1].invert_xaxis()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100, format="png")
    return out_path


def mid_sagittal_plane(atlas_img: nib.Nifti1Image) -> tuple[np.ndarray, list[float]]:
    """World points (ny, nz, 3) of the atlas grid's x = 0 plane and its (y, z) extent (mm)."""
    shape = atlas_img.shape[:3]
    affine = atlas_img.affine
    i = float(np.linalg.solve(affine, [0.0, 0.0, 0.0, 1.0])[0]) if shape[0] > 1 else 0.0
    j, k = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    ijk = np.stack([np.full(j.shape, i), j, k, np.ones(j.shape)], axis=-1)
    points = ijk @ affine.T
    ys, zs = points[..., 1], points[..., 2]
    return points[..., :3], [float(ys.min()), float(ys.max()), float(zs.min()), float(zs.max())]


def before_panel(native_map: nib.Nifti1Image, dseg: nib.Nifti1Image, label: int,
                 plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The "before" panel: the native map and the native disc (``label`` of ``dseg``) on the
    atlas plane moved onto the native disc's centroid; (values, disc outline mask)."""
    disc = (np.asarray(dseg.dataobj) == label).astype(np.float32)
    centre = _centroid(dseg, disc)
    return (_plane_values(native_map, plane, centre=centre),
            _plane_values(nib.Nifti1Image(disc, dseg.affine), plane, centre=centre) > 0.5)


def _centroid(img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray | None:
    if not mask.any():
        return None
    return np.asarray(img.affine[:3, :3] @ np.array(ndimage.center_of_mass(mask))
                      + img.affine[:3, 3])


def _plane_values(img: nib.Nifti1Image, plane: np.ndarray,
                  centre: np.ndarray | None = None) -> np.ndarray:
    """``img`` sampled (linear, NaN outside) at the plane's points, shifted so the atlas
    origin lands on ``centre`` (None: no shift).

    A voxel covers half a voxel beyond its centre, so points within half a voxel of the grid
    take the edge value: a single (e.g. slightly oblique) sagittal slice is sampled across its
    thickness instead of only exactly at its centre plane.
    """
    points = plane + (0.0 if centre is None else centre)
    data = np.asarray(img.dataobj, np.float32)
    if data.ndim == 2:
        data = data[:, :, None]
    vox = np.linalg.solve(img.affine, np.vstack([points.reshape(-1, 3).T,
                                                 np.ones(points[..., 0].size)]))[:3]
    last = np.array(data.shape, dtype=float)[:, None] - 1
    inside = np.all((vox >= -0.5) & (vox <= last + 0.5), axis=0)
    vox = np.clip(vox, 0.0, last)
    finite = np.isfinite(data)
    values = ndimage.map_coordinates(np.where(finite, data, 0.0), vox, order=1)
    support = ndimage.map_coordinates(finite.astype(np.float32), vox, order=1)
    values[~inside | (support < 0.5)] = np.nan
    return values.reshape(points.shape[:2])
