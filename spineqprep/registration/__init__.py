"""Disc-by-disc mask-guided registration to a level-specific atlas (METHODS.md section 1).

``register_disc`` registers one disc mask to its atlas disc (itk-elastix or ANTsPy backend) and
reports its quality; ``apply_transform`` warps any image of that disc onto the atlas grid.
The backends import ITK / ANTs lazily (10-20 s on first use), so importing this package is cheap.
"""

from spineqprep.registration.disc import (
    BACKENDS,
    DiscTransform,
    apply_transform,
    is_single_slice,
    register_disc,
)
from spineqprep.registration.quality import DiscQuality, histogram_distance

__all__ = [
    "BACKENDS",
    "DiscQuality",
    "DiscTransform",
    "apply_transform",
    "histogram_distance",
    "is_single_slice",
    "register_disc",
]
