"""Voxel-wise group analyses of the atlas-space maps: collect maps and variables, fit the GLM,
correct, and write BIDS derivatives under ``<output_dir>/group/<analysis>/``.

Every analysis runs per disc level and per map quantity (suffix), pooled over acquisitions:
sites run their own protocols (acq), and site as a covariate or ComBat absorbs the protocol
effect; a subject with several acquisitions of one quantity enters with the first (by name)
only; of the two kinds of map ``--warp both`` writes, one is analysed (fitted in atlas space by
default, the ``label-warped`` native maps with ``--group-warped-maps``). A subject enters an
analysis if
its map passed registration QC and it has every variable of the model; the others are listed
in ``<analysis>_subjects.tsv`` with the reason. Voxel values outside the map's inclusion range
are missing; a voxel is analysed when at least ``MinSubjects`` subjects have a value there.
Parametric maps (effect, t, r, P, FDR, Bonferroni) use each voxel's own subjects; permutation
inference (max-T, TFCE, cluster extent) fills a voxel's missing values with its mean over the
other subjects (exact for complete voxels). The whole-disc ROI mean is analysed beside it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from spineqprep.bids.derivatives import atomic_write_json, atomic_write_nifti, atomic_write_text
from spineqprep.errors import InputError, UsageError
from spineqprep.stats import harmonise
from spineqprep.stats.glm import fit_contrast, partition
from spineqprep.stats.inference import (
    bonferroni,
    fdr_bh,
    freedman_lane,
    make_transforms,
    t_threshold,
)
from spineqprep.stats.model import Analysis, Contrast, GroupModel, Inference, to_bids_stats_model
from spineqprep.stats.summary import MAP_QUANTITIES, parse_name, read_json, read_participants
from spineqprep.stats.tfce import TFCE_E, TFCE_H, TFCE_STEPS, clusters

LOG = logging.getLogger("spineqprep")
_SPACE = re.compile(r"^SpineDisc(L1L2|L2L3|L3L4|L4L5|L5S1)$")
KEYS = ["participant_id", "session_id"]


@dataclass(frozen=True)
class AtlasMap:
    """One atlas-space map written by the participant level."""

    participant_id: str
    session_id: str | None
    acq: str | None
    level: str
    suffix: str
    path: Path
    passed: bool


def find_atlas_maps(output_dir: Path, warped: bool = False) -> list[AtlasMap]:
    """The ``space-SpineDisc<LEVEL>`` maps of one kind under ``output_dir``, with their QC verdict.

    ``--warp both`` writes two maps of each disc: fitted in atlas space (no ``label``) and the
    native map warped (``label-warped``). Mixing them would count a subject twice (and pair a
    session with its own copy over time), so only the unlabelled maps are returned, or only the
    ``label-warped`` ones when ``warped``.
    """
    found = []
    for path in sorted(Path(output_dir).glob("sub-*/**/anat/*_space-SpineDisc*.nii*")):
        parsed = parse_name(path.name)
        if parsed is None or parsed[1] not in MAP_QUANTITIES or "desc" in parsed[0]:
            continue
        ent, suffix = parsed
        if ent.get("label") != ("warped" if warped else None):
            continue
        match = _SPACE.match(ent.get("space", ""))
        if match is None:
            continue
        qc = read_json(path.with_name(re.sub(r"\.nii(\.gz)?$", ".json", path.name)))
        passed = bool(qc.get("RegistrationQC", {}).get("Passed", True))
        found.append(AtlasMap(f"sub-{ent['sub']}", f"ses-{ent['ses']}" if "ses" in ent else None,
                              ent.get("acq"), match.group(1), suffix, path, passed))
    return found


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the table ({err})", path=path,
                         fix="write a tab-separated table with n/a for missing values") from None


def read_variables(bids_dir: Path | None) -> tuple[pd.DataFrame, pd.DataFrame, list[pd.DataFrame]]:
    """(participants, sessions, phenotype tables) of the raw dataset (empty when absent)."""
    if bids_dir is None:
        return pd.DataFrame(columns=["participant_id"]), pd.DataFrame(columns=KEYS), []
    bids_dir = Path(bids_dir)
    subjects = read_participants(bids_dir)
    if subjects is None:
        subjects = pd.DataFrame(columns=["participant_id"])
    else:
        subjects = _read_tsv(bids_dir / "participants.tsv")
    sessions = []
    for path in sorted(bids_dir.glob("sub-*/sub-*_sessions.tsv")):
        table = _read_tsv(path)
        if "session_id" in table.columns:
            sessions.append(table.assign(participant_id=path.parent.name))
    phenotype = [_read_tsv(p) for p in sorted((bids_dir / "phenotype").glob("*.tsv"))]
    phenotype = [t for t in phenotype if "participant_id" in t.columns]
    return (subjects, pd.concat(sessions, ignore_index=True) if sessions
            else pd.DataFrame(columns=KEYS), phenotype)


def variables_at(units: pd.DataFrame, level: str,
                 tables: tuple[pd.DataFrame, pd.DataFrame, list[pd.DataFrame]]) -> pd.DataFrame:
    """Columns of every table for each (participant_id, session_id) row of ``units``.

    Session values override participant values of the same name; phenotype rows are matched
    on the keys they have, and on ``level`` when they have a level column.
    """
    subjects, sessions, phenotype = tables
    out = units[KEYS].copy()
    out = out.merge(subjects.drop_duplicates("participant_id"), on="participant_id", how="left")
    if len(sessions):
        out = _override(out, sessions, KEYS)
    for table in phenotype:
        if "level" in table.columns:
            table = table[table["level"].astype(str) == level].drop(columns="level")
        keys = [k for k in KEYS if k in table.columns]
        out = _override(out, table.drop_duplicates(keys), keys)
    return out


def _override(out: pd.DataFrame, table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    table = table.astype({k: object for k in keys})
    merged = out.astype({k: object for k in keys}).merge(table, on=keys, how="left",
                                                         suffixes=("", "__new"))
    for column in [c for c in merged.columns if c.endswith("__new")]:
        base = column.removesuffix("__new")
        merged[base] = merged[column].where(merged[column].notna(), merged[base])
        merged = merged.drop(columns=column)
    return merged


@dataclass
class Outcome:
    """One analysis x level x map x contrast: where its files are and the headline numbers."""

    analysis: str
    kind: str
    level: str
    map: str
    acq: str | None
    contrast: str
    prefix: Path
    n_subjects: int
    n_voxels: int
    summary: dict[str, Any]
    background: np.ndarray | None = None
    stat: np.ndarray | None = None
    significant: np.ndarray | None = None
    affine: np.ndarray | None = None
    clusters: pd.DataFrame = field(default_factory=pd.DataFrame)
    note: str = ""


def _units(maps: list[AtlasMap], kind: str) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Rows analysed (one per subject, or first/last session pairs) and exclusions.

    A subject's maps are taken one per session (the first by name); a time analysis pairs its
    first and last distinct sessions, and excludes a subject with fewer than two.
    """
    by_subject: dict[str, dict[str | None, AtlasMap]] = {}
    for m in sorted(maps, key=lambda m: (m.participant_id, m.session_id or "", m.path.name)):
        by_subject.setdefault(m.participant_id, {}).setdefault(m.session_id, m)
    rows, excluded = [], []
    for pid, sessions in by_subject.items():
        items = list(sessions.values())
        chosen = [items[0], items[-1]] if kind == "time" else [items[0]]
        if kind == "time" and len(items) < 2:
            reason = f"only one session ({items[0].session_id or 'no session entity'})"
            LOG.info("group: %s left out of the time analysis: %s", pid, reason)
            excluded.append({"participant_id": pid, "reason": reason})
            continue
        failed = [m for m in chosen if not m.passed]
        if failed:
            excluded.append({"participant_id": pid,
                             "reason": f"RegistrationQC failed: {failed[0].path.name}"})
            continue
        rows.append({"participant_id": pid, "acq": chosen[0].acq,
                     "session_id": chosen[0].session_id,
                     "session_last": chosen[-1].session_id, "path": chosen[0].path,
                     "path_last": chosen[-1].path})
    return pd.DataFrame(rows), excluded


def _load(paths: Sequence[Path], ranges: tuple[float, float]) -> tuple[np.ndarray, nib.Nifti1Image]:
    """(subjects x grid voxels, NaN outside the inclusion range) and the first image."""
    first = nib.load(paths[0])
    out = np.empty((len(paths), int(np.prod(first.shape[:3]))))
    for k, path in enumerate(paths):
        img = nib.load(path)
        if img.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine,
                                                               atol=1e-4):
            raise InputError(f"atlas-space map grid {img.shape} differs from {paths[0].name}",
                             path=path, fix="maps of one disc level must share the atlas grid")
        values = np.asarray(img.get_fdata(dtype=np.float32), dtype=float).reshape(-1)
        with np.errstate(invalid="ignore"):
            keep = np.isfinite(values) & (values > ranges[0]) & (values < ranges[1])
        out[k] = np.where(keep, values, np.nan)
    return out, first


@dataclass
class Design:
    """The design matrix of one analysis on its units, and its column names."""

    matrix: np.ndarray
    columns: list[str]
    groups: pd.Series | None = None  # group labels (voxel-by-group)
    map_column: int | None = None


def build_design(analysis: Analysis, variables: pd.DataFrame, site_mode: str
                 ) -> tuple[Design | None, list[dict[str, Any]], pd.Series]:
    """(design, exclusions for missing variables, keep mask of the units)."""
    needed = [r for r in analysis.regressors if r != "1" and not r.startswith("map:")]
    for column in needed:
        if column not in variables.columns:
            raise UsageError(f"analysis {analysis.name}: no column {column!r} in "
                             "participants.tsv, sessions.tsv or phenotype/",
                             fix="name an existing column in the model or shortcut")
    keep = variables[needed].notna().all(axis=1) if needed else pd.Series(True, variables.index)
    excluded = [{"participant_id": pid, "reason": "missing " + ", ".join(
        c for c in needed if pd.isna(row[c]))}
        for pid, (_, row) in zip(variables["participant_id"], variables.iterrows(), strict=True)
        if not keep.loc[_]]
    frame = variables[keep].reset_index(drop=True)
    columns, blocks = [], []
    groups = None
    map_column = None
    for reg in analysis.regressors:
        if reg == "1":
            columns.append("1")
            blocks.append(np.ones(len(frame)))
        elif reg.startswith("map:"):
            map_column = len(columns)
            columns.append(reg)
            blocks.append(np.zeros(len(frame)))
        elif analysis.kind == "group" and reg == analysis.contrasts[0].conditions[0]:
            values, groups = _group_indicator(analysis, frame[reg])
            columns.append(reg)
            blocks.append(values)
        else:
            numeric = pd.to_numeric(frame[reg], errors="coerce")
            if numeric.notna().all():
                columns.append(reg)
                blocks.append((numeric - numeric.mean()).to_numpy(dtype=float))
            else:
                dummies = pd.get_dummies(frame[reg].astype(str), drop_first=True, dtype=float)
                for name in dummies.columns:
                    columns.append(f"{reg}[{name}]")
                    blocks.append(dummies[name].to_numpy() - dummies[name].mean())
    if (site_mode == "covariate" and "site" in frame.columns and "site" not in needed
            and frame["site"].nunique() > 1):
        dummies = pd.get_dummies(frame["site"].astype(str), drop_first=True, dtype=float)
        for name in dummies.columns:
            columns.append(f"site[{name}]")
            blocks.append(dummies[name].to_numpy() - dummies[name].mean())
    if not len(frame):
        return None, excluded, keep
    return (Design(np.column_stack(blocks), columns, groups, map_column), excluded, keep)


def _group_indicator(analysis: Analysis, values: pd.Series) -> tuple[np.ndarray, pd.Series]:
    if analysis.threshold is not None:
        numeric = pd.to_numeric(values, errors="coerce")
        high = numeric > analysis.threshold
        labels = np.where(high, f"gt{analysis.threshold:g}", f"le{analysis.threshold:g}")
        return high.to_numpy(dtype=float), pd.Series(labels)
    levels = sorted(values.astype(str).unique())
    if len(levels) != 2:
        raise UsageError(f"analysis {analysis.name}: column {values.name!r} has "
                         f"{len(levels)} levels, a group comparison needs 2",
                         fix="give COLUMN:THRESHOLD (e.g. odi:40) to split a number")
    return (values.astype(str) == levels[1]).to_numpy(dtype=float), values.astype(str)


def contrast_vector(design: Design, contrast: Contrast) -> np.ndarray:
    """Weights of ``contrast`` on the design's columns."""
    vector = np.zeros(len(design.columns))
    for name, weight in zip(contrast.conditions, contrast.weights, strict=True):
        if name not in design.columns:
            raise UsageError(f"contrast {contrast.name}: {name!r} is categorical or absent; "
                             "contrasts weight numeric columns, the group column, map: or 1")
        vector[design.columns.index(name)] = weight
    return vector


def _impute(data: np.ndarray) -> np.ndarray:
    means = np.nanmean(np.where(np.isfinite(data), data, np.nan), axis=0)
    return np.where(np.isfinite(data), data, means[None])


def run_analyses(output_dir: Path, bids_dir: Path | None, model: GroupModel, *,
                 n_procs: int = 1, participants: Sequence[str] = (),
                 warped: bool = False) -> list[Outcome]:
    """Run every analysis of ``model`` on the atlas-space maps of ``output_dir`` (the
    ``label-warped`` ones when ``warped``, see :func:`find_atlas_maps`)."""
    output_dir = Path(output_dir)
    maps = find_atlas_maps(output_dir, warped=warped)
    if participants:
        wanted = {f"sub-{p.removeprefix('sub-')}" for p in participants}
        maps = [m for m in maps if m.participant_id in wanted]
    tables = read_variables(bids_dir)
    outcomes: list[Outcome] = []
    root = output_dir / "group"
    atomic_write_json(to_bids_stats_model(model), root / f"model-{model.name}_smdl.json")
    for analysis in model.analyses:
        subject_rows: list[dict[str, Any]] = []
        for level, suffix in sorted({(m.level, m.suffix) for m in maps}):
            if analysis.levels and level not in analysis.levels:
                continue
            if analysis.maps and suffix not in analysis.maps:
                continue
            if analysis.kind == "map" and f"map:{suffix}" in analysis.regressors:
                continue
            selected = _one_acquisition_per_subject(
                [m for m in maps if (m.level, m.suffix) == (level, suffix)])
            acqs = sorted({m.acq or "" for m in selected})
            acq = (acqs[0] or None) if len(acqs) == 1 else None  # named only when single
            outcomes += _run_one(analysis, model.inference, selected, maps, level, suffix,
                                 acq, tables, root, n_procs, subject_rows)
        if subject_rows:
            frame = pd.DataFrame(subject_rows)
            atomic_write_text(frame.to_csv(sep="\t", index=False, na_rep="n/a"),
                              root / analysis.name / f"{analysis.name}_subjects.tsv")
    return outcomes


def _one_acquisition_per_subject(maps: list[AtlasMap]) -> list[AtlasMap]:
    """Each subject's maps from one acquisition only: the first by name."""
    first: dict[str, str | None] = {}
    for m in sorted(maps, key=lambda m: m.acq or ""):
        first.setdefault(m.participant_id, m.acq)
    return [m for m in maps if m.acq == first[m.participant_id]]


def _other_map(analysis: Analysis, maps: list[AtlasMap], level: str,
               units: pd.DataFrame) -> tuple[list[Path | None], str]:
    other = next(r for r in analysis.regressors if r.startswith("map:")).removeprefix("map:")
    index = {(m.participant_id, m.session_id): m for m in maps
             if m.level == level and m.suffix == other}
    paths = []
    for pid, ses in zip(units["participant_id"], units["session_id"], strict=True):
        m = index.get((pid, ses))
        paths.append(m.path if m is not None and m.passed else None)
    return paths, other


def _run_one(analysis: Analysis, inference: Inference, selected: list[AtlasMap],
             all_maps: list[AtlasMap], level: str, suffix: str, acq: str | None,
             tables: tuple[pd.DataFrame, pd.DataFrame, list[pd.DataFrame]], root: Path,
             n_procs: int, subject_rows: list[dict[str, Any]]) -> list[Outcome]:
    units, excluded = _units(selected, analysis.kind)
    tag = {"level": level, "map": suffix, "acq": acq}
    other_paths: list[Path | None] = []
    other = ""
    if len(units) and analysis.kind == "map":
        other_paths, other = _other_map(analysis, all_maps, level, units)
        missing = [p is None for p in other_paths]
        excluded += [{"participant_id": pid, "reason": f"no {other} map passing QC"}
                     for pid, gone in zip(units["participant_id"], missing, strict=True) if gone]
        units = units[~np.asarray(missing, dtype=bool)].reset_index(drop=True)
        other_paths = [p for p in other_paths if p is not None]
    design = None
    if len(units):
        variables = variables_at(units, level, tables)
        if analysis.kind == "time":
            variables = _changes(analysis, units, level, tables, variables)
        design, missing_rows, keep = build_design(analysis, variables, analysis.site)
        excluded += missing_rows
        units = units[keep.to_numpy()].reset_index(drop=True)
        if analysis.kind == "map":
            other_paths = [p for p, k in zip(other_paths, keep.to_numpy(), strict=True) if k]
        sites = variables[keep]["site"].reset_index(drop=True) if "site" in variables else None
    subject_rows += [{**tag, "acq": unit_acq, "participant_id": pid, "session_id": ses,
                      "used": True, "reason": "n/a"}
                     for pid, ses, unit_acq in zip(units.get("participant_id", []),
                                                   units.get("session_id", []),
                                                   units.get("acq", []), strict=True)]
    subject_rows += [{**tag, "participant_id": e["participant_id"], "session_id": None,
                      "used": False, "reason": e["reason"]} for e in excluded]
    n_params = 0 if design is None else np.linalg.matrix_rank(design.matrix)
    if design is None or len(units) < n_params + 3:
        LOG.warning("group: %s %s %s skipped: %d subjects", analysis.name, level, suffix,
                    len(units))
        return [Outcome(analysis.name, analysis.kind, level, suffix, acq, c.name, Path(),
                        len(units), 0, {}, note=f"skipped: {len(units)} usable subjects")
                for c in analysis.contrasts]
    rng_range = inference.ranges.get(suffix, (0.0, np.inf))
    data, ref = _load(list(units["path"]), rng_range)
    grid = ref.shape[:3]
    if analysis.kind == "time":
        last, _ = _load(list(units["path_last"]), rng_range)
        first_data, data = data, last - data
    regressor = None
    if analysis.kind == "map":
        regressor, _ = _load(other_paths, inference.ranges.get(other, (0.0, np.inf)))
    valid = np.isfinite(data) if regressor is None else np.isfinite(data) & np.isfinite(
        regressor)
    need = max(min(inference.min_subjects, len(units)), n_params + 2)
    mask = valid.sum(axis=0) >= need
    if not mask.any():
        return [Outcome(analysis.name, analysis.kind, level, suffix, acq, c.name, Path(),
                        len(units), 0, {}, note=f"no voxel has {need} subjects")
                for c in analysis.contrasts]
    mask3d = mask.reshape(grid)
    y = data[:, mask]
    w = None if regressor is None else regressor[:, mask]
    y_perm = _impute(y)
    w_perm = None if w is None else _impute(w)
    site_info: dict[str, Any] = {"Mode": analysis.site}
    nuisance = np.column_stack([np.ones(len(units))] + [
        design.matrix[:, k] for k, name in enumerate(design.columns)
        if name != "1" and not name.startswith(("site[", "map:"))])
    if sites is not None and sites.nunique() > 1:
        site_info["Before"] = harmonise.site_effect(y_perm, sites, nuisance)
        if analysis.site == "combat":
            covars = pd.DataFrame({name: design.matrix[:, k] for k, name in
                                   enumerate(design.columns) if name not in ("1",)
                                   and not name.startswith("map:")})
            y_perm = harmonise.combat(y_perm, sites, covars)
            y = np.where(np.isfinite(y), y_perm, np.nan)
            if w_perm is not None:
                w_perm = harmonise.combat(w_perm, sites, covars)
                w = np.where(np.isfinite(w), w_perm, np.nan)
            site_info["After"] = harmonise.site_effect(y_perm, sites, nuisance)
    outcomes = []
    for contrast in analysis.contrasts:
        vector = contrast_vector(design, contrast)
        outcomes.append(_infer(analysis, inference, contrast, vector, design, units, excluded,
                               y, y_perm, w, w_perm, mask3d, ref, root, tag, site_info,
                               n_procs, first_data[:, mask] if analysis.kind == "time"
                               else None))
    return outcomes


def _changes(analysis: Analysis, units: pd.DataFrame, level: str,
             tables: tuple[pd.DataFrame, pd.DataFrame, list[pd.DataFrame]],
             variables: pd.DataFrame) -> pd.DataFrame:
    """For time analyses: tested columns become last-minus-first session changes."""
    last = variables_at(units.assign(session_id=units["session_last"]), level, tables)
    out = variables.copy()
    tested = {c for con in analysis.contrasts for c in con.conditions if c != "1"}
    for column in tested:
        if column in out.columns:
            out[column] = (pd.to_numeric(last[column], errors="coerce")
                           - pd.to_numeric(out[column], errors="coerce"))
    return out


def _infer(analysis: Analysis, inference: Inference, contrast: Contrast, vector: np.ndarray,
           design: Design, units: pd.DataFrame, excluded: list[dict[str, Any]], y: np.ndarray,
           y_perm: np.ndarray, w: np.ndarray | None, w_perm: np.ndarray | None,
           mask3d: np.ndarray, ref: nib.Nifti1Image, root: Path, tag: dict[str, Any],
           site_info: dict[str, Any], n_procs: int, first: np.ndarray | None) -> Outcome:
    """Parametric and permutation inference of one contrast; writes its files."""
    level, suffix, acq = tag["level"], tag["map"], tag["acq"]
    n = len(units)
    if w is not None:
        if vector[design.map_column] == 0 or np.count_nonzero(vector) != 1:
            raise UsageError(f"analysis {analysis.name}: a voxel-by-voxel contrast must weight "
                             "the map: regressor alone")
        fit = fit_contrast(design.matrix, y, vector, voxel_regressor=w,
                           column=design.map_column)
        z = np.delete(design.matrix, design.map_column, axis=1)
        x = w_perm
    else:
        fit = fit_contrast(design.matrix, y, vector)
        x, z = partition(design.matrix, vector)
    # a test of the intercept (mean change) is invariant to permutations: flip signs instead
    sign_flip = any(c == "1" and wt for c, wt in zip(contrast.conditions, contrast.weights,
                                                     strict=True))
    dof = float(n - np.linalg.matrix_rank(np.column_stack([x if x.ndim == 1 else x[:, 0], z])))
    cluster_t = t_threshold(inference.cluster_forming_p, dof)
    transforms = make_transforms(n, inference.permutations, inference.seed, sign_flip=sign_flip)
    perm = freedman_lane(x, z, y_perm, transforms, mask3d=mask3d, tfce=inference.tfce,
                         cluster_threshold=cluster_t, n_procs=n_procs)
    maps: dict[str, np.ndarray] = {
        "effect": fit.effect * 1e3, "t": fit.t, "r": fit.r, "p": fit.p, "pfdr": fdr_bh(fit.p),
        "pbonferroni": bonferroni(fit.p), "pfwe": perm.p_fwe, "n": fit.n.astype(float)}
    if perm.tfce is not None:
        maps["tfce"], maps["ptfce"] = perm.tfce, perm.p_tfce
    labels, found = clusters(perm.t, mask3d, cluster_t)
    p_cluster = np.ones(labels.size)
    for k, (_, idx) in enumerate(found, start=1):
        p_cluster[labels == k] = perm.cluster_p(idx.size)
    maps["pcluster"] = np.where(labels > 0, p_cluster, 1.0)
    maps.update(_means(analysis, design, y, w, first))
    name = "_".join(["space-SpineDisc" + level] + ([f"acq-{acq}"] if acq else [])
                     + [f"desc-{suffix}", f"contrast-{contrast.name}"])
    folder = root / analysis.name
    prefix = folder / f"{analysis.name}_{name}"
    roi = _roi(design, y, w, vector)
    table = _cluster_table(found, perm, fit, maps["pcluster"], mask3d, ref.affine)
    sidecar = {
        "Analysis": analysis.name, "Kind": analysis.kind, "Level": level, "Map": suffix,
        "Acquisition": sorted({a for a in units["acq"] if isinstance(a, str)}),
        "Contrast": {"Name": contrast.name, "ConditionList": list(contrast.conditions),
                     "Weights": list(contrast.weights)},
        "DesignColumns": design.columns, "Test": "t, two-sided",
        "Subjects": [f"{p}" + (f"_{s}" if isinstance(s, str) else "")
                     for p, s in zip(units["participant_id"], units["session_id"],
                                     strict=True)],
        "Sources": list(dict.fromkeys(  # the maps analysed (both sessions' for "time")
            f"bids::{Path(p).relative_to(root.parent).as_posix()}"
            for column in ("path", "path_last") if column in units for p in units[column])),
        "Excluded": excluded, "NSubjects": n, "DegreesOfFreedom": dof,
        "Units": {"effect": "ms per unit of the tested regressor", "r": "partial correlation"},
        "InclusionRange": list(inference.ranges.get(suffix, (0.0, float("inf")))),
        "MinSubjects": inference.min_subjects, "Site": site_info,
        "Correction": {
            "pfdr": "Benjamini-Hochberg over analysed voxels",
            "pbonferroni": "Bonferroni over analysed voxels",
            "pfwe": "permutation max-T (family-wise)", "ptfce": "permutation max-TFCE",
            "pcluster": "permutation max cluster extent"},
        "Permutation": {"Scheme": "sign flipping" if sign_flip else "Freedman-Lane",
                        "Count": inference.permutations, "Seed": inference.seed,
                        "MissingValues": "voxel mean of the other subjects"},
        "TFCE": {"E": TFCE_E, "H": TFCE_H, "Steps": TFCE_STEPS, "Connectivity": 6},
        "ClusterForming": {"P": inference.cluster_forming_p, "T": cluster_t},
        "ROI": roi,
    }
    _write_maps(prefix, maps, mask3d, ref, sidecar)
    atomic_write_text(table.to_csv(sep="\t", index=False, na_rep="n/a"),
                      Path(f"{prefix}_clusters.tsv"))
    alpha = inference.alpha
    significant = (maps["pfwe"] < alpha) if perm.tfce is None else (maps["ptfce"] < alpha)
    summary = {
        "n_subjects": n, "n_voxels": int(mask3d.sum()), "min_p": float(np.nanmin(fit.p)),
        "max_abs_t": float(np.nanmax(np.abs(fit.t))),
        "n_fdr": int(np.nansum(maps["pfdr"] < alpha)),
        "n_bonferroni": int(np.nansum(maps["pbonferroni"] < alpha)),
        "n_fwe": int((perm.p_fwe < alpha).sum()),
        "n_tfce": int((perm.p_tfce < alpha).sum()) if perm.p_tfce is not None else None,
        "n_clusters": int(sum(perm.cluster_p(idx.size) < alpha for _, idx in found)),
        "roi_effect_ms": roi["effect_ms"], "roi_t": roi["t"], "roi_r": roi["r"],
        "roi_p": roi["p"],
        "site_eta2_before": site_info.get("Before", {}).get("median_partial_eta2"),
        "site_eta2_after": site_info.get("After", {}).get("median_partial_eta2"),
    }
    background = maps.get("meanall", next(v for k, v in maps.items() if k.startswith("mean")))
    return Outcome(analysis.name, analysis.kind, level, suffix, acq, contrast.name, prefix, n,
                   int(mask3d.sum()), summary, background=_volume(background, mask3d),
                   stat=_volume(fit.t, mask3d), significant=_volume(significant, mask3d) > 0,
                   affine=ref.affine, clusters=table)


def _means(analysis: Analysis, design: Design, y: np.ndarray, w: np.ndarray | None,
           first: np.ndarray | None) -> dict[str, np.ndarray]:
    """Mean and SD maps (ms): per group, of both maps, or of change and baseline."""
    out = {"meanall": np.nanmean(y, axis=0) * 1e3, "sdall": np.nanstd(y, axis=0, ddof=1) * 1e3}
    if design.groups is not None:
        for group in sorted(design.groups.unique()):
            rows = (design.groups == group).to_numpy()
            out[f"mean{group}"] = np.nanmean(y[rows], axis=0) * 1e3
            out[f"sd{group}"] = np.nanstd(y[rows], axis=0, ddof=1) * 1e3
    if w is not None:
        out["meanregressor"] = np.nanmean(w, axis=0) * 1e3
    if first is not None:
        out["meanbaseline"] = np.nanmean(first, axis=0) * 1e3
    return out


def _roi(design: Design, y: np.ndarray, w: np.ndarray | None, vector: np.ndarray
         ) -> dict[str, float]:
    """The same contrast on each subject's mean over the analysed voxels (the baseline)."""
    means = np.nanmean(y, axis=1, keepdims=True)
    kwargs: dict[str, Any] = {}
    if w is not None:
        kwargs = {"voxel_regressor": np.nanmean(w, axis=1, keepdims=True),
                  "column": design.map_column}
    fit = fit_contrast(design.matrix, means, vector, **kwargs)
    return {"effect_ms": float(fit.effect[0] * 1e3), "t": float(fit.t[0]),
            "r": float(fit.r[0]), "p": float(fit.p[0])}


def _volume(values: np.ndarray, mask3d: np.ndarray) -> np.ndarray:
    out = np.full(mask3d.shape, np.nan, dtype=np.float32)
    out[mask3d] = values
    return out


def _write_maps(prefix: Path, maps: dict[str, np.ndarray], mask3d: np.ndarray,
                ref: nib.Nifti1Image, sidecar: dict[str, Any]) -> None:
    for stat, values in maps.items():
        path = Path(f"{prefix}_stat-{stat}_statmap.nii.gz")
        atomic_write_nifti(nib.Nifti1Image(_volume(values, mask3d), ref.affine), path)
        atomic_write_json({**sidecar, "Statistic": stat},
                          path.with_name(path.name.replace(".nii.gz", ".json")))


def _cluster_table(found: list[tuple[int, np.ndarray]], perm: Any, fit: Any,
                   p_cluster: np.ndarray, mask3d: np.ndarray, affine: np.ndarray
                   ) -> pd.DataFrame:
    """One row per supra-threshold cluster: size, P, peak voxel and its statistics."""
    coords = np.argwhere(mask3d)
    rows = []
    for k, (sign, idx) in enumerate(found, start=1):
        peak = idx[np.argmax(np.abs(perm.t[idx]))]
        ijk = coords[peak]
        xyz = nib.affines.apply_affine(affine, ijk)
        rows.append({"cluster": k, "sign": "+" if sign > 0 else "-", "n_voxels": idx.size,
                     "p_fwe_cluster": float(p_cluster[idx[0]]), "peak_i": int(ijk[0]),
                     "peak_j": int(ijk[1]), "peak_k": int(ijk[2]), "peak_x_mm": xyz[0],
                     "peak_y_mm": xyz[1], "peak_z_mm": xyz[2], "peak_t": float(fit.t[peak]),
                     "peak_r": float(fit.r[peak]), "peak_p": float(fit.p[peak]),
                     "peak_p_fwe": float(perm.p_fwe[peak]),
                     "mean_effect_ms": float(np.nanmean(fit.effect[idx]) * 1e3)})
    columns = ["cluster", "sign", "n_voxels", "p_fwe_cluster", "peak_i", "peak_j", "peak_k",
               "peak_x_mm", "peak_y_mm", "peak_z_mm", "peak_t", "peak_r", "peak_p",
               "peak_p_fwe", "mean_effect_ms"]
    return pd.DataFrame(rows, columns=columns)


def summary_table(outcomes: Sequence[Outcome]) -> pd.DataFrame:
    """One row per outcome (``group/desc-voxelwise_statistics.tsv``)."""
    rows = []
    for o in outcomes:
        rows.append({"analysis": o.analysis, "kind": o.kind, "level": o.level, "map": o.map,
                     "acq": o.acq, "contrast": o.contrast, **o.summary, "note": o.note or None,
                     "prefix": o.prefix.name if o.summary else None})
    return pd.DataFrame(rows)
