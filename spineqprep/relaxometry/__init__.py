"""Voxel-wise mono-exponential relaxometry (T2, T1rho, T2*): vectorised numpy fits."""

from spineqprep.relaxometry.images import fit_images
from spineqprep.relaxometry.monoexp import REASONS, MonoexpFit, crlb_monoexp, fit_monoexp

__all__ = ["REASONS", "MonoexpFit", "crlb_monoexp", "fit_images", "fit_monoexp"]
