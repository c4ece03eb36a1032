"""Save and load segmentation bundles: a folder with ``weights.pt`` and ``model.json``.

``model.json`` describes the network (``architecture``, rebuilt by ``network.build_network``),
its classes, the input it expects (``spacing_mm``, ``slice_axis``, ``normalisation``,
``multiple_of``), how it was trained and what it scored. The packaged bundle lives in
``spineqprep/data/models/<name>/``; a user's own is a folder or a ``.pt`` file with a ``.json``
of the same stem next to it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spineqprep.errors import InputError, UsageError
from spineqprep.segmentation.network import build_network
from spineqprep.segmentation.trainset import normalise_array

WEIGHTS, META = "weights.pt", "model.json"
NORMALISATION = "percentile-1-99"  # (x - p1) / (p99 - p1) over the array, clipped to [-0.5, 2]
_REQUIRED = ("name", "version", "architecture", "classes", "input")
#: What takes a bundle of each network (``model.json`` ``name``).
TAKEN_BY = {"spine": "--seg-weights / segment_spine",
            "endplates": "--cep-weights / segment_endplates"}


def save_bundle(model: nn.Module, meta: Mapping[str, Any], folder: str | Path,
                half: bool = True) -> Path:
    """Write ``weights.pt`` (the state dict; floating tensors as float16 when ``half``, which
    halves the file and does not change the segmentation) and ``model.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu()
             for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS)
    (folder / META).write_text(json.dumps(dict(meta), indent=2) + "\n")
    return folder


def _paths(folder: str | Path | None, name: str) -> tuple[Any, Any]:
    """(weights, model.json) of a packaged bundle, a folder, or a ``.pt`` + ``.json`` pair."""
    if folder is None:
        root = resources.files("spineqprep") / "data" / "models" / name
        return root / WEIGHTS, root / META
    path = Path(folder).expanduser()
    if not path.exists():
        raise InputError("no such bundle folder or file", path=path,
                         fix="give the folder spineqprep-train wrote (weights.pt + model.json)")
    if path.is_dir():
        return path / WEIGHTS, path / META
    if path.suffix == ".pt":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".pt"), path
    raise InputError("not a model bundle", path=path,
                     fix="give a folder with weights.pt and model.json, or a .pt file with a "
                         ".json of the same name next to it")


def load_bundle(folder: str | Path | None = None, name: str = "spine"
                ) -> tuple[nn.Module, dict[str, Any]]:
    """The network (float32, eval mode) and its metadata. ``folder=None`` loads the bundle
    shipped in the package under ``name``. Raises ``InputError`` naming the file for a missing,
    corrupt or mismatched bundle, or one of another network (``model.json`` ``name`` is not
    ``name``: a spine bundle given for the endplates, or the reverse)."""
    weights, meta_path = _paths(folder, name)
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as err:
        raise InputError("model description not found", path=meta_path,
                         fix="a bundle needs model.json next to weights.pt") from err
    except (OSError, ValueError) as err:
        raise InputError(f"unreadable model description: {err}", path=meta_path,
                         fix="restore model.json from the bundle it came with") from err
    missing = [k for k in _REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise InputError(f"model description lacks {', '.join(missing)}", path=meta_path,
                         fix="model.json needs name, version, architecture, classes and input")
    if meta["name"] != name:
        takes = TAKEN_BY.get(meta["name"], "nothing in this version of spineqprep")
        raise InputError(f"this bundle is for the {meta['name']!r} network, not the {name!r} "
                         "one", path=meta_path,
                         fix=f"give a bundle of the {name!r} network ({TAKEN_BY.get(name)}; "
                         f"spineqprep-train {name} writes one); this one goes to {takes}")
    averaging = meta.get("slice_averaging_by_contrast", {})
    if not isinstance(averaging, dict) or not all(
            isinstance(w, int | float) and 0 <= w < 0.5 for w in averaging.values()):
        raise InputError(f"slice_averaging_by_contrast {averaging!r} is not a table of "
                         "neighbour weights", path=meta_path,
                         fix='give e.g. {"T2w": 0.25}: weights from 0 to below 0.5')
    model = build_network(meta["architecture"])
    if len(meta["classes"]) != int(meta["architecture"].get("n_classes", -1)):
        raise InputError(f"{len(meta['classes'])} class names for "
                         f"{meta['architecture'].get('n_classes')} network outputs",
                         path=meta_path, fix="classes must list one name per output")
    try:
        with weights.open("rb") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise InputError("model weights not found", path=weights,
                         fix="a bundle needs weights.pt next to model.json") from err
    except Exception as err:  # torch raises several types for a corrupt file
        raise InputError(f"unreadable model weights: {err}", path=weights,
                         fix="restore weights.pt from the bundle it came with") from err
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state.items()})
    except (RuntimeError, AttributeError) as err:
        raise InputError(f"the weights do not fit the architecture in model.json: "
                         f"{str(err).splitlines()[0]}", path=weights,
                         fix="use the model.json saved with these weights") from err
    model.eval()
    return model, meta


def normalise(array: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Intensity normalisation a bundle expects (``meta['input']['normalisation']``), over the
    whole array given (a slice or a volume), as float32."""
    how = meta["input"]["normalisation"]
    if how != NORMALISATION:
        raise InputError(f"unknown input normalisation {how!r}",
                         fix=f"this version of spineqprep knows {NORMALISATION!r}")
    return normalise_array(array)


#: Inference settings a bundle records for its weights (``model.json`` top level, and keys of
#: ``input``), chosen on calibration data (model card). ``validated_max_pixel_mm`` is not one:
#: it is a measurement of the weights it was made with, and never carried to new weights.
INFERENCE_KEYS = ("cutoffs", "cutoffs_by_contrast", "slice_averaging_by_contrast")
INFERENCE_INPUT_KEYS = ("test_time_spacings_mm",)


def inference_settings(base: Mapping[str, Any], source: str | Path | None,
                       classes: Sequence[str], *, cutoffs: Mapping[str, float] | None = None,
                       cutoffs_by_contrast: Mapping[str, Mapping[str, float]] | None = None,
                       test_time_spacings_mm: Sequence[float] | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inference settings of a newly trained bundle: those of ``base`` (the ``--init`` bundle
    read from ``source``), overridden by the ones given, with an ``inference_note`` saying where
    each came from. Returns (``model.json`` top-level keys, keys of its ``input``). Without
    them a fine-tuned bundle would fall back to a 0.5 cut-off and one scale, which the base
    bundle's model card measured as biased. Structures must be among ``classes``."""
    given = {"cutoffs": dict(cutoffs or {}),
             "cutoffs_by_contrast": {c: dict(v) for c, v in (cutoffs_by_contrast or {}).items()}}
    for values in (given["cutoffs"], *given["cutoffs_by_contrast"].values()):
        unknown = sorted(set(values) - set(classes[1:]))
        if unknown:
            raise UsageError(f"cut-offs for {', '.join(unknown)}: not classes of this network",
                             fix=f"give cut-offs for {', '.join(classes[1:])}")
    if test_time_spacings_mm is not None and (not test_time_spacings_mm or min(
            test_time_spacings_mm) <= 0):
        raise UsageError("test-time pixel sizes must be positive millimetres",
                         fix="give e.g. 1.1 1.25 1.4")
    top: dict[str, Any] = {}
    inherited, explicit = [], []
    for key in INFERENCE_KEYS:
        if base.get(key):
            top[key] = copy.deepcopy(base[key])
            inherited.append(key)
    for contrast, values in given["cutoffs_by_contrast"].items():
        top.setdefault("cutoffs_by_contrast", {}).setdefault(contrast, {}).update(values)
        explicit += [f"cutoffs_by_contrast.{contrast}.{k}" for k in values]
    if given["cutoffs"]:
        top.setdefault("cutoffs", {}).update(given["cutoffs"])
        explicit += [f"cutoffs.{k}" for k in given["cutoffs"]]
    inputs = {key: copy.deepcopy(base["input"][key]) for key in INFERENCE_INPUT_KEYS
              if base.get("input", {}).get(key)}
    inherited += [f"input.{key}" for key in inputs]
    if test_time_spacings_mm is not None:
        inputs["test_time_spacings_mm"] = [float(s) for s in test_time_spacings_mm]
        explicit.append("input.test_time_spacings_mm")
    notes = []
    if inherited:
        notes.append(f"{', '.join(inherited)} inherited from the --init bundle {source}, "
                     "chosen there for its weights (its model.json says how) and not "
                     "re-checked for these")
    if explicit:
        notes.append(f"{', '.join(explicit)} set when training")
    if "validated_max_pixel_mm" in base:
        notes.append("validated_max_pixel_mm not inherited: it was measured for the --init "
                     "weights only (re-measure with benchmarks/bench_segmentation.py "
                     "--pixel-scale)")
    if notes:
        top["inference_note"] = "; ".join(notes)
    return top, inputs
