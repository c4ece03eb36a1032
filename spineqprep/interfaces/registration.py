"""Nipype interface around :func:`spineqprep.registration.pipeline.register_grid`.

One node per acquisition grid registers all of its discs: ITK / elastix loads once per process
(10-20 s), not once per disc.
"""

from __future__ import annotations

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
from spineqprep.registration.atlas import load_atlas
from spineqprep.registration.pipeline import (
    WARP_MODES,
    SeriesInput,
    disc_labels,
    register_grid,
    stage_results,
)

_FIT_KEYS = ("T", "S0", "Rsquared", "mask")  # order of a relaxometry workflow's out_files


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
        # elastix 0.25.4 crashes with several threads on multi-metric B-spline registration:
        # the global ITK thread count is the safe knob (read when ITK loads).
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
            Path(runtime.cwd) / "discs", disc_labels=disc_labels(), backend=self.inputs.backend,
            parameter_maps=[Path(p) for p in maps] or None, min_dice=self.inputs.min_dice,
            warp=self.inputs.warp,
            fit_kw={"model": self.inputs.fit_model, "n_threads": self.inputs.num_threads},
            t_ranges={s.suffix: DEFAULT_T_RANGES[s.suffix] for s in series})
        files = stage_results(results, meta, dict(self.inputs.entities),
                              Path(self.inputs.staging_dir), self.inputs.warp)
        self._results["out_files"] = [str(f) for f in files]
        self._results["out_qc"] = str(files[-1])
        return runtime
