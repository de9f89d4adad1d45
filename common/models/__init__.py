"""Modality encoders, fusion heads and the model factory."""

from fedfuse.common.models.encoders import (
    AUDIO_ENCODERS,
    IMAGE_ENCODERS,
    TABULAR_ENCODERS,
    TEXT_ENCODERS,
)
from fedfuse.common.models.factory import build_encoder, build_model
from fedfuse.common.models.fusion import FUSION_HEADS, FusionModel

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
