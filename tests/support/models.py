"""Small model configurations and random inputs shared by the model tests."""

from __future__ import annotations

import itertools

import torch

from fedfuse.common.config import RunConfig
from fedfuse.common.data.modalities import audio_features

ALL = ("image", "report", "audio", "tabular")
SUBSETS = [s for k in range(1, 5) for s in itertools.combinations(range(4), k)]  # 15


def small_cfg(**kw) -> RunConfig:
    base = dict(
        modalities=",".join(ALL),
        tabular_columns="a,b,c",
        tabular_ranges="a=0:1,b=0:1,c=0:1",
        image_size=16,
        text_buckets=64,
        max_tokens=8,
        embed_dim=8,
        audio_rate=1000,
        audio_seconds=0.5,
        audio_bins=8,
        classes="x,y,z",
    )
    base.update(kw)
    return RunConfig(**base)


def random_inputs(cfg: RunConfig, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    ids = torch.randint(1, cfg.text_buckets, (n, cfg.max_tokens), generator=gen)
    ids[:, cfg.max_tokens // 2 :] = 0  # padding
    return [
        torch.randn(n, 1, cfg.image_size, cfg.image_size, generator=gen),
        ids,
        torch.randn(n, *audio_features(cfg).shape, generator=gen),
        torch.randn(n, 2 * len(cfg.tabular_names), generator=gen),
    ]


def subset_mask(n: int) -> torch.Tensor:
    """Row i has modality subset i % 15 present."""
    mask = torch.zeros(n, 4)
    for i in range(n):
        mask[i, list(SUBSETS[i % len(SUBSETS)])] = 1.0
    return mask
