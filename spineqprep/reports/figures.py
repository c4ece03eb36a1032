"""Static report figures (matplotlib Agg, no pyplot state): sagittal map views and group plots.

Images may come in any orientation: every volume is brought to the closest canonical (RAS+)
orientation and shown in the radiological sagittal convention for the spine: anterior on
the left, superior at the top, pixels at their true size in mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nibabel.processing import resample_from_to

DPI = 100
PANEL_INCHES = 2.4
MAP_CMAP = "plasma"
RSQ_CMAP = "viridis"
OUTLINE = "#ff2d2d"


def first_volume(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """A 3D image: the first volume of a 4D one, singleton dimensions beyond 3 dropped."""
    if img.ndim == 3:
        return img
    data = np.asarray(img.dataobj)
    data = data.reshape(*data.shape[:3], -1)[..., 0] if data.ndim > 3 else data[..., None]
    return nib.Nifti1Image(data, img.affine)


def on_grid(img: nib.Nifti1Image, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """``img`` on ``reference``'s voxel grid (linear resampling only when the grids differ)."""
    img = first_volume(img)
    if img.shape[:3] == reference.shape[:3] and np.allclose(img.affine, reference.affine,
                                                            atol=1e-3):
        return img
    return resample_from_to(img, (reference.shape[:3], reference.affine), order=1, cval=0.0)


def canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """(float data, affine) of ``img`` reoriented to the closest RAS+ orientation."""
    img = nib.as_closest_canonical(first_volume(img))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def sagittal_indices(n_x: int, count: int = 3) -> list[int]:
    """The mid-sagittal slice and ``count - 1`` others spread a quarter of the volume away."""
    mid = n_x // 2
    step = max(n_x // 4, 1)
    offsets = sorted(range(-(count // 2), count - count // 2), key=abs)
    picks = [mid + o * step for o in offsets if 0 <= mid + o * step < n_x]
    return sorted(set(picks))


@dataclass(frozen=True)
class MapViews:
    """Everything a map figure shows, on one canonical grid (map in ms, NaN where invalid)."""

    map_ms: np.ndarray
    valid: np.ndarray
    background: np.ndarray | None
    rsquared: np.ndarray | None
    affine: np.ndarray


def map_views(map_img: nib.Nifti1Image, valid: np.ndarray,
              background: nib.Nifti1Image | None = None,
              rsquared: nib.Nifti1Image | None = None) -> MapViews:
    """Reorient a map (seconds), its validity, a background and an R^2 image to RAS+."""
    map_img = first_volume(map_img)
    map_s, affine = canonical(map_img)
    valid_img = nib.Nifti1Image(valid.reshape(map_img.shape).astype(np.uint8), map_img.affine)
    valid_c = canonical(valid_img)[0] > 0
    bg = None if background is None else canonical(on_grid(background, map_img))[0]
    rsq = None if rsquared is None else canonical(on_grid(rsquared, map_img))[0]
    map_ms = np.where(valid_c, map_s * 1e3, np.nan)
    return MapViews(map_ms=map_ms, valid=valid_c, background=bg, rsquared=rsq, affine=affine)


def _extent(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) in mm of :func:`display_slice` images: the voxel edges
    from anterior to posterior (y) and inferior to superior (z) of a canonical grid."""
    dy, dz = abs(affine[1, 1]) or 1.0, abs(affine[2, 2]) or 1.0
    y0, z0 = affine[1, 3], affine[2, 3]
    return (y0 + (shape[1] - 0.5) * dy, y0 - dy / 2, z0 - dz / 2, z0 + (shape[2] - 0.5) * dz)


#: Upper end of the colour scale per quantity (ms): the published inclusion limits for disc
#: T2 and T1rho (METHODS.md, section 1) and twice the published endplate T2* mean, so that the
#: tissues of interest, not the long-T2 spinal canal, set the contrast; same for every subject.
DISPLAY_MAX_MS = {"T2": 150.0, "T1ρ": 200.0, "T1rho": 200.0, "T2*": 40.0}


def _robust_range(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low, high])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _orient_letters(ax: Axes) -> None:
    """Mark anterior/posterior/superior/inferior at the panel edges."""
    style = {"color": "white", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, "A", ha="left", va="center", **style)
    ax.text(0.98, 0.5, "P", ha="right", va="center", **style)
    ax.text(0.5, 0.98, "S", ha="center", va="top", **style)
    ax.text(0.5, 0.02, "I", ha="center", va="bottom", **style)


def display_slice(arr: np.ndarray, i: int) -> np.ndarray:
    """Sagittal slice ``i`` of a canonical (RAS+) volume as shown: row 0 is the most superior,
    column 0 the most anterior (for ``imshow(origin="upper")``)."""
    return arr[i].T[::-1, ::-1]


def plot_map_figure(views: MapViews, out_path: Path, *, quantity: str,
                    background_label: str) -> Path:
    """Write a PNG: rows = background with the validity mask outlined, the map (ms) over the
    background, R^2 (when given); columns = the mid-sagittal and two other slices."""
    shape = views.map_ms.shape
    slices = sagittal_indices(shape[0])
    extent = _extent(views.affine, shape)
    aspect = float(np.clip((extent[3] - extent[2]) / max(extent[0] - extent[1], 1e-6), 0.4, 3))
    rows = ["background", "map"] + (["rsquared"] if views.rsquared is not None else [])
    fig = Figure(figsize=(len(slices) * PANEL_INCHES + 1.8,
                          len(rows) * PANEL_INCHES * aspect + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(rows), len(slices) + 1, squeeze=False,
                        gridspec_kw={"width_ratios": [1.0] * len(slices) + [0.06]})
    axes, cbar_axes = grid[:, :-1], grid[:, -1]  # a colour-bar column keeps the rows aligned
    bg = views.background if views.background is not None else np.zeros(shape, np.float32)
    bg_lo, bg_hi = _robust_range(bg[bg > 0] if np.any(bg > 0) else bg, 1, 99.5)
    map_hi = DISPLAY_MAX_MS.get(quantity) or _robust_range(views.map_ms, 1, 99)[1]
    common = {"origin": "upper", "extent": extent, "interpolation": "nearest"}
    images = {}
    for col, i in enumerate(slices):
        x_mm = float((views.affine @ np.array([i, 0, 0, 1.0]))[0])
        mask2d = display_slice(views.valid, i).astype(float)
        for row, kind in enumerate(rows):
            ax = axes[row, col]
            ax.set_facecolor("black")
            if kind == "rsquared":
                images[kind] = ax.imshow(display_slice(views.rsquared, i), cmap=RSQ_CMAP, vmin=0,
                                         vmax=1, **common)
            else:
                ax.imshow(display_slice(bg, i), cmap="gray", vmin=bg_lo, vmax=bg_hi, **common)
            if kind == "map":
                images[kind] = ax.imshow(display_slice(views.map_ms, i), cmap=MAP_CMAP, vmin=0,
                                         vmax=map_hi, **common)
            # a contour needs 2 x 2 samples: a single-line slice (a 2D acquisition seen
            # side-on) shows its mask in the map row only
            outline = min(mask2d.shape) >= 2 and mask2d.any() and not mask2d.all()
            if kind == "background" and outline:
                ax.contour(mask2d, levels=[0.5], colors=OUTLINE, linewidths=0.6, alpha=0.9,
                           origin="upper", extent=extent)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            _orient_letters(ax)
        mid = " (mid-sagittal)" if i == shape[0] // 2 else ""
        axes[0, col].set_title(f"slice {i + 1}/{shape[0]}, x = {x_mm:.1f} mm{mid}", fontsize=8)
        axes[-1, col].set_xlabel("anterior ← → posterior", fontsize=8)
    labels = {"background": f"{background_label}, mask outline",
              "map": f"{quantity} over {background_label}", "rsquared": "R² of the fit"}
    for row, kind in enumerate(rows):
        axes[row, 0].set_ylabel(f"{labels[kind]}\ninferior ← → superior", fontsize=8)
    cbar_labels = {"map": f"{quantity} (ms)", "rsquared": "R²"}
    for row, kind in enumerate(rows):
        if kind in images:
            fig.colorbar(images[kind], cax=cbar_axes[row], label=cbar_labels[kind])
        else:
            cbar_axes[row].set_visible(False)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path


def plot_dseg_figure(background: nib.Nifti1Image | None, dseg: nib.Nifti1Image,
                     names: dict[int, str], out_path: Path) -> Path:
    """Write a PNG: a labelled segmentation over its image on three sagittal slices, each
    label in its own colour and named at its centre on the slice where it is largest."""
    from matplotlib import colormaps

    labels, affine = canonical(dseg)
    labels = np.rint(labels).astype(np.int32)
    bg = (canonical(on_grid(background, first_volume(dseg)))[0] if background is not None
          else np.zeros(labels.shape, np.float32))
    slices = sagittal_indices(labels.shape[0])
    extent = _extent(affine, labels.shape)
    aspect = float(np.clip((extent[3] - extent[2]) / max(extent[0] - extent[1], 1e-6), 0.4, 3))
    fig = Figure(figsize=(len(slices) * PANEL_INCHES + 0.4, PANEL_INCHES * aspect + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    present = [i for i in sorted(names) if np.any(labels == i)]
    colours = colormaps["tab20"]
    lo, hi = _robust_range(bg[bg > 0] if np.any(bg > 0) else bg, 1, 99.5)
    common = {"origin": "upper", "extent": extent, "interpolation": "nearest"}
    for ax, i in zip(axes, slices, strict=True):
        ax.imshow(display_slice(bg, i), cmap="gray", vmin=lo, vmax=hi, **common)
        overlay = np.zeros((*display_slice(labels, i).shape, 4))
        shown = display_slice(labels, i)
        for k, index in enumerate(present):
            overlay[shown == index] = (*colours(k % 20)[:3], 0.55)
        ax.imshow(overlay, **common)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
        _orient_letters(ax)
        ax.set_title(f"slice {i + 1}/{labels.shape[0]}", fontsize=8)
    for k, index in enumerate(present):  # name each region on the slice where it is largest
        counts = [(display_slice(labels, i) == index).sum() for i in slices]
        col = int(np.argmax(counts))
        rows, cols = np.nonzero(display_slice(labels, slices[col]) == index)
        if rows.size:
            x0, x1, y0, y1 = extent
            x = x0 + (cols.mean() + 0.5) / labels.shape[1] * (x1 - x0)
            y = y1 - (rows.mean() + 0.5) / labels.shape[2] * (y1 - y0)
            axes[col].text(x, y, names[index], color="white", fontsize=6, ha="center",
                           va="center", bbox={"facecolor": colours(k % 20), "alpha": 0.7,
                                              "pad": 0.5, "linewidth": 0})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path


def plot_group_figure(summary: pd.DataFrame, out_path: Path) -> Path:
    """Write a PNG: per map/acq, the subjects' median (ms) per site as box plot + points."""
    panels = sorted({(m, a or "") for m, a in zip(summary["map"], summary["acq"], strict=True)})
    ncols = min(len(panels), 3) or 1
    nrows = max(-(-len(panels) // ncols), 1)
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rng = np.random.default_rng(0)  # fixed jitter: identical figures on rebuild
    for ax, (name, acq) in zip(axes, panels, strict=False):
        rows = summary[(summary["map"] == name) & (summary["acq"].fillna("") == acq)]
        rows = rows[pd.to_numeric(rows["median_ms"], errors="coerce").notna()]
        sites = rows["site"].fillna("n/a").astype(str)
        labels = sorted(sites.unique())
        data = [rows.loc[sites == s, "median_ms"].astype(float).to_numpy() for s in labels]
        if labels:
            ax.boxplot(data, tick_labels=labels, showfliers=False, widths=0.5)
            for k, values in enumerate(data, start=1):
                ax.plot(k + rng.uniform(-0.12, 0.12, values.size), values, "o", ms=4,
                        alpha=0.7, color="tab:blue")
        ax.set_title(f"{name}" + (f", acq-{acq}" if acq else ""), fontsize=9)
        ax.set_xlabel("site")
        ax.set_ylabel("median in valid voxels (ms)")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path


def _stat_panels(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Mid-sagittal, central coronal and central axial slices of a canonical volume, each as
    shown (sagittal: anterior left; coronal/axial: the subject's right on the left)."""
    mx, my, mz = (s // 2 for s in volume.shape[:3])
    return [("mid-sagittal", volume[mx].T[::-1, ::-1]),
            ("central coronal", volume[:, my].T[::-1]),
            ("central axial", volume[:, :, mz].T[::-1])]


def plot_stat_figure(background: np.ndarray, stat: np.ndarray, significant: np.ndarray,
                     affine: np.ndarray, out_path: Path, *, title: str,
                     threshold: str) -> Path:
    """Write a PNG of a statistic map over the atlas disc, in the views people publish.

    Top row: the unthresholded statistic over the mean map; bottom row: only the voxels
    significant at ``threshold`` (named in the caption). One symmetric colour bar.
    """
    volumes = []
    for arr in (background, stat, significant.astype(np.float32)):
        volumes.append(canonical(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine))[0])
    bg, t, sig = volumes
    vmax = float(np.nanmax(np.abs(t))) if np.isfinite(t).any() else 1.0
    lo, hi = _robust_range(bg, 1, 99)
    fig = Figure(figsize=(3 * PANEL_INCHES, 2 * PANEL_INCHES * 0.75 + 0.6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, squeeze=False)
    image = None
    for col, ((name, bg_s), (_, t_s), (_, sig_s)) in enumerate(zip(
            _stat_panels(bg), _stat_panels(t), _stat_panels(sig), strict=True)):
        for row, shown in enumerate((t_s, np.where(sig_s > 0.5, t_s, np.nan))):
            ax = axes[row, col]
            ax.imshow(np.nan_to_num(bg_s, nan=lo), cmap="gray", vmin=lo, vmax=hi,
                      interpolation="nearest")
            image = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
        axes[1, 0].set_ylabel(threshold, fontsize=7)
    axes[0, 0].set_ylabel("unthresholded", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="t")
    fig.suptitle(title, fontsize=9)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI, format="png")
    return out_path
