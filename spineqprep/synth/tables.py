"""Tables and READMEs of both datasets.

Raw: ``participants.tsv``, ``sub-<l>/sub-<l>_sessions.tsv`` (several sessions),
``phenotype/disc_grades.tsv``, each with a JSON data dictionary. Truth: ``discs.tsv``,
``modic.tsv``, ``anatomy.tsv`` (+ JSON) and ``planted_effects.json``. Missing values are ``n/a``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spineqprep.bids.derivatives import atomic_write_json, atomic_write_text
from spineqprep.bids.schema import load_schema
from spineqprep.synth import labels as lab
from spineqprep.synth.anatomy import Anatomy
from spineqprep.synth.cohort import PLANTED_EFFECTS, Participant, Visit, modified_to_pfirrmann
from spineqprep.synth.protocols import PROTOCOLS, site_label, site_protocol


def _format(value: Any) -> str:
    if value is None:
        return load_schema()["tabular"]["na_value"]
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return str(value)


def write_tsv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Rows (same keys) as a TSV with ``n/a`` for ``None``."""
    columns = list(rows[0])
    text = "\t".join(columns) + "\n" + "".join(
        "\t".join(_format(row[c]) for c in columns) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text, path)


def visit_key(person: Participant, visit: Visit, site: str) -> dict[str, Any]:
    key: dict[str, Any] = {"participant_id": f"sub-{person.label}"}
    if visit.session:
        key["session_id"] = f"ses-{visit.session}"
    key["site"] = site
    return key


def modic_rows(person: Participant, visit: Visit) -> list[dict[str, Any]]:
    """One row per Modic lesion (lesions persist over sessions)."""
    rows = []
    for lesion in person.lesions:
        row = {k: v for k, v in visit_key(person, visit, "").items() if k != "site"}
        row.update({
            "vertebra": lab.VERTEBRAE[lesion.vertebra], "half": lesion.half,
            "level": lab.DISCS[lesion.disc], "modic_type": lesion.modic_type,
            "label": lab.modic(lesion.modic_type, lesion.vertebra),
            "depth_mm": lesion.depth_mm, "ap_extent_mm": lesion.ap_extent_mm,
            "lr_extent_mm": lesion.lr_extent_mm})
        rows.append(row)
    return rows


def anatomy_row(anat: Anatomy, person: Participant) -> dict[str, Any]:
    l1, s1, l3 = (lab.VERTEBRAE.index(v) for v in ("L1", "S1", "L3"))
    centre = anat.vertebra_centre(l3)
    return {
        "lordosis_deg": float(np.rad2deg((anat.vert_u[l1] - anat.vert_u[s1]) / anat.radius)),
        "arc_radius_mm": anat.radius, "subcutaneous_fat_mm": person.fat_mm,
        "canal_ap_mm": 2 * anat.canal_half_ap,
        "l3_x_mm": centre[0], "l3_y_mm": centre[1], "l3_z_mm": centre[2],
    }


def _participants_dictionary() -> dict[str, Any]:
    columns = load_schema()["tabular"]["participants.tsv"]["optional"]
    out: dict[str, Any] = {"participant_id": {"Description": "participant label"}}
    extra = {
        "age": {"Description": "age at the first session", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female", "O": "other"}},
        "bmi": {"Description": "body-mass index", "Units": "kg/m^2"},
        "group": {"Description": "clinical group",
                  "Levels": {"control": "no chronic low back pain",
                             "patient": "chronic low back pain"}},
        "site": {"Description": "acquisition site; its protocol is described in README"},
        "odi": {"Description": f"{columns['odi']['description']} at the first session"},
        "vas": {"Description": f"{columns['vas']['description']} (0-10) at the first session"},
    }
    for name in columns:
        out[name] = extra[name]
    return out


def write_raw_tables(raw: Path, people: Sequence[Participant], multi_session: bool) -> None:
    """participants, sessions and disc grades, with their data dictionaries."""
    rows = []
    for p in people:
        first = p.visits[0]
        values = {"age": p.age, "sex": p.sex, "bmi": p.bmi, "group": p.group,
                  "site": site_label(p.site_index), "odi": first.odi, "vas": first.vas}
        rows.append({"participant_id": f"sub-{p.label}",
                     **{k: (None if k in p.missing else v) for k, v in values.items()}})
    write_tsv(rows, raw / "participants.tsv")
    atomic_write_json(_participants_dictionary(), raw / "participants.json")

    if multi_session:
        for p in people:
            write_tsv([{"session_id": f"ses-{v.session}", "months_since_baseline": v.months,
                        "age": round(v.age, 1), "odi": v.odi,
                        "vas": None if "vas" in p.missing else v.vas} for v in p.visits],
                      raw / f"sub-{p.label}" / f"sub-{p.label}_sessions.tsv")
            atomic_write_json({
                "session_id": {"Description": "session label"},
                "months_since_baseline": {"Description": "time since the first session",
                                          "Units": "month"},
                "age": {"Description": "age at the session", "Units": "year"},
                "odi": {"Description": "Oswestry Disability Index (%) at the session"},
                "vas": {"Description": "visual analogue scale of back pain (0-10)"},
            }, raw / f"sub-{p.label}" / f"sub-{p.label}_sessions.json")

    grades = []
    for p in people:
        for v in p.visits:
            for name in lab.SCHEMA_DISCS:
                grade = v.discs[lab.DISCS.index(name)].modified_pfirrmann
                row: dict[str, Any] = {"participant_id": f"sub-{p.label}"}
                if multi_session:
                    row["session_id"] = f"ses-{v.session}"
                unreadable = p.index == 1 and v is p.visits[0] and name == lab.SCHEMA_DISCS[0]
                row.update({"level": name,
                            "pfirrmann": None if unreadable else modified_to_pfirrmann(grade),
                            "modified_pfirrmann": grade})
                grades.append(row)
    write_tsv(grades, raw / "phenotype" / "disc_grades.tsv")
    dictionary: dict[str, Any] = {
        "participant_id": {"Description": "participant label"},
        "session_id": {"Description": "session label"},
        "level": {"Description": "intervertebral disc level",
                  "Levels": {d: f"disc between {d[:2]} and {d[2:]}" for d in lab.SCHEMA_DISCS}},
        "pfirrmann": {"Description": "Pfirrmann grade of disc degeneration (1-5), read on "
                                     "sagittal T2w"},
        "modified_pfirrmann": {"Description": "modified Pfirrmann grade (1-8)"},
    }
    if not multi_session:
        del dictionary["session_id"]
    atomic_write_json(dictionary, raw / "phenotype" / "disc_grades.json")


_SECONDS = {"Units": "s"}
_DISCS_DICTIONARY: dict[str, Any] = {
    "participant_id": {"Description": "participant label"},
    "session_id": {"Description": "session label"},
    "site": {"Description": "acquisition site"},
    "level": {"Description": "disc level"},
    "pfirrmann": {"Description": "true Pfirrmann grade (1-5)"},
    "modified_pfirrmann": {"Description": "true modified Pfirrmann grade (1-8); drives disc "
                                          "height, nucleus T2/T1rho and PD"},
    "t1rho_phase": {"Description": "T1rho degeneration phase (METHODS 4) of "
                                   "nucleus_t1rho_center: 1 > 110 ms, 2 80-110 ms, 3 < 80 ms"},
    "disc_height_mm": {"Description": "central (maximal) disc height", "Units": "mm"},
    "disc_volume_mm3": {"Description": "nucleus + annulus volume", "Units": "mm^3"},
    "nucleus_volume_mm3": {"Description": "nucleus volume (nucleus fraction >= 0.5)",
                           "Units": "mm^3"},
    "nucleus_t1rho": {"Description": "model T1rho at the nucleus centre (the value the planted "
                                     "clinical associations use)", **_SECONDS},
    "nucleus_t2": {"Description": "model T2 at the nucleus centre", **_SECONDS},
    "nucleus_t1rho_center": {"Description": "mean T1rho of the central mid-sagittal nucleus "
                                            "region (ellipse of at most 1 cm^2)", **_SECONDS},
    "nucleus_t1rho_mean": {"Description": "mean T1rho over the nucleus label", **_SECONDS},
    "nucleus_t2_mean": {"Description": "mean T2 over the nucleus label", **_SECONDS},
    "nucleus_t2star_mean": {"Description": "mean T2* over the nucleus label", **_SECONDS},
    "annulus_t1rho_mean": {"Description": "mean T1rho over the annulus label", **_SECONDS},
    "annulus_t2_mean": {"Description": "mean T2 over the annulus label", **_SECONDS},
    "disc_t1rho_mean": {"Description": "mean T1rho over the whole disc", **_SECONDS},
    "disc_t2_mean": {"Description": "mean T2 over the whole disc", **_SECONDS},
    "cep_sup_t2star": {"Description": "model T2* of the superior cartilage endplate",
                       **_SECONDS},
    "cep_inf_t2star": {"Description": "model T2* of the inferior cartilage endplate",
                       **_SECONDS},
    "cep_sup_t2star_mean": {"Description": "mean T2* over the superior endplate label",
                            **_SECONDS},
    "cep_inf_t2star_mean": {"Description": "mean T2* over the inferior endplate label",
                            **_SECONDS},
    "cep_sup_thickness_mm": {"Description": "superior endplate thickness", "Units": "mm"},
    "cep_inf_thickness_mm": {"Description": "inferior endplate thickness", "Units": "mm"},
}


def write_truth_tables(truth: Path, discs: list[dict[str, Any]], modic: list[dict[str, Any]],
                       anatomy: list[dict[str, Any]]) -> None:
    """discs, modic and anatomy tables with dictionaries, and the planted effects."""
    write_tsv(discs, truth / "discs.tsv")
    atomic_write_json({k: _DISCS_DICTIONARY[k] for k in discs[0]}, truth / "discs.json")
    columns = ["participant_id", *(["session_id"] if "session_id" in discs[0] else []),
               "vertebra", "half", "level", "modic_type", "label", "depth_mm", "ap_extent_mm",
               "lr_extent_mm"]
    if modic:
        write_tsv(modic, truth / "modic.tsv")
    else:
        atomic_write_text("\t".join(columns) + "\n", truth / "modic.tsv")
    atomic_write_json({
        "vertebra": {"Description": "vertebra holding the lesion"},
        "half": {"Description": "half of the vertebra (upper: next to the disc below it)"},
        "level": {"Description": "the adjacent disc"},
        "modic_type": {"Description": "1 oedema (T1 hypo, T2 hyper), 2 fat (T1 hyper, T2 "
                                      "iso-hyper), 3 sclerosis (hypo on both)"},
        "label": {"Description": "index in desc-tissues_dseg (see dseg.tsv)"},
        "depth_mm": {"Description": "extent from the endplate into the vertebra", "Units": "mm"},
        "ap_extent_mm": {"Description": "antero-posterior semi-axis", "Units": "mm"},
        "lr_extent_mm": {"Description": "left-right semi-axis", "Units": "mm"},
    }, truth / "modic.json")
    write_tsv(anatomy, truth / "anatomy.tsv")
    atomic_write_json({
        "lordosis_deg": {"Description": "angle of the lordotic arc between the L1 and S1 "
                                        "centres", "Units": "degree"},
        "arc_radius_mm": {"Description": "radius of the lordotic arc", "Units": "mm"},
        "subcutaneous_fat_mm": {"Description": "subcutaneous fat thickness (from BMI)",
                                "Units": "mm"},
        "canal_ap_mm": {"Description": "antero-posterior diameter of the canal", "Units": "mm"},
        "l3_x_mm": {"Description": "scanner (RAS) position of the L3 body centre", "Units": "mm"},
    }, truth / "anatomy.json")
    atomic_write_json(PLANTED_EFFECTS, truth / "planted_effects.json")


def _describe_site(index: int) -> str:
    site = site_protocol(index)
    lines = [f"- site {site_label(index)}: {site.manufacturer} {site.model} "
             f"{site.field_strength:g} T, voxel axes {site.axcodes} (oblique "
             f"{', '.join(f'{a:g}' for a in site.oblique_deg)} deg), stored as {site.storage}"
             + (f" with scl_slope {site.scl_slope:g}" if site.storage == "int16" else "")]
    for acq in site.acquisitions:
        for s in acq.series:
            times = "/".join(f"{t * 1000:g}" for t in s.times_s)
            lines.append(f"  - acq-{acq.acq} {s.suffix}: {times} ms, "
                         f"{acq.grid.fov_mm[0]:g} x {acq.grid.fov_mm[1]:g} mm field of view, "
                         f"{acq.grid.slice_mm:g} mm slices, SNR {s.snr:g}")
    return "\n".join(lines)


def raw_readme(people: Sequence[Participant], n_sites: int, truth_name: str,
               command: str) -> str:
    sites = "\n".join(_describe_site(i) for i in range(n_sites))
    return f"""# spineqprep synthetic lumbar spine dataset

Synthetic data made by `{command}` (spineqprep). {len(people)} participants,
{len(people[0].visits)} session(s) each, {n_sites} site(s); protocols cycle through
{len(PROTOCOLS)} site types:

{sites}

Every participant has sagittal T1w and T2w (acq-sag). Relaxometry series: MESE (T2),
MESL (T1rho, spine extension of BIDS; listed in .bidsignore) and MEGRE (UTE T2*), one file per
echo / spin-lock time. Images are noisy (Rician) samples of a continuous 3D anatomy; the exact
per-voxel truth (T2, T1rho, T2*, proton density, segmentations, disc grades, planted clinical
associations) is in the separate derivatives dataset `{truth_name}` next to this one.

The MAPSS T2 series store EchoTime = T2-prep time + 1.2 ms readout (BIDS needs EchoTime > 0);
the published T2-prep times 0/12/25/51 ms are in T2PrepTime.
"""


def truth_readme(raw_name: str, command: str) -> str:
    return f"""# Ground truth of the synthetic dataset `{raw_name}`

Made by `{command}`. For each series, on that series' grid, the exact maps the signal was
computed from (seconds): `_acq-<label>_T2map`, `_T1rho`, `_T2starmap`; proton density
`_PDmap` (S0 of every series = Gain x PD, Gain and noise SD in the map sidecars); labels
`_dseg` (schema numbering: vertebral bodies and whole discs) and `_desc-tissues_dseg` (nucleus,
annulus, superior/inferior cartilage endplates, Modic lesions, canal, muscle, fat, ...), all
listed in `dseg.tsv`. Values are 0 in air.

Tables: `discs.tsv` (grades, T1rho phase, height, volumes, model and mean relaxation times per
disc), `modic.tsv` (lesions), `anatomy.tsv` (shape and position), `planted_effects.json` (the
associations between clinical variables and the maps, with their formulas and coefficients).
"""
