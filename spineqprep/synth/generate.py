"""Write a synthetic spine-extended BIDS dataset and, separately, its ground-truth derivatives.

Every image is made by evaluating the continuous anatomy (``anatomy``) at the voxel centres of
its own grid (world coordinates through its affine), turning the per-voxel truth (``tissues``)
into signal, and adding Rician noise. Relaxometry series use exactly
``S_k = Gain * PD * exp(-t_k / T) + noise`` with ``t_k`` the time stored in the file's sidecar and
``T``/``PD`` the maps written to the truth dataset on the same grid, so the error of a
mono-exponential fit against the truth is noise only (no partial volume between tissues, B0/B1,
T1 recovery or chemical shift is simulated; the cortical bone of the vertebrae is a signal void
whose share of each voxel scales ``PD``, so it only darkens). For every relaxometry series the
truth also holds the true maps of each disc in its level's atlas space
(``space-SpineDisc<LEVEL>``, on the shipped atlas grid), the reference of disc-by-disc
registration.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from spineqprep import __version__
from spineqprep.bids.derivatives import (
    atomic_write_json,
    atomic_write_nifti,
    atomic_write_text,
    build_path,
    map_metadata,
    write_bidsignore,
    write_dseg_tsv,
)
from spineqprep.bids.schema import load_schema, series_suffixes
from spineqprep.errors import UsageError
from spineqprep.registration.atlas import Atlas, load_atlas, mask_name, space_name
from spineqprep.synth import labels as lab
from spineqprep.synth import tables
from spineqprep.synth.anatomy import Anatomy, build_anatomy
from spineqprep.synth.cohort import Participant, Visit, rng_for, sample_cohort
from spineqprep.synth.protocols import (
    SIZES,
    Grid,
    SiteProtocol,
    grid_affine,
    region_centre,
    site_label,
    site_protocol,
)
from spineqprep.synth.truth import atlas_maps, disc_rows, sample_points

GENERATOR = "spineqprep-synth"
_TRUTH_TABLES = ["discs.tsv", "discs.json", "modic.tsv", "modic.json", "anatomy.tsv",
                 "anatomy.json", "planted_effects.json"]


@dataclass(frozen=True)
class SynthResult:
    """What ``generate_dataset`` wrote."""

    raw_dir: Path
    truth_dir: Path
    participants: tuple[str, ...]  # labels without "sub-"
    sessions: tuple[str, ...]  # labels without "ses-"; () for a single-session dataset
    sites: dict[str, str]  # participant label -> site label
    n_files: int  # files written into raw_dir
    seconds: float


def generate_dataset(
    out_dir: str | Path, *, n_subjects: int = 4, n_sites: int = 2, n_sessions: int = 1,
    seed: int = 0, size: str = "small", truth_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SynthResult:
    """Generate the raw dataset in ``out_dir`` and the truth in ``truth_dir`` (default: a
    sibling ``<out_dir>_truth``). Deterministic: the same arguments give the same bytes.

    Raises ``UsageError`` for bad numbers, a truth folder inside ``out_dir``, or a non-empty
    folder that is not an earlier output of this generator (which is replaced).
    """
    start = time.perf_counter()
    _check_arguments(n_subjects, n_sites, n_sessions, seed, size)
    raw, truth = _prepare_folders(out_dir, truth_dir)
    people = sample_cohort(n_subjects, n_sites, n_sessions, seed)
    command = (f"{GENERATOR} {raw.name} --subjects {n_subjects} --sites {n_sites} "
               f"--sessions {n_sessions} --seed {seed} --size {size}")
    _write_raw_root(raw, truth, people, command, n_sites)
    _write_truth_root(truth, raw, command)

    disc_table, modic_table, anatomy_table = [], [], []
    for person in people:
        t0 = time.perf_counter()
        site = site_protocol(person.site_index)
        written = 0
        for visit in person.visits:
            anat = build_anatomy(person, visit, seed)
            written += _write_visit(raw, truth, person, visit, anat, site, size, seed)
            key = tables.visit_key(person, visit, site_label(person.site_index))
            disc_table += [{**key, **row} for row in disc_rows(anat, visit)]
            modic_table += tables.modic_rows(person, visit)
            anatomy_table.append({**key, **tables.anatomy_row(anat, person)})
        if progress:
            progress(f"sub-{person.label}: site {site_label(person.site_index)} "
                     f"({site.manufacturer} {site.field_strength:g} T), {len(person.visits)} "
                     f"session(s), {written} files, {time.perf_counter() - t0:.1f} s")

    tables.write_raw_tables(raw, people, n_sessions > 1)
    tables.write_truth_tables(truth, disc_table, modic_table, anatomy_table)
    sessions = tuple(v.session for v in people[0].visits if v.session)
    return SynthResult(raw, truth, tuple(p.label for p in people), sessions,
                       {p.label: site_label(p.site_index) for p in people},
                       sum(1 for p in raw.rglob("*") if p.is_file()),
                       time.perf_counter() - start)


def _check_arguments(n_subjects: int, n_sites: int, n_sessions: int, seed: int,
                     size: str) -> None:
    for name, value, low, high in (("subjects", n_subjects, 1, 999),
                                   ("sessions", n_sessions, 1, 99),
                                   ("seed", seed, 0, 2 ** 32 - 1)):
        if not isinstance(value, int) or not low <= value <= high:
            raise UsageError(f"--{name} must be an integer from {low} to {high}, not {value!r}")
    if not isinstance(n_sites, int) or not 1 <= n_sites <= n_subjects:
        raise UsageError(f"--sites must be an integer from 1 to the number of subjects "
                         f"({n_subjects}), not {n_sites!r}")
    if size not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(SIZES)}, not {size!r}")


def _is_synth_output(folder: Path) -> bool:
    try:
        description = json.loads((folder / "dataset_description.json").read_text())
        return description["GeneratedBy"][0]["Name"] == GENERATOR
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def _prepare_folders(out_dir: str | Path, truth_dir: str | Path | None) -> tuple[Path, Path]:
    """Check both folders, then empty earlier synthetic outputs; returns absolute paths."""
    raw = Path(out_dir).expanduser().resolve()
    truth = (Path(truth_dir).expanduser().resolve() if truth_dir is not None
             else raw.parent / f"{raw.name}_truth")
    if truth == raw or raw in truth.parents:
        raise UsageError("the ground truth must not be inside the raw dataset", path=truth,
                         fix=f"choose a --truth-dir outside {raw} (default: {raw.name}_truth "
                             "next to it)")
    if truth in raw.parents:
        raise UsageError("the raw dataset must not be inside the ground-truth folder", path=raw,
                         fix="choose OUT_DIR and --truth-dir side by side")
    for folder in (raw, truth):
        if folder.exists() and not folder.is_dir():
            raise UsageError("exists and is not a folder", path=folder,
                             fix="choose a new folder name")
        if folder.is_dir() and any(folder.iterdir()) and not _is_synth_output(folder):
            raise UsageError("the folder is not empty and is not an earlier spineqprep-synth "
                             "output; refusing to write into it", path=folder,
                             fix="give a new or empty folder")
    for folder in (raw, truth):
        if folder.is_dir():
            for child in folder.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        folder.mkdir(parents=True, exist_ok=True)
    return raw, truth


# ---- images ------------------------------------------------------------------------------
def _nifti(data: np.ndarray, affine: np.ndarray, dtype: str = "float32",
           slope: float = 1.0) -> nib.Nifti1Image:
    """A NIfTI image in scanner coordinates (qform = sform, code 1); int16 data is stored as
    ``round(data / slope)`` with ``scl_slope = slope``."""
    if dtype == "int16":
        img = nib.Nifti1Image(np.clip(np.round(data / slope), 0, 32767).astype(np.int16), affine)
        img.header.set_slope_inter(slope, 0.0)
    else:
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of SD ``sigma`` per channel."""
    real = clean + rng.normal(0.0, sigma, clean.shape)
    imag = rng.normal(0.0, sigma, clean.shape)
    return np.hypot(real, imag).astype(np.float32)


def _decay(t: float, relaxation: np.ndarray) -> np.ndarray:
    """exp(-t / T), with T = 0 (air) giving 0 (1 at t = 0)."""
    ratio = np.divide(t, relaxation, out=np.full_like(relaxation, np.inf if t > 0 else 0.0),
                      where=relaxation > 0)
    return np.exp(-ratio)


def _sample_grid(anat: Anatomy, affine: np.ndarray, shape: tuple[int, int, int],
                 visit: Visit) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    in_plane = float(np.sort(zooms)[:2].mean())  # the bony endplate is seen in the slice plane
    labels, maps = sample_points(anat, ijk @ affine[:3, :3].T + affine[:3, 3], visit.discs,
                                 footprint_mm=in_plane)
    return labels.reshape(shape), {q: m.reshape(shape) for q, m in maps.items()}


def _place(grid: Grid, site: SiteProtocol, size: str, anat: Anatomy, seed: int,
           person: Participant, visit: Visit, acq: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """The grid of one exam: centred on its region (+- 3 mm), tilted +- 1 degree per exam."""
    rng = rng_for(seed, "grid", person.index, visit.months, acq)
    return grid_affine(grid, site, size, region_centre(anat, grid.region)
                       + rng.normal(0, 3.0, 3), rng.normal(0, 1.0, 3))


def _write_visit(raw: Path, truth: Path, person: Participant, visit: Visit, anat: Anatomy,
                 site: SiteProtocol, size: str, seed: int) -> int:
    """All raw images of one visit (+ sidecars) and their truth; returns the raw file count."""
    entities = {"sub": person.label, "ses": visit.session}
    n = 0
    affine, shape = _place(site.structural_grid, site, size, anat, seed, person, visit, "sag")
    labels, maps = _sample_grid(anat, affine, shape, visit)
    _write_truth_grid(truth, {**entities, "acq": "sag"}, affine, labels, maps)
    for st in site.structurals:
        clean = site.gain * maps["PD"] * (1 - _decay(st.repetition_time, maps["T1"])) * _decay(
            st.echo_time, maps["T2"])
        rng = rng_for(seed, "noise", person.index, visit.months, "sag", st.suffix)
        path = raw / build_path({**entities, "acq": "sag"}, st.suffix, ".nii.gz")
        atomic_write_nifti(_nifti(_rician(clean, site.gain / st.snr, rng), affine,
                                  site.storage, site.scl_slope), path)
        meta = {"RepetitionTime": st.repetition_time, "EchoTime": st.echo_time,
                "MRAcquisitionType": "2D", "SeriesDescription": f"sag {st.suffix} FSE",
                **site.common_metadata(site.structural_grid)}
        atomic_write_json(meta, path.with_name(path.name.replace(".nii.gz", ".json")))
        n += 2

    suffixes = series_suffixes()
    in_atlas = _atlas_truth(anat, visit)
    for acq in site.acquisitions:
        affine, shape = _place(acq.grid, site, size, anat, seed, person, visit, acq.acq)
        labels, maps = _sample_grid(anat, affine, shape, visit)
        ents = {**entities, "acq": acq.acq}
        _write_truth_grid(truth, ents, affine, labels, maps)
        for series in acq.series:
            spec = suffixes[series.suffix]
            sigma = site.gain / series.snr
            sources = []
            for i, t in enumerate(series.times_s, start=1):
                clean = site.gain * maps["PD"] * _decay(t, maps[series.quantity])
                rng = rng_for(seed, "noise", person.index, visit.months, acq.acq, series.suffix, i)
                rel = build_path({**ents, spec["index_entity"]: i}, series.suffix, ".nii.gz")
                atomic_write_nifti(_nifti(_rician(clean, sigma, rng), affine, site.storage,
                                          site.scl_slope), raw / rel)
                meta = {spec["time_field"]: t, **series.metadata,
                        **{k: v[i - 1] for k, v in series.per_file.items()},
                        "SeriesDescription": f"{acq.acq} {series.suffix}",
                        **site.common_metadata(acq.grid)}
                atomic_write_json(meta, raw / rel.replace(".nii.gz", ".json"))
                sources.append(f"bids:raw:{rel}")
                n += 2
            suffix = spec["fits"]
            path = truth / build_path(ents, suffix, ".nii.gz")
            atomic_write_nifti(_nifti(maps[series.quantity], affine), path)
            atomic_write_json(map_metadata(
                suffix, sources,
                Description=f"Ground truth {series.quantity} (s) on the grid of the series: the "
                            "exact value the signal of every file was computed from.",
                EstimationMethod="none (synthetic ground truth)",
                **{spec["time_field"]: list(series.times_s)},
                SignalModel=f"S = Gain * PD * exp(-{spec['time_field']} / "
                            f"{series.quantity}) + Rician noise",
                Gain=site.gain, NoiseSigma=sigma, SNR=series.snr,
            ), path.with_name(path.name.replace(".nii.gz", ".json")))
            for level, (mask, maps_in_atlas) in in_atlas.items():
                path = truth / build_path({**ents, "space": space_name(level)}, suffix,
                                          ".nii.gz")
                atomic_write_nifti(_nifti(maps_in_atlas[series.quantity], mask.affine), path)
                atomic_write_json(map_metadata(
                    suffix, sources,
                    Description=f"Ground truth {series.quantity} (s) of disc {level} in atlas "
                                f"space {space_name(level)}: the disc's pattern at each atlas "
                                "voxel's canonical coordinates; NaN outside the atlas disc.",
                    EstimationMethod="none (synthetic ground truth)",
                    SpatialReference=f"bids:atlas:{mask_name(level)}",
                    **{spec["time_field"]: list(series.times_s)},
                ), path.with_name(path.name.replace(".nii.gz", ".json")))
    return n


@functools.cache
def _shipped_atlas() -> Atlas:
    return load_atlas()


def _atlas_truth(anat: Anatomy, visit: Visit) -> dict[str, tuple[nib.Nifti1Image,
                                                                 dict[str, np.ndarray]]]:
    """Atlas disc and true atlas-space maps of every schema level of one visit."""
    atlas = _shipped_atlas()
    out = {}
    for level in lab.SCHEMA_DISCS:
        mask = atlas.mask(level)
        out[level] = (mask, atlas_maps(anat, visit, lab.DISCS.index(level), mask,
                                       atlas.canonical_scale.get(level, (1.0, 1.0, 1.0))))
    return out


def _write_truth_grid(truth: Path, entities: Mapping[str, Any], affine: np.ndarray,
                      labels: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
    """Label images and proton density on one grid."""
    atomic_write_nifti(_nifti(lab.main_labels(labels), affine, "uint8"),
                       truth / build_path(entities, "dseg", ".nii.gz"))
    atomic_write_nifti(_nifti(labels, affine, "int16"),
                       truth / build_path({**entities, "desc": "tissues"}, "dseg", ".nii.gz"))
    path = truth / build_path(entities, "PDmap", ".nii.gz")
    atomic_write_nifti(_nifti(maps["PD"], affine), path)
    atomic_write_json({"Units": "1", "SkullStripped": False,
                       "Description": "Proton density relative to water: the signal at t = 0 "
                       "of every series on this grid is Gain x PD."},
                      path.with_name(path.name.replace(".nii.gz", ".json")))


# ---- dataset-level files --------------------------------------------------------------------
def _description(name: str, dataset_type: str, command: str) -> dict[str, Any]:
    return {
        "Name": name, "BIDSVersion": load_schema()["bids_version"], "DatasetType": dataset_type,
        "License": "CC0", "Authors": ["spineqprep developers"],
        "GeneratedBy": [{"Name": GENERATOR, "Version": __version__,
                         "Description": f"synthetic data: {command}"}],
    }


def _write_raw_root(raw: Path, truth: Path, people: Sequence[Participant], command: str,
                    n_sites: int) -> None:
    atomic_write_json(_description("spineqprep synthetic lumbar spine", "raw", command),
                      raw / "dataset_description.json")
    # The schema's .bidsignore hides the extension's files (MESL, and disc_grades.tsv, one row
    # per disc where the official validator wants one per participant) from that validator.
    atomic_write_text("\n".join(load_schema()["raw"]["bidsignore"]) + "\n", raw / ".bidsignore")
    atomic_write_text(tables.raw_readme(people, n_sites, truth.name, command), raw / "README")


def _write_truth_root(truth: Path, raw: Path, command: str) -> None:
    description = _description("spineqprep-synth ground truth", "derivative", command)
    description["SourceDatasets"] = [{"URL": "bids:raw:"}]
    description["DatasetLinks"] = {"raw": os.path.relpath(raw, truth)}
    atomic_write_json(description, truth / "dataset_description.json")
    write_bidsignore(truth)
    write_bidsignore(truth, _TRUTH_TABLES)
    write_dseg_tsv(truth, lab.dseg_rows())
    atomic_write_text(tables.truth_readme(raw.name, command), truth / "README")
