"""All-or-nothing publication of a subject's derivatives.

Derivatives are first written into a staging folder in the work directory. Only when every step
of a subject has succeeded are they copied into the output dataset, each file through a temporary
name and an atomic rename, so the output never holds a half-written file or a partial subject.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


def atomic_copy(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file in ``dst``'s folder and a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def commit_staged(files: Iterable[str | Path], staging_dir: Path, output_dir: Path) -> list[Path]:
    """Copy staged files (paths inside ``staging_dir``) to the same relative place in
    ``output_dir``; sidecars (``.json`` next to a NIfTI) travel with their image."""
    staging_dir, output_dir = Path(staging_dir), Path(output_dir)
    sources: list[Path] = []
    for f in files:
        path = Path(f)
        sources.append(path)
        sidecar = path.with_name(path.name.split(".")[0] + ".json")
        if sidecar != path and sidecar.exists():
            sources.append(sidecar)
    committed = []
    for src in dict.fromkeys(sources):  # keep order, drop duplicates
        rel = src.resolve().relative_to(staging_dir.resolve())
        committed.append(atomic_copy(src, output_dir / rel))
    return committed
