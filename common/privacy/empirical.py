"""Empirical epsilon lower bounds from one training run (pure maths, no torch).

Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023,
arXiv:2305.08846. ``m`` canaries are each included in the training data independently with
probability 1/2. After training, an auditor who sees only the output makes ``r`` guesses
("in" or "out", abstaining on the other ``m - r``), of which ``v`` are correct. If training is
(epsilon, delta)-DP, their Theorem 5.2 bounds the chance of ``v`` or more correct guesses:

    P[W >= v] <= f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v].

The empirical lower bound is the largest epsilon that this test rejects at the chosen confidence:
if the training really is (epsilon, delta)-DP, the bound exceeds epsilon with probability at most
``1 - confidence``, however the guesses were made -- provided ``r``, ``k+`` and ``k-`` were fixed
before the auditor looked at which canaries were included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# Above this epsilon the binomial success probability rounds to 1.0 in float64; no (m, r, v)
# that can occur in practice has a lower bound anywhere near it.
_EPS_SEARCH_MAX = 60.0


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer; found {value!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(
            "counts must satisfy 0 <= v (correct guesses) <= r (guesses) <= m (canaries); "
            f"found m={m}, r={r}, v={v}"
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 <= delta <= 1):
        raise ValueError(f"delta must be in range [0, 1]; found {delta!r}")


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in range (0, 1); found {confidence!r}")


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least ``v`` of ``r`` guesses correct] under (epsilon, delta)-DP.

    Theorem 5.2 of Steinke, Nasr and Jagielski (2023); the ``delta`` term makes it valid for
    approximate DP. A small value rejects "training is (epsilon, delta)-DP".
    """
    _check_counts(m, r, v)
    _check_delta(delta)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0; found {epsilon!r}")
    # Accuracy of epsilon-DP randomised response, the best an auditor can do per guess.
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    spread = 0.0
    if delta > 0 and v > 0:
        # f(v - i) - f(v) = P[v - i <= W < v] for i = 1..v, then the largest of them / i.
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
        spread = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * spread)


def epsilon_lower_bound(
    *, m: int, r: int, v: int, delta: float, confidence: float = 0.95, tol: float = 1e-6
) -> float:
    """The largest epsilon rejected at ``confidence``: training is not (epsilon, delta)-DP.

    0.0 when even epsilon = 0 cannot be rejected (too few or too inaccurate guesses).

    Args:
        m: canaries, each included with probability 1/2.
        r: guesses made (not abstentions).
        v: correct guesses.
        delta: the delta of the claim being tested (the site's target delta).
        confidence: 0.95 rejects at the 5% level.
        tol: width of the final bisection bracket, in epsilon.
    """
    _check_counts(m, r, v)
    _check_delta(delta)
    _check_confidence(confidence)
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < level

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: rejected(lo) and not rejected(hi)
    while rejected(hi):
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_SEARCH_MAX:
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_epsilon_lower_bound(*, m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The cap: the bound when all ``r`` guesses are right. No audit with ``m`` canaries and
    ``r`` guesses can report more, however well the model memorises."""
    return epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=confidence)


def guesses_from_scores(scores: Sequence[float], *, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 ("in") for the ``k_pos`` highest scores, -1 ("out") for the ``k_neg`` lowest, 0 else.

    Ties are broken by position (stable sort), never by inclusion, so the guesses depend on the
    scores alone -- as the theorem requires.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional; found shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; every canary needs a score")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > len(s):
        raise ValueError(
            f"k_pos and k_neg must be >= 0 with k_pos + k_neg <= {len(s)} canaries; "
            f"found k_pos={k_pos}, k_neg={k_neg}"
        )
    order = np.argsort(s, kind="stable")
    guesses = np.zeros(len(s), dtype=np.int8)
    if k_neg:
        guesses[order[:k_neg]] = -1
    if k_pos:
        guesses[order[len(s) - k_pos :]] = 1
    return guesses


def split_guesses(k: int) -> tuple[int, int]:
    """``k`` guesses as (k+, k-): half "in", half "out" (the extra one goes to "in")."""
    if k < 0:
        raise ValueError(f"the number of guesses must be >= 0; found {k}")
    return (k + 1) // 2, k // 2


@dataclass(frozen=True)
class EmpiricalAudit:
    """What one audit found: the counts, the accuracy and the lower bound."""

    canaries: int
    included: int
    k_pos: int
    k_neg: int
    guesses: int
    correct: int
    delta: float
    confidence: float
    lower_bound: float
    max_lower_bound: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.guesses if self.guesses else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "accuracy": self.accuracy}


def audit_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    k_pos: int,
    k_neg: int,
    delta: float,
    confidence: float = 0.95,
) -> EmpiricalAudit:
    """Guess from ``scores`` (higher = more likely a member), count correct guesses against
    ``included``, and turn the counts into an epsilon lower bound."""
    inc = np.asarray(included, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if inc.shape != s.shape:
        raise ValueError(
            f"scores and included must have the same length; found {s.shape} and {inc.shape}"
        )
    guesses = guesses_from_scores(s, k_pos=k_pos, k_neg=k_neg)
    truth = np.where(inc, 1, -1)
    r = int(np.count_nonzero(guesses))
    v = int(np.count_nonzero(guesses == truth))
    m = len(s)
    return EmpiricalAudit(
        canaries=m,
        included=int(inc.sum()),
        k_pos=k_pos,
        k_neg=k_neg,
        guesses=r,
        correct=v,
        delta=delta,
        confidence=confidence,
        lower_bound=epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=confidence),
        max_lower_bound=max_epsilon_lower_bound(m=m, r=r, delta=delta, confidence=confidence),
    )


def verdict(*, lower_bound: float, claimed_epsilon: float) -> str:
    """Return "VIOLATION" when the empirical lower bound exceeds the claimed epsilon -- a
    statistical rejection of the claim at the bound's confidence (95% by default), not a proof
    -- else "consistent" (which does not prove the claim: an audit only ever finds lower
    bounds)."""
    if math.isnan(claimed_epsilon):
        raise ValueError("claimed epsilon is NaN: the run reported no epsilon for the audit site")
    return "VIOLATION" if lower_bound > claimed_epsilon else "consistent"
