"""On a CUDA GPU: book-keeping clipping equals Opacus' per-sample gradients, and a site trains
a DP round (issue 20, point 5). Skipped where no GPU is visible; run with ``pytest -m gpu``."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedfuse.client.training import PrivacyPlan, train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.synthetic import generate
from fedfuse.common.models import build_model
from fedfuse.common.privacy.bookkeeping import BookKeepingClipper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible on this machine)"
    ),
]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def bookkeeping_vs_opacus(cfg: RunConfig, device: torch.device, n: int = 6) -> None:
    """Per-record norms and the clipped gradient sum: book-keeping against Opacus hooks."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    inputs = [
        torch.ones(n, 1),
        torch.randn(n, 1, cfg.image_size, cfg.image_size, generator=gen),
    ]
    inputs = [x.to(device) for x in inputs]
    y = (torch.arange(n) % 2).to(device)
    gsm = GradSampleModule(ref, loss_reduction="sum")
    _loss(gsm(*inputs), y).sum().backward()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    gs = [p.grad_sample.reshape(n, -1) for p in ref_params]
    norms = torch.cat(gs, dim=1).norm(dim=1)
    clip = float(norms.median())
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipper = BookKeepingClipper(model, max_grad_norm=clip)
    clipper.backward(_loss(model(*inputs), y))
    torch.testing.assert_close(clipper.per_sample_gradient_norms, norms, rtol=1e-3, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for p, g, q in zip(params, gs, ref_params, strict=True):
        expected = torch.einsum("n,nk->k", coef, g).reshape(q.shape)
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-4)
    clipper.remove()
    gsm.remove_hooks()


def site_round(tmp_path, device: torch.device) -> None:
    site = generate(tmp_path, sites=1, records=64, seed=0, image_size=32)[0]
    cfg = RunConfig(batch_size=16, local_epochs=1, embed_dim=8)
    _, data = load_site(site, cfg)
    model = build_model(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    steps = -(-len(data["train"]) // 16)  # batches per epoch: Poisson rate 1 / steps
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=1 / steps, steps_per_round=steps,
                       num_rounds=1)  # fmt: skip
    res = train_round(model, data["train"], cfg=cfg, plan=plan, history=[], seed=0, device=device)
    assert res.event is not None and 0 < res.epsilon < float("inf")
    assert next(model.parameters()).device.type == device.type
    assert any(not torch.equal(a.to(device), b) for a, b in zip(before, model.parameters(),
                                                                 strict=True))  # fmt: skip


@pytest.mark.parametrize(
    "cfg",
    [
        RunConfig(modalities="image", image_size=32),
        RunConfig(
            modalities="image",
            image_size=32,
            image_encoder="resnet50",
            image_freeze="last-block",
            image_norm="frozen",
        ),  # fmt: skip
    ],
    ids=["cnn", "resnet50-last-block"],
)
def test_bookkeeping_matches_opacus_on_cuda(cfg):
    bookkeeping_vs_opacus(cfg, torch.device("cuda"))


def test_a_site_trains_a_dp_round_on_cuda(tmp_path):
    site_round(tmp_path, torch.device("cuda"))
