"""Group-level statistics: tables from the derivatives on disk and voxel-wise analyses of the
atlas-space maps (GLM, FDR/Bonferroni, Freedman-Lane max-T, TFCE, clusters, ComBat)."""

from spineqprep.stats.summary import missing_maps, summarise_maps

__all__ = ["missing_maps", "summarise_maps"]
