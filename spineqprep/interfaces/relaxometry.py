"""Nipype interface around :func:`spineqprep.relaxometry.fit_images`."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from spineqprep.relaxometry import fit_images


class _FitMonoexpInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True,
                                desc="one image per echo / spin-lock time")
    times = traits.List(traits.Float, mandatory=True, desc="echo / spin-lock times (s)")
    model = traits.Enum("monoexp", "offset", usedefault=True, desc="signal model")
    t_range = traits.Tuple(traits.Float, traits.Float, mandatory=True,
                           desc="valid range of the fitted time constant (s)")
    num_threads = traits.Int(1, usedefault=True,
                             desc="worker processes of the fitter (--omp-nthreads)")


class _FitMonoexpOutputSpec(TraitedSpec):
    out_map = File(exists=True, desc="fitted time constant (s)")
    out_s0 = File(exists=True, desc="fitted signal at t = 0")
    out_rsquared = File(exists=True, desc="coefficient of determination")
    out_mask = File(exists=True, desc="validity mask")
    out_offset = File(desc="fitted constant offset (offset model only)")
    summary = traits.Dict(desc="fit summary for the sidecar")


class FitMonoexp(SimpleInterface):
    """Voxel-wise fit of S(t) = S0 exp(-t/T) [+ C] to a series of co-registered images."""

    input_spec = _FitMonoexpInputSpec
    output_spec = _FitMonoexpOutputSpec

    def _run_interface(self, runtime):
        names = [str(f) for f in self.inputs.in_files]
        images = [nib.load(f) for f in names]
        result = fit_images(
            images, list(self.inputs.times), names=names, model=self.inputs.model,
            t_range=tuple(self.inputs.t_range), n_threads=self.inputs.num_threads,
        )
        keys = {"T": "out_map", "S0": "out_s0", "Rsquared": "out_rsquared", "mask": "out_mask",
                "offset": "out_offset"}
        for key, img in result.items():
            path = Path(runtime.cwd) / f"{key}.nii.gz"
            img.to_filename(path)
            self._results[keys[key]] = str(path)
        valid = np.asanyarray(result["mask"].dataobj) > 0
        self._results["summary"] = {"NumberOfValidVoxels": int(valid.sum()),
                                    "FractionValid": round(float(valid.mean()), 6)}
        return runtime
