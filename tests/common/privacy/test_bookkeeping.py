"""Book-keeping clipping (one backward) gives exactly the per-record norms and clipped gradient
that Opacus' per-sample gradients (hooks mode) give, and the same DP-SGD step as ghost mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedfuse.common.privacy.bookkeeping as bk
from fedfuse.common.config import RunConfig
from fedfuse.common.models import build_model
from fedfuse.common.models.dp_layers import DPConv2d, GhostEmbedding
from fedfuse.common.models.objectives import make_objective
from fedfuse.common.privacy.bookkeeping import (
    BookKeepingClipper,
    bookkeeping_coverage,
    make_private_bookkeeping,
)
from tests.support.models import random_inputs, small_cfg, subset_mask


def per_record_by_autograd(model, inputs, y, loss_fn):  # noqa: ANN001, ANN201
    """Ground truth independent of Opacus: one autograd backward per record."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(y.shape[0]):
        loss = loss_fn(model(*[x[i : i + 1] for x in inputs]), y[i : i + 1]).sum()
        rows.append(torch.autograd.grad(loss, params))
    return {p: torch.stack([r[j] for r in rows]) for j, p in enumerate(params)}


def reference(model, inputs, y, loss_fn, clip, by_autograd=False):  # noqa: ANN001, ANN201
    """Per-record norms and clipped gradient sum from Opacus hooks-mode per-sample gradients
    (or, with ``by_autograd``, from one backward per record)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = y.shape[0]
    if by_autograd:
        gs = {
            p: g.reshape(n, -1)
            for p, g in per_record_by_autograd(model, inputs, y, loss_fn).items()
        }
        gsm = None
    else:
        gsm = GradSampleModule(model, loss_reduction="sum")
        loss_fn(gsm(*inputs), y).sum().backward()
        gs = {p: p.grad_sample.reshape(n, -1) for p in params}
    norms = torch.cat(list(gs.values()), dim=1).norm(dim=1)
    c = clip if clip is not None else float(norms.median())  # some records clipped, some not
    coef = (c / (norms + 1e-6)).clamp(max=1.0)
    clipped = {p: torch.einsum("n,nk->k", coef, gs[p]).reshape(p.shape) for p in params}
    if gsm is not None:
        gsm.remove_hooks()
    for p in params:
        p.grad = None
        p.grad_sample = None
    return norms, clipped, c


def assert_matches_hooks(model, inputs, y, loss_fn=None, clip=None, by_autograd=False):  # noqa: ANN001, ANN201
    if loss_fn is None:
        # What a site minimises: the task's loss and the model's own per-record terms.
        loss_fn = make_objective(RunConfig(), model)
        loss_fn.reduction = "none"
    model.train()
    norms, clipped, c = reference(model, inputs, y, loss_fn, clip, by_autograd)
    clipper = BookKeepingClipper(model, max_grad_norm=c)
    clipper.backward(loss_fn(model(*inputs), y))
    torch.testing.assert_close(clipper.per_sample_gradient_norms, norms, rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, clipped[p], rtol=1e-5, atol=1e-7, msg=name)
    kinds = clipper.kinds()
    clipper.remove()
    return kinds


def _model_inputs(cfg: RunConfig, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if len(cfg.modality_names) == 4:
        mask, inputs = subset_mask(n), random_inputs(cfg, n, gen)
    else:
        mask = torch.ones(n, 2)
        mask[::3, 1] = 0
        inputs = [
            torch.randn(n, 1, cfg.image_size, cfg.image_size, generator=gen),
            torch.randint(0, cfg.text_buckets, (n, cfg.max_tokens), generator=gen),
        ]
    return [x.double() if x.is_floating_point() else x for x in [mask, *inputs]]


@pytest.mark.parametrize(
    "cfg",
    [
        RunConfig(),
        RunConfig(image_encoder="cnn"),
        small_cfg(fusion="concat"),
        small_cfg(fusion="gated"),
        small_cfg(fusion="attention"),
        small_cfg(fusion="late", text_encoder="hash-attention"),
        small_cfg(modalities="image", image_encoder="resnet18"),
    ],
    ids=[
        "default",
        "default-cnn",
        "concat",
        "gated",
        "attention",
        "late-hash-attention",
        "resnet18",
    ],
)
def test_models_match_hooks_mode(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks, so the chunked per-record convolution gradients cross chunk boundaries.
    monkeypatch.setattr(bk, "CHUNK_ELEMENTS", 4000)
    torch.manual_seed(0)
    n = 4 if cfg.image_encoder == "resnet18" else 15
    model = build_model(cfg).double()
    if cfg.modality_names == ("image",):
        gen = torch.Generator().manual_seed(1)
        inputs = [torch.ones(n, 1).double(), torch.randn(n, 1, 16, 16, generator=gen).double()]
    else:
        inputs = _model_inputs(cfg, n)
    y = torch.arange(n) % len(cfg.class_names)
    kinds = assert_matches_hooks(model, inputs, y)
    if cfg == RunConfig():  # the `pool` image encoder: a Linear over cell means
        assert sorted(set(kinds.values())) == ["embedding", "linear"]
        assert bookkeeping_coverage(build_model(cfg)) == {
            "embedding": ["GhostEmbedding x1"],
            "linear": ["Linear x3"],  # the projection, its centre, the head
        }
    if cfg == RunConfig(image_encoder="cnn"):
        assert sorted(set(kinds.values())) == ["conv", "embedding", "group-norm", "linear"]
        assert bookkeeping_coverage(build_model(cfg)) == {
            "conv": ["DPConv2d x3"],
            "embedding": ["GhostEmbedding x1"],
            "group-norm": ["GroupNorm x3"],
            "linear": ["Linear x2"],
        }


class _Seq(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).mean(dim=1)


@pytest.mark.parametrize("tokens", [3, 40], ids=["gram-form", "per-record-form"])
def test_linear_on_sequences(tokens: int) -> None:
    torch.manual_seed(0)
    model = _Seq(6, 5).double()
    x = torch.randn(9, tokens, 6, dtype=torch.float64)
    assert_matches_hooks(model, [x], torch.arange(9) % 5)


class _Emb(nn.Module):
    def __init__(self, cls: type[nn.Embedding]) -> None:
        super().__init__()
        self.emb = cls(20, 4, padding_idx=0)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids).sum(dim=1))


@pytest.mark.parametrize("cls", [nn.Embedding, GhostEmbedding])
def test_embedding_with_repeats_and_padding(cls: type[nn.Embedding]) -> None:
    # Against one autograd backward per record: Opacus' embedding grad sampler ignores
    # padding_idx (it gives the padding row a gradient that autograd does not).
    torch.manual_seed(0)
    model = _Emb(cls).double()
    ids = torch.randint(0, 6, (8, 7))  # few rows: every record repeats ids; 0 is padding
    assert_matches_hooks(model, [ids], torch.arange(8) % 3, by_autograd=True)


def test_embedding_without_padding_matches_hooks_mode() -> None:
    torch.manual_seed(0)
    model = _Emb(nn.Embedding).double()
    model.emb.padding_idx = None
    assert_matches_hooks(model, [torch.randint(0, 6, (8, 7))], torch.arange(8) % 3)


@pytest.mark.parametrize(
    "conv",
    [
        dict(cls=DPConv2d, c_in=1, stride=2, bias=True),
        dict(cls=DPConv2d, c_in=3, stride=1, bias=False),
        dict(cls=nn.Conv2d, c_in=2, stride=2, bias=True),
    ],
    ids=["dpconv-1ch-stride2", "dpconv-3ch-nobias", "conv2d-stride2"],
)
def test_conv_and_norm_layers(conv: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bk, "CHUNK_ELEMENTS", 100)  # a chunk of one or two records
    torch.manual_seed(0)
    model = nn.Sequential(
        conv["cls"](conv["c_in"], 4, 3, padding=1, stride=conv["stride"], bias=conv["bias"]),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(4 * (8 // conv["stride"]) ** 2),
        nn.Linear(4 * (8 // conv["stride"]) ** 2, 3),
    ).double()
    x = torch.randn(7, conv["c_in"], 8, 8, dtype=torch.float64)
    kinds = assert_matches_hooks(model, [x], torch.arange(7) % 3)
    assert kinds == {"0": "conv", "1": "group-norm", "4": "per-sample", "5": "linear"}


def test_large_per_record_gradients_are_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing kept: the conv weight's clipped sum comes from a weight-only conv backward, the
    # LayerNorm's from its sampler on re-weighted output gradients.
    monkeypatch.setattr(bk, "KEEP_GRAD_SAMPLE_ELEMENTS", 0)
    torch.manual_seed(0)
    model = nn.Sequential(
        DPConv2d(2, 3, 3, padding=1, stride=2),
        nn.Flatten(),
        nn.LayerNorm(48),
        nn.Linear(48, 2),
    ).double()
    x = torch.randn(10, 2, 8, 8, dtype=torch.float64)
    assert_matches_hooks(model, [x], torch.arange(10) % 2)


def test_frozen_conv_weight_with_trainable_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DPConv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(192, 2)).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    assert_matches_hooks(model, [x], torch.arange(6) % 2)
    assert model[0].weight.grad is None


def test_empty_batch_gives_zero_gradients() -> None:
    cfg = RunConfig()
    model = build_model(cfg).train()
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    out = model(
        torch.ones(0, 2),
        torch.randn(0, 1, cfg.image_size, cfg.image_size),
        torch.zeros(0, cfg.max_tokens, dtype=torch.long),
    )
    clipper.backward(
        nn.functional.cross_entropy(out, torch.zeros(0, dtype=torch.long), reduction="none")
    )
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_one_dp_step_equals_opacus_ghost_clipping() -> None:
    """Same model, batch, noise seed: the book-keeping step and Opacus' ghost step agree."""
    cfg = RunConfig()
    gen = torch.Generator().manual_seed(0)
    n = 24
    mask = torch.ones(n, 2)
    mask[::4, 1] = 0
    data = TensorDataset(
        mask,
        torch.randn(n, 1, cfg.image_size, cfg.image_size, generator=gen),
        torch.randint(1, cfg.text_buckets, (n, cfg.max_tokens), generator=gen),
        torch.arange(n) % 2,
    )
    states = {}
    for mode in ("bookkeeping", "ghost"):
        torch.manual_seed(0)
        model = build_model(cfg)
        kwargs = dict(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            criterion=make_objective(cfg, model),
            data_loader=DataLoader(data, batch_size=n),
            noise_multiplier=0.5,
            max_grad_norm=0.05,  # small: most records are clipped
            poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(3),
        )
        engine = PrivacyEngine(accountant="prv")
        if mode == "bookkeeping":
            pmodel, opt, crit, loader = make_private_bookkeeping(engine, **kwargs)
        else:
            pmodel, opt, crit, loader = engine.make_private(grad_sample_mode="ghost", **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            *inputs, y = next(iter(loader))
            opt.zero_grad()
            crit(pmodel(*inputs), y).backward()
            opt.step()
        assert engine.accountant.history, f"{mode}: Opacus accounted no step"
        pmodel.remove_hooks()
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        states[mode] = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in states["ghost"].items():
        torch.testing.assert_close(states["bookkeeping"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_parameter_tying_is_rejected() -> None:
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    BookKeepingClipper(model, max_grad_norm=1.0)
    with pytest.raises(NotImplementedError, match="called twice"):
        model(torch.randn(2, 3))


def test_in_place_change_of_a_layer_output_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    out = model(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="modified in place"):
        clipper.backward(
            nn.functional.cross_entropy(out, torch.zeros(4, dtype=torch.long), reduction="none")
        )


class _BareParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_layer_without_rule_or_sampler_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 3), _BareParameter())
    with pytest.raises(NotImplementedError, match=r"layer '1' \(_BareParameter\)"):
        BookKeepingClipper(model, max_grad_norm=1.0)
