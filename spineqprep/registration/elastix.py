"""itk-elastix backend: the published affine + B-spline / rigidity-penalty disc registration.

Works around two crashes of itk-elastix 0.25.4 (regression tests in
tests/test_registration_engine.py):

- more than one thread set on the filter of a multi-metric B-spline registration
  (``SetNumberOfThreads``) crashes the process: the thread count is set once, globally, with
  ``itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads`` and never on a filter;
- ``TransformixFilter.ComputeSpatialJacobianDeterminantImage`` before the filter ran crashes:
  the filter is always brought up to date (``UpdateLargestPossibleRegion``) first.

ITK is imported lazily (10-20 s, once per process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from spineqprep.registration.disc import Grid
from spineqprep.registration.params import elastix_parameter_files

INTERPOLATION_ORDER = {"nearest": 0, "linear": 1, "bspline": 3}


@cache
def itk_module(threads: int | None = None):
    """Import ITK once and set the global thread count (the crash-free way to use threads)."""
    import itk

    n = threads or int(os.environ.get("SPINEQPREP_ITK_THREADS", 0)) or min(2, os.cpu_count() or 1)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(n)
    return itk


def preload(threads: int | None = None) -> None:
    """Load ITK and its elastix module in this process now (10-20 s, once per process), so
    that the forked children registering each grid inherit them instead of loading them each
    (measured: a child's first registration 0.4 s); ``threads``: ITK's global thread count
    from now on (else the one the first load set)."""
    itk = itk_module()
    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    itk.ElastixRegistrationMethod  # noqa: B018 - the attribute access loads it


def to_itk(grid: Grid):
    """A float32 ITK image carrying the grid's geometry (ITK arrays are indexed k, j, i)."""
    itk = itk_module()
    image = itk.image_from_array(np.ascontiguousarray(grid.data.T, dtype=np.float32))
    image.SetOrigin([float(v) for v in grid.origin])
    image.SetSpacing([float(v) for v in grid.spacing])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(grid.direction, dtype=float)))
    return image


def from_itk(image) -> np.ndarray:
    """The voxel array of an ITK image, indexed (i, j[, k]) like ``Grid.data``."""
    itk = itk_module()
    return np.asarray(itk.array_from_image(image)).T.copy()


def register(
    moving: Grid,
    fixed: Grid,
    out_dir: Path,
    *,
    parameter_maps: Sequence[Path] | None = None,
    attempt: int = 0,
) -> tuple[Path, ...]:
    """Register the smoothed moving mask to the fixed (atlas) one; return the transform files.
    ``attempt`` > 0 shifts every map's ``RandomSeed`` (a retry draws other samples).

    The files are ``TransformParameters.N.txt`` in out_dir, in the order they are applied;
    each names its predecessor (file name only: run transformix from out_dir, or load them
    all with :func:`apply`).
    """
    itk = itk_module()
    parameters = itk.ParameterObject.New()
    for path in elastix_parameter_files(parameter_maps):
        parameters.AddParameterFile(str(path))
    if attempt:
        for index in range(parameters.GetNumberOfParameterMaps()):
            seed = parameters.GetParameterMap(index).get("RandomSeed", ("0",))[0]
            parameters.SetParameter(index, "RandomSeed", str(int(seed) + 7919 * attempt))
    method = itk.ElastixRegistrationMethod.New(to_itk(fixed), to_itk(moving))
    method.SetParameterObject(parameters)
    method.SetLogToConsole(False)
    method.SetLogToFile(False)
    method.UpdateLargestPossibleRegion()
    result = method.GetTransformParameterObject()
    out_dir = Path(out_dir)
    files = []
    for index in range(result.GetNumberOfParameterMaps()):
        parameter_map = result.GetParameterMap(index)
        previous = files[-1].name if files else "NoInitialTransform"
        parameter_map["InitialTransformParameterFileName"] = (previous,)
        path = out_dir / f"TransformParameters.{index}.txt"
        single = itk.ParameterObject.New()
        single.AddParameterMap(parameter_map)
        single.WriteParameterFile(str(path))
        files.append(path)
    return tuple(files)


def _transform_object(files: Sequence[Path], reference: Grid, order: int):
    """The chained transform of ``files`` with its output grid set to ``reference``."""
    itk = itk_module()
    chain = itk.ParameterObject.New()
    ndim = reference.data.ndim
    for path in files:
        reader = itk.ParameterObject.New()
        reader.ReadParameterFile(str(path))
        parameter_map = reader.GetParameterMap(0)
        parameter_map["InitialTransformParameterFileName"] = ("NoInitialTransform",)
        parameter_map["Size"] = tuple(str(n) for n in reference.data.shape)
        parameter_map["Spacing"] = tuple(repr(float(v)) for v in reference.spacing)
        parameter_map["Origin"] = tuple(repr(float(v)) for v in reference.origin)
        # elastix stores the direction column by column
        parameter_map["Direction"] = tuple(
            repr(float(v)) for v in reference.direction.T.reshape(ndim * ndim)
        )
        parameter_map["Index"] = ("0",) * ndim
        parameter_map["ResampleInterpolator"] = ("FinalBSplineInterpolator",)
        parameter_map["FinalBSplineInterpolationOrder"] = (str(order),)
        parameter_map["DefaultPixelValue"] = ("0",)
        parameter_map["ResultImagePixelType"] = ("float",)
        chain.AddParameterMap(parameter_map)
    return chain


def apply(files: Sequence[Path], image: Grid, reference: Grid, interpolation: str) -> np.ndarray:
    """Warp ``image`` onto the ``reference`` grid with the transform files (transformix)."""
    itk = itk_module()
    moving = to_itk(image)
    transformix = itk.TransformixFilter.New(moving)
    transformix.SetTransformParameterObject(
        _transform_object(files, reference, INTERPOLATION_ORDER[interpolation])
    )
    transformix.SetLogToConsole(False)
    transformix.UpdateLargestPossibleRegion()
    return from_itk(transformix.GetOutput())


def det_jacobian(files: Sequence[Path], reference: Grid) -> np.ndarray:
    """Determinant of the spatial Jacobian of the whole transform on the reference grid.

    The transformix filter runs first (UpdateLargestPossibleRegion): asking for the Jacobian
    of a filter that has not run crashes itk-elastix 0.25.4.
    """
    itk = itk_module()
    transformix = itk.TransformixFilter.New(to_itk(reference))
    transformix.SetTransformParameterObject(_transform_object(files, reference, 1))
    transformix.SetLogToConsole(False)
    transformix.UpdateLargestPossibleRegion()
    return from_itk(transformix.ComputeSpatialJacobianDeterminantImage())
