"""Registration quality of one disc: overlap, Jacobian, folding and histogram preservation.

METHODS.md section 1: a registered disc must overlap its atlas disc (Dice), must not fold
(det J <= 0 nowhere) and must keep the distribution of relaxation values (histograms before and
after warping). These pure functions compute those figures from arrays on the atlas grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import wasserstein_distance


@dataclass(frozen=True)
class DiscQuality:
    """Quality figures of one registered disc; ``reason`` is "" when it passed.

    ``fov_cut`` is a warning, not a failure: the native disc reaches the edge of its image, so
    only part of it was registered (stretched onto the whole atlas disc); the atlas-space
    values near the cut come from the part that was imaged.
    """

    dice: float
    jacobian_mean: float
    jacobian_sd: float
    folded_fraction: float
    histogram_distance: float | None
    passed: bool
    reason: str
    fov_cut: bool = False

    def as_sidecar(self) -> dict:
        """The figures under the JSON sidecar key names (``RegistrationQC``)."""
        return {
            "Dice": self.dice,
            "JacobianMean": self.jacobian_mean,
            "JacobianSD": self.jacobian_sd,
            "FoldedFraction": self.folded_fraction,
            "HistogramDistance": self.histogram_distance,
            "Passed": self.passed,
            "Reason": self.reason,
            "CutByFieldOfView": self.fov_cut,
        }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of the same shape (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def cut_by_fov(mask: np.ndarray) -> bool:
    """Whether a native mask touches a face of its image (any axis longer than one voxel)."""
    mask = np.asarray(mask, bool)
    return any(mask.take([0, -1], axis=a).any() for a in range(mask.ndim) if mask.shape[a] > 1)


def histogram_distance(native_values: np.ndarray, atlas_values: np.ndarray) -> float:
    """Normalised 1-D Wasserstein distance between two value distributions (unitless).

    The earth mover's distance between the empirical distributions of the disc's values before
    (native space) and after warping (atlas space), divided by the mean native value, so 0.02
    means the histogram moved by 2 % of the typical value whatever the map (T2, T1rho, T2*).
    Non-finite values are ignored; NaN when either side has no finite value.
    """
    native = np.asarray(native_values, float).ravel()
    atlas = np.asarray(atlas_values, float).ravel()
    native, atlas = native[np.isfinite(native)], atlas[np.isfinite(atlas)]
    if native.size == 0 or atlas.size == 0:
        return float("nan")
    scale = abs(float(native.mean())) or 1.0
    return float(wasserstein_distance(native, atlas)) / scale


def assess(
    warped_mask: np.ndarray,
    atlas_mask: np.ndarray,
    det_jacobian: np.ndarray,
    *,
    min_dice: float,
    histogram: float | None = None,
) -> DiscQuality:
    """Quality of one registration from the warped disc mask and det J on the atlas grid.

    The Jacobian statistics are taken over the atlas disc; the disc fails when it folds
    anywhere there (det J <= 0) or when Dice is below ``min_dice``.
    """
    atlas = np.asarray(atlas_mask, bool)
    jac = np.asarray(det_jacobian, float)[atlas]
    score = dice(warped_mask, atlas)
    if jac.size == 0:
        return DiscQuality(score, float("nan"), float("nan"), float("nan"), histogram, False,
                           "empty atlas disc")
    folded = float(np.mean(~(jac > 0)))
    reasons = []
    if folded > 0:
        reasons.append(f"folding in {folded:.2%} of the atlas disc")
    if not score >= min_dice:
        reasons.append(f"Dice {score:.3f} < {min_dice:.2f}")
    return DiscQuality(
        dice=score,
        jacobian_mean=float(jac.mean()),
        jacobian_sd=float(jac.std()),
        folded_fraction=folded,
        histogram_distance=histogram,
        passed=not reasons,
        reason="; ".join(reasons),
    )


def failed(reason: str) -> DiscQuality:
    """The quality record of a disc that could not be registered at all (e.g. no mask)."""
    nan = float("nan")
    return DiscQuality(0.0, nan, nan, nan, None, False, reason)
