"""Acquisition protocols per site and the voxel grids (affines) they produce.

Sites cycle through ``PROTOCOLS``. They differ in everything a pipeline must not assume:
voxel size and matrix, echo / spin-lock times (the published sets of METHODS.md), SNR, storage
(float32, or int16 with a non-unit ``scl_slope``) and the orientation of the voxel axes
(RAS-ordered, sagittal-native PSR with det < 0, AIL), with oblique tilts of a few degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spineqprep.synth import labels as lab
from spineqprep.synth.anatomy import Anatomy, rotation_matrix

SIZES = ("small", "medium", "bench")

_DIRECTIONS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0),
               "S": (2, 1.0), "I": (2, -1.0)}
#: Published time sets (seconds), METHODS.md sections 1 and 2.
MAPSS_TSL = (0.0, 0.010, 0.040, 0.080)
MAPSS_T2PREP = (0.0, 0.012, 0.025, 0.051)
FSE_TSL = (0.0, 0.040, 0.080, 0.120)
UTE_TE = (0.000248, 0.0052, 0.0102, 0.0152, 0.0202, 0.0252)
MESE_TE = tuple(round(0.010 * i, 3) for i in range(1, 9))
#: BIDS requires EchoTime > 0, so the MAPSS T2 series stores T2-prep time + this readout echo
#: time as EchoTime (the published prep times go to ``T2PrepTime``); the simulated decay uses
#: the stored EchoTime, so a fit of the files recovers the truth exactly up to noise.
MAPSS_READOUT_TE = 0.0012


@dataclass(frozen=True)
class Grid:
    """A sagittal acquisition grid: in-plane field of view (SI, AP) in mm, slice thickness
    (LR, contiguous slices), matrix (n_SI, n_AP, n_slices) per size, where it is centred
    (``spine`` = L3, ``lumbar`` = the L1L2-L5S1 span, ``ute`` = L5) and its oblique tilt
    (degrees about LR, AP, SI) on top of the site's."""

    fov_mm: tuple[float, float]
    slice_mm: float
    matrix: dict[str, tuple[int, int, int]]
    region: str
    oblique_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Series:
    """One relaxometry series: a file per time point, all on its acquisition's grid."""

    suffix: str  # MESE, MESL or MEGRE
    quantity: str  # T2, T1rho or T2star (a key of tissues.truth_maps)
    times_s: tuple[float, ...]
    snr: float  # of PD = 1 at t = 0 against the noise SD
    metadata: dict[str, Any] = field(default_factory=dict)  # shared by every file
    per_file: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # one value per file


@dataclass(frozen=True)
class Acquisition:
    """Series sharing one ``acq`` label, hence one grid (and one truth segmentation)."""

    acq: str
    grid: Grid
    series: tuple[Series, ...]


@dataclass(frozen=True)
class Structural:
    """Sagittal T1w / T2w: spin-echo weighting PD (1 - exp(-TR/T1)) exp(-TE/T2)."""

    suffix: str
    repetition_time: float
    echo_time: float
    snr: float


@dataclass(frozen=True)
class SiteProtocol:
    name: str
    institution: str
    manufacturer: str
    model: str
    field_strength: float
    axcodes: str  # direction of increasing array index per axis, e.g. "PSR"
    oblique_deg: tuple[float, float, float]
    storage: str  # "float32" or "int16"
    gain: float  # signal of PD = 1 at t = 0
    structural_grid: Grid
    structurals: tuple[Structural, ...]
    acquisitions: tuple[Acquisition, ...]
    scl_slope: float = 1.0  # int16 storage only

    def common_metadata(self, grid: Grid) -> dict[str, Any]:
        return {"MagneticFieldStrength": self.field_strength, "Manufacturer": self.manufacturer,
                "ManufacturersModelName": self.model, "InstitutionName": self.institution,
                "SliceThickness": grid.slice_mm}


def _sizes(small: tuple[int, int, int], medium: tuple[int, int, int],
           bench: tuple[int, int, int]) -> dict[str, tuple[int, int, int]]:
    return dict(zip(SIZES, (small, medium, bench), strict=True))


def _structurals(snr: float) -> tuple[Structural, ...]:
    return (Structural("T1w", 0.600, 0.010, snr), Structural("T2w", 3.500, 0.095, snr))


def _mapss(fov: tuple[float, float], slice_mm: float, matrix: dict, snr: float) -> Acquisition:
    return Acquisition("mapss", Grid(fov, slice_mm, matrix, "lumbar"), (
        Series("MESL", "T1rho", MAPSS_TSL, snr,
               {"SpinLockFrequency": 300.0, "RepetitionTime": 0.0057,
                "EchoTime": MAPSS_READOUT_TE, "FlipAngle": 12, "MRAcquisitionType": "3D"}),
        Series("MESE", "T2", tuple(round(t + MAPSS_READOUT_TE, 6) for t in MAPSS_T2PREP), snr,
               {"RepetitionTime": 0.0057, "FlipAngle": 12, "MRAcquisitionType": "3D"},
               {"T2PrepTime": MAPSS_T2PREP}),
    ))


def _ute(matrix: dict, snr: float) -> Acquisition:
    return Acquisition("ute", Grid((64.0, 64.0), 3.0, matrix, "ute"), (
        Series("MEGRE", "T2star", UTE_TE, snr,
               {"RepetitionTime": 0.032, "FlipAngle": 17, "MRAcquisitionType": "3D"}),))


PROTOCOLS: tuple[SiteProtocol, ...] = (
    SiteProtocol(
        name="A", institution="Synthetic site A", manufacturer="GE",
        model="Discovery MR750", field_strength=3.0, axcodes="RAS", oblique_deg=(3.0, 0.0, 0.0),
        storage="float32", gain=1000.0,
        structural_grid=Grid((300.0, 300.0), 4.0, _sizes((96, 96, 11), (224, 224, 15),
                                                         (384, 384, 19)), "spine"),
        structurals=_structurals(60.0),
        acquisitions=(
            _mapss((200.0, 180.0), 4.0, _sizes((64, 56, 10), (128, 112, 14), (256, 224, 20)),
                   70.0),
            _ute(_sizes((80, 80, 8), (128, 128, 12), (128, 128, 24)), 45.0),
        )),
    SiteProtocol(
        name="B", institution="Synthetic site B", manufacturer="Siemens",
        model="MAGNETOM Skyra", field_strength=3.0, axcodes="PSR", oblique_deg=(-5.0, 2.0, 0.0),
        storage="int16", gain=2000.0, scl_slope=0.25,
        structural_grid=Grid((320.0, 320.0), 4.0, _sizes((96, 96, 11), (224, 224, 15),
                                                         (384, 384, 19)), "spine"),
        structurals=_structurals(60.0),
        acquisitions=(
            Acquisition("fse", Grid((220.0, 165.0), 5.0, _sizes(
                (64, 48, 8), (128, 96, 12), (256, 192, 16)), "lumbar"), (
                Series("MESL", "T1rho", FSE_TSL, 70.0,
                       {"SpinLockFrequency": 500.0, "RepetitionTime": 2.0, "EchoTime": 0.012,
                        "MRAcquisitionType": "2D"}),)),
            Acquisition("mese", Grid((220.0, 180.0), 4.0, _sizes(
                (64, 52, 10), (128, 104, 14), (256, 208, 20)), "lumbar", (0.0, 0.0, 1.5)), (
                Series("MESE", "T2", MESE_TE, 65.0,
                       {"RepetitionTime": 2.0, "MRAcquisitionType": "2D"}),)),
            _ute(_sizes((72, 72, 8), (128, 128, 12), (128, 128, 24)), 40.0),
        )),
    SiteProtocol(
        name="C", institution="Synthetic site C", manufacturer="Philips",
        model="Ingenia", field_strength=1.5, axcodes="AIL", oblique_deg=(4.0, 0.0, -3.0),
        storage="float32", gain=800.0,
        structural_grid=Grid((280.0, 280.0), 4.5, _sizes((96, 96, 10), (224, 224, 14),
                                                         (384, 384, 18)), "spine"),
        structurals=_structurals(45.0),
        acquisitions=(
            _mapss((180.0, 180.0), 5.0, _sizes((56, 56, 9), (112, 112, 12), (224, 224, 18)),
                   60.0),
            _ute(_sizes((88, 88, 8), (128, 128, 12), (128, 128, 24)), 40.0),
        )),
)


def site_protocol(site_index: int) -> SiteProtocol:
    """The protocol of site ``site_index`` (0-based): the table repeats for more sites."""
    return PROTOCOLS[site_index % len(PROTOCOLS)]


def site_label(site_index: int) -> str:
    """``A``, ``B``, ``C``, then ``A2``, ``B2`` ... when the table repeats."""
    cycle, pos = divmod(site_index, len(PROTOCOLS))
    return PROTOCOLS[pos].name + (str(cycle + 1) if cycle else "")


def region_centre(anat: Anatomy, region: str) -> np.ndarray:
    """World position a grid of ``region`` is centred on."""
    if region == "spine":
        return anat.vertebra_centre(lab.VERTEBRAE.index("L3"))
    if region == "ute":
        return anat.vertebra_centre(lab.VERTEBRAE.index("L5"))
    top, bottom = lab.DISCS.index("L1L2"), lab.DISCS.index("L5S1")
    u = (anat.disc_u[top] + anat.disc_u[bottom]) / 2
    return anat.world(np.array([u]), np.array([-20.0]), np.zeros(1))[0]


def grid_affine(grid: Grid, site: SiteProtocol, size: str, centre: np.ndarray,
                tilt_deg: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine (voxel -> world mm) and shape of ``grid`` at ``site``, centred on ``centre``,
    with the site's and the grid's oblique angles plus ``tilt_deg`` (per-exam jitter)."""
    n_si, n_ap, n_lr = grid.matrix[size]
    spacing = (grid.slice_mm, grid.fov_mm[1] / n_ap, grid.fov_mm[0] / n_si)  # LR, AP, SI
    counts = (n_lr, n_ap, n_si)
    rot = rotation_matrix(*(np.add(site.oblique_deg, grid.oblique_deg) + tilt_deg))
    columns, shape = [], []
    for code in site.axcodes:
        axis, sign = _DIRECTIONS[code]
        columns.append(rot[:, axis] * sign * spacing[axis])
        shape.append(counts[axis])
    matrix = np.stack(columns, axis=1)
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = centre - matrix @ ((np.array(shape) - 1) / 2.0)
    return affine, (shape[0], shape[1], shape[2])
