"""Two real federations on the same site data: the ledger composes across runs, a site that
would exceed its budget refuses in that round, the run goes on without it, and stops when too
few sites are left.

Both federations run in process (``engine="inprocess"``: the real ServerApp and ClientApp, each
message serialised as on the wire, without Ray's start-up): what is tested is the sites' ledger
and the server's handling of refusals, not the engine (tests/simulations/test_e2e_simulation.py
covers Flower's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant
from PIL import Image

from fedfuse.client.budget import write_site_file
from fedfuse.common.privacy.client_level_dp import client_level_epsilon
from fedfuse.common.privacy.ledger import Ledger
from fedfuse.common.privacy.ledger_audit import audit
from fedfuse.ledger_report import plot_epsilon
from fedfuse.simulations.runner import FederationFailedError, simulate
from tests.support.sites import copy_site


def _ledger(site: Path) -> Ledger:
    return Ledger(site / ".fedfuse" / "ledger.sqlite")


def _independent_epsilon(ledger: Ledger, delta: float) -> float:
    """Opacus' PRV accountant stepped once per DP-SGD step, as Opacus itself would during
    training: no merging, no fedfuse code between the stored events and the number."""
    acc = PRVAccountant()
    for e in ledger.entries():
        for _ in range(e.steps):
            acc.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    return acc.get_epsilon(delta=delta)


@pytest.mark.e2e
def test_ledger_across_two_runs_with_refusal_and_stop(synth_sites, small_cfg, tmp_path):
    data = tmp_path / "data"
    for s in synth_sites[:2]:
        copy_site(s, data / s.name)
    sites = [data / "site-0", data / "site-1"]
    cfg = small_cfg.replace(data_dir=str(data), accountant="rdp")

    # Run 1: both sites, 2 rounds, no budget set (spend recorded, not capped); client-level DP
    # on top of the sites' DP-SGD.
    client_dp = {
        "dp_level": "record+client",
        "client_clip_norm": 2.0,
        "client_noise_multiplier": 0.5,
    }
    run1 = simulate(
        cfg.replace(run_name="first", min_sites=2, **client_dp), num_sites=2, engine="inprocess"
    )
    p1 = json.loads((run1 / "privacy.json").read_text())
    assert p1["status"] == "completed" and p1["level"] == "record+client"
    client = p1["client_level"]
    assert (client["rounds"], client["sample_rates"], client["clip_norm"]) == (2, [1.0, 1.0], 2.0)
    assert client["epsilon"] == pytest.approx(
        client_level_epsilon([1.0, 1.0], noise_multiplier=0.5, delta=1e-5)
    )
    assert "Client-level DP (`dp-level = record+client`)" in (run1 / "summary.md").read_text()
    for s in sites:
        entries = _ledger(s).entries()
        assert [e.round for e in entries] == [1, 2]
        site = p1["sites"][s.name]
        # The lifetime spend stays at the site (it tells of the data's other uses).
        assert "lifetime_epsilon" not in site and "lifetime_epsilon_start" not in site
        assert [a["hash"] for a in site["ledger"]["entries"]] == [e.hash for e in entries]

    # Run 2: 3 rounds, min-sites 1. After round 1 site-1 lowers its budget to just above what
    # it has spent; after round 2 site-0 does too.
    def lower_budgets(rec: dict) -> None:
        for name in {1: ["site-1"], 2: ["site-0"]}.get(rec["round"], []):
            spent = _ledger(data / name).entries()[-1].epsilon
            write_site_file(data / name, epsilon_budget=spent + 0.01, delta=1e-5)

    # A run that stops is a failure the caller sees (simulate raises; the CLI exits non-zero),
    # and its run directory keeps what happened.
    with pytest.raises(FederationFailedError, match="privacy budget exhausted"):
        simulate(
            # One site left in round 3: secure aggregation needs two, so this run goes without
            # it (run 1 above covers the ledger and client-level DP under SecAgg+).
            cfg.replace(run_name="second", min_sites=1, num_rounds=3, secagg=False),
            num_sites=2,
            on_round=lower_budgets,
            engine="inprocess",
        )
    run2 = Path(cfg.out_dir) / "second"
    p2 = json.loads((run2 / "privacy.json").read_text())
    rounds = [json.loads(x) for x in (run2 / "metrics.jsonl").read_text().splitlines()]

    # Composition: the second run starts at the first run's final epsilon.
    for s in sites:
        entries = _ledger(s).entries()
        first = [e for e in entries if e.run_name == "first"]
        second = [e for e in entries if e.run_name == "second"]
        assert second and second[0].epsilon > first[-1].epsilon
    # site-1 refused round 2 (where it would exceed), with no ledger entry for it.
    trained = {n for n, s in rounds[1]["sites"].items() if "epsilon" in s}
    assert trained == {"site-0"}
    why = rounds[1]["refused"]["site-1"]
    assert why.startswith("privacy budget exhausted: spent ")
    runs1 = _ledger(sites[1]).entries()
    assert [(e.run_name, e.round) for e in runs1] == [("first", 1), ("first", 2), ("second", 1)]
    assert f"spent {runs1[-1].epsilon:.4g} of {runs1[-1].epsilon + 0.01:.4g}" in why
    fields = rounds[1]["refusals"]["site-1"]  # without SecAgg+ too, it travelled as fields
    assert (fields["site"], fields["round"]) == ("site-1", 2)
    assert fields["spent"] == pytest.approx(runs1[-1].epsilon)
    assert fields["budget"] == pytest.approx(runs1[-1].epsilon + 0.01)
    assert fields["would-reach"] > fields["budget"]
    # The run went on with site-0, then stopped when site-0 refused too (min-sites 1).
    assert rounds[1]["num-sites"] == 1 and rounds[2]["num-sites"] == 0
    assert p2["status"] == "stopped"
    assert "round 3: only 0 site(s) trained, fewer than min-sites 1" in p2["reason"]
    assert "site-0 refused: privacy budget exhausted" in p2["reason"]
    summary = (run2 / "summary.md").read_text()
    assert "Status: **stopped**" in summary and "lifetime before" in summary
    assert [r["round"] for r in p2["sites"]["site-1"]["refused"]] == [2, 3]
    runs0 = _ledger(sites[0]).entries()
    assert [(e.run_name, e.round) for e in runs0][-2:] == [("second", 1), ("second", 2)]
    for s, entries in ((sites[0], runs0), (sites[1], runs1)):
        # The ledger's epsilon equals an independent recomputation within 2%.
        independent = _independent_epsilon(_ledger(s), 1e-5)
        assert math.isclose(entries[-1].epsilon, independent, rel_tol=0.02)

    # The audit agrees: chains intact, server anchors match, no budget exceeded.
    report = audit(run2)
    assert report.exit_code == 0, report.as_dict()
    whole = audit(data)
    assert whole.exit_code == 0
    labels = plot_epsilon(whole, tmp_path / "eps.png")
    assert labels == ["site-0", "site-1"]
    with Image.open(tmp_path / "eps.png") as im:
        assert im.format == "PNG"
