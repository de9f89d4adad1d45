"""Clinical evaluation from pooled score histograms: average precision, an operating point,
calibration, and bootstrap confidence intervals.

Everything here is computed by the server from the securely aggregated evaluation sums
(:mod:`fedfuse.common.evaluation`): per class, a histogram of the positive records' scores and
one of the negative records' scores over the public binning of
:func:`fedfuse.common.metrics.score_bins`. It is post-processing of the released sum, so it
spends no privacy. Each figure comes with a resolution bound: how far it can be from the same
figure computed on the raw scores, given only which bin each score fell in.

The operating point is chosen on the same pooled histograms the figures are computed on (the
sites' evaluation split): its sensitivity is at least the target by construction, so quote
the specificity at it, not the sensitivity, as the honest figure of merit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import digamma

from fedfuse.common.metrics import LOGIT_RANGE, LOGIT_SCALE, SCORE_BINS, histogram_auroc

# The default operating point: the highest threshold whose sensitivity is at least 0.90 (a
# screening setting: missing a positive costs more than a false alarm).
SENSITIVITY_TARGET = 0.90
RELIABILITY_BINS = 10
BOOTSTRAP_RESAMPLES = 200
# Public seed: the bootstrap resamples released, aggregated counts, so its randomness guards
# nothing; fixing it makes a run's figures reproducible from its sums.
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def bin_edges(bins: int = SCORE_BINS) -> np.ndarray:
    """Probability edges of the score bins (``bins + 1`` values from 0 to 1): a score ``p``
    falls in bin ``i`` of :func:`fedfuse.common.metrics.score_bins` iff
    ``edges[i] <= p < edges[i + 1]`` (up to rounding at an edge)."""
    top = np.arcsinh(LOGIT_RANGE / LOGIT_SCALE)
    z = -top + 2 * top * np.arange(bins + 1) / bins
    logit = LOGIT_SCALE * np.sinh(z)
    edges = 1.0 / (1.0 + np.exp(-logit))
    # The end bins hold everything clipped to the logit range.
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def _harmonic_gap(c: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``sum_{j=1..p} 1 / (c + j)`` elementwise (via the digamma function)."""
    return digamma(c + p + 1) - digamma(c + 1)


def histogram_average_precision(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(average precision, resolution) from score histograms over the same ordered bins.

    Average precision is the mean, over positive records, of the precision at that record's
    rank (scores descending). Inside one bin the order is unknown: the j-th positive of a bin
    with ``n`` negatives, below ``tp`` positives and ``fp`` negatives of higher bins, has
    precision between ``(tp + j) / (tp + fp + n + j)`` (every negative of the bin first) and
    ``(tp + j) / (tp + fp + j)`` (every negative last). The figure is the midpoint of the two
    resulting bounds and the resolution half their gap, so the raw scores' average precision
    lies within the resolution of it. NaN (and 0) without positives.
    """
    lower, upper = _ap_bounds(np.asarray(pos, np.float64), np.asarray(neg, np.float64))
    if math.isnan(lower):
        return math.nan, 0.0
    return (lower + upper) / 2, (upper - lower) / 2


def _ap_bounds(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    n_pos = pos.sum()
    if n_pos == 0:
        return math.nan, math.nan
    p, n = pos[::-1], neg[::-1]  # highest scores first
    tp = np.cumsum(p) - p  # positives in strictly higher bins
    fp = np.cumsum(n) - n
    # sum_j (a + j) / (c + j) = p - (c - a) * sum_j 1 / (c + j)
    upper = p - fp * _harmonic_gap(tp + fp, p)
    lower = p - (fp + n) * _harmonic_gap(tp + fp + n, p)
    return float(lower.sum() / n_pos), float(upper.sum() / n_pos)


@dataclass(frozen=True)
class OperatingPoint:
    """Predict positive iff the score is at least ``threshold`` (a bin edge, so sensitivity
    and specificity here are exactly those of the raw scores)."""

    target_sensitivity: float
    bin: int  # the lowest bin predicted positive
    threshold: float
    # Width of the bin below the threshold: the threshold cannot be placed more finely.
    threshold_resolution: float
    sensitivity: float
    specificity: float


def operating_point(
    pos: np.ndarray, neg: np.ndarray, *, target_sensitivity: float = SENSITIVITY_TARGET
) -> OperatingPoint:
    """The highest bin-edge threshold whose sensitivity is at least ``target_sensitivity``."""
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1]. Found {target_sensitivity}")
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    edges = bin_edges(len(pos))
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0:
        return OperatingPoint(target_sensitivity, 0, 0.0, 0.0, math.nan, math.nan)
    tp_at = np.cumsum(pos[::-1])[::-1]  # positives scored in bin b or above
    fp_at = np.cumsum(neg[::-1])[::-1]
    # tp_at falls as b rises: the last bin still meeting the target (allowing rounding).
    ok = np.nonzero(tp_at >= target_sensitivity * n_pos - 1e-9)[0]
    b = int(ok[-1])
    spec = float((n_neg - fp_at[b]) / n_neg) if n_neg else math.nan
    width = float(edges[b] - edges[b - 1]) if b > 0 else 0.0
    return OperatingPoint(
        target_sensitivity, b, float(edges[b]), width, float(tp_at[b] / n_pos), spec
    )


def sensitivity_specificity(pos: np.ndarray, neg: np.ndarray, b: int) -> tuple[float, float]:
    """Sensitivity and specificity when bins ``b`` and above are predicted positive."""
    n_pos, n_neg = pos.sum(), neg.sum()
    sens = float(pos[b:].sum() / n_pos) if n_pos else math.nan
    spec = float(neg[:b].sum() / n_neg) if n_neg else math.nan
    return sens, spec


@dataclass(frozen=True)
class ReliabilityBin:
    """One bar of a reliability diagram: the records scored in ``[lower, upper)``."""

    lower: float
    upper: float
    records: int
    mean_score: float  # NaN for an empty bin
    # How far the raw scores' mean can be from ``mean_score`` (scores known to their bin).
    mean_score_resolution: float
    fraction_positive: float  # exact: membership is exact at bin edges


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error over ``bins`` (record-weighted mean of
    ``|mean score - fraction positive|``), with its resolution bound."""

    ece: float
    ece_resolution: float
    bins: tuple[ReliabilityBin, ...]


def _groups(edges: np.ndarray, count: int) -> np.ndarray:
    """Reliability bin of each score bin: by its lower edge, in ``count`` equal-width bins."""
    return np.minimum((edges[:-1] * count).astype(np.int64), count - 1)


def calibration(pos: np.ndarray, neg: np.ndarray, *, bins: int = RELIABILITY_BINS) -> Calibration:
    """Reliability diagram and ECE of the positive-class score.

    The diagram's bins are unions of score bins (split where a score bin's lower edge crosses
    ``k / bins``), so which records fall in each is exact; each score is taken at the midpoint
    of its score bin, off by at most half that bin's width.
    """
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    edges = bin_edges(len(pos))
    mid = (edges[:-1] + edges[1:]) / 2
    half = (edges[1:] - edges[:-1]) / 2
    group = _groups(edges, bins)
    count = pos + neg
    total = count.sum()
    out: list[ReliabilityBin] = []
    ece = res = 0.0
    for g in range(bins):
        members = np.nonzero(group == g)[0]
        if members.size == 0:
            continue
        n = count[members].sum()
        lo, hi = float(edges[members[0]]), float(edges[members[-1] + 1])
        if n == 0:
            out.append(ReliabilityBin(lo, hi, 0, math.nan, 0.0, math.nan))
            continue
        mean = float((count[members] * mid[members]).sum() / n)
        bound = float((count[members] * half[members]).sum() / n)
        frac = float(pos[members].sum() / n)
        out.append(ReliabilityBin(lo, hi, int(n), mean, bound, frac))
        ece += n / total * abs(mean - frac)
        res += n / total * bound
    if total == 0:
        return Calibration(math.nan, 0.0, tuple(out))
    return Calibration(float(ece), float(res), tuple(out))


def bootstrap_intervals(
    pos: np.ndarray,
    neg: np.ndarray,
    *,
    threshold_bin: int,
    rng: np.random.Generator,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    reliability_bins: int = RELIABILITY_BINS,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for AUROC, average precision, sensitivity and
    specificity at the fixed threshold, and ECE: the pooled (positive, negative) bin counts are
    resampled multinomially with their total fixed. Records are treated as independent; the
    clustering of records by site is not modelled (the sums do not say which site sent what).
    """
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    names = ("auroc", "average-precision", "sensitivity", "specificity", "ece")
    if pos.sum() == 0 or neg.sum() == 0:
        return {n: (math.nan, math.nan) for n in names}
    edges = bin_edges(len(pos))
    # Empty bins stay empty in every resample: drop them, keeping the bins' order.
    used = np.nonzero(pos + neg)[0]
    mid = ((edges[:-1] + edges[1:]) / 2)[used]
    onehot = np.eye(reliability_bins)[_groups(edges, reliability_bins)[used]]  # (k, bins)
    threshold_bin = int((used < threshold_bin).sum())
    pos, neg = pos[used], neg[used]
    k = len(used)
    counts = np.concatenate([pos, neg])
    total = int(counts.sum())
    draws = rng.multinomial(total, counts / total, size=resamples).astype(np.float64)
    # Every figure for all resamples at once (rows), as the point estimates compute them.
    p, q = draws[:, :k], draws[:, k:]
    n_pos, n_neg = p.sum(1), q.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.cumsum(q, axis=1) - q
        auc = (p * (below + q / 2)).sum(1) / (n_pos * n_neg)
        pr, qr = p[:, ::-1], q[:, ::-1]
        tp = np.cumsum(pr, axis=1) - pr
        fp = np.cumsum(qr, axis=1) - qr
        upper = (pr - fp * _harmonic_gap(tp + fp, pr)).sum(1)
        lower = (pr - (fp + qr) * _harmonic_gap(tp + fp + qr, pr)).sum(1)
        ap = (upper + lower) / 2 / n_pos
        sens = p[:, threshold_bin:].sum(1) / n_pos
        spec = q[:, :threshold_bin].sum(1) / n_neg
        ece = np.abs((p + q) * mid @ onehot - p @ onehot).sum(1) / (n_pos + n_neg)
    values = {
        "auroc": auc,
        "average-precision": ap,
        "sensitivity": sens,
        "specificity": spec,
        "ece": ece,
    }
    tail = (1 - confidence) / 2 * 100
    out = {}
    for n, xs in values.items():
        arr = xs[np.isfinite(xs)]
        out[n] = (
            (float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail)))
            if arr.size
            else (math.nan, math.nan)
        )
    return out


@dataclass(frozen=True)
class ClinicalEvaluation:
    """The clinical figures of one task (a class, one-vs-rest; or the positive class)."""

    auroc: float
    auroc_resolution: float
    average_precision: float
    average_precision_resolution: float
    operating: OperatingPoint
    calibration: Calibration
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """Flat ``eval-*`` figures (without a class suffix)."""
        op, cal = self.operating, self.calibration
        out = {
            # The AUROC's own bound (every modality present); eval-auroc-resolution is the
            # coarsest over the modality-hidden variants too.
            "eval-auroc-full-resolution": self.auroc_resolution,
            "eval-average-precision": self.average_precision,
            "eval-average-precision-resolution": self.average_precision_resolution,
            "eval-sensitivity-target": op.target_sensitivity,
            "eval-threshold": op.threshold,
            "eval-threshold-resolution": op.threshold_resolution,
            "eval-sensitivity": op.sensitivity,
            "eval-specificity": op.specificity,
            "eval-ece": cal.ece,
            "eval-ece-resolution": cal.ece_resolution,
        }
        for name, (lo, hi) in self.intervals.items():
            out[f"eval-{name}-ci-low"] = lo
            out[f"eval-{name}-ci-high"] = hi
        return out


def clinical_evaluation(
    pos: np.ndarray,
    neg: np.ndarray,
    *,
    target_sensitivity: float = SENSITIVITY_TARGET,
    rng: np.random.Generator | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> ClinicalEvaluation:
    """Every clinical figure of one task from its positive and negative score histograms."""
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    auc, auc_res = histogram_auroc(pos, neg)
    ap, ap_res = histogram_average_precision(pos, neg)
    op = operating_point(pos, neg, target_sensitivity=target_sensitivity)
    cal = calibration(pos, neg)
    rng = rng if rng is not None else np.random.default_rng(BOOTSTRAP_SEED)
    intervals = bootstrap_intervals(pos, neg, threshold_bin=op.bin, rng=rng, resamples=resamples)
    return ClinicalEvaluation(auc, auc_res, ap, ap_res, op, cal, intervals)


def clinical_from_sums(
    total: np.ndarray, layout: Any, *, target_sensitivity: float = SENSITIVITY_TARGET
) -> tuple[dict[str, float], dict[str, Any]]:
    """Clinical figures from the summed evaluation vector (``fedfuse.common.evaluation``).

    Returns the flat ``eval-*`` figures (for two classes the positive class's; otherwise per
    class with a ``-<class>`` suffix, and unsuffixed their macro mean, with the worst class's
    resolution, but no macro interval or threshold) and the reliability diagram(s) as
    ``{task: [bin, ...]}`` (task ``""`` for two classes).
    """
    total = np.asarray(total, dtype=np.int64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    per: dict[str, ClinicalEvaluation] = {}
    for t, name in enumerate(layout.tasks):
        at = layout.hist_offset(0, t)
        pos = total[at : at + layout.bins]
        neg = total[at + layout.bins : at + 2 * layout.bins]
        per[name] = clinical_evaluation(pos, neg, target_sensitivity=target_sensitivity, rng=rng)
    diagrams = {name: [vars(b) for b in ev.calibration.bins] for name, ev in per.items()}
    if len(per) == 1:
        return next(iter(per.values())).figures(), diagrams
    out: dict[str, float] = {}
    rows = {name: ev.figures() for name, ev in per.items()}
    for name, fig in rows.items():
        for key, v in fig.items():
            out[f"{key}-{name}"] = v
    for key in next(iter(rows.values())):
        # No macro interval (the classes' resamples were drawn apart) and no macro threshold.
        if "-ci-" in key or key.startswith("eval-threshold"):
            continue
        xs = [fig[key] for fig in rows.values() if not math.isnan(fig[key])]
        if not xs:
            out[key] = math.nan
        elif key.endswith("-resolution"):
            out[key] = float(max(xs))
        else:
            out[key] = float(np.mean(xs))
    return out, diagrams


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else "-"


POOLED_SOURCE = (
    "the pooled score histograms of the sites' evaluation splits (the sum the server receives)"
)


def clinical_markdown(
    record: dict[str, Any],
    *,
    heading: str = "Clinical evaluation (last round)",
    source: str = POOLED_SOURCE,
) -> list[str]:
    """summary.md lines for the clinical figures of a round record (none if it has none);
    ``source`` says whose score histograms they come from."""
    if "eval-average-precision" not in record:
        return []

    def row(label: str, key: str, bound: str | None) -> str:
        lo, hi = record.get(f"{key}-ci-low"), record.get(f"{key}-ci-high")
        ci = f"{_fmt(lo)} – {_fmt(hi)}" if lo is not None else "-"
        res = _fmt(record.get(bound)) if bound else "exact"
        return f"| {label} | {_fmt(record.get(key))} | {ci} | {res} |"

    target = record.get("eval-sensitivity-target", SENSITIVITY_TARGET)
    return [
        "",
        f"## {heading}",
        "",
        f"From {source}. Operating point: the highest threshold "
        f"({_fmt(record.get('eval-threshold'))}) giving at least {target:g} sensitivity, "
        "chosen on those same records, so its sensitivity is met by "
        "construction; the specificity there is the figure to quote. 95% intervals: "
        f"percentile bootstrap ({BOOTSTRAP_RESAMPLES} multinomial resamples of the "
        "counts, records treated as independent). Resolution: how far the figure can be from "
        "the raw scores' own, given only each score's bin.",
        "",
        "| figure | value | 95% interval | resolution |",
        "|---|---|---|---|",
        row("AUROC", "eval-auroc", "eval-auroc-full-resolution"),
        row("average precision", "eval-average-precision", "eval-average-precision-resolution"),
        row("sensitivity at threshold", "eval-sensitivity", None),
        row("specificity at threshold", "eval-specificity", None),
        row("expected calibration error", "eval-ece", "eval-ece-resolution"),
    ]
