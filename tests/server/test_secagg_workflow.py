"""SecAgg+ rounds over an in-process Grid: Flower's legacy SecAgg+ as the oracle, what the
server sees, dropouts, and contributions that must not poison the sum."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import serde

from fedfuse.common.secagg import SecAggSettings, masking
from fedfuse.common.secagg.protocol import MASKED_ARRAY, MASKED_KEY, RECORD_KEY, Key, Stage
from fedfuse.server.secagg import SecAggOutcome, SecAggPlusWorkflow
from fedfuse.simulations.inprocess import InProcessGrid
from tests.support.secagg import fixed_update_app, silence, stage_of, weighted_mean

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "head.weight": (2, 40)}


def _updates(n: int, seed: int = 0, scale: float = 0.05) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: rng.normal(0.1 * i, scale, size=s).astype(np.float32) for k, s in SHAPES.items()}
        for i in range(n)
    ]


def _zeros() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def _secure_round(
    grid: InProcessGrid, settings: SecAggSettings | None = None, base: ArrayRecord | None = None
) -> SecAggOutcome:
    wf = SecAggPlusWorkflow(settings or SecAggSettings(), rng=random.Random(0))
    return wf(
        grid,
        node_ids=grid.node_ids,
        arrays=base or _zeros(),
        config=ConfigRecord({"server-round": 1}),
        server_round=1,
    )


def _bound(updates, weights, settings: SecAggSettings | None = None) -> float:
    params = (settings or SecAggSettings()).for_round(len(weights))
    max_abs = max(float(np.abs(u[k]).max()) for u in updates for k in u)
    return masking.error_bound(weights, max_abs, params)


def _gap(arrays: ArrayRecord, expected: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(arrays[k].numpy() - expected[k]).max()) for k in expected)


def _flower_legacy_secaggplus(updates, weights) -> dict[str, np.ndarray]:
    """Flower's own SecAgg+ (legacy workflow + legacy mod), run on the same updates."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod as flower_secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow as FlowerSecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    keys = list(SHAPES)
    n = len(updates)

    class FixedUpdate(NumPyClient):
        def __init__(self, i: int) -> None:
            self.i = i

        def fit(self, parameters, config):  # noqa: ANN001
            return [updates[self.i][k] for k in keys], int(weights[self.i]), {}

    def client_fn(context: Context):  # noqa: ANN202
        return FixedUpdate(int(context.node_config["partition-id"])).to_client()

    legacy_app = ClientApp(client_fn=client_fn, mods=[flower_secaggplus_mod])
    grid = InProcessGrid(legacy_app, n, seed=1)
    ctx = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=LegacyFedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n),
    )
    for nid in grid.node_ids:
        ctx.client_manager.register(GridClientProxy(nid, grid, 1))
    zeros = [np.zeros(SHAPES[k], np.float32) for k in keys]
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(zeros), keep_input=True
    )
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    FlowerSecAggPlusWorkflow(num_shares=n, reconstruction_threshold=n // 2 + 1)(grid, ctx)
    params = compat.arrayrecord_to_parameters(
        ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    return dict(zip(keys, parameters_to_ndarrays(params), strict=True))


def test_oracle_flower_legacy_secaggplus_and_plain_weighted_mean_agree() -> None:
    """Same updates, three aggregators: fedfuse's SecAgg+, Flower's legacy SecAgg+ and the plain
    weighted mean agree within the quantisation error bound, which is small."""
    n = 5
    updates, weights = _updates(n), [120.0, 310.0, 75.0, 500.0, 260.0]
    plain = weighted_mean(updates, weights)
    # Flower's default max-weight (fedfuse's is 10,000): both aggregators, same parameters.
    settings = SecAggSettings(max_weight=1000.0)
    bound = _bound(updates, weights, settings)
    assert bound < 1e-4  # a bound that says something: the updates differ by ~0.1

    ours = _secure_round(InProcessGrid(fixed_update_app(updates, weights), n), settings)
    assert ours.error is None and ours.arrays is not None
    flower = _flower_legacy_secaggplus(updates, weights)

    assert _gap(ours.arrays, plain) <= bound
    assert max(float(np.abs(flower[k] - plain[k]).max()) for k in plain) <= bound
    assert _gap(ours.arrays, flower) <= 2 * bound
    # ... and it is a weighted mean, not the plain mean of the sites.
    unweighted = weighted_mean(updates, [1.0] * n)
    assert _gap(ours.arrays, unweighted) > 100 * bound


def test_the_server_never_holds_one_update_in_the_clear() -> None:
    """Everything the server side receives: public keys, encrypted shares, masked vectors, shares
    of secrets, scalar metrics. No masked vector correlates with its site's update, no float
    array arrives, no update's bytes appear; the unmasked sum is the plain sum."""
    n = 4
    shapes = {"w": (20_000,)}
    rng = np.random.default_rng(3)
    updates = [{"w": rng.normal(0, 1.0, shapes["w"]).astype(np.float32)} for _ in range(n)]
    weights = [100.0, 200.0, 300.0, 400.0]
    grid = InProcessGrid(fixed_update_app(updates, weights), n)
    out = SecAggPlusWorkflow(SecAggSettings(), rng=random.Random(0))(
        grid,
        node_ids=grid.node_ids,
        arrays=ArrayRecord({"w": Array(np.zeros(shapes["w"], np.float32))}),
        config=ConfigRecord({}),
        server_round=1,
    )
    assert out.error is None and out.arrays is not None
    params = SecAggSettings().for_round(n)
    wire = b"".join(serde.message_to_proto(m).SerializeToString() for m in grid.received)
    masked = {}
    for msg in grid.received:
        assert not msg.has_error()
        for name, rec in msg.content.array_records.items():
            assert name == MASKED_KEY  # the only arrays that ever reach the server
            assert all(rec[k].dtype == "uint32" for k in rec)
        if MASKED_KEY in msg.content.array_records:
            masked[grid.partition(msg.metadata.src_node_id)] = (
                msg.content.array_records[MASKED_KEY][MASKED_ARRAY].numpy().astype(np.float64)
            )
    assert sorted(masked) == list(range(n))
    for i, u in enumerate(updates):
        encoded, _ = masking.encode(u["w"].astype(np.float64), weights[i], params)
        for reference in (u["w"].astype(np.float64), encoded[1:].astype(np.float64)):
            corr = np.corrcoef(masked[i][1:], reference)[0, 1]
            assert abs(corr) < 0.05, (i, corr)  # independent: |corr| ~ 1/sqrt(20000) = 0.007
        assert u["w"].tobytes()[:64] not in wire
    # What the masks hide cancels in the sum.
    plain = weighted_mean(updates, weights)
    assert _gap(out.arrays, plain) <= _bound(updates, weights)


@pytest.mark.parametrize("how", ["silent", "crash"])
def test_one_of_five_sites_drops_after_sharing_keys(how: str) -> None:
    n = 5
    updates, weights = _updates(n, seed=1), [100.0, 200.0, 300.0, 400.0, 500.0]
    app = fixed_update_app(updates, weights)
    grid = InProcessGrid(app, n)
    if how == "silent":
        grid.respond = silence(grid.partition, {4}, {Stage.COLLECT_MASKED_VECTORS})
    else:

        def crash(msg: Message, ctxt: Context, call_next):  # noqa: ANN001, ANN202
            if (
                ctxt.node_config["partition-id"] == 4
                and stage_of(msg) == Stage.COLLECT_MASKED_VECTORS
            ):
                raise RuntimeError("site 4 lost power")
            return call_next(msg, ctxt)

        grid.app = fixed_update_app(updates, weights, outer_mods=[crash])
    out = _secure_round(grid)
    assert out.error is None and out.arrays is not None
    dropped = grid.node_ids[4]
    assert list(out.dropped) == [dropped]
    assert out.dropped[dropped].startswith(Stage.COLLECT_MASKED_VECTORS)
    survivors = updates[:4], weights[:4]
    assert _gap(out.arrays, weighted_mean(*survivors)) <= _bound(*survivors)
    # The server asked for the dropped site's masking key only, never for its mask seed.
    for msg in grid.received:
        if stage_of(msg) == Stage.UNMASK:
            owners = msg.content.config_records[RECORD_KEY][Key.SHARE_OWNERS]
            assert owners.count(dropped) <= 1  # type: ignore[union-attr]


def test_a_site_vanishing_after_uploading_its_vector_still_counts() -> None:
    n = 5
    updates, weights = _updates(n, seed=2), [10.0, 20.0, 30.0, 40.0, 50.0]
    grid = InProcessGrid(fixed_update_app(updates, weights), n)
    grid.respond = silence(grid.partition, {0}, {Stage.UNMASK})
    out = _secure_round(grid)
    assert out.error is None and out.arrays is not None
    assert _gap(out.arrays, weighted_mean(updates, weights)) <= _bound(updates, weights)


def test_below_the_threshold_the_round_fails_and_returns_no_model() -> None:
    n = 5  # threshold 3: three of five vanishing leaves two
    updates, weights = _updates(n), [1.0] * n
    grid = InProcessGrid(fixed_update_app(updates, weights), n)
    grid.respond = silence(grid.partition, {1, 2, 3}, {Stage.COLLECT_MASKED_VECTORS})
    out = _secure_round(grid)
    assert out.arrays is None
    assert "fewer than the reconstruction threshold 3" in (out.error or "")
    assert "2 of 5 sites remain" in (out.error or "")
    # The two survivors were never asked to unmask: nothing about their vectors leaks.
    assert not [m for m in grid.received if stage_of(m) == Stage.UNMASK]


def test_ring_neighbourhoods_secaggplus() -> None:
    """num-shares 3 with 9 sites: each site shares with 2 neighbours only (SecAgg+)."""
    n = 9
    updates, weights = _updates(n, seed=4), [float(10 + i) for i in range(n)]
    settings = SecAggSettings(num_shares=3)
    grid = InProcessGrid(fixed_update_app(updates, weights), n)
    grid.respond = silence(grid.partition, {7}, {Stage.COLLECT_MASKED_VECTORS})
    out = _secure_round(grid, settings)
    assert out.error is None and out.arrays is not None
    for msg in grid.received:
        if stage_of(msg) == Stage.SHARE_KEYS:
            assert len(msg.content.config_records[RECORD_KEY][Key.DESTINATIONS]) == 2  # type: ignore[arg-type]
    keep = [i for i in range(n) if i != 7]
    upd, w = [updates[i] for i in keep], [weights[i] for i in keep]
    assert _gap(out.arrays, weighted_mean(upd, w)) <= _bound(upd, w, settings)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (lambda u: {**u, "conv.bias": np.full(8, np.nan, np.float32)}, "'conv.bias' contains NaN"),
        (lambda u: {**u, "head.weight": np.zeros((2, 41), np.float32)}, "'head.weight' has shape"),
    ],
)
def test_a_site_refuses_a_bad_update_and_is_named(bad, needle: str) -> None:
    n = 4
    updates, weights = _updates(n), [100.0, 100.0, 100.0, 100.0]
    poisoned = [*updates[:2], bad(updates[2]), updates[3]]
    grid = InProcessGrid(fixed_update_app(poisoned, weights), n)
    out = _secure_round(grid)
    assert out.error is None and out.arrays is not None
    culprit = grid.node_ids[2]
    assert out.names[culprit] == "site-2"
    assert needle in out.rejected[culprit] and "refused" in out.rejected[culprit]
    honest = [updates[i] for i in (0, 1, 3)], [100.0] * 3
    assert _gap(out.arrays, weighted_mean(*honest)) <= _bound(*honest)


def test_a_refusal_at_collect_keeps_its_fields_and_the_round_goes_on() -> None:
    """A site whose ledger changed between setup and training refuses once the model came: its
    refusal's fields reach the server beside its refusal to upload, its masks are removed like
    a dropout's, and the others' sum is exact."""
    from fedfuse.common.privacy.refusal import Refusal

    n = 4
    updates, weights = _updates(n), [100.0] * n
    refusal = Refusal(
        "site-2", 1, "privacy budget exhausted", spent=5.2, budget=5.0, would_reach=5.6
    )
    grid = InProcessGrid(fixed_update_app(updates, weights, refusals={2: refusal}), n)
    out = _secure_round(grid)
    assert out.error is None and out.arrays is not None
    culprit = grid.node_ids[2]
    assert out.refused == {culprit: refusal}
    assert "refused: privacy budget exhausted" in out.rejected[culprit]
    honest = [updates[i] for i in (0, 1, 3)], [100.0] * 3
    assert _gap(out.arrays, weighted_mean(*honest)) <= _bound(*honest)


def test_a_malformed_masked_vector_is_rejected_naming_the_site() -> None:
    """A site that bypasses its own checks and sends a vector of the wrong length is named and
    left out; its masks are removed as for a dropout, so the others' sum is still exact."""
    n = 4
    updates, weights = _updates(n), [50.0, 60.0, 70.0, 80.0]

    def truncate(msg: Message, ctxt: Context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, ctxt)
        if ctxt.node_config["partition-id"] == 1 and MASKED_KEY in reply.content.array_records:
            vec = reply.content.array_records[MASKED_KEY][MASKED_ARRAY].numpy()
            reply.content.array_records[MASKED_KEY] = ArrayRecord({MASKED_ARRAY: Array(vec[:-5])})
        return reply

    grid = InProcessGrid(fixed_update_app(updates, weights, outer_mods=[truncate]), n)
    out = _secure_round(grid)
    culprit = grid.node_ids[1]
    assert "site-1" == out.names[culprit]
    assert "shape" in out.rejected[culprit]
    assert out.error is None and out.arrays is not None
    honest = [updates[i] for i in (0, 2, 3)], [weights[i] for i in (0, 2, 3)]
    assert _gap(out.arrays, weighted_mean(*honest)) <= _bound(*honest)


def test_out_of_range_contributions_cannot_pass_silently() -> None:
    """A site that masks garbage of the right shape (entries far above the quantisation range)
    cannot be singled out, but the unmasked sum shows it: the round fails instead of using it."""
    n = 3
    updates, weights = _updates(n), [10.0, 10.0, 10.0]

    def inflate(msg: Message, ctxt: Context, call_next):  # noqa: ANN001, ANN202
        reply = call_next(msg, ctxt)
        if ctxt.node_config["partition-id"] == 0 and MASKED_KEY in reply.content.array_records:
            vec = reply.content.array_records[MASKED_KEY][MASKED_ARRAY].numpy().astype(np.int64)
            vec = ((vec + 2**31) % 2**32).astype(np.uint32)  # adds M/2 to every entry
            reply.content.array_records[MASKED_KEY] = ArrayRecord({MASKED_ARRAY: Array(vec)})
        return reply

    grid = InProcessGrid(fixed_update_app(updates, weights, outer_mods=[inflate]), n)
    out = _secure_round(grid)
    assert out.arrays is None
    assert "outside (0," in (out.error or "") or "outside [0," in (out.error or "")


def test_the_update_not_the_weights_is_masked() -> None:
    """Sites mask trained-minus-global: a global model far outside the clipping range (8) still
    aggregates exactly, which Flower's legacy workflow (masking the weights) cannot do."""
    n = 3
    updates, weights = _updates(n), [1.0, 2.0, 3.0]
    base = ArrayRecord({k: Array(np.full(s, 100.0, np.float32)) for k, s in SHAPES.items()})
    grid = InProcessGrid(fixed_update_app(updates, weights), n)
    out = _secure_round(grid, base=base)
    assert out.arrays is not None
    expected = {k: 100.0 + v for k, v in weighted_mean(updates, weights).items()}
    # float32 spacing at 100 is ~8e-6: allow it on top of the quantisation bound.
    assert _gap(out.arrays, expected) <= _bound(updates, weights) + 1e-5


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_every_strategy_trains_through_secagg(tmp_path, name: str) -> None:
    """SecAgg+ replaces only FedAvg's exchange and mean: FedProx's config and FedAdam's server
    optimiser still apply, and one round gives the model it gives without SecAgg+."""
    from fedfuse.common.config import RunConfig
    from fedfuse.server.app import make_strategy
    from fedfuse.server.rundir import RunDirectory
    from fedfuse.server.secagg import SecAggPlusStrategy

    n = 3
    updates, weights = _updates(n, seed=5), [30.0, 20.0, 10.0]
    models = {}
    for on in (True, False):
        cfg = RunConfig(strategy=name, secagg=on, out_dir=str(tmp_path))
        strategy = make_strategy(
            cfg,
            run_dir=RunDirectory(tmp_path, cfg, run_id=f"{name}-{on}"),
            on_round=None,
            min_train_nodes=n,
            min_available_nodes=n,
        )
        assert isinstance(strategy, SecAggPlusStrategy) == on
        sites = strategy.strategy if on else strategy
        grid = InProcessGrid(fixed_update_app(updates, weights), n)
        config = ConfigRecord(cfg.to_mapping())
        messages = strategy.configure_train(1, _zeros(), config, grid)
        arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
        assert arrays is not None and metrics is not None
        assert sites.record.num_sites == n and len(sites.record.sites) == n
        models[on] = {k: arrays[k].numpy() for k in SHAPES}
    gap = max(float(np.abs(models[True][k] - models[False][k]).max()) for k in SHAPES)
    assert gap <= 10 * _bound(updates, weights), gap
