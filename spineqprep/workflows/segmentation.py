"""Segmentation of one sagittal image (vertebral bodies, sacrum, discs with their levels), and
whole-region statistics of the maps on the same grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from spineqprep.bids.derivatives import bids_uri
from spineqprep.interfaces.bids import DerivativesDataSink
from spineqprep.interfaces.segmentation import (
    ImportSegmentation,
    RegionStatistics,
    SegmentEndplates,
    SegmentSpine,
)
from spineqprep.relaxometry.regions import INCLUSION_RANGES

#: BIDS ``label-`` value of each network class's probability map
PROBSEG_LABELS = {"vertebral_body": "VB", "sacrum": "sacrum", "disc": "disc"}

REGION_COLUMNS = {
    "region": {"Description": "Abbreviation of the region in the segmentation's dseg.tsv"},
    "index": {"Description": "Label of the region in the segmentation"},
    "n_voxels": {"Description": "Voxels of the region"},
    "n_valid": {"Description": "Voxels of the region where the fit is valid"},
    "n_included": {"Description": "Valid voxels whose value lies in InclusionRange (used below)"},
    "mean": {"Description": "Mean relaxation time over the included voxels", "Units": "s"},
    "sd": {"Description": "Standard deviation over the included voxels", "Units": "s"},
    "median": {"Description": "Median over the included voxels", "Units": "s"},
    "p25": {"Description": "25th percentile over the included voxels", "Units": "s"},
    "p75": {"Description": "75th percentile over the included voxels", "Units": "s"},
}


def init_spine_segmentation_wf(
    in_file: Path,
    entities: dict[str, str],
    *,
    staging_dir: Path,
    raw_dir: Path,
    weights: Path | None = None,
    cutoffs: dict[str, float] | None = None,
    omp_nthreads: int = 1,
    precomputed: tuple[Path, Path] | None = None,
    same_slices: Sequence[Path] = (),
    name: str = "spine_seg_wf",
) -> pe.Workflow:
    """Segment ``in_file`` together with the other contrasts on its slices (``same_slices``), or
    reuse a precomputed ``(dseg, dseg.tsv)``, and stage the result.

    Outputs (``outputnode``): ``out_files`` (staged), ``dseg`` and ``labels`` (its look-up
    table) for region statistics.
    """
    wf = pe.Workflow(name=name)
    source = [bids_uri(in_file, raw_dir)]
    if not precomputed:
        source += [bids_uri(f, raw_dir) for f in same_slices]
    ds_dseg, ds_labels = _dseg_sinks(staging_dir, entities, source)
    if precomputed:
        wf.__desc__ = f"\n- segmentation of acq-{entities.get('acq')} reused from {precomputed[0]}"
        _import_precomputed(wf, precomputed, "spine", source, ds_dseg, ds_labels)
    else:
        wf.__desc__ = (
            f"\n- vertebral bodies, sacrum and intervertebral discs segmented on "
            f"{' and '.join(Path(f).name for f in [in_file, *same_slices])} by spineqprep's 2D "
            "U-Net (per sagittal slice"
            + ("; the class probabilities of these images, on the same slices, averaged on the "
               "grid of the first" if same_slices else "") + "), connected "
            "components above a minimum volume, and anatomical levels assigned inferior to "
            "superior from the sacrum"
        )
        seg = _network(SegmentSpine, in_file, weights, cutoffs, omp_nthreads)
        if same_slices:
            seg.inputs.same_slices = [str(f) for f in same_slices]
        ds_dseg.inputs.meta_dict = {
            "Description": "Vertebral bodies, sacrum and discs labelled by anatomical level "
            "(spineqprep.segmentation); LevelFlags lists why a labelling is doubtful.",
            "Model": str(weights) if weights else "spineqprep packaged spine model",
        }
        _stage_network(wf, seg, staging_dir, entities, PROBSEG_LABELS, source,
                       "Class probability of spineqprep's spine network.", ds_dseg, ds_labels)
    return _with_outputs(wf, ds_dseg, ds_labels)


def init_endplate_segmentation_wf(
    in_file: Path,
    entities: dict[str, str],
    *,
    staging_dir: Path,
    raw_dir: Path,
    weights: Path | None = None,
    cutoffs: dict[str, float] | None = None,
    omp_nthreads: int = 1,
    precomputed: tuple[Path, Path] | None = None,
    name: str = "endplate_seg_wf",
) -> pe.Workflow:
    """Segment the L4-L5 and L5-S1 cartilage endplates on ``in_file`` (the first UTE echo),
    in the crop centred on L5 of the level-labelled segmentation given to
    ``inputnode.locator``, and stage ``<entities>_desc-endplates_dseg`` (+ dseg.tsv and one
    ``_label-<endplate>_probseg`` each). With ``precomputed`` (``(dseg, dseg.tsv)`` given with
    ``--derivatives``) the network does not run and ``inputnode.locator`` is not used: the mask
    is translated to the standard labels and staged.

    Outputs (``outputnode``): ``out_files`` (staged), ``dseg`` and ``labels``.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["locator"]), name="inputnode")
    source = [bids_uri(in_file, raw_dir)]
    ds_dseg, ds_labels = _dseg_sinks(staging_dir, {**entities, "desc": "endplates"}, source)
    if precomputed:
        wf.__desc__ = (f"\n- cartilage endplates of acq-{entities.get('acq')} reused from "
                       f"{precomputed[0]}")
        _import_precomputed(wf, precomputed, "endplates", source, ds_dseg, ds_labels)
    else:
        wf.__desc__ = (
            f"\n- the L4-L5 and L5-S1 superior and inferior cartilage endplates segmented on "
            f"{Path(in_file).name} by spineqprep's endplate network in a 64 x 64 mm crop "
            "centred on the L5 vertebral body (located on another image of the exam through the "
            "scanner coordinates), binarised per endplate at the published cut-offs"
        )
        seg = _network(SegmentEndplates, in_file, weights, cutoffs, omp_nthreads)
        ds_dseg.inputs.meta_dict = {
            "Description": "Cartilage endplates of the L4-L5 and L5-S1 discs "
            "(spineqprep.segmentation.endplates).",
            "Model": str(weights) if weights else "spineqprep packaged endplate model"}
        wf.connect(inputnode, "locator", seg, "in_locator")
        _stage_network(wf, seg, staging_dir, entities, {}, source, "Probability of this "
                       "cartilage endplate (spineqprep's endplate network).", ds_dseg, ds_labels)
    return _with_outputs(wf, ds_dseg, ds_labels)


def _network(interface: type, in_file: Path, weights: Path | None,
             cutoffs: dict[str, float] | None, omp_nthreads: int) -> pe.Node:
    """The network node (``segment``): the packaged bundle unless ``weights``."""
    seg = pe.Node(interface(in_file=str(in_file), num_threads=omp_nthreads), name="segment",
                  n_procs=omp_nthreads)
    if weights:
        seg.inputs.weights = str(weights)
    if cutoffs:
        seg.inputs.cutoffs = cutoffs
    return seg


def _dseg_sinks(staging_dir: Path, entities: dict[str, str], source: list[str]
                ) -> tuple[pe.Node, pe.Node]:
    """The sinks of a segmentation (``_dseg``, sources ``source``) and its ``dseg.tsv``."""
    sink = {"base_directory": str(staging_dir), "entities": entities, "suffix": "dseg"}
    return (pe.Node(DerivativesDataSink(**sink, sources=source), name="ds_dseg",
                    run_without_submitting=True),
            pe.Node(DerivativesDataSink(**sink), name="ds_labels", run_without_submitting=True))


def _stage_network(wf: pe.Workflow, seg: pe.Node, staging_dir: Path, entities: dict[str, str],
                   labels: dict[str, str], source: list[str], description: str,
                   ds_dseg: pe.Node, ds_labels: pe.Node) -> None:
    """Stage a network's segmentation (with its QC sidecar fields) and one ``_probseg`` per
    class (``label-`` from ``labels``, else the class name)."""
    probseg_entities = pe.Node(niu.Function(function=_probseg_entities,
                                            output_names=["entities"]),
                               name="probseg_entities", run_without_submitting=True)
    probseg_entities.inputs.entities = entities
    probseg_entities.inputs.labels = labels
    ds_prob = pe.MapNode(
        DerivativesDataSink(base_directory=str(staging_dir), suffix="probseg", sources=source,
                            meta_dict={"Description": description}),
        iterfield=["in_file", "entities"], name="ds_probseg", run_without_submitting=True)
    wf.connect([
        (seg, ds_dseg, [("out_dseg", "in_file"), ("qc", "extra_meta")]),
        (seg, ds_labels, [("out_labels", "in_file")]),
        (seg, probseg_entities, [("classes", "classes")]),
        (seg, ds_prob, [("out_probseg", "in_file")]),
        (probseg_entities, ds_prob, [("entities", "entities")]),
    ])


def _with_outputs(wf: pe.Workflow, ds_dseg: pe.Node, ds_labels: pe.Node) -> pe.Workflow:
    """Connect ``outputnode``: ``out_files`` (every staged file), ``dseg`` and ``labels``."""
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files", "dseg", "labels"]),
                         name="outputnode")
    probsegs = wf.get_node("ds_probseg")
    merge = pe.Node(niu.Merge(3 if probsegs else 2, ravel_inputs=True), name="merge_outputs",
                    run_without_submitting=True)
    if probsegs:
        wf.connect(probsegs, "out_file", merge, "in3")
    wf.connect([
        (ds_dseg, merge, [("out_file", "in1")]),
        (ds_labels, merge, [("out_file", "in2")]),
        (merge, outputnode, [("out", "out_files")]),
        (ds_dseg, outputnode, [("out_file", "dseg")]),
        (ds_labels, outputnode, [("out_file", "labels")]),
    ])
    return wf


def _import_precomputed(wf: pe.Workflow, precomputed: tuple[Path, Path], kind: str,
                        source: list[str], ds_dseg: pe.Node, ds_labels: pe.Node) -> None:
    """Translate a segmentation given with ``--derivatives`` to the standard label numbering
    (the one place a user's table is read) and stage it; the sidecar's ``Sources`` name the
    image, the mask and its table."""
    imported = pe.Node(ImportSegmentation(in_dseg=str(precomputed[0]),
                                          in_labels=str(precomputed[1]), kind=kind),
                       name="import_dseg")
    ds_dseg.inputs.sources = [*source, *map(str, precomputed)]
    ds_dseg.inputs.meta_dict = {
        "Description": "Segmentation given with --derivatives (not computed by spineqprep), "
        "relabelled to spineqprep's numbering through its look-up table."}
    wf.connect([
        (imported, ds_dseg, [("out_dseg", "in_file"), ("meta", "extra_meta")]),
        (imported, ds_labels, [("out_labels", "in_file")]),
    ])


def init_region_statistics_wf(
    entities: dict[str, str], suffix: str, *, staging_dir: Path, name: str,
    desc: str = "regions",
) -> pe.Workflow:
    """Whole-region statistics of one map over a segmentation on its grid, staged as
    ``<entities>_desc-<desc>_<suffix>.tsv`` (``regions`` for the spine, ``endplates`` for the
    cartilage endplates).

    Inputs (``inputnode``): ``map``, ``mask`` (validity), ``dseg``, ``labels``.
    Outputs (``outputnode``): ``out_file``.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["map", "mask", "dseg", "labels"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file"]), name="outputnode")
    inclusion = INCLUSION_RANGES[suffix]
    stats = pe.Node(RegionStatistics(inclusion=inclusion), name="region_statistics")
    ds = pe.Node(DerivativesDataSink(
        base_directory=str(staging_dir), entities={**entities, "desc": desc}, suffix=suffix,
        meta_dict={"Description": f"Whole-region statistics of the {suffix} over each labelled "
                   "region of the segmentation on its grid: valid voxels with values in "
                   "InclusionRange (the published ranges of the voxels kept for statistics, "
                   "as at the group level).",
                   "InclusionRange": list(inclusion), **REGION_COLUMNS}),
        name="ds_regions", run_without_submitting=True)
    wf.connect([
        (inputnode, stats, [("map", "in_map"), ("mask", "in_valid"), ("dseg", "in_dseg"),
                            ("labels", "in_labels")]),
        # + the segmentation's LevelsConfident / LevelFlags (when spineqprep made it)
        (stats, ds, [("out_tsv", "in_file"), ("meta", "extra_meta")]),
        (ds, outputnode, [("out_file", "out_file")]),
    ])
    return wf


def _probseg_entities(entities: dict, classes: list, labels: dict) -> list:
    """The entities of each class's probability map (``label-<class>``)."""
    return [{**entities, "label": labels.get(c, c.replace("_", ""))} for c in classes]
