"""One pinned environment everywhere: CI (.ci/run and the Makefile it calls), Docker, Singularity.

Each of the three installs ``torch==2.13.0`` first, then ``-r requirements.lock``, then the
package itself with ``--no-deps``, and nothing unpinned. requirements.lock pins every line with
``==``; the ranges of pyproject.toml (and torch's own requirements) admit those pins.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
#: pip options that take a value as the next word.
VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "--trusted-host", "-t", "--target", "--prefix", "--root",
    "--cache-dir", "--cert", "--client-cert", "--proxy", "--timeout", "--retries",
    "--progress-bar", "--platform", "--python-version", "--implementation", "--abi",
    "--only-binary", "--no-binary", "--src", "--upgrade-strategy", "--report", "-C",
    "--config-settings", "--global-option", "--log", "--python", "-e", "--editable",
}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "then", "else", "do", "fi", "done"}


@dataclass
class PipInstall:
    """One ``pip install`` command line, split into what it installs."""

    text: str
    pinned: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


def _commands(script: str) -> list[list[str]]:
    """Simple commands of a POSIX shell script (continuations joined, lists split)."""
    script = re.sub(r"\\\n", " ", script)
    commands: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS or set(token) <= set(";&|()"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def pip_installs(script: str) -> list[PipInstall]:
    """Every ``pip install`` (or ``python -m pip install``) of a shell script, in order."""
    found = []
    for words in _commands(script):
        for i, word in enumerate(words[:-1]):
            is_pip = re.fullmatch(r"(.*/)?pip3?(\.\d+)?", word) or (
                word == "pip" and i > 0 and words[i - 1] == "-m")
            if is_pip and words[i + 1] == "install":
                found.append(_classify(words[i + 2:], shlex.join(words)))
                break
    return found


def _classify(args: list[str], text: str) -> PipInstall:
    install = PipInstall(text)
    it = iter(args)
    for arg in it:
        if arg in VALUE_OPTIONS:
            value = next(it, "")
            if arg in ("-r", "--requirement"):
                install.files.append(value)
            elif arg in ("-e", "--editable"):
                install.unpinned.append(f"-e {value}")
            else:
                install.options.append(f"{arg} {value}")
        elif arg.startswith("-"):
            install.options.append(arg)
        elif arg == "." or (arg.startswith(("/", "./")) and "==" not in arg):
            install.local.append(arg)
        elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[\w,.-]+\])?==[\w.!+-]+", arg):
            install.pinned.append(arg)
        else:
            install.unpinned.append(arg)
    return install


def _dockerfile_script(path: Path) -> str:
    text = re.sub(r"\\\n", " ", path.read_text())
    runs = []
    for line in text.splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0].upper() == "RUN":
            runs.append(re.sub(r"^(\s*--(mount|network|security)=\S+)+", "", words[1]))
    return "\n".join(runs)


def _def_post(path: Path) -> str:
    match = re.search(r"^%post\s*\n(.*?)(?=^%\w+|\Z)", path.read_text(), flags=re.M | re.S)
    assert match, f"no %post in {path}"
    return match.group(1)


def _ci_script(path: Path) -> str:
    """.ci/run with every ``make TARGET...`` replaced by what make would run (``make -n -B``)."""
    lines = []
    for words in _commands(path.read_text()):
        if words[0] == "make":
            if shutil.which("make") is None:
                pytest.fail(".ci/run calls make, which is not installed")
            dry = subprocess.run(["make", "-n", "-B", "-C", str(REPO), *words[1:]],
                                 capture_output=True, text=True, timeout=60, check=True)
            lines.append(dry.stdout)
        else:
            lines.append(shlex.join(words))
    return "\n".join(lines)


SOURCES = {
    ".ci/run": lambda: _ci_script(REPO / ".ci" / "run"),
    "Dockerfile": lambda: _dockerfile_script(REPO / "Dockerfile"),
    "singularity.def": lambda: _def_post(REPO / "singularity.def"),
}


def read_pins(path: Path) -> dict[str, str]:
    """``name -> version`` of a fully pinned requirements file (fails on any other line)."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][\w.!+-]*)", line)
        assert match, f"{path.name}:{number}: not an exact `name==version` pin: {raw!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}:{number}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_installs_torch_then_lock_then_package(source: str) -> None:
    installs = pip_installs(SOURCES[source]())
    assert installs, f"{source}: no pip install found"
    order = []
    for install in installs:
        where = f"{source}: `{install.text}`"
        assert not install.unpinned, f"{where} installs unpinned {install.unpinned}"
        for name in install.files:
            file = REPO / Path(name).name
            assert file.exists() and Path(name).name.endswith(".lock"), \
                f"{where}: -r {name} is not one of the repository's lock files"
            read_pins(file)
        if TORCH.split("==")[0] in {p.split("==")[0] for p in install.pinned}:
            assert install.pinned == [TORCH], f"{where}: torch must be installed alone as {TORCH}"
            order.append("torch")
        if any(Path(f).name == "requirements.lock" for f in install.files):
            order.append("lock")
        if install.local:
            assert "--no-deps" in install.options, f"{where}: the package needs --no-deps"
            order.append("package")
    firsts = [order.index(step) if step in order else None for step in ("torch", "lock", "package")]
    assert None not in firsts, f"{source}: steps found {order}, want torch, lock and package"
    assert firsts == sorted(firsts), f"{source}: install order {order}, want torch, lock, package"


def test_lock_files_pin_every_line() -> None:
    pins = read_pins(REPO / "requirements.lock")
    assert pins.get("torch", "2.13.0") == "2.13.0"
    if (REPO / "requirements-test.lock").exists():
        test_pins = read_pins(REPO / "requirements-test.lock")
        clash = {n: (v, test_pins[n]) for n, v in pins.items() if test_pins.get(n, v) != v}
        assert not clash, f"the two lock files disagree: {clash}"


def _admits(requirement: str, pins: dict[str, str], what: str) -> str | None:
    req = Requirement(requirement)
    if req.marker and not req.marker.evaluate({**default_environment(), "extra": ""}):
        return None
    name = canonicalize_name(req.name)
    if name == "torch":
        version = TORCH.split("==")[1]
    elif name in pins:
        version = pins[name]
    else:
        return f"{what}: {req.name} is not pinned"
    if not req.specifier.contains(version, prereleases=True):
        return f"{what}: {requirement} does not admit the pin {version}"
    return None


def test_pyproject_ranges_admit_the_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = read_pins(REPO / "requirements.lock")
    problems = [_admits(r, pins, "dependencies") for r in project["dependencies"]]
    test_lock = REPO / "requirements-test.lock"
    if test_lock.exists():
        all_pins = {**pins, **read_pins(test_lock)}
        extras = project.get("optional-dependencies", {}).get("test", [])
        problems += [_admits(r, all_pins, "optional-dependencies.test") for r in extras]
    problems = [p for p in problems if p]
    assert not problems, problems


def test_lock_satisfies_torch_requirements() -> None:
    """torch goes in with --no-deps in the images: the lock must hold what torch needs."""
    wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
    if not wheels:
        pytest.skip("no local torch 2.13.0 CPU wheel to read its requirements from")
    with zipfile.ZipFile(wheels[0]) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in
                    wheel.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]
    pins = read_pins(REPO / "requirements.lock")
    problems = [p for p in (_admits(r, pins, "torch requires") for r in requires) if p]
    assert not problems, problems
