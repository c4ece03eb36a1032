"""``spineqprep`` entry point: check the paths, plan each subject, run, publish, report."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import partial

from spineqprep.cli.parser import parse_args
from spineqprep.config import RunConfig
from spineqprep.errors import SpineqprepError, UsageError

LOG = logging.getLogger("spineqprep")


def main(argv: list[str] | None = None) -> int:
    """Run spineqprep; user errors end in one message and a non-zero exit, no traceback."""
    os.environ.setdefault("NO_ET", "1")  # Nipype must never phone home
    try:
        config = parse_args(argv)
        _setup_logging(config.verbosity)
        return run(config)
    except SpineqprepError as err:
        print(f"spineqprep: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("spineqprep: interrupted; rerun with the same --work-dir to resume", file=sys.stderr)
        return 130


def run(config: RunConfig) -> int:
    """Run the analysis level named in ``config``; returns the exit code."""
    check_paths(config)
    check_options(config)
    if config.analysis_level == "group":
        from spineqprep.cli.group import run_group

        return run_group(config)
    from spineqprep.cli.participant import run_participant

    return run_participant(config)


def check_paths(config: RunConfig) -> None:
    """Refuse a missing raw dataset and output or work folders inside it."""
    bids = config.bids_dir
    if not bids.is_dir():
        raise UsageError("the BIDS dataset folder does not exist", path=bids,
                         fix="give the path of a BIDS dataset as the first argument")
    if not (bids / "dataset_description.json").is_file():
        raise UsageError("not a BIDS dataset: no dataset_description.json", path=bids,
                         fix="give the root folder of the BIDS dataset")
    for name, path in (("output", config.output_dir), ("work", config.work_dir)):
        if path == bids or bids in path.parents:
            raise UsageError(
                f"the {name} folder is inside the raw dataset; spineqprep never writes there",
                path=path, fix=f"choose a {name} folder outside {bids}",
            )
        if path in bids.parents:
            raise UsageError(f"the {name} folder contains the raw dataset", path=path,
                             fix=f"choose a {name} folder that does not contain {bids}")
    for path in config.derivatives:
        if not path.is_dir():
            raise UsageError("derivatives dataset not found", path=path)


def check_options(config: RunConfig) -> None:
    """Check the model bundles and registration inputs the participant level will use, with
    the validators the steps themselves use, so that a wrong one stops the run before any
    subject is processed (inside the workflow it would fail every subject after the fits)."""
    if config.analysis_level != "participant" or not config.segmentation:
        return
    checks: list[tuple[str, Callable[[], object]]] = []
    if config.seg_weights or config.cep_weights:
        from spineqprep.segmentation.model_io import load_bundle

        checks += [(f"--{option}-weights", partial(load_bundle, path, name=name))
                   for option, path, name in (("seg", config.seg_weights, "spine"),
                                              ("cep", config.cep_weights, "endplates"))
                   if path]
    if config.registration:
        from spineqprep.registration.atlas import load_atlas
        from spineqprep.registration.disc import check_options as check_registration

        if config.atlas:
            checks.append(("--atlas", partial(load_atlas, config.atlas)))
        option = "--registration-params" if config.registration_params else \
            "--registration-backend"
        checks.append((option, partial(
            check_registration, config.registration_backend,
            config.registration_params or None)))
    for option, check in checks:
        try:
            check()
        except SpineqprepError as err:
            raise UsageError(f"{option}: {err}") from None


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * (1 + (verbosity or 0))
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    # Nipype's own error logs carry tracebacks; spineqprep reports failures itself (one line per
    # subject, pointing at the crash file), so Nipype speaks only when asked with -v.
    nipype_level = ["CRITICAL", "WARNING", "INFO"][min(verbosity or 0, 2)]
    logging.getLogger("bidsschematools").setLevel(logging.WARNING)
    nipype_config.set("logging", "workflow_level", nipype_level)
    nipype_config.set("logging", "interface_level", nipype_level)
    nipype_logging.update_logging(nipype_config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
