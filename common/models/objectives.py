"""Training objectives: the loss for the task, and modality dropout."""

from __future__ import annotations

import torch
from torch import nn

from fedfuse.common.config import RunConfig
from fedfuse.common.models.multitask import MultiTaskLoss
from fedfuse.common.privacy.secure_rng import SecureRandom


def reduce_per_record(per: torch.Tensor, reduction: str) -> torch.Tensor:
    """``per`` (one loss per record) reduced as torch's losses do: ``none``, ``sum``, ``mean``."""
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


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
        return reduce_per_record(per, self.reduction)


class WithAuxiliaryLoss(nn.Module):
    """The task's loss plus ``model.auxiliary_loss`` (each record's extra loss from the
    model's last forward, e.g. the ``pool`` encoder's centring loss), one value per record.

    Both are one per-record loss, so Opacus clips a record's whole gradient and noises it as
    one. ``reduction`` follows the same convention as the task's loss (Opacus' ghost clipping
    sets it to ``"none"``). ``task_loss_sum`` holds the last batch's summed task loss alone:
    the training loss a site reports is the task's.
    """

    def __init__(self, task: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.task.reduction = "none"  # type: ignore[assignment]
        self.reduction = "mean"
        self._model = [model]  # a list: not a submodule (no second copy of its parameters)
        self.task_loss_sum = 0.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = self.task(logits, target)
        self.task_loss_sum = float(per.detach().sum())
        extra = getattr(self._model[0], "auxiliary_loss", None)
        if extra is not None:
            per = per + extra
        return reduce_per_record(per, self.reduction)


def make_objective(cfg: RunConfig, model: nn.Module) -> WithAuxiliaryLoss:
    """What a site minimises for ``model`` (a :class:`FusionModel`): the task's loss
    (:func:`make_criterion`) plus the model's own per-record terms."""
    return WithAuxiliaryLoss(make_criterion(cfg), model)


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
