"""Pretrained image encoders from local files: SHA-256 check, freezing, DP-safe norms, DP step.

Randomly initialised models of each family are saved to a temporary file and loaded through
the path real weights take (``build_model`` from a run config naming the file and its hash).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import TensorDataset
from torchvision import models
from torchvision.ops.misc import FrozenBatchNorm2d

from fedfuse.client.training import PrivacyPlan, train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError, FedfuseError
from fedfuse.common.models import build_model
from fedfuse.common.models.pretrained import (
    WeightsMismatch,
    fixed_state_keys,
    load_wire_state,
    weights_sha256,
    wire_state,
)


def _save(tmp_path, net: nn.Module, name: str) -> tuple[str, str]:
    path = tmp_path / f"{name}.pt"
    torch.save(net.state_dict(), path)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def _cfg(**kw) -> RunConfig:
    base = dict(modalities="image", image_size=32, embed_dim=4, classes="a,b", batch_size=4)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    torch.manual_seed(0)
    ref = models.resnet18(weights=None)
    with torch.no_grad():  # distinctive statistics, to see them carried over
        ref.bn1.running_mean.uniform_(-1, 1)
        ref.bn1.running_var.uniform_(0.5, 2)
        ref.bn1.weight.uniform_(0.5, 1.5)
    path, digest = _save(tmp_path_factory.mktemp("w"), ref, "r18")
    return ref, path, digest


def test_weights_are_checked_by_sha256_before_use(r18, tmp_path):
    ref, path, digest = r18
    assert weights_sha256(path) == digest
    model = build_model(
        _cfg(image_encoder="resnet18", image_weights=path, image_weights_sha256=digest)
    )
    net = model.encoders["image"].net
    assert torch.equal(net.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert torch.allclose(net.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(net.bn1.weight, ref.bn1.weight)  # GroupNorm took the BatchNorm's scale

    with pytest.raises(WeightsMismatch) as bad:
        build_model(
            _cfg(image_encoder="resnet18", image_weights=path, image_weights_sha256="0" * 64)
        )
    msg = str(bad.value)
    assert isinstance(bad.value, FedfuseError) and "\n" not in msg
    assert "refuses" in msg and digest[:16] in msg and str(tmp_path) not in msg
    with pytest.raises(ConfigError, match=f"image-weights-sha256' is empty.*{digest}"):
        build_model(_cfg(image_encoder="resnet18", image_weights=path))
    with pytest.raises(ConfigError, match="never downloads"):
        build_model(
            _cfg(image_encoder="resnet18", image_weights=str(tmp_path / "x.pt"),
                 image_weights_sha256=digest)
        )  # fmt: skip
    with pytest.raises(ConfigError, match="64 lower-case hex"):
        _cfg(image_weights=path, image_weights_sha256="abc")


def test_frozen_norm_keeps_the_pretrained_function(r18):
    ref, path, digest = r18
    model = build_model(
        _cfg(image_encoder="resnet18", image_weights=path, image_weights_sha256=digest,
             image_norm="frozen")
    )  # fmt: skip
    enc = model.encoders["image"]
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(enc.net.bn1, FrozenBatchNorm2d)
    ref.eval()
    ref.fc = nn.Identity()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # gray input == RGB input with equal channels, through the summed stem
        assert torch.allclose(enc.net(x), ref(x.expand(-1, 3, -1, -1)), atol=1e-4)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_freeze_modes_count_trainable_parameters(arch):
    counts = {}
    for mode in ("none", "last-block", "head", "all"):
        enc = build_model(_cfg(image_encoder=arch, image_freeze=mode, image_norm="frozen"))
        enc = enc.encoders["image"]
        counts[mode] = _trainable(enc)
        if mode == "last-block":
            assert counts[mode] == _trainable(enc.last_block) + _trainable(enc.proj)
    proj = counts["head"]
    features = {"resnet18": 512, "resnet50": 2048, "densenet121": 1024}[arch]
    assert proj == 4 * features + 4  # the projection to embed-dim 4
    assert counts["all"] == 0 < proj < counts["last-block"] < counts["none"]


def test_one_dp_step_moves_only_what_is_not_frozen(r18):
    _, path, digest = r18
    cfg = _cfg(
        image_encoder="resnet18",
        image_weights=path,
        image_weights_sha256=digest,
        image_freeze="last-block",
        local_epochs=1,
        modality_dropout=0.0,
    )
    model = build_model(cfg)
    assert ModuleValidator.validate(model, strict=False) == []
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.ones(8, 1), torch.rand(8, 1, 32, 32, generator=gen), torch.arange(8) % 2
    )
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, num_rounds=1)
    result = train_round(
        model, data, cfg=cfg, plan=plan, history=[], seed=0, device=torch.device("cpu")
    )
    assert result.event is not None and result.epsilon > 0
    enc = model.encoders["image"]
    frozen = {id(p) for p in enc.net.parameters()} - {id(p) for p in enc.last_block.parameters()}
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (id(p) not in frozen), name


def test_timm_architecture_from_a_local_file(tmp_path):
    timm = pytest.importorskip("timm", reason="the 'transfer' extra is not installed")
    ref = timm.create_model("test_resnet", pretrained=False)
    path, digest = _save(tmp_path, ref, "timm")
    cfg = _cfg(
        image_encoder="timm:test_resnet",
        image_weights=path,
        image_weights_sha256=digest,
        image_freeze="head",
        local_epochs=1,
    )
    model = build_model(cfg)
    enc = model.encoders["image"]
    assert ModuleValidator.validate(model, strict=False) == []
    assert _trainable(enc) == _trainable(enc.proj)
    stem = dict(enc.net.named_parameters())
    for name, p in ref.named_parameters():
        if not name.startswith("fc.") and "bn" not in name and name in stem:
            assert torch.equal(stem[name], p), name
    data = TensorDataset(torch.ones(8, 1), torch.rand(8, 1, 32, 32), torch.arange(8) % 2)
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, num_rounds=1)
    train_round(model, data, cfg=cfg, plan=plan, history=[], seed=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="image-encoder 'timm:nope'"):
        build_model(_cfg(image_encoder="timm:nope"))


def test_torchxrayvision_densenet_from_a_local_file(tmp_path):
    xrv = pytest.importorskip("torchxrayvision", reason="the 'transfer' extra is not installed")
    torch.manual_seed(0)
    ref = xrv.models.DenseNet(weights=None)  # randomly initialised, saved as real weights are
    with torch.no_grad():
        ref.features.norm0.running_mean.uniform_(-1, 1)
    path, digest = _save(tmp_path, ref, "xrv")
    cfg = _cfg(
        image_encoder="xrv-densenet121",
        image_weights=path,
        image_weights_sha256=digest,
        image_norm="frozen",
        image_freeze="head",
        local_epochs=1,
        modality_dropout=0.0,
    )
    model = build_model(cfg)
    enc = model.encoders["image"]
    assert ModuleValidator.validate(model, strict=False) == []
    assert _trainable(enc) == _trainable(enc.proj) == 4 * 1024 + 4
    # The pretrained function exactly: our [-1, 1] pixels are xrv's [-1024, 1024] ones.
    ref.eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(enc.net(x), ref.features2(x * 1024), atol=1e-3, rtol=1e-4)
    data = TensorDataset(torch.ones(8, 1), torch.rand(8, 1, 32, 32), torch.arange(8) % 2)
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, num_rounds=1)
    before = {k: v.detach().clone() for k, v in enc.net.state_dict().items()}
    result = train_round(
        model, data, cfg=cfg, plan=plan, history=[], seed=0, device=torch.device("cpu")
    )
    assert result.epsilon > 0
    assert all(torch.equal(v, before[k]) for k, v in enc.net.state_dict().items())
    with pytest.raises(WeightsMismatch):
        build_model(cfg.replace(image_weights_sha256="0" * 64))


def test_rounds_send_all_but_the_fixed_pretrained_backbone(r18):
    _, path, digest = r18
    cfg = _cfg(image_encoder="resnet18", image_weights=path, image_weights_sha256=digest,
               image_freeze="head", image_norm="frozen")  # fmt: skip
    model = build_model(cfg)
    wire = wire_state(model, cfg)
    # Exactly what trains: the projection and the rest of the model; no backbone entry.
    assert set(wire) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(wire) | fixed_state_keys(model, cfg) == set(model.state_dict())
    # A site loads the global model into the model it built from the same checked file.
    other = build_model(cfg)
    load_wire_state(other, cfg, {k: v + 1 for k, v in wire.items()})
    for k, v in other.state_dict().items():
        assert torch.equal(v, wire[k] + 1 if k in wire else model.state_dict()[k]), k
    with pytest.raises(ConfigError, match="parameter names differ"):
        load_wire_state(other, cfg, model.state_dict())  # the fixed part is never accepted
    # freeze = all: the projection is frozen too, but its start is random: it still travels.
    cfg_all = cfg.replace(image_freeze="all")
    assert any(k.startswith("encoders.image.proj.") for k in wire_state(build_model(cfg_all),
                                                                       cfg_all))  # fmt: skip
    # Without a weights file nothing is fixed: frozen random weights differ between parties.
    plain = _cfg(image_encoder="resnet18", image_freeze="head", image_norm="frozen")
    assert fixed_state_keys(build_model(plain), plain) == frozenset()


def test_frozen_encoder_features_are_computed_once(r18):
    from fedfuse.common.models.pretrained import FEATURE_CACHE

    _, path, digest = r18
    cfg = _cfg(
        image_encoder="resnet18", image_weights=path, image_weights_sha256=digest,
        image_freeze="all", image_norm="frozen", local_epochs=1, modality_dropout=0.0,
    )  # fmt: skip
    FEATURE_CACHE.clear()
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    enc = build_model(cfg).encoders["image"]
    assert enc.feature_cache is FEATURE_CACHE
    first = enc(x)
    assert (FEATURE_CACHE.hits, FEATURE_CACHE.misses) == (0, 6)
    again = build_model(cfg).encoders["image"]  # next round: a new model ...
    again.load_state_dict(enc.state_dict())  # ... holding the global model's weights
    assert torch.equal(again(x), first) and FEATURE_CACHE.hits == 6
    assert torch.allclose(again._forward(x), first, atol=1e-6)  # what the encoder computes
    state = again.state_dict()
    state["proj.bias"] = state["proj.bias"] + 1.0  # other weights: other features, not stale
    again.load_state_dict(state)
    assert not torch.allclose(again(x), first) and FEATURE_CACHE.misses == 12
    # A DP round with the encoder fixed trains only the fusion head, from cached features.
    model = build_model(cfg)
    data = TensorDataset(torch.ones(8, 1), torch.rand(8, 1, 32, 32), torch.arange(8) % 2)
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, num_rounds=1)
    head = [p.detach().clone() for p in model.head.parameters()]
    train_round(model, data, cfg=cfg, plan=plan, history=[], seed=0, device=torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(head, model.head.parameters(), strict=True))
    assert not build_model(cfg.replace(augment="light")).encoders["image"].feature_cache


def test_no_part_is_registered_twice_and_norms_are_exact():
    """``last_block`` is a reference, not a second registration: registered twice it would be
    sent twice in the update and get Opacus' per-sample hooks twice (norms counted twice)."""
    from opacus import GradSampleModule

    from fedfuse.common.privacy.bookkeeping import BookKeepingClipper

    for arch in ("resnet18", "densenet121"):
        model = build_model(_cfg(image_encoder=arch, image_freeze="last-block"))
        assert not any("last_block" in k for k in model.state_dict())
        all_params = list(model.named_parameters(remove_duplicate=False))
        assert len(all_params) == len({id(p) for _, p in all_params})
    torch.manual_seed(0)
    model = build_model(_cfg(image_encoder="resnet18", image_freeze="last-block")).double()
    x = [torch.ones(3, 1).double(), torch.randn(3, 1, 32, 32).double()]
    y = torch.arange(3) % 2

    def loss(out, t):  # noqa: ANN001, ANN202
        return nn.functional.cross_entropy(out, t, reduction="none")

    params = [p for p in model.parameters() if p.requires_grad]
    truth = []
    for i in range(3):  # one backward per record: the ground truth
        g = torch.autograd.grad(loss(model(*[t[i : i + 1] for t in x]), y[i : i + 1]).sum(), params)
        truth.append(torch.cat([gi.flatten() for gi in g]).norm())
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    clipper.backward(loss(model(*x), y))
    torch.testing.assert_close(clipper.per_sample_gradient_norms, torch.stack(truth))
    clipper.remove()
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss(gsm(*x), y).sum().backward()
    hooks = torch.cat([p.grad_sample.flatten(1) for p in params], 1).norm(dim=1)
    torch.testing.assert_close(hooks, torch.stack(truth))
    gsm.remove_hooks()
