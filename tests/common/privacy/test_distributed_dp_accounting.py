"""Accounting of distributed DP (common/privacy/ddgauss.py) against independent computations,
and its place in the site ledger and budget."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import optimize, stats

from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events
from fedfuse.common.privacy.ddgauss import (
    ALL_ORDERS,
    INT_ORDERS,
    DdgEvent,
    ddg_epsilon,
    rounded_l2_bound,
    subsampled_rdp,
    tau,
)
from fedfuse.common.privacy.ledger import Ledger, cumulative_epsilon
from fedfuse.common.privacy.ledger_audit import audit_ledger
from fedfuse.common.secagg.distributed_dp import DdpSpec

DELTA = 1e-5


def _opacus_gaussian_epsilon(z: float, q: float, steps: int, orders) -> float:
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=list(orders))
    return float(get_privacy_spent(orders=list(orders), rdp=rdp, delta=DELTA)[0])


def _exact_gaussian_epsilon(z: float, steps: int) -> float:
    """Exact (epsilon, delta) of ``steps`` Gaussian mechanisms of noise multiplier z: a
    Gaussian with mu = sqrt(steps)/z (Balle & Wang 2018; Dong, Roth, Su 2019)."""
    mu = math.sqrt(steps) / z

    def delta(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
            -eps / mu - mu / 2
        )

    return float(optimize.brentq(lambda e: delta(e) - DELTA, 0.0, 500.0))


@pytest.mark.parametrize(("z", "rounds"), [(0.8, 5), (1.0, 10), (2.0, 100)])
def test_large_scale_limit_is_the_continuous_gaussian(z: float, rounds: int) -> None:
    """With fine rounding and large noise, tau -> 0 and the norm inflation -> 0: the DDGauss
    bound must equal the continuous Gaussian's RDP (Opacus' independent implementation), and
    lie above the exact epsilon of the composed Gaussian, not far from it."""
    spec = DdpSpec(clip_norm=1.0, noise_multiplier=z, norm_units=2**20, beta=0.5, dim=1000)
    assert spec.sensitivity / spec.norm_units - 1 < 1e-5
    ev = spec.event(threshold=3, sample_rate=1.0)
    assert tau(3, ev.local_std) == 0.0
    ours = ddg_epsilon([ev] * rounds, delta=DELTA)
    # Relative to the clipped norm (not the rounded one) the noise is z * Delta_2 / units.
    z_eff = z * spec.sensitivity / spec.norm_units
    assert ours == pytest.approx(_opacus_gaussian_epsilon(z, 1.0, rounds, ALL_ORDERS), rel=1e-6)
    exact = _exact_gaussian_epsilon(z_eff, rounds)
    assert exact < ours < 1.35 * exact


def test_coarse_rounding_and_small_noise_cost_privacy() -> None:
    """The discrete terms are really in the bound: a coarse grid inflates the sensitivity and
    small per-site noise makes tau matter, both raising epsilon above the Gaussian's."""
    gauss = _opacus_gaussian_epsilon(1.0, 1.0, 10, ALL_ORDERS)
    coarse = DdpSpec(clip_norm=1.0, noise_multiplier=1.0, norm_units=16, beta=0.5, dim=4096)
    assert coarse.sensitivity > 16 * 1.5  # d/4 dominates the rounded norm
    # Noise is sized on the rounded sensitivity: epsilon stays the Gaussian's, the noise grows.
    assert coarse.central_std > 1.5 * 16
    coarse_eps = ddg_epsilon([coarse.event(threshold=3, sample_rate=1.0)] * 10, delta=DELTA)
    assert coarse_eps == pytest.approx(gauss, rel=1e-6)
    # Tiny local noise: tau is material and epsilon exceeds the continuous bound.
    ev = DdgEvent(sensitivity=1.0, local_std=0.35, min_sites=3, dim=4096)
    assert tau(3, 0.35) > 1e-3
    assert ddg_epsilon([ev] * 10, delta=DELTA) > _opacus_gaussian_epsilon(
        ev.noise_multiplier, 1.0, 10, ALL_ORDERS
    )


def test_rounded_norm_bound_matches_its_formula() -> None:
    d, c, beta = 1024, 100.0, 0.5
    expected = math.sqrt(c**2 + d / 4 + math.sqrt(2 * math.log(2)) * (c + math.sqrt(d) / 2))
    assert rounded_l2_bound(c, beta=beta, dim=d) == pytest.approx(expected)
    # beta = 0 (no conditioning): only the always-true bound c + sqrt(d) is left.
    assert rounded_l2_bound(c, beta=0.0, dim=d) == c + 32.0


@pytest.mark.parametrize(("q", "z", "steps"), [(0.1, 1.0, 100), (0.01, 1.1, 1000)])
def test_subsampled_bound_is_above_the_tight_gaussian_one_and_close(q, z, steps) -> None:
    """Zhu-Wang's general Poisson subsampling bound, on the Gaussian RDP, against Opacus' tight
    sampled-Gaussian analysis (Mironov et al. 2019): never below it, at most 35% above."""
    orders = list(INT_ORDERS)
    tight = np.asarray(compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders))
    ours = np.array([subsampled_rdp(int(a), q, lambda j: j / (2 * z * z)) for a in orders])
    assert np.all(ours * steps >= tight - 1e-12)
    e_tight = _opacus_gaussian_epsilon(z, q, steps, orders)
    ev = DdgEvent(sensitivity=1e6, local_std=z * 1e6 / 2, min_sites=4, dim=512, sample_rate=q)
    e_ours = ddg_epsilon([ev] * steps, delta=DELTA)
    assert e_tight < e_ours < 1.35 * e_tight
    # Sampling only ever helps.
    full = DdgEvent(sensitivity=1e6, local_std=z * 1e6 / 2, min_sites=4, dim=512)
    assert e_ours < ddg_epsilon([full] * steps, delta=DELTA)


def test_event_text_round_trips_and_mixed_events_compose() -> None:
    ev = DdgEvent(sensitivity=4097.6, local_std=2897.44, min_sites=2, dim=32768, sample_rate=0.5)
    assert DdgEvent.parse(ev.mechanism()) == ev
    assert "sites>=2" in ev.mechanism()
    sgd = DpSgdEvent(1.0, 0.1, 50)
    both = epsilon_from_events([sgd, ev], delta=DELTA)
    assert both > max(
        epsilon_from_events([sgd], delta=DELTA, accountant="rdp"), ddg_epsilon([ev], delta=DELTA)
    )
    # With a DDGauss event both accountant names compose in RDP (no PRV model of DDGauss).
    assert both == epsilon_from_events([sgd, ev], delta=DELTA, accountant="prv")


def test_ledger_records_distributed_rounds_and_the_assumption(tmp_path: Path) -> None:
    """A distributed-DP round is a new mechanism in the ledger that carries its parameters and
    its assumption; the chain verifies, the audit recomputes it, and the budget holds."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ev = DdpSpec(clip_norm=1.0, noise_multiplier=1.0, norm_units=4096, beta=0.5, dim=3000).event(
        threshold=2, sample_rate=1.0
    )
    common = dict(site="a", run_id="r", run_name="r", max_grad_norm=1.0, delta=DELTA)
    e1 = ledger.append(round=1, event=ev, epsilon_budget=100.0, model_hash="m", **common)
    assert e1.mechanism.startswith("distributed-discrete-gaussian[sites>=2,")
    assert e1.event == ev and e1.distributed == ev
    assert e1.noise_multiplier == pytest.approx(1.0)
    sgd = DpSgdEvent(1.2, 0.25, 12)
    e2 = ledger.append(
        round=2, event=sgd, distributed=ev, epsilon_budget=100.0, model_hash="m", **common
    )
    assert e2.mechanism.startswith("poisson-sampled-gaussian+distributed-discrete-gaussian[")
    assert e2.event == sgd and e2.distributed == ev  # record-level spend: DP-SGD only
    assert ledger.verify().ok
    assert e2.epsilon == pytest.approx(epsilon_from_events([ev, sgd], delta=DELTA))
    assert cumulative_epsilon(ledger.entries(), delta=DELTA) == pytest.approx(e2.epsilon)
    audit = audit_ledger(tmp_path / "ledger.sqlite")
    assert not audit.problems, audit.problems
    with pytest.raises(Exception, match="budget"):
        ledger.append(round=3, event=ev, epsilon_budget=e2.epsilon, model_hash="m", **common)
