"""The privacy ledger: append, budget, duplicates, tamper evidence, audit, concurrency."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fedfuse.cli import app as cli
from fedfuse.common.errors import PrivacyBudgetExhaustedError
from fedfuse.common.privacy.accounting import DpSgdEvent, compose_identical, epsilon_from_events
from fedfuse.common.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerEntry,
    chain_hash,
)
from fedfuse.common.privacy.ledger_audit import audit
from fedfuse.ledger_report import plot_epsilon

ROOT = Path(__file__).resolve().parents[3]
EV = DpSgdEvent(1.3, 0.25, 4)


def _append(ledger: Ledger, run: str, rnd: int, *, event=EV, budget=math.inf, site="site-a"):
    return ledger.append(
        site=site,
        run_id=run,
        run_name=f"name-{run}",
        round=rnd,
        event=event,
        max_grad_norm=1.0,
        delta=1e-5,
        epsilon_budget=budget,
        model_hash="m" * 64,
    )


@pytest.fixture
def ledger3(tmp_path: Path) -> Ledger:
    """A ledger with three entries: run 1 rounds 1-2, run 2 round 1 (other noise)."""
    led = Ledger(tmp_path / "site" / ".fedfuse" / "ledger.sqlite")
    _append(led, "1", 1)
    _append(led, "1", 2)
    _append(led, "2", 1, event=DpSgdEvent(2.0, 0.25, 4))
    return led


def _raw(led: Ledger) -> sqlite3.Connection:
    """What a tamperer does: open the file with sqlite3 and drop the append-only triggers."""
    con = sqlite3.connect(led.path, isolation_level=None)
    con.execute("DROP TRIGGER entries_append_only_update")
    con.execute("DROP TRIGGER entries_append_only_delete")
    return con


def _audit_cli(path: Path, *args: str):
    return CliRunner().invoke(cli, ["audit", str(path), *args])


def test_entries_compose_every_event_and_chain(ledger3: Ledger):
    entries = ledger3.entries()
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS_HASH
    assert [e.prev_hash for e in entries[1:]] == [e.hash for e in entries[:-1]]
    events = [EV, EV, DpSgdEvent(2.0, 0.25, 4)]
    for i, e in enumerate(entries):
        assert e.epsilon == pytest.approx(epsilon_from_events(events[: i + 1], delta=1e-5))
    assert entries[0].epsilon < entries[1].epsilon < entries[2].epsilon
    assert ledger3.verify().ok
    # Every field the issue lists is stored.
    e = entries[2]
    assert (e.run_id, e.round, e.mechanism, e.accountant) == (
        "2",
        1,
        "poisson-sampled-gaussian",
        "prv",
    )
    assert (e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm, e.delta) == (
        2.0,
        0.25,
        4,
        1.0,
        1e-5,
    )
    assert e.model_hash == "m" * 64 and e.time.endswith("+00:00")


def test_merging_identical_events_is_exact_and_matches_the_closed_form():
    # With q = 1, k Gaussian steps of noise sigma are mu-GDP with mu = sqrt(k)/sigma, whose
    # exact epsilon(delta) is known (Balle & Wang 2018): an oracle independent of Opacus.
    from scipy.optimize import brentq
    from scipy.stats import norm

    events = [DpSgdEvent(3.0, 1.0, 2)] * 3 + [DpSgdEvent(3.0, 1.0, 4)]
    assert compose_identical(events) == [(3.0, 1.0, 10)]
    mu = math.sqrt(10) / 3.0

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    exact = brentq(lambda e: delta_of(e) - 1e-5, 1e-6, 50)
    prv = epsilon_from_events(events, delta=1e-5, accountant="prv")
    assert exact <= prv <= exact * 1.02 + 0.01  # an upper bound, and a tight one


def test_over_budget_is_refused_and_nothing_is_written(tmp_path: Path):
    led = Ledger(tmp_path / "l.sqlite")
    first = _append(led, "1", 1, budget=4.0)
    with pytest.raises(PrivacyBudgetExhaustedError) as exc:
        _append(led, "1", 2, budget=first.epsilon * 1.05)
    assert f"privacy budget exhausted: spent {first.epsilon:.4g} of" in str(exc.value)
    assert len(led.entries()) == 1 and led.verify().ok


def test_a_round_trained_again_is_another_attempt_and_counts(ledger3: Ledger):
    again = _append(ledger3, "1", 2)  # e.g. a resumed run re-sends round 2
    assert (again.seq, again.round, again.attempt) == (4, 2, 2)
    assert again.label() == "entry #4 (run name-1, round 2, attempt 2)"
    events = [EV, EV, DpSgdEvent(2.0, 0.25, 4), EV]
    assert again.epsilon == pytest.approx(epsilon_from_events(events, delta=1e-5))
    assert ledger3.verify().ok


def test_the_file_itself_refuses_updates_and_deletes(ledger3: Ledger):
    con = sqlite3.connect(ledger3.path)
    for sql in ("UPDATE entries SET steps = 1 WHERE seq = 2", "DELETE FROM entries WHERE seq = 3"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(sql)
    con.close()


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        # change a value
        (
            ["UPDATE entries SET noise_multiplier = 5.0 WHERE seq = 2"],
            "entry #2 (run name-1, round 2)",
        ),
        # delete a row in the middle
        (["DELETE FROM entries WHERE seq = 2"], "entry #3 (run name-2, round 1)"),
        # reorder rows: swap the positions of entries 2 and 3
        (
            [
                "UPDATE entries SET seq = 100 WHERE seq = 2",
                "UPDATE entries SET seq = 2 WHERE seq = 3",
                "UPDATE entries SET seq = 3 WHERE seq = 100",
            ],
            "entry #2 (run name-2, round 1)",
        ),
        # delete the last row (the head still records it)
        (["DELETE FROM entries WHERE seq = 3"], "entry #3 (missing: removed from the end)"),
    ],
    ids=["change-value", "delete-row", "reorder-rows", "delete-last-row"],
)
def test_tampering_exits_2_and_names_the_entry(ledger3: Ledger, tamper, named):
    site_folder = ledger3.path.parent.parent
    con = _raw(ledger3)
    for sql in tamper:
        con.execute(sql)
    con.close()
    res = _audit_cli(site_folder)
    assert res.exit_code == 2, res.output
    assert f"BROKEN at {named}" in res.output
    assert "TAMPERED OR INCONSISTENT (exit 2)" in res.output


def test_removing_the_triggers_alone_is_reported(ledger3: Ledger):
    _raw(ledger3).close()
    res = _audit_cli(ledger3.path, "--json")
    assert res.exit_code == 2
    report = json.loads(res.output)
    assert report["status"] == "tampered or inconsistent"
    assert report["ledgers"][0]["first_broken"] == "the ledger's append-only triggers"
    assert "append-only triggers were removed" in report["ledgers"][0]["chain_problems"][0]


def _rewrite_consistently(led: Ledger, seq: int, **changes) -> None:
    """A careful tamperer: change an entry AND recompute every hash after it (and the head)."""
    entries = led.entries()
    con = _raw(led)
    prev = entries[seq - 2].hash if seq > 1 else GENESIS_HASH
    for e in entries[seq - 1 :]:
        content = e.content() | {"prev_hash": prev}
        if e.seq == seq:
            content |= changes
        new = LedgerEntry(**content, hash=chain_hash(content))
        con.execute(
            "UPDATE entries SET noise_multiplier=?, epsilon=?, epsilon_budget=?, prev_hash=?, "
            "hash=? WHERE seq=?",
            (new.noise_multiplier, new.epsilon, new.epsilon_budget, prev, new.hash, e.seq),
        )
        prev = new.hash
    con.execute("UPDATE head SET hash = ? WHERE id = 1", (prev,))
    for name, op in (("update", "UPDATE"), ("delete", "DELETE")):
        con.execute(
            f"CREATE TRIGGER entries_append_only_{name} BEFORE {op} ON entries "
            "BEGIN SELECT RAISE(ABORT, 'the fedfuse privacy ledger is append-only'); END"
        )
    con.close()


def test_a_consistent_rewrite_is_caught_by_recomputation(ledger3: Ledger):
    # More noise claimed for entry 2, stored epsilons left alone: the chain is intact but the
    # events no longer give the stored epsilon.
    _rewrite_consistently(ledger3, 2, noise_multiplier=9.0)
    report = audit(ledger3.path)
    assert report.ledgers[0].chain.ok
    assert report.exit_code == 2
    assert any("entry #2" in p and "stored epsilon" in p for p in report.ledgers[0].problems)


def test_a_full_rewrite_is_caught_by_the_servers_anchors(ledger3: Ledger, tmp_path: Path):
    entries = ledger3.entries()
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    anchors = [{"round": e.round, "seq": e.seq, "hash": e.hash} for e in entries]
    privacy = {"sites": {"site-a": {"ledger": {"path": str(ledger3.path), "entries": anchors}}}}
    (run_dir / "privacy.json").write_text(json.dumps(privacy))
    assert audit(run_dir).exit_code == 0
    # Rewrite entry 3 with a consistent epsilon too: only the anchors can tell.
    e3 = entries[2]
    forged_eps = epsilon_from_events([EV, EV, DpSgdEvent(4.0, 0.25, 4)], delta=1e-5)
    _rewrite_consistently(ledger3, 3, noise_multiplier=4.0, epsilon=forged_eps)
    assert audit(ledger3.path).exit_code == 0  # no chain or recomputation problem
    report = audit(run_dir)
    assert report.exit_code == 2
    assert any(f"entry #{e3.seq}" in p and "rewritten" in p for p in report.ledgers[0].problems)


def test_budget_exceeded_exits_1(ledger3: Ledger):
    final = ledger3.entries()[-1].epsilon
    assert _audit_cli(ledger3.path, "--budget", str(final * 1.01)).exit_code == 0
    res = _audit_cli(ledger3.path, "--budget", str(final * 0.9))
    assert res.exit_code == 1 and "exceeds --budget" in res.output
    # An entry over the budget in force when written (e.g. by a site that did not enforce),
    # with an intact chain: exit 1, not 2.
    _rewrite_consistently(ledger3, 3, epsilon_budget=final * 0.5)
    res = _audit_cli(ledger3.path)
    assert res.exit_code == 1 and "exceeds the site budget" in res.output


def test_audit_table_json_and_plot(ledger3: Ledger, tmp_path: Path):
    other = Ledger(tmp_path / "data" / "site-b" / ".fedfuse" / "ledger.sqlite")
    _append(other, "1", 1, site="site-b", budget=6.0)
    _append(other, "1", 2, site="site-b", budget=6.0)
    data = tmp_path / "data"
    (data / "site-a").symlink_to(ledger3.path.parent.parent, target_is_directory=True)
    res = _audit_cli(data, "--plot", str(tmp_path / "eps.png"))
    assert res.exit_code == 0, res.output
    for needle in ("site-a", "site-b", "name-1", "name-2", "PRV", "RDP", "intact", "OK (exit 0)"):
        assert needle in res.output
    result = audit(data)
    report = result.as_dict()
    events = [ev for led in report["ledgers"] for ev in led["events"]]
    assert len(events) == 5
    for ev in events:
        for key in ("site", "run_id", "round", "noise_multiplier", "sample_rate", "steps"):
            assert key in ev
        assert ev["epsilon_prv"] <= ev["epsilon_rdp"]  # RDP is the looser bound
        assert ev["epsilon"] == pytest.approx(ev["epsilon_prv"], rel=0.01)
    with Image.open(tmp_path / "eps.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    # One curve per site (budget lines are extra, labelled as such).
    assert plot_epsilon(result, tmp_path / "again.png") == ["site-a", "site-b"]


def test_audit_rejects_a_path_without_ledgers(tmp_path: Path):
    res = _audit_cli(tmp_path)
    assert res.exit_code == 2 and "no ledger under" in res.output


_WRITER = """
import sys, time
from fedfuse.common.privacy.accounting import DpSgdEvent
from fedfuse.common.privacy.ledger import Ledger
path, run, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
led = Ledger(path)
while time.time() < start:  # both writers start together
    time.sleep(0.005)
for r in range(1, n + 1):
    led.append(site="s", run_id=run, run_name=run, round=r, event=DpSgdEvent(1.3, 0.25, 4),
               max_grad_norm=1.0, delta=1e-5, epsilon_budget=float("inf"), model_hash="m")
"""


def test_two_processes_appending_lose_nothing_and_fork_nothing(tmp_path: Path):
    path = tmp_path / "ledger.sqlite"  # not created yet: both processes race to create it too
    n = 6
    start = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), run, str(n), str(start)],
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in ("A", "B")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    led = Ledger(path)
    entries = led.entries()
    assert len(entries) == 2 * n
    assert {(e.run_id, e.round) for e in entries} == {
        (r, i) for r in ("A", "B") for i in range(1, n + 1)
    }
    assert led.verify().ok
    runs = "".join(e.run_id for e in entries)
    assert "AB" in runs or "BA" in runs  # they really interleaved
    # Each cumulative epsilon counts exactly the entries before it: nothing lost or forked.
    for k in (1, n, 2 * n):
        assert entries[k - 1].epsilon == pytest.approx(epsilon_from_events([EV] * k, delta=1e-5))


def test_simulate_exits_1_with_the_reason_when_the_run_stopped(monkeypatch, tmp_path, synth_root):
    """The CLI's outcome for a stopped run (the stop itself is tested end to end)."""
    import fedfuse.simulations.runner

    reason = "round 2: only 0 site(s) trained, fewer than min-sites 1 (site-0 refused: ...)"

    def stopped_run(cfg, **_):
        run_dir = tmp_path / "runs" / "r"
        run_dir.mkdir(parents=True)
        privacy = {"status": "stopped", "reason": reason, "sites": {}}
        (run_dir / "privacy.json").write_text(json.dumps(privacy))
        return run_dir

    monkeypatch.setattr(fedfuse.simulations.runner, "simulate", stopped_run)
    res = CliRunner().invoke(cli, ["simulate", "--data", str(synth_root), "--run-name", "r"])
    assert res.exit_code == 1
    assert "the run stopped: round 2: only 0 site(s) trained" in res.output
