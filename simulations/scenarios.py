"""Scenario presets: TOML files describing the sites' data, resources and run config.

``fedfuse simulate --scenario NAME|FILE``; command-line flags override scenario values.
A scenario file has an optional ``description`` and three optional tables:
``[data]`` (synthetic sites), ``[resources]`` (per-site CPUs/GPUs) and ``[run]`` (any run-config
key). Unknown keys are rejected with the list of known ones.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

_DATA_KEYS = {
    "sites": int,
    "records": int,
    "alpha": float,
    "seed": int,
    "site-lacks": list,
    "missing-rate": float,
}
_RESOURCE_KEYS = {"cpus-per-site": float, "gpus-per-site": float}
_TOP_KEYS = {"description", "data", "resources", "run"}


@dataclass(frozen=True)
class DataSpec:
    """Synthetic sites to generate (ignored when the user passes ``--data``)."""

    sites: int = 3
    records: int = 1000
    alpha: float = 1.0
    seed: int | None = None  # None: the run's seed
    site_lacks: tuple[str, ...] = ()
    # Share of records lacking one random modality.
    missing_rate: float = 0.0
    # Modalities the synthetic records hold (the run config's, set by the CLI).
    modalities: tuple[str, ...] = ("image", "report")

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ConfigError(f"[data] sites must be >= 1; found {self.sites}")
        if self.records < 10:
            raise ConfigError(f"[data] records must be >= 10; found {self.records}")
        if not self.alpha > 0:
            raise ConfigError(f"[data] alpha must be > 0; found {self.alpha}")
        bad = [x for x in self.site_lacks if x not in ("", "image", "report")]
        if bad:
            raise ConfigError(
                f"[data] site-lacks entries must be '', 'image' or 'report'; found {bad}"
            )

    def folder_name(self, seed: int) -> str:
        """A data folder name that changes whenever the generated data would."""
        spec = json.dumps(
            [
                self.sites,
                self.records,
                self.alpha,
                self.seed_or(seed),
                list(self.site_lacks),
                self.missing_rate,
                list(self.modalities),
            ]
        )
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
        return f"synthetic-{self.sites}x{self.records}-seed{self.seed_or(seed)}-{digest}"

    def seed_or(self, seed: int) -> int:
        return self.seed if self.seed is not None else seed


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    cpus_per_site: float = 1.0
    gpus_per_site: float | None = None
    run: dict[str, Any] = field(default_factory=dict)

    def run_config(self, **overrides: Any) -> RunConfig:
        """The scenario's run config with ``overrides`` (kebab-case keys) on top."""
        return RunConfig.from_mapping({**self.run, **overrides})


def list_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def _check_keys(where: str, got: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(got) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}. Known keys: {sorted(known)}")


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name, or a scenario TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise ConfigError(
                f"Unknown scenario '{name_or_path}'. Built-in: {', '.join(list_scenarios())}; "
                "or give the path of a .toml file"
            )
    if not path.is_file():
        raise ConfigError(f"scenario file '{path}' does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario file '{path}' is not valid TOML: {exc}") from None
    _check_keys(str(path), raw, _TOP_KEYS)
    data_raw = raw.get("data", {})
    res_raw = raw.get("resources", {})
    run_raw = raw.get("run", {})
    _check_keys(f"{path} [data]", data_raw, set(_DATA_KEYS))
    _check_keys(f"{path} [resources]", res_raw, set(_RESOURCE_KEYS))
    try:
        RunConfig.from_mapping(run_raw)  # validates keys and values now, not mid-run
    except ConfigError as exc:
        raise ConfigError(f"{path} [run]: {exc}") from None
    data = DataSpec(
        sites=int(data_raw.get("sites", 3)),
        records=int(data_raw.get("records", 1000)),
        alpha=float(data_raw.get("alpha", 1.0)),
        seed=int(data_raw["seed"]) if "seed" in data_raw else None,
        site_lacks=tuple(str(x) for x in data_raw.get("site-lacks", ())),
        missing_rate=float(data_raw.get("missing-rate", 0.0)),
    )
    gpus = res_raw.get("gpus-per-site")
    return Scenario(
        name=path.stem,
        description=str(raw.get("description", "")),
        data=data,
        cpus_per_site=float(res_raw.get("cpus-per-site", 1.0)),
        gpus_per_site=float(gpus) if gpus is not None else None,
        run=dict(run_raw),
    )


def ensure_data(spec: DataSpec, *, seed: int, root: Path = Path("data")) -> Path:
    """Generate the scenario's synthetic sites once; reuse them when already there."""
    # lazy: loads torch (seconds); the command line imports this module at start-up
    from fedfuse.common.data.synthetic import generate

    out = root / spec.folder_name(seed)
    done = out / ".complete"
    if not done.exists():
        absent = {f"site-{i}": [lack] for i, lack in enumerate(spec.site_lacks) if lack}
        generate(
            out,
            sites=spec.sites,
            records=spec.records,
            seed=spec.seed_or(seed),
            alpha=spec.alpha,
            modalities=spec.modalities,
            missing_rate=spec.missing_rate,
            absent=absent,
        )
        done.write_text("ok\n")
    return out
