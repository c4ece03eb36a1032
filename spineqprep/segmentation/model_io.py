"""Save and load segmentation bundles: a folder with ``weights.pt`` and ``model.json``.

``model.json`` describes the network (``architecture``, rebuilt by ``network.build_network``),
its classes, the input it expects (``spacing_mm``, ``slice_axis``, ``normalisation``,
``multiple_of``), how it was trained and what it scored. The packaged bundle lives in
``spineqprep/data/models/<name>/``; a user's own is a folder or a ``.pt`` file with a ``.json``
of the same stem next to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spineqprep.errors import InputError
from spineqprep.segmentation.network import build_network
from spineqprep.segmentation.trainset import normalise_array

WEIGHTS, META = "weights.pt", "model.json"
NORMALISATION = "percentile-1-99"  # (x - p1) / (p99 - p1) over the array, clipped to [-0.5, 2]
_REQUIRED = ("name", "version", "architecture", "classes", "input")


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
    corrupt or mismatched bundle."""
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
