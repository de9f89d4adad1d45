"""Client-level DP maths (DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963), shared by both sides.

A site clips its model update (its trained weights minus the global weights it received) to L2
norm ``clip_norm`` BEFORE anything leaves it -- so the clipping also holds under secure
aggregation, where the server never sees one update. The server adds Gaussian noise of standard
deviation ``noise_multiplier * clip_norm`` to the SUM of the clipped updates and divides by the
number of sites it sampled (fixed before replies arrive, so one site joining or leaving changes
the sum by at most ``clip_norm``). Each round is one Poisson-subsampled Gaussian mechanism at the
site sampling rate; the rounds compose with Opacus' RDP accountant.

Flower samples a fixed number of sites per round, not a Poisson sample; accounting it as Poisson
at rate sampled/available is the usual approximation (as in DP-FedAvg). With every site in every
round (``fraction-train = 1``) the rate is 1 and there is no approximation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

import torch

from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events

CLIENT_ACCOUNTANT = "rdp"


def _float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, t in state.items() if torch.is_floating_point(t)]


def update_norm(local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``local - reference`` over every floating-point tensor."""
    total = 0.0
    for k in _float_keys(reference):
        d = local[k].detach().to("cpu", torch.float64) - reference[k].detach().to(
            "cpu", torch.float64
        )
        total += float((d * d).sum())
    return math.sqrt(total)


def clip_update_(
    local: MutableMapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    clip_norm: float,
) -> float:
    """Scale ``local - reference`` in place so that its L2 norm is at most ``clip_norm``;
    returns the scale applied (1.0 when the update was already within the norm)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be in (0, inf); found {clip_norm}")
    norm = update_norm(local, reference)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    if scale < 1.0:
        with torch.no_grad():
            for k in _float_keys(reference):
                ref = reference[k].to(local[k].device, local[k].dtype)
                local[k].copy_(ref + (local[k] - ref) * scale)
    return scale


def noise_std_of_sum(*, clip_norm: float, noise_multiplier: float) -> float:
    """Standard deviation of the Gaussian noise added to the sum of clipped updates."""
    return noise_multiplier * clip_norm


def client_level_epsilon(
    sample_rates: list[float], *, noise_multiplier: float, delta: float
) -> float:
    """Epsilon of the rounds so far, one Gaussian step per round at its site sampling rate."""
    events = [DpSgdEvent(noise_multiplier, q, 1) for q in sample_rates]
    return epsilon_from_events(events, delta=delta, accountant=CLIENT_ACCOUNTANT)
