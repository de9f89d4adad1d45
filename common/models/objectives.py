"""Training objectives: the loss for the task, and modality dropout."""

from __future__ import annotations

import torch
from torch import nn

from fedfuse.common.config import RunConfig
from fedfuse.common.models.multitask import MultiTaskLoss
from fedfuse.common.privacy.secure_rng import SecureRandom


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy per class, averaged over classes, one value per record.

    Opacus' ghost clipping calls the criterion with ``reduction="none"`` and needs one loss per
    record; ``BCEWithLogitsLoss(reduction="none")`` gives one per (record, class).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = nn.functional.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), reduction="none"
        ).mean(dim=1)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


def make_criterion(cfg: RunConfig) -> nn.Module:
    """Softmax cross-entropy (single-label) or per-class sigmoid (multi-label); with extra
    ``tasks``, the weighted multi-task loss over :class:`~.multitask.AllTasks`' logits."""
    if cfg.task_classes:
        return MultiTaskLoss(cfg)
    return MultiLabelLoss() if cfg.multi_label else nn.CrossEntropyLoss()


def modality_dropout(
    mask: torch.Tensor, p: float, *, generator: torch.Generator | SecureRandom | None = None
) -> torch.Tensor:
    """Hide each present modality of each record with probability ``p``, never all of them.

    A record that would lose every modality keeps its original mask. Hiding is independent of
    the data, so it does not change the DP guarantee (each record's gradient is still clipped).
    ``generator``: a :class:`SecureRandom` at a deployed site (nobody can regenerate which
    modalities a round hid), a keyed ``torch.Generator`` in a simulation (reproducible).
    """
    if p <= 0.0 or mask.numel() == 0:
        return mask
    if isinstance(generator, SecureRandom):
        draws = torch.from_numpy(generator.uniform(mask.numel())).view(mask.shape)
        keep = draws.to(mask.device) >= p
    else:
        keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= p
    dropped = mask * keep.to(mask.dtype)
    lost_all = dropped.sum(dim=1) == 0
    return torch.where(lost_all.unsqueeze(1), mask, dropped)
