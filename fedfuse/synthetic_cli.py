"""Glue between the ``fedfuse`` command and the synthetic generator (kept out of cli.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedfuse.common.config import RunConfig
from fedfuse.common.data.synthetic import MODALITIES, TABULAR_COLUMNS, TABULAR_RANGES
from fedfuse.common.errors import ConfigError


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
