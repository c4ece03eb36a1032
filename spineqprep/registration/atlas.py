"""Level-specific lumbar disc atlas: load the shipped or a user atlas, or build one.

An atlas is a folder with one template disc per level (METHODS.md section 1: never pool levels):
``tpl-SpineDisc<LEVEL>_res-1_mask.nii.gz`` (binary disc, uint8) and, optionally,
``tpl-SpineDisc<LEVEL>_res-1_probseg.nii.gz`` (the group-wise template it was thresholded from).
Atlas space ``SpineDisc<LEVEL>`` is a disc-centred frame in millimetres: origin at the disc's
centroid, x right, y anterior, z superior (along the spine), RAS-like; see
``bids_spec/atlas.md``.

Building an atlas (``build_template``): each healthy disc mask is brought into its own disc frame
(centroid + principal axes: the thinnest axis is the disc's normal, the widest right-left), all
are resampled onto one disc-centred grid, and ANTsPy's group-wise template construction
(``ants.build_template``: SyN to the running mean, shape update by the mean warp) averages them;
the template is thresholded at 0.5. The shipped atlas is built this way from healthy synthetic
discs (``build_synthetic_atlas``), a study-specific one from a dataset's own healthy discs
(``build_study_atlas``, command ``spineqprep-atlas``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from spineqprep.errors import InputError, UsageError

LEVELS = ("L1L2", "L2L3", "L3L4", "L4L5", "L5S1")
SPACE_PREFIX = "SpineDisc"
SPACING_MM = 1.0
MARGIN_MM = 4.0  # free space around the discs on an atlas grid (for smoothing and warps)
TEMPLATE_ITERATIONS = 3
#: Cohort seed of the shipped atlas: never used to generate test or evaluation data.
SHIPPED_SEED = 4242
SHIPPED_DISCS_PER_LEVEL = 8


def space_name(level: str) -> str:
    """The BIDS ``space`` label of a level's atlas disc, e.g. ``SpineDiscL4L5``."""
    return f"{SPACE_PREFIX}{level}"


def mask_name(level: str) -> str:
    return f"tpl-{space_name(level)}_res-1_mask.nii.gz"


def probseg_name(level: str) -> str:
    return f"tpl-{space_name(level)}_res-1_probseg.nii.gz"


def shipped_atlas_dir() -> Path:
    """The atlas shipped inside the package."""
    return Path(str(resources.files("spineqprep") / "data" / "atlas"))


@dataclass(frozen=True)
class Atlas:
    """A loaded atlas: one binary template disc per level.

    ``canonical_scale[level]`` (synthetic atlases only, from ``atlas.json``): per-axis scale of
    the atlas disc against the generator's canonical disc (moment-matched), so that atlas
    point ``c`` corresponds to canonical point ``c / scale``: how the synthetic truth places
    each disc's pattern in atlas space.
    """

    root: Path
    files: dict[str, Path]  # level -> mask file
    canonical_scale: dict[str, tuple[float, float, float]]

    def mask(self, level: str) -> nib.Nifti1Image:
        """The level's 3D atlas disc (uint8 0/1)."""
        if level not in self.files:
            raise InputError(f"the atlas has no disc for level {level}", path=self.root,
                             fix=f"add {mask_name(level)} to the atlas folder")
        return nib.load(self.files[level])

    def mask_like(self, level: str, single_slice: bool) -> nib.Nifti1Image:
        """The 3D atlas disc, or its mid-sagittal slice for single-slice (2D) data."""
        img = self.mask(level)
        return mid_sagittal(img) if single_slice else img


def load_atlas(path: str | Path | None = None) -> Atlas:
    """Load the atlas in ``path`` (default: the shipped one), checking each level's disc.

    An atlas may hold some levels only (``spineqprep-atlas study --levels``): the discs of the
    other levels are not registered (``register_grid`` flags them "no atlas level").
    """
    root = shipped_atlas_dir() if path is None else Path(path).expanduser().resolve()
    if not root.is_dir():
        raise InputError("the atlas folder does not exist", path=root,
                         fix="pass a folder written by spineqprep-atlas (--atlas DIR)")
    files = {}
    for level in LEVELS:
        file = root / mask_name(level)
        if not file.is_file():
            continue
        img = nib.load(file)
        if len(img.shape) != 3 or not (np.asarray(img.dataobj) > 0.5).any():
            raise InputError("an atlas disc must be a non-empty 3D binary mask", path=file,
                             fix="rebuild the atlas with spineqprep-atlas")
        files[level] = file
    if not files:
        raise InputError("the atlas folder holds no atlas disc", path=root,
                         fix=f"add {mask_name('<LEVEL>')} files (build them with "
                             "spineqprep-atlas)")
    try:
        scales = json.loads((root / "atlas.json").read_text()).get("CanonicalScale", {})
    except (OSError, ValueError):
        scales = {}
    return Atlas(root, files, {level: tuple(float(v) for v in scale)
                               for level, scale in scales.items()})


def mid_sagittal(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The single sagittal slice (x = 0 mm, disc centre) of a 3D atlas image."""
    data = np.asarray(img.dataobj)
    i = round(float(np.linalg.solve(img.affine, [0.0, 0.0, 0.0, 1.0])[0]))
    i = min(max(i, 0), data.shape[0] - 1)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [i, 0, 0] + img.affine[:3, 3]
    return nib.Nifti1Image(data[i:i + 1], affine, img.header)


def atlas_grid(half_extent_mm: Sequence[float], spacing: float = SPACING_MM
               ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of a disc-centred RAS grid covering +- ``half_extent_mm``."""
    counts = [2 * int(np.ceil(h / spacing)) + 1 for h in half_extent_mm]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(counts) - 1) / 2.0
    return affine, (counts[0], counts[1], counts[2])


# ---- disc frames ---------------------------------------------------------------------------
def disc_frame(mask: nib.Nifti1Image) -> np.ndarray:
    """4 x 4 disc frame -> world: centroid, and principal axes (widest = right, thinnest =
    superior, the other = anterior), signed towards world right / anterior / superior."""
    ijk = np.argwhere(np.asarray(mask.dataobj) > 0.5)
    if len(ijk) < 4:
        raise InputError("a disc mask needs at least 4 voxels to define its frame")
    points = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    centre = points.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov((points - centre).T))  # ascending variance
    deep, thin = vectors[:, 1], vectors[:, 0]
    superior = thin * np.sign(thin[2] or 1.0)
    anterior = deep * np.sign(deep[1] or 1.0)
    right = np.cross(anterior, superior)
    frame = np.eye(4)
    frame[:3, :3] = np.column_stack([right, anterior, superior])
    frame[:3, 3] = centre
    return frame


def half_extent(mask: nib.Nifti1Image, frame: np.ndarray) -> np.ndarray:
    """Half extents (mm) of a disc mask along its frame axes (voxel corners included)."""
    ijk = np.argwhere(np.asarray(mask.dataobj) > 0.5)
    points = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    local = (points - frame[:3, 3]) @ frame[:3, :3]
    voxel = float(np.sqrt((mask.affine[:3, :3] ** 2).sum(axis=0)).max())
    return np.abs(local).max(axis=0) + voxel / 2


def resample_to_frame(mask: nib.Nifti1Image, frame: np.ndarray, affine: np.ndarray,
                      shape: tuple[int, int, int]) -> np.ndarray:
    """A mask (0/1) resampled (linear) onto an atlas grid placed in ``frame``."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = frame @ affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    vox = np.linalg.solve(mask.affine, world)[:3]
    data = (np.asarray(mask.dataobj) > 0.5).astype(np.float32)
    return ndimage.map_coordinates(data, vox, order=1, mode="constant").reshape(shape)


# ---- group-wise template construction ------------------------------------------------------
def build_template(masks: Sequence[nib.Nifti1Image], *, spacing: float = SPACING_MM,
                   iterations: int = TEMPLATE_ITERATIONS, seed: int = 0
                   ) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Group-wise template of one level's disc masks -> (probability template, binary mask).

    Deterministic for a given input (single ITK thread, fixed registration seed).
    """
    if len(masks) < 2:
        raise UsageError(f"a template needs at least 2 disc masks, got {len(masks)}",
                         fix="include more healthy discs (or relax the selection)")
    frames = [disc_frame(m) for m in masks]
    extent = np.max([half_extent(m, f) for m, f in zip(masks, frames, strict=True)], axis=0)
    affine, shape = atlas_grid(extent + MARGIN_MM, spacing)
    aligned = [resample_to_frame(m, f, affine, shape) for m, f in zip(masks, frames, strict=True)]
    template = _ants_template(aligned, affine, iterations, seed)
    binary = _clean_mask(template >= 0.5)
    return (_atlas_image(template.astype(np.float32), affine),
            _atlas_image(binary.astype(np.uint8), affine))


def _ants_template(aligned: Sequence[np.ndarray], affine: np.ndarray, iterations: int,
                   seed: int) -> np.ndarray:
    """ants.build_template over arrays on one grid (ANTs imported here: it loads slowly).

    Deterministic: one ITK thread (the variable must be set before ITK first runs in the
    process) and a fixed registration seed."""
    threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import ants

    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    origin = tuple(float(o) for o in affine[:3, 3])
    images = [ants.from_numpy(a.astype(np.float32), origin=origin, spacing=spacing)
              for a in aligned]
    work = Path(tempfile.mkdtemp(prefix="spineqprep_template_"))
    ants.config.set_ants_deterministic(True, seed)  # one ITK thread, --random-seed
    try:
        with _quiet():
            template = ants.build_template(image_list=images, iterations=iterations,
                                           output_dir=str(work), type_of_transform="SyN")
    finally:
        ants.config.set_ants_deterministic(False, None)
        if threads is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
        shutil.rmtree(work, ignore_errors=True)
    return np.clip(template.numpy(), 0.0, 1.0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence stdout, Python's and the C++ library's (build_template prints transforms)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()):
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest connected component, holes filled."""
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def _atlas_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=4)  # 4: aligned to a template
    img.header.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm")
    return img


def write_atlas(out_dir: str | Path, templates: dict[str, tuple[nib.Nifti1Image,
                nib.Nifti1Image]], description: dict) -> Path:
    """Write one level per entry of ``templates`` and ``atlas.json``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for level, (probseg, mask) in templates.items():
        nib.save(mask, out / mask_name(level))
        nib.save(probseg, out / probseg_name(level))
    (out / "atlas.json").write_text(json.dumps(
        {"Spaces": {level: space_name(level) for level in templates},
         "Resolution": {"1": f"{SPACING_MM:g} mm isotropic"}, **description}, indent=2) + "\n")
    return out


# ---- the shipped atlas: healthy synthetic discs --------------------------------------------
def synthetic_healthy_masks(n_per_level: int, seed: int, spacing: float = SPACING_MM,
                            levels: Sequence[str] = LEVELS) -> dict[str, list[nib.Nifti1Image]]:
    """Masks of ``n_per_level`` healthy (Pfirrmann <= 2) synthetic discs per level, each sampled
    on an axis-aligned world grid around the disc (as a scanner would)."""
    from spineqprep.synth import labels as lab
    from spineqprep.synth.anatomy import build_anatomy
    from spineqprep.synth.cohort import sample_cohort
    from spineqprep.synth.truth import sample_points

    out: dict[str, list[nib.Nifti1Image]] = {level: [] for level in levels}
    people = sample_cohort(12 * n_per_level, 3, 1, seed)
    for person in people:
        visit = person.visits[0]
        wanted = [level for level in levels if len(out[level]) < n_per_level
                  and visit.discs[lab.DISCS.index(level)].modified_pfirrmann <= 2]
        if not wanted:
            continue
        anat = build_anatomy(person, visit, seed)
        for level in wanted:
            k = lab.DISCS.index(level)
            affine, shape = atlas_grid((32.0, 32.0, 24.0), spacing)
            affine[:3, 3] += anat.disc_centre(k)
            ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
            labels, _ = sample_points(anat, ijk @ affine[:3, :3].T + affine[:3, 3], visit.discs)
            mask = lab.main_labels(labels).reshape(shape) == lab.disc(k)
            out[level].append(nib.Nifti1Image(mask.astype(np.uint8), affine))
        if all(len(v) == n_per_level for v in out.values()):
            return out
    short = [level for level, v in out.items() if len(v) < n_per_level]
    raise UsageError(f"not enough healthy synthetic discs at {', '.join(short)}",
                     fix="lower --discs-per-level")


def build_synthetic_atlas(out_dir: str | Path, *, n_per_level: int = SHIPPED_DISCS_PER_LEVEL,
                          seed: int = SHIPPED_SEED, iterations: int = TEMPLATE_ITERATIONS,
                          progress: Callable[[str], None] | None = None) -> Path:
    """The shipped atlas: group-wise templates of healthy synthetic discs (cohort ``seed``)."""
    masks = synthetic_healthy_masks(n_per_level, seed)
    templates, scales = {}, {}
    for level in LEVELS:
        templates[level] = build_template(masks[level], iterations=iterations, seed=seed)
        scales[level] = canonical_scale(templates[level][1], level)
        if progress:
            progress(f"{space_name(level)}: {len(masks[level])} discs, scale {scales[level]}")
    return write_atlas(out_dir, templates, {
        "Description": "Level-specific lumbar disc atlas: ANTsPy group-wise template "
                       "(ants.build_template, SyN) of healthy synthetic discs (Pfirrmann <= 2) "
                       "of spineqprep-synth, each aligned on its centroid and principal axes.",
        "Command": f"spineqprep-atlas synthetic OUT_DIR --discs-per-level {n_per_level} "
                   f"--seed {seed} --iterations {iterations}",
        "DiscsPerLevel": n_per_level, "Seed": seed, "Iterations": iterations,
        "CanonicalScale": scales,
    })


def canonical_scale(mask: nib.Nifti1Image, level: str) -> list[float]:
    """Per-axis scale of an atlas disc against the synthetic canonical disc of ``level``:
    square root of the ratio of their coordinate variances on the atlas grid."""
    from spineqprep.synth import labels as lab
    from spineqprep.synth.anatomy import canonical_disc
    from spineqprep.synth.discs import superellipse

    ijk = np.indices(mask.shape).reshape(3, -1).T
    c = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    n = canonical_disc(lab.DISCS.index(level)).normalise(c)
    canonical = (superellipse(n[:, 0], n[:, 1]) <= 1) & (np.abs(n[:, 2]) <= 1)
    inside = np.asarray(mask.dataobj).reshape(-1) > 0
    return [round(float(v), 4) for v in np.sqrt(c[inside].var(axis=0) / c[canonical].var(axis=0))]


# ---- a study-specific atlas: a dataset's own healthy discs ---------------------------------
def disc_masks(derivatives: str | Path, *, acq: str | None = None,
               single_slices: bool = False) -> list[tuple[dict[str, str], str, nib.Nifti1Image]]:
    """(entities, level, binary mask) of every disc of every spine segmentation
    (``sub-*_dseg.nii.gz`` without ``desc`` / ``space``) under ``derivatives``: labels read by
    name through the image's ``dseg.tsv`` (BIDS inheritance; any numbering, as ``-d`` masks),
    the standard numbering when it has none. Single-slice images only with ``single_slices``;
    a disc of fewer than 4 voxels is skipped."""
    from spineqprep.segmentation.lut import check_segmentation, lut_path
    from spineqprep.stats.summary import parse_name
    from spineqprep.synth import labels as lab

    root = Path(derivatives)
    standard = {level: lab.disc(lab.DISCS.index(level)) for level in LEVELS}
    out = []
    for path in sorted(root.rglob("sub-*_dseg.nii.gz")):
        parsed = parse_name(path.name)
        if parsed is None:
            continue
        entities = parsed[0]
        if "desc" in entities or "space" in entities or (acq and entities.get("acq") != acq):
            continue
        img = nib.load(path)
        if len(img.shape) != 3 or (min(img.shape) == 1 and not single_slices):
            continue
        table = lut_path(path, root)
        labels = standard if table is None else {
            row["abbreviation"]: label for label, row in check_segmentation(path, table).items()
            if row["abbreviation"] in LEVELS}
        data = np.rint(np.asarray(img.dataobj)).astype(np.int64)
        for level, value in labels.items():
            mask = data == value
            if mask.sum() >= 4:
                out.append((entities, level, nib.Nifti1Image(mask.astype(np.uint8), img.affine)))
    return out


def healthy_disc_masks(derivatives: str | Path, grades: dict[tuple[str, str | None, str], float],
                       max_grade: float, acq: str | None = None
                       ) -> dict[str, list[nib.Nifti1Image]]:
    """3D disc masks (:func:`disc_masks`) whose disc grade (keyed by (subject, session,
    level)) is at most ``max_grade``, per level."""
    out: dict[str, list[nib.Nifti1Image]] = {level: [] for level in LEVELS}
    for entities, level, mask in disc_masks(derivatives, acq=acq):
        grade = grades.get((entities["sub"], entities.get("ses"), level))
        if grade is not None and grade <= max_grade:
            out[level].append(mask)
    return out


def read_grades(table: str | Path, column: str = "pfirrmann") -> dict[tuple[str, str | None, str],
                                                                      float]:
    """Disc grades from a BIDS phenotype table with participant_id, [session_id,] level and
    ``column`` (e.g. ``phenotype/disc_grades.tsv``)."""
    import pandas as pd

    path = Path(table)
    if not path.is_file():
        raise InputError("the disc grade table does not exist", path=path,
                         fix="pass phenotype/disc_grades.tsv of the raw dataset")
    df = pd.read_csv(path, sep="\t", na_values="n/a", dtype={"participant_id": str})
    missing = {"participant_id", "level", column} - set(df.columns)
    if missing:
        raise InputError(f"the grade table lacks column(s) {', '.join(sorted(missing))}",
                         path=path, fix="use a table with participant_id, level and the grade")
    out = {}
    for row in df.itertuples(index=False):
        grade = getattr(row, column)
        if grade != grade:  # NaN: not graded
            continue
        session = getattr(row, "session_id", None)
        session = None if session != session or session is None else str(session)
        out[(str(row.participant_id).removeprefix("sub-"),
             session.removeprefix("ses-") if session else None, str(row.level))] = float(grade)
    return out


def build_study_atlas(derivatives: str | Path, grade_table: str | Path, out_dir: str | Path, *,
                      max_grade: float = 2, column: str = "pfirrmann", acq: str | None = None,
                      iterations: int = TEMPLATE_ITERATIONS, seed: int = 0,
                      levels: Iterable[str] = LEVELS) -> Path:
    """A study-specific atlas from the dataset's own healthy discs (grade <= ``max_grade``)."""
    masks = healthy_disc_masks(derivatives, read_grades(grade_table, column), max_grade, acq)
    templates = {}
    for level in levels:
        if len(masks[level]) < 2:
            raise UsageError(f"only {len(masks[level])} healthy disc(s) at {level} in "
                             f"{derivatives}", fix="relax --max-grade or add subjects")
        templates[level] = build_template(masks[level], iterations=iterations, seed=seed)
    return write_atlas(out_dir, templates, {
        "Description": f"Study-specific disc atlas: ANTsPy group-wise template of the discs "
                       f"with {column} <= {max_grade:g} in {Path(derivatives).name}.",
        "Command": f"spineqprep-atlas study {derivatives} {grade_table} OUT_DIR "
                   f"--max-grade {max_grade:g} --column {column}"
                   + (f" --acq {acq}" if acq else "") + f" --seed {seed}",
        "DiscsPerLevel": {level: len(masks[level]) for level in templates},
        "Seed": seed, "Iterations": iterations,
    })
