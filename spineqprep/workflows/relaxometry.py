"""Relaxation mapping of one series: fit (or reuse) the map, then stage it as a derivative."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from spineqprep.bids.derivatives import bids_uri, map_metadata
from spineqprep.bids.layout import Series
from spineqprep.bids.schema import load_schema
from spineqprep.config import DEFAULT_T_RANGES
from spineqprep.interfaces.bids import DerivativesDataSink
from spineqprep.interfaces.relaxometry import FitMonoexp

#: Acquisition fields copied from the source sidecar into every map's sidecar.
_COPIED_FIELDS = ("MagneticFieldStrength", "Manufacturer", "ManufacturersModelName",
                  "RepetitionTime", "SpinLockFrequency")

_QUANTITY_LABEL = {"T2": "T2", "T1rho": "T1rho", "T2star": "T2*"}


def init_relaxometry_wf(
    series: Series,
    *,
    staging_dir: Path,
    raw_dir: Path,
    fit_model: str = "monoexp",
    omp_nthreads: int = 1,
    precomputed: dict[str, Path] | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """Fit S(t) = S0 exp(-t/T) voxel-wise to ``series`` and stage the map and fit by-products.

    With ``precomputed`` (suffix -> file of an existing derivatives dataset), the existing files
    are staged instead of fitting again.

    Outputs (``outputnode``): ``out_files``, the staged images; ``out_map`` and ``out_mask``,
    the staged map and its validity mask.
    """
    spec = load_schema()["derivatives"]["maps"][series.target]
    quantity = _QUANTITY_LABEL[spec["quantity"]]
    desc = spec["desc"]
    wf = pe.Workflow(name=name or f"{series.target.lower()}_{series.acq or 'noacq'}_wf")
    time_field = series.time_field
    extra = (f"; {series.metadata['SpinLockFrequency']:g} Hz"
             if "SpinLockFrequency" in series.metadata else "")
    wf.__desc__ = (
        f"\n- {quantity} from the {series.suffix} series acq-{series.acq} "
        f"({time_field} {', '.join(f'{1000 * t:g}' for t in series.times)} ms{extra})"
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files", "out_map", "out_mask"]),
                         name="outputnode")
    entities = {"sub": series.subject, "ses": series.session, "acq": series.acq}
    entities = {k: v for k, v in entities.items() if v}
    sources = [bids_uri(f, raw_dir) for f in series.files]
    t_range = DEFAULT_T_RANGES[series.target]
    meta = map_metadata(
        series.target,
        Description=f"Voxel-wise {quantity} of the {series.suffix} series, in seconds.",
        FitModel=f"S(t) = S0 * exp(-t / {quantity})" + (" + C" if fit_model == "offset" else ""),
        EstimationMethod="log-linear initialisation, Levenberg-Marquardt least squares "
        "(spineqprep.relaxometry)",
        ValidRange=list(t_range),
        **{time_field: list(series.times)},
        **{k: series.metadata[k] for k in _COPIED_FIELDS if k in series.metadata},
    )
    outputs = [
        (series.target, {}, meta, "out_map"),
        ("S0map", {"desc": desc}, {"Units": "arbitrary", "SkullStripped": False,
                                   "Description": f"Signal at t = 0 of the {quantity} fit."},
         "out_s0"),
        ("Rsquared", {"desc": desc}, {"Units": "1", "Description":
                                      f"Coefficient of determination of the {quantity} fit."},
         "out_rsquared"),
        ("mask", {"desc": desc}, {"Type": "ROI", "Description":
                                  f"1 where the {quantity} fit is finite, converged and within "
                                  f"ValidRange {t_range} s."}, "out_mask"),
    ]
    merge = pe.Node(niu.Merge(len(outputs)), name="merge_outputs", run_without_submitting=True)
    wf.connect(merge, "out", outputnode, "out_files")

    fit = None
    if not precomputed:
        fit = pe.Node(
            FitMonoexp(in_files=[str(f) for f in series.files], times=list(series.times),
                       model=fit_model, t_range=t_range, num_threads=omp_nthreads),
            name="fit", n_procs=omp_nthreads,
        )
    for i, (suffix, extra_entities, sidecar, fit_output) in enumerate(outputs, start=1):
        ds = pe.Node(
            DerivativesDataSink(base_directory=str(staging_dir), entities={**entities,
                                **extra_entities}, suffix=suffix, sources=sources,
                                meta_dict=sidecar),
            name=f"ds_{suffix.lower()}", run_without_submitting=True,
        )
        if fit is not None:
            wf.connect(fit, fit_output, ds, "in_file")
            if fit_output == "out_map":
                wf.connect(fit, "summary", ds, "extra_meta")
        elif suffix in precomputed:
            ds.inputs.in_file = str(precomputed[suffix])
            ds.inputs.meta_dict = _sidecar(precomputed[suffix])
            ds.inputs.sources = [str(precomputed[suffix])]
        else:
            continue
        wf.connect(ds, "out_file", merge, f"in{i}")
        if suffix in (series.target, "mask"):
            wf.connect(ds, "out_file", outputnode, "out_map" if suffix != "mask" else "out_mask")
    return wf


def _sidecar(image: Path) -> dict:
    """The JSON sidecar of a precomputed derivative (empty when it has none)."""
    path = Path(image).with_name(Path(image).name.split(".")[0] + ".json")
    return json.loads(path.read_text()) if path.exists() else {}
