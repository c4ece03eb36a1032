"""Nipype interfaces that write and publish BIDS derivatives."""

from __future__ import annotations

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

from spineqprep.bids.derivatives import (
    atomic_write_json,
    atomic_write_nifti,
    atomic_write_text,
    build_path,
)
from spineqprep.bids.staging import commit_staged


class _DataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image (.nii.gz) or table (.tsv) to store")
    base_directory = Directory(mandatory=True, desc="root of the (staging) derivatives dataset")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the output (sub, ses, acq ...)")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix of the output")
    sources = traits.List(traits.Str, desc="BIDS URIs of the inputs (sidecar 'Sources')")
    meta_dict = traits.Dict(desc="sidecar fields known when the workflow is built")
    extra_meta = traits.Dict(desc="sidecar fields computed by the workflow")


class _DataSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the stored file")
    out_meta = File(exists=True, desc="its JSON sidecar (when it has metadata)")


class DerivativesDataSink(SimpleInterface):
    """Write an image or a table, and its sidecar, under a BIDS-Derivatives name, atomically.

    A table without metadata (e.g. the ``dseg.tsv`` of one segmentation) gets no sidecar."""

    input_spec = _DataSinkInputSpec
    output_spec = _DataSinkOutputSpec

    def _run_interface(self, runtime):
        table = str(self.inputs.in_file).endswith(".tsv")
        extension = ".tsv" if table else ".nii.gz"
        rel = build_path(dict(self.inputs.entities), self.inputs.suffix, extension)
        out = Path(self.inputs.base_directory) / rel
        if table:
            atomic_write_text(Path(self.inputs.in_file).read_text(), out)
        else:
            atomic_write_nifti(nib.load(self.inputs.in_file), out)
        self._results["out_file"] = str(out)
        meta = {**_defined(self.inputs.meta_dict), **_defined(self.inputs.extra_meta)}
        if self.inputs.sources:
            meta["Sources"] = list(self.inputs.sources)
        if meta or not table:
            sidecar = out.with_name(out.name.removesuffix(extension) + ".json")
            atomic_write_json(meta, sidecar)
            self._results["out_meta"] = str(sidecar)
        return runtime


def _defined(value: dict) -> dict:
    return value if isdefined(value) else {}


class _CommitInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="staged derivatives")
    staging_dir = Directory(exists=True, mandatory=True, desc="root of the staging dataset")
    output_dir = Directory(mandatory=True, desc="root of the output derivatives dataset")


class _CommitOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="published derivatives")


class CommitDerivatives(SimpleInterface):
    """Publish a subject's staged derivatives once all of them exist."""

    input_spec = _CommitInputSpec
    output_spec = _CommitOutputSpec

    def _run_interface(self, runtime):
        files = commit_staged(self.inputs.in_files, Path(self.inputs.staging_dir),
                              Path(self.inputs.output_dir))
        self._results["out_files"] = [str(f) for f in files]
        return runtime
