"""What a site reports about the global model: sums for the federation, figures for itself.

By default a site's evaluation leaves it only as a vector of integer sums (:class:`EvalLayout`)
that SecAgg+ adds up with the other sites' before the server sees it: record count, loss sum,
correct predictions, per-class histograms of the scores over a fixed public binning (with every
modality, and with each one hidden), and the fusion head's weight sums. The federation's loss,
accuracy, AUROC and modality contributions follow from the sum alone (:func:`decode_sums`); the
pooled AUROC to the histogram's resolution (``fedfuse.common.metrics.histogram_auroc``). The site's
own figures (:func:`evaluate_site`) stay in its local log unless it opts in to share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedfuse.common.config import RunConfig
from fedfuse.common.explain import contribution_metrics, contribution_report
from fedfuse.common.metrics import (
    SCORE_BINS,
    Predictions,
    histogram_auroc,
    predict,
    predict_variants,
    score_bins,
    scores,
)
from fedfuse.common.models.multitask import AllTasks

# Fixed-point scale of the loss and weight sums, and the per-record loss cap: public constants,
# so every site's vector has the same meaning and a bound a site can check against the modulus.
SUM_SCALE = 2**10
# Where the vector travels in an evaluate reply (both sides import these).
EVAL_SUMS_KEY = "eval-sums"
EVAL_SUMS_ARRAY = "sums"
LOSS_CAP = 64.0


@dataclass(frozen=True)
class EvalLayout:
    """The meaning of each entry of an evaluation-sums vector (the same at every site).

    ``[records, loss sum, correct, graded]``, then for each variant (all modalities, then each
    modality hidden) and each AUROC task a positive and a negative score histogram, then per
    modality ``[weight sum, records with a weight, records with the modality]``.
    """

    tasks: tuple[str, ...]  # AUROC tasks: one for two classes, else one per class
    modalities: tuple[str, ...]
    multi_label: bool
    bins: int = SCORE_BINS
    # Extra tasks (run config ``tasks``): (name, number of classes). Each appends
    # ``[labelled records, correct, loss sum]`` and, per AUROC subtask (one for two classes,
    # else one per class), a positive and a negative score histogram.
    extra: tuple[tuple[str, int], ...] = ()

    @classmethod
    def for_config(cls, cfg: RunConfig) -> EvalLayout:
        names = tuple(cfg.class_names)
        tasks = ("",) if (len(names) == 2 and not cfg.multi_label) else names
        extra = tuple((t, len(c)) for t, c in cfg.task_classes.items())
        return cls(
            tasks=tasks, modalities=cfg.modality_names, multi_label=cfg.multi_label, extra=extra
        )

    @property
    def head(self) -> int:
        return 4

    def hist_offset(self, variant: int, task: int) -> int:
        return self.head + (variant * len(self.tasks) + task) * 2 * self.bins

    @property
    def weights_offset(self) -> int:
        return self.hist_offset(1 + len(self.modalities), 0)

    @property
    def extra_offset(self) -> int:
        return self.weights_offset + 3 * len(self.modalities)

    def extra_subtasks(self, k: int) -> int:
        return 1 if self.extra[k][1] == 2 else self.extra[k][1]

    def extra_section(self, k: int) -> tuple[int, int]:
        """(start, length) of extra task ``k``'s entries."""
        at = self.extra_offset
        for j in range(k):
            at += 3 + self.extra_subtasks(j) * 2 * self.bins
        return at, 3 + self.extra_subtasks(k) * 2 * self.bins

    @property
    def length(self) -> int:
        if not self.extra:
            return self.extra_offset
        at, n = self.extra_section(len(self.extra) - 1)
        return at + n


def _task_scores(logits: torch.Tensor, labels: torch.Tensor, layout: EvalLayout):
    """(probabilities, positives) per AUROC task, and (correct, graded) counts."""
    if layout.multi_label:
        probs = torch.sigmoid(logits).numpy()
        y = labels.numpy().astype(bool)
        correct = int(((probs >= 0.5) == y).sum())
        return [(probs[:, k], y[:, k]) for k in range(probs.shape[1])], correct, y.size
    probs = torch.softmax(logits, dim=1).numpy()
    y_idx = labels.long().numpy()
    correct = int((probs.argmax(1) == y_idx).sum())
    if len(layout.tasks) == 1:
        return [(probs[:, 1], y_idx == 1)], correct, len(y_idx)
    return [(probs[:, k], y_idx == k) for k in range(probs.shape[1])], correct, len(y_idx)


def _record_losses(logits: torch.Tensor, labels: torch.Tensor, layout: EvalLayout) -> np.ndarray:
    if layout.multi_label:
        per = nn.functional.binary_cross_entropy_with_logits(
            logits, labels.float(), reduction="none"
        ).mean(dim=1)
    else:
        per = nn.functional.cross_entropy(logits, labels.long(), reduction="none")
    return per.numpy().astype(np.float64)


def _variants(
    model: nn.Module, dataset: Dataset, *, modalities: int, device: torch.device
) -> list[Predictions]:
    return predict_variants(model.to(device), dataset, hidden=modalities, device=device)


def eval_sums(
    model: nn.Module, dataset: Dataset, *, layout: EvalLayout, device: torch.device
) -> np.ndarray:
    """This site's evaluation-sums vector (non-negative int64, ``layout.length`` entries)."""
    variants = _variants(model, dataset, modalities=len(layout.modalities), device=device)
    return sums_from_predictions(
        variants, layout=layout, extra=_extra(model, dataset, layout, device)
    )


def _extra(
    model: nn.Module, dataset: Dataset, layout: EvalLayout, device: torch.device
) -> np.ndarray | None:
    """The extra tasks' sums (a pass of the all-task heads), or None without extra tasks."""
    if not layout.extra:
        return None
    return extra_task_sums(model, dataset, layout=layout, device=device)


def sums_from_predictions(
    variants: list[Predictions], *, layout: EvalLayout, extra: np.ndarray | None = None
) -> np.ndarray:
    """The evaluation-sums vector from :func:`fedfuse.common.metrics.predict_variants`'
    predictions (every modality, then each one hidden), with the extra tasks' part ``extra``
    (:func:`extra_task_sums`) where the run has extra tasks."""
    vec = np.zeros(layout.length, dtype=np.int64)
    full = variants[0]
    n = len(full.labels)
    if n == 0:
        return vec
    losses = np.minimum(_record_losses(full.logits, full.labels, layout), LOSS_CAP)
    tasks, correct, graded = _task_scores(full.logits, full.labels, layout)
    vec[:4] = [n, int(np.rint(losses * SUM_SCALE).sum()), correct, graded]
    for v, pred in enumerate(variants):
        per_task = tasks if v == 0 else _task_scores(pred.logits, pred.labels, layout)[0]
        for t, (probs, positive) in enumerate(per_task):
            bins = score_bins(probs, bins=layout.bins)
            at = layout.hist_offset(v, t)
            vec[at : at + layout.bins] += np.bincount(bins[positive], minlength=layout.bins)
            neg = at + layout.bins
            vec[neg : neg + layout.bins] += np.bincount(bins[~positive], minlength=layout.bins)
    for i in range(len(layout.modalities)):
        at = layout.weights_offset + 3 * i
        present = (full.mask[:, i] > 0).numpy()
        vec[at + 2] = int(present.sum())
        if full.weights is not None:
            w = full.weights[:, i].double().numpy()[present]
            vec[at] = int(np.rint(w * SUM_SCALE).sum())
            vec[at + 1] = int(present.sum())
    if layout.extra:
        if extra is None:
            raise ValueError("the run has extra tasks: pass their sums (extra_task_sums)")
        vec[layout.extra_offset :] = extra
    return vec


@torch.no_grad()
def extra_task_sums(
    model: nn.Module, dataset: Dataset, *, layout: EvalLayout, device: torch.device
) -> np.ndarray:
    """The extra tasks' part of the evaluation vector (records lacking a task's label are
    left out of that task's entries)."""

    out = np.zeros(layout.length - layout.extra_offset, dtype=np.int64)
    if len(dataset) == 0:  # type: ignore[arg-type]
        return out
    pred = predict(AllTasks(model), dataset.with_task_labels(), device=device)  # type: ignore[attr-defined]
    col = pred.logits.shape[1] - sum(c for _, c in layout.extra)
    for k, (_name, n_classes) in enumerate(layout.extra):
        start, _ = layout.extra_section(k)
        at = start - layout.extra_offset
        y = pred.labels[:, 1 + k].long()
        has = y >= 0
        logits = pred.logits[:, col : col + n_classes][has]
        col += n_classes
        y = y[has]
        if len(y) == 0:
            continue
        probs = torch.softmax(logits, dim=1).numpy()
        losses = nn.functional.cross_entropy(logits, y, reduction="none").numpy()
        losses = np.minimum(losses.astype(np.float64), LOSS_CAP)
        out[at : at + 3] = [
            len(y),
            int((probs.argmax(1) == y.numpy()).sum()),
            int(np.rint(losses * SUM_SCALE).sum()),
        ]
        subtasks = [1] if n_classes == 2 else list(range(n_classes))
        for j, c in enumerate(subtasks):
            bins = score_bins(probs[:, c], bins=layout.bins)
            positive = (y == c).numpy()
            h = at + 3 + j * 2 * layout.bins
            out[h : h + layout.bins] += np.bincount(bins[positive], minlength=layout.bins)
            neg = h + layout.bins
            out[neg : neg + layout.bins] += np.bincount(bins[~positive], minlength=layout.bins)
    return out


def decode_extra_tasks(total: np.ndarray, layout: EvalLayout) -> dict[str, float]:
    """Per extra task: ``eval-records-task-<t>``, ``eval-accuracy-task-<t>``,
    ``eval-loss-task-<t>`` and ``eval-auroc-task-<t>`` (mean over one-vs-rest classes)."""
    out: dict[str, float] = {}
    for k, (name, _n) in enumerate(layout.extra):
        at, _ = layout.extra_section(k)
        n, correct, loss = (int(x) for x in total[at : at + 3])
        aurocs = []
        for j in range(layout.extra_subtasks(k)):
            h = at + 3 + j * 2 * layout.bins
            a, _res = histogram_auroc(
                total[h : h + layout.bins], total[h + layout.bins : h + 2 * layout.bins]
            )
            aurocs.append(a)
        finite = [a for a in aurocs if not math.isnan(a)]
        out[f"eval-records-task-{name}"] = float(n)
        out[f"eval-accuracy-task-{name}"] = correct / n if n else math.nan
        out[f"eval-loss-task-{name}"] = loss / SUM_SCALE / n if n else math.nan
        out[f"eval-auroc-task-{name}"] = float(np.mean(finite)) if finite else math.nan
    return out


def decode_sums(total: np.ndarray, layout: EvalLayout) -> dict[str, float]:
    """Federation-wide ``eval-*`` figures from the sum of the sites' vectors.

    The same keys as :func:`evaluate_site` (``eval-auroc-<class>`` for multi-class or
    multi-label tasks), plus ``eval-auroc-resolution``: how far any pooled AUROC here (with
    every modality or one hidden) can be from that of the raw scores
    (``fedfuse.common.metrics.histogram_auroc``).
    """
    total = np.asarray(total, dtype=np.int64)
    if total.shape != (layout.length,):
        raise ValueError(f"evaluation sums have {total.size} entries; expected {layout.length}")
    n, loss, correct, graded = (int(x) for x in total[:4])
    out: dict[str, float] = {"num-examples": float(n), "eval-records": float(n)}
    out["eval-loss"] = loss / SUM_SCALE / n if n else math.nan
    out["eval-accuracy"] = correct / graded if graded else math.nan

    def variant(v: int) -> tuple[list[float], float]:
        per, res = [], 0.0
        for t in range(len(layout.tasks)):
            at = layout.hist_offset(v, t)
            a, r = histogram_auroc(
                total[at : at + layout.bins], total[at + layout.bins : at + 2 * layout.bins]
            )
            per.append(a)
            res = max(res, r)
        return per, res

    def mean(xs: list[float]) -> float:
        finite = [x for x in xs if not math.isnan(x)]
        return float(np.mean(finite)) if finite else math.nan

    per, resolution = variant(0)
    out["eval-auroc"] = mean(per)
    # One bound for every AUROC figure here: the coarsest over all variants.
    variants = [variant(1 + i) for i in range(len(layout.modalities))]
    out["eval-auroc-resolution"] = max([resolution] + [r for _, r in variants])
    if len(layout.tasks) > 1:
        for name, a in zip(layout.tasks, per, strict=True):
            out[f"eval-auroc-{name}"] = a
    for i, name in enumerate(layout.modalities):
        without = mean(variants[i][0])
        out[f"eval-auroc-without-{name}"] = without
        out[f"eval-auroc-drop-{name}"] = out["eval-auroc"] - without
        wsum, wcount, _present = (int(x) for x in total[layout.weights_offset + 3 * i :][:3])
        out[f"eval-weight-{name}"] = wsum / SUM_SCALE / wcount if wcount else math.nan
    out.update(decode_extra_tasks(total, layout))
    return out


def evaluate_site(
    model: nn.Module, dataset: Dataset, *, cfg: RunConfig, device: torch.device
) -> dict[str, float]:
    """This site's own figures, computed in the clear (its local log; shared only on opt-in):
    ``num-examples``, ``eval-loss``, ``eval-accuracy``, ``eval-auroc`` (plus
    ``eval-auroc-<class>`` for multi-class / multi-label tasks) and the per-modality
    contributions of :mod:`fedfuse.common.explain`. Every key is always present (NaN where
    undefined), so that every site reports the same keys."""
    variants = _variants(model, dataset, modalities=len(cfg.modality_names), device=device)
    layout = EvalLayout.for_config(cfg)
    return figures_from_predictions(variants, cfg=cfg, extra=_extra(model, dataset, layout, device))


def figures_from_predictions(
    variants: list[Predictions], *, cfg: RunConfig, extra: np.ndarray | None = None
) -> dict[str, float]:
    """:func:`evaluate_site`'s figures from predictions already made (every modality, then
    each one hidden)."""
    full, *hidden = variants
    res = scores(full, multi_label=cfg.multi_label, class_names=cfg.class_names)
    out: dict[str, float] = {"num-examples": res.pop("num-examples")}
    out.update({f"eval-{k}": v for k, v in res.items()})
    if out["num-examples"]:
        report = contribution_report(
            full, hidden, tuple(cfg.modality_names), multi_label=cfg.multi_label
        )
        out.update(contribution_metrics(report))
    for name in cfg.modality_names:
        for key in ("auroc-without", "auroc-drop", "weight"):
            out.setdefault(f"eval-{key}-{name}", math.nan)
    layout = EvalLayout.for_config(cfg)
    if layout.extra and extra is not None:  # the federation's per-task figures, this site alone
        total = np.zeros(layout.length, dtype=np.int64)
        total[layout.extra_offset :] = extra
        out.update(decode_extra_tasks(total, layout))
    return out


def site_evaluation(
    model: nn.Module, dataset: Dataset, *, cfg: RunConfig, device: torch.device
) -> tuple[dict[str, float], np.ndarray]:
    """(the site's own figures, its evaluation-sums vector) from ONE pass over ``dataset``:
    what :func:`evaluate_site` and :func:`eval_sums` return, without evaluating twice."""
    layout = EvalLayout.for_config(cfg)
    variants = _variants(model, dataset, modalities=len(layout.modalities), device=device)
    extra = _extra(model, dataset, layout, device)  # one more pass only with extra tasks
    return figures_from_predictions(variants, cfg=cfg, extra=extra), sums_from_predictions(
        variants, layout=layout, extra=extra
    )
