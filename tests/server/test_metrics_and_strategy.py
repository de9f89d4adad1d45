import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedfuse.common.metrics import auroc
from fedfuse.server.strategy import aggregate_finite, check_update


def test_auroc_by_hand():
    # positives 0.9, 0.4 ; negatives 0.5, 0.1 -> pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert auroc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1])) == pytest.approx(0.75)
    assert auroc(np.array([1, 0]), np.array([0.3, 0.3])) == pytest.approx(0.5)  # tie = half
    assert auroc(np.array([1, 0, 1]), np.array([0.9, 0.1, 0.8])) == 1.0
    assert math.isnan(auroc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_check_update_rejects_nan_and_wrong_shape():
    ref = ArrayRecord({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    ok = ArrayRecord({"w": torch.ones(2, 3), "b": torch.ones(3)})
    assert check_update(ok, ref) is None
    nan = ArrayRecord({"w": torch.full((2, 3), float("nan")), "b": torch.ones(3)})
    assert "'w' contains NaN or Inf" in check_update(nan, ref)
    shape = ArrayRecord({"w": torch.ones(3, 2), "b": torch.ones(3)})
    assert "'w' has shape (3, 2), expected (2, 3)" in check_update(shape, ref)
    missing = ArrayRecord({"w": torch.ones(2, 3)})
    assert "missing ['b']" in check_update(missing, ref)


def test_aggregate_finite_skips_nan_sites():
    recs = [
        RecordDict({"m": MetricRecord({"num-examples": 10, "eval-auroc": 0.8, "eval-loss": 1.0})}),
        RecordDict(
            {"m": MetricRecord({"num-examples": 30, "eval-auroc": math.nan, "eval-loss": 3.0})}
        ),
    ]
    agg = aggregate_finite(recs, "num-examples")
    assert agg["eval-auroc"] == pytest.approx(0.8)
    assert agg["eval-loss"] == pytest.approx((10 * 1 + 30 * 3) / 40)
    assert agg["num-examples"] == 40
