"""The synthetic cohort: participants, visits, disc grades, Modic lesions, clinical scores.

Everything a table says is drawn here, before any image exists, with the planted associations
of ``PLANTED_EFFECTS`` (also written to the truth dataset as ``planted_effects.json``), so that
group statistics computed later from the images can be checked against known effects.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from spineqprep.synth import labels as lab
from spineqprep.synth import tissues

#: Level effect on the latent degeneration (T11T12 .. L5S1): lower levels degenerate more.
_LEVEL_EFFECT = (-0.9, -0.8, -0.6, -0.4, -0.1, 0.5, 0.6)
_ODI = {"intercept": 28.0, "slope_per_ms": -0.5, "reference_ms": 100.0, "patient": 12.0,
        "sd": 6.0}
_VAS = {"slope_per_odi": 0.08, "sd": 0.8}
_FAT = {"intercept_mm": 6.0, "slope_per_bmi": 1.5, "reference_bmi": 20.0, "min_mm": 3.0}
_LONGITUDINAL = {"level": "L4L5", "months_between_sessions": 12, "grade_step": 1,
                 "progressor_probability": 0.5, "odi_change_sd": 3.0}
#: Modic lesion probability per disc level (both adjacent vertebrae are candidates).
_MODIC = {"base": 0.05, "lower_levels": 0.15, "degenerated": 0.15, "kissing": 0.4}

PLANTED_EFFECTS: dict[str, dict] = {
    "odi_vs_nucleus_t1rho_L4L5": {
        "description": "Oswestry Disability Index against the nucleus T1rho at L4L5 (model "
                       "value at the nucleus centre, discs.tsv column nucleus_t1rho, in ms).",
        "formula": "odi = clip(round(28 - 0.5 * (t1rho_ms - 100) + 12 * [group == patient] "
                   "+ N(0, 6)), 0, 100)",
        "y": "participants.tsv:odi (sessions.tsv:odi at follow-up)",
        "x": "discs.tsv:nucleus_t1rho (level L4L5) x 1000",
        "slope_per_ms": _ODI["slope_per_ms"], "group_effect": _ODI["patient"],
        "residual_sd": _ODI["sd"],
    },
    "vas_vs_odi": {
        "description": "Back-pain VAS follows ODI.",
        "formula": "vas = clip(round(0.08 * odi + N(0, 0.8), 1), 0, 10)",
        "slope": _VAS["slope_per_odi"], "residual_sd": _VAS["sd"],
    },
    "nucleus_t2_vs_age": {
        "description": "At a fixed modified Pfirrmann grade, nucleus T2 falls with age.",
        "formula": "t2_ms = NUCLEUS_T2_MS[grade] - 0.3 * (age - 45) + N(0, 4)",
        "y": "discs.tsv:nucleus_t2 x 1000", "x": "participants.tsv:age (+ months / 12)",
        "slope_ms_per_year": tissues.T2_AGE_SLOPE_MS, "residual_sd": tissues.DISC_SCATTER_MS,
        "grade_table_ms": list(tissues.NUCLEUS_T2_MS),
    },
    "nucleus_t1rho_vs_grade": {
        "description": "Nucleus T1rho by modified Pfirrmann grade 1-8 (phase 1 > 110 ms, "
                       "phase 2 80-110 ms, phase 3 < 80 ms).",
        "formula": "t1rho_ms = NUCLEUS_T1RHO_MS[grade] + N(0, 4)",
        "grade_table_ms": list(tissues.NUCLEUS_T1RHO_MS), "residual_sd": tissues.DISC_SCATTER_MS,
    },
    "disc_height_vs_grade": {
        "description": "Disc height relative to the subject's healthy height.",
        "formula": "height = healthy_height * (1 - 0.065 * (modified_pfirrmann - 1))",
        "loss_per_grade": tissues.HEIGHT_LOSS_PER_GRADE,
    },
    "cep_t2star_vs_pfirrmann": {
        "description": "Cartilage endplate T2* (both endplates of a disc) against the disc's "
                       "Pfirrmann grade.",
        "formula": "t2star_ms = clip(21 - 1.0 * (pfirrmann - 1) + N(0, 4.2), 6.8, 32.0)",
        "slope_ms_per_grade": tissues.CEP_T2STAR_MS["slope_per_pfirrmann"],
    },
    "degeneration": {
        "description": "Latent degeneration of each disc; modified grade = 1 + round(7 * "
                       "sigmoid(z)), Pfirrmann from the modified grade (1,2,3,3,4,4,5,5).",
        "formula": "z = -1.6 + 0.06 * (age - 45) + level_effect + 0.9 * [patient] "
                   "+ N(0, 0.6) per subject + N(0, 0.6) per disc",
        "level_effect": dict(zip(lab.DISCS, _LEVEL_EFFECT, strict=True)),
        "patient_effect": 0.9, "age_effect_per_year": 0.06,
    },
    "fat_vs_bmi": {
        "description": "Subcutaneous fat thickness in the images grows with BMI.",
        "formula": "fat_mm = max(3, 6 + 1.5 * (bmi - 20))",
        "slope_mm_per_bmi": _FAT["slope_per_bmi"],
    },
    "longitudinal": {
        "description": "With several sessions, progressors lose one modified Pfirrmann grade "
                       "per session at L4L5; their ODI changes by the same slope times the "
                       "change in nucleus T1rho, plus N(0, 3).",
        **_LONGITUDINAL,
    },
    "site": {"description": "No effect of site on the truth: site differences are acquisition "
                            "only (grid, orientation, times, noise, storage)."},
}


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent generator per (seed, purpose, subject ...): results never depend on the
    order things are generated in (strings hashed with CRC32, stable across runs)."""
    words = [int(seed) & 0xFFFFFFFF]
    words += [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(words)


@dataclass(frozen=True)
class Lesion:
    """A Modic lesion: in vertebra ``VERTEBRAE[vertebra]``, next to disc ``DISCS[disc]``."""

    vertebra: int
    disc: int
    modic_type: int
    depth_mm: float
    ap_extent_mm: float
    lr_extent_mm: float
    ap_offset: float  # centre, as a fraction of the vertebra's AP half-depth (+ anterior)

    @property
    def half(self) -> str:
        """The half of the vertebra it lies in (``upper`` when the disc is below)."""
        return "upper" if self.vertebra == self.disc + 1 else "lower"


@dataclass(frozen=True)
class Visit:
    """One session of one participant."""

    session: str | None
    months: int
    age: float
    odi: float
    vas: float
    discs: tuple[tissues.DiscTissue, ...]


@dataclass(frozen=True)
class Participant:
    """One synthetic participant and everything drawn about them."""

    index: int
    label: str
    site_index: int
    sex: str
    age: int
    bmi: float
    group: str
    progressor: bool
    visits: tuple[Visit, ...]
    lesions: tuple[Lesion, ...]
    missing: frozenset[str]  # participants.tsv columns reported as n/a

    @property
    def fat_mm(self) -> float:
        return max(_FAT["min_mm"], _FAT["intercept_mm"]
                   + _FAT["slope_per_bmi"] * (self.bmi - _FAT["reference_bmi"]))


def modified_to_pfirrmann(grade: int) -> int:
    return tissues.PFIRRMANN_OF_MODIFIED[grade - 1]


def _disc(grade: int, age: float, t1rho_noise: float, t2_noise: float,
          cep_noise: tuple[float, float]) -> tissues.DiscTissue:
    """Model values of one disc from its grade, the age and its fixed scatter terms."""
    t1rho = tissues.NUCLEUS_T1RHO_MS[grade - 1] + t1rho_noise
    t2 = (tissues.NUCLEUS_T2_MS[grade - 1]
          + tissues.T2_AGE_SLOPE_MS * (age - tissues.T2_AGE_CENTRE) + t2_noise)
    c = tissues.CEP_T2STAR_MS
    pf = modified_to_pfirrmann(grade)
    cep = [float(np.clip(c["intercept"] + c["slope_per_pfirrmann"] * (pf - 1) + n,
                         c["min"], c["max"])) for n in cep_noise]
    return tissues.DiscTissue(grade, t1rho / 1000.0, t2 / 1000.0, cep[0] / 1000.0,
                              cep[1] / 1000.0)


def _odi(t1rho_l4l5_s: float, patient: bool, noise: float) -> float:
    value = (_ODI["intercept"] + _ODI["slope_per_ms"] * (t1rho_l4l5_s * 1000 - _ODI["reference_ms"])
             + _ODI["patient"] * patient + noise)
    return float(np.clip(np.round(value), 0, 100))


def _vas(odi: float, noise: float) -> float:
    return float(np.clip(np.round(_VAS["slope_per_odi"] * odi + noise, 1), 0, 10))


def sample_participant(index: int, n_participants: int, n_sites: int, n_sessions: int,
                       seed: int) -> Participant:
    """Draw one participant (independent of the others except for its index)."""
    rng = rng_for(seed, "participant", index)
    group = ("control", "patient")[(index // 2) % 2]
    patient = group == "patient"
    sex = "M" if rng.random() < 0.5 else "F"
    age = int(np.clip(round(rng.normal(48 if patient else 40, 10)), 20, 80))
    bmi = float(np.clip(round(rng.normal(26, 4), 1), 17, 45))
    subject_effect = rng.normal(0, 0.6)
    z = (-1.6 + 0.06 * (age - 45) + np.array(_LEVEL_EFFECT) + 0.9 * patient + subject_effect
         + rng.normal(0, 0.6, len(lab.DISCS)))
    grades = np.clip(1 + np.round(7 / (1 + np.exp(-z))), 1, 8).astype(int)
    t1rho_noise = rng.normal(0, tissues.DISC_SCATTER_MS, len(lab.DISCS))
    t2_noise = rng.normal(0, tissues.DISC_SCATTER_MS, len(lab.DISCS))
    cep_noise = rng.normal(0, tissues.CEP_T2STAR_MS["sd"], (len(lab.DISCS), 2))
    progressor = n_sessions > 1 and (index == 0 or rng.random() < 0.5)
    odi_noise = rng.normal(0, _ODI["sd"])
    level = lab.DISCS.index(_LONGITUDINAL["level"])

    visits = []
    for s in range(n_sessions):
        months = s * _LONGITUDINAL["months_between_sessions"]
        visit_age = age + months / 12.0
        g = grades.copy()
        if progressor:
            g[level] = min(8, g[level] + s * _LONGITUDINAL["grade_step"])
        discs = tuple(_disc(int(g[k]), visit_age, t1rho_noise[k], t2_noise[k],
                            (cep_noise[k, 0], cep_noise[k, 1])) for k in range(len(lab.DISCS)))
        if s == 0:
            odi = _odi(discs[level].t1rho_np, patient, odi_noise)
        else:
            change = _ODI["slope_per_ms"] * 1000 * (discs[level].t1rho_np
                                                    - visits[0].discs[level].t1rho_np)
            odi = float(np.clip(np.round(visits[0].odi + change
                                         + rng.normal(0, _LONGITUDINAL["odi_change_sd"])), 0, 100))
        vas = _vas(odi, rng.normal(0, _VAS["sd"]))
        visits.append(Visit(f"{s + 1:02d}" if n_sessions > 1 else None, months, visit_age,
                            odi, vas, discs))

    missing = set()
    if rng.random() < 0.05:
        missing.add("bmi")
    if rng.random() < 0.05:
        missing.add("odi")
    if rng.random() < 0.08 or (n_participants >= 3 and index == n_participants - 1):
        missing.add("vas")
    return Participant(index, f"{index + 1:02d}" if n_participants < 100 else f"{index + 1:03d}",
                       index % n_sites, sex, age, bmi, group, progressor, tuple(visits), (),
                       frozenset(missing))


def _lesion_sites(p: Participant, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(vertebra, disc) pairs with a Modic lesion in this participant."""
    grades = [d.modified_pfirrmann for d in p.visits[0].discs]
    found = []
    for k in (lab.DISCS.index(name) for name in lab.SCHEMA_DISCS):
        prob = (_MODIC["base"] + _MODIC["lower_levels"] * (lab.DISCS[k] in ("L4L5", "L5S1"))
                + _MODIC["degenerated"] * (grades[k] >= 5))
        if rng.random() < prob:
            kissing = rng.random() < _MODIC["kissing"]
            sides = [k, k + 1] if kissing else [k + int(rng.random() < 0.5)]
            found += [(j, k) for j in sides]
    return found


def sample_cohort(n_participants: int, n_sites: int, n_sessions: int,
                  seed: int) -> tuple[Participant, ...]:
    """All participants. Modic types cycle 1, 2, 3 over the lesions of the cohort, and there
    are at least ``min(3, n_participants)`` lesions (added at the more degenerated of L4L5 and
    L5S1 of participants without one), so small datasets show every type."""
    people = [sample_participant(i, n_participants, n_sites, n_sessions, seed)
              for i in range(n_participants)]
    rng = rng_for(seed, "modic")
    sites = [_lesion_sites(p, rng) for p in people]
    for i, p in enumerate(people):
        if sum(map(len, sites)) >= min(3, n_participants):
            break
        if not sites[i]:
            grades = [d.modified_pfirrmann for d in p.visits[0].discs]
            k = lab.DISCS.index("L4L5")
            k += int(grades[k + 1] > grades[k])
            sites[i] = [(k + 1, k)]
    counter = 0
    out = []
    for p, found in zip(people, sites, strict=True):
        lesions = []
        for j, k in found:
            lesions.append(Lesion(j, k, counter % 3 + 1, float(rng.uniform(6, 11)),
                                  float(rng.uniform(8, 14)), float(rng.uniform(10, 16)),
                                  float(rng.uniform(-0.4, 0.4))))
            counter += 1
        out.append(Participant(p.index, p.label, p.site_index, p.sex, p.age, p.bmi, p.group,
                               p.progressor, p.visits, tuple(lesions), p.missing))
    return tuple(out)
