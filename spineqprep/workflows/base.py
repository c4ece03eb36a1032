"""Top-level workflows: one sub-workflow per participant, each published all or nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from spineqprep.bids.layout import Series
from spineqprep.config import RunConfig
from spineqprep.interfaces.bids import CommitDerivatives
from spineqprep.workflows.registration import REGISTERED_TARGETS, init_disc_registration_wf
from spineqprep.workflows.relaxometry import init_relaxometry_wf
from spineqprep.workflows.segmentation import (
    init_endplate_segmentation_wf,
    init_region_statistics_wf,
    init_spine_segmentation_wf,
)


@dataclass
class SubjectPlan:
    """What the participant level will do for one subject (all its sessions)."""

    subject: str
    series: list[Series]
    #: per series index: output suffix -> precomputed file to reuse instead of fitting
    precomputed: dict[int, dict[str, Path]] = field(default_factory=dict)
    #: (session, acq) -> the image segmented for that grid
    segment: dict[tuple[str | None, str | None], Path] = field(default_factory=dict)
    #: (session, acq) -> other contrasts on the sagittal slices of its ``segment`` image (a
    #: T1w prescribed on the T2w's slices, any in-plane grid), segmented together with it
    same_slices: dict[tuple[str | None, str | None], list[Path]] = field(default_factory=dict)
    #: (session, acq) -> (dseg, dseg.tsv) given with --derivatives instead of segmenting
    masks: dict[tuple[str | None, str | None], tuple[Path, Path]] = field(default_factory=dict)
    #: (session, acq) of a UTE grid -> (its first echo, the ``segment`` key locating L5)
    endplates: dict[tuple[str | None, str | None],
                    tuple[Path, tuple[str | None, str | None]]] = field(default_factory=dict)
    #: (session, acq) of a UTE grid -> endplate (dseg, dseg.tsv) given with --derivatives
    endplate_masks: dict[tuple[str | None, str | None],
                         tuple[Path, Path]] = field(default_factory=dict)


def log_dir(config: RunConfig, subject: str) -> Path:
    """Where a subject's run configuration and crash files go."""
    return config.output_dir / f"sub-{subject}" / "log" / config.run_uuid


def staging_dir(config: RunConfig) -> Path:
    """Where derivatives wait, in the work directory, until their subject is complete."""
    return config.work_dir / "staging"


def init_spineqprep_wf(config: RunConfig, plans: list[SubjectPlan]) -> pe.Workflow:
    """The participant-level workflow: independent sub-workflows, one per subject."""
    wf = pe.Workflow(name="spineqprep_wf", base_dir=str(config.work_dir))
    model = "S(t) = S0 exp(-t/T)" + (" + C" if config.fit_model == "offset" else "")
    wf.__desc__ = (
        f"Results included in this manuscript come from processing performed with spineqprep "
        f"{config.version}, a BIDS-App for quantitative MRI of the lumbar spine built on Nipype. "
        f"Relaxation times were mapped voxel by voxel by fitting {model} to the images of each "
        "series, with a log-linear initialisation followed by a Levenberg-Marquardt "
        "least-squares fit; voxels whose fit was non-finite, did not converge or fell outside "
        "the valid range were flagged in a validity mask. The series were:"
    )
    for plan in plans:
        sub_wf = init_single_subject_wf(config, plan)
        # Nipype does not pass a sub-workflow's config to its nodes: set it on each node,
        # so that every crash file lands in its own subject's log folder.
        crash_dir = str(log_dir(config, plan.subject))
        for name in sub_wf.list_node_names():
            sub_wf.get_node(name).config = {"execution": {"crashdump_dir": crash_dir}}
        wf.add_nodes([sub_wf])
    return wf


def init_single_subject_wf(config: RunConfig, plan: SubjectPlan) -> pe.Workflow:
    """Map every relaxometry series of one subject, segment each mapping grid (and the sagittal
    T2w, with a T1w on its slices), compute whole-region statistics of the maps, bring the T2 /
    T1rho maps of every disc into atlas space, then publish the subject's derivatives."""
    wf = pe.Workflow(name=f"sub_{plan.subject}_wf")
    staging = staging_dir(config)
    staging.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[pe.Workflow, str]] = []  # (workflow, output) of every staged file list
    series_wfs = []
    for i, series in enumerate(plan.series):
        series_wf = init_relaxometry_wf(
            series, staging_dir=staging, raw_dir=config.bids_dir, fit_model=config.fit_model,
            omp_nthreads=config.omp_nthreads, precomputed=plan.precomputed.get(i),
            name=f"{_prefix(series.session)}{series.target.lower()}_acq_{series.acq or 'none'}_wf",
        )
        series_wfs.append(series_wf)
        staged.append((series_wf, "outputnode.out_files"))

    if config.segmentation:
        seg_wfs: dict[tuple[str | None, str | None], pe.Workflow] = {}
        for (session, acq), image in plan.segment.items():
            entities = _entities(plan.subject, session, acq)
            seg_wfs[(session, acq)] = seg_wf = init_spine_segmentation_wf(
                image, entities, staging_dir=staging, raw_dir=config.bids_dir,
                weights=config.seg_weights, cutoffs=config.cutoffs,
                omp_nthreads=config.omp_nthreads, precomputed=plan.masks.get((session, acq)),
                same_slices=plan.same_slices.get((session, acq), ()),
                name=f"{_prefix(session)}seg_acq_{acq or 'none'}_wf",
            )
            staged.append((seg_wf, "outputnode.out_files"))
            staged += _region_statistics(wf, plan, series_wfs, seg_wf, session, acq, "regions",
                                         staging)
            targets = [(series, series_wf) for i, (series, series_wf)
                       in enumerate(zip(plan.series, series_wfs, strict=True))
                       if (series.session, series.acq) == (session, acq)
                       and series.target in REGISTERED_TARGETS
                       and _complete_fit(series.target, plan.precomputed.get(i))]
            if config.registration and targets:
                suffix = f"{_prefix(session)}acq_{acq or 'none'}"
                reg_wf = init_disc_registration_wf(
                    entities, [s for s, _ in targets], staging_dir=staging,
                    raw_dir=config.bids_dir, atlas_dir=config.atlas,
                    backend=config.registration_backend,
                    parameter_maps=config.registration_params, warp=config.warp,
                    fit_model=config.fit_model, omp_nthreads=config.omp_nthreads,
                    name=f"reg_{suffix}_wf")
                fits = pe.Node(niu.Merge(len(targets)), name=f"fits_{suffix}",
                               run_without_submitting=True)
                for j, (_, series_wf) in enumerate(targets, start=1):
                    wf.connect(series_wf, "outputnode.out_files", fits, f"in{j}")
                wf.connect([(fits, reg_wf, [("out", "inputnode.fits")]),
                            (seg_wf, reg_wf, [("outputnode.dseg", "inputnode.dseg")])])
                staged.append((reg_wf, "outputnode.out_files"))
        for (session, acq), (ute, locator) in plan.endplates.items():
            cep_wf = init_endplate_segmentation_wf(
                ute, _entities(plan.subject, session, acq), staging_dir=staging,
                raw_dir=config.bids_dir, weights=config.cep_weights, cutoffs=config.cutoffs,
                omp_nthreads=config.omp_nthreads,
                precomputed=plan.endplate_masks.get((session, acq)),
                name=f"{_prefix(session)}endplates_acq_{acq or 'none'}_wf")
            if (session, acq) not in plan.endplate_masks:
                wf.connect(seg_wfs[locator], "outputnode.dseg", cep_wf, "inputnode.locator")
            staged.append((cep_wf, "outputnode.out_files"))
            staged += _region_statistics(wf, plan, series_wfs, cep_wf, session, acq,
                                         "endplates", staging)

    merge = pe.Node(niu.Merge(len(staged), ravel_inputs=True), name="merge_derivatives",
                    run_without_submitting=True)
    commit = pe.Node(
        CommitDerivatives(staging_dir=str(staging), output_dir=str(config.output_dir)),
        name="commit_derivatives", run_without_submitting=True, overwrite=True,
    )
    for i, (node, output) in enumerate(staged, start=1):
        wf.connect(node, output, merge, f"in{i}")
    wf.connect(merge, "out", commit, "in_files")
    return wf


def _region_statistics(wf: pe.Workflow, plan: SubjectPlan, series_wfs: list[pe.Workflow],
                       seg_wf: pe.Workflow, session: str | None, acq: str | None, desc: str,
                       staging: Path) -> list[tuple[pe.Workflow, str]]:
    """Connect whole-region statistics of every map on the grid (session, acq) over the
    segmentation of ``seg_wf``; returns the staged outputs."""
    staged = []
    for series, series_wf in zip(plan.series, series_wfs, strict=True):
        if (series.session, series.acq) != (session, acq):
            continue
        stats_wf = init_region_statistics_wf(
            _entities(plan.subject, session, acq), series.target, staging_dir=staging,
            desc=desc, name=f"{_prefix(session)}{desc}_{series.target.lower()}_acq_{acq}_wf")
        wf.connect([
            (series_wf, stats_wf, [("outputnode.out_map", "inputnode.map"),
                                   ("outputnode.out_mask", "inputnode.mask")]),
            (seg_wf, stats_wf, [("outputnode.dseg", "inputnode.dseg"),
                                ("outputnode.labels", "inputnode.labels")]),
        ])
        staged.append((stats_wf, "outputnode.out_file"))
    return staged


def _entities(subject: str, session: str | None, acq: str | None) -> dict[str, str]:
    return {k: v for k, v in {"sub": subject, "ses": session, "acq": acq}.items() if v}


def _complete_fit(target: str, precomputed: dict[str, Path] | None) -> bool:
    """A series fitted here, or reused with its map and all three fit by-products."""
    return not precomputed or {target, "S0map", "Rsquared", "mask"} <= set(precomputed)


def _prefix(session: str | None) -> str:
    return f"ses_{session}_" if session else ""


def boilerplate(wf: pe.Workflow) -> str:
    """The methods text of a workflow: the ``__desc__`` of it and its sub-workflows, in order,
    each text once."""
    texts: list[str] = []

    def walk(node: pe.Workflow) -> None:
        desc = getattr(node, "__desc__", "")
        if desc and desc not in texts:
            texts.append(desc)
        for name in sorted({n.split(".")[0] for n in node.list_node_names()}):
            child = node.get_node(name)
            if isinstance(child, pe.Workflow):
                walk(child)

    walk(wf)
    return "".join(texts).strip()
