"""Train, fine-tune and evaluate the spine segmentation network.

``train_spine`` is what ``spineqprep-train spine`` runs: build (or load with ``init``) the
U-Net, make the synthetic slice bank, optionally add a user's labelled slices, optimise
Dice + cross-entropy with Adam on a seeded sample stream, checkpoint, and write a bundle whose
``model.json`` records the data, seed, steps, time and held-out slice Dice. Same seed, steps
and thread count -> the same sample stream and (up to floating point summation order) the
same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch import nn

from spineqprep.metrics import dice
from spineqprep.segmentation import augment, model_io, trainset
from spineqprep.segmentation.network import build_network, count_parameters

#: Subjects and slices of the default synthetic bank, and of the held-out evaluation bank
#: (cohort seed ``EVAL_SEED``, disjoint from the training cohorts ``seed + TRAINING_SEED_BASE``).
BANK = (150, 12)
EVAL_BANK = (24, 8)
EVAL_SEED = 999
DEFAULT_ARCHITECTURE = {"type": "unet2d", "in_channels": 1, "base_filters": 16, "depth": 4,
                        "n_classes": len(trainset.CLASSES)}


def dice_ce_loss(logits: torch.Tensor, allowed: torch.Tensor,
                 class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy + (1 - mean soft Dice of the foreground classes) for targets given as
    bitmasks of the classes each pixel may belong to (:func:`trainset.to_bits`): one bit set
    is an ordinary label; several bits a partial label (a dataset that labels only some
    structures: the cross-entropy is then that of the allowed classes' summed probability, and a
    class's Dice counts the pixel only where that class is decided); all bits
    (``augment.IGNORE``) count in neither. ``class_weights`` weight the cross-entropy of
    definite pixels per class (thin structures such as the endplates)."""
    n = logits.shape[1]
    bits = ((allowed[:, None] >> torch.arange(n).view(1, n, 1, 1)) & 1).bool()
    count = bits.sum(dim=1)
    valid, definite = count < n, count == 1
    logp = logits.log_softmax(dim=1)
    nll = -torch.logsumexp(logp.masked_fill(~bits, float("-inf")), dim=1)
    weight = valid.float()
    if class_weights is not None:
        weight = torch.where(definite, class_weights[bits.float().argmax(dim=1)], weight)
    ce = (torch.where(valid, nll, 0.0) * weight).sum() / valid.sum().clamp(min=1)
    prob = logp.exp()
    decided = (definite[:, None] | ~bits).float()
    positive = (definite[:, None] & bits).float()
    inter = (prob * positive).sum(dim=(0, 2, 3))[1:]
    total = (prob * decided + positive).sum(dim=(0, 2, 3))[1:]
    return ce + 1.0 - ((2 * inter + 1.0) / (total + 1.0)).mean()


def batch_dice(logits: torch.Tensor, allowed: torch.Tensor) -> np.ndarray:
    """Hard Dice per foreground class over the pixels of a batch with a definite label."""
    ref = trainset.definite_classes(allowed.numpy())
    known = ref != trainset.augment.IGNORE
    pred = logits.argmax(dim=1).numpy()
    return np.array([dice((pred == c) & known, ref == c) for c in range(1, logits.shape[1])])


def train(model: nn.Module, stream: trainset.SampleStream, steps: int, lr: float = 2e-3,
          log: Callable[[str], None] = print, checkpoint: Path | None = None,
          every: int = 50, classes: Sequence[str] = trainset.CLASSES,
          class_weights: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Adam on ``stream.batch(0 .. steps - 1)`` with a cosine learning-rate decay; prints step,
    loss, running Dice per class (``classes``, background first) and seconds; saves the state
    dict to ``checkpoint`` every ``every`` steps. Returns the per-step history."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s / max(steps, 1), 1.0))))
    model.train()
    weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    history, running, start = [], None, time.perf_counter()
    for step in range(steps):
        x, y = stream.batch(step)
        logits = model(x)
        loss = dice_ce_loss(logits, y, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        d = batch_dice(logits.detach(), y)
        running = d if running is None else 0.9 * running + 0.1 * d
        history.append({"step": step + 1, "loss": loss.item(), "seconds":
                        time.perf_counter() - start})
        if (step + 1) % every == 0 or step + 1 == steps:
            scores = " ".join(f"{c} {d:.3f}" for c, d in zip(classes[1:], running, strict=True))
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  dice {scores}  "
                f"{time.perf_counter() - start:.0f} s")
            if checkpoint is not None:
                torch.save({"step": step + 1, "model": model.state_dict(),
                            "optimiser": opt.state_dict()}, checkpoint)
    model.eval()
    return history


@torch.no_grad()
def evaluate_slices(model: nn.Module, bank: trainset.SliceBank, seed: int = EVAL_SEED,
                    n: int = 96, size: int = 128, classes: Sequence[str] = trainset.CLASSES,
                    sampler: Callable[..., tuple[np.ndarray, np.ndarray]]
                    = trainset.synthetic_sample) -> dict[str, float]:
    """Dice per class, pooled over ``n`` randomised held-out slices (the training
    distribution, on anatomies the network never saw)."""
    model.eval()
    stream = trainset.SampleStream(bank, seed, batch_size=8, size=size, sampler=sampler)
    preds, refs = [], []
    for step in range(int(np.ceil(n / 8))):
        x, y = stream.batch(step)
        preds.append(model(x).argmax(dim=1).numpy())
        refs.append(trainset.definite_classes(y.numpy()))
    pred, ref = np.concatenate(preds), np.concatenate(refs)
    pred = np.where(ref == trainset.augment.IGNORE, 0, pred)
    return {name: round(dice(pred == c, ref == c), 4) for c, name in enumerate(classes) if c}


@torch.no_grad()
def predict_canonical(model: nn.Module, meta: Mapping[str, Any], img: nib.spatialimages.
                      SpatialImage) -> np.ndarray:
    """4-class labels of a 3D image, per sagittal slice, in the voxel order of
    ``nib.as_closest_canonical(img)`` (RAS). Used to measure held-out 3D Dice; the pipeline's
    inference lives in ``segmentation.infer``."""
    ras = nib.as_closest_canonical(img)
    data = np.asarray(ras.dataobj, np.float32)
    spacing = float(meta["input"]["spacing_mm"])
    multiple = int(meta["input"]["multiple_of"])
    zooms = ras.header.get_zooms()[:3]
    out = np.zeros(data.shape, np.uint8)
    for i in range(data.shape[0]):
        native = data[i].T[::-1, ::-1]
        grid = ndimage.zoom(native, (zooms[2] / spacing, zooms[1] / spacing), order=1)
        x = model_io.normalise(grid, meta)
        pad = [(0, -s % multiple) for s in x.shape]
        x = np.pad(x, pad, mode="constant", constant_values=float(x.min()))
        prob = model(torch.from_numpy(x)[None, None]).softmax(dim=1)[0].numpy()
        prob = prob[:, :grid.shape[0], :grid.shape[1]]
        back = np.stack([ndimage.zoom(p, np.array(native.shape) / np.array(p.shape), order=1)
                         for p in prob])
        back = back[:, :native.shape[0], :native.shape[1]]
        out[i] = back.argmax(axis=0)[::-1, ::-1].T
    return out


def truth_classes(dseg: np.ndarray) -> np.ndarray:
    """Truth ``_dseg`` -> 4 classes (every modelled vertebra above S1 is a vertebral body,
    every disc a disc: the network does not know levels)."""
    out = np.zeros(dseg.shape, np.uint8)
    out[(dseg >= 18) & (dseg <= 25)] = 1
    out[dseg == 26] = 2
    out[(dseg >= 118) & (dseg <= 125)] = 3
    return out


def evaluate_generated(model: nn.Module, meta: Mapping[str, Any], raw_dir: Path,
                       truth_dir: Path, patterns: Sequence[str] = (
                           "*_T2w.nii.gz", "*_T1w.nii.gz", "*_echo-1_MESE.nii.gz",
                           "*_tsl-1_MESL.nii.gz")) -> list[dict[str, Any]]:
    """3D Dice per class of every image matching ``patterns`` in a generated dataset against
    its truth ``_dseg`` (one row per image and class)."""
    rows = []
    for pattern in patterns:
        for path in sorted(Path(raw_dir).rglob(pattern)):
            stem = path.name.split("_")
            keep = [e for e in stem if e.startswith(("sub-", "ses-", "acq-"))]
            ref_path = truth_dir / path.parent.relative_to(raw_dir) / ("_".join(keep)
                                                                       + "_dseg.nii.gz")
            img = nib.load(path)
            pred = predict_canonical(model, meta, img)
            ref = truth_classes(np.asarray(nib.as_closest_canonical(nib.load(ref_path)).dataobj))
            contrast = pattern.strip("*_").split(".")[0]
            for c, name in enumerate(trainset.CLASSES):
                if c and (ref == c).any():
                    rows.append({"image": path.name, "contrast": contrast, "class": name,
                                 "dice": dice(pred == c, ref == c)})
    return rows


def train_spine(out: str | Path, steps: int, seed: int = 0, threads: int = 2,
                init: str | Path | None = None, labels_dir: str | Path | None = None,
                bank_size: tuple[int, int] = BANK, batch_size: int = 8, lr: float | None = None,
                eval_bank: tuple[int, int] = EVAL_BANK, eval_samples: int = 96,
                real_fraction: float = 0.5, realistic_fraction: float = 0.3,
                cutoffs: Mapping[str, float] | None = None,
                cutoffs_by_contrast: Mapping[str, Mapping[str, float]] | None = None,
                test_time_spacings_mm: Sequence[float] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or fine-tune ``init`` on ``labels_dir``) and write a bundle into ``out``. The
    bundle keeps the inference settings of ``init`` (cut-offs, test-time pixel sizes), or those
    given (:func:`model_io.inference_settings`)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = Path(out)
    if init is not None:
        model, base = model_io.load_bundle(init)
        architecture = base["architecture"]
    else:
        architecture, base = dict(DEFAULT_ARCHITECTURE), {}
        model = build_network(architecture)
    inference, inference_input = model_io.inference_settings(
        base, init, trainset.CLASSES, cutoffs=cutoffs, cutoffs_by_contrast=cutoffs_by_contrast,
        test_time_spacings_mm=test_time_spacings_mm)
    out.mkdir(parents=True, exist_ok=True)
    real = trainset.load_labelled_slices(labels_dir) if labels_dir else []
    if real:
        log(f"{len(real)} labelled slices from {labels_dir}")
    bank_seed = trainset.TRAINING_SEED_BASE + seed
    log(f"synthetic slice bank: {bank_size[0]} subjects x {bank_size[1]} slices "
        f"(cohort seed {bank_seed})")
    bank = trainset.make_bank(*bank_size, seed=bank_seed, progress=log)
    log(f"bank ready in {time.perf_counter() - start:.0f} s; network "
        f"{count_parameters(model) / 1e6:.2f} M parameters")
    stream = trainset.SampleStream(
        bank, seed, batch_size=batch_size, real=real, real_fraction=real_fraction,
        sampler=partial(trainset.synthetic_sample, realistic_fraction=realistic_fraction))
    rate = lr if lr is not None else (2e-3 if init is None else 3e-4)
    history = train(model, stream, steps, rate, log, checkpoint=out / "checkpoint.pt")
    held_out = trainset.make_bank(*eval_bank, seed=EVAL_SEED)
    metrics = {"slice_dice_heldout": evaluate_slices(model, held_out, n=eval_samples),
               "slice_dice_heldout_note": f"pooled 2D Dice on {eval_samples} randomised slices "
                                          f"of {eval_bank[0]} held-out anatomies (cohort seed "
                                          f"{EVAL_SEED})",
               "final_loss": round(float(np.mean([h['loss'] for h in history[-20:]])), 4)}
    log(f"held-out slice Dice: {metrics['slice_dice_heldout']}")
    data = (f"synthetic: spineqprep.synth anatomies, cohort seed {bank_seed}, {bank_size[0]} "
            f"subjects x {bank_size[1]} random sagittal planes, domain-randomised")
    if real:
        data += (f"; fine-tuned on {len(real)} labelled slices from {labels_dir} "
                 f"({real_fraction:.0%} of each batch)")
    meta = {
        "name": base.get("name", "spine"), "version": 1, "architecture": architecture,
        "classes": list(trainset.CLASSES),
        "input": {"spacing_mm": trainset.SPACING_MM, "slice_axis": "sagittal",
                  "normalisation": model_io.NORMALISATION,
                  "multiple_of": 2 ** int(architecture["depth"]),
                  "inplane": "IP",  # rows towards inferior, columns towards posterior
                  **inference_input},
        "training": {"seed": seed, "steps": steps, "batch_size": batch_size,
                     "learning_rate": rate, "threads": threads, "data": data,
                     "augmentation": "SynthSeg-style random contrast per tissue label "
                                     f"({1 - realistic_fraction:.0%}) or generator contrasts "
                                     f"T1w/T2w/PD/T2-prep ({realistic_fraction:.0%}) at "
                                     "random TR / TE per slice (trainset.TIMES_RANGE_S), "
                                     "partial volume over 3-6 mm slices, bias, gamma, "
                                     f"{augment.SPACING_RANGE_MM[0]}-"
                                     f"{augment.SPACING_RANGE_MM[1]} mm in-plane resolution "
                                     f"(point-spread sigma {augment.PSF_SIGMA_RANGE[0]}-"
                                     f"{augment.PSF_SIGMA_RANGE[1]} px), Rician SNR "
                                     f"{augment.SNR_RANGE[0]:g}-{augment.SNR_RANGE[1]:g} "
                                     "(log-uniform), affine + elastic deformation, FOV cuts",
                     "init": str(init) if init else None,
                     "seconds": round(time.perf_counter() - start, 1)},
        "metrics": metrics,
        **inference,
    }
    model_io.save_bundle(model, meta, out)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    log(f"bundle written to {out} ({meta['training']['seconds']:.0f} s)")
    return meta
