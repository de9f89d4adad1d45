"""Cryptographically secure randomness at a deployed site: DP-SGD's noise and Poisson batches,
distributed DP's rounding and discrete Gaussian noise, and modality dropout.

DP-SGD protects a record only while nobody can predict or reconstruct the noise and the batches.
torch's generators (Mersenne Twister on CPU, Philox on CUDA) are not cryptographic: whoever sees
enough of their output can predict the rest. A deployed site therefore draws both from a ChaCha20
keystream (RFC 8439, via ``cryptography``) under a fresh random key per round, as Opacus'
``secure_mode`` does with ``torchcsprng`` (which has no build for the pinned torch).

Gaussians are made from the keystream by Box-Muller in float64, then hardened against the
floating-point attacks on DP noise (Mironov 2012; Jin et al., arXiv:2112.05307) as Opacus'
secure mode does (``opacus.optimizers.optimizer._generate_noise``, after Holohan and Braghin,
arXiv:2107.10138, section 5.1): each noise value is the sum of four independent draws of
N(0, std^2), divided by 2, so its low-order bits no longer reveal which draw produced it.

Simulations keep the keyed, reproducible generators (``noise-seed``; client/handlers.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sized

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

KEY_BYTES = 32
# ChaCha20's block counter is 32 bits: re-key well before 2**32 blocks of 64 bytes repeat.
_REKEY_BYTES = 2**36
# Draws summed per noise value (2n with n = 2, as Opacus' secure mode).
SECURE_DRAWS = 4


class SecureRandom:
    """Uniforms and Gaussians from a ChaCha20 keystream under a random (or given) 256-bit key.

    Parameters
    ----------
    key
        32 bytes; ``None`` (what a site uses) draws a fresh key from ``os.urandom``. A fixed key
        is for tests only: whoever knows it can regenerate every draw.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes; found {len(key)}")
        self._fixed_key = key
        self._rekey(key)

    def _rekey(self, key: bytes | None) -> None:
        self._key = key if key is not None else os.urandom(KEY_BYTES)
        # A fresh key for every stream, so a zero nonce (and counter) never repeats a stream.
        cipher = Cipher(algorithms.ChaCha20(self._key, b"\x00" * 16), mode=None)
        self._stream = cipher.encryptor()
        self._used = 0

    def random_bytes(self, n: int) -> bytes:
        """``n`` keystream bytes."""
        if self._used + n > _REKEY_BYTES:
            # A derived next key keeps a fixed-key stream reproducible; a random one stays random.
            nxt = self._stream.update(b"\x00" * KEY_BYTES) if self._fixed_key else None
            self._rekey(nxt)
        self._used += n
        return self._stream.update(b"\x00" * n)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform on [0, 1), each from 53 random bits (every float64 grid value)."""
        words = np.frombuffer(self.random_bytes(8 * n), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def random(self, size: int) -> np.ndarray:
        """``size`` uniforms on [0, 1): :meth:`uniform` under numpy's ``Generator`` name, so a
        :class:`SecureRandom` can stand in for one (``common/secagg/distributed_dp.py``)."""
        return self.uniform(size)

    def geometric(self, p: float, size: int) -> np.ndarray:
        """``size`` draws of the geometric distribution on {1, 2, ...} with success probability
        ``p`` (numpy's ``Generator.geometric``), by inversion: ``floor(log V / log(1 - p)) + 1``
        with V uniform on (0, 1], so that P(X > m) = P(V <= (1 - p)^m) = (1 - p)^m."""
        if not 0 < p <= 1:
            raise ValueError(f"p must be in range (0, 1]; found {p}")
        if p == 1:
            return np.ones(size, dtype=np.int64)
        v = 1.0 - self.uniform(size)  # in (0, 1]
        return (np.floor(np.log(v) / math.log1p(-p)) + 1).astype(np.int64)

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` independent N(0, 1) draws in float64 (Box-Muller; both outputs used)."""
        m = (n + 1) // 2
        u = self.uniform(2 * m)
        u1 = 1.0 - u[:m]  # in (0, 1]: the logarithm stays finite
        r = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * math.pi * u[m:]
        return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]

    def gaussian_noise(self, reference: torch.Tensor, *, std: float) -> torch.Tensor:
        """Noise shaped like ``reference`` with standard deviation ``std``, hardened against
        floating-point attacks: (z1 + z2 + z3 + z4) / 2 of four N(0, std^2) draws."""
        if std == 0:
            return torch.zeros_like(reference)
        n = reference.numel()
        z = self.standard_normal(SECURE_DRAWS * n).reshape(SECURE_DRAWS, n).sum(axis=0)
        z *= std / math.sqrt(SECURE_DRAWS)
        return (
            torch.from_numpy(z)
            .to(device=reference.device, dtype=reference.dtype)
            .view(reference.shape)
        )


class SecurePoissonSampler(Sampler[list[int]]):
    """Poisson sampling (each record in each batch with probability ``sample_rate``) from a
    :class:`SecureRandom`: Opacus' ``UniformWithReplacementSampler`` with a secure source."""

    def __init__(
        self, *, num_samples: int, sample_rate: float, steps: int, rng: SecureRandom
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; found {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in range (0, 1]; found {sample_rate}")
        self.num_samples, self.sample_rate, self.steps, self.rng = (
            num_samples,
            sample_rate,
            steps,
            rng,
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.rng.uniform(self.num_samples) < self.sample_rate
            yield np.flatnonzero(mask).tolist()


class SecureDPDataLoader(DPDataLoader):
    """Opacus' ``DPDataLoader`` (Poisson batches, empty batches allowed) whose batches come from
    a :class:`SecurePoissonSampler`. Hand it to ``make_private(poisson_sampling=False)``: it
    already samples; Opacus then takes the sampling rate ``1 / steps`` from its length."""

    def __init__(
        self, dataset: Dataset, *, sample_rate: float, steps: int, rng: SecureRandom
    ) -> None:
        assert isinstance(dataset, Sized)
        self.sample_rate = sample_rate
        self.distributed = False
        first = dataset[0]
        DataLoader.__init__(
            self,
            dataset=dataset,
            batch_sampler=SecurePoissonSampler(
                num_samples=len(dataset), sample_rate=sample_rate, steps=steps, rng=rng
            ),
            collate_fn=wrap_collate_with_empty(
                collate_fn=default_collate,
                batch_first=True,
                rand_on_empty=False,
                sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                dtypes=[dtype_safe(x) for x in first],
            ),
        )


def use_secure_noise(optimizer: torch.optim.Optimizer, rng: SecureRandom) -> None:
    """Make an Opacus DP optimizer draw its noise from ``rng`` (same std, same place in the
    step: after clipping, before scaling), in place of ``torch.normal``."""
    if not hasattr(optimizer, "noise_multiplier") or not hasattr(optimizer, "max_grad_norm"):
        raise TypeError(f"not an Opacus DP optimizer: {type(optimizer).__name__}")

    def add_noise() -> None:
        # The adaptive-clipping override, as Opacus' fast-gradient-clipping optimizer reads it.
        sigma = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = sigma * optimizer.max_grad_norm  # type: ignore[attr-defined]
        for p in optimizer.params:  # type: ignore[attr-defined]
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + rng.gaussian_noise(p.summed_grad, std=std)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # type: ignore[method-assign]
    optimizer.secure_rng = rng  # type: ignore[attr-defined]
