"""``fedfuse data check``: validate a site folder without changing it, and summarise it.

Every problem is reported at once, one line each (``manifest.csv:LINE: field: reason``):
missing files, images / DICOMs / WAVs that do not decode, empty report files, unknown labels,
several labels in a single-label task, duplicate or empty ids, non-numeric tabular values.
Files are only ever opened for reading.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedfuse.common.data.manifest import SPLITS, Manifest, load_manifest
from fedfuse.common.errors import DataValidationError


def check_site(
    site_dir: str | Path,
    *,
    classes: tuple[str, ...] | None,
    multi_label: bool | None = None,
    dicom_frame: int = 0,
) -> Manifest:
    """Validate ``site_dir`` (decoding every file); raises DataValidationError listing all."""
    m = load_manifest(
        site_dir,
        classes=classes,
        multi_label=multi_label,
        dicom_frame=dicom_frame,
        check_files=True,
    )
    check_trainable(m)
    return m


def check_trainable(m: Manifest) -> None:
    """Raise unless the site has records to train on (else every round fails at the site)."""
    if not m.split("train"):
        counts = ", ".join(f"{s} {len(m.split(s))}" for s in SPLITS)
        raise DataValidationError(
            [
                f"{m.path.name}: no record in the train split ({counts}); give some rows "
                "split=train, or leave the split column empty for a seeded split"
            ],
            source=str(m.path),
        )


def summary_lines(m: Manifest) -> list[str]:
    """A one-screen summary of a valid site: records, splits, modalities, labels, tabular."""
    n = len(m.records)
    lines = [f"{m.path}: {n} records, all valid"]
    lines.append("splits: " + ", ".join(f"{s} {len(m.split(s))}" for s in SPLITS))
    present = m.modalities_present()
    lines.append(
        "modalities present: "
        + ", ".join(f"{k} {v} ({100 * v / n:.0f}%)" for k, v in present.items() if v)
    )
    lacking = [k for k, v in present.items() if not v]
    if lacking:
        lines.append("modalities absent: " + ", ".join(lacking))
    complete = sum(
        1
        for r in m.records
        if all(
            (k == "image" and r.image is not None)
            or (k == "report" and r.report is not None)
            or (k == "audio" and r.audio is not None)
            or (k == "tabular" and bool(r.tabular))
            for k, v in present.items()
            if v
        )
    )
    lines.append(f"records with every present modality: {complete} ({100 * complete / n:.0f}%)")
    lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in m.label_counts().items()))
    multi = sum(1 for r in m.records if len(r.labels) > 1)
    if multi:
        lines.append(f"multi-label records: {multi}")
    for col in m.tabular_columns:
        vals = [r.tabular[col] for r in m.records if col in r.tabular]
        if vals:
            mean = math.fsum(vals) / len(vals)
            lines.append(
                f"tab.{col}: {len(vals)} values, min {min(vals):.4g}, mean {mean:.4g}, "
                f"max {max(vals):.4g}"
            )
        else:
            lines.append(f"tab.{col}: no values")
    return lines
