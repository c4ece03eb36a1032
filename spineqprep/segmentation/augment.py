"""Domain randomisation and augmentation of 2D training slices (SynthSeg-style).

Every function is pure given its ``numpy.random.Generator``: the same generator state gives
the same sample, so the training stream is reproducible from a seed. Geometry (affine and
elastic deformation, cropping) is applied to the label maps with nearest-neighbour
interpolation, so every output label is an input label; intensity changes (random contrast per
tissue, partial volume across the slice thickness, bias field, gamma, resolution, Rician noise,
inversion) never touch the labels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: In-plane acquisition spacing (mm) simulated before resampling to the network's grid.
SPACING_RANGE_MM = (0.6, 4.0)
#: Width of the simulated point-spread function (Gaussian sigma, in acquired pixels), drawn
#: per sample: 0 is point sampling (sharp, aliased edges), 0.42 the Gaussian closest to a box
#: one pixel wide, more is a smoother reconstruction.
PSF_SIGMA_RANGE = (0.0, 0.5)
#: Signal-to-noise ratio of the brightest tissue, simulated range (log-uniform: as many
#: samples between 6 and 19 as between 19 and 60, so long-echo, low-SNR images are common).
SNR_RANGE = (6.0, 60.0)
#: Pixels whose target is unknown (cut by a simulated field of view edge) carry this label and
#: are ignored by the loss.
IGNORE = 255


def deformation(rng: np.random.Generator, shape_in: tuple[int, int], shape_out: tuple[int, int],
                max_rotation_deg: float = 15.0, scale_range: tuple[float, float] = (0.85, 1.2),
                elastic_px: float = 3.0) -> np.ndarray:
    """Sampling coordinates (2, *shape_out) into an input of ``shape_in``: random rotation,
    anisotropic scaling, shear, translation and a smooth elastic displacement, centred so the
    output stays inside the input for moderate parameters."""
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = rng.uniform(*scale_range) * np.exp(rng.normal(0.0, 0.06, 2))
    shear = rng.normal(0.0, 0.06)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(1.0 / scale)
    out_centre = (np.array(shape_out) - 1) / 2.0
    slack = np.maximum(np.array(shape_in) - np.array(shape_out), 0) / 2.0
    in_centre = (np.array(shape_in) - 1) / 2.0 + rng.uniform(-1, 1, 2) * slack
    grid = np.indices(shape_out, dtype=np.float64).reshape(2, -1) - out_centre[:, None]
    coords = (matrix @ grid + in_centre[:, None]).reshape(2, *shape_out)
    if elastic_px > 0:
        coarse = rng.normal(0.0, rng.uniform(0.0, elastic_px), (2, 5, 5))
        zoom = (shape_out[0] / 5, shape_out[1] / 5)
        coords += np.stack([ndimage.zoom(c, zoom, order=3)[:shape_out[0], :shape_out[1]]
                            for c in coarse])
    return coords


def warp(array: np.ndarray, coords: np.ndarray, order: int, fill: float = 0.0) -> np.ndarray:
    """Sample a 2D array (or a stack of them, leading axis) at ``coords``; ``order`` 0 for
    labels (nearest, so labels are preserved), 1 for images."""
    if array.ndim == 3:
        return np.stack([warp(a, coords, order, fill) for a in array])
    return ndimage.map_coordinates(array, coords, order=order, mode="constant", cval=fill,
                                   prefilter=False)


def random_contrast(rng: np.random.Generator, labels: np.ndarray, groups: np.ndarray,
                    n_labels: int, scale: np.ndarray | None = None) -> np.ndarray:
    """A synthetic image from a stack of sub-slice label maps (partial volume across the slice
    thickness = mean over the stack): every label draws a random mean intensity (with
    probability 0.5 labels of one tissue group share it), plus a random within-tissue spread.
    Label 0 (air) stays dark most of the time. ``scale`` (same shape, 0-1) multiplies the
    signal: the share of each pixel that is not a signal void (cortical bone)."""
    means = rng.uniform(0.0, 1.0, n_labels)
    if rng.random() < 0.5:
        means = rng.uniform(0.0, 1.0, groups.max() + 1)[groups]
    if rng.random() < 0.8:
        means[0] = rng.uniform(0.0, 0.08)
    spread = rng.uniform(0.0, 0.06, n_labels)
    image = means[labels] + spread[labels] * rng.normal(size=labels.shape)
    if scale is not None:
        image = image * scale
    return image.mean(axis=0) if image.ndim == 3 else image


def bias_field(rng: np.random.Generator, shape: tuple[int, int], strength: float = 0.3
               ) -> np.ndarray:
    """A smooth multiplicative field exp(f), f a cubic upsampling of a 4 x 4 Gaussian grid."""
    coarse = rng.normal(0.0, rng.uniform(0.0, strength), (4, 4))
    field = ndimage.zoom(coarse, (shape[0] / 4, shape[1] / 4), order=3)
    return np.exp(field[:shape[0], :shape[1]])


def degrade(rng: np.random.Generator, image: np.ndarray, spacing_mm: float,
            spacing_range_mm: tuple[float, float] = SPACING_RANGE_MM,
            psf_sigma_range: tuple[float, float] = PSF_SIGMA_RANGE) -> np.ndarray:
    """Simulate an acquisition of ``image`` (on a grid of ``spacing_mm``): bias field, lower
    in-plane resolution (blur by a point-spread function of random width in
    ``psf_sigma_range``, then resampling to a random spacing per axis in ``spacing_range_mm``),
    Rician noise at a random (log-uniform) SNR on that grid, resampling back, and a random gamma."""
    shape = image.shape
    image = image * bias_field(rng, shape)
    top = float(np.percentile(image, 99.5)) or 1.0
    image = image / top
    spacing = rng.uniform(*spacing_range_mm, 2)
    factors = np.clip(spacing_mm / spacing, None, 1.0)  # < 1: coarser than the network grid
    sigma = rng.uniform(*psf_sigma_range) / factors * (factors < 1)
    low = ndimage.gaussian_filter(image, sigma) if (factors < 1).any() else image
    low = ndimage.zoom(low, factors, order=1)
    noise = 1.0 / np.exp(rng.uniform(*np.log(SNR_RANGE)))
    low = np.hypot(low + rng.normal(0.0, noise, low.shape), rng.normal(0.0, noise, low.shape))
    image = ndimage.zoom(low, np.array(shape) / np.array(low.shape), order=1)
    image = _fit(image, shape)
    return np.clip(image, 0.0, None) ** np.exp(rng.normal(0.0, 0.25))


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or edge-pad to ``shape`` (zoom can be one pixel off)."""
    image = image[:shape[0], :shape[1]]
    pad = [(0, s - n) for s, n in zip(shape, image.shape, strict=True)]
    return np.pad(image, pad, mode="edge") if any(p[1] for p in pad) else image


def cut_field_of_view(rng: np.random.Generator, image: np.ndarray, target: np.ndarray,
                      max_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Blank a band at one edge (an acquisition whose field of view ends inside the crop):
    the image is 0 there and the target background (nothing is segmented outside an image)."""
    image, target = image.copy(), target.copy()
    axis, side = int(rng.integers(2)), int(rng.integers(2))
    width = int(rng.uniform(0.05, max_fraction) * image.shape[axis])
    band = [slice(None), slice(None)]
    band[axis] = slice(0, width) if side == 0 else slice(image.shape[axis] - width, None)
    image[tuple(band)] = 0.0
    target[tuple(band)] = 0
    return image, target
