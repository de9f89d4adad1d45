"""Build the model a run config names."""

from __future__ import annotations

from torch import nn

from common.config import RunConfig
from common.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from common.models.fusion import FUSION_HEADS, FusionModel


def build_model(cfg: RunConfig) -> FusionModel:
    """The fusion model for ``cfg``: image + report encoders and the named fusion head."""
    encoders: dict[str, nn.Module] = {
        "image": IMAGE_ENCODERS.get(cfg.image_encoder)(dim=cfg.embed_dim),
        "report": TEXT_ENCODERS.get(cfg.text_encoder)(
            dim=cfg.embed_dim, num_buckets=cfg.text_buckets
        ),
    }
    head = FUSION_HEADS.get(cfg.fusion)(
        dim=cfg.embed_dim, num_modalities=len(encoders), num_classes=len(cfg.class_names)
    )
    return FusionModel(encoders, head)
