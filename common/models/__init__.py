"""Modality encoders, fusion heads and the model factory."""

from common.models.encoders import (
    AUDIO_ENCODERS,
    IMAGE_ENCODERS,
    TABULAR_ENCODERS,
    TEXT_ENCODERS,
)
from common.models.factory import build_encoder, build_model
from common.models.fusion import FUSION_HEADS, FusionModel

__all__ = [
    "build_encoder",
    "build_model",
    "FusionModel",
    "FUSION_HEADS",
    "AUDIO_ENCODERS",
    "IMAGE_ENCODERS",
    "TABULAR_ENCODERS",
    "TEXT_ENCODERS",
]
