"""Image preprocessing (fixed size, normalisation, training-only augmentation) and datasets that
Opacus' Poisson loader can batch, empty batches included."""

from __future__ import annotations

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from PIL import Image

from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.data.synthetic import TABULAR_COLUMNS, TABULAR_RANGES, generate
from tests.support.mmutil import write_manifest


def _image_site(tmp_path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(site / "img" / "a.png")
    rows = [
        {"id": "a", "image": "img/a.png", "label": "no_finding", "split": "train"},
        {"id": "b", "image": "img/a.png", "label": "pneumonia", "split": "test"},
    ]
    return write_manifest(site, rows, ["id", "image", "label", "split"])


def test_fixed_size_and_normalisation(tmp_path):
    _, ds = load_site(_image_site(tmp_path), RunConfig(modalities="image", image_size=24))
    _, image, _ = ds["test"][0]
    assert image.shape == (1, 24, 24) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0  # [0, 1] -> (x - 0.5) / 0.5


def test_augmentation_only_for_training_images(tmp_path):
    cfg = RunConfig(modalities="image", image_size=24, augment="light")
    _, ds = load_site(_image_site(tmp_path), cfg)
    torch.manual_seed(0)
    train = [ds["train"][0][1] for _ in range(4)]
    assert any(not torch.equal(train[0], t) for t in train[1:])  # random each access
    test = [ds["test"][0][1] for _ in range(4)]
    assert all(torch.equal(test[0], t) for t in test[1:])  # never augmented
    plain = load_site(_image_site(tmp_path / "x"), cfg.replace(augment="none"))[1]
    assert torch.equal(plain["train"][0][1], plain["test"][0][1])  # same file, no augmentation
    assert torch.allclose(test[0], plain["test"][0][1])


def test_dp_data_loader_batches_every_modality_and_empty_batches(tmp_path):
    (site, *_) = generate(
        tmp_path,
        sites=1,
        records=30,
        seed=4,
        modalities=("image", "report", "audio", "tabular"),
        missing_rate=0.5,
    )
    cfg = RunConfig(
        modalities="image,report,audio,tabular",
        tabular_columns=",".join(TABULAR_COLUMNS),
        tabular_ranges=TABULAR_RANGES,
        task="multi-label",
        classes="no_finding,pneumonia",
    )
    train = load_site(site, cfg)[1]["train"]
    first = train[0]
    gen = torch.Generator().manual_seed(0)
    full = next(iter(DPDataLoader(train, sample_rate=0.999999, generator=gen)))
    assert len(full) == 6 and all(len(t) == len(train) for t in full)
    empty = next(iter(DPDataLoader(train, sample_rate=1e-9, generator=gen)))
    for t, ref in zip(empty, first, strict=True):
        assert t.shape == (0, *ref.shape) and t.dtype == ref.dtype
