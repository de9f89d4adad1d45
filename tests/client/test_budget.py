"""The site's budget at the client: where it comes from, planning with earlier spend,
refusals before and after training, non-private runs, and a site restarted between rounds."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedfuse.client.budget import (
    RoundRefused,
    SiteBudget,
    SiteLedger,
    resolve_budget,
    write_site_file,
)
from fedfuse.client.training import RoundResult
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events
from fedfuse.common.privacy.ledger import Ledger
from tests.support.sites import copy_site

ROOT = Path(__file__).resolve().parents[2]
# RDP plans the run's noise in a fraction of PRV's time; the ledger always composes with PRV.
CFG = RunConfig(num_rounds=2, local_epochs=1, batch_size=64, target_epsilon=4.0, accountant="rdp")
NUM_TRAIN = 180  # 3 batches of 64 per epoch: q = 1/3, 3 steps per round


def _round(guard: SiteLedger, run: str, rnd: int, cfg: RunConfig = CFG):
    """prepare + record, as the ClientApp does around training (training itself skipped)."""
    permit = guard.prepare(cfg=cfg, run_id=run, server_round=rnd, num_train=NUM_TRAIN)
    plan = permit.plan
    event = (
        DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round) if plan else None
    )
    entry = guard.record(
        cfg=cfg,
        run_id=run,
        run_name=f"run-{run}",
        server_round=rnd,
        result=RoundResult(0.5, NUM_TRAIN, event, 0.0),
        global_model_hash="g" * 64,
    )
    return permit, entry


def _guard(path: Path, epsilon: float = math.inf, delta: float = 1e-5) -> SiteLedger:
    return SiteLedger(SiteBudget(epsilon, delta, path, "test"), site="site-x")


def test_budget_comes_from_node_config_then_site_file_then_no_cap(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    b = resolve_budget({}, site)
    assert (b.epsilon, b.delta, b.source) == (math.inf, 1e-5, "no budget set")
    assert b.ledger_path == site / ".fedfuse" / "ledger.sqlite"
    write_site_file(site, epsilon_budget=6.0, delta=1e-6)
    b = resolve_budget({}, site)
    assert (b.epsilon, b.delta) == (6.0, 1e-6) and b.source.endswith("site.toml")
    b = resolve_budget({"epsilon-budget": 3.0, "ledger-path": str(tmp_path / "l.db")}, site)
    assert (b.epsilon, b.delta, b.ledger_path) == (3.0, 1e-6, tmp_path / "l.db")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("epsilon-budget = -1\n", "'epsilon-budget' must be in range (0, inf]"),
        ("epsilon-budget = 2\ndelta = 1.5\n", "'delta' must be in range (0, 1)"),
        ("epsilon = 2\n", "unknown key(s) ['epsilon']; known keys: ['epsilon-budget', 'delta']"),
        ("epsilon-budget = 'lots'\n", "'epsilon-budget' must be a number"),
        ("epsilon-budget = \n", "not valid TOML"),
    ],
)
def test_a_bad_site_file_names_the_file_and_the_key(tmp_path: Path, text: str, needle: str):
    (tmp_path / ".fedfuse").mkdir()
    (tmp_path / ".fedfuse" / "site.toml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        resolve_budget({}, tmp_path)
    assert needle in str(exc.value) and "site.toml" in str(exc.value)


def test_second_run_starts_where_the_first_ended_and_fits_the_budget(tmp_path: Path):
    path = tmp_path / "ledger.sqlite"
    g = _guard(path)
    _, e1 = _round(g, "1", 1)
    p2, e2 = _round(g, "1", 2)
    assert p2.lifetime_start == 0.0 and p2.lifetime_spent == e1.epsilon
    assert e2.epsilon <= CFG.target_epsilon * 1.001
    # Run 2, with a lifetime budget that the run's own target would overshoot: more noise.
    budget = e2.epsilon + 0.8
    g = _guard(path, budget)
    p3, e3 = _round(g, "2", 1)
    assert p3.lifetime_start == e2.epsilon  # starts at the first run's final epsilon
    assert p3.plan.noise_multiplier > e1.noise_multiplier
    p4, e4 = _round(g, "2", 2)
    assert p4.lifetime_start == e2.epsilon and p4.lifetime_spent == e3.epsilon
    assert e2.epsilon < e3.epsilon < e4.epsilon <= budget
    assert e4.epsilon >= budget - 0.02 * 0.8  # and uses what was left, not much less
    # The ledger's epsilon is the composition of every event of both runs.
    events = [e.event for e in Ledger(path).entries()]
    assert e4.epsilon == pytest.approx(epsilon_from_events(events, delta=1e-5), rel=1e-9)
    # A third run finds nothing useful left: refused before training, nothing written.
    with pytest.raises(RoundRefused, match=r"privacy budget exhausted: spent [\d.]+ of [\d.]+"):
        _round(g, "3", 1)
    assert len(Ledger(path).entries()) == 4


def test_refused_in_the_round_that_would_exceed_when_the_ledger_grew(tmp_path: Path):
    """Another federation on the same data spends between two rounds of this one."""
    path = tmp_path / "ledger.sqlite"
    _, e1 = _round(_guard(path), "mine", 1)
    other = _guard(path)
    _round(other, "other", 1)
    _round(other, "other", 2)
    spent = Ledger(path).entries()[-1].epsilon
    g = _guard(path, spent + 0.3)  # some budget left, but less than one round of "mine"
    with pytest.raises(RoundRefused) as exc:
        _round(g, "mine", 2)
    assert f"privacy budget exhausted: spent {spent:.4g} of {spent + 0.3:.4g}" in exc.value.why
    assert Ledger(path).find("mine", 2) is None and len(Ledger(path).entries()) == 3


def test_record_rechecks_the_budget_after_training(tmp_path: Path):
    """prepare() passed, then another process appended while this site trained: the update
    must not leave the site, and the ledger gets no entry for it."""
    path = tmp_path / "ledger.sqlite"
    g = _guard(path)
    _round(g, "a", 1)
    permit = g.prepare(cfg=CFG, run_id="a", server_round=2, num_train=NUM_TRAIN)
    _round(_guard(path), "b", 1)  # the concurrent spend
    tight = _guard(path, permit.lifetime_after + 0.01)  # fits alone, not after "b"
    plan = permit.plan
    event = DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    with pytest.raises(RoundRefused, match="privacy budget exhausted"):
        tight.record(
            cfg=CFG,
            run_id="a",
            run_name="a",
            server_round=2,
            result=RoundResult(0.5, NUM_TRAIN, event, 0.0),
            global_model_hash="g",
        )
    assert Ledger(path).find("a", 2) is None


def test_non_private_training_needs_an_uncapped_site_and_is_recorded(tmp_path: Path):
    path = tmp_path / "ledger.sqlite"
    no_dp = CFG.replace(target_epsilon=math.inf)
    with pytest.raises(RoundRefused, match="privacy budget exhausted: spent 0 of 8"):
        _round(_guard(path, 8.0), "x", 1, no_dp)
    _, entry = _round(_guard(path), "x", 1, no_dp)
    assert entry.mechanism == "none" and entry.epsilon == math.inf
    # From then on the data has no finite guarantee: a capped site refuses everything...
    with pytest.raises(RoundRefused, match="spent inf of 8"):
        _round(_guard(path, 8.0), "y", 1)
    # ...while an uncapped one still trains (with DP) and records it.
    _, later = _round(_guard(path), "z", 1)
    assert later.mechanism == "poisson-sampled-gaussian" and later.epsilon == math.inf


def test_a_broken_ledger_stops_training(tmp_path: Path):
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    _round(_guard(path), "a", 1)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("DROP TRIGGER entries_append_only_update")
    con.execute("UPDATE entries SET steps = 1")
    con.close()
    with pytest.raises(RoundRefused, match=r"is broken at entry #1 .*fedfuse audit"):
        _round(_guard(path), "a", 2)


# One real ClientApp round in a fresh process; the process stays alive (a running site) until
# the test kills it.
_SITE = """
import json, sys, time
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedfuse.client.app import app
from fedfuse.common.config import RunConfig
from fedfuse.common.models import build_model

site, rnd, run_id, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
# What a SuperNode sets for the task it runs.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 7, 1
cfg = RunConfig(num_rounds=3, local_epochs=1, batch_size=64, target_epsilon=4.0,
                accountant="rdp")
torch.manual_seed(0)
model = build_model(cfg)
context = Context(run_id=run_id, node_id=7, node_config={"data-path": site,
                  # Opted in: the test reads the site internals from the reply.
                  "share-site-metrics": True}, state=RecordDict(),
                  run_config={})

def one_round(r):
    config = ConfigRecord(
        {**cfg.to_mapping(), "server-round": r, "run-id": "restart", "run-uid": "u-restart"}
    )
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}),
                  dst_node_id=7, message_type="train")
    reply = app(msg, context)
    if reply.has_error():
        return {"error": reply.error.reason}
    return dict(reply.content["metrics"])

out = [one_round(rnd)] + ([one_round(rnd)] if repeat else [])
print("RESULT " + json.dumps(out), flush=True)
time.sleep(600)  # a live site, waiting for the next round
"""


def _site_process(site: Path, rnd: int, *, repeat: bool = False) -> list[dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SITE, str(site), str(rnd), "4242", "1" if repeat else "0"],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        raise AssertionError(proc.stderr.read()[-3000:])  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)  # killed between rounds, as a crash would
        proc.wait(timeout=30)


def test_a_site_killed_between_rounds_continues_from_its_ledger(tmp_path: Path, synth_sites):
    site = tmp_path / "site"
    copy_site(synth_sites[0], site)
    (r1,) = _site_process(site, 1)
    assert "error" not in r1, r1
    # A new process: nothing in memory, a fresh Flower Context; the same run goes on.
    r2, again = _site_process(site, 2, repeat=True)
    assert "error" not in r2, r2
    assert r2["noise-multiplier"] == r1["noise-multiplier"]  # the plan came from the ledger
    assert r2["lifetime-epsilon"] > r1["lifetime-epsilon"]  # epsilon continues, never resets
    assert r2["lifetime-epsilon-start"] == r1["lifetime-epsilon-start"] == 0.0
    assert r2["ledger-seq"] == 2
    # The run's own epsilon after round 2 composes rounds 1 and 2, exactly once each.
    ledger = Ledger(site / ".fedfuse" / "ledger.sqlite")
    entries = ledger.entries()
    assert [(e.run_id, e.round, e.attempt) for e in entries] == [
        ("u-restart", 1, 1),
        ("u-restart", 2, 1),
        ("u-restart", 2, 2),
    ]
    two = [e.event for e in entries[:2]]
    assert r2["lifetime-epsilon"] == pytest.approx(epsilon_from_events(two, delta=1e-5))
    assert r2["epsilon"] == pytest.approx(epsilon_from_events(two, delta=1e-5, accountant="rdp"))
    # Round 2 sent again (e.g. by a resumed server): training again is another release, counted
    # as a second attempt -- the lifetime epsilon only grows.
    assert "error" not in again, again
    assert again["ledger-seq"] == 3 and again["lifetime-epsilon"] > r2["lifetime-epsilon"]
    assert again["lifetime-epsilon"] == pytest.approx(
        epsilon_from_events([e.event for e in entries], delta=1e-5)
    )


def test_a_refusal_without_secagg_travels_as_fields(
    tmp_path: Path, synth_sites: list[Path]
) -> None:
    """The real ClientApp at a deployed site past its budget, without SecAgg+: the train reply
    is the refusal's fields (site, round, spent, budget, would-reach) and the site record -- no
    model, no error text to parse -- and the server records it as a refusal, field by field."""
    from fedfuse.client.app import app as client_app
    from fedfuse.common.privacy.refusal import REFUSAL_KEY, Refusal
    from fedfuse.server.privacy_report import note_error
    from fedfuse.server.round_record import RoundRecord
    from tests.support.requests import _train_request

    site = tmp_path / "site-1"
    copy_site(synth_sites[1], site)
    earlier = Ledger(resolve_budget({}, site).ledger_path).append(
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
    cfg = RunConfig(num_rounds=1, batch_size=64, target_epsilon=4.0, secagg=False)
    msg, ctxt = _train_request(cfg, site, **{"run-id": "plain", "run-uid": "u-plain"})
    reply = client_app(msg, ctxt)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {REFUSAL_KEY, "site"}
    refusal = Refusal.from_record(reply.content.config_records[REFUSAL_KEY])
    assert (refusal.site, refusal.round, refusal.budget) == ("site-1", 1, 2.0)
    assert refusal.spent == pytest.approx(earlier.epsilon)
    assert refusal.would_reach is not None and refusal.would_reach >= refusal.spent > 2.0
    assert refusal.budget_exhausted and refusal.why.startswith("privacy budget exhausted")
    record = RoundRecord(round=1)
    assert note_error(record, reply, "node-7") == ("site-1", refusal.why, True)
    assert record.refusals["site-1"] == refusal.to_record() and not record.failed
    assert len(Ledger(resolve_budget({}, site).ledger_path).entries()) == 1  # nothing charged
