"""The Docker image and the Apptainer/Singularity recipe, built and run for real.

Docker: a private ``dockerd`` (started here, stopped at the end) builds the Dockerfile on a Debian
base made with ``debootstrap`` and tagged as the Dockerfile's ``FROM``; the image then runs the
synthetic generator and both analysis levels with no network, a read-only root file system, a
tmpfs on /tmp, the BIDS folder mounted read-only and a user id the image does not know.

Singularity: Apptainer cannot be installed here, so ``singularity.def`` is parsed with spython and
emulated: ``%files`` copied, ``%post`` run in a chroot of the same base (the torch wheel and the
CA bundle bound on /mnt for the build only, as with ``apptainer build --bind``), then the
``%environment`` + ``%runscript`` pair runs the same dataset on a read-only root.

Both need root (skipped otherwise, but they fail under CI=true rather than skip). The debootstrap
base is cached in ~/.cache/spineqprep-tests (SPINEQPREP_TEST_CACHE); everything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import container_helpers as ch
import pytest

REPO = ch.REPO
IMAGE = "spineqprep:test"
#: A user id that neither image knows (as on a cluster), not root.
UID = 4321
SYNTH_ARGS = ["--subjects", "1", "--sites", "1", "--seed", "3", "--size", "small"]
MAPS = ("T2map", "T1rho", "T2starmap")
BUILD_TIMEOUT = 1500
RUN_TIMEOUT = 900


def _version() -> str:
    text = (REPO / "spineqprep" / "__init__.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _require_tools() -> None:
    reason = ch.missing_tools()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"container tests must run in CI: {reason}")
    pytest.skip(reason)


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _check_freeze(freeze: str) -> None:
    """The environment is exactly torch + requirements.lock + spineqprep (+ pip itself).

    ``freeze`` is the output of ``pip list --format=freeze`` (which names local installs too).
    """
    installed = {}
    for line in freeze.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            installed[_norm(name)] = version.strip()
    expected = {**_lock_pins(), "torch": f"{ch.TORCH_VERSION}+cpu", "spineqprep": _version()}
    wrong = {k: (installed.get(k), v) for k, v in expected.items() if installed.get(k) != v}
    assert not wrong, f"installed != pinned (installed, pinned): {wrong}"
    extra = set(installed) - set(expected) - {"pip"}
    assert not extra, f"unpinned packages in the image: {sorted(extra)}"


def _check_derivatives(out: Path, container: str) -> None:
    import nibabel as nib
    import numpy as np

    description = json.loads((out / "dataset_description.json").read_text())
    assert description.get("DatasetType") == "derivative", description
    assert description["GeneratedBy"][0]["Container"]["Type"] == container, description
    for suffix in MAPS:
        maps = sorted(out.glob(f"sub-*/**/anat/*_{suffix}.nii.gz"))
        assert maps, f"no *_{suffix}.nii.gz under {out}: {sorted(p.name for p in out.rglob('*'))}"
        data = np.asarray(nib.load(maps[0]).dataobj)
        assert data.dtype == np.float32, (maps[0], data.dtype)
        values = data[np.isfinite(data) & (data > 0)]
        assert values.size and np.median(values) < 1.0, f"{maps[0]}: not relaxation times in s"


def _local_cas() -> set[bytes]:
    """Certificates of the host bundle that Debian's ca-certificates does not ship (the proxy's)."""
    if not ch.HOST_CA.exists():
        return set()
    debian = set()
    for crt in Path("/usr/share/ca-certificates").rglob("*.crt"):
        debian |= ch.pem_blocks(crt.read_bytes())
    return ch.pem_blocks(ch.HOST_CA.read_bytes()) - debian


class _SecretScan:
    """Looks for the build-only inputs (CA bundle, local CAs, torch wheel) in a file tree."""

    def __init__(self) -> None:
        self.ca_digest = (hashlib.sha256(ch.HOST_CA.read_bytes()).hexdigest()
                          if ch.HOST_CA.exists() else None)
        self.local_cas = _local_cas()
        self.wheel_sizes = {w.stat().st_size for w in ch.local_torch_wheels()}
        self.found: list[str] = []

    def check(self, name: str, size: int, read: Callable[[], bytes]) -> None:
        """Record ``name`` if it is (or holds) one of the build-only inputs."""
        if re.search(r"(^|/)torch-[^/]*\.whl$", name) or size in self.wheel_sizes:
            self.found.append(f"{name}: the torch wheel")
        if size > 8_000_000:
            return
        data = read()
        if self.ca_digest and hashlib.sha256(data).hexdigest() == self.ca_digest:
            self.found.append(f"{name}: the host CA bundle")
        if b"BEGIN CERTIFICATE" in data and ch.pem_blocks(data) & self.local_cas:
            self.found.append(f"{name}: a certificate of the host's local CAs")


def _synth_and_checksum(data_dir: Path) -> dict[str, str]:
    bids = data_dir / "bids"
    assert (bids / "dataset_description.json").is_file(), sorted(data_dir.rglob("*"))
    assert list(bids.glob("sub-*/**/anat/*_MESE.nii.gz")), "synthetic dataset without MESE"
    return ch.tree_digest(bids)


def _writable_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logs() -> Path:
    """Logs of the last run, kept after it (pytest's own temporary folders are pruned)."""
    _require_tools()
    folder = ch.CACHE_DIR / "logs-last-run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def base_tar(logs: Path) -> Path:
    _require_tools()
    return ch.base_tarball(log=logs / "debootstrap.log")


@pytest.fixture(scope="module")
def engine(base_tar: Path, logs: Path) -> Iterator[ch.DockerEngine]:
    # Short path: the engine's sockets live under it (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="sqp-docker-", dir="/tmp"))
    eng = ch.DockerEngine(root)
    try:
        eng.start()
        eng.docker("import", base_tar, ch.dockerfile_base(), log=logs / "docker.log")
        yield eng
    finally:
        eng.stop()
        if eng.log.exists():
            shutil.copy(eng.log, logs / "dockerd.log")
        ch.unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image(engine: ch.DockerEngine, logs: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the Dockerfile: the CA bundle as a BuildKit secret, the torch wheel in the context."""
    context = ch.build_context(tmp_path_factory.mktemp("docker-context"), ch.local_torch_wheels())
    args = ["build", "--network", "host", "--progress", "plain", "-t", IMAGE]
    if ch.HOST_CA.exists():
        args += ["--secret", f"id=pip_cert,src={ch.HOST_CA}"]
    if (context / "wheels").is_dir():
        args += ["--build-arg", "TORCH_WHEELS=wheels"]
    engine.docker(*args, context, log=logs / "docker-build.log", timeout=BUILD_TIMEOUT)
    return IMAGE


def _docker_run(engine: ch.DockerEngine, *args: str, entrypoint: str | None = None,
                mounts: tuple[str, ...] = (), log: Path | None = None,
                timeout: float = RUN_TIMEOUT) -> str:
    cmd = ["run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp:rw,exec,mode=1777",
           "--user", f"{UID}:{UID}"]
    for mount in mounts:
        cmd += ["-v", mount]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    result = engine.docker(*cmd, IMAGE, *args, log=log, timeout=timeout)
    return result.stdout.decode(errors="replace")


@pytest.fixture(scope="module")
def chroot_image(base_tar: Path, logs: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``apptainer build`` emulated: %files, then %post in a chroot with /mnt bound, runtime."""
    _, sections = ch.def_file_sections((REPO / "singularity.def").read_text())
    work = Path(tempfile.mkdtemp(prefix="sqp-sif-", dir=tmp_path_factory.getbasetemp()))
    rootfs = work / "rootfs"
    try:
        ch.extract_rootfs(base_tar, rootfs)
        shutil.copy("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
        ch.install_def_files(sections.get("files", ""), rootfs)
        extras = work / "build-extras"
        extras.mkdir()
        for wheel in ch.local_torch_wheels():
            ch.link_or_copy(wheel, extras / wheel.name)
        if ch.HOST_CA.exists():
            shutil.copy(ch.HOST_CA, extras / "ca-certificates.crt")
        ch.chroot_run(rootfs, sections["post"], binds=[ch.Bind(extras, "/mnt", readonly=True)],
                      log=logs / "singularity-post.log", timeout=BUILD_TIMEOUT)
        ch.install_def_runtime(sections, rootfs)
        yield rootfs
    finally:
        ch.unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)


def _chroot_container(rootfs: Path, *args: str, binds: tuple[ch.Bind, ...] = (),
                      script: str = ch.RUN_CONTAINER, log: Path | None = None) -> str:
    """Run the container as Apptainer would: read-only, unknown user, no usable $HOME."""
    result = ch.chroot_run(rootfs, script, args, binds=binds, user=f"{UID}:{UID}",
                           readonly=True, cwd="/tmp", log=log, timeout=RUN_TIMEOUT,
                           env={"HOME": "/nonexistent", "TMPDIR": "/tmp"})
    return result.stdout.decode(errors="replace")


# --------------------------------------------------------------------------- Docker


@pytest.mark.container
def test_docker_image_runs_read_only_as_any_user(engine: ch.DockerEngine, image: str) -> None:
    out = _docker_run(engine, "--version")
    assert out.strip() == f"spineqprep {_version()}"


@pytest.mark.container
def test_docker_image_config(engine: ch.DockerEngine, image: str) -> None:
    config = json.loads(engine.docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["spineqprep"]
    assert config["User"] == "1000:1000"  # numeric: runAsNonRoot-friendly
    env = dict(item.split("=", 1) for item in config["Env"])
    for key, value in {"NIPYPE_NO_ET": "1", "NO_ET": "1", "HOME": "/tmp", "TMPDIR": "/tmp"}.items():
        assert env.get(key) == value, (key, env)
    assert env["MPLCONFIGDIR"].startswith("/tmp/")
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert not {k for k in env if k.startswith("PIP_")}, env
    assert config["Labels"]["org.opencontainers.image.title"] == "spineqprep"


@pytest.mark.container
def test_docker_environment_is_the_pinned_one(engine: ch.DockerEngine, image: str) -> None:
    _check_freeze(_docker_run(engine, "-m", "pip", "list", "--format=freeze", entrypoint="python"))
    code = "import sys, torch; print(sys.executable, sys.version_info[:2], torch.__version__)"
    python = _docker_run(engine, "-c", code, entrypoint="python")
    assert python.split()[0] == "/opt/venv/bin/python"
    assert "(3, 11)" in python and "+cpu" in python


@pytest.mark.container
def test_docker_image_keeps_no_build_inputs(engine: ch.DockerEngine, image: str) -> None:
    history = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    text = history.stdout.decode()
    for needle in ("BEGIN CERTIFICATE", str(ch.HOST_CA), ".whl", "/opt/wheels", "PIP_CERT"):
        assert needle not in text, f"{needle!r} in docker history"
    container = engine.docker("create", image).stdout.decode().strip()
    scan = _SecretScan()
    try:
        export = subprocess.Popen([engine.client, "export", container], env=engine.env,
                                  stdout=subprocess.PIPE)
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    scan.check(member.name, member.size,
                               lambda m=member: tar.extractfile(m).read())
        assert export.wait(300) == 0
    finally:
        engine.docker("rm", "-f", container, check=False)
    assert not scan.found, scan.found


@pytest.mark.container
def test_docker_bids_app_participant_and_group(engine: ch.DockerEngine, image: str, logs: Path,
                                               tmp_path: Path) -> None:
    data = _writable_dir(tmp_path / "data")
    _docker_run(engine, "/data/bids", *SYNTH_ARGS, entrypoint="spineqprep-synth",
                mounts=(f"{data}:/data",), log=logs / "docker-synth.log")
    before = _synth_and_checksum(data)
    out = _writable_dir(tmp_path / "out")
    mounts = (f"{data / 'bids'}:/bids:ro", f"{out}:/out")
    _docker_run(engine, "/bids", "/out", "participant", mounts=mounts,
                log=logs / "docker-participant.log")
    _check_derivatives(out, "docker")
    after_participant = ch.tree_digest(out)
    _docker_run(engine, "/bids", "/out", "group", mounts=mounts, log=logs / "docker-group.log")
    assert set(ch.tree_digest(out)) - set(after_participant), "group level wrote nothing"
    assert ch.tree_digest(data / "bids") == before, "the BIDS dataset was modified"


# --------------------------------------------------------------------------- Singularity


def test_singularity_def_parses_and_matches_the_dockerfile() -> None:
    parsers = pytest.importorskip("spython.main.parse.parsers")

    path = REPO / "singularity.def"
    recipe = next(iter(parsers.SingularityParser(str(path)).recipe.values()))
    assert recipe.fromHeader == ch.dockerfile_base()
    assert any("torch==2.13.0" in line for line in recipe.install)
    assert recipe.cmd == 'exec spineqprep "$@"'
    assert recipe.labels
    env = " ".join(recipe.environ)
    for key in ("NIPYPE_NO_ET=1", "NO_ET=1", "MPLCONFIGDIR=", "TMPDIR=", "/opt/venv/bin"):
        assert key in env, key
    header, sections = ch.def_file_sections(path.read_text())
    assert header["bootstrap"] == "docker"
    assert {"help", "labels", "files", "post", "environment", "runscript", "test"} <= set(sections)
    assert "spineqprep" in sections["help"]


@pytest.mark.container
def test_singularity_version_read_only(chroot_image: Path) -> None:
    out = _chroot_container(chroot_image, "--version")
    assert out.strip() == f"spineqprep {_version()}"
    _, sections = ch.def_file_sections((REPO / "singularity.def").read_text())
    test_script = ". /.singularity.d/env/90-environment.sh\n" + sections["test"]
    assert f"spineqprep {_version()}" in _chroot_container(chroot_image, script=test_script)


@pytest.mark.container
def test_singularity_environment_is_the_pinned_one(chroot_image: Path) -> None:
    freeze = ch.chroot_run(chroot_image, "/opt/venv/bin/python -m pip list --format=freeze",
                           readonly=True).stdout.decode()
    _check_freeze(freeze)


@pytest.mark.container
def test_singularity_image_keeps_no_build_inputs(chroot_image: Path) -> None:
    assert not list((chroot_image / "mnt").iterdir())
    assert not (chroot_image / "opt" / "spineqprep-src").exists()
    scan = _SecretScan()
    for path in ch.iter_files(chroot_image):
        scan.check(str(path.relative_to(chroot_image)), path.stat().st_size, path.read_bytes)
    assert not scan.found, scan.found


@pytest.mark.container
def test_singularity_bids_app_participant_and_group(chroot_image: Path, logs: Path,
                                                    tmp_path: Path) -> None:
    data = _writable_dir(tmp_path / "data")
    synth = ". /.singularity.d/env/90-environment.sh; exec spineqprep-synth \"$@\""
    _chroot_container(chroot_image, "/data/bids", *SYNTH_ARGS, script=synth,
                      binds=(ch.Bind(data, "/data"),), log=logs / "singularity-synth.log")
    before = _synth_and_checksum(data)
    out = _writable_dir(tmp_path / "out")
    binds = (ch.Bind(data / "bids", "/bids", readonly=True), ch.Bind(out, "/out"))
    _chroot_container(chroot_image, "/bids", "/out", "participant", binds=binds,
                      log=logs / "singularity-participant.log")
    _check_derivatives(out, "singularity")
    after_participant = ch.tree_digest(out)
    _chroot_container(chroot_image, "/bids", "/out", "group", binds=binds,
                      log=logs / "singularity-group.log")
    assert set(ch.tree_digest(out)) - set(after_participant), "group level wrote nothing"
    assert ch.tree_digest(data / "bids") == before, "the BIDS dataset was modified"


# --------------------------------------------------------------------------- linters


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not installed (requirements-test.lock)")
        pytest.skip(f"{name} not installed (pip install -r requirements-test.lock)")
    return path


def test_hadolint_dockerfile() -> None:
    result = subprocess.run([_tool("hadolint"), "--no-color", str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_scripts(tmp_path: Path) -> None:
    """%post, %environment, %runscript and %test of singularity.def, .ci/run, every *.sh."""
    _, sections = ch.def_file_sections((REPO / "singularity.def").read_text())
    scripts = []
    for name in ("post", "environment", "runscript", "test"):
        script = tmp_path / f"singularity-{name}.sh"
        script.write_text("#!/bin/sh\n" + sections[name])
        scripts.append(script)
    scripts.append(REPO / ".ci" / "run")
    skip = {".git", ".venv", "node_modules", "demo"}
    scripts += [p for p in REPO.rglob("*.sh") if not skip & set(p.relative_to(REPO).parts)]
    result = subprocess.run([_tool("shellcheck"), "--severity=style", *map(str, scripts)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
