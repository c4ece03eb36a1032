"""ANTsPy backend: centre-of-mass translation, affine, then SyN on the smoothed disc masks.

Same interface as the elastix backend (register / apply / det_jacobian on ``Grid`` images in
the same physical frame), so results and speed compare one to one. Mean squares drives both
stages (mask images, like the elastix maps); ``ants.registration`` starts from the centre of
mass alignment. ANTs is imported lazily; its threads follow ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS
(set here to 2 unless the user set it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from spineqprep.registration.disc import Grid

INTERPOLATORS = {"nearest": "nearestNeighbor", "linear": "linear", "bspline": "bSpline"}


@cache
def ants_module():
    """Import ANTsPy once, with a bounded thread count."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(min(2, os.cpu_count() or 1)))
    import ants

    return ants


def to_ants(grid: Grid):
    """An ANTs image with the grid's geometry (ANTsPy arrays are indexed i, j, k)."""
    ants = ants_module()
    return ants.from_numpy(
        np.ascontiguousarray(grid.data, dtype=np.float32),
        origin=[float(v) for v in grid.origin],
        spacing=[float(v) for v in grid.spacing],
        direction=np.asarray(grid.direction, dtype=float),
    )


def register(
    moving: Grid,
    fixed: Grid,
    out_dir: Path,
    *,
    parameter_maps: Sequence[Path] | None = None,
    attempt: int = 0,
) -> tuple[Path, ...]:
    """Register the smoothed moving mask to the atlas one; return ANTs' forward transforms.

    ``parameter_maps`` must be None (elastix files do not apply; disc.py checks this);
    ``attempt`` > 0 changes the random seed (a retry).
    """
    ants = ants_module()
    result = ants.registration(
        to_ants(fixed),
        to_ants(moving),
        type_of_transform="SyN",
        outprefix=str(Path(out_dir) / "ants_"),
        aff_metric="meansquares",
        syn_metric="meansquares",
        reg_iterations=(40, 20, 0),
        random_seed=20240 + 7919 * attempt,
    )
    return tuple(Path(p) for p in result["fwdtransforms"])


def apply(files: Sequence[Path], image: Grid, reference: Grid, interpolation: str) -> np.ndarray:
    """Warp ``image`` onto the ``reference`` grid with the ANTs transforms."""
    ants = ants_module()
    warped = ants.apply_transforms(
        fixed=to_ants(reference),
        moving=to_ants(image),
        transformlist=[str(p) for p in files],
        interpolator=INTERPOLATORS[interpolation],
        defaultvalue=0,
    )
    return warped.numpy()


def det_jacobian(files: Sequence[Path], reference: Grid) -> np.ndarray:
    """Determinant of the spatial Jacobian of the composed transform on the reference grid."""
    ants = ants_module()
    domain = to_ants(reference)
    with tempfile.TemporaryDirectory() as tmp:
        field = ants.apply_transforms(
            fixed=domain, moving=domain, transformlist=[str(p) for p in files],
            compose=str(Path(tmp) / "composed_"),
        )
        det = ants.create_jacobian_determinant_image(domain, field, do_log=False)
        return det.numpy()
