"""A SuperNode's node config, parsed once into a frozen, validated dataclass.

Only the site sets these (``flower-supernode --node-config "k=v ..."``, written by ``fedfuse
site run``); the server never sees them. In a simulation Flower sets ``partition-id`` and
``num-partitions`` for each virtual site instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedfuse.common.errors import ConfigError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class NodeConfig:
    """Every node-config key a site may set."""

    # The site's data folder; its privacy state lives in ``<data-path>/.fedfuse``.
    data_path: Path | None = None
    # The name the site reports (default: its folder's name).
    site_name: str | None = None
    # The ledger's file, when it must live outside the data folder.
    ledger_path: Path | None = None
    # The site's lifetime budget over its data, all runs together (None: its site file's, else
    # not capped), and its delta (None: the site file's, else client/budget.py's default).
    epsilon_budget: float | None = None
    delta: float | None = None
    # Refuse any round the server asks for without secure aggregation.
    require_secagg: bool = False
    # Send this site's own evaluation figures in the clear (outside any epsilon).
    share_site_metrics: bool = False
    # Set by Flower's simulation engine for a virtual site.
    partition_id: int | None = None
    num_partitions: int | None = None

    @property
    def simulated(self) -> bool:
        """A virtual site of a simulation (Flower gave it a partition id)."""
        return self.partition_id is not None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> NodeConfig:
        """Validate ``raw`` (Flower's ``context.node_config``); one ConfigError line naming the
        key, what it must be and what it is, for an unknown key or a bad value."""
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"node config: unknown key(s) {unknown}; known keys: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            values[known[key]] = _PARSERS[key](key, value)
        return cls(**values)


def _path(key: str, value: Any) -> Path:
    text = str(value).strip()
    if not text:
        raise ConfigError(f"node config: '{key}' must be a path; found {value!r}")
    return Path(text).expanduser()


def _text(key: str, value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ConfigError(f"node config: '{key}' must not be empty; found {value!r}")
    return text


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"node config: '{key}' must be true or false; found {value!r}")


def _number(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number) or isinstance(value, bool):
        raise ConfigError(f"node config: '{key}' must be a number; found {value!r}")
    return number


def _index(key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0 or isinstance(value, bool) or float(value) != number:
        raise ConfigError(f"node config: '{key}' must be an integer >= 0; found {value!r}")
    return number


_PARSERS = {
    "data-path": _path,
    "site-name": _text,
    "ledger-path": _path,
    "epsilon-budget": _number,
    "delta": _number,
    "require-secagg": _flag,
    "share-site-metrics": _flag,
    "partition-id": _index,
    "num-partitions": _index,
}
