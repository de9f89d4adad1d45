"""Multi-label tasks: a|b labels, multi-hot targets, sigmoid loss with Opacus, per-class AUROC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfuse.client.training import train_round
from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import LabelEncoder, load_site
from fedfuse.common.data.manifest import load_manifest
from fedfuse.common.errors import DataValidationError
from fedfuse.common.evaluation import evaluate_site
from fedfuse.common.metrics import Predictions, auroc, scores
from fedfuse.common.models import build_model
from fedfuse.common.privacy.planning import plan_site_privacy
from tests.support.mmutil import write_manifest

CLASSES = "effusion,nodule,cardiomegaly"


def test_single_label_task_rejects_several_labels_multi_label_accepts(tmp_path):
    site = write_manifest(
        tmp_path / "s",
        [
            {"id": "1", "report": "x", "label": "effusion|nodule"},
            {"id": "2", "report": "y", "label": "nodule| nodule"},  # duplicates collapse
            {"id": "3", "report": "z", "label": "effusion|fracture"},
        ],
        ["id", "report", "label"],
    )
    classes = tuple(CLASSES.split(","))
    with pytest.raises(DataValidationError) as exc:
        load_manifest(site, classes=classes, multi_label=False)
    assert exc.value.problems == [
        "manifest.csv:2: label: 'effusion|nodule' has several labels but the task is "
        "single-label (set task=multi-label for a|b labels)",
        "manifest.csv:4: label: 'effusion|fracture' has several labels but the task is "
        "single-label (set task=multi-label for a|b labels)",
        "manifest.csv:4: label: unknown label 'fracture' (known: effusion, nodule, cardiomegaly)",
    ]
    with pytest.raises(DataValidationError) as exc:
        load_manifest(site, classes=classes, multi_label=True)
    assert len(exc.value.problems) == 1 and "fracture" in exc.value.problems[0]


def test_label_encoder():
    enc = LabelEncoder(("a", "b", "c"), multi_label=True)
    assert enc(("c", "a")).tolist() == [1.0, 0.0, 1.0]
    assert LabelEncoder(("a", "b", "c"), multi_label=False)(("b",)).item() == 1


def test_per_class_auroc_by_hand():
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float32)
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0], [3.0, -1.0], [0.0, 2.0]])
    pred = Predictions(y, logits, torch.ones(4, 1), None)
    out = scores(pred, multi_label=True, class_names=("a", "b"))
    # class a: positives score 2, 3; negatives 1, 0 -> perfectly ranked
    assert out["auroc-a"] == 1.0
    # class b: positives 1, -1; negatives 0, 2 -> pairs (1>0 yes, 1>2 no, -1>0 no, -1>2 no)
    assert out["auroc-b"] == 0.25
    assert out["auroc"] == pytest.approx(0.625)
    # per-label accuracy at p >= 0.5 (logit >= 0): a right on 2 of 4, b on 1 of 4
    assert out["accuracy"] == pytest.approx(3 / 8)
    assert math.isnan(auroc(np.array([1, 1]), np.array([0.1, 0.2])))  # one class only


def test_undefined_class_auroc_is_nan_and_left_out_of_the_mean():
    y = torch.tensor([[1, 0], [0, 0]], dtype=torch.float32)
    pred = Predictions(y, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2, 1), None)
    out = scores(pred, multi_label=True, class_names=("a", "b"))
    assert math.isnan(out["auroc-b"]) and out["auroc"] == 1.0


def _multilabel_site(tmp_path, n=120, seed=0):
    """Three labs; each class is present when its own lab value is high (several at once)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        flags = rng.random(3) < 0.4
        labs = rng.normal(0, 1, 3) + 2.5 * flags
        labels = [c for c, f in zip(CLASSES.split(","), flags, strict=True) if f] or ["effusion"]
        rows.append(
            {
                "id": f"r{i}",
                "tab.x": f"{labs[0]:.3f}",
                "tab.y": f"{labs[1]:.3f}",
                "tab.z": f"{labs[2]:.3f}",
                "label": "|".join(labels),
                "split": "train" if i < 90 else "test",
            }
        )
    return write_manifest(
        tmp_path / "ml", rows, ["id", "tab.x", "tab.y", "tab.z", "label", "split"]
    )


@pytest.mark.parametrize("private", [True, False])
def test_multilabel_training_with_opacus_and_per_class_metrics(tmp_path, private):
    cfg = RunConfig(
        modalities="tabular",
        tabular_columns="x,y,z",
        tabular_ranges="x=-3:6,y=-3:6,z=-3:6",
        classes=CLASSES,
        task="multi-label",
        fusion="gated",
        batch_size=32,
        local_epochs=2,
        num_rounds=1,
        learning_rate=0.05,
        target_epsilon=8.0 if private else math.inf,
    )
    _, ds = load_site(_multilabel_site(tmp_path), cfg)
    assert ds["train"][0][-1].shape == (3,) and ds["train"][0][-1].dtype == torch.float32
    model = build_model(cfg)
    plan = plan_site_privacy(cfg=cfg, num_train=len(ds["train"])) if private else None
    res = train_round(
        model, ds["train"], cfg=cfg, plan=plan, history=[], seed=1, device=torch.device("cpu")
    )
    assert math.isfinite(res.train_loss)
    assert (res.epsilon <= cfg.target_epsilon + 1e-6) if private else math.isinf(res.epsilon)
    out = evaluate_site(model, ds["test"], cfg=cfg, device=torch.device("cpu"))
    for c in CLASSES.split(","):
        assert f"eval-auroc-{c}" in out
    assert out["num-examples"] == 30 and 0.0 <= out["eval-auroc"] <= 1.0
