"""The arithmetic of SecAgg+ that both ends must do identically: vector layout, quantisation,
masks, and the error bound of the unmasked mean.

A site uploads ``[w, q(w * delta)] + masks (mod M)``: ``w`` its quantised weight, ``q`` the
stochastic quantisation of its weighted model update in Flower's layout (``[-c, c]`` onto
``[0, Q]``; dequantised with Flower's ``dequantize``). Modular arithmetic is Flower's
(``flwr.common.secure_aggregation``); the stochastic rounding is done here in place with a
PCG64 generator, about 3x faster than Flower's ``_stochastic_round`` on a 1M-parameter update (the
largest single cost of a SecAgg+ round without training). Masks are expanded from 256-bit
seeds with ChaCha20 (``cryptography``); Flower's own ``pseudo_rand_gen`` folds its seed to 32
bits for a Mersenne Twister, which is not a cryptographic generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize

from fedfuse.common.secagg.params import RoundParams

# A fixed nonce is safe: every mask key is fresh (new key pairs and seeds each round) and
# expands exactly one mask.
_NONCE = b"fedfuse.secagg+\x00"


def float_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The parameters that are aggregated, in the order both ends lay them out (sorted)."""
    return sorted(k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating))


def vector_length(arrays: Mapping[str, np.ndarray]) -> int:
    """Length of a masked vector for these arrays: one weight entry + every float parameter."""
    return 1 + sum(int(arrays[k].size) for k in float_keys(arrays))


def flatten(arrays: Mapping[str, np.ndarray], keys: Iterable[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def unflatten(
    vec: np.ndarray, like: Mapping[str, np.ndarray], keys: list[str]
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    pos = 0
    for k in keys:
        n = int(like[k].size)
        out[k] = vec[pos : pos + n].reshape(like[k].shape)
        pos += n
    return out


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform 32-bit words (uint32) from a 32-byte seed: a ChaCha20 keystream.

    Masks are added in uint32, which wraps modulo 2**32; every modulus is a power of two that
    divides 2**32, so reducing once at the end (:func:`mod`) gives the sum modulo the modulus.
    """
    if len(seed) != 32:
        raise ValueError(f"mask seeds are 32 bytes; got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4")


def weight_factor(weight: float, params: RoundParams) -> int:
    """A site's quantised weight: ``round(min(weight, max_weight) / max_weight * Q)``.

    Bounding the weight by ``max-weight`` keeps every entry of the sum below the modulus (Flower
    only warns and lets the sum wrap around) and caps the influence of one site.
    """
    ratio = min(max(float(weight), 0.0), params.max_weight) / params.max_weight
    return int(round(ratio * params.quantization_range))


def encode(delta: np.ndarray, weight: float, params: RoundParams) -> tuple[np.ndarray, int]:
    """``[w, q(w * delta)]`` as uint32 in [0, Q], before masking; and how many entries clipped."""
    q_ratio = weight_factor(weight, params)
    scaled = delta * (q_ratio / params.quantization_range)
    clipped = int(np.count_nonzero(np.abs(scaled) > params.clipping_range))
    vec = np.empty(delta.size + 1, dtype=np.uint32)
    vec[0] = q_ratio
    vec[1:] = quantize(scaled, params.clipping_range, params.quantization_range)
    return vec, clipped


def quantize(
    values: np.ndarray, clipping_range: float, quantization_range: int, rng: Any = None
) -> np.ndarray:
    """``values`` clipped to ``[-c, c]``, mapped onto ``[0, Q]`` and rounded stochastically
    (up with probability the fractional part, so the expectation is exact): uint32 in [0, Q].

    The same map as Flower's ``quantize``; the rounding's randomness protects nothing (the
    masks do), so any generator will do; by default a fresh one seeded from the OS.
    """
    rng = np.random.default_rng() if rng is None else rng
    c = float(clipping_range)
    work = np.clip(np.asarray(values, dtype=np.float64), -c, c)
    work += c
    work *= quantization_range / (2 * c)
    work += rng.random(work.size).reshape(work.shape)
    np.floor(work, out=work)
    np.minimum(work, quantization_range, out=work)  # c + rounding noise cannot pass Q
    return work.astype(np.uint32)


def mod(vec: np.ndarray, modulus: int) -> np.ndarray:
    """``vec`` (uint32, wrapped modulo 2**32) reduced modulo ``modulus`` (Flower's arithmetic)."""
    if modulus == 2**32:
        return vec
    (out,) = parameters_mod([vec], modulus)
    return out


def decode(total: np.ndarray, num_sites: int, params: RoundParams) -> tuple[int, np.ndarray]:
    """The weighted mean update from the unmasked sum (reduced) of ``num_sites`` encoded vectors.

    Raises ValueError when the sum cannot come from honest sites (a weight or an entry beyond
    what ``num_sites`` vectors in [0, Q] can add up to): a contribution was malformed.
    """
    q = params.quantization_range
    bound = num_sites * q
    total = total.astype(np.int64)
    q_total = int(total[0])
    if not 0 < q_total <= bound:
        raise ValueError(
            f"the unmasked total weight {q_total} is outside (0, {bound}]: a site's contribution "
            "was malformed or the masks did not cancel"
        )
    body = total[1:]
    if body.size and (int(body.max()) > bound or int(body.min()) < 0):
        raise ValueError(
            f"the unmasked sum has entries outside [0, {bound}]: a site's contribution was "
            "malformed or the masks did not cancel"
        )
    (mean,) = dequantize([body], params.clipping_range, q)
    # Each of the n dequantised vectors carries an offset of -clipping_range (Flower's layout).
    mean += -(num_sites - 1) * params.clipping_range
    mean *= q / q_total
    return q_total, mean


def error_bound(weights: Iterable[float], max_abs_update: float, params: RoundParams) -> float:
    """Largest per-entry gap between the secure mean and the plain weighted mean of updates.

    Each site's entries are rounded stochastically to a grid of step ``2c/Q`` (error < one step)
    and its weight to a multiple of ``max_weight/Q`` (error <= half a step). For n sites with
    quantised weights summing to ``S`` (in units of ``max_weight``) and updates bounded by ``A``
    (and within the clipping range), the gap is at most ``n (2c + A) / (Q S)``.
    """
    ws = list(weights)
    total = sum(weight_factor(w, params) for w in ws) / params.quantization_range
    if total <= 0:
        return float("inf")
    return (
        len(ws) * (2 * params.clipping_range + max_abs_update) / (params.quantization_range * total)
    )
