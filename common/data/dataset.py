"""A torch Dataset over one validated site folder, for the modalities a run config names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedfuse.common.config import RunConfig
from fedfuse.common.data.manifest import Manifest, Record, load_manifest
from fedfuse.common.data.modalities import ModalityInput, build_inputs


class LabelEncoder:
    """Single-label: class index (``long``). Multi-label: multi-hot ``float`` vector."""

    def __init__(self, classes: tuple[str, ...], *, multi_label: bool) -> None:
        self.classes = classes
        self.index = {c: i for i, c in enumerate(classes)}
        self.multi_label = multi_label

    def __call__(self, labels: tuple[str, ...]) -> torch.Tensor:
        if self.multi_label:
            y = torch.zeros(len(self.classes), dtype=torch.float32)
            for lab in labels:
                y[self.index[lab]] = 1.0
            return y
        return torch.tensor(self.index[labels[0]], dtype=torch.long)


class TaskLabelEncoder:
    """Extra tasks' labels as one class index per task, ``-1`` where the record lacks one."""

    def __init__(self, tasks: dict[str, tuple[str, ...]]) -> None:
        self.tasks = tasks
        self.index = {t: {c: i for i, c in enumerate(cs)} for t, cs in tasks.items()}

    def __call__(self, task_labels: dict[str, str]) -> torch.Tensor:
        return torch.tensor(
            [self.index[t].get(task_labels.get(t, ""), -1) for t in self.tasks], dtype=torch.long
        )


class SiteDataset(Dataset):
    """Records of one split of a site, as ``(mask, *inputs, label)`` tuples of tensors.

    ``inputs`` follow ``cfg.modalities`` order (the order :class:`FusionModel` takes them);
    ``mask`` has one float entry per modality (1 = present). Absent modalities are zero tensors
    of the right shape. ``train=True`` turns on training-only augmentation.
    """

    def __init__(
        self,
        records: list[Record],
        *,
        inputs: tuple[ModalityInput, ...],
        labels: LabelEncoder,
        train: bool = False,
        task_labels: TaskLabelEncoder | None = None,
    ) -> None:
        self.records = records
        self.inputs = inputs
        self.labels = labels
        self.train = train
        self.task_labels = task_labels

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        r = self.records[i]
        present = [inp.present(r) for inp in self.inputs]
        mask = torch.tensor(present, dtype=torch.float32)
        xs = [
            inp.load(r, train=self.train) if p else inp.empty()
            for inp, p in zip(self.inputs, present, strict=True)
        ]
        return (mask, *xs, self.labels(r.labels))

    def with_task_labels(self) -> WithTaskLabels:
        """A view whose label is ``[main class, extra task classes (-1: absent)...]``."""
        if self.task_labels is None:
            raise ValueError("this dataset has no extra tasks (run config 'tasks')")
        return WithTaskLabels(self)


class WithTaskLabels(Dataset):
    """A :class:`SiteDataset` whose items carry every task's label: the main task's class
    index first, then one per extra task (``-1`` where the record lacks it)."""

    def __init__(self, base: SiteDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        *xs, y = self.base[i]
        assert self.base.task_labels is not None
        extra = self.base.task_labels(self.base.records[i].task_labels)
        return (*xs, torch.cat([y.view(1), extra]))


def manifest_for(site_dir: str | Path, cfg: RunConfig, **kwargs: Any) -> Manifest:
    """Load and validate a site's manifest with the checks ``cfg`` implies."""
    return load_manifest(
        site_dir,
        classes=cfg.class_names,
        split_seed=cfg.seed,
        multi_label=cfg.multi_label,
        dicom_frame=cfg.dicom_frame,
        tasks=cfg.task_classes or None,
        **kwargs,
    )


def datasets_for(manifest: Manifest, cfg: RunConfig) -> dict[str, SiteDataset]:
    inputs = build_inputs(cfg, manifest)
    labels = LabelEncoder(cfg.class_names, multi_label=cfg.multi_label)
    tasks = TaskLabelEncoder(cfg.task_classes) if cfg.task_classes else None
    return {
        s: SiteDataset(
            manifest.split(s), inputs=inputs, labels=labels, train=s == "train", task_labels=tasks
        )
        for s in ("train", "val", "test")
    }


def load_site(site_dir: str | Path, cfg: RunConfig) -> tuple[Manifest, dict[str, SiteDataset]]:
    """Validate a site folder and return its manifest and one dataset per split."""
    manifest = manifest_for(site_dir, cfg)
    return manifest, datasets_for(manifest, cfg)


# Config keys that change what a site's datasets contain (for caches of decoded data).
DATA_KEYS = (
    "classes",
    "seed",
    "task",
    "modalities",
    "image_size",
    "dicom_frame",
    "augment",
    "text_augment",
    "audio_augment",
    "text_buckets",
    "text_encoder",
    "text_weights",
    "text_weights_sha256",
    "max_tokens",
    "audio_rate",
    "audio_seconds",
    "audio_features",
    "audio_bins",
    "tabular_columns",
    "tabular_ranges",
    "tasks",
)


def data_signature(cfg: RunConfig) -> tuple[Any, ...]:
    return tuple(getattr(cfg, k) for k in DATA_KEYS)
