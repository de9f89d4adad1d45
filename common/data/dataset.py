"""A torch Dataset over one validated site folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.config import RunConfig
from common.data.images import load_grayscale
from common.data.manifest import Manifest, Record, load_manifest
from common.data.tokenizer import HashingTokenizer

# Order of the inputs the model takes after the mask; the dataset yields them in this order.
MODEL_MODALITIES = ("image", "report")


class SiteDataset(Dataset):
    """Records of one split of a site, as ``(mask, image, token_ids, label)`` tuples.

    ``mask`` is a float vector with one entry per modality in :data:`MODEL_MODALITIES`
    (1 = present). Absent modalities are zero tensors of the right shape, which the model
    ignores through the mask. Decoded images are cached in memory after first use.
    """

    def __init__(
        self,
        records: list[Record],
        *,
        classes: tuple[str, ...],
        image_size: int,
        tokenizer: HashingTokenizer,
    ) -> None:
        self.records = records
        self.classes = classes
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.image_size = image_size
        self.tokenizer = tokenizer
        self._image_cache: dict[int, torch.Tensor] = {}

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str, cfg: RunConfig) -> SiteDataset:
        return cls(
            manifest.split(split),
            classes=cfg.class_names,
            image_size=cfg.image_size,
            tokenizer=HashingTokenizer(num_buckets=cfg.text_buckets, max_tokens=cfg.max_tokens),
        )

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, i: int, path: Path) -> torch.Tensor:
        cached = self._image_cache.get(i)
        if cached is None:
            arr = load_grayscale(path)
            if arr.shape != (self.image_size, self.image_size):
                im = Image.fromarray((arr * 255).astype(np.uint8))
                im = im.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
            # Normalise to roughly zero mean / unit range; the same fixed constants at every site
            # (statistics computed from site data would have to be shared or kept private).
            cached = torch.from_numpy((arr - 0.5) / 0.5).unsqueeze(0)
            self._image_cache[i] = cached
        return cached

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        r = self.records[i]
        mask = torch.tensor([r.image is not None, r.report is not None], dtype=torch.float32)
        image = (
            self._image(i, r.image)
            if r.image is not None
            else torch.zeros(1, self.image_size, self.image_size)
        )
        tokens = (
            self.tokenizer(r.report)
            if r.report is not None
            else torch.zeros(self.tokenizer.max_tokens, dtype=torch.long)
        )
        label = torch.tensor(self.class_index[r.labels[0]], dtype=torch.long)
        return mask, image, tokens, label


def load_site(site_dir: str | Path, cfg: RunConfig) -> tuple[Manifest, dict[str, SiteDataset]]:
    """Validate a site folder and return its manifest and one dataset per split."""
    manifest = load_manifest(site_dir, classes=cfg.class_names, split_seed=cfg.seed)
    return manifest, {
        s: SiteDataset.from_manifest(manifest, s, cfg) for s in ("train", "val", "test")
    }
