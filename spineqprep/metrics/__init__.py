"""Segmentation and agreement metrics, as the publications report them (docs/metrics.md).

Overlap (Dice 3D / per slice / central slices, volume difference, sensitivity, specificity,
precision, ROC-AUC, PR-AUC), surface distances in mm on anisotropic grids, biomarker agreement
(Bland-Altman, Pearson, paired t) and the per-level evaluation of derivatives datasets.
"""

from spineqprep.metrics.agreement import agreement, bland_altman, paired_t, pearson
from spineqprep.metrics.evaluate import (
    METRICS,
    Level,
    binary_metrics,
    evaluate_datasets,
    evaluate_labels,
    evaluate_pair,
    match_levels,
    read_lut,
    sagittal_axis,
    summarise_levels,
    write_table,
)
from spineqprep.metrics.overlap import (
    Confusion,
    central_slices,
    confusion,
    dice,
    dice_2d,
    dice_central,
    dice_per_slice,
    pr_auc,
    precision,
    roc_auc,
    sensitivity,
    specificity,
    volume_difference_percent,
)
from spineqprep.metrics.surface import (
    hausdorff_distance,
    mean_surface_distance,
    surface_distances,
    surface_voxels,
    voxel_spacing,
)

__all__ = [
    "METRICS", "Confusion", "Level", "agreement", "binary_metrics", "bland_altman",
    "central_slices", "confusion", "dice", "dice_2d", "dice_central", "dice_per_slice",
    "evaluate_datasets", "evaluate_labels", "evaluate_pair", "hausdorff_distance", "match_levels",
    "mean_surface_distance", "paired_t", "pearson", "pr_auc", "precision", "read_lut",
    "roc_auc", "sagittal_axis", "sensitivity", "specificity", "summarise_levels",
    "surface_distances", "surface_voxels", "volume_difference_percent", "voxel_spacing",
    "write_table",
]
