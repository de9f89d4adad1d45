"""Modality encoders, fusion heads and the model factory."""

from common.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from common.models.factory import build_model
from common.models.fusion import FUSION_HEADS, FusionModel

__all__ = ["build_model", "FusionModel", "FUSION_HEADS", "IMAGE_ENCODERS", "TEXT_ENCODERS"]
