"""Run settings: one object built by the command line, saved as TOML, replayable.

Every option of ``spineqprep`` lives in :class:`RunConfig`. It is written into each subject's log
folder (``sub-<label>/log/<run_uuid>/spineqprep.toml``) so that ``--config-file`` can replay a run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from spineqprep import __version__
from spineqprep.errors import UsageError

#: Default validity range of fitted relaxation times, in seconds, per output map.
DEFAULT_T_RANGES: dict[str, tuple[float, float]] = {
    "T2map": (0.001, 1.0),
    "T1rho": (0.001, 1.0),
    "T2starmap": (0.0002, 0.5),
}


@dataclass
class RunConfig:
    """All settings of one spineqprep run (paths are absolute once resolved)."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    work_dir: Path | None = None
    nprocs: int = 0
    omp_nthreads: int = 0
    mem_mb: int = 0
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    bids_filters: dict[str, Any] = field(default_factory=dict)
    skip_bids_validation: bool = False
    stop_on_first_crash: bool = False
    random_seed: int = 0
    reports_only: bool = False
    boilerplate_only: bool = False
    derivatives: list[Path] = field(default_factory=list)
    fit_model: str = "monoexp"
    segmentation: bool = True
    seg_weights: Path | None = None
    cep_weights: Path | None = None
    #: binarisation cut-off per structure (spine classes and endplates); defaults per model
    cutoffs: dict[str, float] = field(default_factory=dict)
    registration: bool = True
    atlas: Path | None = None
    registration_backend: str = "elastix"
    registration_params: list[Path] = field(default_factory=list)
    warp: str = "echoes"
    verbosity: int = 0
    group_model: Path | None = None
    group_correlate: list[str] = field(default_factory=list)
    group_compare: list[str] = field(default_factory=list)
    group_map_pair: list[str] = field(default_factory=list)
    group_longitudinal: list[str] | None = None
    group_covariates: list[str] | None = None
    group_site: str = "covariate"
    group_permutations: int = 1000
    group_min_subjects: int = 10
    group_tfce: bool = True
    #: analyse the label-warped atlas-space maps (native maps warped) instead of the fitted ones
    group_warped_maps: bool = False
    run_uuid: str = ""
    version: str = __version__

    def __post_init__(self) -> None:
        if not self.run_uuid:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.run_uuid = f"{stamp}_{uuid.uuid4()}"
        self.bids_dir = Path(self.bids_dir).resolve()
        self.output_dir = Path(self.output_dir).resolve()
        self.work_dir = Path(self.work_dir or Path.cwd() / "work").resolve()
        self.derivatives = [Path(p).resolve() for p in self.derivatives]
        self.seg_weights = Path(self.seg_weights).resolve() if self.seg_weights else None
        self.cep_weights = Path(self.cep_weights).resolve() if self.cep_weights else None
        self.group_model = Path(self.group_model).resolve() if self.group_model else None
        self.atlas = Path(self.atlas).resolve() if self.atlas else None
        self.registration_params = [Path(p).resolve() for p in self.registration_params]
        self.participant_label = [p.removeprefix("sub-") for p in self.participant_label]
        self.session_label = [s.removeprefix("ses-") for s in self.session_label]
        cpus = len(os.sched_getaffinity(0))
        self.nprocs = self.nprocs or cpus
        self.omp_nthreads = self.omp_nthreads or min(self.nprocs, 8)
        if self.omp_nthreads > self.nprocs:
            raise UsageError(
                f"--omp-nthreads {self.omp_nthreads} exceeds --nprocs {self.nprocs}",
                fix="give --omp-nthreads at most --nprocs",
            )

    def to_dict(self) -> dict[str, Any]:
        """A TOML-serialisable view (paths as strings, no ``None``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, list):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            if value is not None:
                out[f.name] = value
        return {"spineqprep": out}

    def save(self, path: Path) -> Path:
        """Write the configuration as TOML to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(self.to_dict()))
        return path


def load_toml(path: Path) -> dict[str, Any]:
    """Read the settings table of a saved configuration file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError("configuration file not found", path=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(
            f"not a valid TOML configuration ({err})",
            path=path,
            fix="pass a spineqprep.toml written by an earlier run",
        ) from None
    settings = data.get("spineqprep")
    if not isinstance(settings, dict):
        raise UsageError("no [spineqprep] table", path=path, fix="pass a spineqprep.toml file")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"unknown settings {unknown}", path=path)
    return settings
