"""Group-level tables from the derivatives on disk (voxel-wise statistics come later)."""

from spineqprep.stats.summary import missing_maps, summarise_maps

__all__ = ["missing_maps", "summarise_maps"]
