"""A site that will refuse a round (its privacy budget) says so at SecAgg+ setup, before any key
exchange, as fields: the round goes on with the other sites, which are charged only for rounds
that counted (the real ServerApp logic and ClientApp over the in-process Grid)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.app.message_type import MessageType

from fedfuse.client.app import app as client_app
from fedfuse.client.budget import resolve_budget, write_site_file
from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.accounting import DpSgdEvent
from fedfuse.common.privacy.ledger import Ledger
from fedfuse.common.secagg.protocol import REFUSAL_KEY, Stage
from fedfuse.server.app import run_federation
from fedfuse.server.rundir import RunDirectory
from fedfuse.simulations.inprocess import InProcessGrid
from tests.support.secagg import fresh_sites, stage_of


def test_the_mod_refuses_at_setup_with_fields_and_makes_no_keys() -> None:
    """The site's mod asks its precheck at setup: a refusal goes back as fields, with no public
    keys, the training function is never called, and a later share-keys message is refused."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.client.mod.utils import make_ffn
    from flwr.supercore.task_identity import TaskIdentity

    from fedfuse.client.secagg_mod import SiteState, make_secaggplus_mod
    from fedfuse.common.privacy.refusal import Refusal
    from fedfuse.common.secagg import RoundParams, SecAggProtocolError, crypto
    from fedfuse.common.secagg.protocol import RECORD_KEY, Key

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    refusal = Refusal("site-9", 3, "privacy budget exhausted", spent=5.2, budget=5.0)
    asked: list[Message] = []
    trained: list[Message] = []

    def precheck(msg: Message, _ctxt: Context) -> Refusal | None:
        asked.append(msg)
        return refusal

    def train(msg: Message, _ctxt: Context) -> Message:
        trained.append(msg)
        return Message(RecordDict(), reply_to=msg)

    app = make_ffn(train, [make_secaggplus_mod(precheck=precheck)])
    ctxt = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    setup = {Key.STAGE: Stage.SETUP, **RoundParams(3, 3, 2, 8.0, 2**22, 2**32, 1000.0).to_record()}
    msg = Message(
        RecordDict({RECORD_KEY: ConfigRecord(setup)}), dst_node_id=5, message_type=MessageType.TRAIN
    )
    reply = app(msg, ctxt)
    rec = reply.content.config_records[RECORD_KEY]
    assert rec[Key.STAGE] == Stage.SETUP and rec[Key.REFUSED] == refusal.why
    assert Key.PK1 not in rec and Key.PK2 not in rec
    fields = reply.content.config_records[REFUSAL_KEY]
    assert Refusal.from_record(fields) == refusal
    assert dict(fields) == {
        "site": "site-9",
        "round": 3,
        "why": "privacy budget exhausted",
        "spent": 5.2,
        "budget": 5.0,
    }
    assert len(asked) == 1 and trained == []
    assert SiteState.load(ctxt).sk1 == b""  # no key pair was made
    keys = [crypto.generate_key_pair()[1] for _ in range(4)]
    share = {
        Key.STAGE: Stage.SHARE_KEYS,
        Key.NODE_IDS: [5, 6],
        Key.PK1_LIST: keys[:2],
        Key.PK2_LIST: keys[2:],
    }
    msg2 = Message(
        RecordDict({RECORD_KEY: ConfigRecord(share)}), dst_node_id=5, message_type=MessageType.TRAIN
    )
    with pytest.raises(SecAggProtocolError, match="setup did not run"):
        app(msg2, ctxt)


def _exhaust(site: Path) -> float:
    """Give ``site`` an earlier, uncapped spend (a real ledger entry), then a budget below it."""
    ledger = Ledger(resolve_budget({}, site).ledger_path)
    entry = ledger.append(
        site=site.name,
        run_id="an-earlier-federation",
        run_name="earlier",
        round=1,
        event=DpSgdEvent(0.6, 1.0, 50),
        max_grad_norm=1.0,
        delta=1e-5,
        epsilon_budget=math.inf,
        model_hash="0" * 64,
    )
    write_site_file(site, epsilon_budget=2.0, delta=1e-5)
    assert entry.epsilon > 2.0
    return entry.epsilon


def test_the_real_client_app_refuses_at_setup_under_distributed_dp(
    tmp_path: Path, synth_sites: list[Path]
) -> None:
    """The ClientApp itself (mods and precheck, a deployed site with a real ledger) answers a
    SecAgg+ setup message under distributed DP with the refusal's fields and no keys -- the
    round's event sized from the site's own model and the setup's threshold -- and a site with
    budget left answers with its public keys. (Record-level DP: the e2e test above.)"""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedfuse.common.privacy.refusal import Refusal
    from fedfuse.common.secagg import RoundParams
    from fedfuse.common.secagg.protocol import RECORD_KEY, Key

    data = fresh_sites(synth_sites[:2], tmp_path / "data")
    spent = _exhaust(data / "site-1")
    cfg = RunConfig(dp_level="distributed", num_rounds=2, target_epsilon=4.0, accountant="rdp")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    setup = {Key.STAGE: Stage.SETUP, **RoundParams(3, 3, 2, 8.0, 2**22, 2**32, 1000.0).to_record()}
    replies = {}
    for name in ("site-0", "site-1"):
        config = {**cfg.to_mapping(), "server-round": 1, "run-uid": "u-setup"}
        msg = Message(
            RecordDict({RECORD_KEY: ConfigRecord(setup), "config": ConfigRecord(config)}),
            dst_node_id=5,
            message_type=MessageType.TRAIN,
        )
        node = {"data-path": str(data / name)}
        ctxt = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
        replies[name] = client_app(msg, ctxt)
    ok, refused = replies["site-0"], replies["site-1"]
    assert not ok.has_error() and not refused.has_error()
    assert Key.PK1 in ok.content.config_records[RECORD_KEY]
    assert REFUSAL_KEY not in ok.content.config_records
    rec = refused.content.config_records[RECORD_KEY]
    assert Key.REFUSED in rec and Key.PK1 not in rec
    refusal = Refusal.from_record(refused.content.config_records[REFUSAL_KEY])
    assert (refusal.site, refusal.round, refusal.budget) == ("site-1", 1, 2.0)
    assert refusal.spent == pytest.approx(spent, rel=1e-6)
    # Its would-reach counts the round's distributed-DP event.
    assert refusal.would_reach is not None and refusal.would_reach > refusal.spent
    assert refusal.budget_exhausted
    # Nothing was charged: a refusal at setup writes no ledger entry.
    assert _ledger_runs(data / "site-1") == [("an-earlier-federation", 1)]
    assert _ledger_runs(data / "site-0") == []


def _run(  # noqa: ANN202
    tmp_path: Path,
    synth_sites: list[Path],
    sites: int,
    exhausted: str,
    dp_level: str = "record",
):
    data = fresh_sites(synth_sites[:sites], tmp_path / "data")
    spent = _exhaust(data / exhausted)
    cfg = RunConfig(
        data_dir=str(data),
        out_dir=str(tmp_path / "runs"),
        num_rounds=2,
        local_epochs=1,
        batch_size=64,
        target_epsilon=4.0,
        accountant="rdp",
        min_sites=1,
        run_name="refusal",
        dp_level=dp_level,
    )
    assert cfg.secagg
    delivered: list[tuple[int, str | None]] = []
    grid: InProcessGrid

    def respond(msg: Message) -> bool:
        if msg.metadata.message_type == MessageType.TRAIN:  # evaluation goes to every site
            delivered.append((grid.partition(msg.metadata.dst_node_id), stage_of(msg)))
        return True

    grid = InProcessGrid(client_app, sites, respond=respond)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id=cfg.run_name)
    run_federation(grid, cfg, run_dir=run_dir)
    return data, run_dir, grid, delivered, spent


def _ledger_runs(site: Path) -> list[tuple[str, int]]:
    return [(e.run_id, e.round) for e in Ledger(resolve_budget({}, site).ledger_path).entries()]


@pytest.mark.e2e
def test_a_refusing_site_leaves_before_the_key_exchange_and_the_round_goes_on(
    tmp_path: Path, synth_sites: list[Path]
) -> None:
    data, run_dir, grid, delivered, spent = _run(tmp_path, synth_sites, 3, "site-2")
    refusing = 2
    # Site 2 only ever saw setup training messages: no key exchange, no model to train on.
    assert {stage for site, stage in delivered if site == refusing} == {Stage.SETUP}
    assert {stage for site, stage in delivered if site != refusing} >= set(Stage.ORDER)
    # Its refusal travelled as fields.
    refusals = [
        m.content.config_records[REFUSAL_KEY]
        for m in grid.received
        if m.has_content() and REFUSAL_KEY in m.content.config_records
    ]
    assert len(refusals) == 2  # one per round
    for rec in refusals:
        assert rec["site"] == "site-2" and rec["round"] in (1, 2)
        assert rec["budget"] == 2.0 and rec["spent"] == pytest.approx(spent, rel=1e-6)
        assert rec["would-reach"] >= rec["spent"] > rec["budget"]
        assert rec["why"].startswith("privacy budget exhausted")
    # Both rounds completed with the two other sites; the refusing site is named.
    status = json.loads((run_dir.path / "status.json").read_text())
    assert status["status"] == "completed", status
    rounds = [json.loads(x) for x in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["num-sites"] for r in rounds] == [2, 2]
    for r in rounds:
        trained = sorted(n for n, site in r["sites"].items() if "epsilon" in site)
        assert trained == ["site-0", "site-1"]  # (every site evaluates the global model)
        assert r["refused"]["site-2"].startswith("privacy budget exhausted")
        assert r["refusals"]["site-2"]["budget"] == 2.0
        assert not r.get("failed")
    # Ledgers: the others grew by exactly the two rounds that counted; site-2 by nothing.
    uid = run_dir.uid
    assert _ledger_runs(data / "site-0") == [(uid, 1), (uid, 2)]
    assert _ledger_runs(data / "site-1") == [(uid, 1), (uid, 2)]
    assert _ledger_runs(data / "site-2") == [("an-earlier-federation", 1)]


@pytest.mark.e2e
@pytest.mark.parametrize("dp_level", ["record", "distributed"])
def test_too_few_sites_left_after_refusals_stop_the_run_cleanly(
    tmp_path: Path, synth_sites: list[Path], dp_level: str
) -> None:
    """The README's third ledger-demo run: 2 sites, one refuses. One site cannot be securely
    aggregated (its 'sum' is its update), so the run stops, naming the refusal; the other site
    never trains, so it is not charged. Under distributed DP too: its refusal also comes before
    any key is shared."""
    data, run_dir, _grid, delivered, _ = _run(tmp_path, synth_sites, 2, "site-1", dp_level)
    assert {stage for _, stage in delivered} == {Stage.SETUP}  # nobody shared keys
    status = json.loads((run_dir.path / "status.json").read_text())
    assert status["status"] == "stopped", status
    assert status["reason"].startswith(
        "round 1: 1 site(s) left to train after refusals, fewer than secure aggregation's "
        "reconstruction threshold 2 (site-1 refused: privacy budget exhausted: spent "
    ), status
    rounds = [json.loads(x) for x in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 1 and rounds[0]["num-sites"] == 0
    assert _ledger_runs(data / "site-0") == []
