"""Client-level DP at the server: noise on the aggregate of the sites' clipped updates, and its
accounting (the maths lives in :mod:`fedfuse.common.privacy.client_level_dp`).

Two entry points, for the two ways the server can see updates:

* :meth:`ClientLevelDp.privatize_replies` -- the server sees each site's (clipped) model, as with
  the plain strategies. It re-clips (a no-op for an honest site), then rewrites the replies so
  that the strategy's ordinary weighted mean becomes ``global + (sum of clipped updates +
  N(0, (z*C)^2)) / sampled``: equal weights, updates scaled by ``replied/sampled``, and
  independent noise of std ``z*C*sqrt(replied)/sampled`` on each reply (whose mean has exactly
  the required std ``z*C/sampled``). Any averaging strategy (FedAvg, FedProx, FedAdam's mean
  update) then aggregates privately without knowing about DP.
* :meth:`ClientLevelDp.noisy_mean_from_sum` -- the server sees only the SUM of the clipped
  updates (secure aggregation); the sites clipped before masking.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch
from flwr.app import ArrayRecord, Message

from fedfuse.common.privacy.client_level_dp import (
    CLIENT_ACCOUNTANT,
    client_level_epsilon,
    clip_update_,
    noise_std_of_sum,
)


class ClientLevelDp:
    """Noise and accounting for client-level DP over one run."""

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        delta: float,
        generator: torch.Generator | None = None,
    ) -> None:
        if not clip_norm > 0 or not noise_multiplier > 0:
            raise ValueError(
                f"clip_norm and noise_multiplier must be > 0; found {clip_norm}, {noise_multiplier}"
            )
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        # Noise the sites cannot predict: a secret seed, not the run's public seed.
        self.generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        self.sample_rates: list[float] = []
        self._sampled = 0
        self._rate = 1.0

    def begin_round(self, *, sampled: int, available: int) -> None:
        """Called when the round's sites are sampled (before any reply)."""
        self._sampled = sampled
        self._rate = sampled / available if available else 1.0

    def _noise(self, like: torch.Tensor, std: float) -> torch.Tensor:
        return torch.normal(
            0.0, std, size=like.shape, generator=self.generator, dtype=torch.float64
        )

    def privatize_replies(
        self, replies: list[Message], global_arrays: ArrayRecord, *, weight_key: str
    ) -> list[Message]:
        """Rewrite the replies in place (see the module docstring) and account the round."""
        if not replies:
            return replies
        sampled = max(self._sampled, len(replies))
        reference = global_arrays.to_torch_state_dict()
        scale = len(replies) / sampled
        std = noise_std_of_sum(clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier)
        std_each = std * math.sqrt(len(replies)) / sampled
        for msg in replies:
            local = msg.content["arrays"].to_torch_state_dict()
            clip_update_(local, reference, clip_norm=self.clip_norm)
            out = {}
            for k, ref in reference.items():
                if not torch.is_floating_point(ref):
                    out[k] = local[k]
                    continue
                ref64 = ref.to(torch.float64)
                delta = (local[k].to(torch.float64) - ref64) * scale
                out[k] = (ref64 + delta + self._noise(ref, std_each)).to(ref.dtype)
            msg.content["arrays"] = ArrayRecord(out)
            next(iter(msg.content.metric_records.values()))[weight_key] = 1
        self.sample_rates.append(self._rate)
        return replies

    def noisy_mean_from_sum(
        self, global_state: dict[str, torch.Tensor], delta_sum: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``global + (sum of clipped updates + noise) / sampled`` from the (securely
        aggregated) sum of the sites' clipped updates; accounts the round."""
        if self._sampled < 1:
            raise ValueError("begin_round() must say how many sites were sampled")
        std = noise_std_of_sum(clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier)
        out = {}
        for k, ref in global_state.items():
            if not torch.is_floating_point(ref):
                out[k] = ref
                continue
            noisy = delta_sum[k].to(torch.float64) + self._noise(ref, std)
            out[k] = (ref.to(torch.float64) + noisy / self._sampled).to(ref.dtype)
        self.sample_rates.append(self._rate)
        return out

    def epsilon(self) -> float:
        if not self.sample_rates:
            return 0.0
        return client_level_epsilon(
            self.sample_rates, noise_multiplier=self.noise_multiplier, delta=self.delta
        )

    def summary(self) -> dict[str, Any]:
        """What privacy.json reports beside the sites' record-level epsilon."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "rounds": len(self.sample_rates),
            "sample_rates": list(self.sample_rates),
            "accountant": CLIENT_ACCOUNTANT,
            "mechanism": "update clipping at each site, Gaussian noise on the sum at the server",
        }


def make_client_dp(cfg: Any, rounds: list[dict[str, Any]] | None = None) -> ClientLevelDp | None:
    """The run's client-level DP (None unless ``dp-level`` is ``client`` or ``record+client``); a
    resumed run continues the accounting of the ``rounds`` it keeps."""
    if not cfg.client_level_dp:
        return None
    dp = ClientLevelDp(
        clip_norm=cfg.client_clip_norm,
        noise_multiplier=cfg.client_noise_multiplier,
        delta=cfg.target_delta,
    )
    done = [r["client-dp"] for r in rounds or [] if "client-dp" in r]
    if done:
        dp.sample_rates = [float(q) for q in done[-1]["sample_rates"]]
    return dp
