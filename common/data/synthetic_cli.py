"""Glue between the ``fedfuse`` command and the synthetic generator (kept out of cli.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.data.synthetic import MODALITIES, TABULAR_COLUMNS, TABULAR_RANGES, generate
from common.errors import ConfigError


def synthetic_defaults(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Run-config keys the synthetic data implies: its lab columns and their reference ranges
    when tabular is used (unless the user set them; DP needs the ranges)."""
    out = dict(raw)
    mods = [m.strip() for m in str(out.get("modalities", RunConfig.modalities)).split(",")]
    if "tabular" in mods:
        if not out.get("tabular-columns"):
            out["tabular-columns"] = ",".join(TABULAR_COLUMNS)
        if not out.get("tabular-ranges"):
            # The generator knows its own columns' ranges: use them for those it made.
            chosen = {c.strip() for c in str(out["tabular-columns"]).split(",")}
            known = [r for r in TABULAR_RANGES.split(",") if r.split("=")[0] in chosen]
            if known:
                out["tabular-ranges"] = ",".join(known)
    return out


def ensure_synthetic(
    cfg: RunConfig,
    *,
    sites: int,
    records: int,
    seed: int,
    missing_rate: float = 0.0,
    say: Callable[[str], Any] = print,
) -> Path:
    """The synthetic data folder for these settings under ``data/``, made if it is missing."""
    mods = [m for m in MODALITIES if m in cfg.modality_names]
    name = f"synthetic-{sites}x{records}-seed{seed}"
    if mods != ["image", "report"]:
        name += "-" + "-".join(mods)
    if missing_rate > 0:
        name += f"-missing{missing_rate:g}"
    data = Path("data") / name
    if not (data / f"site-{sites - 1}" / "manifest.csv").exists():
        say(f"Making synthetic data for {sites} sites in {data} ...")
        generate(
            data,
            sites=sites,
            records=records,
            seed=seed,
            modalities=mods,
            missing_rate=missing_rate,
        )
    return data


def parse_absent(items: list[str]) -> dict[str, list[str]]:
    """``["site-2:audio", "site-0:tabular"]`` -> ``{"site-2": ["audio"], ...}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        site, sep, mod = item.partition(":")
        if not sep or not site.strip() or mod.strip() not in MODALITIES:
            raise ConfigError(
                f"--absent '{item}' must look like SITE:MODALITY with MODALITY one of "
                f"{', '.join(MODALITIES)} (e.g. site-2:audio)"
            )
        out.setdefault(site.strip(), []).append(mod.strip())
    return out
