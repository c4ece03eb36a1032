"""Whole-region statistics of a relaxation map: the ROI baseline of the publications.

For every labelled region of a segmentation (a disc level, a vertebral body, an endplate), the
mean, SD and median of the map over the region's voxels where the fit is valid and the value
lies in the published inclusion range (METHODS.md section 1: T1rho < 200 ms, T2 < 150 ms, the
voxels the publications keep for statistics; the group level applies the same ranges).
"""

from __future__ import annotations

from collections.abc import Mapping

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.processing import resample_from_to

COLUMNS = ["region", "index", "n_voxels", "n_valid", "n_included", "mean", "sd", "median", "p25",
           "p75"]
#: Published inclusion ranges (seconds, open interval) of the voxels kept for statistics, per
#: map suffix: T1rho < 200 ms and T2 < 150 ms (Iriondo et al. 2020, data set B); T2* as wide as
#: its fit's validity (no published bound).
INCLUSION_RANGES: dict[str, tuple[float, float]] = {
    "T1rho": (0.0, 0.200), "T2map": (0.0, 0.150), "T2starmap": (0.0, 0.5)}


def on_grid(labels: nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """Integer labels on ``reference``'s grid (nearest neighbour when the grids differ)."""
    same = labels.shape[:3] == reference.shape[:3] and np.allclose(
        labels.affine, reference.affine, atol=1e-4)
    if not same:
        labels = resample_from_to(labels, (reference.shape[:3], reference.affine), order=0)
    return np.rint(np.asanyarray(labels.dataobj)).astype(np.int32)


def region_statistics(map_img: nib.Nifti1Image, valid_img: nib.Nifti1Image,
                      dseg_img: nib.Nifti1Image, names: Mapping[int, str],
                      inclusion: tuple[float, float] = (-np.inf, np.inf)) -> pd.DataFrame:
    """One row per label of ``names`` present in ``dseg_img``: voxel counts (all, valid fit,
    valid and inside ``inclusion``, an open interval in the map's units) and the statistics of
    the map over the included voxels."""
    values = np.asanyarray(map_img.dataobj, dtype=np.float64)
    valid = (np.asanyarray(valid_img.dataobj) > 0) & np.isfinite(values)
    included = valid & (values > inclusion[0]) & (values < inclusion[1])
    labels = on_grid(dseg_img, map_img)
    rows = []
    for index, name in sorted(names.items()):
        inside = labels == index
        n_voxels = int(inside.sum())
        if not n_voxels:
            continue
        v = values[inside & included]
        stats = ([v.mean(), v.std(ddof=1) if v.size > 1 else np.nan, *np.percentile(
            v, [50, 25, 75])] if v.size else [np.nan] * 5)
        rows.append([name, index, n_voxels, int((inside & valid).sum()), int(v.size), *stats])
    return pd.DataFrame(rows, columns=COLUMNS)
