"""Synthetic multimodal sites in the on-disk site format (manifest.csv + files).

Each record may hold a chest-X-ray-like grayscale image, a short clinical note, a heart-sound
recording (WAV) and lab values (``tab.crp``, ``tab.wbc``, ``tab.temp``). Each modality shows one
finding: an opacity (image), infectious symptoms (note), a systolic murmur (audio), raised
inflammation markers (labs). The label ("pneumonia", i.e. the positive class) is positive when
a majority of the generated modalities show their finding: with the default image + report
that is both (each alone reaches an AUROC of about 0.83 at best, the two together nearly 1);
with all four it is at least three. So no single modality predicts the label well.
Sites differ by Dirichlet(alpha) label skew, unequal sizes, audio sample rate (and one records
in stereo), and optionally by a rate of records missing one modality, or a modality absent.
"""

from __future__ import annotations

import csv
import itertools
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fedfuse.common.privacy.site_secret import write_synthetic_secret

CLASSES = ("no_finding", "pneumonia")
MODALITIES = ("image", "report", "audio", "tabular")
TABULAR_COLUMNS = ("crp", "wbc", "temp")
# Reference ranges for the run config's tabular-ranges. Under label skew, standardising with
# each site's own mean/std would move a "raised" CRP to 0 at a site where most patients are
# ill: fixed clinical ranges keep a value's meaning the same at every site.
TABULAR_RANGES = "crp=0:200,wbc=0:25,temp=35:41"
# Sample rate of each site's recordings, by site index (cycled): several rates on purpose.
AUDIO_RATES = (4000, 8000, 2000)
AUDIO_SECONDS = 2.0
# Share of lab values missing even in records that have labs.
LAB_MISSING = 0.08

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
    # Share of records that lack one (random) of their modalities.
    missing_rate: float = 0.0
    # Modalities this site does not have at all.
    absent: tuple[str, ...] = field(default_factory=tuple)


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


def finding_combos(m: int) -> tuple[list[tuple[bool, ...]], list[tuple[bool, ...]]]:
    """(positive, negative) finding patterns over ``m`` modalities; positive = a majority.

    Ordered so that for two modalities the negatives are (none, first only, second only), the
    order the original two-modality generator drew them in (same data for the same seed).
    """
    need = m // 2 + 1
    combos = sorted(
        itertools.product([False, True], repeat=m),
        key=lambda c: (sum(c), tuple(not x for x in c)),
    )
    return [c for c in combos if sum(c) >= need], [c for c in combos if sum(c) < need]


def make_heart_sound(
    *, murmur: bool, rate: int, seconds: float, rng: np.random.Generator
) -> np.ndarray:
    """A phonocardiogram-like signal in [-1, 1]: S1/S2 "lub-dub" per beat, and a
    crescendo-decrescendo systolic murmur (band-limited noise, 150-400 Hz) when ``murmur``."""
    n = int(round(rate * seconds))
    t = np.arange(n) / rate
    x = np.zeros(n)
    period = 60.0 / rng.uniform(60, 100)
    systole = rng.uniform(0.28, 0.34)
    murmur_amp = rng.uniform(0.2, 0.4)
    freqs = rng.uniform(150, min(400, rate / 2 - 1), size=16)
    phases = rng.uniform(0, 2 * np.pi, size=16)
    noise = np.sin(2 * np.pi * freqs[:, None] * t[None, :] + phases[:, None]).sum(0) / 4
    beat = rng.uniform(0, period) - period
    while beat < seconds:
        for onset, f0, amp in (
            (beat, rng.uniform(40, 60), 1.0),
            (beat + systole, rng.uniform(60, 90), 0.7),
        ):
            d = t - onset
            on = (d >= 0) & (d < 0.12)
            x[on] += amp * np.exp(-d[on] / 0.03) * np.sin(2 * np.pi * f0 * d[on])
        if murmur:
            a, b = beat + 0.07, beat + systole - 0.03
            on = (t >= a) & (t < b)
            x[on] += murmur_amp * np.sin(np.pi * (t[on] - a) / (b - a)) * noise[on]
        beat += period
    x += rng.normal(0, 0.03, n)
    return (x / np.abs(x).max() * rng.uniform(0.4, 0.9)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM WAV with the stdlib; ``samples`` is ``(n,)`` or ``(n, channels)``."""
    samples = samples.reshape(len(samples), -1)
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def make_labs(*, inflamed: bool, rng: np.random.Generator) -> dict[str, float]:
    """CRP (mg/L), white cell count (10^9/L) and temperature (C); raised when ``inflamed``."""
    if inflamed:
        crp, wbc, temp = (
            rng.lognormal(np.log(45), 0.7),
            rng.normal(12.5, 2.5),
            rng.normal(38.1, 0.6),
        )
    else:
        crp, wbc, temp = rng.lognormal(np.log(5), 0.8), rng.normal(7.5, 1.8), rng.normal(36.9, 0.4)
    return {
        "crp": round(float(crp), 1),
        "wbc": round(float(max(wbc, 0.5)), 1),
        "temp": round(float(temp), 1),
    }


def write_site(
    out: Path,
    spec: SiteSpec,
    *,
    rng: np.random.Generator,
    image_size: int = 64,
    modalities: Sequence[str] = ("image", "report"),
    audio_rate: int = 4000,
    stereo: bool = False,
) -> Path:
    """Write one site folder; returns its path."""
    mods = tuple(m for m in MODALITIES if m in modalities)
    positives, negatives = finding_combos(len(mods))
    site = out / spec.name
    site.mkdir(parents=True, exist_ok=True)
    for m, sub in (("image", "images"), ("audio", "audio")):
        if m in mods and m not in spec.absent:
            (site / sub).mkdir(exist_ok=True)
    rows = []
    for i in range(spec.num_records):
        positive = bool(rng.random() < spec.positive_rate)
        pool = positives if positive else negatives
        findings = dict(
            zip(mods, pool[rng.integers(len(pool))] if len(pool) > 1 else pool[0], strict=True)
        )
        rid = f"{spec.name}-{i:05d}"
        row: dict[str, object] = {"id": rid}
        if "image" in mods:
            img = make_image(lesion=findings["image"], size=image_size, rng=rng)
            if "image" not in spec.absent:
                Image.fromarray((img * 255).astype(np.uint8), mode="L").save(
                    site / "images" / f"{rid}.png"
                )
                row["image"] = f"images/{rid}.png"
        if "report" in mods:
            report = make_report(symptomatic=findings["report"], rng=rng)
            if "report" not in spec.absent:
                row["report"] = report
        if "audio" in mods:
            sound = make_heart_sound(
                murmur=findings["audio"], rate=audio_rate, seconds=AUDIO_SECONDS, rng=rng
            )
            if stereo:  # two slightly different channels, as from a two-head stethoscope
                sound = np.stack([sound, 0.8 * sound + rng.normal(0, 0.01, len(sound))], axis=1)
            if "audio" not in spec.absent:
                write_wav(site / "audio" / f"{rid}.wav", sound, audio_rate)
                row["audio"] = f"audio/{rid}.wav"
        if "tabular" in mods:
            labs = make_labs(inflamed=findings["tabular"], rng=rng)
            if "tabular" not in spec.absent:
                for k, v in labs.items():
                    if rng.random() >= LAB_MISSING:
                        row[f"tab.{k}"] = v
        present = [m for m in mods if _has(row, m)]
        if spec.missing_rate > 0 and len(present) > 1 and rng.random() < spec.missing_rate:
            _drop(row, present[rng.integers(len(present))], site)
        row["label"] = CLASSES[int(positive)]
        rows.append(row)
    columns = ["id"] + [c for m in mods for c in _columns(m) if m not in spec.absent] + ["label"]
    with open(site / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return site


def _columns(modality: str) -> list[str]:
    if modality == "tabular":
        return [f"tab.{c}" for c in TABULAR_COLUMNS]
    return [modality]


def _has(row: Mapping[str, object], modality: str) -> bool:
    return any(c in row for c in _columns(modality))


def _drop(row: dict[str, object], modality: str, site: Path) -> None:
    """Remove a modality from a record (and its file: a missing modality has no file)."""
    for c in _columns(modality):
        value = row.pop(c, None)
        if c in ("image", "audio") and value:
            (site / str(value)).unlink()


def generate(
    out: str | Path,
    *,
    sites: int = 3,
    records: int = 600,
    seed: int = 0,
    alpha: float = 1.0,
    image_size: int = 64,
    modalities: Sequence[str] = ("image", "report"),
    missing_rate: float | Sequence[float] = 0.0,
    absent: Mapping[str, Sequence[str]] | None = None,
) -> list[Path]:
    """Write ``sites`` site folders under ``out``; returns their paths in order.

    Args:
        modalities: which of image, report, audio, tabular the records hold.
        missing_rate: share of records lacking one random modality; one value for every site
            or one per site.
        absent: site name -> modalities that site lacks entirely (e.g. ``{"site-2": ["audio"]}``).
    """
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities must be among {list(MODALITIES)}; found {list(modalities)}")
    rates = (
        [float(missing_rate)] * sites
        if isinstance(missing_rate, (int, float))
        else [float(r) for r in missing_rate]
    )
    if len(rates) != sites or not all(0.0 <= r <= 1.0 for r in rates):
        raise ValueError(
            f"missing_rate must be in [0, 1], one value or one per site; found {rates}"
        )
    absent = dict(absent or {})
    out = Path(out)
    rng = np.random.default_rng(seed)
    specs = plan_sites(sites=sites, records=records, alpha=alpha, rng=rng)
    names = {s.name for s in specs}
    for name, mods in absent.items():
        if name not in names or any(m not in modalities for m in mods):
            raise ValueError(f"absent: unknown site {name!r} or modality in {list(mods)}")
        if set(modalities) <= set(mods):
            raise ValueError(f"absent: site {name!r} would have no modality left")
    specs = [
        SiteSpec(s.name, s.num_records, s.positive_rate, r, tuple(absent.get(s.name, ())))
        for s, r in zip(specs, rates, strict=True)
    ]
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        write_site(
            out,
            spec,
            rng=rng,
            image_size=image_size,
            modalities=modalities,
            audio_rate=AUDIO_RATES[i % len(AUDIO_RATES)],
            stereo=i % 3 == 1,
        )
        for i, spec in enumerate(specs)
    ]
    for path in paths:
        # Synthetic data only: the site's DP secret follows from the public seed, so that a
        # simulation is reproducible (a real site's secret is random; common/privacy/site_secret).
        write_synthetic_secret(path, seed=seed, site=path.name)
    return paths
