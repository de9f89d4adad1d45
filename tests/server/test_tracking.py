"""Experiment tracking's pieces without a federation: what a round row becomes, which stores
are accepted, and that a held-out site is refused where no simulation acts for it.
(The trackers themselves are read back in tests/cli/test_run_outputs.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.server.app import run_federation
from fedfuse.server.rundir import RunDirectory
from fedfuse.server.tracking import open_tracker, round_scalars


def test_round_scalars_by_hand() -> None:
    row = {
        "round": 2,
        "eval-auroc": 0.75,
        "eval-loss": math.nan,  # not finite: left out
        "num-sites": 2,
        "secagg": True,  # not a figure
        "sites": {"site 0": {"epsilon": 1.5, "delta": 1e-5}, "site-1": {"epsilon": 2.0}},
        "failed": {"site-2": "no reply"},
        "holdout": {"site": "site-3", "round": 2, "eval-auroc": 0.6, "reliability": {}},
    }
    assert round_scalars(row) == {
        "eval-auroc": 0.75,
        "num-sites": 2.0,
        "epsilon/site 0": 1.5,
        "epsilon/site-1": 2.0,
        "holdout/eval-auroc": 0.6,
    }


def test_only_local_stores_and_known_trackers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give a local MLflow store"):
        open_tracker("mlflow", run_dir=tmp_path / "r", uri="https://tracking.example.org")
    with pytest.raises(ConfigError, match="--track-uri is for --track mlflow"):
        open_tracker("tensorboard", run_dir=tmp_path / "r", uri="sqlite:///x.db")
    with pytest.raises(ConfigError, match="choose one of tensorboard, mlflow"):
        open_tracker("wandb", run_dir=tmp_path / "r")


def test_a_held_out_site_needs_a_simulation(tmp_path: Path) -> None:
    """In a deployment nothing acts for a site that is no node: the key is refused before
    any message is sent, not silently ignored."""
    cfg = RunConfig(out_dir=str(tmp_path), holdout_site="site-3", run_name="r")
    with pytest.raises(ConfigError, match="holdout-site = 'site-3' works in `fedfuse simulate`"):
        run_federation(None, cfg, run_dir=RunDirectory(tmp_path, cfg))  # type: ignore[arg-type]
