"""elastix parameter maps: the packaged defaults, user overrides, and edited copies.

The packaged maps (``spineqprep/data/registration/``) implement the published disc registration
(METHODS.md section 1): ``elastix_affine.txt`` (centroid translation + four-resolution affine)
then ``elastix_bspline.txt`` (B-spline, mean squares of the smoothed masks + rigidity penalty
weight 0.77, final grid spacing 4 mm, 100 iterations; ``elastix_bspline_published.txt`` has
the published 2 mm grid and 200 iterations). A user replaces them with their own files, in the
order they are run; ``spineqprep-tune`` writes such files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from spineqprep.errors import UsageError

DEFAULT_FILES = ("elastix_affine.txt", "elastix_bspline.txt")
# the same with the published final B-spline grid (2 mm) and 200 iterations (about 5x slower)
PUBLISHED_FILES = ("elastix_affine.txt", "elastix_bspline_published.txt")


def default_parameter_files() -> list[Path]:
    """The packaged elastix parameter files, in the order they are run."""
    return _packaged(DEFAULT_FILES)


def published_parameter_files() -> list[Path]:
    """The packaged files with the published B-spline settings (2 mm, 200 it), in run order."""
    return _packaged(PUBLISHED_FILES)


def _packaged(names: tuple[str, ...]) -> list[Path]:
    root = resources.files("spineqprep") / "data" / "registration"
    return [Path(str(root / name)) for name in names]


def elastix_parameter_files(parameter_maps: Sequence[Path] | None) -> list[Path]:
    """The user's parameter files (checked) or the packaged defaults when None."""
    if parameter_maps is None:
        return default_parameter_files()
    files = [Path(p) for p in parameter_maps]
    if not files:
        raise UsageError("no elastix parameter file given",
                         fix="pass one or more elastix parameter files, in the order they run")
    for path in files:
        if not path.is_file():
            raise UsageError("elastix parameter file not found", path=path,
                             fix="pass existing elastix parameter files (text, '(Key value)')")
        if not re.search(r"^\s*\(\s*Transform\s", path.read_text(), flags=re.MULTILINE):
            raise UsageError("not an elastix parameter file: no (Transform ...) line", path=path,
                             fix="pass elastix parameter files such as those written by "
                                 "spineqprep-tune")
    return files


def read_parameter_text(path: Path) -> str:
    """The text of one parameter file (defaults and user files alike)."""
    return Path(path).read_text()


def set_parameters(text: str, values: Mapping[str, object]) -> str:
    """Parameter-file text with the given keys set (replaced in place, or appended).

    Values are written as elastix expects: strings quoted, numbers bare, sequences as several
    values on one line.
    """
    for key, value in values.items():
        items = value if isinstance(value, list | tuple) else [value]
        rendered = " ".join(f'"{v}"' if isinstance(v, str) else _number(v) for v in items)
        line = f"({key} {rendered})"
        pattern = re.compile(rf"^\s*\(\s*{re.escape(key)}\s[^)]*\)\s*$", flags=re.MULTILINE)
        if pattern.search(text):
            text = pattern.sub(line.replace("\\", "\\\\"), text, count=1)
        else:
            text = text.rstrip("\n") + "\n" + line + "\n"
    return text


def _number(value: object) -> str:
    if isinstance(value, bool):
        return '"true"' if value else '"false"'
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
