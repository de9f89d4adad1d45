"""Synthetic multimodal sites in the on-disk site format (manifest.csv + PNGs + report text).

Each record is a chest-X-ray-like grayscale image and a short clinical note. The label
("pneumonia") is positive only when the image shows an opacity AND the note reports infectious
symptoms: each modality alone carries only part of the answer (AUROC about 0.83 at best), the
two together nearly all of it. Sites differ by Dirichlet(alpha) label skew and unequal sizes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("no_finding", "pneumonia")

_SYMPTOMS_POS = [
    "Patient presents with fever and productive cough.",
    "Reports fever of 39 C and cough for three days.",
    "Febrile with rigors and purulent sputum.",
    "Productive cough, fever and pleuritic chest pain since Monday.",
    "Shortness of breath with fever; crackles heard on auscultation.",
    "Cannot exclude infection: fever and new cough reported.",
    "History suggests infection, with high temperature and chills.",
    "New onset cough with yellow sputum and fever overnight.",
]
_SYMPTOMS_NEG = [
    "No fever. Denies cough.",
    "Afebrile, no respiratory symptoms reported.",
    "Patient denies fever, chills or sputum.",
    "No evidence of infection; temperature normal and no cough.",
    "Routine pre-operative check, asymptomatic.",
    "Negative for fever and cough; mild fatigue only.",
    "Follow-up visit, no complaints, afebrile.",
    "Without fever or sputum; breathing comfortable at rest.",
]
_FILLER = [
    "Known hypertension.",
    "Non-smoker.",
    "Former smoker, 20 pack-years.",
    "Type 2 diabetes on metformin.",
    "Referred by general practitioner.",
    "Allergic to penicillin.",
    "Lives alone, independent.",
    "Recent travel abroad.",
    "",
    "",
]


@dataclass(frozen=True)
class SiteSpec:
    name: str
    num_records: int
    positive_rate: float


def plan_sites(
    *, sites: int, records: int, alpha: float, rng: np.random.Generator
) -> list[SiteSpec]:
    """Sizes vary between 0.5x and 1.5x ``records``; positive rates follow Dirichlet(alpha)."""
    if sites < 1:
        raise ValueError(f"sites must be >= 1; found {sites}")
    if records < 10:
        raise ValueError(f"records must be >= 10; found {records}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; found {alpha}")
    sizes = rng.uniform(0.5, 1.5, size=sites)
    sizes = np.maximum(10, np.round(sizes / sizes.mean() * records)).astype(int)
    # Dirichlet over the two classes; clipped so every site keeps a few of each class and its
    # test split has a defined AUROC.
    rates = np.clip(rng.dirichlet([alpha, alpha], size=sites)[:, 1], 0.1, 0.9)
    return [
        SiteSpec(f"site-{i}", int(n), float(p))
        for i, (n, p) in enumerate(zip(sizes, rates, strict=True))
    ]


def _lung_background(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.full((size, size), 0.75, dtype=np.float32)
    for cx in (0.3, 0.7):  # two darker lung fields
        inside = ((xx - cx) / 0.17) ** 2 + ((yy - 0.52) / 0.36) ** 2 < 1
        img[inside] = 0.25
    for k in range(5):  # faint ribs
        y = 0.25 + 0.11 * k + rng.normal(0, 0.01)
        img += 0.06 * np.exp(-(((yy - y - 0.1 * (xx - 0.5) ** 2) / 0.012) ** 2))
    return img


def make_image(*, lesion: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """A chest-X-ray-like image in [0, 1], with a bright opacity when ``lesion``."""
    img = _lung_background(size, rng)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    if lesion:
        cx = rng.choice([0.3, 0.7]) + rng.uniform(-0.08, 0.08)
        cy = rng.uniform(0.3, 0.75)
        radius = rng.uniform(0.06, 0.12)
        contrast = rng.uniform(0.25, 0.55)
        img += contrast * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))
    img += rng.normal(0, 0.08, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def make_report(*, symptomatic: bool, rng: np.random.Generator) -> str:
    core = rng.choice(_SYMPTOMS_POS if symptomatic else _SYMPTOMS_NEG)
    parts = [str(core), str(rng.choice(_FILLER)), str(rng.choice(_FILLER))]
    rng.shuffle(parts)
    age = int(rng.integers(18, 95))
    return " ".join([f"{age}-year-old {rng.choice(['male', 'female'])}."] + [p for p in parts if p])


def write_site(
    out: Path, spec: SiteSpec, *, rng: np.random.Generator, image_size: int = 64, lacks: str = ""
) -> Path:
    """Write one site folder; returns its path. ``lacks`` names a modality the site has none of
    (``"image"`` or ``"report"``): those cells are left empty, as at a real site without it."""
    site = out / spec.name
    (site / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(spec.num_records):
        positive = bool(rng.random() < spec.positive_rate)
        if positive:
            lesion, symptomatic = True, True
        else:  # one of the three ways of not being a positive case, equally likely
            lesion, symptomatic = [(False, False), (True, False), (False, True)][rng.integers(3)]
        rid = f"{spec.name}-{i:05d}"
        img = make_image(lesion=lesion, size=image_size, rng=rng)
        if lacks != "image":
            Image.fromarray((img * 255).astype(np.uint8), mode="L").save(
                site / "images" / f"{rid}.png"
            )
        report = make_report(symptomatic=symptomatic, rng=rng)
        rows.append(
            {
                "id": rid,
                "image": "" if lacks == "image" else f"images/{rid}.png",
                "report": "" if lacks == "report" else report,
                "label": CLASSES[int(positive)],
            }
        )
    with open(site / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "report", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return site


def generate(
    out: str | Path,
    *,
    sites: int = 3,
    records: int = 600,
    seed: int = 0,
    alpha: float = 1.0,
    image_size: int = 64,
    site_lacks: tuple[str, ...] | list[str] = (),
) -> list[Path]:
    """Write ``sites`` site folders under ``out``; returns their paths in order.

    ``site_lacks[i]`` (optional) is the modality site i lacks entirely ("" for none).
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    specs = plan_sites(sites=sites, records=records, alpha=alpha, rng=rng)
    lacks = list(site_lacks) + [""] * (len(specs) - len(site_lacks))
    out.mkdir(parents=True, exist_ok=True)
    return [
        write_site(out, spec, rng=rng, image_size=image_size, lacks=lack)
        for spec, lack in zip(specs, lacks, strict=False)
    ]
