"""Modality encoders. Each maps one modality's batch to a ``(batch, dim)`` feature tensor.

Every encoder must pass ``opacus.validators.ModuleValidator.validate`` (no BatchNorm: it mixes
samples of a batch, which breaks per-sample gradients; GroupNorm instead) and should have a
ghost-clipping norm sampler for its parameterised layers (Linear, Conv2d, Embedding, GroupNorm,
LayerNorm) so DP training stays cheap.
"""

from __future__ import annotations

import torch
from torch import nn

from common.data.tokenizer import PAD_ID
from common.registry import Registry

IMAGE_ENCODERS: Registry[nn.Module] = Registry("image encoder")
TEXT_ENCODERS: Registry[nn.Module] = Registry("text encoder")


def _conv_block(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
    ]


@IMAGE_ENCODERS.register("cnn")
class SmallCNN(nn.Module):
    """Three conv blocks with GroupNorm, global average pooling and a projection."""

    def __init__(self, *, dim: int, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *_conv_block(in_channels, width, 4),
            nn.MaxPool2d(2),
            *_conv_block(width, 2 * width, 8),
            nn.MaxPool2d(2),
            *_conv_block(2 * width, 2 * width, 8),
            # Global max pooling: a lesion is a small local finding; averaging would dilute it.
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Linear(2 * width, dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.net(x)))


@TEXT_ENCODERS.register("hash-mean")
class HashedMeanEncoder(nn.Module):
    """Hashed token ids -> embeddings -> mean over non-padding tokens -> projection.

    ``nn.Embedding`` + masked mean rather than ``nn.EmbeddingBag``: Opacus cannot compute
    per-sample gradients of EmbeddingBag on 2-D input, and it has no ghost-clipping sampler.
    """

    def __init__(self, *, dim: int, num_buckets: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_buckets, dim)
        self.proj = nn.Linear(dim, dim)
        self.out_dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != PAD_ID).unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(ids) * keep).sum(dim=1)
        mean = summed / keep.sum(dim=1).clamp_min(1.0)
        return torch.relu(self.proj(mean))
