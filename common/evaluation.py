"""What a site reports about the global model: test metrics and modality contributions."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from common.config import RunConfig
from common.explain import contribution_metrics, modality_contributions
from common.metrics import evaluate


def evaluate_site(
    model: nn.Module, dataset: Dataset, *, cfg: RunConfig, device: torch.device
) -> dict[str, float]:
    """Flat metrics for a MetricRecord: ``num-examples``, ``eval-loss``, ``eval-accuracy``,
    ``eval-auroc`` (plus ``eval-auroc-<class>`` for multi-class / multi-label tasks) and the
    per-modality contributions of :mod:`common.explain` (scalars only, like the AUROC)."""
    model = model.to(device)
    res = evaluate(
        model, dataset, device=device, multi_label=cfg.multi_label, class_names=cfg.class_names
    )
    out: dict[str, float] = {"num-examples": res.pop("num-examples")}
    out.update({f"eval-{k}": v for k, v in res.items()})
    if out["num-examples"]:
        report = modality_contributions(model, dataset, device=device, multi_label=cfg.multi_label)
        out.update(contribution_metrics(report))
    return out
