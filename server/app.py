"""The fedfuse ServerApp: wiring only; the logic is in fedfuse.server.strategy,
fedfuse.server.secagg and fedfuse.server.rundir."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.models import build_model
from fedfuse.common.models.pretrained import wire_state
from fedfuse.server.checkpoint import Checkpoint, open_run, restore_rng, restore_strategy_state
from fedfuse.server.distributed_dp import make_distributed_dp
from fedfuse.server.privacy_report import FederationStopped
from fedfuse.server.rundir import RoundCallback, RunDirectory
from fedfuse.server.secagg import SecAggPlusStrategy
from fedfuse.server.strategy import STRATEGIES, SiteRecordingMixin


def make_strategy(
    cfg: RunConfig, *, run_dir: RunDirectory, on_round: RoundCallback | None, **common: Any
) -> SiteRecordingMixin | SecAggPlusStrategy:
    """The strategy the run config names, with its own hyper-parameters from the config, wrapped
    in SecAgg+ unless ``secagg`` is off (the strategy then only ever holds the masked sum)."""
    extra: dict[str, Any] = {}
    if cfg.strategy == "fedprox":
        extra["proximal_mu"] = cfg.proximal_mu
    elif cfg.strategy == "fedadam":
        extra["eta"] = cfg.server_learning_rate
    strategy = STRATEGIES[cfg.strategy](run_dir=run_dir, on_round=on_round, **common, **extra)
    if not cfg.secagg:
        return strategy
    return SecAggPlusStrategy(
        strategy,
        cfg.secagg_settings(),
        ddp=make_distributed_dp(cfg, run_dir.rounds),
    )


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    *,
    run_dir: RunDirectory,
    on_round: RoundCallback | None = None,
    checkpoint: Checkpoint | None = None,
    holdout: Callable[..., dict[str, Any]] | None = None,
) -> RunDirectory:
    """Run ``cfg.num_rounds`` rounds of FedAvg with federated evaluation; write the run dir.

    With ``checkpoint`` (a resumed run), only the rounds after ``checkpoint.round`` run, from
    its model and strategy state. ``holdout`` (a simulation's held-out site,
    simulations/holdout.py) is given the final model of a completed run and returns the
    figures that site releases; the server never reads its data.
    """
    if cfg.holdout_site and holdout is None:
        # Only a simulation can act for a site that is no node (simulations/holdout.py).
        raise ConfigError(
            f"run config holdout-site = '{cfg.holdout_site}' works in `fedfuse simulate` only; "
            "in a deployment, leave that site out and evaluate the exported model there"
        )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    strategy = make_strategy(
        cfg,
        run_dir=run_dir,
        on_round=on_round,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_sites,
        min_evaluate_nodes=cfg.min_sites,
        min_available_nodes=cfg.min_sites,
    )
    sites = strategy.strategy if isinstance(strategy, SecAggPlusStrategy) else strategy
    # The whole run config travels with every message: sites build the same model and plan.
    config = ConfigRecord(dict(cfg.to_mapping()))
    # Sites key their ledger entries by the run's unique id (kept when a run is resumed) and
    # show its name beside it.
    config["run-id"] = run_dir.run_id
    config["run-uid"] = run_dir.uid
    # Rounds carry all but the fixed pretrained parts, which the server and every site build
    # from the same checked file (common/models/pretrained.py: wire_state).
    initial_arrays = ArrayRecord(wire_state(model, cfg))
    if checkpoint is not None:
        initial_arrays = checkpoint.arrays
        restore_strategy_state(sites, checkpoint.strategy)
        restore_rng(checkpoint)
        sites.round_offset = checkpoint.round
    status, reason = "completed", ""
    result = None
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=cfg.num_rounds - sites.round_offset,
            timeout=cfg.timeout,
            train_config=config,
            # The run's name and uid too: a site's local evaluation log names the run.
            evaluate_config=ConfigRecord(
                {**cfg.to_mapping(), "run-id": run_dir.run_id, "run-uid": run_dir.uid}
            ),
        )
    except FederationStopped as exc:
        # Too few sites left (e.g. budgets exhausted): a clean stop, recorded with its reason.
        status, reason = "stopped", str(exc)
    except Exception as exc:
        status, reason = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # A failed run keeps the last global model that was sent out (the previous round's).
        arrays = result.arrays if result is not None else sites.global_arrays
        if len(run_dir.rounds) < cfg.num_rounds and status == "completed":
            status, reason = (
                "incomplete",
                (f"{len(run_dir.rounds)} of {cfg.num_rounds} rounds finished"),
            )
        state = (
            {**model.state_dict(), **arrays.to_torch_state_dict()} if arrays is not None else None
        )
        if holdout is not None and state is not None and status == "completed":
            run_dir.holdout = held_out_figures(holdout, state, run_dir)
        run_dir.finish(state_dict=state, status=status, reason=reason)
    return run_dir


def held_out_figures(
    holdout: Callable[..., dict[str, Any]],
    state: dict[str, torch.Tensor],
    run_dir: RunDirectory,
) -> dict[str, Any]:
    """The held-out site's figures about the final model; a failure there is recorded (its
    class only: the site's own error text may name its files), not a failed run."""
    last_round = int(run_dir.rounds[-1]["round"]) if run_dir.rounds else 0
    try:
        return holdout(state, run_id=run_dir.run_id, server_round=last_round)
    except Exception as exc:  # noqa: BLE001
        log(WARNING, "the held-out site did not evaluate: %s", type(exc).__name__)
        return {"site": run_dir.cfg.holdout_site, "error": f"{type(exc).__name__} at the site"}


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    on_round: RoundCallback | None = None,
    run_id: str | None = None,
    expect_sites: int | None = None,
    holdout: Callable[..., dict[str, Any]] | None = None,
) -> ServerApp:
    """A ServerApp whose run config is the Flower run config with ``overrides`` on top.

    ``fedfuse simulate`` passes its resolved config here (Flower's in-process simulation has no
    run config of its own); ``flwr run .`` uses the module-level :data:`app`. With
    ``expect_sites`` (a simulation, which knows its sites), round 1 waits until that many
    sites are connected: a strategy samples as soon as ``min-sites`` are, and on a loaded
    machine the virtual sites come online one by one.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        raw = dict(context.run_config)
        raw.update(overrides or {})
        cfg = RunConfig.from_mapping(raw)
        run_dir, checkpoint = open_run(cfg, run_id=run_id)  # a new run, or resume-from's
        if expect_sites:
            wait_for_sites(grid, expect_sites)
        run_federation(
            grid, cfg, run_dir=run_dir, on_round=on_round, checkpoint=checkpoint, holdout=holdout
        )

    return server_app


def wait_for_sites(grid: Grid, count: int, *, timeout: float = 600.0) -> int:
    """Wait until ``count`` sites are connected (at most ``timeout`` seconds); how many are."""
    deadline = time.monotonic() + timeout
    while True:
        online = len(list(grid.get_node_ids()))
        if online >= count or time.monotonic() >= deadline:
            if online < count:
                log(WARNING, "only %d of %d sites connected after %.0f s", online, count, timeout)
            return online
        time.sleep(0.2)


app = make_server_app()
