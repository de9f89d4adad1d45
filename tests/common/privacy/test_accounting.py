import math

import pytest

from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events, plan_noise_multiplier
from fedfuse.common.privacy.planning import batches_per_epoch, plan_site_privacy


@pytest.mark.parametrize(
    ("eps", "q", "steps"), [(8.0, 1 / 18, 54), (1.0, 0.01, 1000), (2.0, 0.1, 30), (4.0, 0.25, 9)]
)
def test_planned_noise_spends_at_most_and_close_to_target(eps, q, steps):
    sigma = plan_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps)
    spent = epsilon_from_events([DpSgdEvent(sigma, q, steps)], delta=1e-5)
    assert spent <= eps
    assert spent >= 0.95 * eps


def test_stack_notes_anchor_values():
    """Opacus' accountants for sigma=1.0, q=0.01, 1,000 steps, delta=1e-5 (STACK_NOTES)."""
    ev = [DpSgdEvent(1.0, 0.01, 1000)]
    assert epsilon_from_events(ev, delta=1e-5, accountant="rdp") == pytest.approx(2.10, abs=0.02)
    assert epsilon_from_events(ev, delta=1e-5, accountant="prv") == pytest.approx(1.84, abs=0.02)


def test_composition_of_rounds_equals_one_long_event():
    one = epsilon_from_events([DpSgdEvent(1.1, 0.1, 30)], delta=1e-5)
    three = epsilon_from_events([DpSgdEvent(1.1, 0.1, 10)] * 3, delta=1e-5)
    assert three == pytest.approx(one, rel=1e-3)
    # PRV (tight) is never above RDP (an upper bound by a looser route) by more than noise
    rdp = epsilon_from_events([DpSgdEvent(1.1, 0.1, 30)], delta=1e-5, accountant="rdp")
    assert one <= rdp * 1.01


@pytest.mark.parametrize(
    ("prior", "extra", "q", "steps", "accountant"),
    [
        ([DpSgdEvent(1.0, 0.1, 20)], 2.0, 0.1, 20, "prv"),
        ([DpSgdEvent(3.0, 1 / 3, 15), DpSgdEvent(0.8, 0.05, 40)], 6.0, 1 / 3, 15, "prv"),
        ([DpSgdEvent(1.0, 0.1, 20)], 0.5, 0.1, 20, "rdp"),
    ],
)
def test_planning_with_prior_spend_fits_the_rest(prior, extra, q, steps, accountant):
    spent = epsilon_from_events(prior, delta=1e-5, accountant=accountant)
    sigma = plan_noise_multiplier(
        target_epsilon=spent + extra,
        target_delta=1e-5,
        sample_rate=q,
        steps=steps,
        prior_events=prior,
        accountant=accountant,
    )
    total = epsilon_from_events(
        [*prior, DpSgdEvent(sigma, q, steps)], delta=1e-5, accountant=accountant
    )
    assert spent < total <= spent + extra
    assert total >= 0.99 * (spent + extra)


def test_site_plan_covers_all_rounds():
    cfg = RunConfig(num_rounds=4, local_epochs=2, batch_size=50, target_epsilon=3.0)
    plan = plan_site_privacy(cfg=cfg, num_train=480)
    assert plan.steps_per_round == 2 * batches_per_epoch(480, 50) == 20
    assert plan.sample_rate == pytest.approx(1 / 10)
    events = [DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)] * 4
    eps = [epsilon_from_events(events[: r + 1], delta=1e-5) for r in range(4)]
    assert all(
        a < b for a, b in zip(eps, eps[1:], strict=False)
    )  # strictly increasing across rounds
    assert 0.95 * 3.0 <= eps[-1] <= 3.0


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="delta must be in range"):
        epsilon_from_events([DpSgdEvent(1.0, 0.1, 1)], delta=0)
    with pytest.raises(ValueError, match="sample_rate must be in"):
        DpSgdEvent(1.0, 1.5, 1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DpSgdEvent(math.inf, 0.5, 1)
    assert epsilon_from_events([], delta=1e-5) == 0.0
