"""Nipype interface around :func:`spineqprep.registration.pipeline.register_grid`.

One node per acquisition grid registers all of its discs in a forked child process, which a
crash of itk-elastix may kill without taking the node (and the subject's other derivatives)
with it. ITK / elastix is loaded in the node's process first (10-20 s, once per worker
process), so the children inherit it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from spineqprep.config import DEFAULT_T_RANGES
from spineqprep.registration.atlas import LEVELS, load_atlas
from spineqprep.registration.elastix import preload
from spineqprep.registration.isolate import Crash, run_forked
from spineqprep.registration.pipeline import (
    WARP_MODES,
    SeriesInput,
    disc_labels,
    failed_disc,
    register_grid,
    stage_results,
)

_FIT_KEYS = ("T", "S0", "Rsquared", "mask")  # order of a relaxometry workflow's out_files
#: A grid's registration is stopped (its discs flagged) after this long: a hung itk-elastix must
#: not block the run. A grid of 5 discs takes 20-40 s here (3D, maps included).
GRID_TIMEOUT_S = 3600.0
_log = logging.getLogger(__name__)


class _RegisterDiscsInputSpec(BaseInterfaceInputSpec):
    in_dseg = File(exists=True, mandatory=True, desc="segmentation of the grid (_dseg)")
    in_fits = InputMultiObject(File(exists=True), mandatory=True,
                               desc="per series, in order: native map, S0map, Rsquared, mask")
    series = traits.List(traits.Dict, mandatory=True,
                         desc="per series: suffix, files, times, sidecar (Sources, times ...)")
    entities = traits.Dict(mandatory=True, desc="sub, ses, acq of the grid")
    staging_dir = Directory(mandatory=True, desc="root of the staging derivatives dataset")
    atlas_dir = traits.Str("", usedefault=True, desc="atlas folder ('' = the shipped atlas)")
    backend = traits.Enum("elastix", "ants", usedefault=True, desc="registration backend")
    parameter_maps = traits.List(traits.Str, desc="elastix parameter files (replace defaults)")
    min_dice = traits.Float(0.85, usedefault=True, desc="Dice below which a disc fails")
    warp = traits.Enum(*WARP_MODES, usedefault=True, desc="warp echoes (fit in atlas), maps, both")
    fit_model = traits.Enum("monoexp", "offset", usedefault=True, desc="signal model")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads and fitter workers")


class _RegisterDiscsOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="staged atlas-space derivatives")
    out_qc = File(exists=True, desc="the grid's desc-registration_qc.tsv")


class RegisterDiscs(SimpleInterface):
    """Register every disc of one grid to its atlas disc; warp, fit, stage the derivatives."""

    input_spec = _RegisterDiscsInputSpec
    output_spec = _RegisterDiscsOutputSpec

    def _run_interface(self, runtime):
        # in a forked child: an itk-elastix crash (segfault) kills the child, not this node,
        # so the grid's QC table still says what happened and the subject's other
        # derivatives are published; files the child staged before dying are not listed
        if self.inputs.backend == "elastix":
            preload(self.inputs.num_threads)  # the forked child inherits ITK and its threads
        outcome = run_forked(lambda: self._register_and_stage(Path(runtime.cwd) / "discs"),
                             timeout_s=GRID_TIMEOUT_S)
        if isinstance(outcome, Crash):
            _log.error("registration of %s %s\n%s", self.inputs.in_dseg, outcome.message,
                       outcome.traceback)
            reason = f"registration process {outcome.message} (a bug: please report it)"
            qc = stage_results([failed_disc(level, self.inputs.backend, reason)
                                for level in LEVELS], {}, dict(self.inputs.entities),
                               Path(self.inputs.staging_dir), self.inputs.warp)
            outcome = [str(f) for f in qc]
        self._results["out_files"] = outcome
        self._results["out_qc"] = outcome[-1]
        return runtime

    def _register_and_stage(self, work_dir: Path) -> list[str]:
        """Register, warp, fit and stage the grid (run in the child); the staged files."""
        # ANTsPy (backend or fallback) reads its thread count when it loads; elastix's ITK got
        # its global thread count from preload (the crash-free knob)
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(self.inputs.num_threads)
        series = []
        meta = {}
        n = len(_FIT_KEYS)
        fits = list(self.inputs.in_fits)
        for i, spec in enumerate(self.inputs.series):
            native = dict(zip(_FIT_KEYS, (nib.load(f) for f in fits[n * i:n * (i + 1)]),
                              strict=True))
            series.append(SeriesInput(spec["suffix"], tuple(nib.load(f) for f in spec["files"]),
                                      tuple(spec["times"]), native))
            meta[spec["suffix"]] = spec["sidecar"]
        maps = (self.inputs.parameter_maps if isdefined(self.inputs.parameter_maps) else [])
        results = register_grid(
            nib.load(self.inputs.in_dseg), series, load_atlas(self.inputs.atlas_dir or None),
            work_dir, disc_labels=disc_labels(), backend=self.inputs.backend,
            parameter_maps=[Path(p) for p in maps] or None, min_dice=self.inputs.min_dice,
            warp=self.inputs.warp,
            fit_kw={"model": self.inputs.fit_model, "n_threads": self.inputs.num_threads},
            t_ranges={s.suffix: DEFAULT_T_RANGES[s.suffix] for s in series})
        files = stage_results(results, meta, dict(self.inputs.entities),
                              Path(self.inputs.staging_dir), self.inputs.warp)
        return [str(f) for f in files]
