"""The one-run audit's maths (Steinke, Nasr, Jagielski 2023) against hand and scipy values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from fedfuse.common.privacy.empirical import (
    audit_from_scores,
    epsilon_lower_bound,
    guesses_from_scores,
    max_epsilon_lower_bound,
    p_value,
    split_guesses,
    verdict,
)


def _logit(q: float) -> float:
    return math.log(q / (1 - q))


@pytest.mark.parametrize("r", [10, 50, 100, 200])
def test_all_guesses_right_pure_dp_matches_closed_form(r):
    # delta = 0 and v = r: p = q^r, so the bound solves q^r = 0.05 -> eps = logit(0.05^(1/r)).
    expected = _logit(0.05 ** (1 / r))
    got = epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0)
    assert got == pytest.approx(expected, abs=1e-5)


def test_ten_of_ten_right_by_hand():
    # 0.05 ** 0.1 = 0.741134; log(0.741134 / 0.258866) = 1.05187
    assert epsilon_lower_bound(m=10, r=10, v=10, delta=0.0) == pytest.approx(1.05187, abs=1e-4)


@pytest.mark.parametrize(("r", "v"), [(100, 90), (100, 81), (200, 157), (1000, 700), (50, 40)])
def test_some_wrong_pure_dp_matches_scipy_binomial_tail(r, v):
    # Independent oracle: root of P[Binomial(r, expit(eps)) >= v] = 0.05, by Brent's method.
    def excess(eps: float) -> float:
        return stats.binom.sf(v - 1, r, special.expit(eps)) - 0.05

    expected = optimize.brentq(excess, 0.0, 20.0, xtol=1e-10)
    assert epsilon_lower_bound(m=r, r=r, v=v, delta=0.0) == pytest.approx(expected, abs=1e-5)


def _p_value_by_hand(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2 term by term with exact binomial coefficients (no scipy)."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def pmf(k: int) -> float:
        return math.comb(r, k) * q**k * (1 - q) ** (r - k)

    def f(x: int) -> float:  # P[W >= x]
        return sum(pmf(k) for k in range(max(x, 0), r + 1))

    spread = max((f(v - i) - f(v)) / i for i in range(1, v + 1)) if v else 0.0
    return min(1.0, f(v) + 2 * m * delta * spread)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 50, 45, 1.0, 1e-4),
        (1000, 50, 45, 2.5, 1e-5),
        (100, 20, 20, 3.0, 1e-3),
        (500, 40, 30, 0.5, 1e-2),
        (10, 10, 0, 1.0, 1e-2),
    ],
)
def test_p_value_with_delta_matches_theorem_term_by_term(m, r, v, eps, delta):
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(
        _p_value_by_hand(m, r, v, eps, delta), rel=1e-9, abs=1e-15
    )


def test_bound_is_where_the_p_value_crosses_five_percent():
    m, r, v, delta = 1000, 200, 180, 1e-5
    lb = epsilon_lower_bound(m=m, r=r, v=v, delta=delta)
    assert p_value(m=m, r=r, v=v, epsilon=lb, delta=delta) < 0.05
    assert p_value(m=m, r=r, v=v, epsilon=lb + 1e-4, delta=delta) >= 0.05


def test_delta_term_only_lowers_the_bound():
    for v in (150, 180, 200):
        pure = epsilon_lower_bound(m=1000, r=200, v=v, delta=0.0)
        approx = epsilon_lower_bound(m=1000, r=200, v=v, delta=1e-5)
        much = epsilon_lower_bound(m=1000, r=200, v=v, delta=1e-3)
        assert much <= approx <= pure


def test_the_cap_for_given_m_and_r():
    m, delta = 1000, 1e-5
    for r in (50, 100, 200, 500):
        cap = max_epsilon_lower_bound(m=m, r=r, delta=delta)
        # No number of correct guesses can give more than all of them right ...
        assert all(epsilon_lower_bound(m=m, r=r, v=v, delta=delta) <= cap for v in range(r + 1))
        # ... and the cap is below the pure-DP closed form (the delta term costs something).
        assert cap <= _logit(0.05 ** (1 / r)) + 1e-6
    caps = [max_epsilon_lower_bound(m=m, r=r, delta=delta) for r in (10, 100, 1000)]
    assert caps == sorted(caps)  # more guesses, higher cap
    # 1,000 canaries and 200 guesses can never show more than about 4.17.
    assert max_epsilon_lower_bound(m=1000, r=200, delta=1e-5) == pytest.approx(4.1665, abs=1e-3)


def test_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    bounds = [epsilon_lower_bound(m=1000, r=200, v=v, delta=1e-5) for v in range(0, 201, 10)]
    assert bounds == sorted(bounds)
    assert epsilon_lower_bound(m=1000, r=200, v=100, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=1000, r=0, v=0, delta=1e-5) == 0.0


def test_randomised_response_at_epsilon_is_rarely_caught_above_it():
    """Validity, statistically: an exactly eps0-DP mechanism (randomised response on each
    inclusion bit) exceeds eps0 in at most ~5% of audits; with many guesses it comes close."""
    eps0, m, trials = 1.5, 400, 300
    rng = np.random.default_rng(7)
    q = special.expit(eps0)
    above, bounds = 0, []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < q
        output = np.where(truthful, included, ~included).astype(float)
        scores = output + 1e-3 * rng.random(m)  # the mechanism's output is all the auditor sees
        a = audit_from_scores(scores, included, k_pos=m // 2, k_neg=m // 2, delta=0.0)
        above += a.lower_bound > eps0
        bounds.append(a.lower_bound)
    # Expected at most 5%; 300 trials have a standard deviation of 1.3 points.
    assert above / trials <= 0.09
    assert np.mean(bounds) > 0.9  # and the audit has power: it gets close to the truth


def test_guesses_from_scores_by_hand():
    g = guesses_from_scores([0.1, 0.5, 0.3, 0.9, 0.2], k_pos=2, k_neg=1)
    assert g.tolist() == [-1, 1, 0, 1, 0]
    assert guesses_from_scores([1.0, 1.0, 1.0], k_pos=1, k_neg=1).tolist() == [-1, 0, 1]
    assert guesses_from_scores([3.0, 1.0], k_pos=0, k_neg=0).tolist() == [0, 0]


def test_audit_from_scores_counts_by_hand():
    scores = [0.9, 0.8, 0.1, 0.2, 0.5, 0.05]
    included = [True, False, False, True, True, False]
    a = audit_from_scores(scores, included, k_pos=2, k_neg=2, delta=1e-5)
    # in: 0.9 (right), 0.8 (wrong); out: 0.05 (right), 0.1 (right)
    assert (a.canaries, a.included, a.guesses, a.correct) == (6, 3, 4, 3)
    assert a.accuracy == 0.75
    assert a.lower_bound == epsilon_lower_bound(m=6, r=4, v=3, delta=1e-5)
    assert a.as_dict()["accuracy"] == 0.75


def test_split_and_verdict():
    assert split_guesses(200) == (100, 100)
    assert split_guesses(7) == (4, 3)
    assert verdict(lower_bound=2.5, claimed_epsilon=2.0) == "VIOLATION"
    assert verdict(lower_bound=2.0, claimed_epsilon=2.0) == "consistent"
    assert verdict(lower_bound=5.0, claimed_epsilon=math.inf) == "consistent"
    with pytest.raises(ValueError, match="NaN"):
        verdict(lower_bound=1.0, claimed_epsilon=math.nan)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"m": 10, "r": 5, "v": 6, "delta": 0.0}, "0 <= v .* <= r .* <= m"),
        ({"m": 4, "r": 5, "v": 1, "delta": 0.0}, "found m=4, r=5, v=1"),
        ({"m": 10, "r": 5, "v": 1, "delta": 1.5}, r"delta must be in range \[0, 1\]"),
        ({"m": 10, "r": 5, "v": 1, "delta": 0.0, "confidence": 1.0}, "confidence"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        epsilon_lower_bound(**kwargs)


def test_bad_guess_counts_and_scores_are_refused():
    with pytest.raises(ValueError, match="k_pos \\+ k_neg <= 3"):
        guesses_from_scores([1.0, 2.0, 3.0], k_pos=2, k_neg=2)
    with pytest.raises(ValueError, match="NaN"):
        guesses_from_scores([1.0, math.nan], k_pos=1, k_neg=0)
    with pytest.raises(ValueError, match="same length"):
        audit_from_scores([1.0, 2.0], [True], k_pos=1, k_neg=0, delta=0.0)
