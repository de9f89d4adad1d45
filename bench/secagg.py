"""SecAgg+ overhead per training round: the same round with and without it, side by side.

    python -m bench.secagg                                  # the full grid below (minutes)
    python -m bench.secagg --sites 5 --sizes 100k --training none

For each number of sites (5, 10, 20), model size (~100k and ~1M parameters: the fusion model
with 5,120 or 61,440 text buckets) and training mode (``none``: a site returns the global model
plus a constant step at once; ``dp``: the real fedfuse ClientApp trains with Opacus DP-SGD
on synthetic sites), it runs ``--rounds`` training rounds of the real strategy
(``fedfuse.server.app.make_strategy``) with ``secagg`` on and off, over the in-process Grid
with the real ClientApp and ``secaggplus_mod``. Rounds with and without SecAgg+ alternate; a round's
time is the sites' median training time plus the fastest non-training time measured after the
first round (see ``alternate``: training time swings several-fold on a shared machine). Two
times per round:

- one process: what this machine measured, every site one after another;
- parallel sites: the server's time plus the slowest site of each exchange, what a federation
  whose sites compute at the same time would take (network latency not included: Flower's
  deployment Grid polls for replies every 3 s, and SecAgg+ has four exchanges, not one).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedfuse.client.secagg_mod import secaggplus_mod  # noqa: E402
from fedfuse.common.config import RunConfig  # noqa: E402
from fedfuse.common.models import build_model  # noqa: E402
from fedfuse.server.app import make_strategy  # noqa: E402
from fedfuse.server.rundir import RunDirectory  # noqa: E402
from fedfuse.simulations.inprocess import InProcessGrid  # noqa: E402
from fedfuse.simulations.scenarios import DataSpec, ensure_data  # noqa: E402

TEXT_BUCKETS = {"100k": 5120, "1m": 61440}


# Seconds each site spent in its train function, appended as they happen (in-process only).
TRAINING: list[float] = []


def timed(train_fn):  # noqa: ANN001, ANN201
    def train(msg: Message, ctxt: Context) -> Message:
        t0 = time.perf_counter()
        try:
            return train_fn(msg, ctxt)
        finally:
            TRAINING.append(time.perf_counter() - t0)

    return train


def no_training_app() -> ClientApp:
    """A site that 'trains' instantly: the global model plus a constant small step."""
    app = ClientApp()

    @app.train(mods=[secaggplus_mod])
    @timed
    def train(msg: Message, ctxt: Context) -> Message:
        step = np.float32(1e-3 * (1 + int(ctxt.node_config["partition-id"])))
        glob = msg.content["arrays"]
        out = {k: Array(glob[k].numpy() + step) for k in glob.keys()}
        content = RecordDict(
            {
                "arrays": ArrayRecord(out),  # type: ignore[arg-type]
                "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.0}),
                "site": ConfigRecord({"name": f"site-{ctxt.node_config['partition-id']}"}),
            }
        )
        return Message(content, reply_to=msg)

    return app


class Setup:
    """One federation (grid, strategy, global model) whose training rounds can be timed."""

    def __init__(self, cfg: RunConfig, sites: int, out: Path, grid: Grid) -> None:
        self.cfg = cfg
        self.grid = grid
        run_dir = RunDirectory(out, cfg, run_id=f"{sites}-{cfg.secagg}-{time.time_ns()}")
        self.strategy = make_strategy(
            cfg,
            run_dir=run_dir,
            on_round=None,
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=sites,
            min_evaluate_nodes=sites,
            min_available_nodes=sites,
        )
        model = build_model(cfg)
        self.arrays = ArrayRecord(model.state_dict())
        self.params = sum(int(v.numel()) for v in model.state_dict().values())

    def round(self, rnd: int) -> tuple[float, float, float, float]:
        """One training round: seconds in this process, seconds if the sites ran in parallel,
        and of these the sites' training (all sites; the slowest site)."""
        grid = self.grid
        exchanges: list[dict[int, float]] = getattr(grid, "exchanges", [])
        exchanges.clear()
        TRAINING.clear()
        t0 = time.perf_counter()
        config = ConfigRecord(self.cfg.to_mapping())
        messages = self.strategy.configure_train(rnd, self.arrays, config, grid)
        replies = grid.send_and_receive(messages, timeout=self.cfg.timeout)
        new, _ = self.strategy.aggregate_train(rnd, replies)
        wall = time.perf_counter() - t0
        if new is None:
            raise RuntimeError(f"round {rnd} produced no model")
        self.arrays = new
        if not isinstance(grid, InProcessGrid):
            return wall, float("nan"), 0.0, 0.0  # the engine runs sites in parallel already
        on_sites = sum(sum(e.values()) for e in exchanges)
        slowest = sum(max(e.values(), default=0.0) for e in exchanges)
        return wall, wall - on_sites + slowest, sum(TRAINING), max(TRAINING, default=0.0)


def client_app_for(training: str) -> ClientApp:
    if training == "dp":
        # fedfuse's own train function (Opacus DP-SGD), behind the same mod as in client/app.py
        from fedfuse.client.app import train as fedfuse_train

        app = ClientApp()
        app.train(mods=[secaggplus_mod])(timed(fedfuse_train))
        return app
    if training == "legacy":
        return legacy_no_training_app()
    return no_training_app()


def legacy_no_training_app() -> ClientApp:
    """Flower's legacy path: a NumPyClient behind Flower's own ``secaggplus_mod`` (used only
    for the SecAgg+ messages; plain fit messages go straight to the client)."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod as flower_secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    class Instant(NumPyClient):
        def __init__(self, step: float) -> None:
            self.step = np.float32(step)

        def fit(self, parameters, config):  # noqa: ANN001, ANN201
            return [p + self.step for p in parameters], 100, {}

    def client_fn(context: Context):  # noqa: ANN202
        return Instant(1e-3 * (1 + int(context.node_config["partition-id"]))).to_client()

    # (the legacy client's fit time is not separated: it does no training)

    def flower_secagg_only(msg: Message, ctxt: Context, call_next):  # noqa: ANN001, ANN202
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return flower_secaggplus_mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    return ClientApp(client_fn=client_fn, mods=[flower_secagg_only])


class LegacySetup:
    """Flower's legacy fit round: ``SecAggPlusWorkflow`` (on) or ``default_fit_workflow``."""

    def __init__(self, cfg: RunConfig, sites: int, grid: Grid, *, secagg: bool) -> None:
        from flwr.common import ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.strategy import FedAvg as LegacyFedAvg
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
        from flwr.server.workflow.default_workflows import default_fit_workflow

        self.grid = grid
        self.ctx = LegacyContext(
            context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=cfg.num_rounds),
            strategy=LegacyFedAvg(
                fraction_fit=1.0, min_fit_clients=sites, min_available_clients=sites
            ),
        )
        while len(list(grid.get_node_ids())) < sites:  # the engine registers nodes as it starts
            time.sleep(0.1)
        for nid in grid.get_node_ids():
            self.ctx.client_manager.register(GridClientProxy(nid, grid, grid.run.run_id))
        model = build_model(cfg)
        params = [v.numpy() for v in model.state_dict().values()]
        self.params = sum(int(p.size) for p in params)
        self.ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(params), keep_input=True
        )
        # Flower's SecAgg+ with every site sharing with every other, as fedfuse's default.
        self.workflow = (
            SecAggPlusWorkflow(num_shares=sites, reconstruction_threshold=sites // 2 + 1)
            if secagg
            else default_fit_workflow
        )

    def round(self, rnd: int) -> tuple[float, float, float, float]:
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

        self.ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
        exchanges: list[dict[int, float]] = getattr(self.grid, "exchanges", [])
        exchanges.clear()
        t0 = time.perf_counter()
        self.workflow(self.grid, self.ctx)
        wall = time.perf_counter() - t0
        if not isinstance(self.grid, InProcessGrid):
            return wall, float("nan"), 0.0, 0.0
        on_sites = sum(sum(e.values()) for e in exchanges)
        slowest = sum(max(e.values(), default=0.0) for e in exchanges)
        return wall, wall - on_sites + slowest, 0.0, 0.0


def alternate(
    grid: Grid, cfg: RunConfig, sites: int, rounds: int, out: Path, training: str
) -> tuple[dict[bool, tuple[float, float]], int]:
    """Per SecAgg+ off/on: (seconds per round in one process, with parallel sites).

    Rounds alternate between the two federations. The sites' training is the same work with
    and without SecAgg+, but on a shared machine its time varies several-fold from round to
    round; so each round is split into training and the rest (protocol, serialisation,
    aggregation), the rest is taken from the fastest round after the first (round 1 also loads
    data and plans the DP noise), and both paths get the same, median, training time.
    """
    setups: dict[bool, Any] = {
        on: LegacySetup(cfg, sites, grid, secagg=on)
        if training == "legacy"
        else Setup(cfg.replace(secagg=on), sites, out, grid)
        for on in (False, True)
    }
    rest: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    trained: list[tuple[float, float]] = []
    for rnd in range(1, rounds + 1):
        for on, setup in setups.items():
            wall, parallel, train_all, train_max = setup.round(rnd)
            if rnd > 1:
                rest[on].append((wall - train_all, parallel - train_max))
                trained.append((train_all, train_max))
    t_all = float(np.median([t for t, _ in trained]))
    t_max = float(np.median([t for _, t in trained]))
    best = {
        on: (t_all + min(w for w, _ in r), t_max + min(p for _, p in r)) for on, r in rest.items()
    }
    return best, setups[False].params


def measure(
    *,
    engine: str,
    sites: int,
    size: str,
    training: str,
    rounds: int,
    records: int,
    out: Path,
    accountant: str = "rdp",
    num_shares: int = 0,
) -> tuple[dict[bool, tuple[float, float]], int]:
    data = ensure_data(DataSpec(sites=max(sites, 20), records=records), seed=0)
    cfg = RunConfig(
        data_dir=str(data),
        out_dir=str(out),
        # Both federations train on the same nodes: plan each site's budget for both.
        num_rounds=2 * rounds,
        local_epochs=1,
        batch_size=64,
        text_buckets=TEXT_BUCKETS[size],
        target_epsilon=8.0,
        accountant=accountant,
        min_sites=sites,
        num_shares=num_shares if 0 < num_shares < sites else 0,
    )
    app = client_app_for(training)
    if engine == "inprocess":
        return alternate(InProcessGrid(app, sites), cfg, sites, rounds, out, training)
    # Flower's simulation engine (Ray workers, one per core): a ServerApp that times rounds.
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedfuse.simulations.runner import backend_config, quiet_flower

    quiet_flower()
    result: list[tuple[dict[bool, tuple[float, float]], int]] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result.append(alternate(grid, cfg, sites, rounds, out, training))

    try:
        run_simulation(
            server_app=server_app,
            client_app=app,
            num_supernodes=sites,
            backend_config=backend_config(),  # type: ignore[arg-type]
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return result[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--sizes", nargs="+", default=["100k", "1m"], choices=sorted(TEXT_BUCKETS))
    ap.add_argument(
        "--training",
        nargs="+",
        default=["none", "dp"],
        choices=["none", "dp", "legacy"],
        help="legacy: Flower's own legacy SecAgg+ vs its default fit round, no training",
    )
    ap.add_argument(
        "--rounds", type=int, default=4, help="rounds per run; the fastest after the first counts"
    )
    ap.add_argument("--records", type=int, default=200, help="records per synthetic site")
    ap.add_argument(
        "--accountant",
        default="rdp",
        choices=["rdp", "prv"],
        help="the sites' accountant (rdp plans the noise faster; it does not touch SecAgg+)",
    )
    ap.add_argument(
        "--num-shares",
        type=int,
        default=0,
        help="fedfuse's SecAgg+ neighbourhood: 0 every site (default), odd k: a ring of k-1",
    )
    ap.add_argument(
        "--engine",
        default="inprocess",
        choices=["inprocess", "simulation"],
        help="in-process Grid (sites one after another) or Flower's simulation engine (Ray)",
    )
    args = ap.parse_args()
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)  # the INFO lines would bury the table

    print(
        f"{'params':>9} {'sites':>5} {'training':>8} | {'plain s':>8} {'SecAgg+ s':>9} "
        f"{'ratio':>6} | {'plain s':>8} {'SecAgg+ s':>9} {'ratio':>6}"
    )
    second = "parallel sites (est.)" if args.engine == "inprocess" else "-"
    first = "one process" if args.engine == "inprocess" else "Flower simulation engine"
    print(f"{'':>9} {'':>5} {'':>8} | {first:^26} | {second:^26}")
    with tempfile.TemporaryDirectory() as tmp:
        for training in args.training:
            for size in args.sizes:
                for sites in args.sites:
                    res, n = measure(
                        engine=args.engine,
                        sites=sites,
                        size=size,
                        training=training,
                        rounds=args.rounds,
                        records=args.records,
                        out=Path(tmp),
                        accountant=args.accountant,
                        num_shares=args.num_shares,
                    )
                    (w0, p0), (w1, p1) = res[False], res[True]
                    print(
                        f"{n:>9,} {sites:>5} {training:>8} | {w0:>8.2f} {w1:>9.2f} "
                        f"{w1 / w0:>5.2f}x | {p0:>8.2f} {p1:>9.2f} {p1 / p0:>5.2f}x",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
