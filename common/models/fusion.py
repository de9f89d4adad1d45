"""Fusion heads and the multimodal model that joins encoders and a head.

Each head takes a list of per-modality features ``(batch, dim)`` and a modality mask
``(batch, num_modalities)`` (1 = present) and returns logits. Missing modalities are normal:
heads must not read features whose mask is 0.
"""

from __future__ import annotations

import torch
from torch import nn

from common.registry import Registry

FUSION_HEADS: Registry[nn.Module] = Registry("fusion head")


@FUSION_HEADS.register("concat")
class ConcatHead(nn.Module):
    """Early (feature-level) fusion: masked features and the mask itself, concatenated, MLP."""

    def __init__(self, *, dim: int, num_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(num_modalities * dim + num_modalities, dim),
            nn.ReLU(),
            nn.Linear(dim, num_classes),
        )

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        masked = [f * mask[:, i : i + 1] for i, f in enumerate(feats)]
        return self.mlp(torch.cat([*masked, mask], dim=1))


class FusionModel(nn.Module):
    """Encoders (one per modality, in a fixed order) + a fusion head.

    ``forward(mask, *inputs)`` takes the modality mask first and then one input tensor per
    modality in ``self.modalities`` order, which is also the order a site dataset yields them.
    """

    def __init__(self, encoders: dict[str, nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.head = head

    def forward(self, mask: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.modalities):
            raise ValueError(
                f"expected {len(self.modalities)} inputs ({', '.join(self.modalities)}); "
                f"got {len(inputs)}"
            )
        feats = [self.encoders[m](x) for m, x in zip(self.modalities, inputs, strict=True)]
        return self.head(feats, mask)
