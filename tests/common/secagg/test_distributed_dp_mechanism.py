"""The distributed discrete Gaussian mechanism (common/secagg/distributed_dp.py): rotation,
rounding, noise, the modular sum, and the refusal of configurations whose sum could wrap around."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import hadamard

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.secagg import distributed_dp

SEED = b"r" * 32


def _spec(
    dim: int = 50, *, units: int = 64, z: float = 1.0, clip: float = 0.5
) -> distributed_dp.DdpSpec:
    return distributed_dp.DdpSpec(
        clip_norm=clip, noise_multiplier=z, norm_units=units, beta=0.5, dim=dim
    )


def test_fwht_is_the_orthonormal_hadamard_matrix_and_rotation_inverts() -> None:
    x = np.random.default_rng(0).normal(size=64)
    assert np.allclose(distributed_dp.fwht(x), hadamard(64) @ x / 8)
    y = distributed_dp.rotate(x, SEED)
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)  # orthogonal
    assert np.allclose(distributed_dp.unrotate(y, SEED), x)
    assert not np.allclose(distributed_dp.rotate(x, b"s" * 32), y)  # the signs depend on the seed
    with pytest.raises(ValueError, match="power-of-two"):
        distributed_dp.fwht(np.ones(12))


def test_rotation_flattens_a_spike() -> None:
    """The point of the rotation: a one-hot update spreads over every coordinate."""
    x = np.zeros(1024)
    x[3] = 32.0
    assert np.abs(distributed_dp.rotate(x, SEED)).max() == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [0.8, 3.5, 250.0])
def test_discrete_gaussian_matches_its_pmf(sigma: float) -> None:
    rng = np.random.default_rng(1)
    z = distributed_dp.discrete_gaussian(sigma, 100_000, rng)
    assert z.dtype == np.int64
    support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3)
    pmf = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2))
    pmf /= pmf.sum()
    var = float((pmf * support**2).sum())  # slightly below sigma^2 for small sigma
    assert abs(z.mean()) < 5 * math.sqrt(var / z.size)
    assert z.var() == pytest.approx(var, rel=0.03)
    if sigma < 10:  # every frequency within 5 standard errors of the exact pmf
        freq = np.array([(z == k).mean() for k in support])
        se = np.sqrt(pmf * (1 - pmf) / z.size)
        assert np.all(np.abs(freq - pmf) <= 5 * se + 1e-5)


def test_conditional_rounding_is_unbiased_and_within_its_bound() -> None:
    rng = np.random.default_rng(2)
    spec = _spec(dim=16, units=8)
    x = distributed_dp.rotate(rng.normal(size=16), SEED)
    x *= spec.norm_units / max(np.linalg.norm(x), 1e-12)  # norm exactly the clip
    rounds = np.stack(
        [distributed_dp.conditional_round(x, spec.sensitivity, rng) for _ in range(4000)]
    )
    assert np.all(np.linalg.norm(rounds, axis=1) <= spec.sensitivity + 1e-9)
    assert np.all(rounds == np.floor(rounds))
    assert np.allclose(rounds.mean(axis=0), x, atol=0.05)
    # The bound inflates the norm a little, never below it and at most by sqrt(d).
    assert spec.norm_units < spec.sensitivity <= spec.norm_units + math.sqrt(spec.padded)


def _secure_sum(vectors: list[np.ndarray], modulus: int) -> np.ndarray:
    """What SecAgg+ hands the server: the modular sum (the masks cancel)."""
    total = np.zeros(vectors[0].size, dtype=np.uint32)
    for v in vectors:
        total += distributed_dp.to_modular(v, modulus)  # uint32 wraps modulo 2**32
    return total % np.uint32(modulus) if modulus < 2**32 else total


def test_the_unmasked_sum_has_the_configured_noise_variance() -> None:
    """Many trials on small vectors: the decoded sum minus the true sum of clipped updates is
    the noise; its per-coordinate variance is n * sigma_local^2 / scale^2 (plus the rounding,
    at most n/4 units^2), and its mean is zero."""
    n, threshold, dim, trials = 3, 2, 60, 1000
    spec = _spec(dim=dim, units=64, z=0.7, clip=0.5)
    rng = np.random.default_rng(3)
    updates = [rng.normal(size=dim) * 0.2 for _ in range(n)]
    clipped = [u * min(1.0, spec.clip_norm / np.linalg.norm(u)) for u in updates]
    true_sum = np.sum(clipped, axis=0)
    residuals = []
    for t in range(trials):
        seed = distributed_dp.rotation_seed("run", t)
        vecs = [
            distributed_dp.privatize(u, spec, threshold=threshold, seed=seed, rng=rng)
            for u in updates
        ]
        total = _secure_sum(vecs, 2**32)
        noisy = distributed_dp.decode_sum(
            total, spec, num_sites=n, threshold=threshold, modulus=2**32, seed=seed
        )
        residuals.append(noisy - true_sum)
    res = np.concatenate(residuals)
    expected = n * spec.local_std(threshold) ** 2 / spec.scale**2
    rounding = n / 4 / spec.scale**2
    # 60,000 samples: the sample variance's standard error is about 0.6%.
    assert expected * 0.96 < res.var() < (expected + rounding) * 1.04
    assert abs(res.mean()) < 5 * math.sqrt(expected / res.size)
    # With the threshold's sites only, the noise is the target z * Delta_2 (in units).
    assert spec.local_std(threshold) ** 2 * threshold == pytest.approx(spec.central_std**2)


def test_one_contribution_is_noised_with_the_local_share() -> None:
    """A single site's vector (what its masks hide) is its rounded update plus noise of std
    sigma_local: never the clean value."""
    spec = _spec(dim=200, units=256, z=1.0)
    rng = np.random.default_rng(4)
    u = rng.normal(size=200) * 0.01
    seed = distributed_dp.rotation_seed("run", 1)
    vec = distributed_dp.privatize(u, spec, threshold=2, seed=seed, rng=rng)
    clean = distributed_dp.rotate(np.r_[u * spec.scale, np.zeros(spec.padded - 200)], seed)
    noise = vec[1:] - clean
    assert vec[0] == 1
    assert noise.std() == pytest.approx(spec.local_std(2), rel=0.15)


def test_decode_rejects_sums_no_honest_sites_produce() -> None:
    spec = _spec(dim=8)
    seed = distributed_dp.rotation_seed("run", 1)
    vec = distributed_dp.privatize(
        np.zeros(8), spec, threshold=2, seed=seed, rng=np.random.default_rng(5)
    )
    total = _secure_sum([vec, vec], 2**32)
    with pytest.raises(ValueError, match="site count is 2, expected 3"):
        distributed_dp.decode_sum(total, spec, num_sites=3, threshold=2, modulus=2**32, seed=seed)
    total[3] = np.uint32(2**30)
    with pytest.raises(ValueError, match="beyond what 2 sites"):
        distributed_dp.decode_sum(total, spec, num_sites=2, threshold=2, modulus=2**32, seed=seed)


def test_a_configuration_that_could_wrap_around_is_refused_naming_the_keys() -> None:
    spec = _spec(dim=30_000, units=2**18, z=1.0)
    # 3 sites x 2**18 + noise does not fit in (-2**19, 2**19) ...
    with pytest.raises(ConfigError, match="wrap around modulus-range 1048576") as exc:
        spec.check_modulus(num_sites=3, threshold=2, modulus=2**20)
    for key in ("ddp-norm-units", "client-noise-multiplier", "modulus-range", "fraction-train"):
        assert key in str(exc.value)
    # ... but it does in 32 bits, up to max_sites sites.
    spec.check_modulus(num_sites=3, threshold=2, modulus=2**32)
    top = spec.max_sites(2**32, 2)
    spec.check_modulus(num_sites=top, threshold=2, modulus=2**32)
    with pytest.raises(ConfigError):
        spec.check_modulus(num_sites=top + 1, threshold=2, modulus=2**32)


def test_the_wraparound_bound_is_what_makes_decoding_correct() -> None:
    """Near the bound the modular sum still decodes; a modulus below it would not."""
    spec = _spec(dim=4, units=2**12, z=0.5, clip=1.0)
    seed = distributed_dp.rotation_seed("run", 1)
    u = np.array([1.0, 0, 0, 0])
    vecs = [
        distributed_dp.privatize(u, spec, threshold=2, seed=seed, rng=np.random.default_rng(i))
        for i in range(3)
    ]
    plain = np.sum(vecs, axis=0)
    small = 2 ** int(math.ceil(math.log2(np.abs(plain[1:]).max())))  # the sum overflows this
    assert int(np.abs(plain[1:]).max()) >= small // 2
    with pytest.raises(ConfigError):
        spec.check_modulus(num_sites=3, threshold=2, modulus=small)
    ok = distributed_dp.decode_sum(
        _secure_sum(vecs, 2**32), spec, num_sites=3, threshold=2, modulus=2**32, seed=seed
    )
    assert np.allclose(ok, distributed_dp.unrotate(plain[1:] / spec.scale, seed))


def test_config_keys_and_levels() -> None:
    cfg = RunConfig(dp_level="distributed")
    assert cfg.distributed_dp and not cfg.record_level_dp and not cfg.client_level_dp
    both = RunConfig(dp_level="record+distributed")
    assert both.distributed_dp and both.record_level_dp and not both.client_level_dp
    with pytest.raises(ConfigError, match="needs 'secagg' = true"):
        RunConfig(dp_level="distributed", secagg=False)
    with pytest.raises(ConfigError, match="ddp-beta"):
        RunConfig(ddp_beta=1.0)
    with pytest.raises(ConfigError, match="ddp-norm-units"):
        RunConfig(ddp_norm_units=0)
    spec = distributed_dp.spec_from_config(
        cfg, {"w": np.zeros((3, 5), np.float32), "n": np.zeros(2, np.int64)}
    )
    assert (spec.dim, spec.padded, spec.norm_units) == (15, 16, 4096)
