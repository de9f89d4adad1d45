"""Where a site's data lives (its privacy state lives in its ledger: fedfuse.client.budget).

In deployment the SuperNode's node config names the folder (``data-path``) and the site
(``site-name``). In simulation, virtual node ``partition-id`` uses the partition-id-th folder
(sorted by name) of the run's ``data-dir``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfuse.client.node_config import NodeConfig
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import SiteDataset, data_signature, load_site
from fedfuse.common.data.manifest import Manifest
from fedfuse.common.errors import ConfigError


def simulation_site_dirs(data_dir: str | Path, *, holdout: str = "") -> list[Path]:
    """Site folders of a simulation data folder, in the order virtual sites take them; the
    held-out site (run config ``holdout-site``) is not among them: it never trains."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"data-dir '{root}' is not a folder of site folders")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ConfigError(f"data-dir '{root}' holds no site folders")
    if holdout:
        holdout_dir(root, holdout)
        dirs = [d for d in dirs if d.name != holdout]
    return dirs


def holdout_dir(data_dir: str | Path, name: str) -> Path:
    """The held-out site's folder, or a ConfigError in one line naming the known sites."""
    root = Path(data_dir)
    sites = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if name not in sites:
        raise ConfigError(
            f"--holdout-site '{name}': data folder '{root}' has no site folder of that name "
            f"(its sites: {', '.join(sites) or 'none'})"
        )
    if len(sites) < 2:
        raise ConfigError(
            f"--holdout-site '{name}': it is the only site in '{root}'; no site would train"
        )
    return root / name


@dataclass(frozen=True)
class SiteInfo:
    name: str
    data_path: Path


def resolve_site(node: NodeConfig, cfg: RunConfig) -> SiteInfo:
    """The site this ClientApp serves, from the node config (deployment) or partition id."""
    if node.data_path is not None:
        return SiteInfo(node.site_name or node.data_path.name, node.data_path)
    if node.partition_id is not None:
        dirs = simulation_site_dirs(cfg.data_dir, holdout=cfg.holdout_site)
        pid = node.partition_id
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


def manifest_file(site: SiteInfo) -> Path:
    """The site's manifest (csv or jsonl); the folder itself when it has none."""
    return next(
        (
            site.data_path / n
            for n in ("manifest.csv", "manifest.jsonl")
            if (site.data_path / n).exists()
        ),
        site.data_path,
    )


def manifest_digest(site: SiteInfo) -> str:
    """SHA-256 of the site's manifest (which records, labels and files it trains on)."""
    path = manifest_file(site)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def site_data(site: SiteInfo, cfg: RunConfig) -> tuple[Manifest, dict[str, SiteDataset]]:
    manifest_file_ = manifest_file(site)
    mtime = manifest_file_.stat().st_mtime_ns if manifest_file_.exists() else 0
    key = (
        str(site.data_path.resolve()),
        mtime,
        data_signature(cfg),
    )
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_site(site.data_path, cfg)
    return _DATA_CACHE[key]
