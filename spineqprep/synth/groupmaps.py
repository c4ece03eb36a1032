"""Simulated atlas-space derivatives with planted voxel-wise effects, for the group level.

Writes what the participant level's atlas stage will write (per subject/session and disc
level, ``..._acq-<a>_space-SpineDisc<LEVEL>_{T1rho,T2map}.nii.gz`` in seconds, NaN outside the
disc, a ``RegistrationQC`` sidecar) on a small ellipsoid disc grid, plus a raw-side
``participants.tsv``, ``sessions.tsv`` and ``phenotype/disc_grades.tsv`` (columns as
:mod:`spineqprep.synth.tables`). Planted, with known true-effect masks (truth folder):

- ``odi``: in a posterior nucleus sub-region of the effect level, T1rho falls by
  ``slope_ms_per_odi`` ms per ODI point (voxel-by-variable, voxel-by-group);
- ``coupling``: in the nucleus, T2's deviation follows T1rho's (voxel-by-voxel);
- ``change`` (two sessions): in the same sub-region, T1rho changes by ``slope_ms_per_odi``
  per point of ODI change, and the whole nucleus loses ``decline_ms`` (voxel-by-time);
- a site offset on every map (site B higher), subject offsets, smooth and white noise.

Run as ``python -m spineqprep.synth.groupmaps RAW_DIR DERIV_DIR --subjects 40``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from spineqprep import __version__
from spineqprep.bids.derivatives import (
    atomic_write_json,
    atomic_write_nifti,
    atomic_write_text,
    write_dataset_description,
)
from spineqprep.errors import SpineqprepError, UsageError
from spineqprep.registration.atlas import mask_name
from spineqprep.synth.tables import write_tsv

LEVELS: tuple[str, ...] = ("L1L2", "L2L3", "L3L4", "L4L5", "L5S1")
GRID_SHAPE: tuple[int, int, int] = (24, 18, 10)
VOXEL_MM = 1.0
SITES = ("A", "B")


@dataclass(frozen=True)
class GroupMapsSpec:
    """What to simulate (defaults: a 40-subject, two-site study, planted effects at L4L5)."""

    n_subjects: int = 40
    n_sites: int = 2
    n_sessions: int = 1
    seed: int = 0
    levels: tuple[str, ...] = ("L4L5",)
    effect_level: str = "L4L5"
    slope_ms_per_odi: float = -0.8
    coupling: float = 0.8
    decline_ms: float = -4.0
    site_offset_ms: float = 8.0
    subject_sd_ms: float = 6.0
    smooth_sd_ms: float = 4.0
    noise_sd_ms: float = 3.0
    null: bool = False  # no planted effect anywhere (for false-positive checks)
    qc_fail: int = 1  # maps with RegistrationQC Passed false


@dataclass
class GroupMapsResult:
    """Paths written and the truth (true-effect masks on the level grid, C order)."""

    raw_dir: Path
    derivatives_dir: Path
    truth_dir: Path
    disc: np.ndarray
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def disc_masks(shape: tuple[int, int, int] = GRID_SHAPE) -> dict[str, np.ndarray]:
    """Atlas disc (ellipsoid ~20x14x8 voxels), nucleus, and the posterior nucleus region."""
    grid = np.indices(shape).astype(float)
    centre = [(s - 1) / 2 for s in shape]
    radii = (10.0, 7.0, 4.0)
    r2 = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    nucleus = sum(((grid[i] - centre[i]) / (0.55 * radii[i])) ** 2 for i in range(3)) <= 1
    posterior = ((grid[0] - centre[0]) ** 2 + (grid[1] - (centre[1] - 3)) ** 2
                 + (grid[2] - centre[2]) ** 2) <= 3.2 ** 2
    return {"disc": r2 <= 1, "nucleus": nucleus, "region": posterior & (r2 <= 1),
            "radius2": r2}


def _people(spec: GroupMapsSpec, rng: np.random.Generator) -> list[dict[str, Any]]:
    people = []
    for i in range(spec.n_subjects):
        group = "patient" if i % 2 else "control"
        odi = float(np.clip(round(rng.normal(22 + (14 if group == "patient" else 0), 14)), 0,
                            100))
        changes = [0.0] + [float(rng.normal(0, 10)) for _ in range(spec.n_sessions - 1)]
        people.append({
            "label": f"{i + 1:03d}", "site": SITES[i % spec.n_sites] if spec.n_sites <= 2
            else f"S{i % spec.n_sites + 1}", "site_index": i % spec.n_sites,
            "age": round(float(rng.uniform(25, 65)), 1), "sex": "F" if rng.random() < 0.5 else "M",
            "bmi": round(float(rng.normal(25, 3)), 1), "group": group, "odi": odi,
            "odi_sessions": [float(np.clip(odi + np.cumsum(changes)[k], 0, 100))
                             for k in range(spec.n_sessions)],
            "offset": {"T1rho": rng.normal(0, spec.subject_sd_ms),
                       "T2map": rng.normal(0, spec.subject_sd_ms)},
        })
    if spec.n_subjects > 3:
        people[2]["missing"] = "bmi"
        people[3]["missing"] = "odi"
    return people


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sd: float) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    return field_ / field_.std() * sd


def _maps(spec: GroupMapsSpec, person: dict[str, Any], level: str, session: int,
          masks: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """T1rho and T2 (ms) of one subject/session/level."""
    shape = masks["disc"].shape
    nucleus_weight = np.clip(1.2 - masks["radius2"], 0, 1)
    site = spec.site_offset_ms * person["site_index"]
    base = {"T1rho": 70 + 45 * nucleus_weight, "T2map": 50 + 40 * nucleus_weight}
    effects = not spec.null and level == spec.effect_level
    local = _smooth_noise(rng, shape, spec.smooth_sd_ms)
    t1rho = base["T1rho"] + site + person["offset"]["T1rho"] + local
    if effects:
        odi = person["odi_sessions"][session]
        t1rho = t1rho + masks["region"] * spec.slope_ms_per_odi * (odi - 30.0)
        t1rho = t1rho + masks["nucleus"] * spec.decline_ms * session
    t2_own = person["offset"]["T2map"] + _smooth_noise(rng, shape, spec.smooth_sd_ms)
    if effects:  # in the nucleus, T2's deviation follows T1rho's (offset + local)
        shared = person["offset"]["T1rho"] + local
        t2_own = np.where(masks["nucleus"], spec.coupling * shared
                          + np.sqrt(max(1 - spec.coupling ** 2, 0)) * t2_own, t2_own)
    t2 = base["T2map"] + site + t2_own
    out = {}
    for name, values in (("T1rho", t1rho), ("T2map", t2)):
        noisy = values + rng.normal(0, spec.noise_sd_ms, shape)
        out[name] = np.where(masks["disc"], noisy, np.nan)
    if person["label"] == "001":  # a few voxels beyond the published inclusion range
        out["T1rho"][tuple(np.argwhere(masks["disc"])[:5].T)] = 250.0
    return out


def _affine() -> np.ndarray:
    return np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])


def generate_group_maps(raw_dir: Path, derivatives_dir: Path, spec: GroupMapsSpec | None = None,
                        truth_dir: Path | None = None) -> GroupMapsResult:
    """Write the raw tables, the atlas-space derivatives and the truth; return the truth."""
    spec = spec or GroupMapsSpec()
    if spec.n_subjects < 4 or spec.n_sites < 1 or spec.n_sessions < 1:
        raise UsageError("need at least 4 subjects, 1 site and 1 session")
    if spec.effect_level not in LEVELS or not set(spec.levels) <= set(LEVELS):
        raise UsageError(f"levels must be among {', '.join(LEVELS)}")
    raw_dir, derivatives_dir = Path(raw_dir), Path(derivatives_dir)
    truth_dir = Path(truth_dir) if truth_dir else derivatives_dir.with_name(
        derivatives_dir.name + "_truth")
    rng = np.random.default_rng(spec.seed)
    people = _people(spec, rng)
    masks = disc_masks()
    _write_raw(raw_dir, people, spec)
    write_dataset_description(derivatives_dir, bids_dir=raw_dir)
    excluded = []
    fail = {(people[k]["label"], "T1rho") for k in range(min(spec.qc_fail, len(people)))}
    for person in people:
        for session in range(spec.n_sessions):
            for level in spec.levels:
                maps = _maps(spec, person, level, session, masks, rng)
                for suffix, values in maps.items():
                    passed = (person["label"], suffix) not in fail or session > 0
                    path = _write_map(derivatives_dir, person, session, spec, level, suffix,
                                      values, passed)
                    if not passed:
                        excluded.append(path.name)
    truth = {} if spec.null else {
        "odi": masks["region"][masks["disc"]], "coupling": masks["nucleus"][masks["disc"]],
        "change": masks["region"][masks["disc"]], "decline": masks["nucleus"][masks["disc"]]}
    truth_dir.mkdir(parents=True, exist_ok=True)
    for name, mask in (("disc", masks["disc"]), ("region", masks["region"]),
                       ("nucleus", masks["nucleus"])):
        stem = f"space-SpineDisc{spec.effect_level}_desc-{name}_mask.nii.gz"
        atomic_write_nifti(nib.Nifti1Image(mask.astype(np.uint8), _affine()), truth_dir / stem)
    atomic_write_json({
        "Level": spec.effect_level, "Null": spec.null,
        "Effects": {
            "odi": "T1rho += slope_ms_per_odi * (odi - 30) in desc-region",
            "coupling": "T2 deviation = coupling * T1rho deviation (subject offset + local) "
                        "+ noise, in desc-nucleus",
            "change": "T1rho change += slope_ms_per_odi * (odi change) in desc-region",
            "decline": "T1rho += decline_ms per session in desc-nucleus"},
        "Spec": {k: v for k, v in spec.__dict__.items()}, "ExcludedByQC": excluded,
    }, truth_dir / "planted_groupmaps.json")
    return GroupMapsResult(raw_dir=raw_dir, derivatives_dir=derivatives_dir,
                           truth_dir=truth_dir, disc=masks["disc"], truth=truth,
                           excluded=excluded)


def _write_map(root: Path, person: dict[str, Any], session: int, spec: GroupMapsSpec,
               level: str, suffix: str, values_ms: np.ndarray, passed: bool) -> Path:
    sub = f"sub-{person['label']}"
    parts = [sub] + ([f"ses-{session + 1}"] if spec.n_sessions > 1 else [])
    folder = root.joinpath(*parts, "anat")
    acq = "mapss" if suffix == "T1rho" else "mese"
    path = folder / f"{'_'.join(parts)}_acq-{acq}_space-SpineDisc{level}_{suffix}.nii.gz"
    img = nib.Nifti1Image((values_ms / 1e3).astype(np.float32), _affine())
    atomic_write_nifti(img, path)
    atomic_write_json({
        "Units": "s", "SkullStripped": False,
        "SpatialReference": f"bids:atlas:{mask_name(level)}",
        "RegistrationQC": {"Dice": 0.93 if passed else 0.41, "JacobianMean": 1.0,
                           "JacobianSD": 0.08, "FoldedFraction": 0.0 if passed else 0.03,
                           "Passed": passed},
        "Description": "simulated atlas-space map (spineqprep.synth.groupmaps)",
    }, path.with_name(path.name.replace(".nii.gz", ".json")))
    return path


def _write_raw(raw: Path, people: list[dict[str, Any]], spec: GroupMapsSpec) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"Name": "spineqprep simulated atlas-map study", "BIDSVersion": "1.10.0",
                       "DatasetType": "raw",
                       "GeneratedBy": [{"Name": "spineqprep.synth.groupmaps",
                                        "Version": __version__}]},
                      raw / "dataset_description.json")
    atomic_write_text("Simulated tables for spineqprep's group level (no images).\n",
                      raw / "README")
    rows = []
    for p in people:
        row = {"participant_id": f"sub-{p['label']}", "age": p["age"], "sex": p["sex"],
               "bmi": p["bmi"], "group": p["group"], "site": p["site"], "odi": p["odi"],
               "vas": round(0.08 * p["odi"], 1)}
        if p.get("missing"):
            row[p["missing"]] = None
        rows.append(row)
    write_tsv(rows, raw / "participants.tsv")
    grades = []
    for p in people:
        for session in range(spec.n_sessions):
            for level in spec.levels:
                grade = int(np.clip(round(2 + p["odi_sessions"][session] / 20), 1, 5))
                row = {"participant_id": f"sub-{p['label']}"}
                if spec.n_sessions > 1:
                    row["session_id"] = f"ses-{session + 1}"
                row.update({"level": level, "pfirrmann": grade,
                            "modified_pfirrmann": min(2 * grade - 1, 8)})
                grades.append(row)
    write_tsv(grades, raw / "phenotype" / "disc_grades.tsv")
    if spec.n_sessions > 1:
        for p in people:
            write_tsv([{"session_id": f"ses-{k + 1}", "months_since_baseline": 12 * k,
                        "age": round(p["age"] + k, 1),
                        "odi": None if p.get("missing") == "odi" else p["odi_sessions"][k],
                        "vas": round(0.08 * p["odi_sessions"][k], 1)}
                       for k in range(spec.n_sessions)],
                      raw / f"sub-{p['label']}" / f"sub-{p['label']}_sessions.tsv")


def build_parser() -> argparse.ArgumentParser:
    """Command line of ``python -m spineqprep.synth.groupmaps``."""
    p = argparse.ArgumentParser(
        prog="python -m spineqprep.synth.groupmaps",
        description="Simulate atlas-space T1rho/T2 disc maps with planted voxel-wise effects "
        "(and the raw tables) for spineqprep's group level.")
    p.add_argument("raw_dir", type=Path, help="raw dataset to write (tables only)")
    p.add_argument("derivatives_dir", type=Path, help="derivatives dataset to write (maps)")
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--levels", nargs="+", default=["L4L5"], choices=LEVELS)
    p.add_argument("--null", action="store_true", help="plant no effect")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth-dir", type=Path, help="default: DERIVATIVES_DIR_truth")
    return p


def main(argv: list[str] | None = None) -> int:
    """Generate; a user error ends in one message and a non-zero exit."""
    args = build_parser().parse_args(argv)
    spec = GroupMapsSpec(n_subjects=args.subjects, n_sites=args.sites, n_sessions=args.sessions,
                         seed=args.seed, levels=tuple(args.levels), null=args.null)
    try:
        result = generate_group_maps(args.raw_dir, args.derivatives_dir, spec, args.truth_dir)
    except SpineqprepError as err:
        print(f"spineqprep-synth-groupmaps: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"wrote {result.derivatives_dir} (truth: {result.truth_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
