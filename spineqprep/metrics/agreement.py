"""Agreement of paired measurements (e.g. mean disc T2 from predicted vs true masks).

Pearson r, paired t-test and Bland-Altman bias with 95 % limits of agreement, as the
publications compare automatic with manual biomarkers (METHODS.md sections 1-2). Pairs with a
NaN on either side are dropped; ``n`` is the number of pairs used. Differences are ``a - b``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired measurements need equal lengths, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def bland_altman(a: ArrayLike, b: ArrayLike, z: float = 1.96) -> dict[str, float]:
    """Bland-Altman statistics of ``a - b``: ``bias`` (mean difference), ``sd`` (sample SD,
    ddof 1), limits of agreement ``loa_low``/``loa_high`` = bias -/+ z sd, the 95 % confidence
    interval of the bias ``bias_ci_low``/``bias_ci_high`` (t distribution) and ``n``.
    NaN statistics when fewer than two pairs remain (``bias`` needs one)."""
    a, b = _paired(a, b)
    d = a - b
    n = d.size
    nan = float("nan")
    bias = float(d.mean()) if n else nan
    sd = float(d.std(ddof=1)) if n > 1 else nan
    half_ci = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else nan
    return {"bias": bias, "sd": sd, "loa_low": bias - z * sd, "loa_high": bias + z * sd,
            "bias_ci_low": bias - half_ci, "bias_ci_high": bias + half_ci, "n": n}


def pearson(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """Pearson correlation ``r`` with its two-sided ``p`` and ``n``; NaN for fewer than three
    pairs or a constant input."""
    a, b = _paired(a, b)
    n = a.size
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"r": float("nan"), "p": float("nan"), "n": n}
    result = stats.pearsonr(a, b)
    return {"r": float(result.statistic), "p": float(result.pvalue), "n": n}


def paired_t(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """Paired two-sided t-test of ``a - b`` against 0: ``t``, ``p``, ``df``, ``mean_diff`` and
    ``n``; NaN ``t``/``p`` for fewer than two pairs or identical pairs (zero variance)."""
    a, b = _paired(a, b)
    n = a.size
    mean_diff = float((a - b).mean()) if n else float("nan")
    if n < 2 or np.ptp(a - b) == 0:
        return {"t": float("nan"), "p": float("nan"), "df": n - 1, "mean_diff": mean_diff,
                "n": n}
    result = stats.ttest_rel(a, b)
    return {"t": float(result.statistic), "p": float(result.pvalue), "df": n - 1,
            "mean_diff": mean_diff, "n": n}


def agreement(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """All three in one flat record (keys prefixed ``ba_``, ``pearson_``, ``t_``), one row of a
    biomarker-agreement table."""
    a, b = _paired(a, b)
    out: dict[str, float] = {"n": a.size}
    for prefix, part in (("ba_", bland_altman(a, b)), ("pearson_", pearson(a, b)),
                         ("t_", paired_t(a, b))):
        out.update({f"{prefix}{k}": v for k, v in part.items() if k != "n"})
    return out
