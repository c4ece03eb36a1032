"""Overlap, volume and detection metrics of binary masks, and AUCs of probability maps.

Conventions for empty masks (``pred`` = prediction, ``ref`` = reference; see docs/metrics.md):

================================  ============  ==============  ===============
metric                            both empty    only ref empty  only pred empty
================================  ============  ==============  ===============
Dice (3D, per slice, central)     1.0           0.0             0.0
percent volume difference         0.0           NaN             -100
sensitivity  TP / (TP + FN)       NaN           NaN             0.0
precision    TP / (TP + FP)       NaN           0.0             NaN
specificity  TN / (TN + FP)       NaN only when the image has no reference-negative voxel
ROC-AUC                           NaN when the reference has no positive or no negative voxel
PR-AUC (average precision)        NaN when the reference has no positive voxel
================================  ============  ==============  ===============

Agreement on absence counts as agreement (Dice 1, volume difference 0); a ratio whose
denominator is zero is undefined (NaN), never silently 0 or 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata


class Confusion(NamedTuple):
    """Voxel counts of a binary prediction against a binary reference."""

    tp: int
    fp: int
    fn: int
    tn: int


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return pred, ref


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def confusion(pred: np.ndarray, ref: np.ndarray) -> Confusion:
    """TP, FP, FN and TN voxel counts (``pred`` and ``ref`` are cast to bool)."""
    pred, ref = _pair(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    return Confusion(tp, fp, fn, pred.size - tp - fp - fn)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient 2 TP / (2 TP + FP + FN); 1.0 when both masks are empty."""
    c = confusion(pred, ref)
    den = 2 * c.tp + c.fp + c.fn
    return 2 * c.tp / den if den else 1.0


def dice_per_slice(pred: np.ndarray, ref: np.ndarray, axis: int = 0) -> np.ndarray:
    """2D Dice of every slice along ``axis`` (float array of the axis' length); NaN for a slice
    where both masks are empty, so that ``np.nanmean`` averages the slices with a structure."""
    pred, ref = _pair(pred, ref)
    other = tuple(a for a in range(pred.ndim) if a != axis % pred.ndim)
    tp = np.count_nonzero(pred & ref, axis=other)
    total = np.count_nonzero(pred, axis=other) + np.count_nonzero(ref, axis=other)
    out = np.full(total.shape, np.nan)
    np.divide(2 * tp, total, out=out, where=total > 0)
    return out


def dice_2d(pred: np.ndarray, ref: np.ndarray, axis: int = 0) -> float:
    """Mean 2D Dice over the slices along ``axis`` where either mask is present (as reported
    by slice-wise networks, e.g. per sagittal slice for the discs); 1.0 when both are empty."""
    per_slice = dice_per_slice(pred, ref, axis)
    present = ~np.isnan(per_slice)
    return float(per_slice[present].mean()) if present.any() else 1.0


def central_slices(ref: np.ndarray, axis: int = 0, fraction: float = 0.5) -> np.ndarray:
    """Boolean selector of the central slices along ``axis``: of the n slices from the first to
    the last one holding reference voxels, the middle max(1, round(fraction n)) (an odd
    leftover slice is dropped at the high-index end). Used for the 'mid-sagittal 50 %'
    endplate Dice. No slice is selected when the reference is empty."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ref = np.asarray(ref, bool)
    other = tuple(a for a in range(ref.ndim) if a != axis % ref.ndim)
    present = np.flatnonzero(ref.any(axis=other))
    keep = np.zeros(ref.shape[axis], bool)
    if present.size:
        n = int(present[-1] - present[0] + 1)
        k = max(1, round(fraction * n))
        start = int(present[0]) + (n - k) // 2
        keep[start:start + k] = True
    return keep


def dice_central(pred: np.ndarray, ref: np.ndarray, axis: int = 0,
                 fraction: float = 0.5) -> float:
    """3D Dice restricted to the central ``fraction`` of the reference's slices along ``axis``
    (published endplate Dice "in the mid-sagittal 50 %"); 1.0 when both masks are empty, 0.0
    when only the reference is."""
    pred, ref = _pair(pred, ref)
    keep = central_slices(ref, axis, fraction)
    if not keep.any():
        return 1.0 if not pred.any() else 0.0
    return dice(np.compress(keep, pred, axis), np.compress(keep, ref, axis))


def volume_difference_percent(pred: np.ndarray, ref: np.ndarray) -> float:
    """Signed percent volume difference 100 (V_pred - V_ref) / V_ref (voxel counts: the voxel
    volume cancels); 0.0 when both masks are empty, NaN when only the reference is."""
    c = confusion(pred, ref)
    n_pred, n_ref = c.tp + c.fp, c.tp + c.fn
    if n_ref == 0:
        return 0.0 if n_pred == 0 else float("nan")
    return 100.0 * (n_pred - n_ref) / n_ref


def sensitivity(c: Confusion) -> float:
    """TP / (TP + FN) (recall, true-positive rate); NaN without reference voxels."""
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Confusion) -> float:
    """TN / (TN + FP) (true-negative rate); NaN without reference-negative voxels."""
    return _ratio(c.tn, c.tn + c.fp)


def precision(c: Confusion) -> float:
    """TP / (TP + FP) (positive predictive value); NaN without predicted voxels."""
    return _ratio(c.tp, c.tp + c.fp)


def _scores(scores: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, ref = np.asarray(scores, float).ravel(), np.asarray(ref, bool).ravel()
    if scores.shape != ref.shape:
        raise ValueError(f"{scores.size} scores for {ref.size} reference voxels")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (mask out NaN voxels first)")
    return scores, ref


def roc_auc(scores: np.ndarray, ref: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (e.g. a probability map) against the binary
    reference: the Mann-Whitney statistic with mid-ranks for ties, which equals the trapezoidal
    area of the exact ROC curve (scikit-learn's ``roc_auc_score``). NaN when the reference has
    no positive or no negative voxel."""
    scores, ref = _scores(scores, ref)
    n_pos = int(np.count_nonzero(ref))
    n_neg = ref.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[ref].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(scores: np.ndarray, ref: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision, sum over thresholds of
    (R_n - R_{n-1}) P_n, one threshold per distinct score (scikit-learn's
    ``average_precision_score``, no interpolation). NaN when the reference has no positive."""
    scores, ref = _scores(scores, ref)
    n_pos = int(np.count_nonzero(ref))
    if n_pos == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores, hits = scores[order], ref[order]
    # last position of each run of equal scores = one threshold
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), hits.size - 1]
    tp = np.cumsum(hits)[ends]
    prec = tp / (ends + 1)
    recall_gain = np.diff(tp, prepend=0) / n_pos
    return float(np.sum(recall_gain * prec))
