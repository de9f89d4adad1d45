"""Evaluation metrics computed at a site (AUROC without sklearn), single- and multi-label."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Predictions:
    """Labels, logits and (when the fusion head has them) per-modality weights of a split."""

    labels: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor | None


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    hide: int | None = None,
) -> Predictions:
    """Run ``model`` over ``dataset``; ``hide=i`` masks modality ``i`` out of every record."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    labels, logits, masks, weights = [], [], [], []
    head = getattr(model, "head", None)
    for mask, *inputs, y in loader:
        if hide is not None:
            mask = mask.clone()
            mask[:, hide] = 0.0
        out = model(mask.to(device), *[x.to(device) for x in inputs])
        labels.append(y)
        logits.append(out.float().cpu())
        masks.append(mask)
        w = getattr(head, "last_weights", None)
        if w is not None:
            weights.append(w.float().cpu())
    if not labels:
        empty = torch.zeros(0)
        return Predictions(empty, empty, empty, None)
    return Predictions(
        torch.cat(labels),
        torch.cat(logits),
        torch.cat(masks),
        torch.cat(weights) if len(weights) == len(labels) else None,
    )


@torch.no_grad()
def predict_variants(
    model: nn.Module,
    dataset: Dataset,
    *,
    hidden: int,
    device: torch.device,
    batch_size: int = 256,
) -> list[Predictions]:
    """``[every modality, modality 0 hidden, ..., modality hidden-1 hidden]`` in one pass over
    ``dataset``: each batch goes through ``model`` once, its variants stacked along the batch
    (the same figures as :func:`predict` with ``hide=i``; a model in eval mode treats records
    independently). A forward call holds at most ``batch_size`` rows, as :func:`predict`'s."""
    model.eval()
    k = 1 + hidden
    loader = DataLoader(dataset, batch_size=max(1, batch_size // k), shuffle=False)
    labels: list[torch.Tensor] = []
    logits: list[list[torch.Tensor]] = [[] for _ in range(k)]
    masks: list[list[torch.Tensor]] = [[] for _ in range(k)]
    weights: list[list[torch.Tensor]] = [[] for _ in range(k)]
    head = getattr(model, "head", None)
    for mask, *inputs, y in loader:
        b = len(y)
        variants = [mask]
        for i in range(hidden):
            m = mask.clone()
            m[:, i] = 0.0
            variants.append(m)
        stacked = [x.repeat(k, *([1] * (x.dim() - 1))).to(device) for x in inputs]
        out = model(torch.cat(variants).to(device), *stacked).float().cpu()
        w = getattr(head, "last_weights", None)
        labels.append(y)
        for v in range(k):
            logits[v].append(out[v * b : (v + 1) * b])
            masks[v].append(variants[v])
            if w is not None:
                weights[v].append(w[v * b : (v + 1) * b].float().cpu())
    if not labels:
        empty = torch.zeros(0)
        return [Predictions(empty, empty, empty, None) for _ in range(k)]
    y_all = torch.cat(labels)
    return [
        Predictions(
            y_all,
            torch.cat(logits[v]),
            torch.cat(masks[v]),
            torch.cat(weights[v]) if len(weights[v]) == len(labels) else None,
        )
        for v in range(k)
    ]


def scores(
    pred: Predictions, *, multi_label: bool, class_names: tuple[str, ...] | None = None
) -> dict[str, float]:
    """Loss, accuracy and AUROC of predictions.

    Single-label: softmax; AUROC of class 1 for two classes, else macro one-vs-rest.
    Multi-label: a sigmoid per class; ``accuracy`` is the mean per-label accuracy, ``auroc``
    the macro mean over classes with both outcomes present. With more than two classes, or
    multi-label, ``auroc-<class>`` gives each class's AUROC (NaN if undefined at this site).
    """
    n = len(pred.labels)
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan, "auroc": math.nan, "num-examples": 0}
    logits = pred.logits
    num_classes = logits.shape[1]
    if multi_label:
        y = pred.labels.float()
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        loss /= num_classes  # per record, averaged over labels (as in training)
        probs = torch.sigmoid(logits).numpy()
        y_np = y.numpy().astype(bool)
        acc = float(((probs >= 0.5) == y_np).mean())
        per = [auroc(y_np[:, k], probs[:, k]) for k in range(num_classes)]
    else:
        y_idx = pred.labels.long()
        loss = float(nn.functional.cross_entropy(logits, y_idx, reduction="sum"))
        probs = torch.softmax(logits, dim=1).numpy()
        y_np = y_idx.numpy()
        acc = float((probs.argmax(1) == y_np).mean())
        if num_classes == 2:
            per = [auroc(y_np == 1, probs[:, 1])]
        else:
            per = [auroc(y_np == k, probs[:, k]) for k in range(num_classes)]
    finite = [a for a in per if not math.isnan(a)]
    out: dict[str, float] = {
        "loss": loss / n,
        "accuracy": acc,
        "auroc": float(np.mean(finite)) if finite else math.nan,
        "num-examples": n,
    }
    if multi_label or num_classes > 2:
        names = class_names or tuple(str(k) for k in range(num_classes))
        for name, a in zip(names, per, strict=True):
            out[f"auroc-{name}"] = a
    return out


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    multi_label: bool = False,
    class_names: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Loss, accuracy and AUROC (see :func:`scores`) of ``model`` on ``dataset``."""
    pred = predict(model, dataset, device=device, batch_size=batch_size)
    return scores(pred, multi_label=multi_label, class_names=class_names)


# Scores are binned on an asinh-compressed logit scale: bins about 0.7% of the logit wide
# (relative) down to |logit| ~ 1e-3, where a barely trained or DP-trained model's scores crowd,
# and coarser in the tails. A fixed, public binning, so that the sites' histograms add up and
# the pooled AUROC follows from the sum alone (common/evaluation.py).
SCORE_BINS = 2048
LOGIT_RANGE = 16.0
LOGIT_SCALE = 1e-3


def score_bins(probs: np.ndarray, *, bins: int = SCORE_BINS) -> np.ndarray:
    """The bin (0..bins-1) of each probability; monotone in the probability."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-300, 1.0)
    logit = np.clip(np.log(p) - np.log1p(-np.minimum(p, 1 - 1e-16)), -LOGIT_RANGE, LOGIT_RANGE)
    top = np.arcsinh(LOGIT_RANGE / LOGIT_SCALE)
    z = np.arcsinh(logit / LOGIT_SCALE)
    idx = np.floor((z + top) / (2 * top) * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


def histogram_auroc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUROC, resolution) from per-class score histograms over the same ordered bins.

    Pairs in one bin count half (ties), so the AUROC of the raw scores lies within
    ``resolution = sum(pos * neg) / (2 P N)`` of it. NaN (and 0) if one class is absent.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan, 0.0
    below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    u = float((pos * (below + neg / 2)).sum())
    return u / (n_pos * n_neg), float((pos * neg).sum()) / (2 * n_pos * n_neg)
