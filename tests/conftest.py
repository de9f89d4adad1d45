"""Shared fixtures: tiny synthetic sites and a small, fast run config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.common.data.synthetic import generate  # noqa: E402


@pytest.fixture(scope="session")
def synth_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small synthetic site folders (read-only for tests: copy before changing)."""
    out = tmp_path_factory.mktemp("synth")
    return generate(out, sites=3, records=300, seed=123)


@pytest.fixture(scope="session")
def synth_root(synth_sites: list[Path]) -> Path:
    return synth_sites[0].parent


@pytest.fixture
def small_cfg(synth_root: Path, tmp_path: Path) -> RunConfig:
    """A config that trains in well under a second per site-round."""
    return RunConfig(
        data_dir=str(synth_root),
        out_dir=str(tmp_path / "runs"),
        num_rounds=2,
        local_epochs=1,
        batch_size=64,
        target_epsilon=4.0,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with `slow` tests first, then files with `e2e` tests, each group in collection
    order: under `make test`'s two workers (one file at a time each) the longest files start at
    once, the deployment tests beside the rest, and the short files fill in at the end."""
    marked: dict[Path, int] = {}
    for item in items:
        rank = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("e2e") else 2
        marked[item.path] = min(rank, marked.get(item.path, 2))
    items.sort(key=lambda item: marked[item.path])
