"""Distributed DP at the server: size the round, decode the noisy sum, account the rounds.

The server never adds noise here and never sees an un-noised sum: each site noised its own
vector before masking (``client/distributed_dp.py``). The server derives the same mechanism from the
run config and the model (:func:`fedfuse.common.secagg.distributed_dp.spec_from_config`), refuses a
round whose noisy sum could wrap around the modulus before any site trains, and accounts each round
as one distributed discrete Gaussian event (``common/privacy/ddgauss.py``) at the site sampling
rate, under the assumption it records: at least the reconstruction threshold of sites' noise is in
every sum (SecAgg+ cannot finish a round with fewer).

That figure is the coordinator's: it takes amplification by sampling (rate = sites sampled /
sites available) on the coordinator's word, which a site cannot verify. Each site's own ledger
counts every round it is asked at rate 1 (``client/distributed_dp.py``), so ``privacy.json`` shows
both: ``epsilon`` (amplified, labelled with ``sampling_assumption``) and ``epsilon_unamplified``.
"""

from __future__ import annotations

import dataclasses
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedfuse.common.privacy.ddgauss import DdgEvent, ddg_epsilon
from fedfuse.common.secagg.distributed_dp import DdpSpec, spec_from_config

ACCOUNTANT = "rdp (KLS21 Prop. 14; Zhu-Wang 2019 Poisson subsampling)"
# Where a round record (metrics.jsonl) keeps the distributed-DP accounting; client-level DP with
# noise at the server keeps its own under "client-dp" (server/client_level_dp.py).
ROUND_RECORD_KEY = "distributed-dp"
SAMPLING_ASSUMPTION = (
    "epsilon is amplified by sampling: it assumes each site took part in each round only with "
    "probability (sites sampled / sites available), independently, as the coordinator reports; "
    "no site can verify this. epsilon_unamplified counts every round at rate 1, as each site's "
    "own ledger does for every round it is asked"
)


class DistributedDp:
    """The run's distributed-DP parameters and privacy accounting."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.delta = float(cfg.target_delta)
        self.events: list[DdgEvent] = []
        self.last: dict[str, Any] = {}

    def spec(self, arrays: dict[str, np.ndarray]) -> DdpSpec:
        return spec_from_config(self.cfg, arrays)

    def account(self, spec: DdpSpec, *, threshold: int, sampled: int, available: int) -> None:
        """One finished round: its event, at sampling rate sampled/available."""
        rate = min(1.0, sampled / available) if available else 1.0
        event = spec.event(threshold=threshold, sample_rate=rate)
        if not self.events and self.cfg.dp_level == "distributed":
            # The noise comes from client-noise-multiplier, not from target-epsilon (as for
            # dp-level client): say so when the whole run will spend more than the target.
            planned = ddg_epsilon([event] * int(self.cfg.num_rounds), delta=self.delta)
            if planned > self.cfg.target_epsilon:
                log(
                    WARNING,
                    "distributed DP: %s rounds at client-noise-multiplier %g will spend "
                    "epsilon %.3g (delta %g) per site, above target-epsilon %g; raise "
                    "client-noise-multiplier or lower num-rounds to stay within it",
                    self.cfg.num_rounds,
                    self.cfg.client_noise_multiplier,
                    planned,
                    self.delta,
                    self.cfg.target_epsilon,
                )
        self.events.append(event)
        self.last = {
            "scale": spec.scale,
            "dim": spec.dim,
            "padded_dim": spec.padded,
            "norm_units": spec.norm_units,
            "rounded_sensitivity": spec.sensitivity,
            "beta": spec.beta,
            "tail_sigmas": spec.tail_sigmas,
        }

    def epsilon(self) -> float:
        """The coordinator's figure: each round amplified by its sampling rate."""
        return ddg_epsilon(self.events, delta=self.delta) if self.events else 0.0

    def epsilon_unamplified(self) -> float:
        """Every round at rate 1: what the ledger of a site asked in every round records."""
        events = [dataclasses.replace(e, sample_rate=1.0) for e in self.events]
        return ddg_epsilon(events, delta=self.delta) if events else 0.0

    def summary(self) -> dict[str, Any]:
        """What each round record keeps under :data:`ROUND_RECORD_KEY`, and privacy.json
        reports (under ``client_level``: the guarantee is client-level) for the run so far."""
        last = self.events[-1] if self.events else None
        return {
            "epsilon": self.epsilon(),
            "sampling_assumption": SAMPLING_ASSUMPTION,
            "epsilon_unamplified": self.epsilon_unamplified(),
            "delta": self.delta,
            "noise_multiplier": float(self.cfg.client_noise_multiplier),
            "clip_norm": float(self.cfg.client_clip_norm),
            "rounds": len(self.events),
            "sample_rates": [e.sample_rate for e in self.events],
            "accountant": ACCOUNTANT,
            "mechanism": (
                "distributed discrete Gaussian inside SecAgg+ (Kairouz, Liu, Steinke 2021): "
                "each site clips, scales, rotates, rounds and adds its share of the noise "
                "before masking; the server only unmasks the noisy sum"
            ),
            "assumption": (
                f"at least {last.min_sites if last else '?'} sites (the SecAgg+ reconstruction "
                "threshold) each add their noise share honestly in every round"
            ),
            "events": [e.mechanism() for e in self.events],
            "local_noise_std_units": last.local_std if last else None,
            "central_noise_std_units": last.central_std if last else None,
            **self.last,
        }


def make_distributed_dp(
    cfg: Any, rounds: list[dict[str, Any]] | None = None
) -> DistributedDp | None:
    """The run's distributed DP (None unless ``dp-level`` is distributed or
    record+distributed); a resumed run continues the accounting of the ``rounds`` it keeps."""
    if not getattr(cfg, "distributed_dp", False):
        return None
    dp = DistributedDp(cfg)
    done = [r[ROUND_RECORD_KEY] for r in rounds or [] if ROUND_RECORD_KEY in r]
    if done and "events" in done[-1]:
        parsed = [DdgEvent.parse(m) for m in done[-1]["events"]]
        dp.events = [e for e in parsed if e is not None]
    return dp
