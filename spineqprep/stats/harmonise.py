"""Site effects: ComBat harmonisation of voxel maps (neuroCombat) and how large the effect is.

ComBat removes each site's additive and multiplicative effect per voxel while keeping the
biological covariates of the model (passed as ``covariates``). The site effect is measured
before and after as the per-voxel F test of site given the covariates: the report shows the
median partial eta^2 and the fraction of voxels with P < 0.05.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
from scipy import stats

from spineqprep.errors import InputError, UsageError


def combat(data: np.ndarray, sites: pd.Series, covariates: pd.DataFrame) -> np.ndarray:
    """``data`` (subjects x voxels, complete) harmonised across ``sites``.

    ``covariates`` (subjects x columns, numeric or categorical) are preserved.
    """
    try:
        from neuroCombat import neuroCombat
    except ImportError:
        raise UsageError("ComBat needs the neuroCombat package, which is not installed",
                         fix="pip install neuroCombat==0.2.12, or use --group-site covariate"
                         ) from None

    sites = pd.Series(sites).astype(str).reset_index(drop=True)
    counts = sites.value_counts()
    if counts.min() < 2:
        raise InputError(f"ComBat needs at least 2 subjects per site (site "
                         f"{counts.idxmin()} has {counts.min()})",
                         fix="use --group-site covariate, or drop that site")
    covars = covariates.reset_index(drop=True).copy()
    categorical = [c for c in covars.columns if not pd.api.types.is_numeric_dtype(covars[c])]
    continuous = [c for c in covars.columns if c not in categorical]
    covars["_site"] = sites.to_numpy()
    keep = np.asarray(data, dtype=float).std(axis=0) > 0
    out = np.array(data, dtype=float)
    with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints progress
        result = neuroCombat(dat=out[:, keep].T, covars=covars, batch_col="_site",
                             categorical_cols=categorical or None,
                             continuous_cols=continuous or None)
    out[:, keep] = np.asarray(result["data"]).T
    return out


def site_effect(data: np.ndarray, sites: pd.Series, nuisance: np.ndarray) -> dict[str, float]:
    """Per-voxel F test of site given ``nuisance`` (subjects x k, with intercept).

    Returns the median partial eta^2 and the fraction of voxels with P < 0.05.
    """
    data = np.asarray(data, dtype=float)
    dummies = pd.get_dummies(pd.Series(sites).astype(str), drop_first=True,
                             dtype=float).to_numpy()
    if dummies.shape[1] == 0:
        return {"median_partial_eta2": float("nan"), "fraction_p05": float("nan")}
    reduced = np.asarray(nuisance, dtype=float)
    full = np.column_stack([reduced, dummies])
    rss_r = _rss(reduced, data)
    rss_f = _rss(full, data)
    df1 = np.linalg.matrix_rank(full) - np.linalg.matrix_rank(reduced)
    df2 = data.shape[0] - np.linalg.matrix_rank(full)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = ((rss_r - rss_f) / df1) / (rss_f / df2)
        eta2 = (rss_r - rss_f) / rss_r
    p = stats.f.sf(f, df1, df2)
    return {"median_partial_eta2": float(np.nanmedian(eta2)),
            "fraction_p05": float(np.nanmean(p < 0.05))}


def _rss(design: np.ndarray, data: np.ndarray) -> np.ndarray:
    beta, *_ = np.linalg.lstsq(design, data, rcond=None)
    return ((data - design @ beta) ** 2).sum(axis=0)
