"""The site's half of distributed DP: noise its own update before SecAgg+ masks it.

``dp-level = distributed`` (or ``record+distributed``): after training, the site turns its
update into the integer vector of :func:`fedfuse.common.secagg.distributed_dp.privatize` -- clipped,
scaled, rotated, rounded and noised with its share of the noise -- and the SecAgg+ mod masks that
vector instead of quantising the update. The noise and the rounding are drawn from a generator keyed
with the site's secret (the round seed of ``common/privacy/site_secret.py``); the rotation's
signs come from a public per-round seed so that the server can invert it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.ddgauss import DdgEvent
from fedfuse.common.secagg import masking
from fedfuse.common.secagg.distributed_dp import (
    ROUND_KEY,
    VECTOR_ARRAY,
    DdpSpec,
    privatize,
    rotation_seed,
    spec_from_config,
)
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


def site_round(msg: Message, cfg: RunConfig, global_arrays: dict[str, np.ndarray]) -> SiteDdpRound:
    """The round's mechanism from the run config, the model and the SecAgg+ round parameters
    the mod added; raises (and so sends no update) if SecAgg+ is off or the sum could wrap."""
    rec = msg.content.config_records.get(ROUND_KEY)
    if rec is None:
        raise SecAggProtocolError(
            f"dp-level {cfg.dp_level!r}: this training request did not come through SecAgg+ "
            "(no round parameters); refusing to send an update with only this site's share "
            "of the noise"
        )
    threshold, num_sites = int(rec["threshold"]), int(rec["sample-num"])  # type: ignore[arg-type]
    modulus = int(rec["modulus"])  # type: ignore[arg-type]
    spec = spec_from_config(cfg, global_arrays)
    # The site checks the modulus itself: a sum that wraps around would be garbage, and a
    # garbage model is worth nothing for the privacy spent on it.
    spec.check_modulus(num_sites=num_sites, threshold=threshold, modulus=modulus)
    config: Any = msg.content["config"]
    seed = rotation_seed(str(config.get("run-uid", "")), int(config.get("server-round", 0)))
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
) -> ArrayRecord:
    """The site's contribution (int64 ``[1, noisy vector]``) for the SecAgg+ mod to mask."""
    keys = masking.float_keys(global_arrays)
    delta = masking.flatten(trained, keys) - masking.flatten(global_arrays, keys)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _NOISE_STREAM])))
    vec = privatize(delta, rnd.spec, threshold=rnd.threshold, seed=rnd.rotation, rng=rng)
    return ArrayRecord({VECTOR_ARRAY: Array(vec)})
