"""Group models: a BIDS Stats Models file (or command-line shortcuts) -> analyses to run.

A model is a BIDS Stats Models JSON document. Each node is one analysis: ``Model.X`` lists the
regressors (``1`` the intercept, column names of participants.tsv / sessions.tsv /
phenotype/*.tsv, ``map:<suffix>`` the same voxel of another map), ``Contrasts`` the t tests
(``ConditionList`` + ``Weights``). spineqprep's own settings go in a ``"spineqprep"`` object
of the node (``Analysis``: variable | group | map | time, ``Maps``, ``Levels``, ``Threshold``,
``Site``) and of the document (``Permutations``, ``Seed``, ``Alpha``, ``TFCE``,
``ClusterFormingP``, ``MinSubjects``, ``InclusionRange``).

- variable: correlation (partial, given the other regressors) of each voxel with a column;
- group: two groups from a two-level column, or ``column > Threshold`` vs ``<=``;
- map: per voxel, another map of the same subjects (``map:T2map``) as the regressor;
- time: per subject, last minus first session; ``1`` tests the mean change (sign flips), a
  column tests the association with that column's change between the same sessions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spineqprep.errors import UsageError
from spineqprep.relaxometry.regions import INCLUSION_RANGES

KINDS = ("variable", "group", "map", "time")
SITE_MODES = ("covariate", "combat", "none")
#: published inclusion ranges (seconds): T1rho < 200 ms, T2 < 150 ms (Iriondo et al. 2020).
DEFAULT_RANGES: dict[str, tuple[float, float]] = dict(INCLUSION_RANGES)
_LABEL = re.compile(r"[^a-zA-Z0-9]")


@dataclass(frozen=True)
class Contrast:
    """A t contrast over named regressors."""

    name: str
    conditions: tuple[str, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Analysis:
    """One node: regressors, contrasts and what data it applies to."""

    name: str
    kind: str
    regressors: tuple[str, ...]  # "1", column names, "map:<suffix>"
    contrasts: tuple[Contrast, ...]
    maps: tuple[str, ...] = ()  # map suffixes analysed (empty: all)
    levels: tuple[str, ...] = ()  # disc levels (empty: all)
    threshold: float | None = None  # group: column > threshold vs <= threshold
    site: str = "covariate"

    @property
    def covariates(self) -> tuple[str, ...]:
        """Regressors that no contrast weights (besides the intercept)."""
        tested = {c for con in self.contrasts for c, w in zip(con.conditions, con.weights,
                                                              strict=True) if w}
        return tuple(r for r in self.regressors if r != "1" and r not in tested)


@dataclass(frozen=True)
class Inference:
    """How P values are computed and corrected."""

    permutations: int = 1000
    seed: int = 0
    alpha: float = 0.05
    tfce: bool = True
    cluster_forming_p: float = 0.001
    min_subjects: int = 10
    ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RANGES))


@dataclass(frozen=True)
class GroupModel:
    """All analyses of one group-level run."""

    name: str
    analyses: tuple[Analysis, ...]
    inference: Inference = Inference()


def label(text: str) -> str:
    """A BIDS label (alphanumeric) made from ``text``."""
    return _LABEL.sub("", text) or "x"


def _node(node: dict[str, Any], index: int, path: Path) -> Analysis:
    ext = node.get("spineqprep", {})
    name = label(str(node.get("Name", f"analysis{index + 1}")))
    kind = ext.get("Analysis", "variable")
    if kind not in KINDS:
        raise UsageError(f"node {name}: Analysis must be one of {', '.join(KINDS)}", path=path)
    x = node.get("Model", {}).get("X")
    if not isinstance(x, list) or not x:
        raise UsageError(f"node {name}: Model.X must list the regressors", path=path,
                         fix='e.g. "X": [1, "odi", "age", "sex"]')
    regressors = tuple("1" if str(v) == "1" else str(v) for v in x)
    contrasts = []
    for k, con in enumerate(node.get("Contrasts", [])):
        conditions = tuple(str(c) for c in con.get("ConditionList", []))
        weights = tuple(float(w) for w in con.get("Weights", [1.0] * len(conditions)))
        if con.get("Test", "t") != "t":
            raise UsageError(f"node {name}: only t contrasts are supported", path=path)
        if not conditions or len(weights) != len(conditions) or not set(conditions) <= set(
                regressors):
            raise UsageError(f"node {name}: contrast {k + 1} must weight regressors of Model.X",
                             path=path)
        contrasts.append(Contrast(label(str(con.get("Name", conditions[0]))), conditions,
                                  weights))
    if not contrasts:
        raise UsageError(f"node {name}: no contrast", path=path,
                         fix='add "Contrasts": [{"Name": ..., "ConditionList": [...], '
                             '"Weights": [1], "Test": "t"}]')
    site = ext.get("Site", "covariate")
    if site not in SITE_MODES:
        raise UsageError(f"node {name}: Site must be one of {', '.join(SITE_MODES)}", path=path)
    threshold = ext.get("Threshold")
    return Analysis(name=name, kind=kind, regressors=regressors, contrasts=tuple(contrasts),
                    maps=tuple(ext.get("Maps", ())), levels=tuple(ext.get("Levels", ())),
                    threshold=None if threshold is None else float(threshold), site=site)


def load_model(path: Path) -> GroupModel:
    """Read a BIDS Stats Models JSON file; mistakes are :class:`UsageError` naming the fix."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError("group model file not found", path=path) from None
    except json.JSONDecodeError as err:
        raise UsageError(f"not valid JSON ({err})", path=path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Nodes"), list) or not doc["Nodes"]:
        raise UsageError("a group model needs a list of Nodes", path=path,
                         fix="follow BIDS Stats Models; see docs/statistics.md")
    ext = doc.get("spineqprep", {})
    ranges = dict(DEFAULT_RANGES)
    for key, value in ext.get("InclusionRange", {}).items():
        ranges[key] = (float(value[0]), float(value[1]))
    inference = Inference(
        permutations=int(ext.get("Permutations", 1000)), seed=int(ext.get("Seed", 0)),
        alpha=float(ext.get("Alpha", 0.05)), tfce=bool(ext.get("TFCE", True)),
        cluster_forming_p=float(ext.get("ClusterFormingP", 0.001)),
        min_subjects=int(ext.get("MinSubjects", 10)), ranges=ranges)
    analyses = tuple(_node(node, k, path) for k, node in enumerate(doc["Nodes"]))
    if len({a.name for a in analyses}) != len(analyses):
        raise UsageError("node names must be unique", path=path)
    return GroupModel(name=label(str(doc.get("Name", "model"))), analyses=analyses,
                      inference=inference)


def to_bids_stats_model(model: GroupModel) -> dict[str, Any]:
    """The model as a BIDS Stats Models document (written beside the outputs)."""
    nodes = []
    for a in model.analyses:
        ext: dict[str, Any] = {"Analysis": a.kind, "Site": a.site}
        if a.maps:
            ext["Maps"] = list(a.maps)
        if a.levels:
            ext["Levels"] = list(a.levels)
        if a.threshold is not None:
            ext["Threshold"] = a.threshold
        nodes.append({
            "Level": "Subject" if a.kind == "time" else "Dataset", "Name": a.name,
            "Model": {"Type": "glm", "X": [1 if r == "1" else r for r in a.regressors]},
            "Contrasts": [{"Name": c.name, "ConditionList": list(c.conditions),
                           "Weights": list(c.weights), "Test": "t"} for c in a.contrasts],
            "spineqprep": ext})
    inf = model.inference
    return {"Name": model.name, "BIDSModelVersion": "1.0.0", "Nodes": nodes, "spineqprep": {
        "Permutations": inf.permutations, "Seed": inf.seed, "Alpha": inf.alpha,
        "TFCE": inf.tfce, "ClusterFormingP": inf.cluster_forming_p,
        "MinSubjects": inf.min_subjects,
        "InclusionRange": {k: list(v) for k, v in inf.ranges.items()}}}


def _simple(name: str, kind: str, tested: str, covariates: Sequence[str], site: str,
            threshold: float | None = None) -> Analysis:
    regressors = ("1", tested, *[c for c in covariates if c != tested])
    return Analysis(name=label(name), kind=kind, regressors=regressors,
                    contrasts=(Contrast(label(tested.removeprefix("map:")), (tested,), (1.0,)),),
                    threshold=threshold, site=site)


def shortcut_model(*, variables: Sequence[str] = (), compare: Sequence[str] = (),
                   map_pairs: Sequence[str] = (), longitudinal: Sequence[str] | None = None,
                   covariates: Sequence[str] = (), site: str = "covariate",
                   inference: Inference | None = None) -> GroupModel:
    """The model of the command-line shortcuts.

    ``variables``: columns to correlate with; ``compare``: ``column`` (two levels) or
    ``column:threshold``; ``map_pairs``: ``T1rho:T2map`` (first map analysed, second the
    per-voxel regressor); ``longitudinal``: ``[]`` for the mean change only, or columns whose
    change is tested (the mean change is always included).
    """
    analyses: list[Analysis] = []
    for var in variables:
        analyses.append(_simple(f"corr{var}", "variable", var, covariates, site))
    for spec in compare:
        column, _, thr = spec.partition(":")
        try:
            threshold = float(thr) if thr else None
        except ValueError:
            raise UsageError(f"--group-compare {spec}: the threshold is not a number",
                             fix="write COLUMN or COLUMN:THRESHOLD, e.g. odi:40") from None
        analyses.append(_simple(f"compare{column}", "group", column, covariates, site,
                                threshold))
    for spec in map_pairs:
        first, _, second = spec.partition(":")
        if not first or not second:
            raise UsageError(f"--group-map-pair {spec}: give two map suffixes",
                             fix="e.g. --group-map-pair T1rho:T2map")
        analysis = _simple(f"couple{first}{second}", "map", f"map:{second}", covariates, site)
        analyses.append(replace(analysis, maps=(first,)))
    if longitudinal is not None:
        analyses.append(Analysis(name="change", kind="time", regressors=("1",),
                                 contrasts=(Contrast("meanchange", ("1",), (1.0,)),), site=site))
        for var in longitudinal:
            analyses.append(_simple(f"change{var}", "time", var, (), site))
    return GroupModel(name="cli", analyses=tuple(analyses), inference=inference or Inference())
