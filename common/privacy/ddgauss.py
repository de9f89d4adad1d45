"""Privacy accounting of the distributed discrete Gaussian (DDGauss) mechanism: pure maths.

Kairouz, Liu and Steinke 2021, "The distributed discrete Gaussian mechanism for federated
learning with secure aggregation" (arXiv:2102.06387). ``n`` sites each add discrete Gaussian
noise N_Z(0, sigma^2) to an integer vector whose L2 norm (after conditional randomised rounding)
is at most ``Delta_2``; only the sum is released. The sum of discrete Gaussians is not a
discrete Gaussian, but close to one: its Renyi divergence (Proposition 14 / Eq. 17) is

    eps(a) = min( a/2 * D2^2 + tau*d,
                  a/2 * (D2^2 + 2*D1*tau + tau^2 * d),
                  a/2 * (D2 + sqrt(d)*tau)^2 )

with ``D2 = Delta_2 / (sqrt(n) sigma)``, ``D1 = Delta_1 / (sqrt(n) sigma)`` and
``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1))`` (Theorem 1). As tau -> 0 this is the
continuous Gaussian's a/2 * D2^2. The noise is sized for ``n`` = the minimum number of sites
whose noise is in the sum (the SecAgg+ reconstruction threshold), so the bound holds while that
many sites survive and follow the protocol.

Rounds compose by adding RDP; a round in which each site takes part with probability ``q`` is
amplified with the general Poisson-subsampling bound of Zhu and Wang 2019 ("Poisson subsampled
Renyi differential privacy", ICML, Theorem 6), valid for any mechanism at integer orders. RDP
converts to (epsilon, delta) with Opacus' ``get_privacy_spent`` (Balle et al. 2020), the same
conversion the central client-level DP accounting uses.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy import special

# Integer orders (Poisson subsampling needs them) plus Opacus' fractional ones for q = 1.
INT_ORDERS: tuple[float, ...] = tuple(float(a) for a in [*range(2, 129), 256])
ALL_ORDERS: tuple[float, ...] = tuple(
    sorted({*(1 + x / 10.0 for x in range(1, 100)), *INT_ORDERS, *map(float, range(12, 64))})
)
MECHANISM = "distributed-discrete-gaussian"


def rounded_l2_bound(norm: float, *, beta: float, dim: int) -> float:
    """L2 norm bound of a vector of norm <= ``norm`` after conditional randomised rounding.

    Randomised rounding of each coordinate up or down (unbiased) can grow the norm; KLS21 (Sec.
    4.1, Theorem 1) bound it by ``norm + sqrt(d)`` always, and with probability >= 1 - beta by
    ``sqrt(norm^2 + d/4 + sqrt(2 ln(1/beta)) (norm + sqrt(d)/2))``. The site re-rounds until
    the second bound holds ("conditional" rounding), so it holds always.
    """
    if not norm > 0 or dim < 1 or not 0 <= beta < 1:
        raise ValueError(f"need norm > 0, dim >= 1, beta in [0, 1); found {norm}, {dim}, {beta}")
    bound_1 = norm + math.sqrt(dim)
    if beta == 0:
        return bound_1
    sq = norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    return min(bound_1, math.sqrt(sq))


def rounded_l1_bound(l2_bound: float, dim: int) -> float:
    """L1 bound of an integer vector with L2 norm <= ``l2_bound``: ``min(sqrt(d) L2, L2^2)``."""
    return l2_bound * min(math.sqrt(dim), l2_bound)


def tau(num_sites: int, local_std: float) -> float:
    """KLS21 Theorem 1: how far the sum of ``num_sites`` discrete Gaussians is from one."""
    return 10 * sum(
        math.exp(-2 * math.pi**2 * local_std**2 * k / (k + 1)) for k in range(1, num_sites)
    )


def subsampled_rdp(order: int, q: float, rdp_of: callable) -> float:  # type: ignore[valid-type]
    """Zhu & Wang 2019, Theorem 6: RDP at integer ``order`` of a mechanism run on a Poisson
    sample with rate ``q``, from the mechanism's own RDP ``rdp_of(j)`` at j = 2..order."""
    a = int(order)
    if a != order or a < 2:
        raise ValueError(f"subsampled RDP needs an integer order >= 2; found {order}")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1]; found {q}")
    if q == 1:
        return float(rdp_of(a))
    log_terms = [
        (a - 1) * math.log1p(-q) + math.log(a * q - q + 1),
        math.log(special.comb(a, 2)) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + rdp_of(2),
    ]
    for j in range(3, a + 1):
        log_terms.append(
            math.log(3.0)
            + float(special.gammaln(a + 1) - special.gammaln(j + 1) - special.gammaln(a - j + 1))
            + j * math.log(q)
            + (a - j) * math.log1p(-q)
            + (j - 1) * rdp_of(j)
        )
    return float(special.logsumexp(log_terms)) / (a - 1)


@dataclass(frozen=True)
class DdgEvent:
    """``steps`` rounds of the distributed discrete Gaussian, each in integer units.

    ``sensitivity``: L2 bound of one site's rounded vector (Delta_2); ``local_std``: the
    discrete Gaussian scale each site adds; ``min_sites``: how many sites' noise the sum holds
    at least (the assumption the guarantee rests on); ``dim``: the vector's length (padded);
    ``sample_rate``: the probability a site takes part in a round.
    """

    sensitivity: float
    local_std: float
    min_sites: int
    dim: int
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        for name in ("sensitivity", "local_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be in (0, inf); found {v!r}")
        if self.min_sites < 1 or self.dim < 1 or self.steps < 1:
            raise ValueError(
                f"min_sites, dim and steps must be >= 1; found {self.min_sites}, {self.dim}, "
                f"{self.steps}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; found {self.sample_rate}")

    @property
    def central_std(self) -> float:
        """Standard deviation of the summed noise with ``min_sites`` sites."""
        return math.sqrt(self.min_sites) * self.local_std

    @property
    def noise_multiplier(self) -> float:
        """The central noise multiplier: summed noise std over the rounded sensitivity."""
        return self.central_std / self.sensitivity

    def rdp_one_round(self, order: float) -> float:
        """KLS21 Proposition 14 with Theorem 1's tau (unsampled, one round)."""
        t = tau(self.min_sites, self.local_std)
        d2 = self.sensitivity / self.central_std
        d1 = rounded_l1_bound(self.sensitivity, self.dim) / self.central_std
        a, d = float(order), self.dim
        return min(
            a / 2 * d2**2 + t * d,
            a / 2 * (d2**2 + 2 * d1 * t + t**2 * d),
            a / 2 * (d2 + math.sqrt(d) * t) ** 2,
        )

    def rdp(self, orders: Sequence[float]) -> np.ndarray:
        """RDP of all ``steps`` rounds at each order (inf where an order cannot be used)."""
        out = []
        for a in orders:
            if self.sample_rate == 1:
                out.append(self.rdp_one_round(a))
            elif float(a).is_integer():
                out.append(
                    min(
                        subsampled_rdp(int(a), self.sample_rate, self.rdp_one_round),
                        self.rdp_one_round(a),
                    )
                )
            else:
                out.append(self.rdp_one_round(a))  # no amplification claimed off the integers
        return np.asarray(out) * self.steps

    # -- the ledger's text form: everything needed to recompute epsilon, in the entry itself --
    def mechanism(self) -> str:
        return (
            f"{MECHANISM}[sites>={self.min_sites},dim={self.dim},"
            f"sensitivity={self.sensitivity!r},local-std={self.local_std!r},"
            f"sample-rate={self.sample_rate!r},steps={self.steps}]"
        )

    @classmethod
    def parse(cls, text: str) -> DdgEvent | None:
        """The event in a ledger mechanism string (None if it holds none)."""
        m = _PATTERN.search(text)
        if m is None:
            return None
        return cls(
            sensitivity=float(m["sens"]),
            local_std=float(m["std"]),
            min_sites=int(m["sites"]),
            dim=int(m["dim"]),
            sample_rate=float(m["q"]),
            steps=int(m["steps"]),
        )


_NUM = r"[0-9.eE+-]+"
_PATTERN = re.compile(
    rf"{MECHANISM}\[sites>=(?P<sites>\d+),dim=(?P<dim>\d+),sensitivity=(?P<sens>{_NUM}),"
    rf"local-std=(?P<std>{_NUM}),sample-rate=(?P<q>{_NUM}),steps=(?P<steps>\d+)\]"
)


def orders_for(sample_rates: Sequence[float]) -> tuple[float, ...]:
    """Integer orders if any round is subsampled, else every order."""
    return INT_ORDERS if any(q < 1 for q in sample_rates) else ALL_ORDERS


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, *, delta: float) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in range (0, 1); found {delta}")
    eps, _ = get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp), delta=delta)
    return float(eps)


def ddg_epsilon(events: Sequence[DdgEvent], *, delta: float) -> float:
    """Epsilon at ``delta`` of ``events`` composed (0.0 for none)."""
    if not events:
        return 0.0
    orders = orders_for([e.sample_rate for e in events])
    total = np.zeros(len(orders))
    # RDP adds up over rounds: identical rounds are computed once (exact, and fast).
    for event, count in Counter(events).items():
        total += count * event.rdp(orders)
    return epsilon_from_rdp(orders, total, delta=delta)
