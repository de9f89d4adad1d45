"""A site's ledger cannot be quietly reset: a site that has trained refuses to train without its
ledger, a rewritten ledger head is caught by the HMAC-authenticated head beside the site's
secret, a deliberate reset is a recorded command, and the audit checks that every recorded
sampling rate is one the site could verify."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfuse.cli import app as cli_app
from fedfuse.client.budget import RoundRefused, SiteLedger, resolve_budget
from fedfuse.client.training import RoundResult
from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.accounting import DpSgdEvent
from fedfuse.common.privacy.ddgauss import DdgEvent
from fedfuse.common.privacy.ledger import Ledger
from fedfuse.common.privacy.ledger_audit import EXIT_OK, EXIT_TAMPERED, audit
from fedfuse.common.site_state import HEAD_NAME

# RDP plans the noise in a fraction of PRV's time; the ledger always composes with PRV.
CFG = RunConfig(num_rounds=2, local_epochs=1, batch_size=64, target_epsilon=4.0, accountant="rdp")
NUM_TRAIN = 180


def _train(site: Path, run: str, rnd: int) -> None:
    """prepare + record, as the ClientApp does around training (training itself skipped)."""
    guard = SiteLedger(resolve_budget({}, site), site="site-x")
    permit = guard.prepare(cfg=CFG, run_id=run, server_round=rnd, num_train=NUM_TRAIN)
    plan = permit.plan
    assert plan is not None
    event = DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    guard.record(
        cfg=CFG,
        run_id=run,
        run_name=run,
        server_round=rnd,
        result=RoundResult(0.5, NUM_TRAIN, event, 0.0),
        global_model_hash="g" * 64,
    )


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site-x"
    site.mkdir()
    _train(site, "a", 1)
    _train(site, "a", 2)
    return site


def test_a_site_that_trained_refuses_without_its_ledger_until_a_recorded_reset(tmp_path: Path):
    site = _site(tmp_path)
    ledger = site / ".fedfuse" / "ledger.sqlite"
    ledger.unlink()
    with pytest.raises(RoundRefused) as refused:
        _train(site, "b", 1)
    assert "missing but this site has trained before (2 entries" in refused.value.why
    assert "fedfuse ledger reset <site folder> --reason" in refused.value.why
    assert not ledger.exists()  # refusing created no fresh, empty ledger
    report = audit(site)
    assert report.exit_code == EXIT_TAMPERED
    assert "its ledger .fedfuse/ledger.sqlite is missing" in report.missing[0]

    result = CliRunner().invoke(cli_app, ["ledger", "reset", str(site), "--reason", "lost disk"])
    assert result.exit_code == 0, result.output
    assert "2 earlier entries; there was no ledger file" in result.output
    _train(site, "b", 1)  # trains again, from lifetime epsilon 0, after a recorded reset
    assert json.loads(Ledger(ledger).meta("reset") or "{}")["reason"] == "lost disk"
    report = audit(site)
    assert report.exit_code == EXIT_OK, report.as_dict()
    (a,) = report.ledgers
    assert any("reset on purpose" in n and "'lost disk'" in n for n in a.notes)


def test_a_reset_keeps_the_old_ledger_and_needs_a_reason(tmp_path: Path):
    site = _site(tmp_path)
    runner = CliRunner()
    assert runner.invoke(cli_app, ["ledger", "reset", str(site), "--reason", " "]).exit_code == 2
    result = runner.invoke(cli_app, ["ledger", "reset", str(site), "--reason", "new study"])
    assert result.exit_code == 0, result.output
    (kept,) = (site / ".fedfuse").glob("ledger.sqlite.reset-*")
    assert len(Ledger(kept, create=False).entries()) == 2
    assert Ledger(site / ".fedfuse" / "ledger.sqlite").entries() == []


def _drop_last_entry_and_rewrite_head(ledger: Path) -> None:
    """The attack a chain in one unkeyed file cannot see: remove the last entry, rewrite the
    head row to the new last entry, re-create the append-only triggers."""
    con = sqlite3.connect(ledger, isolation_level=None)
    triggers = con.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    con.execute("DROP TRIGGER entries_append_only_update")
    con.execute("DROP TRIGGER entries_append_only_delete")
    con.execute("DELETE FROM entries WHERE seq = (SELECT MAX(seq) FROM entries)")
    (h,) = con.execute("SELECT hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    con.execute("UPDATE head SET count = count - 1, hash = ? WHERE id = 1", (h,))
    for (sql,) in triggers:
        con.execute(sql)
    con.close()


def test_a_rewritten_head_is_caught_by_the_authenticated_head(tmp_path: Path):
    site = _site(tmp_path)
    ledger = site / ".fedfuse" / "ledger.sqlite"
    _drop_last_entry_and_rewrite_head(ledger)
    assert Ledger(ledger).verify().ok  # the chain alone cannot see it
    report = audit(site)
    assert report.exit_code == EXIT_TAMPERED
    (a,) = report.ledgers
    assert any("authenticated ledger head records 2 entries" in p for p in a.problems), a.problems
    with pytest.raises(RoundRefused, match="disagrees with its authenticated head"):
        _train(site, "b", 1)


def test_a_forged_head_fails_its_hmac(tmp_path: Path):
    site = _site(tmp_path)
    ledger = site / ".fedfuse" / "ledger.sqlite"
    _drop_last_entry_and_rewrite_head(ledger)
    head_file = site / ".fedfuse" / HEAD_NAME
    head = json.loads(head_file.read_text())
    last = Ledger(ledger).entries()[-1]
    head.update(count=last.seq, hash=last.hash)  # made to match, without the site's key
    head_file.write_text(json.dumps(head))
    (a,) = audit(site).ledgers
    assert any("HMAC does not match" in p for p in a.problems), a.problems
    with pytest.raises(RoundRefused, match="HMAC does not match"):
        _train(site, "b", 1)


def test_a_removed_head_is_noticed(tmp_path: Path):
    site = _site(tmp_path)
    (site / ".fedfuse" / HEAD_NAME).unlink()
    (a,) = audit(site).ledgers
    assert any("authenticated head" in p and "is missing" in p for p in a.problems), a.problems
    with pytest.raises(RoundRefused, match="authenticated ledger head"):
        _train(site, "b", 1)


@pytest.mark.parametrize(("rate", "ok"), [(1.0, True), (0.5, False)])
def test_audit_accepts_only_sampling_rates_the_site_could_verify(
    tmp_path: Path, rate: float, ok: bool
):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    common = dict(site="s", run_id="r", run_name="r", max_grad_norm=1.0, delta=1e-5)
    common |= dict(epsilon_budget=math.inf, model_hash="m" * 64)
    # DP-SGD at the site's own Poisson rate: the site sampled itself, any rate is verifiable.
    ledger.append(round=1, event=DpSgdEvent(1.0, 1 / 3, 3), **common)  # type: ignore[arg-type]
    ddg = DdgEvent(sensitivity=100.0, local_std=80.0, min_sites=2, dim=64, sample_rate=rate)
    ledger.append(round=2, event=ddg, **common)  # type: ignore[arg-type]
    (a,) = audit(tmp_path / "ledger.sqlite").ledgers
    flagged = [p for p in a.problems if "sampling rate" in p]
    assert not flagged if ok else len(flagged) == 1 and "entry #2" in flagged[0], a.problems


def test_a_ledger_kept_apart_from_the_site_folder_is_still_anchored(tmp_path: Path):
    """Node config ``ledger-path`` puts the ledger elsewhere; the head stays with the secret."""
    site, ledger = tmp_path / "site-y", tmp_path / "var" / "ledger.sqlite"
    site.mkdir()
    budget = resolve_budget({"ledger-path": str(ledger)}, site)
    guard = SiteLedger(budget, site="site-y")
    permit = guard.prepare(cfg=CFG, run_id="a", server_round=1, num_train=NUM_TRAIN)
    assert permit.plan is not None
    event = DpSgdEvent(permit.plan.noise_multiplier, permit.plan.sample_rate, 3)
    result = RoundResult(0.5, NUM_TRAIN, event, 0.0)
    guard.record(
        cfg=CFG, run_id="a", run_name="a", server_round=1, result=result, global_model_hash="g"
    )
    assert (site / ".fedfuse" / HEAD_NAME).is_file()
    assert audit(ledger).exit_code == EXIT_OK
    ledger.unlink()
    with pytest.raises(RoundRefused, match="missing but this site has trained before"):
        SiteLedger(budget, site="site-y")
