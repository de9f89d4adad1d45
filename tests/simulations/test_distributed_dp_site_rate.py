"""Distributed DP, accounted at the site: a site cannot verify how the coordinator samples, so
its ledger counts every round it is asked at sampling rate 1. With 2 sites, fraction-train 0.5
and min-sites 2, Flower asks both sites every round: each ledger event's rate and epsilon must
equal an independent recomputation at the rate actually used (here 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedfuse.client.app import app as client_app
from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.ddgauss import DdgEvent
from fedfuse.common.privacy.ledger import Ledger
from fedfuse.server.app import run_federation
from fedfuse.server.rundir import RunDirectory
from fedfuse.simulations.inprocess import InProcessGrid
from tests.support.secagg import fresh_sites


def _kls21_epsilon(event: DdgEvent, *, rounds: int, rate: float, delta: float) -> float:
    """Epsilon of ``rounds`` DDGauss rounds, written out from the paper, not from our module.

    Kairouz, Liu, Steinke 2021 (arXiv:2102.06387) Proposition 14 with Theorem 1's tau, RDP
    composed over rounds and turned into (epsilon, delta) with Balle et al. 2020 (Thm 21) on a
    fine grid of orders. Only rate 1 is written out here (no amplification to re-derive).
    """
    assert rate == 1.0, "this oracle covers unsampled rounds only"
    n, sigma, d = event.min_sites, event.local_std, event.dim
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
    d2 = event.sensitivity / (math.sqrt(n) * sigma)
    d1 = min(math.sqrt(d) * event.sensitivity, event.sensitivity**2) / (math.sqrt(n) * sigma)
    orders = np.concatenate([np.linspace(1.01, 10, 2000), np.linspace(10, 256, 2000)])
    rdp = rounds * np.minimum.reduce(
        [
            orders / 2 * d2**2 + tau * d,
            orders / 2 * (d2**2 + 2 * d1 * tau + tau**2 * d),
            orders / 2 * (d2 + math.sqrt(d) * tau) ** 2,
        ]
    )
    eps = rdp + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(max(0.0, eps.min()))


@pytest.mark.e2e
def test_site_ledger_counts_every_asked_round_at_rate_one(
    synth_sites: list[Path], tmp_path: Path
) -> None:
    data = fresh_sites(synth_sites[:2], tmp_path / "data")
    cfg = RunConfig(
        data_dir=str(data),
        out_dir=str(tmp_path / "runs"),
        num_rounds=2,
        local_epochs=1,
        batch_size=64,
        run_name="rate",
        dp_level="distributed",
        fraction_train=0.5,
        min_sites=2,
    )
    grid = InProcessGrid(client_app, 2)
    run_dir = RunDirectory(cfg.out_dir, cfg, run_id=cfg.run_name)
    run_federation(grid, cfg, run_dir=run_dir)

    rounds = run_dir.rounds
    assert len(rounds) == 2
    # Distributed DP's accounting has its own key in the round records, not client-level DP's.
    assert all("distributed-dp" in r and "client-dp" not in r for r in rounds)
    sites = sorted(p.name for p in data.iterdir() if p.is_dir())
    for site in sites:
        trained = sum(1 for r in rounds if site in r.get("sites", {}))
        used_rate = trained / len(rounds)  # Flower asked max(int(2 x 0.5), 2) = 2 sites
        assert used_rate == 1.0
        entries = Ledger(data / site / ".fedfuse" / "ledger.sqlite").entries()
        assert len(entries) == trained
        for k, e in enumerate(entries, start=1):
            ev = e.event
            assert isinstance(ev, DdgEvent)
            assert e.sample_rate == ev.sample_rate == used_rate
            oracle = _kls21_epsilon(ev, rounds=k, rate=used_rate, delta=e.delta)
            assert e.epsilon == pytest.approx(oracle, rel=0.01), (site, k)

    # The coordinator's figure is shown apart, labelled with its sampling assumption; its rate
    # 1 figure is what each site's ledger holds.
    privacy = json.loads((run_dir.path / "privacy.json").read_text())
    client = privacy["client_level"]
    assert "assumes each site took part" in client["sampling_assumption"]
    last = Ledger(data / sites[0] / ".fedfuse" / "ledger.sqlite").entries()[-1]
    assert client["epsilon_unamplified"] == pytest.approx(last.epsilon, rel=1e-6)
