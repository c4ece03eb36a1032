"""The official BIDS validator (``bids-validator-deno`` from PyPI) on the plain-BIDS part.

The PyPI package ships the validator as a JavaScript bundle and runs it with the ``deno``
runtime of the ``deno`` package: no network is needed. The extension's files (``MESL``) and
spineqprep's non-BIDS outputs (``Rsquared``, reports, logs) are hidden from it by ``.bidsignore``
patterns from the schema. The user's dataset is never written to: the validator runs on a
temporary shadow tree of symbolic links to the dataset's top-level entries (the validator
follows them) plus a ``.bidsignore`` that merges the dataset's own with ours.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spineqprep.bids.schema import load_schema
from spineqprep.bids.validate import Problem
from spineqprep.errors import SpineqprepError

_SKIP_FIX = "install bids-validator-deno (pip install bids-validator-deno) or run with " \
            "--skip-bids-validation"
#: fixes for the issue codes a spine dataset meets most; others get the validator's own text
_FIXES = {
    "NOT_INCLUDED": "rename the file as BIDS (or bids_spec/) names it, or list it in .bidsignore",
    "EMPTY_FILE": "replace the empty file with the real data",
    "NIFTI_HEADER_UNREADABLE": "convert the image again (e.g. dcm2niix) and replace the file",
    "JSON_INVALID": "fix the JSON syntax",
}


@dataclass(frozen=True)
class ValidatorReport:
    """The validator's findings as :class:`Problem` s, and its dataset summary."""

    problems: tuple[Problem, ...]
    summary: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def validator_command() -> list[str]:
    """The command that starts the validator: the package's entry point in this interpreter
    (so the installed ``deno`` runtime is the one found), else the executable on ``PATH``."""
    if importlib.util.find_spec("bids_validator_deno") is not None:
        return [sys.executable, "-c", "from bids_validator_deno import cli; cli()"]
    exe = shutil.which("bids-validator-deno")
    if exe:
        return [exe]
    raise SpineqprepError("the BIDS validator (bids-validator-deno) is not installed",
                          fix=_SKIP_FIX)


def _is_derivative(root: Path) -> bool:
    try:
        desc = json.loads((root / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(desc, dict) and desc.get("DatasetType") == "derivative"


def _bidsignore_lines(root: Path) -> list[str]:
    """The dataset's own ``.bidsignore`` lines followed by the schema's patterns."""
    schema = load_schema()
    own = root / ".bidsignore"
    lines = own.read_text().splitlines() if own.is_file() else []
    extra = list(schema["raw"]["bidsignore"])
    if _is_derivative(root):
        extra += schema["derivatives"]["bidsignore"]
    return lines + [p for p in extra if p not in lines]


def _shadow_tree(root: Path, into: Path) -> Path:
    """``into``: links to every top-level entry of ``root`` and our merged ``.bidsignore``."""
    into.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name != ".bidsignore":
            (into / entry.name).symlink_to(entry.resolve())
    (into / ".bidsignore").write_text("\n".join(_bidsignore_lines(root)) + "\n")
    return into


def run_bids_validator(
    bids_dir: str | Path, *, ignore_warnings: bool = False, timeout: float = 900,
) -> ValidatorReport:
    """Run the official validator on a raw or derivatives dataset (read-only for it).

    Raises ``SpineqprepError`` (suggesting ``--skip-bids-validation``) when the validator cannot
    run or its output cannot be read.
    """
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise SpineqprepError("dataset folder not found", path=root)
    cmd = validator_command()
    with tempfile.TemporaryDirectory(prefix="spineqprep-bv-") as tmp:
        shadow = _shadow_tree(root, Path(tmp) / root.name)
        env = {**os.environ, "NO_COLOR": "1"}
        args = [*cmd, str(shadow), "--format", "json", "--no-color"]
        if ignore_warnings:
            args.append("--ignoreWarnings")
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                  env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SpineqprepError(f"the BIDS validator could not run ({err})", path=root,
                                  fix=_SKIP_FIX) from None
    try:
        output = json.loads(proc.stdout)
        issues = output["issues"]["issues"]
    except (json.JSONDecodeError, KeyError, TypeError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SpineqprepError(
            f"the BIDS validator failed (exit code {proc.returncode}): {' | '.join(tail)}",
            path=root, fix=_SKIP_FIX) from None
    messages = output["issues"].get("codeMessages", {})
    problems = tuple(_as_problem(root, issue, messages) for issue in issues
                     if issue.get("severity") in ("error", "warning"))
    return ValidatorReport(problems=problems, summary=output.get("summary", {}))


def _as_problem(root: Path, issue: dict[str, Any], messages: dict[str, str]) -> Problem:
    code = issue.get("code", "UNKNOWN")
    sub = f" {issue['subCode']}" if issue.get("subCode") else ""
    detail = (issue.get("issueMessage") or messages.get(code) or "").strip()
    first = detail.splitlines()[0] if detail else ""
    location = issue.get("location")
    path = str(root / location.lstrip("/")) if location else str(root)
    fix = _FIXES.get(code, "see the BIDS specification (bids_spec/ for the extension)")
    if code.endswith("_KEY_REQUIRED") and issue.get("subCode"):
        fix = f"add \"{issue['subCode']}\" to the JSON sidecar of the file"
    return Problem(path, f"BIDS validator {code}{sub}" + (f": {first}" if first else ""), fix,
                   issue["severity"])
