"""Fine-tuning the endplate network on a study's own manual masks: accuracy before and after.

    python benchmarks/bench_endplate_finetune.py [--label-subjects 6] [--steps 500] [--subjects 6]

A labelled study stands in for a reader's masks: ``generate_dataset(seed=3131)`` (medium grids,
0.5 mm UTE, sites A-C; anatomies in neither the training cohorts nor the held-out seed 999), its
true endplates written as ``*_desc-endplates_dseg`` in ``<raw>/derivatives/manual``. The packaged
bundle is fine-tuned on them as ``spineqprep-train endplates --init <packaged> --labels-dir ...
--bank-subjects 40`` would, and both bundles are scored by ``bench_endplates.run`` on the
held-out seed 999 (L5 located by the packaged spine network, as in the pipeline).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from bench_endplates import run

from spineqprep.metrics.agreement import bland_altman
from spineqprep.segmentation.endplates import DSEG_LABELS, train_endplates
from spineqprep.segmentation.lut import endplate_table
from spineqprep.synth import generate_dataset

LABEL_SEED = 3131


def manual_masks(raw: Path, truth: Path) -> Path:
    """The true endplates of every UTE grid as a reader's derivatives folder."""
    deriv = raw / "derivatives" / "manual"
    for first in sorted(raw.rglob("*_acq-ute_echo-1_MEGRE.nii.gz")):
        rel = first.parent.relative_to(raw)
        stem = first.name.split("_echo-1")[0]
        tissues = nib.load(truth / rel / f"{stem}_desc-tissues_dseg.nii.gz")
        data = np.asarray(tissues.dataobj)
        masks = np.where(np.isin(data, list(DSEG_LABELS.values())), data, 0).astype(np.uint16)
        (deriv / rel).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(masks, tissues.affine),
                 deriv / rel / f"{stem}_desc-endplates_dseg.nii.gz")
    pd.DataFrame(endplate_table()).to_csv(deriv / "dseg.tsv", sep="\t", index=False)
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "manual", "BIDSVersion": "1.10.0", "DatasetType": "derivative"}))
    return deriv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--label-subjects", type=int, default=6, help="subjects with masks")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subjects", type=int, default=6, help="held-out subjects scored")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study = generate_dataset(Path(tmp) / "study", n_subjects=args.label_subjects,
                                 n_sites=min(3, args.label_subjects), seed=LABEL_SEED,
                                 size="medium")
        labels = manual_masks(study.raw_dir, study.truth_dir)
        start = time.perf_counter()
        train_endplates(Path(tmp) / "tuned", args.steps, seed=args.seed, threads=2,
                        init=Path(__file__).parents[1] / "spineqprep" / "data" / "models"
                        / "endplates", labels_dir=labels, bank_size=(40, 10),
                        log=lambda _: None)
        seconds = time.perf_counter() - start
        tables = {"packaged": run(None, args.subjects, "medium"),
                  "fine-tuned": run(str(Path(tmp) / "tuned"), args.subjects, "medium")}
    columns = ["dice", "dice_central50", "sensitivity", "precision"]
    side = pd.concat({name: t[t["locator"] == "predicted"].groupby("endplate")[columns].mean()
                      for name, t in tables.items()}, axis=1).round(3)
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", None)
    print(side)
    for name, table in tables.items():
        part = table[table["locator"] == "predicted"].dropna(subset=["t2s_pred_ms"])
        ba = bland_altman(part["t2s_pred_ms"], part["t2s_true_ms"])
        print(f"{name}: endplate T2* predicted vs true mask (n={len(part)}): bias "
              f"{ba['bias']:.2f} ms, LoA {ba['loa_low']:.2f} to {ba['loa_high']:.2f} ms")
    print(f"fine-tuning: {args.steps} steps on {args.label_subjects} labelled subjects, "
          f"{seconds:.0f} s on 2 threads (bank and held-out slice evaluation included)")


if __name__ == "__main__":
    main()
