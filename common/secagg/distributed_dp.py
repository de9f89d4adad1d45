"""Distributed DP inside SecAgg+: the sites noise their own updates, the server sees only the sum.

The distributed discrete Gaussian mechanism of Kairouz, Liu and Steinke 2021 (arXiv:2102.06387),
in place of SecAgg+'s float quantisation for ``dp-level = distributed`` (and
``record+distributed``). Each site

1. clips its model update to L2 norm ``c`` (``client-clip-norm``) and scales it so that ``c``
   becomes ``ddp-norm-units`` integer units;
2. pads it to a power of two and rotates it with a randomised Hadamard transform (random signs,
   then the orthonormal Walsh-Hadamard transform), whose signs come from a PUBLIC per-round seed
   so the server can invert it; the rotation spreads the update evenly over the coordinates;
3. rounds each coordinate up or down at random (unbiased), again until the L2 norm is within
   the bound of :func:`fedfuse.common.privacy.ddgauss.rounded_l2_bound` ("conditional" rounding);
4. adds discrete Gaussian noise N_Z(0, sigma_local^2), drawn from a source the server cannot
   predict or remove: at a deployed site a ChaCha20 keystream under a fresh random key
   (``common/privacy/secure_rng.py``), in a simulation a generator keyed by the SITE'S secret
   (reproducible), with
   ``sigma_local = z * Delta_2 / sqrt(T)``: once ``T`` sites (the SecAgg+ reconstruction
   threshold) are in the sum, the noise on it has std at least ``z * Delta_2``, ``z`` being
   ``client-noise-multiplier``;
5. hands ``[1, vector]`` (mod the SecAgg+ modulus) to SecAgg+, which masks it.

The server unmasks only the noisy modular sum, centres it, divides by the scale, inverts the
rotation and drops the padding: the sum of clipped updates plus Gaussian-like noise.

No wrap-around: every coordinate of one site's rounded vector is at most ``Delta_2`` in
absolute value, and the summed noise exceeds ``k`` standard deviations in any coordinate with
probability below 2**-40 (sub-Gaussian tail, union bound over the coordinates), so the sum of
``n`` sites stays inside ``(-M/2, M/2)`` when ``n * Delta_2 + k sqrt(n) sigma_local < M/2``.
:meth:`DdpSpec.check_modulus` refuses a configuration that does not satisfy it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedfuse.common.errors import ConfigError
from fedfuse.common.privacy.ddgauss import DdgEvent, rounded_l2_bound
from fedfuse.common.secagg import masking

# Probability that the noise pushes any coordinate past the k-sigma tail the modulus allows.
TAIL_PROBABILITY = 2.0**-40
# Conditional rounding re-draws while the norm exceeds its bound; each draw fails with
# probability at most beta, so this many failures in a row means something else is wrong.
MAX_ROUNDING_TRIES = 1000


class RandomSource(Protocol):
    """Where the rounding and the noise come from: a numpy ``Generator`` keyed with the site's
    secret (simulation), or a ``fedfuse.common.privacy.secure_rng.SecureRandom`` (deployed)."""

    def random(self, size: int) -> np.ndarray: ...

    def geometric(self, p: float, size: int) -> np.ndarray: ...


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class DdpSpec:
    """What both ends derive from the run config and the model: the mechanism's parameters."""

    clip_norm: float
    noise_multiplier: float
    norm_units: int
    beta: float
    dim: int

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"'client-clip-norm' must be in (0, inf); found {self.clip_norm}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(
                f"'client-noise-multiplier' must be in (0, inf); found {self.noise_multiplier}"
            )
        if not isinstance(self.norm_units, int) or self.norm_units < 1:
            raise ConfigError(f"'ddp-norm-units' must be an integer >= 1; found {self.norm_units}")
        if not 0 < self.beta < 1:
            raise ConfigError(f"'ddp-beta' must be in range (0, 1); found {self.beta}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1; found {self.dim}")

    @property
    def padded(self) -> int:
        return next_pow2(self.dim)

    @property
    def scale(self) -> float:
        """Integer units per unit of the update."""
        return self.norm_units / self.clip_norm

    @property
    def sensitivity(self) -> float:
        """Delta_2: the L2 bound of one site's rounded vector, in integer units."""
        return rounded_l2_bound(float(self.norm_units), beta=self.beta, dim=self.padded)

    @property
    def central_std(self) -> float:
        """Noise std on the sum (integer units) once the threshold of sites is in it."""
        return self.noise_multiplier * self.sensitivity

    def local_std(self, threshold: int) -> float:
        return self.central_std / math.sqrt(threshold)

    @property
    def tail_sigmas(self) -> float:
        """k with P(any of the padded coordinates of the summed noise beyond k std) < 2**-40."""
        return math.sqrt(2 * math.log(2 * (self.padded + 1) / TAIL_PROBABILITY))

    def sum_bound(self, num_sites: int, threshold: int) -> float:
        """Largest |coordinate| of the noisy sum of ``num_sites`` vectors (but w.p. 2**-40)."""
        noise = self.tail_sigmas * math.sqrt(num_sites) * self.local_std(threshold)
        return num_sites * math.floor(self.sensitivity) + noise

    def max_sites(self, modulus: int, threshold: int) -> int:
        n = 1
        while n < 10**6 and self.sum_bound(n + 1, threshold) < modulus // 2:
            n += 1
        return n if self.sum_bound(n, threshold) < modulus // 2 else 0

    def check_modulus(self, *, num_sites: int, threshold: int, modulus: int) -> None:
        """ConfigError naming the keys to change when the noisy sum could wrap around."""
        bound = self.sum_bound(num_sites, threshold)
        if bound >= modulus // 2:
            raise ConfigError(
                f"distributed DP: the noisy sum of {num_sites} sites could wrap around "
                f"modulus-range {modulus}: each coordinate may reach {bound:.4g} (= sites x "
                f"rounded norm bound {self.sensitivity:.4g} + {self.tail_sigmas:.2f} std of the "
                f"summed noise), which must stay below modulus-range/2 = {modulus // 2}. Lower "
                "'ddp-norm-units' (coarser rounding) or 'client-noise-multiplier', raise "
                "'modulus-range' (at most 2**32), or use fewer sites per round "
                "('fraction-train')."
            )

    def event(self, *, threshold: int, sample_rate: float) -> DdgEvent:
        """One round's privacy event when at least ``threshold`` sites' noise is summed."""
        return DdgEvent(
            sensitivity=self.sensitivity,
            local_std=self.local_std(threshold),
            min_sites=threshold,
            dim=self.padded,
            sample_rate=sample_rate,
        )


def rotation_seed(run_uid: str, server_round: int) -> bytes:
    """The round's PUBLIC rotation seed: both ends derive it; it protects nothing secret."""
    return hashlib.sha256(f"fedfuse-ddp-rotation|{run_uid}|{server_round}".encode()).digest()


def _signs(seed: bytes, n: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    return rng.integers(0, 2, size=n, dtype=np.int8).astype(np.float64) * 2 - 1


def fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform (Sylvester order) of a power-of-two vector;
    its own inverse."""
    n = x.size
    if n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length; found {n}")
    a = np.asarray(x, dtype=np.float64).copy()
    h = 1
    while h < n:
        a = a.reshape(-1, 2, h)
        a = np.stack((a[:, 0] + a[:, 1], a[:, 0] - a[:, 1]), axis=1)
        h *= 2
    return a.reshape(n) / math.sqrt(n)


def rotate(x: np.ndarray, seed: bytes) -> np.ndarray:
    """H D x: random signs, then the orthonormal Hadamard transform (``x`` is padded)."""
    return fwht(x * _signs(seed, x.size))


def unrotate(y: np.ndarray, seed: bytes) -> np.ndarray:
    """The inverse of :func:`rotate`: D H y."""
    return fwht(y) * _signs(seed, y.size)


def _sq_norm(x: np.ndarray) -> float:
    """Squared L2 norm without BLAS: OpenBLAS threads spin after a call and, on a small
    machine, steal the cores the site's next training needs (measured: 2-5x slower rounds)."""
    return float(np.square(x).sum())


def conditional_round(x: np.ndarray, bound: float, rng: RandomSource) -> np.ndarray:
    """Unbiased randomised rounding of each coordinate, re-drawn until ||.||_2 <= ``bound``."""
    low = np.floor(x)
    frac = x - low
    for _ in range(MAX_ROUNDING_TRIES):
        out = low + (rng.random(x.size) < frac)
        if _sq_norm(out) <= bound * bound:
            return out.astype(np.int64)
    raise RuntimeError(
        f"conditional rounding failed {MAX_ROUNDING_TRIES} times in a row: the vector's norm "
        f"{math.sqrt(_sq_norm(x)):.6g} does not fit the rounding bound {bound:.6g}"
    )


def discrete_gaussian(sigma: float, size: int, rng: RandomSource) -> np.ndarray:
    """``size`` samples of N_Z(0, sigma^2), the discrete Gaussian on the integers.

    Canonne, Kamath and Steinke 2020 (arXiv:2004.00010), Algorithm 3, vectorised: draw
    Y ~ discrete Laplace of scale t = floor(sigma) + 1 (a difference of two geometric
    variables) and accept it with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). In
    floating point, like TensorFlow Federated's sampler, not the exact rational arithmetic.

    The values are integers, so the floating-point attack on continuous noise (whose low-order
    bits give away the draw; Mironov 2012) has nothing to read here, and each value is one
    draw: summing several, as Opacus' secure mode does for continuous noise, would change the
    distribution that the accounting (``common/privacy/ddgauss.py``) is about.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be in (0, inf); found {sigma}")
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        m = todo.size
        y = rng.geometric(p, m) - rng.geometric(p, m)  # both on {1, 2, ...}: the shift cancels
        accept = rng.random(m) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


def privatize(
    delta: np.ndarray,
    spec: DdpSpec,
    *,
    threshold: int,
    seed: bytes,
    rng: RandomSource,
) -> np.ndarray:
    """A site's contribution: ``[1, noisy rotated rounded scaled clipped update]`` (int64,
    length ``1 + spec.padded``), before it is reduced modulo M and masked.

    ``rng`` draws the rounding and the noise: a secure generator at a deployed site, one keyed
    with the site's secret in a simulation; never one the server can reproduce.
    """
    if delta.size != spec.dim:
        raise ValueError(f"the update has {delta.size} entries; the spec expects {spec.dim}")
    x = np.asarray(delta, dtype=np.float64)
    norm = math.sqrt(_sq_norm(x))
    if norm > spec.clip_norm:
        x = x * (spec.clip_norm / norm)
    padded = np.zeros(spec.padded)
    padded[: spec.dim] = x * spec.scale
    rounded = conditional_round(rotate(padded, seed), spec.sensitivity, rng)
    noise = discrete_gaussian(spec.local_std(threshold), spec.padded, rng)
    out = np.empty(spec.padded + 1, dtype=np.int64)
    out[0] = 1
    out[1:] = rounded + noise
    return out


def to_modular(vec: np.ndarray, modulus: int) -> np.ndarray:
    """Signed integers as uint32 words modulo ``modulus`` (a power of two <= 2**32)."""
    return np.mod(vec.astype(np.int64), modulus).astype(np.uint32)


def decode_sum(
    total: np.ndarray,
    spec: DdpSpec,
    *,
    num_sites: int,
    threshold: int,
    modulus: int,
    seed: bytes,
) -> np.ndarray:
    """The noisy SUM of the sites' clipped updates (float64, length ``spec.dim``) from the
    unmasked modular sum (reduced modulo ``modulus``) of ``num_sites`` contributions.

    Raises ValueError when the sum cannot come from ``num_sites`` honest sites (a wrong count
    or a coordinate beyond what they can add up to): a contribution was malformed.
    """
    centred = total.astype(np.int64) % modulus
    centred[centred >= modulus // 2] -= modulus
    if int(centred[0]) != num_sites:
        raise ValueError(
            f"the unmasked site count is {int(centred[0])}, expected {num_sites}: a site's "
            "contribution was malformed or the masks did not cancel"
        )
    body = centred[1:]
    bound = spec.sum_bound(num_sites, threshold)
    if body.size != spec.padded or (body.size and float(np.abs(body).max()) > bound):
        raise ValueError(
            f"the unmasked sum has entries beyond what {num_sites} sites can add up to "
            f"({bound:.4g}): a site's contribution was malformed or the masks did not cancel"
        )
    return unrotate(body.astype(np.float64) / spec.scale, seed)[: spec.dim]


# The ConfigRecord in ``Context.state`` under which the SecAgg+ mod hands the ClientApp the round's
# SecAgg+ parameters that the site's noise depends on (threshold, sample-num, modulus) while it
# trains, and the ArrayRecord the training reply carries the site's vector in.
ROUND_KEY = "secagg-round"
VECTOR_KEY = "ddp"
VECTOR_ARRAY = "vector"


def spec_from_config(cfg: Any, arrays: Mapping[str, np.ndarray]) -> DdpSpec:
    """The mechanism for ``cfg`` (a RunConfig) over the float parameters of ``arrays``."""
    dim = sum(int(np.asarray(arrays[k]).size) for k in masking.float_keys(arrays))
    return DdpSpec(
        clip_norm=float(cfg.client_clip_norm),
        noise_multiplier=float(cfg.client_noise_multiplier),
        norm_units=int(cfg.ddp_norm_units),
        beta=float(cfg.ddp_beta),
        dim=dim,
    )
