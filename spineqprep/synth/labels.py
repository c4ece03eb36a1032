"""Label numbering of the synthetic truth segmentations.

Two label images are written on every grid:

- ``_dseg``: the schema's convention (SPINEPS/VerSe numbering, ``anatomy.dseg_labels`` of
  ``spine-bids.json``): vertebral bodies T12 = 19 ... L5 = 24, S1 (sacrum) = 26, Modic lesions
  included; whole discs = vertebra above + 100 (L1L2 = 120 ... L5S1 = 124); everything else 0.
  This is what a segmentation is compared with. The modelled column also holds T11 (18) and
  the discs T11T12 (118) and T12L1 (119) above the schema's levels, numbered the same way.
- ``_desc-tissues_dseg``: every modelled structure. The last two digits are always the level
  label above; the hundreds give the structure: disc + 100 nucleus pulposus (218-224),
  + 200 annulus fibrosus (318-324), + 300 superior cartilage endplate (418-424), + 400
  inferior cartilage endplate (518-524); vertebra + 600/700/800 Modic type 1/2/3 lesion in that
  vertebra (619-626, 719-726, 819-826); 1-5 surrounding tissues. 0 is background (air).

"Superior" endplate of a disc = the cartilage endplate between the disc and the vertebra above.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spineqprep.bids.schema import load_schema

SOFT, FAT, MUSCLE, CANAL, POSTERIOR = 1, 2, 3, 4, 5
MAX_LABEL = 899

_SCHEMA = load_schema()
#: Vertebrae and discs the schema reports on, superior to inferior.
SCHEMA_VERTEBRAE: tuple[str, ...] = tuple(_SCHEMA["anatomy"]["vertebrae"])
SCHEMA_DISCS: tuple[str, ...] = tuple(_SCHEMA["anatomy"]["discs"])
#: The modelled column: one more vertebra and two more discs above the schema's levels; disc
#: ``k`` lies between vertebra ``k`` (above) and ``k + 1`` (below). S1 stands for the sacrum.
VERTEBRAE = ("T11", *SCHEMA_VERTEBRAE)
DISCS = ("T11T12", "T12L1", *SCHEMA_DISCS)
_INDEX = {row["abbreviation"]: int(row["index"]) for row in _SCHEMA["anatomy"]["dseg_labels"]}
_INDEX.update({"T11": _INDEX["T12"] - 1, "T11T12": _INDEX["T12"] + 99,
               "T12L1": _INDEX["T12"] + 100})
_MODIC_NAMES = {1: "oedema", 2: "fatty", 3: "sclerotic"}


def vertebra(j: int) -> int:
    """Label of vertebra ``VERTEBRAE[j]``."""
    return _INDEX[VERTEBRAE[j]]


def disc(k: int) -> int:
    """Whole-disc label of ``DISCS[k]`` (``_dseg`` only)."""
    return _INDEX[DISCS[k]]


def nucleus(k: int) -> int:
    return disc(k) + 100


def annulus(k: int) -> int:
    return disc(k) + 200


def cep_superior(k: int) -> int:
    return disc(k) + 300


def cep_inferior(k: int) -> int:
    return disc(k) + 400


def modic(modic_type: int, j: int) -> int:
    """Label of a Modic type 1-3 lesion in vertebra ``VERTEBRAE[j]``."""
    return vertebra(j) + 500 + 100 * modic_type


def is_disc(labels: np.ndarray) -> np.ndarray:
    """Nucleus or annulus voxels."""
    return (labels >= nucleus(0)) & (labels < cep_superior(0))


def tissue_classes() -> dict[int, str]:
    """Detailed label -> tissue class (the keys of ``tissues._CLASS_VALUES`` and disc parts)."""
    classes = {0: "background", SOFT: "soft", FAT: "fat", MUSCLE: "muscle", CANAL: "csf",
               POSTERIOR: "posterior"}
    for j in range(len(VERTEBRAE)):
        classes[vertebra(j)] = "marrow"
        for t in (1, 2, 3):
            classes[modic(t, j)] = f"mc{t}"
    for k in range(len(DISCS)):
        classes[nucleus(k)] = "nucleus"
        classes[annulus(k)] = "annulus"
        classes[cep_superior(k)] = classes[cep_inferior(k)] = "cep"
    return classes


def _main_lookup() -> np.ndarray:
    """Detailed label -> ``_dseg`` label (vertebra incl. lesions, whole disc, else 0)."""
    table = np.zeros(MAX_LABEL + 1, np.uint8)
    for j in range(len(VERTEBRAE)):
        table[vertebra(j)] = vertebra(j)
        for t in (1, 2, 3):
            table[modic(t, j)] = vertebra(j)
    for k in range(len(DISCS)):
        table[nucleus(k)] = table[annulus(k)] = disc(k)
    return table


_MAIN = _main_lookup()


def main_labels(detailed: np.ndarray) -> np.ndarray:
    """The ``_dseg`` image of a ``_desc-tissues_dseg`` image."""
    return _MAIN[detailed]


def dseg_rows() -> list[dict[str, Any]]:
    """Rows of the truth ``dseg.tsv``: every index of either label image, with the images
    (``dseg`` / ``desc-tissues``) it occurs in."""
    both, tissues, main = "dseg desc-tissues", "desc-tissues", "dseg"
    rows = [
        {"index": SOFT, "name": "other soft tissue", "abbreviation": "ST", "image": tissues},
        {"index": FAT, "name": "subcutaneous fat", "abbreviation": "FAT", "image": tissues},
        {"index": MUSCLE, "name": "muscle", "abbreviation": "MUS", "image": tissues},
        {"index": CANAL, "name": "spinal canal (CSF)", "abbreviation": "CAN", "image": tissues},
        {"index": POSTERIOR, "name": "posterior elements", "abbreviation": "PE",
         "image": tissues},
    ]
    for j, name in enumerate(VERTEBRAE):
        rows.append({"index": vertebra(j), "name": f"vertebral body {name}",
                     "abbreviation": name, "image": both})
    for k, name in enumerate(DISCS):
        split = 3 if name.startswith("T") else 2
        rows.append({"index": disc(k), "name": f"intervertebral disc {name[:split]}-{name[split:]}",
                     "abbreviation": name, "image": main})
    for k, name in enumerate(DISCS):
        rows += [
            {"index": nucleus(k), "name": f"nucleus pulposus {name}",
             "abbreviation": f"NP_{name}", "image": tissues},
            {"index": annulus(k), "name": f"annulus fibrosus {name}",
             "abbreviation": f"AF_{name}", "image": tissues},
            {"index": cep_superior(k), "name": f"superior cartilage endplate {name}",
             "abbreviation": f"CEPsup_{name}", "image": tissues},
            {"index": cep_inferior(k), "name": f"inferior cartilage endplate {name}",
             "abbreviation": f"CEPinf_{name}", "image": tissues},
        ]
    for t in (1, 2, 3):
        for j, name in enumerate(VERTEBRAE):
            rows.append({"index": modic(t, j),
                         "name": f"Modic type {t} ({_MODIC_NAMES[t]}) lesion in {name}",
                         "abbreviation": f"MC{t}_{name}", "image": tissues})
    return sorted(rows, key=lambda r: r["index"])
