"""Faults that tests (and the audit benchmark) plant in a site's training to show that a check
can fail. They live here, outside the installed packages, so no deployed site can reach them:
production code reads no switch that weakens a guarantee."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedfuse.common.privacy.secure_rng import SecureRandom

# The modules whose add_noise calls _generate_noise (plain and fast-gradient-clipping optimizers).
opacus_optimizer = importlib.import_module("opacus.optimizers.optimizer")
opacus_fast = importlib.import_module("opacus.optimizers.optimizer_fast_gradient_clipping")


def _no_noise(std: float, reference: torch.Tensor, generator=None, secure_mode=False):  # noqa: ANN001, ANN202, ARG001
    return torch.zeros_like(reference)


def _no_secure_noise(self: SecureRandom, reference: torch.Tensor, *, std: float) -> torch.Tensor:  # noqa: ARG001
    return torch.zeros_like(reference)


@contextmanager
def noise_dropped() -> Iterator[None]:
    """Within the block, DP-SGD adds no noise (every Opacus optimizer, keyed or secure
    generator) while the site still plans, records and reports its noise multiplier and
    epsilon: the privacy bug the empirical audit must catch. In this process only, so the
    federation must run in-process (fedfuse.simulations.runner.federate_in_process)."""
    saved = (opacus_optimizer._generate_noise, opacus_fast._generate_noise)
    saved_secure = SecureRandom.gaussian_noise
    opacus_optimizer._generate_noise = _no_noise  # type: ignore[assignment]
    opacus_fast._generate_noise = _no_noise  # type: ignore[assignment]
    SecureRandom.gaussian_noise = _no_secure_noise  # type: ignore[method-assign]
    try:
        yield
    finally:
        opacus_optimizer._generate_noise, opacus_fast._generate_noise = saved
        SecureRandom.gaussian_noise = saved_secure  # type: ignore[method-assign]
