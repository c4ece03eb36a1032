"""All discs of one acquisition grid into atlas space: register, warp, fit, assess.

METHODS.md section 1: every disc of the segmentation is registered to its level's atlas disc
(``register_disc``); every echo / spin-lock image of each series on that grid is warped into
atlas space and fitted there (``warp="echoes"``, as published), and/or the native maps are
warped (``warp="maps"``). A disc that fails (no mask, folding, low Dice, backend error, an
unexpected error) keeps its quality record and gets no atlas-space map; it never stops the
other discs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from spineqprep.bids.derivatives import (
    atomic_write_json,
    atomic_write_nifti,
    atomic_write_text,
    build_path,
    map_metadata,
)
from spineqprep.bids.schema import load_schema
from spineqprep.errors import InputError, UsageError, one_line
from spineqprep.registration.atlas import LEVELS, Atlas, mask_name, space_name
from spineqprep.registration.disc import (
    DiscTransform,
    apply_transform,
    is_single_slice,
    register_disc,
)
from spineqprep.registration.quality import (
    DiscQuality,
    cut_by_fov,
    failed,
    histogram_distance,
)
from spineqprep.relaxometry import fit_images

WARP_MODES = ("echoes", "maps", "both")
QC_COLUMNS = ("level", "dice", "jacobian_mean", "jacobian_sd", "folded_fraction",
              "histogram_distance", "fov_cut", "passed", "reason", "backend")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesInput:
    """One relaxometry series on the registered grid, with its native fit."""

    suffix: str  # T2map, T1rho or T2starmap
    images: tuple[nib.Nifti1Image, ...]  # one per echo / spin-lock time
    times: tuple[float, ...]
    native_maps: Mapping[str, nib.Nifti1Image]  # "T", "S0", "Rsquared", "mask" (validity)


@dataclass(frozen=True)
class DiscResult:
    """One disc: its registration, quality, and atlas-space images per series.

    ``maps[suffix][kind]`` (kind: "echoes" or "maps") holds "T", "S0", "Rsquared", "mask" on
    the atlas grid; ``quality_by_map[suffix]`` carries that map's histogram distance.
    """

    level: str
    transform: DiscTransform
    quality: DiscQuality
    maps: dict[str, dict[str, dict[str, nib.Nifti1Image]]]
    quality_by_map: dict[str, DiscQuality]


def disc_mask(dseg: nib.Nifti1Image, label: int) -> nib.Nifti1Image:
    """Binary mask (uint8) of one label of a segmentation, on its grid."""
    data = (np.asarray(dseg.dataobj) == label).astype(np.uint8)
    return nib.Nifti1Image(data, dseg.affine)


def register_grid(
    dseg: nib.Nifti1Image, series: Sequence[SeriesInput], atlas: Atlas, work_dir: Path, *,
    disc_labels: Mapping[str, int], backend: str = "elastix",
    parameter_maps: Sequence[Path] | None = None, min_dice: float = 0.85,
    warp: str = "echoes", fit_kw: Mapping | None = None,
    t_ranges: Mapping[str, tuple[float, float]] | None = None, levels: Sequence[str] = LEVELS,
) -> list[DiscResult]:
    """Register every disc level of ``dseg`` and bring every series into atlas space.

    ``fit_kw`` goes to ``fit_images`` (model, n_threads); ``t_ranges[suffix]`` is each map's
    valid range of the fitted time constant. Bad arguments raise UsageError / InputError (as
    ``register_disc`` does); any other exception met by one disc (a bug) fails that disc only,
    with the error as its reason, and the other discs go on."""
    if warp not in WARP_MODES:
        raise ValueError(f"warp must be one of {WARP_MODES}, not {warp!r}")
    single = is_single_slice(dseg)

    def one_disc(level: str) -> DiscResult:
        if level not in atlas.files:  # an atlas of some levels only: this disc is not mapped
            return failed_disc(level, backend,
                               f"no atlas level: {mask_name(level)} is not in {atlas.root}")
        atlas_mask = atlas.mask_like(level, single)
        moving = disc_mask(dseg, disc_labels[level])
        transform, quality = register_disc(moving, atlas_mask, Path(work_dir) / level,
                                           backend=backend, parameter_maps=parameter_maps,
                                           min_dice=min_dice)
        quality = replace(quality, fov_cut=cut_by_fov(np.asarray(moving.dataobj) > 0))
        maps: dict[str, dict[str, dict[str, nib.Nifti1Image]]] = {}
        by_map: dict[str, DiscQuality] = {}
        if quality.passed:
            inside = np.asarray(atlas_mask.dataobj) > 0.5
            native_disc = np.asarray(moving.dataobj) > 0
            for s in series:
                kw = {**(fit_kw or {}), **({"t_range": t_ranges[s.suffix]}
                                           if t_ranges and s.suffix in t_ranges else {})}
                maps[s.suffix] = _to_atlas(s, transform, atlas_mask, inside, warp, kw)
                primary = maps[s.suffix]["echoes" if warp != "maps" else "maps"]
                by_map[s.suffix] = replace(quality, histogram_distance=_histogram(
                    s.native_maps, native_disc, primary, inside))
            distances = [q.histogram_distance for q in by_map.values()
                         if q.histogram_distance is not None
                         and np.isfinite(q.histogram_distance)]
            quality = replace(quality, histogram_distance=max(distances) if distances else None)
        return DiscResult(level, transform, quality, maps, by_map)

    results = []
    for level in levels:
        try:
            results.append(one_disc(level))
        except (InputError, UsageError):  # the caller's arguments: not this disc's fault
            raise
        except Exception as err:
            _log.exception("disc %s failed with an unexpected error", level)
            results.append(failed_disc(level, backend, f"unexpected error (a bug: please "
                                       f"report it): {type(err).__name__}: {one_line(err)}"))
    return results


def failed_disc(level: str, backend: str, reason: str) -> DiscResult:
    """A disc that was not mapped: its failed quality record and nothing else."""
    return DiscResult(level, DiscTransform(backend, ()), failed(reason), {}, {})


def _to_atlas(s: SeriesInput, transform: DiscTransform, atlas_mask: nib.Nifti1Image,
              inside: np.ndarray, warp: str, fit_kw: Mapping) -> dict[str, dict[str,
                                                                          nib.Nifti1Image]]:
    out = {}
    if warp in ("echoes", "both"):
        warped = [apply_transform(transform, img, atlas_mask) for img in s.images]
        fitted = fit_images(warped, list(s.times), mask=inside, **fit_kw)
        out["echoes"] = {key: fitted[key] for key in ("T", "S0", "Rsquared", "mask")}
    if warp in ("maps", "both"):
        out["maps"] = {  # NaN (invalid voxels) would spread through interpolation: 0 instead
            key: apply_transform(transform, _finite(s.native_maps[key]), atlas_mask,
                                 interpolation="nearest" if key == "mask" else "linear")
            for key in ("T", "S0", "Rsquared", "mask")}
    for images in out.values():
        valid = (np.asarray(images["mask"].dataobj) > 0.5) & inside
        images["mask"] = _image(valid.astype(np.uint8), atlas_mask)
        for key in ("T", "S0", "Rsquared"):
            data = np.asarray(images[key].dataobj, np.float32)
            images[key] = _image(np.where(inside, data, np.nan).astype(np.float32), atlas_mask)
    return out


def _histogram(native: Mapping[str, nib.Nifti1Image], native_disc: np.ndarray,
               atlas_images: Mapping[str, nib.Nifti1Image], inside: np.ndarray) -> float | None:
    """Distance between the disc's native and atlas-space value histograms (valid voxels)."""
    t_native = np.asarray(native["T"].dataobj, np.float32)
    valid_native = np.asarray(native["mask"].dataobj) > 0
    if t_native.shape != native_disc.shape:
        return None
    t_atlas = np.asarray(atlas_images["T"].dataobj, np.float32)
    valid_atlas = (np.asarray(atlas_images["mask"].dataobj) > 0) & inside
    value = histogram_distance(t_native[native_disc & valid_native], t_atlas[valid_atlas])
    return value if np.isfinite(value) else None


def _finite(img: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.nan_to_num(np.asarray(img.dataobj, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return nib.Nifti1Image(data, img.affine)


def _image(data: np.ndarray, like: nib.Nifti1Image) -> nib.Nifti1Image:
    header = like.header.copy()
    header.set_data_dtype(data.dtype)
    return nib.Nifti1Image(data, like.affine, header)


def qc_rows(results: Sequence[DiscResult]) -> list[dict]:
    """Rows of the per-grid ``desc-registration_qc.tsv`` (columns ``QC_COLUMNS``); ``backend``
    names the engine of the disc's transform (``ants`` where the fallback replaced elastix)."""
    rows = []
    for r in results:
        q = r.quality
        rows.append({"level": r.level, "dice": q.dice, "jacobian_mean": q.jacobian_mean,
                     "jacobian_sd": q.jacobian_sd, "folded_fraction": q.folded_fraction,
                     "histogram_distance": q.histogram_distance, "fov_cut": q.fov_cut,
                     "passed": q.passed, "reason": q.reason, "backend": r.transform.backend})
    return rows


# ---- derivatives -----------------------------------------------------------------------------
def disc_labels() -> dict[str, int]:
    """``_dseg`` value of each disc level (the schema's labels)."""
    rows = load_schema()["anatomy"]["dseg_labels"]
    return {row["abbreviation"]: int(row["index"]) for row in rows
            if row["abbreviation"] in LEVELS}


def stage_results(results: Sequence[DiscResult], series_meta: Mapping[str, Mapping[str, Any]],
                  entities: Mapping[str, str], staging_dir: Path, warp: str) -> list[Path]:
    """Write the atlas-space maps (+ fit by-products), transforms and the QC table of one grid
    under their BIDS-Derivatives names in ``staging_dir``; returns the files written.

    ``series_meta[suffix]`` holds that map's sidecar basics: ``Sources`` (BIDS URIs), the time
    field and list, and a ``Description``. With ``warp="both"`` the warped native maps get the
    entity ``label-warped``.
    """
    staging_dir = Path(staging_dir)
    fit_desc = {name: spec["desc"] for name, spec in load_schema()["derivatives"]["maps"].items()}
    primary = "maps" if warp == "maps" else "echoes"
    written: list[Path] = []
    for r in results:
        space = space_name(r.level)
        xfm_files = _stage_transform(r.transform, {**entities, "from": "native", "to": space,
                                                   "mode": "image"}, staging_dir)
        written += xfm_files
        xfm_rel = [str(f.relative_to(staging_dir)) for f in xfm_files]
        for suffix, kinds in r.maps.items():
            meta = series_meta[suffix]
            quality = r.quality_by_map.get(suffix, r.quality)
            for kind, images in kinds.items():
                ents = {**entities, "space": space, "label": None if kind == primary else "warped"}
                how = ("fitted voxel-wise to the echoes warped into atlas space" if kind == "echoes"
                       else "the native map warped into atlas space")
                sidecar = map_metadata(
                    suffix, meta["Sources"],
                    Description=f"{meta['Description']} Disc {r.level} in atlas space {space}: "
                                f"{how}; NaN outside the atlas disc.",
                    SpatialReference=f"bids:atlas:{mask_name(r.level)}",
                    RegistrationBackend=r.transform.backend,
                    Transforms=[f"bids::{rel}" for rel in xfm_rel],
                    RegistrationQC=quality.as_sidecar(),
                    **{k: v for k, v in meta.items() if k not in ("Sources", "Description")})
                path = staging_dir / build_path(ents, suffix, ".nii.gz")
                atomic_write_nifti(images["T"], path)
                atomic_write_json(sidecar, path.with_name(path.name.replace(".nii.gz", ".json")))
                written.append(path)
                for key, by_suffix, units in (("S0", "S0map", "arbitrary"),
                                              ("Rsquared", "Rsquared", "1"), ("mask", "mask", "1")):
                    path = staging_dir / build_path({**ents, "desc": fit_desc[suffix]},
                                                    by_suffix, ".nii.gz")
                    atomic_write_nifti(images[key], path)
                    atomic_write_json({"Units": units,
                                       "SpatialReference": f"bids:atlas:{mask_name(r.level)}",
                                       "Description": f"{by_suffix} of the {suffix} fit of disc "
                                                      f"{r.level} in atlas space."},
                                      path.with_name(path.name.replace(".nii.gz", ".json")))
                    written.append(path)
    qc = staging_dir / build_path({**entities, "desc": "registration"}, "qc", ".tsv")
    atomic_write_text(_tsv(qc_rows(results)), qc)
    return [*written, qc]


def _stage_transform(transform: DiscTransform, entities: Mapping[str, str],
                     staging_dir: Path) -> list[Path]:
    """Copy a disc's transform files under derivative names. elastix: the last stage is
    ``..._xfm.txt``, earlier ones ``..._desc-stage<N>_xfm.txt``, each naming its predecessor
    by file name (run transformix from their folder); ANTs: ``desc-<N>`` per file."""
    files = list(transform.files)
    out: list[Path] = []
    for i, src in enumerate(files):
        last = i == len(files) - 1
        ext = ".nii.gz" if src.name.endswith(".nii.gz") else src.suffix
        desc = None if last and transform.backend == "elastix" else f"stage{i + 1}"
        dest = staging_dir / build_path({**entities, "desc": desc}, "xfm", ext)
        if ext == ".txt":
            text = src.read_text()
            if out:
                text = re.sub(r'\(InitialTransformParameterFileName "[^"]*"\)',
                              f'(InitialTransformParameterFileName "{out[-1].name}")', text)
            atomic_write_text(text, dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
        out.append(dest)
    return out


def _tsv(rows: Sequence[Mapping[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "n/a"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value).replace("\t", " ") or "n/a"

    lines = ["\t".join(QC_COLUMNS)]
    lines += ["\t".join(fmt(row[c]) for c in QC_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"
