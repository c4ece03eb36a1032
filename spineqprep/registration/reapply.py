"""Reapply a disc's staged transforms to another native image of the same grid.

A participant run writes, per registered disc, the transform files and an atlas-space map whose
JSON sidecar lists them (``Transforms``, ``bids::`` URIs into the derivatives folder) with the
backend that made them (``RegistrationBackend``). ``reapply`` reads such a sidecar and warps any
image on the disc's native grid (a mask, another map, every volume of an echo series) onto the
level's atlas disc, exactly as the run did: for single-slice (2D) data through the atlas's
mid-sagittal slice and the in-plane frame the registration used, which transformix on the NIfTI
alone cannot reproduce.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from spineqprep.errors import InputError
from spineqprep.registration.atlas import LEVELS, SPACE_PREFIX, load_atlas
from spineqprep.registration.disc import DiscTransform, apply_transform, is_single_slice
from spineqprep.relaxometry.images import load_image, read_image

_SPACE = re.compile(rf"_space-{SPACE_PREFIX}(?P<level>[A-Z0-9]+)_")


def _derivatives_root(path: Path) -> Path:
    """The nearest folder above ``path`` holding a dataset_description.json."""
    for parent in path.resolve().parents:
        if (parent / "dataset_description.json").is_file():
            return parent
    raise InputError("no dataset_description.json above this file", path=path,
                     fix="pass a sidecar inside a spineqprep derivatives folder")


def transform_of(sidecar: str | Path) -> tuple[DiscTransform, str]:
    """The transform and atlas level named by an atlas-space map's JSON sidecar."""
    sidecar = Path(sidecar)
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read this JSON sidecar ({err})", path=sidecar,
                         fix="pass the .json beside an atlas-space map (space-SpineDisc<LEVEL>)"
                         ) from None
    match = _SPACE.search(sidecar.name)
    if not match or match["level"] not in LEVELS or "Transforms" not in meta:
        raise InputError("not the sidecar of an atlas-space map (no space-SpineDisc<LEVEL> "
                         "entity or no Transforms field)", path=sidecar,
                         fix="pass the .json of a ..._space-SpineDisc<LEVEL>_<map>.nii.gz")
    root = _derivatives_root(sidecar)
    files = []
    for uri in meta["Transforms"]:
        file = root / str(uri).removeprefix("bids::")
        if not file.is_file():
            raise InputError(f"the transform {uri} it names is missing", path=sidecar,
                             fix="keep the derivatives folder whole (xfm files beside the maps)")
        files.append(file)
    backend = str(meta.get("RegistrationBackend", "elastix"))
    return DiscTransform(backend, tuple(files)), match["level"]


def reapply(sidecar: str | Path, image: str | Path, *, atlas_dir: str | Path | None = None,
            interpolation: str = "linear") -> nib.Nifti1Image:
    """The NIfTI ``image`` (3D, or 4D: each volume) warped onto the atlas disc of ``sidecar``'s
    level, on the atlas grid (the run's maps are also NaN outside the atlas disc; this is not).
    Non-finite values become 0 first, as in the run. ``atlas_dir``: the atlas the run used
    (``--atlas``), default the packaged one."""
    transform, level = transform_of(sidecar)
    img = load_image(image, str(image))
    data = read_image(img, str(image))
    if data.ndim not in (3, 4):
        raise InputError(f"expected a 3D image or a 4D series, got shape {data.shape}",
                         path=image, fix="pass one image on the disc's native grid")
    atlas = load_atlas(atlas_dir).mask_like(level, is_single_slice(img))
    # as the run: non-finite values (invalid fits) would spread through interpolation, so 0
    volumes = np.nan_to_num(data[..., None] if data.ndim == 3 else data, nan=0.0, posinf=0.0,
                            neginf=0.0)
    warped = [apply_transform(transform, nib.Nifti1Image(volumes[..., i], img.affine), atlas,
                              interpolation=interpolation).get_fdata(dtype=np.float32)
              for i in range(volumes.shape[-1])]
    out = warped[0] if data.ndim == 3 else np.stack(warped, axis=-1)
    return nib.Nifti1Image(out, atlas.affine)
