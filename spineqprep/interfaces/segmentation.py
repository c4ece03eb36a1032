"""Nipype interfaces around :mod:`spineqprep.segmentation` and region statistics."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from spineqprep.relaxometry.regions import region_statistics


class _SegmentSpineInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="sagittal image to segment")
    same_slices = traits.List(File(exists=True), desc="other contrasts on the sagittal slices "
                              "of in_file, segmented with it (probabilities averaged)")
    weights = traits.Str(desc="a model bundle (folder or .pt) instead of the packaged one")
    cutoffs = traits.Dict(desc="binarisation cut-off per class (others are ignored)")
    num_threads = traits.Int(1, usedefault=True, desc="threads of the network")


class _SegmentSpineOutputSpec(TraitedSpec):
    out_dseg = File(exists=True, desc="level-labelled segmentation")
    out_labels = File(exists=True, desc="look-up table of the segmentation (dseg.tsv)")
    out_probseg = traits.List(File(exists=True), desc="probability map per class")
    classes = traits.List(traits.Str, desc="class of each probability map")
    qc = traits.Dict(desc="levels found, flags and whether the labelling is confident")


class SegmentSpine(SimpleInterface):
    """Vertebral bodies, sacrum and discs with their anatomical levels (trained network)."""

    input_spec = _SegmentSpineInputSpec
    output_spec = _SegmentSpineOutputSpec

    def _run_interface(self, runtime):
        from spineqprep.segmentation import segment_spine
        from spineqprep.segmentation.postprocess import CLASSES, label_table

        bundle = self.inputs.weights if isdefined(self.inputs.weights) else None
        cutoffs = self.inputs.cutoffs if isdefined(self.inputs.cutoffs) else {}
        same_slices = self.inputs.same_slices if isdefined(self.inputs.same_slices) else []
        seg = segment_spine(nib.load(self.inputs.in_file), bundle=bundle,
                            n_threads=self.inputs.num_threads,
                            cutoffs={k: v for k, v in cutoffs.items() if k in CLASSES},
                            contrast=_bids_suffix(self.inputs.in_file),
                            same_slices=[(nib.load(f), _bids_suffix(f)) for f in same_slices])
        cwd = Path(runtime.cwd)
        seg.dseg_img.header.set_xyzt_units("mm")
        seg.dseg_img.to_filename(cwd / "dseg.nii.gz")
        pd.DataFrame(label_table(seg.levels), columns=["index", "name", "abbreviation"]).to_csv(
            cwd / "dseg.tsv", sep="\t", index=False)
        files, classes = _write_probsegs(seg.probseg_img, seg.classes, cwd)
        self._results.update(
            out_dseg=str(cwd / "dseg.nii.gz"), out_labels=str(cwd / "dseg.tsv"),
            out_probseg=files, classes=classes,
            qc={"Levels": seg.levels, "LevelFlags": list(seg.flags),
                "LevelsConfident": bool(seg.confident)},
        )
        return runtime


def _bids_suffix(path: str) -> str:
    """The BIDS suffix of a file name (``..._echo-1_MESE.nii.gz`` -> ``MESE``): the contrast
    whose cut-offs the bundle may set apart."""
    return Path(path).name.split(".")[0].rsplit("_", 1)[-1]


def _write_probsegs(probseg: nib.Nifti1Image, classes: tuple[str, ...], cwd: Path
                    ) -> tuple[list[str], list[str]]:
    """One 3-D probability file per class but the first (background); (files, classes)."""
    probs = probseg.get_fdata(dtype="float32")
    files = []
    for k, name in enumerate(classes[1:], start=1):
        path = cwd / f"probseg_{name}.nii.gz"
        prob = nib.Nifti1Image(probs[..., k], probseg.affine)
        prob.header.set_xyzt_units("mm")
        prob.to_filename(path)
        files.append(str(path))
    return files, list(classes[1:])


class _ImportSegmentationInputSpec(BaseInterfaceInputSpec):
    in_dseg = File(exists=True, mandatory=True, desc="a precomputed segmentation (any numbering)")
    in_labels = File(exists=True, mandatory=True, desc="its dseg.tsv (index, name ...)")
    kind = traits.Enum("spine", "endplates", usedefault=True, desc="structures it may hold")


class _ImportSegmentationOutputSpec(TraitedSpec):
    out_dseg = File(exists=True, desc="the segmentation in spineqprep's label numbering")
    out_labels = File(exists=True, desc="its standard look-up table (dseg.tsv)")
    meta = traits.Dict(desc="sidecar fields: Levels (abbreviation -> label) it holds")


class ImportSegmentation(SimpleInterface):
    """Translate a segmentation given with ``-d`` to the standard label numbering through its
    table (:mod:`spineqprep.segmentation.lut`), so later steps need not read the user's
    table."""

    input_spec = _ImportSegmentationInputSpec
    output_spec = _ImportSegmentationOutputSpec

    def _run_interface(self, runtime):
        from spineqprep.segmentation.lut import check_segmentation, standardise

        mapping = check_segmentation(self.inputs.in_dseg, self.inputs.in_labels,
                                     self.inputs.kind)
        img, rows = standardise(nib.load(self.inputs.in_dseg), mapping)
        cwd = Path(runtime.cwd)
        img.header.set_xyzt_units("mm")
        img.to_filename(cwd / "dseg.nii.gz")
        pd.DataFrame(rows, columns=["index", "name", "abbreviation"]).to_csv(
            cwd / "dseg.tsv", sep="\t", index=False)
        self._results.update(out_dseg=str(cwd / "dseg.nii.gz"), out_labels=str(cwd / "dseg.tsv"),
                             meta={"Levels": {r["abbreviation"]: r["index"] for r in rows}})
        return runtime


class _RegionStatisticsInputSpec(BaseInterfaceInputSpec):
    in_map = File(exists=True, mandatory=True, desc="relaxation map")
    in_valid = File(exists=True, mandatory=True, desc="validity mask of the fit")
    in_dseg = File(exists=True, mandatory=True, desc="segmentation")
    in_labels = File(exists=True, mandatory=True, desc="its look-up table (dseg.tsv)")
    inclusion = traits.Tuple(traits.Float, traits.Float, mandatory=True,
                             desc="open interval of the values kept (the map's units)")


class _RegionStatisticsOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="one row per region")
    meta = traits.Dict(desc="the segmentation's level check (LevelsConfident, LevelFlags)")


class RegionStatistics(SimpleInterface):
    """Mean, SD and median of a map over each labelled region (valid, included voxels)."""

    input_spec = _RegionStatisticsInputSpec
    output_spec = _RegionStatisticsOutputSpec

    def _run_interface(self, runtime):
        lut = pd.read_csv(self.inputs.in_labels, sep="\t")
        names = dict(zip(lut["index"].astype(int), lut["abbreviation"].astype(str), strict=True))
        table = region_statistics(nib.load(self.inputs.in_map), nib.load(self.inputs.in_valid),
                                  nib.load(self.inputs.in_dseg), names,
                                  tuple(self.inputs.inclusion))
        out = Path(runtime.cwd) / "regions.tsv"
        table.to_csv(out, sep="\t", index=False, na_rep="n/a", float_format="%.6g")
        # a doubtful level labelling travels with the numbers it labels
        sidecar = Path(self.inputs.in_dseg.replace(".nii.gz", ".json"))
        checks = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        self._results.update(out_tsv=str(out), meta={
            k: checks[k] for k in ("LevelsConfident", "LevelFlags") if k in checks})
        return runtime


class _SegmentEndplatesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="first UTE echo")
    in_locator = File(exists=True, mandatory=True,
                      desc="a level-labelled segmentation of the same exam (finds L5)")
    weights = traits.Str(desc="an endplate model bundle instead of the packaged one")
    cutoffs = traits.Dict(desc="binarisation cut-off per endplate class")
    num_threads = traits.Int(1, usedefault=True, desc="threads of the network")


class _SegmentEndplatesOutputSpec(TraitedSpec):
    out_dseg = File(exists=True, desc="endplate segmentation on the UTE grid")
    out_labels = File(exists=True, desc="its look-up table (dseg.tsv)")
    out_probseg = traits.List(File(exists=True), desc="probability map per endplate")
    classes = traits.List(traits.Str, desc="endplate of each probability map")
    qc = traits.Dict(desc="crop, voxels found per endplate and flags")


class SegmentEndplates(SimpleInterface):
    """The four L4-L5 / L5-S1 cartilage endplates in the 64 x 64 mm crop around L5."""

    input_spec = _SegmentEndplatesInputSpec
    output_spec = _SegmentEndplatesOutputSpec

    def _run_interface(self, runtime):
        from spineqprep.segmentation.endplates import CLASSES, endplate_table, segment_endplates

        bundle = self.inputs.weights if isdefined(self.inputs.weights) else None
        cutoffs = self.inputs.cutoffs if isdefined(self.inputs.cutoffs) else {}
        seg = segment_endplates(nib.load(self.inputs.in_file), nib.load(self.inputs.in_locator),
                                bundle=bundle, n_threads=self.inputs.num_threads,
                                cutoffs={k: v for k, v in cutoffs.items() if k in CLASSES})
        cwd = Path(runtime.cwd)
        seg.dseg_img.header.set_xyzt_units("mm")
        seg.dseg_img.to_filename(cwd / "dseg.nii.gz")
        pd.DataFrame(endplate_table()).to_csv(cwd / "dseg.tsv", sep="\t", index=False)
        files, classes = _write_probsegs(seg.probseg_img, seg.classes, cwd)
        self._results.update(
            out_dseg=str(cwd / "dseg.nii.gz"), out_labels=str(cwd / "dseg.tsv"),
            out_probseg=files, classes=classes,
            qc={"CropStart": list(seg.box.start), "CropStop": list(seg.box.stop),
                "Cutoffs": seg.cutoffs, "VoxelsFound": seg.found, "Flags": list(seg.flags)},
        )
        return runtime
