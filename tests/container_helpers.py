"""Helpers of the container tests: a cached debootstrap base, a private Docker engine, chroots.

No container engine runs on the CI machines, so the tests bring their own: ``dockerd`` on a private
socket (no bridge, no iptables) builds the Dockerfile from a Debian base made locally with
``debootstrap`` and imported under the Dockerfile's ``FROM`` tag; ``singularity.def`` is emulated by
running its ``%post`` in a chroot of the same base (Apptainer is not installable here). Every mount
made for a chroot lives in a private mount namespace, so it disappears with the process.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(
    os.environ.get("SPINEQPREP_TEST_CACHE", Path.home() / ".cache" / "spineqprep-tests")
)
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
TORCH_VERSION = "2.13.0"
#: Where a local torch CPU wheel is looked for (the first folder holding one wins).
WHEEL_DIRS = [Path(p) for p in os.environ.get("SPINEQPREP_WHEEL_DIRS", "/opt/wheels").split(":")]
#: PATH of a clean Debian root shell (the host's environment never leaks into a build).
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd: Sequence[str | Path], *, log: Path | None = None, timeout: float = 600,
        env: dict[str, str] | None = None, check: bool = True,
        input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` in its own process group, killing the whole group on timeout.

    Output goes to ``log`` (appended) when given, else it is captured. A failure raises
    ``AssertionError`` with the tail of the output, so a test reports why a build broke.
    """
    argv = [str(c) for c in cmd]
    sink = open(log, "ab") if log else None  # noqa: SIM115 - closed below
    try:
        if sink:
            sink.write(f"\n$ {shlex.join(argv)}\n".encode())
            sink.flush()
        proc = subprocess.Popen(
            argv, stdout=sink or subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        try:
            out, _ = proc.communicate(input_bytes, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise AssertionError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}"
                                 + _tail(log)) from None
    finally:
        if sink:
            sink.close()
    result = subprocess.CompletedProcess(argv, proc.returncode, out or b"", b"")
    if check and proc.returncode != 0:
        text = (out or b"").decode(errors="replace")[-4000:]
        raise AssertionError(f"exit {proc.returncode}: {shlex.join(argv)}\n{text}{_tail(log)}")
    return result


def kill_group(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """Stop a process started with ``start_new_session`` and everything it started."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


def _tail(log: Path | None, chars: int = 6000) -> str:
    if not log or not log.exists():
        return ""
    return f"\n--- last lines of {log} ---\n" + log.read_text(errors="replace")[-chars:]


def missing_tools() -> str | None:
    """Why the container tests cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (a private dockerd, debootstrap, chroot and mounts)"
    for tool in ("debootstrap", "dockerd", "unshare", "chroot", "tar"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install docker.io debootstrap)"
    return None


def dockerfile_base(dockerfile: Path = REPO / "Dockerfile") -> str:
    """The image of the Dockerfile's first ``FROM`` (the base every stage derives from)."""
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            return words[1]
    raise AssertionError(f"no FROM in {dockerfile}")


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (deb822 ``.sources`` or one-line lists)."""
    sources = sorted((etc_apt / "sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.M))
            suites = fields.get("Suites", "").split()
            if "bookworm" in suites and fields.get("Types", "deb").split()[0] == "deb":
                return fields["URIs"].split()[0]
    for path in [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if len(words) >= 3 and words[0] == "deb" and "bookworm" in words:
                    return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def base_tarball(suite: str = "bookworm", log: Path | None = None) -> Path:
    """A minimal Debian root file system as a tar file, made once and cached in CACHE_DIR.

    ``debootstrap --variant=minbase`` from this machine's mirror: about the content of
    ``debian:bookworm-slim`` (apt archives and lists emptied, /dev /proc /sys left empty).
    """
    target = CACHE_DIR / f"debian-{suite}-minbase.tar"
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR))
    try:
        rootfs = work / "rootfs"
        run(["debootstrap", "--variant=minbase", suite, rootfs, apt_mirror()],
            log=log, timeout=1200, env={"PATH": ROOT_PATH, "LANG": "C"})
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / sub).glob("*"):
                if item.is_file():
                    item.unlink()
        run(["tar", "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
             "--exclude=./sys/*", "-C", rootfs, "-cf", work / "base.tar", "."], log=log)
        os.replace(work / "base.tar", target)
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return target


def extract_rootfs(tarball: Path, dest: Path) -> Path:
    """Unpack the base tarball into ``dest`` (owners and modes kept) and return it."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "--numeric-owner", "-xpf", tarball, "-C", dest])
    return dest


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    root = str(path.resolve())
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
        if point == root or point.startswith(root.rstrip("/") + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_under(path: Path) -> None:
    """Lazily unmount whatever is still mounted at or below ``path``."""
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


# --------------------------------------------------------------------------- Docker engine


@dataclass
class DockerEngine:
    """A ``dockerd`` of our own on a private socket, with state under ``root`` only."""

    root: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "dockerd.log"

    @property
    def client(self) -> str:
        """The docker CLI of the same package as dockerd (a newer CLI wants buildx)."""
        dockerd = Path(shutil.which("dockerd") or "/usr/sbin/dockerd")
        for client in (dockerd.with_name("docker"), dockerd.parent.parent / "bin" / "docker"):
            if client.exists():
                return str(client)
        return shutil.which("docker") or "docker"

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": ROOT_PATH, "HOME": str(self.root), "DOCKER_BUILDKIT": "1",
                "DOCKER_HOST": f"unix://{self.root / 'docker.sock'}",
                "DOCKER_CONFIG": str(self.root / "client")}

    def start(self, timeout: float = 90) -> None:
        """Start dockerd and wait until it answers."""
        cmd = ["dockerd", "--iptables=false", "--bridge=none",
               f"--host=unix://{self.root / 'docker.sock'}",
               f"--data-root={self.root / 'data'}", f"--exec-root={self.root / 'exec'}",
               f"--pidfile={self.root / 'dockerd.pid'}"]
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env={"PATH": ROOT_PATH})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("dockerd exited" + _tail(self.log))
            if self.docker("version", check=False, timeout=20).returncode == 0:
                return
            time.sleep(1)
        raise AssertionError(f"dockerd did not answer within {timeout:.0f} s" + _tail(self.log))

    def docker(self, *args: str | Path, timeout: float = 600, check: bool = True,
               log: Path | None = None,
               input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the docker CLI against this engine."""
        return run([self.client, *args], timeout=timeout, check=check, log=log, env=self.env,
                   input_bytes=input_bytes)

    def stop(self) -> None:
        """Stop dockerd (and its containerd), then drop every mount it left behind."""
        if self.process is not None and self.process.poll() is None:
            with suppress(AssertionError):
                ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
                if ids:
                    self.docker("rm", "-f", *[i.decode() for i in ids], check=False, timeout=60)
            kill_group(self.process, grace=60)
        unmount_under(self.root)


def build_context(dest: Path, wheels: Iterable[Path] = ()) -> Path:
    """A copy of what ``.dockerignore`` lets into the build context, plus ``wheels/``.

    The repository is never written to: local wheels (hard links where possible) go to the copy.
    """
    dest.mkdir(parents=True, exist_ok=True)
    keep = [line[1:].strip().rstrip("/") for line in (REPO / ".dockerignore").read_text()
            .splitlines() if line.startswith("!")]
    for name in [*keep, "Dockerfile", ".dockerignore"]:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for wheel in wheels:
        (dest / "wheels").mkdir(exist_ok=True)
        link_or_copy(wheel, dest / "wheels" / wheel.name)
    return dest


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` to ``dest`` (instant for a 190 MB wheel), copying across file systems."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def local_torch_wheels() -> list[Path]:
    """The torch CPU wheel(s) of TORCH_VERSION on this machine, if any."""
    for folder in WHEEL_DIRS:
        found = sorted(folder.glob(f"torch-{TORCH_VERSION}+cpu-*.whl"))
        if found:
            return found
    return []


# --------------------------------------------------------------------------- Singularity emulation


def def_file_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Split a Singularity/Apptainer definition into its header and its ``%section`` bodies."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = sections.setdefault(match.group(1).lower(), [])
        elif current is not None:
            current.append(line)
        elif ":" in line and not line.lstrip().startswith("#"):
            key, value = line.split(":", 1)
            header[key.strip().lower()] = value.strip()
    bodies = {name: _dedent("\n".join(lines)) for name, lines in sections.items()}
    return header, bodies


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text).strip("\n") + "\n"


@dataclass
class Bind:
    """A host path made visible at ``target`` inside the chroot."""

    source: Path
    target: str
    readonly: bool = False


def chroot_run(rootfs: Path, script: str, args: Sequence[str] = (), *, binds: Sequence[Bind] = (),
               user: str | None = None, readonly: bool = False, env: dict[str, str] | None = None,
               cwd: str = "/", log: Path | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a ``/bin/sh -e`` script in ``rootfs`` inside a private mount namespace.

    /proc, /dev and /sys come from the host, /tmp is a fresh tmpfs and ``binds`` are bind
    mounts; ``readonly`` makes the root file system read-only as in a SIF image. All mounts
    vanish with the namespace when the command ends (``unshare --kill-child``).
    """
    root = shlex.quote(str(rootfs))
    setup = ["set -e"]
    for bind in binds:
        setup.append(f"mkdir -p {root}{shlex.quote(bind.target)}")
    setup += [f"mount --bind {root} {root}",
              f"mount -t proc proc {root}/proc",
              f"mount --rbind /dev {root}/dev",
              f"mount --rbind /sys {root}/sys",
              f"mount -t tmpfs -o mode=1777 tmpfs {root}/tmp"]
    for bind in binds:
        target = f"{root}{shlex.quote(bind.target)}"
        setup.append(f"mount --bind {shlex.quote(str(bind.source))} {target}")
        if bind.readonly:
            setup.append(f"mount -o remount,bind,ro {target}")
    if readonly:
        setup.append(f"mount -o remount,bind,ro {root}")
    userspec = f"--userspec={shlex.quote(user)} " if user else ""
    inner = f"cd {shlex.quote(cwd)} && exec /bin/sh -e -c \"$0\" sh \"$@\""
    setup.append(f"exec chroot {userspec}{root} /bin/sh -c {shlex.quote(inner)} "
                 f"{shlex.quote(script)} " + " ".join(shlex.quote(a) for a in args))
    environment = {"PATH": ROOT_PATH, "LANG": "C", "HOME": "/root", **(env or {})}
    return run(["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child",
                "/bin/sh", "-c", "\n".join(setup)], log=log, timeout=timeout, env=environment,
               check=check)


def install_def_files(files_section: str, rootfs: Path, source_dir: Path = REPO) -> None:
    """Copy the ``%files`` entries (``src [dest]``, relative to the build directory)."""
    for line in files_section.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        src = source_dir / words[0]
        dest = rootfs / (words[1] if len(words) > 1 else words[0]).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(src, dest)


def install_def_runtime(sections: dict[str, str], rootfs: Path) -> None:
    """Write ``%environment`` and ``%runscript`` where Apptainer's builder puts them."""
    meta = rootfs / ".singularity.d"
    (meta / "env").mkdir(parents=True, exist_ok=True)
    (meta / "env" / "90-environment.sh").write_text("#!/bin/sh\n" + sections["environment"])
    (meta / "runscript").write_text("#!/bin/sh\n" + sections["runscript"])
    (meta / "runscript").chmod(0o755)


#: How Apptainer starts a container: the environment scripts, then the runscript.
RUN_CONTAINER = '. /.singularity.d/env/90-environment.sh; exec /.singularity.d/runscript "$@"'


# --------------------------------------------------------------------------- checks


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (relative path -> digest), symlink targets included."""
    digests = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            digests[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digests[rel] = "dir"
    return digests


def pem_blocks(data: bytes) -> set[bytes]:
    """The certificates of a PEM bundle, whitespace removed (for content comparisons)."""
    return {re.sub(rb"\s+", b"", b) for b in
            re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.S)}


def iter_files(root: Path) -> Iterator[Path]:
    """Regular files below ``root`` without following symbolic links."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path
