"""One contract every encoder and fusion head must meet.

For each: the model passes ``ModuleValidator.validate``; with every subset of modalities
present it returns finite logits of shape (batch, classes) that do not depend on the inputs
of absent modalities; one Opacus DP-SGD step (ghost clipping, Poisson sampling) updates it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fedfuse.common.config import RunConfig
from fedfuse.common.models import (
    AUDIO_ENCODERS,
    FUSION_HEADS,
    IMAGE_ENCODERS,
    TABULAR_ENCODERS,
    TEXT_ENCODERS,
    build_model,
)
from fedfuse.common.models.dp_layers import GhostEmbedding, ghost_coverage
from fedfuse.common.models.objectives import make_objective
from tests.support.models import SUBSETS, random_inputs, small_cfg, subset_mask


def check_contract(cfg: RunConfig) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(cfg)
    assert ModuleValidator.validate(model, strict=False) == []
    model.eval()
    n = len(SUBSETS)
    mask = subset_mask(n)
    inputs = random_inputs(cfg, n, gen)
    with torch.no_grad():
        out = model(mask, *inputs)
        assert out.shape == (n, len(cfg.class_names)) and torch.isfinite(out).all()
        # Inputs of absent modalities must not matter.
        other = random_inputs(cfg, n, gen)
        mixed = [
            torch.where(mask[:, i].bool().view(-1, *[1] * (x.dim() - 1)), x, o)
            for i, (x, o) in enumerate(zip(inputs, other, strict=True))
        ]
        assert torch.allclose(model(mask, *mixed), out, atol=1e-5)
        w = getattr(model.head, "last_weights", None)
        if w is not None:  # renormalised over present modalities
            assert torch.allclose(w.sum(1), torch.ones(n), atol=1e-5)
            assert torch.all(w[mask == 0] == 0)

    # One DP-SGD step through Opacus, ghost clipping, as a site trains.
    model.train()
    labels = torch.arange(n) % len(cfg.class_names)
    loader = DataLoader(TensorDataset(mask, *inputs, labels), batch_size=n)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = PrivacyEngine(accountant="prv")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pmodel, popt, crit, ploader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=make_objective(cfg, model),  # as a site trains
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        grad_sample_mode="ghost",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(b for b in ploader if len(b[-1]) > 0)
        popt.zero_grad()
        loss = crit(pmodel(*batch[:-1]), batch[-1])
        loss.backward()
        popt.step()
    assert engine.accountant.history, "Opacus accounted no step"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
    pmodel.remove_hooks()


@pytest.mark.parametrize("head", FUSION_HEADS.names())
def test_every_fusion_head_meets_the_contract(head):
    check_contract(small_cfg(fusion=head))


ENCODERS = (
    [("image-encoder", n) for n in IMAGE_ENCODERS.names()]
    + [("text-encoder", n) for n in TEXT_ENCODERS.names()]
    + [("audio-encoder", n) for n in AUDIO_ENCODERS.names()]
    + [("tabular-encoder", n) for n in TABULAR_ENCODERS.names()]
)


# Large pretrained backbones run the contract with their backbone frozen (how they are often
# fine-tuned under DP), which keeps the DP step to seconds; resnet18 runs it unfrozen, and
# tests/common/models/test_pretrained.py steps a last-block fine-tuning.
FROZEN_FOR_SPEED = {"resnet50", "densenet121"}


@pytest.mark.parametrize(("key", "name"), ENCODERS)
def test_every_encoder_meets_the_contract(key, name):
    if name == "bert":
        pytest.skip(
            "needs a checkpoint folder (text-weights); tests/common/models/"
            "test_pretrained_text.py runs the validator and a DP step on a tiny saved BERT"
        )
    extra = {"image_freeze": "head"} if name in FROZEN_FOR_SPEED else {}
    check_contract(small_cfg(**{key.replace("-", "_"): name}, fusion="concat", **extra))


def test_registries_hold_what_the_issue_names():
    assert set(IMAGE_ENCODERS.names()) >= {"cnn", "resnet18"}
    assert set(TEXT_ENCODERS.names()) >= {"hash-mean", "hash-attention"}
    assert "logmel-cnn" in AUDIO_ENCODERS.names() and "mlp" in TABULAR_ENCODERS.names()
    assert set(FUSION_HEADS.names()) >= {"concat", "gated", "attention", "late"}


def test_unknown_names_list_the_known_ones():
    from fedfuse.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Unknown fusion head 'sum'. Known: attention, concat"):
        build_model(small_cfg(fusion="sum"))
    with pytest.raises(ConfigError, match=r"Unknown audio encoder 'x'. Known: logmel-cnn"):
        build_model(small_cfg(audio_encoder="x"))


def test_models_follow_the_configured_modalities():
    for mods in ("image", "report,audio", "tabular,image", "image,report,audio,tabular"):
        model = build_model(small_cfg(modalities=mods))
        assert model.modalities == tuple(mods.split(","))
    with pytest.raises(ValueError, match="expected 2 inputs"):
        build_model(small_cfg(modalities="image,report"))(
            torch.ones(1, 2), torch.zeros(1, 1, 16, 16)
        )


def test_resnet18_has_groupnorm_and_loads_local_weights(tmp_path):
    import hashlib

    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    with torch.no_grad():
        ref.bn1.weight.fill_(0.5)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    digest = hashlib.sha256((tmp_path / "r18.pt").read_bytes()).hexdigest()
    cfg = small_cfg(image_encoder="resnet18", image_weights=str(tmp_path / "r18.pt"))
    enc = build_model(cfg.replace(image_weights_sha256=digest)).encoders["image"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    assert torch.all(enc.net.bn1.weight == 0.5)  # GroupNorm took the BatchNorm's scale
    assert torch.allclose(enc.net.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(enc.net.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    from fedfuse.common.errors import ConfigError

    with pytest.raises(ConfigError, match="never downloads weights"):
        build_model(cfg.replace(image_weights=str(tmp_path / "missing.pt")))


def test_ghost_embedding_norms_match_per_sample_gradients():
    """The fast norm sampler against per-sample gradients computed one sample at a time."""
    from fedfuse.common.models.dp_layers import ghost_embedding_norm_sample

    torch.manual_seed(0)
    emb = GhostEmbedding(20, 4)
    ids = torch.tensor([[1, 1, 3, 0], [2, 5, 5, 5], [7, 0, 0, 0]])
    backprops = torch.randn(3, 4, 4)
    norms = ghost_embedding_norm_sample(emb, [ids], backprops)[emb.weight]
    for n in range(3):
        g = torch.zeros(20, 4).index_add_(0, ids[n], backprops[n])
        assert norms[n] == pytest.approx(float(g.norm()), rel=1e-5)


def test_ghost_coverage_names_the_layers_that_fall_back_to_hooks():
    cov = ghost_coverage(build_model(RunConfig(image_encoder="cnn")))
    assert "GhostEmbedding x1" in cov["ghost"] and any("Linear" in c for c in cov["ghost"])
    assert any("Conv2d" in c for c in cov["per-sample-hooks"])


def test_gate_and_attention_cannot_silence_a_modality():
    """However far (DP-noisy) training pushes their weights, the gated head's modality
    weights and the attention head's scores stay bounded, so every present modality keeps a
    share of the output and of the gradient (an unbounded gate collapsed onto one modality
    under DP-SGD; docs/BENCHMARKS.md)."""
    from fedfuse.common.models.fusion import (
        ATTENTION_SCORE_CAP,
        GATE_BOUND,
        AttentionHead,
        GatedHead,
    )

    def max_ratio(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Largest ratio between two present modalities' weights, over the batch."""
        low = w.masked_fill(mask == 0, float("inf")).min(dim=1).values
        return (w.max(dim=1).values / low).max()

    gen = torch.Generator().manual_seed(0)
    n, m, d = 32, 4, 8
    feats = [torch.randn(n, d, generator=gen) * 10 for _ in range(m)]
    mask = torch.ones(n, m)
    mask[: n // 2, 1] = 0

    gated = GatedHead(dim=d, num_modalities=m, num_classes=2)
    with torch.no_grad():
        for p in gated.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 100)
        gated(feats, mask)
    ratio = max_ratio(gated.last_weights, mask)
    assert ratio <= torch.exp(torch.tensor(2 * GATE_BOUND)) * (1 + 1e-5)
    assert ratio > 1.5  # the gate still weighs modalities differently

    attention = AttentionHead(dim=d, num_modalities=m, num_classes=2)
    with torch.no_grad():
        attention.qkv.weight.copy_(torch.randn(attention.qkv.weight.shape, generator=gen) * 100)
        attention(feats, mask)
    ratio = max_ratio(attention.last_weights, mask)
    assert ratio <= torch.exp(torch.tensor(2 * ATTENTION_SCORE_CAP)) * (1 + 1e-5)
    assert ratio > 1.5
