"""The participant level: validate, plan each subject, run the workflow, publish and report.

A subject whose input is wrong, or whose processing fails, is reported and skipped; the others
go on. The exit code is non-zero when any subject failed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import nibabel as nib
from nibabel.filebasedimages import ImageFileError

from spineqprep.bids.derivatives import build_path, write_dataset_description
from spineqprep.bids.layout import (
    Series,
    collect_participants,
    collect_series,
    collect_structurals,
)
from spineqprep.bids.schema import load_schema
from spineqprep.bids.validate import Problem, check_dataset, check_series
from spineqprep.config import RunConfig
from spineqprep.errors import InputError
from spineqprep.workflows.base import (
    SubjectPlan,
    boilerplate,
    init_spineqprep_wf,
    log_dir,
)

LOG = logging.getLogger("spineqprep")
#: series whose first image is segmented (their grid gets a _dseg and region statistics)
SEGMENTED_SERIES = ("MESL", "MESE")
_SUBJECT_IN_PATH = re.compile(r"(?:^|/)sub-([A-Za-z0-9]+)(?:/|_)")


def run_participant(config: RunConfig) -> int:
    """Process every selected subject; returns 0 when all succeeded, 1 otherwise."""
    subjects = collect_participants(
        config.bids_dir, participant_label=config.participant_label or None,
        session_label=config.session_label or None, bids_filters=config.bids_filters or None,
    )
    failures: dict[str, list[str]] = {}
    if not config.skip_bids_validation:
        failures.update(_validate_dataset(config, subjects))
    plans = []
    for subject in subjects:
        if subject in failures:
            continue
        try:
            plans.append(_plan_subject(config, subject))
        except InputError as err:
            failures[subject] = [str(err)]
        if failures and config.stop_on_first_crash:
            break
    if failures and config.stop_on_first_crash:
        _print_failures(failures, len(subjects))
        return 1

    write_dataset_description(config.output_dir, bids_dir=config.bids_dir,
                              version=config.version, container=_container(config.version))
    for subject in subjects:
        config.save(log_dir(config, subject) / "spineqprep.toml")
    wf = init_spineqprep_wf(config, plans)
    methods = boilerplate(wf)
    _write_boilerplate(config.output_dir, methods)
    if config.boilerplate_only:
        print(f"spineqprep: boilerplate written to {config.output_dir / 'logs'}")
        return 0
    if not config.reports_only and plans:
        failures.update(_run_workflow(config, wf, [p.subject for p in plans]))

    report_errors = _build_reports(config, subjects, failures, methods)
    if failures or report_errors:
        if failures:
            _print_failures(failures, len(subjects))
        for message in report_errors:
            print(f"spineqprep: {message}", file=sys.stderr)
        return 1
    LOG.info("spineqprep: %d participant(s) finished; derivatives in %s", len(subjects),
             config.output_dir)
    return 0


def _build_reports(config: RunConfig, subjects: list[str], failures: dict[str, list[str]],
                   methods: str) -> list[str]:
    """Write every subject's report; a report that cannot be drawn is an error of its own and
    never takes the subject's published maps with it."""
    from spineqprep.reports import build_subject_report

    errors = []
    for subject in subjects:
        try:
            build_subject_report(config.output_dir, subject, bids_dir=config.bids_dir,
                                 errors=failures.get(subject), boilerplate=methods)
        except Exception as err:  # a figure must not sink the run: name it and go on
            LOG.debug("report of sub-%s", subject, exc_info=True)
            errors.append(f"the report of sub-{subject} could not be built "
                          f"({type(err).__name__}: {err}); its derivatives are complete; "
                          "rerun with --reports-only -v after fixing")
    return errors


def _validate_dataset(config: RunConfig, subjects: list[str]) -> dict[str, list[str]]:
    """Check the raw dataset; dataset-wide errors stop the run, a subject's errors only that
    subject. Returns subject -> messages."""
    from spineqprep.bids.validate import raise_for_problems
    from spineqprep.bids.validator import run_bids_validator

    LOG.info("validating %s (spine extension and BIDS validator)", config.bids_dir)
    problems = [p for p in check_dataset(config.bids_dir, participants=subjects,
                                        bids_filters=config.bids_filters or None)
                if p.severity == "error"]
    report = run_bids_validator(config.bids_dir)
    problems += [p for p in report.problems if p.severity == "error"]
    by_subject: dict[str, list[str]] = {}
    dataset_wide: list[Problem] = []
    for problem in problems:
        match = _SUBJECT_IN_PATH.search(str(problem.path or ""))
        if match:
            by_subject.setdefault(match.group(1), []).append(str(problem))
        else:
            dataset_wide.append(problem)
    if dataset_wide:
        raise_for_problems(dataset_wide)
    return by_subject


def _container(version: str) -> dict[str, str] | None:
    """GeneratedBy.Container of the derivatives: the images set SPINEQPREP_CONTAINER."""
    kind = os.environ.get("SPINEQPREP_CONTAINER")
    return {"Type": kind, "Tag": f"spineqprep:{version}"} if kind else None


def _plan_subject(config: RunConfig, subject: str) -> SubjectPlan:
    """Collect and check the relaxometry series of one subject."""
    series = collect_series(config.bids_dir, subject, sessions=config.session_label or None,
                            bids_filters=config.bids_filters or None)
    if not series:
        raise InputError(
            f"sub-{subject}: no MESE, MESL or MEGRE series found",
            fix="check the file names against bids_spec/ (e.g. "
            "sub-01_acq-mapss_tsl-1_MESL.nii.gz) and any --bids-filter-file",
        )
    errors = [str(p) for s in series for p in check_series(s) if p.severity == "error"]
    if errors:
        raise InputError("\n".join(errors))
    precomputed = {i: found for i, s in enumerate(series) if (found := _precomputed(config, s))}
    LOG.info("sub-%s: %s", subject, ", ".join(
        f"{s.suffix} acq-{s.acq} ({len(s.files)} images)" for s in series))
    segment = {}
    for s in series:
        if s.suffix in SEGMENTED_SERIES:  # the first image of a mapping grid
            segment.setdefault((s.session, s.acq), s.files[0])
    structurals = collect_structurals(config.bids_dir, subject,
                                      sessions=config.session_label or None,
                                      bids_filters=config.bids_filters or None)
    located: dict[str | None, tuple[str | None, str | None]] = {}  # session -> L5 locator
    same_slices: dict[tuple[str | None, str | None], list[Path]] = {}
    t2w: list[tuple[str | None, str | None]] = []
    for preferred in ("T2w", "T1w"):  # one sagittal structural per grid: T2w, else T1w
        for image in structurals:
            if image.suffix != preferred:
                continue
            key = (image.session, image.acq)
            if preferred == "T1w":  # a T1w on the slices of a T2w is segmented with it
                partner = next((k for k in t2w if k[0] == image.session
                                and _shares_slices(segment[k], image.path)), None)
                if partner is not None:
                    same_slices.setdefault(partner, []).append(image.path)
            elif key not in segment:
                t2w.append(key)
            segment.setdefault(key, image.path)
            located.setdefault(image.session, key)
    endplates = {}
    for s in series:
        if s.suffix == "MEGRE":  # UTE: endplates in the crop around L5 of the session's spine
            others = [k for k in segment if k[0] == s.session and k != (s.session, s.acq)]
            locator = located.get(s.session) or (others or [(s.session, s.acq)])[0]
            endplates[(s.session, s.acq)] = (s.files[0], locator)
    masks = {key: found for key in segment if (found := _precomputed_mask(config, subject, *key))}
    endplate_masks = {key: found for key in endplates if (found := _precomputed_mask(
        config, subject, *key, kind="endplates"))}
    return SubjectPlan(subject=subject, series=series, precomputed=precomputed,
                       segment=segment, same_slices=same_slices, masks=masks, endplates=endplates,
                       endplate_masks=endplate_masks)


def _shares_slices(a: Path, b: Path) -> bool:
    """Whether image file ``b`` lies on the sagittal slices of ``a`` (``infer.shares_slices``).
    An unreadable image shares none (its own segmentation node reports it, if it is segmented
    at all)."""
    from spineqprep.segmentation.infer import shares_slices

    try:
        return shares_slices(nib.load(a), nib.load(b))
    except (OSError, ValueError, ImageFileError):
        return False


def _precomputed_mask(config: RunConfig, subject: str, session: str | None, acq: str | None,
                      kind: str = "spine") -> tuple[Path, Path] | None:
    """A segmentation (and its look-up table) of this grid in a --derivatives dataset:
    ``sub-X[_ses-Y]_acq-Z_dseg.nii.gz``, for endplates ``..._desc-endplates_dseg.nii.gz`` (a
    plain ``_dseg`` of a UTE grid is often a spine mask). Its table must name every label it
    holds (:mod:`spineqprep.segmentation.lut`), checked here so that a bad table stops its
    subject before any work starts."""
    from spineqprep.segmentation.lut import check_segmentation, lut_path

    entities = {k: v for k, v in {"sub": subject, "ses": session, "acq": acq}.items() if v}
    if kind == "endplates":
        entities["desc"] = "endplates"
    for root in config.derivatives:
        path = root / build_path(entities, "dseg", ".nii.gz")
        if not path.exists():
            continue
        own = path.with_name(path.name.replace(".nii.gz", ".tsv"))
        lut = lut_path(path, root)
        if lut is None:
            raise InputError("segmentation without a look-up table", path=path,
                             fix=f"add {own.name} next to it (or dseg.tsv at {root}) with the "
                             "columns index and name, one row per label, named by level "
                             "(see docs/segmentation.md)")
        check_segmentation(path, lut, kind)
        LOG.info("reusing %s (labels from %s)", path, lut)
        return path, lut
    return None


def _precomputed(config: RunConfig, series: Series) -> dict[str, Path]:
    """Existing outputs for ``series`` in the ``--derivatives`` datasets (first one wins)."""
    entities = {k: v for k, v in
                {"sub": series.subject, "ses": series.session, "acq": series.acq}.items() if v}
    desc = load_schema()["derivatives"]["maps"][series.target]["desc"]
    wanted = {series.target: entities, "S0map": {**entities, "desc": desc},
              "Rsquared": {**entities, "desc": desc}, "mask": {**entities, "desc": desc}}
    for root in config.derivatives:
        path = root / build_path(entities, series.target, ".nii.gz")
        if path.exists():
            found = {}
            for suffix, ents in wanted.items():
                candidate = root / build_path(ents, suffix, ".nii.gz")
                if candidate.exists():
                    found[suffix] = candidate
            LOG.info("reusing %s", path)
            return found
    return {}


def _run_workflow(config: RunConfig, wf, subjects: list[str]) -> dict[str, list[str]]:
    """Run the Nipype workflow; returns subject -> messages for the subjects that crashed."""
    wf.config["execution"].update({
        "crashfile_format": "txt",
        "stop_on_first_crash": config.stop_on_first_crash,
        "remove_unnecessary_outputs": False,
        "poll_sleep_duration": 0.2,  # Nipype's default of 2 s idles the scheduler
    })
    # workers start from a clean forkserver, as in fMRIPrep: a worker forked from a process
    # that has run torch's OpenMP pool (a notebook, a test session) hangs on its first tensor
    plugin_args = {"n_procs": config.nprocs, "raise_insufficient": False,
                   "mp_context": "forkserver", "status_callback": _Progress(wf),
                   **config.plugin_args}
    if config.mem_mb:
        plugin_args.setdefault("memory_gb", config.mem_mb / 1024)
    if config.plugin != "MultiProc":
        plugin_args = {k: v for k, v in plugin_args.items()
                       if k not in {"n_procs", "memory_gb", "raise_insufficient", "mp_context"}}
    LOG.info("running %d subject(s) with the %s plugin", len(subjects), config.plugin)
    try:
        wf.run(plugin=config.plugin, plugin_args=plugin_args)
    except RuntimeError as err:
        LOG.debug("workflow did not finish cleanly: %s", err)
    failures = {}
    for subject in subjects:
        crashes = sorted(log_dir(config, subject).glob("crash-*.txt"))
        if crashes:
            failures[subject] = [_crash_message(c) for c in crashes]
    return failures


class _Progress:
    """Nipype status callback: one log line per finished or failed fitting / publishing step."""

    def __init__(self, wf) -> None:
        self.total = sum(1 for n in wf.list_node_names() if n.rsplit(".", 1)[-1] in _STEPS)
        self.done = 0

    def __call__(self, node, status: str) -> None:
        step = node.fullname.rsplit(".", 1)[-1]
        if step not in _STEPS or status not in {"end", "exception"}:
            return
        self.done += 1
        where = node.fullname.split(".")[1:-1]
        subject = where[0].removesuffix("_wf").replace("_", "-", 1)
        what = where[-1].removesuffix("_wf") if len(where) > 1 else ""
        what = re.sub(r"^ses_([A-Za-z0-9]+)_", r"ses-\1 ", what).replace("_acq_", " acq-")
        result = _STEPS[step] if status == "end" else "FAILED"
        LOG.info("[%d/%d] %s: %s", self.done, self.total, subject, f"{what} {result}".strip())


_STEPS = {"fit": "fitted", "segment": "segmented", "register_discs": "registered to the atlas",
          "commit_derivatives": "derivatives published"}


def _crash_message(crashfile: Path) -> str:
    """The user-facing error of a Nipype crash file: a spineqprep error with its fix when the
    step raised one, else the last exception line; with the step and the crash file named."""
    text = crashfile.read_text(errors="replace")
    node = re.search(r"^Node: (.+)$", text, re.M)
    ours = re.findall(r"spineqprep\.errors\.\w+: (.+(?:\n\s*fix: .+)?)", text)
    if ours:
        error = " ".join(part.strip() for part in ours[-1].splitlines())
    else:
        errors = re.findall(r"^\s*([\w.]*(?:Error|Exception): .+)$", text, re.M)
        error = errors[-1].strip() if errors else "unknown error"
    where = node.group(1) if node else crashfile.name
    return f"{error} (step {where}; details in {crashfile})"


def _write_boilerplate(output_dir: Path, methods: str) -> None:
    from spineqprep.bids.derivatives import atomic_write_text

    atomic_write_text(
        "# Methods boilerplate\n\nspineqprep writes this text for you to reuse in the methods "
        "section of a paper, citing the software and the methods it implements.\n\n"
        + methods + "\n", output_dir / "logs" / "CITATION.md")


def _print_failures(failures: dict[str, list[str]], n_total: int) -> None:
    print(f"spineqprep: {len(failures)} of {n_total} participant(s) failed; "
          "no derivatives were written for them:", file=sys.stderr)
    for subject, messages in sorted(failures.items()):
        for message in messages:
            print(f"  sub-{subject}: " + message.replace("\n", "\n    "), file=sys.stderr)
