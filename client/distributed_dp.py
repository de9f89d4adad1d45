"""The site's half of distributed DP: noise its own update before SecAgg+ masks it.

``dp-level = distributed`` (or ``record+distributed``): after training, the site turns its
update into the integer vector of :func:`fedfuse.common.secagg.distributed_dp.privatize` -- clipped,
scaled, rotated, rounded and noised with its share of the noise -- and the SecAgg+ mod masks that
vector instead of quantising the update. The noise and the rounding come from a ChaCha20 keystream
under a fresh random key at a deployed site (``common/privacy/secure_rng.py``), and from a generator
keyed with the site's secret in a simulation (the round seed of ``common/privacy/site_secret.py``;
reproducible); the rotation's signs come from a public per-round seed so that the server can invert
it. The SecAgg+ mod hands the round's parameters to the app under ``ROUND_KEY`` in
``Context.state`` (``common/secagg/distributed_dp.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.ddgauss import DdgEvent
from fedfuse.common.privacy.secure_rng import SecureRandom
from fedfuse.common.secagg import masking
from fedfuse.common.secagg.distributed_dp import (
    VECTOR_ARRAY,
    DdpSpec,
    RandomSource,
    privatize,
    rotation_seed,
    spec_from_config,
)
from fedfuse.common.secagg.params import RoundParams
from fedfuse.common.secagg.protocol import SecAggProtocolError

# The only sampling rate a site can stand behind for a round it is asked to train.
SITE_SAMPLE_RATE = 1.0
# Keeps the noise stream apart from the training streams drawn from the same round seed.
_NOISE_STREAM = 0xDD9


@dataclass(frozen=True)
class SiteDdpRound:
    """One round's distributed-DP parameters at a site."""

    spec: DdpSpec
    threshold: int
    num_sites: int
    modulus: int
    rotation: bytes
    event: DdgEvent


def secagg_round(params: RoundParams) -> dict[str, int]:
    """The SecAgg+ round parameters the site's noise depends on, as the mod hands them over."""
    return {
        "threshold": params.threshold,
        "sample-num": params.sample_num,
        "modulus": params.modulus_range,
    }


def site_round(
    cfg: RunConfig,
    global_arrays: dict[str, np.ndarray],
    secagg: Mapping[str, Any] | None,
    *,
    run_uid: str,
    server_round: int,
) -> SiteDdpRound:
    """The round's mechanism from the run config, the model's parameters and the SecAgg+ round
    parameters (``threshold``, ``sample-num``, ``modulus``: what the SecAgg+ mod hands the app
    under :data:`ROUND_KEY` in ``Context.state``); raises (and so sends no update) if SecAgg+ is
    off or the sum could wrap.

    Needs only the parameters' shapes, so the site can also ask it at the SecAgg+ setup stage,
    with its own model, before any key exchange (``client/handlers.py``).
    """
    if secagg is None:
        raise SecAggProtocolError(
            f"dp-level {cfg.dp_level!r}: this training request did not come through SecAgg+ "
            "(no round parameters); refusing to send an update with only this site's share "
            "of the noise"
        )
    threshold, num_sites = int(secagg["threshold"]), int(secagg["sample-num"])
    modulus = int(secagg["modulus"])
    spec = spec_from_config(cfg, global_arrays)
    # The site checks the modulus itself: a sum that wraps around would be garbage, and a
    # garbage model is worth nothing for the privacy spent on it.
    spec.check_modulus(num_sites=num_sites, threshold=threshold, modulus=modulus)
    seed = rotation_seed(run_uid, server_round)
    # Rate 1: the site cannot verify how the coordinator samples sites (Flower asks
    # max(int(N x fraction-train), min-sites) of them, not a Poisson sample at fraction-train),
    # so every round it is asked counts in full. The coordinator's amplified figure is its
    # own, reported apart with its assumption (server/distributed_dp.py).
    event = spec.event(threshold=threshold, sample_rate=SITE_SAMPLE_RATE)
    return SiteDdpRound(spec, threshold, num_sites, modulus, seed, event)


def noisy_vector(
    trained: dict[str, np.ndarray],
    global_arrays: dict[str, np.ndarray],
    rnd: SiteDdpRound,
    *,
    seed: int,
    secure_rng: SecureRandom | None = None,
) -> ArrayRecord:
    """The site's contribution (int64 ``[1, noisy vector]``) for the SecAgg+ mod to mask.

    ``secure_rng`` (what a deployed site passes): the rounding and the noise come from this
    cryptographically secure generator, which nobody can regenerate. ``None`` (simulation):
    from a generator keyed with ``seed`` (the site's secret round seed), reproducible.
    """
    keys = masking.float_keys(global_arrays)
    delta = masking.flatten(trained, keys) - masking.flatten(global_arrays, keys)
    rng: RandomSource = (
        secure_rng
        if secure_rng is not None
        else np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _NOISE_STREAM])))
    )
    vec = privatize(delta, rnd.spec, threshold=rnd.threshold, seed=rnd.rotation, rng=rng)
    return ArrayRecord({VECTOR_ARRAY: Array(vec)})
