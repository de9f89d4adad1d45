"""Per-round checkpoints of the ServerApp, and resuming a run from its run directory.

After every completed round the run directory's ``checkpoint.pt`` holds the global model, the
round number, the strategy's own state (server-side optimiser moments, if any) and the server's
random-number state. A run started with ``resume-from = RUN_DIR`` continues in that directory at
the next round and ends with the same total number of rounds as an uninterrupted run.

The sites' privacy spend does NOT live here: each site carries it across runs in its own
ledger (a server checkpoint must never be trusted for a site's privacy accounting).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedfuse.common.config import RESUME_FREE_KEYS, RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.server.rundir import RunDirectory

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
# Strategy attributes that carry state across rounds in Flower 1.42's strategies: the
# server-side optimiser of FedOpt (FedAdam, FedYogi, FedAdagrad) and FedAvgM's momentum base.
STRATEGY_STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")


@dataclass(frozen=True)
class Checkpoint:
    """What a run needs to continue after ``round`` completed rounds."""

    round: int
    num_rounds: int
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    rng: dict[str, Any]

    @property
    def arrays(self) -> ArrayRecord:
        return ArrayRecord(self.model)


def _to_tensors(value: Any) -> Any:
    """Strategy state as tensors (``torch.load(weights_only=True)`` reads nothing else)."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: torch.from_numpy(v.numpy()) for k, v in value.items()}}
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [torch.from_numpy(np.asarray(v)) for v in value]
    raise TypeError(f"cannot checkpoint strategy state of type {type(value).__name__}")


def _from_tensors(value: Any) -> Any:
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord(dict(value["__arrayrecord__"]))  # a torch state dict
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return [v.numpy() for v in value]


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The state a strategy keeps between rounds (empty for plain FedAvg, which has none)."""
    return {
        a: _to_tensors(getattr(strategy, a))
        for a in STRATEGY_STATE_ATTRS
        if getattr(strategy, a, None) is not None
    }


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    for attr, value in state.items():
        if attr not in STRATEGY_STATE_ATTRS:
            raise ConfigError(f"checkpoint holds unknown strategy state '{attr}'")
        setattr(strategy, attr, _from_tensors(value))


def save_checkpoint(
    run_dir: RunDirectory, *, server_round: int, arrays: ArrayRecord, strategy: Any
) -> Path:
    """Write ``checkpoint.pt`` atomically: a crash mid-write leaves the previous one intact."""
    payload = {
        "format": FORMAT_VERSION,
        "round": int(server_round),
        "num-rounds": run_dir.cfg.num_rounds,
        "config": run_dir.cfg.to_mapping(),
        "model": arrays.to_torch_state_dict(),
        "strategy": strategy_state(strategy),
        # Node sampling (fraction-train < 1) uses Python's `random`: continue its sequence.
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        "time": time.time(),
    }
    path = run_dir.path / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_path: str | Path) -> Checkpoint:
    path = Path(run_path) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"resume-from '{run_path}': no {CHECKPOINT_FILE} there; give the run directory of "
            "an interrupted run that completed at least one round"
        )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if raw.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"{path} has checkpoint format {raw.get('format')!r}; this fedfuse reads "
            f"{FORMAT_VERSION}"
        )
    return Checkpoint(
        round=int(raw["round"]),
        num_rounds=int(raw["num-rounds"]),
        config=dict(raw["config"]),
        model=dict(raw["model"]),
        strategy=dict(raw["strategy"]),
        rng=dict(raw["rng"]),
    )


def restore_rng(ckpt: Checkpoint) -> None:
    version, internal, gauss = ckpt.rng["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(ckpt.rng["torch"])


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Keys whose value differs between the checkpointed run and ``cfg`` (location keys aside)."""
    now = cfg.to_mapping()
    keys = (set(saved) | set(now)) - RESUME_FREE_KEYS
    return sorted(
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)
    )


def open_run(
    cfg: RunConfig, *, run_id: str | None = None
) -> tuple[RunDirectory, Checkpoint | None]:
    """The run directory to write, and the checkpoint to continue from (``resume-from``)."""
    if not cfg.resume_from:
        return RunDirectory(Path(cfg.out_dir), cfg, run_id=run_id), None
    ckpt = load_checkpoint(cfg.resume_from)
    diff = config_differences(ckpt.config, cfg)
    if diff:
        raise ConfigError(
            f"resume-from '{cfg.resume_from}': the run config differs from the interrupted "
            f"run's in {diff}; resume with the same config (only {sorted(RESUME_FREE_KEYS)} "
            "may change), or start a new run"
        )
    if ckpt.round >= cfg.num_rounds:
        raise ConfigError(
            f"resume-from '{cfg.resume_from}': all {cfg.num_rounds} rounds are already "
            "complete; nothing to resume"
        )
    return RunDirectory.reopen(cfg.resume_from, cfg, completed_rounds=ckpt.round), ckpt
