"""Build the model a run config names: one encoder per configured modality, and a fusion head."""

from __future__ import annotations

from torch import nn

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.models.encoders import (
    AUDIO_ENCODERS,
    IMAGE_ENCODERS,
    TABULAR_ENCODERS,
    TEXT_ENCODERS,
)
from fedfuse.common.models.fusion import FUSION_HEADS, FusionModel
from fedfuse.common.models.pretrained import (
    FEATURE_CACHE,
    TIMM_PREFIX,
    freeze_encoder,
    timm_encoder,
    verified_weights,
)


def build_encoder(modality: str, cfg: RunConfig) -> nn.Module:
    """The encoder of one modality, chosen by name in ``cfg`` (unknown names list known ones)."""
    d = cfg.embed_dim
    if modality == "image":
        return _image_encoder(cfg)
    if modality == "report":
        if cfg.text_encoder == "bert":
            return _pretrained_text_encoder(cfg)
        return TEXT_ENCODERS.get(cfg.text_encoder)(dim=d, num_buckets=cfg.text_buckets)
    if modality == "audio":
        return AUDIO_ENCODERS.get(cfg.audio_encoder)(dim=d, bins=cfg.audio_bins)
    if modality == "tabular":
        return TABULAR_ENCODERS.get(cfg.tabular_encoder)(
            dim=d, in_features=2 * len(cfg.tabular_names)
        )
    raise ConfigError(f"no encoder for modality {modality!r}")


def build_model(cfg: RunConfig) -> FusionModel:
    """The fusion model for ``cfg``: encoders in ``cfg.modalities`` order + the named head."""
    encoders = {m: build_encoder(m, cfg) for m in cfg.modality_names}
    head = FUSION_HEADS.get(cfg.fusion)(
        dim=cfg.embed_dim, num_modalities=len(encoders), num_classes=len(cfg.class_names)
    )
    # One head of the same kind per extra task, on the shared encoders.
    task_heads = {
        t: FUSION_HEADS.get(cfg.fusion)(
            dim=cfg.embed_dim, num_modalities=len(encoders), num_classes=len(classes)
        )
        for t, classes in cfg.task_classes.items()
    }
    return FusionModel(encoders, head, task_heads)


def _image_encoder(cfg: RunConfig) -> nn.Module:
    """The image encoder, from weights checked against ``image-weights-sha256`` (at every site,
    whenever it builds the model: before training), with ``image-freeze`` applied."""
    weights = (
        verified_weights(cfg.image_weights, sha256=cfg.image_weights_sha256, key="image-weights")
        if cfg.image_weights
        else None
    )
    name = cfg.image_encoder
    if name.startswith(TIMM_PREFIX):
        enc = timm_encoder(
            name[len(TIMM_PREFIX) :], dim=cfg.embed_dim, weights=weights, norm=cfg.image_norm
        )
    else:
        enc = IMAGE_ENCODERS.get(name)(
            dim=cfg.embed_dim, weights=str(weights) if weights else "", norm=cfg.image_norm
        )
    enc = freeze_encoder(enc, cfg.image_freeze)
    if cfg.image_freeze == "all" and cfg.augment == "none" and hasattr(enc, "feature_cache"):
        # A fixed encoder on fixed inputs: compute each record's features once per site.
        enc.feature_cache = FEATURE_CACHE
    return enc


def _pretrained_text_encoder(cfg: RunConfig) -> nn.Module:
    """The ``text-weights`` checkpoint, checked against ``text-weights-sha256``, with LoRA
    adapters of ``text-lora-rank`` and ``text-freeze`` applied."""
    folder = verified_weights(
        cfg.text_weights, sha256=cfg.text_weights_sha256, key="text-weights", folder=True
    )
    enc = TEXT_ENCODERS.get("bert")(dim=cfg.embed_dim, weights=folder, lora_rank=cfg.text_lora_rank)
    return freeze_encoder(enc, cfg.text_freeze)
