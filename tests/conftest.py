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
