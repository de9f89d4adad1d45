"""Clinical figures from pooled histograms against exact computations on the raw scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedfuse.common.clinical import (
    bin_edges,
    calibration,
    clinical_evaluation,
    clinical_from_sums,
    histogram_average_precision,
    operating_point,
)
from fedfuse.common.evaluation import EvalLayout
from fedfuse.common.metrics import SCORE_BINS, auroc, score_bins


def _hists(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = score_bins(scores)
    return (
        np.bincount(b[labels], minlength=SCORE_BINS),
        np.bincount(b[~labels], minlength=SCORE_BINS),
    )


def _exact_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(-scores, kind="mergesort")
    y = labels[order]
    tp = np.cumsum(y)
    precision = tp / np.arange(1, len(y) + 1)
    return float(precision[y].sum() / y.sum())


def _scores(n: int, seed: int, *, separation: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    logits = rng.normal(0, 1.5, n) + separation * labels
    return 1 / (1 + np.exp(-logits)), labels


@pytest.mark.parametrize("seed,separation", [(0, 1.5), (1, 0.2), (2, 4.0)])
def test_histogram_figures_match_raw_scores_within_bounds(seed: int, separation: float) -> None:
    scores, labels = _scores(3000, seed, separation=separation)
    pos, neg = _hists(scores, labels)

    ap, ap_res = histogram_average_precision(pos, neg)
    assert abs(ap - _exact_ap(scores, labels)) <= ap_res + 1e-12
    assert ap_res < 0.01

    op = operating_point(pos, neg, target_sensitivity=0.9)
    pred = scores >= op.threshold  # the threshold is a bin edge: exact on raw scores
    sens = pred[labels].mean()
    spec = (~pred[~labels]).mean()
    assert op.sensitivity == pytest.approx(sens, abs=1e-12)
    assert op.specificity == pytest.approx(spec, abs=1e-12)
    assert op.sensitivity >= 0.9
    # the next threshold up would miss the target: the highest threshold meeting it
    assert (scores[labels] >= bin_edges()[op.bin + 1]).mean() < 0.9

    cal = calibration(pos, neg)
    edges = [b.lower for b in cal.bins] + [cal.bins[-1].upper]
    exact_ece = 0.0
    for b, lo, hi in zip(cal.bins, edges[:-1], edges[1:], strict=True):
        inside = (scores >= lo) & (scores < hi) if hi < 1 else scores >= lo
        assert b.records == int(inside.sum())
        if b.records:
            assert b.fraction_positive == pytest.approx(labels[inside].mean(), abs=1e-12)
            mean = scores[inside].mean()
            assert abs(b.mean_score - mean) <= b.mean_score_resolution + 1e-12
            exact_ece += inside.sum() / len(scores) * abs(mean - labels[inside].mean())
    assert abs(cal.ece - exact_ece) <= cal.ece_resolution + 1e-12
    assert [round(b.lower, 2) for b in cal.bins] == [k / 10 for k in range(10)]


def test_perfectly_calibrated_scores_have_small_ece_and_miscalibrated_large() -> None:
    rng = np.random.default_rng(3)
    scores = rng.random(20000)
    labels = rng.random(20000) < scores  # P(y=1 | s) = s
    good = calibration(*_hists(scores, labels))
    bad = calibration(*_hists(scores**3, labels))
    assert good.ece < 0.02
    assert bad.ece > 0.15


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_records() -> None:
    small = clinical_evaluation(*_hists(*_scores(300, 4, separation=1.5)))
    large = clinical_evaluation(*_hists(*_scores(30000, 4, separation=1.5)))
    for ev in (small, large):
        for name, value in [
            ("auroc", ev.auroc),
            ("average-precision", ev.average_precision),
            ("specificity", ev.operating.specificity),
            ("ece", ev.calibration.ece),
        ]:
            lo, hi = ev.intervals[name]
            assert lo <= value + 1e-9 and value - 1e-9 <= hi, name
    width = {n: hi - lo for n, (lo, hi) in small.intervals.items()}
    for name, (lo, hi) in large.intervals.items():
        assert hi - lo < width[name] / 3, name
    # exact AUROC of the raw scores sits in its interval
    scores, labels = _scores(30000, 4, separation=1.5)
    lo, hi = large.intervals["auroc"]
    assert lo <= auroc(labels, scores) <= hi


def test_from_sums_binary_and_multiclass_keys() -> None:
    layout = EvalLayout(tasks=("",), modalities=("image",), multi_label=False)
    scores, labels = _scores(500, 5, separation=2.0)
    total = np.zeros(layout.length, dtype=np.int64)
    pos, neg = _hists(scores, labels)
    at = layout.hist_offset(0, 0)
    total[at : at + SCORE_BINS], total[at + SCORE_BINS : at + 2 * SCORE_BINS] = pos, neg
    figures, diagrams = clinical_from_sums(total, layout)
    for key in (
        "eval-auroc-full-resolution",
        "eval-average-precision",
        "eval-sensitivity",
        "eval-specificity",
        "eval-threshold",
        "eval-ece",
        "eval-auroc-ci-low",
        "eval-ece-ci-high",
    ):
        assert math.isfinite(figures[key]), key
    assert list(diagrams) == [""] and len(diagrams[""]) == 10

    layout3 = EvalLayout(tasks=("a", "b", "c"), modalities=("image",), multi_label=False)
    total3 = np.zeros(layout3.length, dtype=np.int64)
    for t in range(3):
        at = layout3.hist_offset(0, t)
        total3[at : at + SCORE_BINS], total3[at + SCORE_BINS : at + 2 * SCORE_BINS] = pos, neg
    figures3, diagrams3 = clinical_from_sums(total3, layout3)
    assert figures3["eval-average-precision-a"] == figures["eval-average-precision"]
    assert figures3["eval-average-precision"] == pytest.approx(figures["eval-average-precision"])
    assert list(diagrams3) == ["a", "b", "c"]
    assert "eval-auroc-ci-low-a" in figures3 and "eval-auroc-ci-low" not in figures3
