"""Synthetic spine-extended BIDS datasets with a separate ground-truth derivatives dataset.

``generate_dataset(out_dir, n_subjects=4, n_sites=2, n_sessions=1, seed=0, size="small")``
writes a multi-site raw dataset (sagittal T1w/T2w, MESE, MESL, MEGRE) whose images sample a
continuous 3D lumbar anatomy, and the exact per-voxel truth on every grid. See
``docs/synthetic-data.md``.
"""

from spineqprep.synth.generate import SynthResult, generate_dataset

__all__ = ["SynthResult", "generate_dataset"]
