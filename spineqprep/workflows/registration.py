"""Atlas space: disc-by-disc registration of one acquisition grid and its relaxometry series."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from spineqprep.bids.derivatives import bids_uri
from spineqprep.bids.layout import Series
from spineqprep.interfaces.registration import RegisterDiscs
from spineqprep.registration.disc import RETRIES

#: Maps brought into atlas space (the published voxel-based relaxometry: T2 and T1rho).
REGISTERED_TARGETS = ("T2map", "T1rho")
_QUANTITY = {"T2map": "T2", "T1rho": "T1rho", "T2starmap": "T2*"}


def init_disc_registration_wf(
    entities: dict[str, str],
    series: Sequence[Series],
    *,
    staging_dir: Path,
    raw_dir: Path,
    atlas_dir: Path | None = None,
    backend: str = "elastix",
    parameter_maps: Sequence[Path] = (),
    warp: str = "echoes",
    fit_model: str = "monoexp",
    omp_nthreads: int = 1,
    name: str = "disc_registration_wf",
) -> pe.Workflow:
    """Register every disc of one grid's segmentation to the level's atlas disc, bring each of
    ``series`` (all on that grid) into atlas space, and stage the maps, transforms and QC.

    Inputs (``inputnode``): ``dseg`` (the grid's segmentation) and ``fits`` (per series, the
    staged native map, S0map, Rsquared and mask, in that order). Outputs (``outputnode``):
    ``out_files``.
    """
    wf = pe.Workflow(name=name)
    wf.__desc__ = (
        "\n- atlas space: every intervertebral disc of each mapping grid registered to the same "
        f"level's atlas disc (space SpineDisc<LEVEL>) with {_BACKEND_TEXT[backend]}, guided by "
        "its segmentation mask; registrations that folded (det J <= 0) or overlapped the atlas "
        "disc with Dice below 0.85 were flagged and excluded. "
        + (_FALLBACK_TEXT if backend == "elastix" and not parameter_maps else "")
        + ("Every echo / spin-lock image was warped into atlas space and the relaxation time "
           "fitted there." if warp != "maps" else
           "The native relaxation maps were warped into atlas space.")
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=["dseg", "fits"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files"]), name="outputnode")
    specs = []
    for s in series:
        quantity = _QUANTITY[s.target]
        specs.append({
            "suffix": s.target, "files": [str(f) for f in s.files], "times": list(s.times),
            "sidecar": {"Sources": [bids_uri(f, raw_dir) for f in s.files],
                        "Description": f"Voxel-wise {quantity} of the {s.suffix} series, in "
                                       "seconds.",
                        s.time_field: list(s.times)},
        })
    register = pe.Node(
        RegisterDiscs(series=specs, entities=entities, staging_dir=str(staging_dir),
                      atlas_dir=str(atlas_dir or ""), backend=backend,
                      parameter_maps=[str(p) for p in parameter_maps], warp=warp,
                      fit_model=fit_model, num_threads=omp_nthreads),
        name="register_discs", n_procs=omp_nthreads,
    )
    wf.connect([
        (inputnode, register, [("dseg", "in_dseg"), ("fits", "in_fits")]),
        (register, outputnode, [("out_files", "out_files")]),
    ])
    return wf


_BACKEND_TEXT = {
    "elastix": "itk-elastix (centroid translation, four-resolution affine, then B-spline "
               "with a rigidity penalty, driven by mean squares of the smoothed masks instead "
               "of the published mutual information; METHODS: Iriondo et al. 2020)",
    "ants": "ANTsPy (affine, then SyN)",
}
#: What ``register_disc`` does when every elastix attempt fails (packaged parameters only).
_FALLBACK_TEXT = (f"A disc that failed all {RETRIES + 1} elastix attempts was registered with "
                  f"{_BACKEND_TEXT['ants']} instead when that passed the same checks; the QC "
                  "table's backend column names the engine of each disc. ")
