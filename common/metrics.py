"""Evaluation metrics computed at a site (AUROC without sklearn)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN if one class only."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int = 256
) -> dict[str, float]:
    """Loss, accuracy and AUROC (positive class = index 1 for binary tasks) on ``dataset``."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    losses, all_labels, all_probs = [], [], []
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for *inputs, labels in loader:
        inputs = [x.to(device) for x in inputs]
        labels = labels.to(device)
        logits = model(*inputs)
        losses.append(float(loss_fn(logits, labels)))
        all_labels.append(labels.cpu())
        all_probs.append(torch.softmax(logits, dim=1).cpu())
    n = sum(len(lab) for lab in all_labels)
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan, "auroc": math.nan, "num-examples": 0}
    labels_np = torch.cat(all_labels).numpy()
    probs = torch.cat(all_probs).numpy()
    if probs.shape[1] == 2:
        auc = auroc(labels_np == 1, probs[:, 1])
    else:  # macro one-vs-rest
        per = [auroc(labels_np == k, probs[:, k]) for k in range(probs.shape[1])]
        finite = [a for a in per if not math.isnan(a)]
        auc = float(np.mean(finite)) if finite else math.nan
    return {
        "loss": sum(losses) / n,
        "accuracy": float((probs.argmax(1) == labels_np).mean()),
        "auroc": auc,
        "num-examples": n,
    }
