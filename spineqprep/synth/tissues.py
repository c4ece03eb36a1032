"""Tissue properties of the synthetic spine: relaxation times, proton density, texture.

All times are in seconds, proton density (PD) is relative to water (1.0). Values are 3 T-like
literature figures chosen so that the weighted images show the usual contrasts (fatty marrow
bright on T1w, healthy nucleus bright on T2w, Modic type 1 T1-hypo/T2-hyper, type 2 T1-hyper/
T2-iso-hyper, type 3 hypo on both). The truth does not depend on field strength or spin-lock
frequency: differences between sites are purely acquisition (grid, times, noise, storage).

Disc values are driven by the modified Pfirrmann grade (1-8), which drives nucleus T2/T1rho,
proton density, disc height and how sharp the nucleus-annulus boundary is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spineqprep.synth import labels as lab

QUANTITIES = ("T1", "T2", "T1rho", "T2star", "PD")

#: Tissue classes with fixed properties: (T1, T2, T1rho, T2*, PD, relative texture amplitude).
_CLASS_VALUES: dict[str, tuple[float, float, float, float, float, float]] = {
    "background": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "soft": (1.20, 0.045, 0.050, 0.030, 0.70, 0.08),
    "fat": (0.38, 0.090, 0.070, 0.030, 0.95, 0.03),
    "muscle": (1.40, 0.035, 0.040, 0.025, 0.75, 0.05),
    "csf": (4.00, 1.000, 1.000, 0.300, 1.00, 0.01),
    "posterior": (0.50, 0.055, 0.045, 0.007, 0.75, 0.08),
    "marrow": (0.55, 0.060, 0.045, 0.008, 0.85, 0.08),
    "mc1": (1.10, 0.100, 0.080, 0.015, 0.95, 0.10),  # oedema: T1 hypo, T2 hyper
    "mc2": (0.35, 0.075, 0.060, 0.010, 0.95, 0.10),  # fat: T1 hyper, T2 iso-hyper
    "mc3": (0.90, 0.045, 0.030, 0.005, 0.45, 0.10),  # sclerosis: hypo on both
    "cep": (0.80, 0.025, 0.030, 0.0189, 1.00, 0.05),  # T2* per endplate; bright on UTE
}
_NUCLEUS_TEXTURE = 0.04
_ANNULUS_TEXTURE = 0.06

#: Nucleus T1rho (ms) at the nucleus centre by modified Pfirrmann grade 1-8. With the METHODS 4
#: thresholds (> 110 ms phase 1, 80-110 phase 2, < 80 phase 3): grades 1-3 -> phase 1,
#: 4-6 -> phase 2, 7-8 -> phase 3 (up to the per-disc scatter).
NUCLEUS_T1RHO_MS = (140.0, 128.0, 117.0, 104.0, 93.0, 84.0, 72.0, 62.0)
#: Nucleus T2 (ms) at age 45 by modified Pfirrmann grade 1-8.
NUCLEUS_T2_MS = (125.0, 115.0, 103.0, 92.0, 80.0, 70.0, 60.0, 52.0)
#: Planted age effect on nucleus T2 at a fixed grade (ms per year, centred at 45 years).
T2_AGE_SLOPE_MS = -0.3
T2_AGE_CENTRE = 45.0
#: Per-disc scatter (SD, ms) of the nucleus T1rho and T2 around the grade tables.
DISC_SCATTER_MS = 4.0
#: Cartilage endplate T2* (ms): 21 - 1.0 x (Pfirrmann - 1) + N(0, 4.2), clipped to the
#: published range 6.8-32.0 ms (population mean about 18.9 +- 4.7 ms, METHODS 2).
CEP_T2STAR_MS = {"intercept": 21.0, "slope_per_pfirrmann": -1.0, "sd": 4.2,
                 "min": 6.8, "max": 32.0}
#: Modified Pfirrmann (1-8) -> Pfirrmann (1-5).
PFIRRMANN_OF_MODIFIED = (1, 2, 3, 3, 4, 4, 5, 5)
#: Disc height relative to the healthy height: 1 - 0.065 (modified grade - 1).
HEIGHT_LOSS_PER_GRADE = 0.065


@dataclass(frozen=True)
class DiscTissue:
    """Model values of one disc (seconds; PD relative): nucleus centre, annulus, endplates."""

    modified_pfirrmann: int
    t1rho_np: float
    t2_np: float
    cep_t2star_sup: float
    cep_t2star_inf: float

    @property
    def degeneration(self) -> float:
        """0 (modified grade 1) .. 1 (grade 8)."""
        return (self.modified_pfirrmann - 1) / 7.0

    @property
    def t2_af(self) -> float:
        return 0.052 - 0.0015 * (self.modified_pfirrmann - 1)

    @property
    def t1rho_af(self) -> float:
        return 0.062 - 0.0015 * (self.modified_pfirrmann - 1)

    @property
    def t2star_np(self) -> float:
        return 0.45 * self.t2_np

    @property
    def t2star_af(self) -> float:
        return 0.014

    @property
    def pd_np(self) -> float:
        return 0.88 - 0.035 * (self.modified_pfirrmann - 1)

    @property
    def pd_af(self) -> float:
        return 0.70 - 0.008 * (self.modified_pfirrmann - 1)

    @property
    def t1_np(self) -> float:
        return 1.25 - 0.05 * (self.modified_pfirrmann - 1)

    @property
    def t1_af(self) -> float:
        return 0.90

    @property
    def height_factor(self) -> float:
        return 1.0 - HEIGHT_LOSS_PER_GRADE * (self.modified_pfirrmann - 1)

    @property
    def nucleus_radius(self) -> float:
        """Nucleus size as a fraction of the disc (shrinks with degeneration)."""
        return 0.62 - 0.02 * (self.modified_pfirrmann - 1)

    @property
    def nucleus_blur(self) -> float:
        """Width of the nucleus-annulus transition (blurs with degeneration)."""
        return 0.10 + 0.025 * (self.modified_pfirrmann - 1)


def t1rho_phase(t1rho_s: float, thresholds_s: tuple[float, float] = (0.080, 0.110)) -> int:
    """Degeneration phase of a central nucleus T1rho (METHODS 4): 1 > 110 ms, 2 80-110 ms,
    3 < 80 ms."""
    low, high = thresholds_s
    return 1 if t1rho_s > high else (2 if t1rho_s >= low else 3)


def _class_tables() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-label lookup arrays of every quantity and of the texture amplitude."""
    size = lab.MAX_LABEL + 1
    tables = {q: np.zeros(size, np.float64) for q in QUANTITIES}
    amp = np.zeros(size, np.float64)
    for index, tissue in lab.tissue_classes().items():
        if tissue not in _CLASS_VALUES:
            continue
        values = _CLASS_VALUES[tissue]
        for q, value in zip(QUANTITIES, values[:5], strict=True):
            tables[q][index] = value
        amp[index] = values[5]
    return tables, amp


_TABLES, _AMPLITUDE = _class_tables()


def truth_maps(labels: np.ndarray, nucleus_fraction: np.ndarray, texture: np.ndarray,
               discs: tuple[DiscTissue, ...]) -> dict[str, np.ndarray]:
    """Per-point T1, T2, T1rho, T2* (s) and PD from the detailed labels.

    Fixed tissues take their class value; discs mix nucleus and annulus values with the smooth
    ``nucleus_fraction``; endplates take their disc's T2*. Everything is then modulated by the
    small smooth ``texture`` field (unit SD), relaxation times by the tissue's amplitude and PD
    by half of it. Background (air) is 0 everywhere.
    """
    out = {q: _TABLES[q][labels] for q in QUANTITIES}
    for k, disc in enumerate(discs):
        in_disc = (labels == lab.nucleus(k)) | (labels == lab.annulus(k))
        if in_disc.any():
            f = nucleus_fraction[in_disc]
            for q, np_value, af_value in (
                    ("T1", disc.t1_np, disc.t1_af), ("T2", disc.t2_np, disc.t2_af),
                    ("T1rho", disc.t1rho_np, disc.t1rho_af),
                    ("T2star", disc.t2star_np, disc.t2star_af), ("PD", disc.pd_np, disc.pd_af)):
                out[q][in_disc] = af_value + (np_value - af_value) * f
        out["T2star"][labels == lab.cep_superior(k)] = disc.cep_t2star_sup
        out["T2star"][labels == lab.cep_inferior(k)] = disc.cep_t2star_inf
    amp = _AMPLITUDE[labels]
    disc_mask = lab.is_disc(labels)
    amp[disc_mask] = _ANNULUS_TEXTURE + (_NUCLEUS_TEXTURE - _ANNULUS_TEXTURE) * nucleus_fraction[
        disc_mask]
    modulation = 1.0 + amp * np.clip(texture, -3.0, 3.0)
    for q in ("T1", "T2", "T1rho", "T2star"):
        out[q] = (out[q] * modulation).astype(np.float32)
    out["PD"] = (out["PD"] * (1.0 + 0.5 * (modulation - 1.0))).astype(np.float32)
    return out
