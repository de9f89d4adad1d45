"""Multi-task learning on the shared encoders: every task's logits, and the weighted loss.

Extra tasks (run config ``tasks``) each have a head on the same encoders (Caruana 1997,
"Multitask Learning"); their labels come from ``label.<task>`` columns, and a record without
a task's label (an empty cell, or a site without the column) contributes nothing to that
task's loss, as a missing modality contributes nothing to the fusion. The loss is one value
per record (the main task's cross-entropy plus the weighted extra tasks'), so per-record
clipping bounds each record's whole contribution, whatever tasks it has labels for.
"""

from __future__ import annotations

import torch
from torch import nn

from fedfuse.common.config import RunConfig


class AllTasks(nn.Module):
    """A model whose ``forward`` is ``model.forward_all``: every task's logits (for training
    and per-task evaluation; the same parameters, so training it trains ``model``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mask: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.forward_all(mask, *inputs)  # type: ignore[operator]


def task_slices(cfg: RunConfig) -> dict[str, slice]:
    """Columns of :meth:`FusionModel.forward_all`'s output that belong to each extra task."""
    out: dict[str, slice] = {}
    at = len(cfg.class_names)
    for task, classes in cfg.task_classes.items():
        out[task] = slice(at, at + len(classes))
        at += len(classes)
    return out


class MultiTaskLoss(nn.Module):
    """Per record: CE(main) + sum over extra tasks of weight * CE(task), where labelled.

    ``target`` holds the main class index, then one per extra task (``-1``: no label). Opacus
    sets ``reduction = "none"`` to get one loss per record.
    """

    def __init__(self, cfg: RunConfig, reduction: str = "mean") -> None:
        super().__init__()
        self.main = len(cfg.class_names)
        self.slices = list(task_slices(cfg).values())
        self.weights = list(cfg.task_weight_map.values())
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        per = nn.functional.cross_entropy(logits[:, : self.main], target[:, 0], reduction="none")
        for k, (cols, w) in enumerate(zip(self.slices, self.weights, strict=True)):
            y = target[:, 1 + k]
            has = y >= 0
            ce = nn.functional.cross_entropy(logits[:, cols], y.clamp_min(0), reduction="none")
            per = per + w * ce * has.to(ce.dtype)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()
