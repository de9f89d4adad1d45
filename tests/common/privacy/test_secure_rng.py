"""Secure randomness at a deployed site: ChaCha20 Gaussians and Poisson batches
(common/privacy/secure_rng.py), their statistics, and that the deployed ClientApp uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedfuse.client.app as client_app
import fedfuse.client.handlers as client_handlers
from fedfuse.client.training import train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.models import build_model
from fedfuse.common.models.objectives import modality_dropout
from fedfuse.common.privacy.secure_rng import (
    SecureDPDataLoader,
    SecurePoissonSampler,
    SecureRandom,
    use_secure_noise,
)
from tests.support.requests import _train_request
from tests.support.sites import copy_site

KEY = bytes(range(32))  # a fixed key: these statistical tests are then deterministic


def test_keystream_is_chacha20_and_a_fresh_key_gives_a_fresh_stream() -> None:
    # A fixed key repeats its stream (tests only); generators made without one draw a fresh
    # random key each, so their streams never agree.
    a = SecureRandom(KEY).random_bytes(64)
    assert a == SecureRandom(KEY).random_bytes(64)
    assert SecureRandom().random_bytes(64) != SecureRandom().random_bytes(64)
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(b"short")


def test_uniforms_are_uniform_on_the_unit_interval() -> None:
    u = SecureRandom(KEY).uniform(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_standard_normals_are_gaussian() -> None:
    z = SecureRandom(KEY).standard_normal(200_001)
    assert z.shape == (200_001,) and np.isfinite(z).all()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # Tails as a Gaussian's: P(|z| > 3) = 0.0027 (binomial sd about 0.00012 here).
    assert abs(np.mean(np.abs(z) > 3) - 2 * stats.norm.sf(3)) < 6e-4


def test_hardened_noise_has_the_requested_std_and_is_gaussian() -> None:
    """Each value sums four draws (Opacus' secure-mode defence); its std is still ``std``."""
    ref = torch.zeros(300, 400)
    noise = SecureRandom(KEY).gaussian_noise(ref, std=2.5)
    assert noise.shape == ref.shape and noise.dtype == torch.float32
    x = noise.flatten().double().numpy()
    assert abs(x.std() / 2.5 - 1) < 0.01
    assert stats.kstest(x / 2.5, "norm").pvalue > 1e-3
    assert torch.equal(SecureRandom(KEY).gaussian_noise(ref, std=0.0), ref)


def test_dp_optimizer_noise_matches_theory() -> None:
    """Opacus' test_noise_level, on the secure source: with zero gradients, the step's
    gradient is the noise / expected batch size, with std sigma * C (within 2%)."""
    torch.manual_seed(0)
    model = nn.Linear(200, 100)
    data = TensorDataset(torch.randn(64, 200), torch.zeros(64))
    sigma, clip = 1.3, 0.7
    module, opt, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(data, batch_size=16),
        noise_multiplier=sigma,
        max_grad_norm=clip,
    )
    use_secure_noise(opt, SecureRandom(KEY))
    x = torch.randn(16, 200)
    (module(x) * 0).sum().backward()
    opt.step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()]) * opt.expected_batch_size
    assert abs(grads.std().item() / (sigma * clip) - 1) < 0.02
    assert stats.kstest(grads.double().numpy() / (sigma * clip), "norm").pvalue > 1e-3


def test_poisson_batches_have_binomial_sizes() -> None:
    n, q = 400, 0.1
    sampler = SecurePoissonSampler(num_samples=n, sample_rate=q, steps=2000, rng=SecureRandom(KEY))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2000
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - n * q) < 0.3  # sd of the mean: sqrt(36 / 2000) = 0.13
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.1
    counts = np.bincount(np.concatenate(batches), minlength=n)
    assert abs(counts.mean() / (2000 * q) - 1) < 0.01  # every record equally likely
    loader = SecureDPDataLoader(
        TensorDataset(torch.arange(5.0)), sample_rate=0.01, steps=50, rng=SecureRandom(KEY)
    )
    assert len(loader) == 50 and loader.sample_rate == 0.01
    assert any(len(b[0]) == 0 for b in loader)  # empty batches are legal (Poisson)


@pytest.mark.parametrize("deployed", [True, False])
def test_a_deployed_site_trains_with_the_secure_generator(
    tmp_path: Path, synth_sites: list[Path], monkeypatch: pytest.MonkeyPatch, deployed: bool
) -> None:
    """The real ClientApp: a deployed site (node config ``data-path``) hands train_round a
    SecureRandom whose noise DP-SGD really draws; a virtual site of a simulation keeps the keyed
    generator (reproducible)."""
    site = tmp_path / "site-0"
    copy_site(synth_sites[0], site)
    cfg = RunConfig(
        num_rounds=1,
        local_epochs=1,
        batch_size=64,
        target_epsilon=4.0,
        accountant="rdp",
        data_dir=str(tmp_path),
    )
    passed: list[SecureRandom | None] = []
    drawn: list[int] = []
    real_train, real_noise = client_handlers.train_round, SecureRandom.gaussian_noise

    def spy_train(*args, **kwargs):  # the real training; what it was given is kept
        passed.append(kwargs.get("secure_rng"))
        return real_train(*args, **kwargs)

    def spy_noise(self, reference, *, std):
        drawn.append(reference.numel())
        return real_noise(self, reference, std=std)

    monkeypatch.setattr(client_handlers, "train_round", spy_train)
    monkeypatch.setattr(SecureRandom, "gaussian_noise", spy_noise)
    msg, context = _train_request(cfg, site, **{"run-id": "rng", "run-uid": "u-rng"})
    if not deployed:
        context.node_config = {"partition-id": 0, "num-partitions": 1}
    reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error.reason
    if deployed:
        assert isinstance(passed[0], SecureRandom)
        trainable = sum(p.numel() for p in build_model(cfg).parameters() if p.requires_grad)
        # Every step noised every parameter from the secure source (empty batches skip a step).
        assert drawn and sum(drawn) % trainable == 0
    else:
        assert passed == [None] and drawn == []


def test_geometric_draws_have_the_geometric_distribution() -> None:
    rng = SecureRandom(KEY)
    for p in (0.02, 0.4, 1.0):
        x = rng.geometric(p, 20_000)
        assert x.min() >= 1
        if p == 1.0:
            assert (x == 1).all()
            continue
        ks = np.arange(1, int(x.max()) + 1)
        expected = stats.geom.cdf(ks, p)
        observed = np.searchsorted(np.sort(x), ks, side="right") / x.size
        assert np.abs(observed - expected).max() < 0.015  # KS distance, n = 20k


def test_secure_modality_dropout_is_not_the_keyed_draw_and_hides_at_rate_p() -> None:
    mask = torch.ones(20_000, 3)
    p = 0.3
    keyed = modality_dropout(mask, p, generator=torch.Generator().manual_seed(2))
    again = modality_dropout(mask, p, generator=torch.Generator().manual_seed(2))
    secure = modality_dropout(mask, p, generator=SecureRandom())
    assert torch.equal(keyed, again) and not torch.equal(secure, keyed)
    # Each entry hidden with probability p, except that a record losing all three keeps them.
    hidden = 1 - float(secure.mean())
    assert hidden == pytest.approx(p - p**3, abs=0.01)  # sd of the estimate: 0.0015
    assert bool((secure.sum(dim=1) > 0).all())


def test_a_deployed_site_drops_modalities_from_the_secure_generator(
    synth_sites: list[Path],
) -> None:
    """train_round with a SecureRandom (what a deployed site passes): two trainings with the same
    seed differ through modality dropout alone (no DP-SGD here); with the keyed generator
    (simulation) they are identical."""
    cfg = RunConfig(num_rounds=1, local_epochs=1, batch_size=64, modality_dropout=0.5)
    _, ds = load_site(synth_sites[0], cfg)
    records = torch.utils.data.Subset(ds["train"], range(64))  # one batch: fast

    def trained(secure_rng: SecureRandom | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(cfg)
        train_round(
            model,
            records,
            cfg=cfg,
            plan=None,
            history=[],
            seed=7,
            device=torch.device("cpu"),
            secure_rng=secure_rng,
        )
        return [p.detach().clone() for p in model.parameters()]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert same(trained(None), trained(None))
    assert not same(trained(SecureRandom()), trained(SecureRandom()))
