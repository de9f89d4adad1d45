"""Server checkpoints and resume-from, without a federation (the e2e resume is in test_deploy)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fedfuse.common.errors import ConfigError
from fedfuse.common.models import build_model
from fedfuse.server.checkpoint import (
    load_checkpoint,
    open_run,
    restore_rng,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from fedfuse.server.rundir import RunDirectory
from fedfuse.server.strategy import FedfuseFedAvg


def _run_with_rounds(cfg, n_rounds: int, ckpt_round: int) -> tuple[RunDirectory, ArrayRecord]:
    """A run directory with ``n_rounds`` metric lines and a checkpoint after ``ckpt_round``."""
    rd = RunDirectory(Path(cfg.out_dir), cfg, run_id="r")
    strategy = FedfuseFedAvg(run_dir=rd)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(cfg).state_dict())
    for r in range(1, n_rounds + 1):
        rd.add_round({"round": r, "sites": {"site-0": {"epsilon": 0.5 * r}}, "eval-loss": 1.0 / r})
        if r == ckpt_round:
            save_checkpoint(rd, server_round=r, arrays=arrays, strategy=strategy)
    return rd, arrays


def test_resume_checkpoint_round_trip(small_cfg):
    rd, arrays = _run_with_rounds(small_cfg, 1, 1)
    ckpt = load_checkpoint(rd.path)
    assert ckpt.round == 1 and ckpt.num_rounds == small_cfg.num_rounds
    assert ckpt.config == small_cfg.to_mapping()
    expected = arrays.to_torch_state_dict()
    assert ckpt.model.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(ckpt.model[k], v), k
    assert ckpt.strategy == {}  # plain FedAvg keeps nothing between rounds
    # No temporary file is left behind by the atomic write.
    assert sorted(p.name for p in rd.path.iterdir() if "tmp" in p.name) == []


def test_resume_reopens_the_run_directory_at_the_checkpoint(small_cfg):
    cfg = small_cfg.replace(num_rounds=3)
    rd, _ = _run_with_rounds(cfg, 2, 1)  # round 2 logged but its checkpoint never written
    resumed_cfg = cfg.replace(resume_from=str(rd.path), run_name="ignored", out_dir="elsewhere")
    rd2, ckpt = open_run(resumed_cfg)
    assert ckpt is not None and ckpt.round == 1
    assert rd2.path == rd.path
    assert [r["round"] for r in rd2.rounds] == [1]
    lines = (rd.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1]  # round 2 will be trained again
    assert json.loads((rd.path / "resumes.json").read_text()) == [1]
    # The original config stays the run's record.
    assert json.loads((rd.path / "config.json").read_text())["resume-from"] == ""
    rd2.add_round({"round": 2, "sites": {}})
    rd2.finish(state_dict=None, status="completed")
    assert "Resumed from a checkpoint after round(s) [1]" in (rd.path / "summary.md").read_text()


def test_resume_refuses_a_changed_config_naming_the_keys(small_cfg):
    rd, _ = _run_with_rounds(small_cfg, 1, 1)
    changed = small_cfg.replace(resume_from=str(rd.path), target_epsilon=1.0, num_rounds=5)
    with pytest.raises(ConfigError) as exc:
        open_run(changed)
    msg = str(exc.value)
    assert "target-epsilon: 4.0 -> 1.0" in msg and "num-rounds: 2 -> 5" in msg
    assert "same config" in msg


def test_resume_refuses_a_finished_run_and_a_missing_checkpoint(small_cfg, tmp_path):
    rd, _ = _run_with_rounds(small_cfg, 2, 2)
    with pytest.raises(ConfigError, match="all 2 rounds are already complete"):
        open_run(small_cfg.replace(resume_from=str(rd.path)))
    with pytest.raises(ConfigError, match="no checkpoint.pt there"):
        open_run(small_cfg.replace(resume_from=str(tmp_path)))


def test_resume_refuses_a_run_dir_edited_by_hand(small_cfg):
    rd, _ = _run_with_rounds(small_cfg.replace(num_rounds=3), 2, 2)
    lines = (rd.path / "metrics.jsonl").read_text().splitlines()
    (rd.path / "metrics.jsonl").write_text(lines[1] + "\n")  # round 1 deleted
    with pytest.raises(ConfigError, match="changed by hand"):
        open_run(small_cfg.replace(num_rounds=3, resume_from=str(rd.path)))


def test_resume_restores_server_optimizer_state(small_cfg):
    """FedAdam's moments and FedAvgM's momentum survive a checkpoint bit for bit."""
    rd = RunDirectory(Path(small_cfg.out_dir), small_cfg, run_id="opt")
    rng = np.random.default_rng(0)
    adam = FedAdam()
    adam.current_arrays = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    adam.m_t = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    adam.v_t = {"w": rng.random(size=(3, 2)).astype(np.float32)}
    arrays = ArrayRecord({"w": torch.zeros(3, 2)})
    save_checkpoint(rd, server_round=1, arrays=arrays, strategy=adam)
    fresh = FedAdam()
    restore_strategy_state(fresh, load_checkpoint(rd.path).strategy)
    for attr in ("current_arrays", "m_t", "v_t"):
        np.testing.assert_array_equal(getattr(fresh, attr)["w"], getattr(adam, attr)["w"])

    avgm = FedAvgM(server_momentum=0.9)
    avgm.current_arrays = arrays
    avgm.momentum_vector = [rng.normal(size=4), rng.normal(size=(2, 2))]
    state = strategy_state(avgm)
    assert set(state) == {"current_arrays", "momentum_vector"}
    fresh_m = FedAvgM(server_momentum=0.9)
    restore_strategy_state(fresh_m, state)
    for a, b in zip(fresh_m.momentum_vector, avgm.momentum_vector, strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(fresh_m.current_arrays, ArrayRecord)
    np.testing.assert_array_equal(fresh_m.current_arrays["w"].numpy(), np.zeros((3, 2)))


def test_resume_continues_the_servers_random_sequence(small_cfg):
    """Node sampling (fraction-train < 1) draws from `random`: a resumed run draws the same."""
    rd = RunDirectory(Path(small_cfg.out_dir), small_cfg, run_id="rng")
    random.seed(123)
    save_checkpoint(
        rd,
        server_round=1,
        arrays=ArrayRecord({"w": torch.zeros(2)}),
        strategy=FedfuseFedAvg(run_dir=rd),
    )
    expected = [random.random() for _ in range(3)]
    random.seed(999)
    restore_rng(load_checkpoint(rd.path))
    assert [random.random() for _ in range(3)] == expected
