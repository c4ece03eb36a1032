"""Every synthetic disc as a known smooth deformation of its level's canonical disc.

A disc is described in *normalised* coordinates ``n = (x, y, z)`` (right, anterior, superior):
the in-plane position divided by the disc's half width / half depth and the position along the
spine divided by the local half height. The canonical disc of a level is the unit disc
``{superellipse(x, y) <= 1, |z| <= 1}`` embedded in millimetres by the level's reference
dimensions (``CanonicalDisc.embed``); that embedding *is* the atlas space ``SpineDisc<LEVEL>``.

A subject's disc maps its local coordinates (``du``, ``v``, ``w``) to canonical ones in two steps:
the subject's own dimensions (per-axis scaling by half depth, half width and the concave height
profile, all known from the anatomy), then a small smooth displacement ``n' = n + d(n)``
(a few low-frequency cosine modes whose summed gradient bound stays below 1/2, so the map is a
diffeomorphism). Disc membership, the nucleus-annulus pattern and the disc texture are all
functions of ``n'``, so the relaxation pattern is carried by the deformation and the value an
atlas voxel should receive is the pattern at that voxel's canonical coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPERELLIPSE = 2.5
NUCLEUS_HALF_HEIGHT = 0.8  # nucleus extent along z, as a fraction of the local half height
NUCLEUS_OFFSET = 0.08  # the nucleus sits this fraction of the half depth posterior
MODES = 4
#: Upper bound of sum_m |A_m| |k_m| (the Lipschitz constant of d): < 1 makes n -> n + d(n)
#: invertible; 1/2 keeps det J >= 1/8 everywhere.
MAX_GRADIENT = 0.5
_WAVE_RANGE = (0.6, 1.6)  # rad per normalised unit: wavelengths of 4-10 half-axes
_AMPLITUDE_SD = (0.015, 0.015, 0.02)  # normalised units (x, y, z): sub-voxel shape changes


@dataclass(frozen=True)
class CanonicalDisc:
    """Reference dimensions (mm) of one level's canonical disc."""

    half_width: float  # right-left, including the bulge
    half_depth: float  # anterior-posterior, including the bulge
    rim_half_height: float
    concavity: float  # added to the half height at the centre

    def half_height(self, rho: np.ndarray) -> np.ndarray:
        return half_height(rho, self.rim_half_height, self.concavity)

    def embed(self, n: np.ndarray) -> np.ndarray:
        """Normalised (N, 3) -> canonical millimetres (N, 3): atlas-space coordinates."""
        rho = superellipse(n[:, 0], n[:, 1])
        return np.column_stack([n[:, 0] * self.half_width, n[:, 1] * self.half_depth,
                                n[:, 2] * self.half_height(rho)])

    def normalise(self, c: np.ndarray) -> np.ndarray:
        """Inverse of ``embed``: canonical millimetres (N, 3) -> normalised (N, 3)."""
        x, y = c[:, 0] / self.half_width, c[:, 1] / self.half_depth
        return np.column_stack([x, y, c[:, 2] / self.half_height(superellipse(x, y))])

    def extent(self) -> np.ndarray:
        """Half extents (mm) of the bounding box of the canonical disc (x, y, z)."""
        return np.array([self.half_width, self.half_depth,
                         self.rim_half_height + self.concavity])


@dataclass(frozen=True)
class DiscShapes:
    """Smooth displacement fields of all discs of one participant (normalised units)."""

    wave: np.ndarray  # (discs, MODES, 3) wave vectors
    phase: np.ndarray  # (discs, MODES)
    amplitude: np.ndarray  # (discs, MODES, 3)

    def displacement(self, k: np.ndarray, n: np.ndarray) -> np.ndarray:
        """d(n) of disc ``k[i]`` at normalised point ``n[i]`` -> (N, 3)."""
        arg = np.einsum("nmj,nj->nm", self.wave[k], n) + self.phase[k]
        return np.einsum("nm,nmj->nj", np.cos(arg), self.amplitude[k])

    def jacobian(self, k: int, n: np.ndarray) -> np.ndarray:
        """d n' / d n of disc ``k`` at normalised points (N, 3) -> (N, 3, 3)."""
        arg = n @ self.wave[k].T + self.phase[k]
        grad = -np.einsum("nm,mi,mj->nij", np.sin(arg), self.amplitude[k], self.wave[k])
        return np.eye(3) + grad

    def invert(self, k: int, n_prime: np.ndarray, iterations: int = 60) -> np.ndarray:
        """n with n + d(n) = n' (fixed point; converges since d is a contraction)."""
        idx = np.full(len(n_prime), k)
        n = n_prime.copy()
        for _ in range(iterations):
            n = n_prime - self.displacement(idx, n)
        return n


def draw_shapes(rng: np.random.Generator, n_discs: int) -> DiscShapes:
    """Random displacement modes of ``n_discs`` discs, scaled to the gradient bound."""
    direction = rng.normal(size=(n_discs, MODES, 3))
    direction /= np.linalg.norm(direction, axis=2, keepdims=True)
    wave = direction * rng.uniform(*_WAVE_RANGE, (n_discs, MODES, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (n_discs, MODES))
    amplitude = rng.normal(0.0, 1.0, (n_discs, MODES, 3)) * np.array(_AMPLITUDE_SD)
    bound = (np.linalg.norm(amplitude, axis=2) * np.linalg.norm(wave, axis=2)).sum(axis=1)
    amplitude *= np.minimum(1.0, MAX_GRADIENT / bound)[:, None, None]
    return DiscShapes(wave, phase, amplitude)


def superellipse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Normalised in-plane radius (1 on the disc's outline)."""
    return (np.abs(x) ** SUPERELLIPSE + np.abs(y) ** SUPERELLIPSE) ** (1 / SUPERELLIPSE)


def half_height(rho: np.ndarray, rim: np.ndarray | float,
                concavity: np.ndarray | float) -> np.ndarray:
    """Half height at normalised radius ``rho``: concave endplates, thickest at the centre."""
    return rim + concavity * np.clip(1 - rho ** 2, 0, 1)


def normalise(du: np.ndarray, v: np.ndarray, w: np.ndarray, half_width: np.ndarray,
              half_depth: np.ndarray, rim: np.ndarray, concavity: np.ndarray) -> np.ndarray:
    """A subject's disc-local coordinates (mm; ``half_*`` include the bulge) -> normalised."""
    x, y = w / half_width, v / half_depth
    return np.column_stack([x, y, du / half_height(superellipse(x, y), rim, concavity)])


def nucleus_fraction(n: np.ndarray, radius: np.ndarray | float,
                     blur: np.ndarray | float) -> np.ndarray:
    """Smooth nucleus share (1 at the centre, 0 in the annulus) at normalised points."""
    rho_n = np.hypot(n[:, 1] + NUCLEUS_OFFSET, n[:, 0])
    q = np.hypot(rho_n / radius, n[:, 2] / NUCLEUS_HALF_HEIGHT)
    return 1.0 / (1.0 + np.exp((q - 1.0) / blur))
