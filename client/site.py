"""Where a site's data lives, and the site's privacy state kept across rounds.

In deployment the SuperNode's node config names the folder (``data-path``) and the site
(``site-name``). In simulation, virtual node ``partition-id`` uses the partition-id-th folder
(sorted by name) of the run's ``data-dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from client.training import PrivacyPlan
from common.config import RunConfig
from common.data.dataset import SiteDataset, data_signature, load_site
from common.data.manifest import Manifest
from common.errors import ConfigError
from common.privacy.accounting import DpSgdEvent

STATE_KEY = "fedfuse.privacy"


def simulation_site_dirs(data_dir: str | Path) -> list[Path]:
    """Site folders of a simulation data folder, in the order virtual sites take them."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"data-dir '{root}' is not a folder of site folders")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ConfigError(f"data-dir '{root}' holds no site folders")
    return dirs


@dataclass(frozen=True)
class SiteInfo:
    name: str
    data_path: Path


def resolve_site(node_config: dict[str, Any], cfg: RunConfig) -> SiteInfo:
    """The site this ClientApp serves, from the node config (deployment) or partition id."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        name = str(node_config.get("site-name") or path.name)
        return SiteInfo(name, path)
    if "partition-id" in node_config:
        dirs = simulation_site_dirs(cfg.data_dir)
        pid = int(node_config["partition-id"])
        if pid >= len(dirs):
            raise ConfigError(
                f"virtual site {pid} has no data: data-dir '{cfg.data_dir}' holds only "
                f"{len(dirs)} site folders; run with at most {len(dirs)} sites"
            )
        return SiteInfo(dirs[pid].name, dirs[pid])
    raise ConfigError(
        "node config has no 'data-path': start the SuperNode with "
        "--node-config \"data-path='/path/to/site'\""
    )


# Decoded datasets are cached per worker process: the ClientApp is called once per round.
_DATA_CACHE: dict[tuple[Any, ...], tuple[Manifest, dict[str, SiteDataset]]] = {}


def site_data(site: SiteInfo, cfg: RunConfig) -> tuple[Manifest, dict[str, SiteDataset]]:
    manifest_file = next(
        (
            site.data_path / n
            for n in ("manifest.csv", "manifest.jsonl")
            if (site.data_path / n).exists()
        ),
        site.data_path,
    )
    mtime = manifest_file.stat().st_mtime_ns if manifest_file.exists() else 0
    key = (
        str(site.data_path.resolve()),
        mtime,
        data_signature(cfg),
    )
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_site(site.data_path, cfg)
    return _DATA_CACHE[key]


@dataclass
class PrivacyState:
    """The site's plan and its DP events so far in this run (kept in ``Context.state``)."""

    plan: PrivacyPlan
    events: list[DpSgdEvent]

    @classmethod
    def load(cls, context: Context) -> PrivacyState | None:
        if STATE_KEY not in context.state:
            return None
        rec = context.state[STATE_KEY]
        sig = list(rec["event-noise"])  # type: ignore[arg-type]
        rate = list(rec["event-rate"])  # type: ignore[arg-type]
        steps = list(rec["event-steps"])  # type: ignore[arg-type]
        plan = PrivacyPlan(
            noise_multiplier=float(rec["noise-multiplier"]),  # type: ignore[arg-type]
            sample_rate=float(rec["sample-rate"]),  # type: ignore[arg-type]
            steps_per_round=int(rec["steps-per-round"]),  # type: ignore[arg-type]
            num_rounds=int(rec["num-rounds"]),  # type: ignore[arg-type]
        )
        return cls(
            plan=plan,
            events=[
                DpSgdEvent(float(a), float(b), int(c))
                for a, b, c in zip(sig, rate, steps, strict=True)
            ],
        )

    def save(self, context: Context) -> None:
        context.state[STATE_KEY] = ConfigRecord(
            {
                "noise-multiplier": self.plan.noise_multiplier,
                "sample-rate": self.plan.sample_rate,
                "steps-per-round": self.plan.steps_per_round,
                "num-rounds": self.plan.num_rounds,
                "event-noise": [e.noise_multiplier for e in self.events],
                "event-rate": [e.sample_rate for e in self.events],
                "event-steps": [e.steps for e in self.events],
            }
        )
