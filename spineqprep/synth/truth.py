"""Per-disc truth of one visit, measured on fine grids of the continuous model.

The ``discs.tsv`` values do not depend on any acquisition grid: nucleus / disc means are taken
on a 0.5 x 1 x 1 mm grid aligned with each disc, the central nucleus T1rho (the quantity that
defines the degeneration phase, METHODS 4) on a 0.25 mm grid of the mid-sagittal plane.
``atlas_maps`` gives the true maps of a disc in atlas space: atlas coordinates are the level's
canonical disc coordinates (``discs``), so every atlas voxel takes the disc's pattern there.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from spineqprep.synth import discs as dsc
from spineqprep.synth import labels as lab
from spineqprep.synth import tissues
from spineqprep.synth.anatomy import Anatomy, canonical_disc
from spineqprep.synth.cohort import Visit

_STEP = (0.5, 1.0, 1.0)  # along the disc axis, anterior, right (mm)
_CENTRE_STEP = 0.25
_CENTRE_AREA = 100.0  # mm^2: "a 1 cm^2 region at the centre of the nucleus"


def sample_points(anat: Anatomy, points: np.ndarray, discs: tuple[tissues.DiscTissue, ...],
                  chunk: int = 400_000, footprint_mm: float = 0.0
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Detailed labels and truth maps at world ``points`` (N, 3), in chunks to bound memory.

    ``footprint_mm``: the voxel size the points stand for; the PD map is the voxel's
    effective proton density (its cortical-bone share gives no signal, ``Anatomy.evaluate``),
    so an image made from these maps shows the bone's partial volume while every relaxation
    time stays the tissue's own; ``maps["PDscale"]`` is that non-bone share."""
    labels = np.empty(len(points), np.int16)
    maps = {q: np.empty(len(points), np.float32) for q in (*tissues.QUANTITIES, "PDscale")}
    for start in range(0, len(points), chunk):
        part = slice(start, start + chunk)
        s = anat.evaluate(points[part], footprint_mm)
        labels[part] = s.labels
        for q, values in tissues.truth_maps(s.labels, s.nucleus_fraction, s.texture,
                                            discs).items():
            maps[q][part] = values * s.pd_scale if q == "PD" else values
        maps["PDscale"][part] = s.pd_scale
    return labels, maps


def _disc_box(anat: Anatomy, k: int) -> tuple[np.ndarray, float]:
    """World points of a box aligned with disc ``k`` and the volume of one point (mm^3)."""
    frame = anat.frame(float(anat.disc_u[k]))
    av = float(np.interp(anat.disc_u[k], anat.vert_u[::-1], anat.vert_half_depth[::-1]))
    aw = float(np.interp(anat.disc_u[k], anat.vert_u[::-1], anat.vert_half_width[::-1]))
    extent = (anat.disc_height(k) / 2 + max(anat.cep_superior_mm[k], anat.cep_inferior_mm[k])
              + 1.5, 1.15 * av * anat.disc_bulge[k], 1.15 * aw * anat.disc_bulge[k])
    axes = [np.arange(-e, e + 1e-9, s) for e, s in zip(extent, _STEP, strict=True)]
    a, b, c = (g.ravel() for g in np.meshgrid(*axes, indexing="ij"))
    points = anat.disc_centre(k) + np.outer(a, frame[0]) + np.outer(b, frame[1]) + np.outer(
        c, frame[2])
    return points, float(np.prod(_STEP))


def _centre_points(anat: Anatomy, k: int, disc: tissues.DiscTissue) -> np.ndarray:
    """Mid-sagittal points of an ellipse of at most 1 cm^2 at the nucleus centre, inside the
    inner half of the nucleus (degenerated nuclei are smaller than 1 cm^2)."""
    frame = anat.frame(float(anat.disc_u[k]))
    av = float(np.interp(anat.disc_u[k], anat.vert_u[::-1], anat.vert_half_depth[::-1]))
    half_u = 0.5 * 0.8 * anat.disc_height(k) / 2
    half_v = 0.5 * disc.nucleus_radius * av * anat.disc_bulge[k]
    shrink = min(1.0, np.sqrt(_CENTRE_AREA / (np.pi * half_u * half_v)))
    half_u, half_v = half_u * shrink, half_v * shrink
    grid = np.arange(-max(half_u, half_v), max(half_u, half_v) + 1e-9, _CENTRE_STEP)
    a, b = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))
    keep = (a / half_u) ** 2 + (b / half_v) ** 2 <= 1
    centre = anat.disc_centre(k) + frame[1] * anat.nucleus_centre_v(k)
    return centre + np.outer(a[keep], frame[0]) + np.outer(b[keep], frame[1])


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(values[mask].mean()) if mask.any() else None


def disc_rows(anat: Anatomy, visit: Visit) -> list[dict[str, Any]]:
    """One row per schema disc level: grades, phase, geometry and truth means (seconds)."""
    rows = []
    for name in lab.SCHEMA_DISCS:
        k = lab.DISCS.index(name)
        disc = visit.discs[k]
        points, voxel = _disc_box(anat, k)
        labels, maps = sample_points(anat, points, visit.discs)
        nucleus, annulus = labels == lab.nucleus(k), labels == lab.annulus(k)
        whole = nucleus | annulus
        sup, inf = labels == lab.cep_superior(k), labels == lab.cep_inferior(k)
        c_labels, c_maps = sample_points(anat, _centre_points(anat, k, disc), visit.discs)
        centre = float(c_maps["T1rho"][c_labels == lab.nucleus(k)].mean())
        rows.append({
            "level": name,
            "pfirrmann": tissues.PFIRRMANN_OF_MODIFIED[disc.modified_pfirrmann - 1],
            "modified_pfirrmann": disc.modified_pfirrmann,
            "t1rho_phase": tissues.t1rho_phase(centre),
            "disc_height_mm": anat.disc_height(k),
            "disc_volume_mm3": float(whole.sum() * voxel),
            "nucleus_volume_mm3": float(nucleus.sum() * voxel),
            "nucleus_t1rho": disc.t1rho_np,
            "nucleus_t2": disc.t2_np,
            "nucleus_t1rho_center": centre,
            "nucleus_t1rho_mean": _mean(maps["T1rho"], nucleus),
            "nucleus_t2_mean": _mean(maps["T2"], nucleus),
            "nucleus_t2star_mean": _mean(maps["T2star"], nucleus),
            "annulus_t1rho_mean": _mean(maps["T1rho"], annulus),
            "annulus_t2_mean": _mean(maps["T2"], annulus),
            "disc_t1rho_mean": _mean(maps["T1rho"], whole),
            "disc_t2_mean": _mean(maps["T2"], whole),
            "cep_sup_t2star": disc.cep_t2star_sup,
            "cep_inf_t2star": disc.cep_t2star_inf,
            "cep_sup_t2star_mean": _mean(maps["T2star"], sup),
            "cep_inf_t2star_mean": _mean(maps["T2star"], inf),
            "cep_sup_thickness_mm": float(anat.cep_superior_mm[k]),
            "cep_inf_thickness_mm": float(anat.cep_inferior_mm[k]),
        })
    return rows


def atlas_maps(anat: Anatomy, visit: Visit, k: int, atlas_mask: nib.Nifti1Image,
               scale: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, np.ndarray]:
    """True T1, T2, T1rho, T2* (s) and PD of disc ``k`` on its atlas grid, NaN outside the
    atlas disc: the nucleus-annulus pattern and texture at each voxel's canonical coordinates
    (atlas millimetres / ``scale``; extended smoothly wherever the atlas disc overhangs the
    canonical one)."""
    inside = np.asarray(atlas_mask.dataobj) > 0.5
    ijk = np.argwhere(inside)
    c = (ijk @ atlas_mask.affine[:3, :3].T + atlas_mask.affine[:3, 3]) / np.asarray(scale)
    n = canonical_disc(k).normalise(c)
    frac = dsc.nucleus_fraction(n, anat.nucleus_radius[k], anat.nucleus_blur[k])
    labels = np.where(frac >= 0.5, lab.nucleus(k), lab.annulus(k)).astype(np.int16)
    tex = anat.disc_texture(np.full(len(n), k), n)
    out = {}
    for q, values in tissues.truth_maps(labels, frac.astype(np.float32), tex,
                                        visit.discs).items():
        full = np.full(inside.shape, np.nan, np.float32)
        full[inside] = values
        out[q] = full
    return out
