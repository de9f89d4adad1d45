"""One input pipeline per modality: a record's file or value -> the tensor its encoder takes.

The run config's ``modalities`` key names which of them the model uses and in which order;
:func:`build_inputs` makes them. Each input knows whether a record has it and what an absent
one looks like (zeros of the same shape, which the model ignores through the modality mask):
every item of a dataset then has the same shapes and dtypes, which Opacus' Poisson data loader
needs to build empty batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedfuse.common.config import RunConfig
from fedfuse.common.data.audio import AudioFeatures, read_wav
from fedfuse.common.data.augment_text_audio import (
    AudioAugment,
    TextAugment,
    audio_augmentation,
    text_augmentation,
)
from fedfuse.common.data.images import (
    load_grayscale,
    normalise,
    to_model_tensor,
    train_augmentation,
)
from fedfuse.common.data.manifest import Manifest, Record
from fedfuse.common.data.tabular import TabularScaler
from fedfuse.common.data.tokenizer import HashingTokenizer


class ModalityInput(Protocol):
    name: str

    def present(self, record: Record) -> bool: ...

    def empty(self) -> torch.Tensor: ...

    def load(self, record: Record, *, train: bool) -> torch.Tensor: ...


@dataclass
class ImageInput:
    """Decoded, resized images are cached; augmentation (train only) runs on every access."""

    size: int
    frame: int = 0
    augment: str = "none"
    name: str = "image"
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._augment = train_augmentation(self.augment)

    def present(self, record: Record) -> bool:
        return record.image is not None

    def empty(self) -> torch.Tensor:
        return torch.zeros(1, self.size, self.size)

    def load(self, record: Record, *, train: bool) -> torch.Tensor:
        assert record.image is not None
        key = str(record.image)
        t = self._cache.get(key)
        if t is None:
            t = to_model_tensor(load_grayscale(record.image, frame=self.frame), self.size)
            self._cache[key] = t
        if train and self._augment is not None:
            t = self._augment(t).clamp(0.0, 1.0)
        return normalise(t)


@dataclass
class ReportInput:
    """Token ids are cached; augmentation (train only) runs on every access."""

    tokenizer: HashingTokenizer
    name: str = "report"
    augment: TextAugment | None = None
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def present(self, record: Record) -> bool:
        return record.report is not None

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.tokenizer.max_tokens, dtype=torch.long)

    def load(self, record: Record, *, train: bool) -> torch.Tensor:
        assert record.report is not None
        t = self._cache.get(record.id)
        if t is None:
            t = self._cache[record.id] = self.tokenizer(record.report)
        if train and self.augment is not None:
            t = self.augment(t)
        return t


@dataclass
class AudioInput:
    """Features are cached; with ``augment`` (train only) the waveform is cached instead and
    noise, shift and masking are drawn on every access."""

    features: AudioFeatures
    name: str = "audio"
    augment: AudioAugment | None = None
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _waves: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def present(self, record: Record) -> bool:
        return record.audio is not None

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.features.shape)

    def load(self, record: Record, *, train: bool) -> torch.Tensor:
        assert record.audio is not None
        key = str(record.audio)
        if train and self.augment is not None:
            wav = self._waves.get(key)
            if wav is None:
                wav = self._waves[key] = self.features.waveform(*read_wav(record.audio))
            spec = self.features.spectrogram(self.augment.waveform(wav))
            return self.augment.spectrogram(spec)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = self.features.load(record.audio)
        return t


@dataclass
class TabularInput:
    scaler: TabularScaler
    name: str = "tabular"

    def present(self, record: Record) -> bool:
        return self.scaler.present(record.tabular)

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.scaler.dim)

    def load(self, record: Record, *, train: bool) -> torch.Tensor:
        return self.scaler(record.tabular)


def audio_features(cfg: RunConfig) -> AudioFeatures:
    return AudioFeatures(
        rate=cfg.audio_rate,
        seconds=cfg.audio_seconds,
        kind=cfg.audio_features,
        bins=cfg.audio_bins,
    )


def _tokenizer(cfg: RunConfig) -> HashingTokenizer:
    """The hashing tokenizer, or a pretrained text encoder's own (checked by SHA-256)."""
    if cfg.text_encoder == "bert":
        # lazy: transformers (the transfer extra) loads only for a BERT text encoder
        from fedfuse.common.models.pretrained import checkpoint_tokenizer

        return checkpoint_tokenizer(  # type: ignore[return-value]
            cfg.text_weights, sha256=cfg.text_weights_sha256, max_tokens=cfg.max_tokens
        )
    return HashingTokenizer(
        num_buckets=cfg.text_buckets, max_tokens=cfg.max_tokens, ngrams=cfg.text_ngrams
    )


def build_inputs(cfg: RunConfig, manifest: Manifest) -> tuple[ModalityInput, ...]:
    """The inputs ``cfg.modalities`` names, in that order, for one site.

    The tabular scaler uses the config's fixed ranges; only a non-private run may fit it on the
    site's train split instead.
    """
    out: list[ModalityInput] = []
    for name in cfg.modality_names:
        if name == "image":
            out.append(ImageInput(cfg.image_size, frame=cfg.dicom_frame, augment=cfg.augment))
        elif name == "report":
            tok = _tokenizer(cfg)
            aug = text_augmentation(
                cfg.text_augment,
                pad_id=getattr(tok, "pad_id", 0),
                protected=getattr(tok, "special_ids", ()),
            )
            out.append(ReportInput(tok, augment=aug))
        elif name == "audio":
            out.append(
                AudioInput(
                    audio_features(cfg),
                    augment=audio_augmentation(cfg.audio_augment, rate=cfg.audio_rate),
                )
            )
        elif name == "tabular":
            train_rows = [r.tabular for r in manifest.split("train")]
            scaler = TabularScaler.fit(
                train_rows,
                columns=cfg.tabular_names,
                ranges=cfg.tabular_range_map,
                private=cfg.private,
            )
            out.append(TabularInput(scaler))
        else:  # RunConfig validates names; this guards a new modality added in one place only
            raise ValueError(f"no input pipeline for modality {name!r}")
    return tuple(out)
