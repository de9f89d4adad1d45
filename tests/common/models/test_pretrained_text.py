"""A BERT-family text encoder from a local checkpoint folder: hash check, its own tokenizer,
freezing, LoRA (checked against the low-rank update computed by hand) and a DP step.

The checkpoint is a tiny randomly initialised BERT written with ``save_pretrained``, loaded
through the path a real checkpoint takes (``build_model`` / ``build_inputs`` from a run config).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from opacus.validators import ModuleValidator
from torch.utils.data import TensorDataset

from fedfuse.client.training import PrivacyPlan, train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.modalities import build_inputs
from fedfuse.common.errors import ConfigError
from fedfuse.common.models import build_model
from fedfuse.common.models.pretrained import WeightsMismatch, optional_import

transformers = pytest.importorskip("transformers", reason="the 'transfer' extra is not installed")

HIDDEN, LAYERS, WORDS = 16, 2, ["no", "fever", "cough", "normal", "chest", "clear", "mild"]


def folder_sha256(folder) -> str:
    """The documented folder hash, computed independently: sha256sum of every file, sorted."""
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {rel}\n" for rel, p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizer(str(vocab))  # positional: the vocab file in v4 and v5
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), folder_sha256(folder)


def _cfg(ckpt, **kw) -> RunConfig:
    path, digest = ckpt
    base = dict(
        modalities="report",
        text_encoder="bert",
        text_weights=path,
        text_weights_sha256=digest,
        max_tokens=8,
        embed_dim=4,
        classes="a,b",
        batch_size=4,
        local_epochs=1,
    )
    base.update(kw)
    return RunConfig(**base)


def _trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_checkpoint_tokenizer_and_hash_check(ckpt, tmp_path):
    (report,) = build_inputs(_cfg(ckpt), manifest=None)  # type: ignore[arg-type]
    ids = report.tokenizer("no fever")
    # [CLS] no fever [SEP], padded to max-tokens with [PAD] = 0
    assert ids.tolist() == [2, 5, 6, 3, 0, 0, 0, 0]
    with pytest.raises(WeightsMismatch, match="refuses"):
        build_model(_cfg(ckpt, text_weights_sha256="f" * 64))
    with pytest.raises(WeightsMismatch):
        build_inputs(_cfg(ckpt, text_weights_sha256="f" * 64), manifest=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs 'text-weights'"):
        RunConfig(modalities="report", text_encoder="bert")
    with pytest.raises(ConfigError, match=r"pip install 'fedfuse\[transfer\]'"):
        optional_import("fedfuse_no_such_module", purpose="a test")


def test_freeze_modes_and_lora_count_trainable_parameters(ckpt):
    counts = {}
    for mode in ("none", "last-block", "head", "all"):
        enc = build_model(_cfg(ckpt, text_freeze=mode)).encoders["report"]
        counts[mode] = _trainable(enc)
        if mode == "last-block":
            assert counts[mode] == _trainable(enc.last_block) + _trainable(enc.proj)
    head = HIDDEN * 4 + 4
    assert counts["head"] == head
    assert counts["all"] == 0 < head < counts["last-block"] < counts["none"]
    r = 2
    enc = build_model(_cfg(ckpt, text_lora_rank=r, text_freeze="head")).encoders["report"]
    # query and value of each layer: A (r x hidden) and B (hidden x r)
    assert _trainable(enc) == LAYERS * 2 * (r * HIDDEN + HIDDEN * r) + head


def test_lora_layer_matches_the_low_rank_update_by_hand(ckpt):
    enc = build_model(_cfg(ckpt, text_lora_rank=2)).encoders["report"]
    layer = enc.last_block.attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B starts at zero: make the update visible
    x = torch.randn(3, HIDDEN)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 2 / 2  # lora_alpha / r
    expected = x @ (w + scale * bb @ a).T + b
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_one_dp_step_with_lora(ckpt):
    cfg = _cfg(ckpt, text_lora_rank=2, modality_dropout=0.0)
    model = build_model(cfg)
    assert ModuleValidator.validate(model, strict=False) == []
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    (report,) = build_inputs(cfg, manifest=None)  # type: ignore[arg-type]
    texts = ["no fever", "fever cough", "chest clear", "mild cough"] * 2
    ids = torch.stack([report.tokenizer(t) for t in texts])
    data = TensorDataset(torch.ones(8, 1), ids, torch.arange(8) % 2)
    plan = PrivacyPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, num_rounds=1)
    train_round(model, data, cfg=cfg, plan=plan, history=[], seed=0, device=torch.device("cpu"))
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == p.requires_grad, name
        assert p.requires_grad == ("lora_" in name or "proj" in name or "head" in name), name
