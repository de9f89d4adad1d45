"""Extra task heads: label.<task> columns, the masked weighted loss, per-task evaluation sums."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import load_site
from fedfuse.common.errors import ConfigError, DataValidationError
from fedfuse.common.evaluation import EvalLayout, decode_sums, eval_sums, evaluate_site
from fedfuse.common.metrics import SCORE_BINS
from fedfuse.common.models import build_model
from fedfuse.common.models.multitask import AllTasks, MultiTaskLoss
from tests.support.broken_sites import write_good_site


def _cfg(**kw) -> RunConfig:
    base = dict(
        modalities="image,report",
        image_size=16,
        tasks="view=ap|pa,grade=low|mid|high",
        task_weights="grade=0.5",
    )
    base.update(kw)
    return RunConfig(**base)


def _add_task_columns(site, cells: dict[str, list[str]]) -> None:
    path = site / "manifest.csv"
    rows = list(csv.DictReader(path.open()))
    for col, values in cells.items():
        for r, v in zip(rows, values, strict=False):
            r[col] = v
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_config_parses_tasks_and_rejects_bad_ones():
    cfg = _cfg()
    assert cfg.task_classes == {"view": ("ap", "pa"), "grade": ("low", "mid", "high")}
    assert cfg.task_weight_map == {"view": 1.0, "grade": 0.5}
    with pytest.raises(ConfigError, match="name=class|class"):
        _cfg(tasks="view=ap")
    with pytest.raises(ConfigError, match="not in 'tasks'"):
        _cfg(task_weights="other=1")
    with pytest.raises(ConfigError, match="single-label main task"):
        _cfg(task="multi-label")


def test_manifest_reads_task_columns_and_names_the_bad_row(tmp_path):
    site = write_good_site(tmp_path / "s")
    n = len(list(csv.DictReader((site / "manifest.csv").open())))
    _add_task_columns(site, {"label.view": ["ap", "", "pa"] + ["ap"] * (n - 3)})
    cfg = _cfg(tasks="view=ap|pa", task_weights="")
    manifest, data = load_site(site, cfg)
    assert [r.task_labels for r in manifest.records[:3]] == [{"view": "ap"}, {}, {"view": "pa"}]
    split = data["train"]
    y = split.with_task_labels()[0][-1]
    assert y.shape == (2,) and y[0] == split[0][-1]
    _add_task_columns(site, {"label.view": ["ap", "lateral"]})
    with pytest.raises(DataValidationError) as bad:
        load_site(site, cfg)
    assert "manifest.csv:3: label.view: unknown label 'lateral'" in str(bad.value)


def test_loss_is_per_record_weighted_and_masked():
    cfg = _cfg()
    loss = MultiTaskLoss(cfg, reduction="none")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2 + 2 + 3, generator=gen)
    target = torch.tensor([[1, 0, 2], [0, -1, -1], [1, 1, -1]])
    ce = torch.nn.functional.cross_entropy
    expected = torch.stack(
        [
            ce(logits[0, :2], target[0, 0]) + ce(logits[0, 2:4], target[0, 1])
            + 0.5 * ce(logits[0, 4:], target[0, 2]),
            ce(logits[1, :2], target[1, 0]),  # lacks both extra labels: main task only
            ce(logits[2, :2], target[2, 0]) + ce(logits[2, 2:4], target[2, 1]),
        ]
    )  # fmt: skip
    assert torch.allclose(loss(logits, target), expected, atol=1e-6)
    model = build_model(cfg)
    out = AllTasks(model)(torch.ones(3, 2), torch.zeros(3, 1, 16, 16), torch.ones(3, 8).long())
    assert out.shape == (3, 7)
    assert torch.equal(out[:, :2], model(torch.ones(3, 2), torch.zeros(3, 1, 16, 16),
                                         torch.ones(3, 8).long()))  # fmt: skip


def test_eval_vector_carries_per_task_sums(tmp_path):
    site = write_good_site(tmp_path / "s")
    n = len(list(csv.DictReader((site / "manifest.csv").open())))
    _add_task_columns(site, {"label.view": ["ap", "pa", ""] * n})
    cfg = _cfg(tasks="view=ap|pa", task_weights="")
    _, data = load_site(site, cfg)
    test = data["test"]
    layout = EvalLayout.for_config(cfg)
    plain = EvalLayout.for_config(cfg.replace(tasks=""))
    assert layout.length == plain.length + 3 + 2 * SCORE_BINS
    model = build_model(cfg)
    vec = eval_sums(model, test, layout=layout, device=torch.device("cpu"))
    labelled = sum(1 for r in test.records if r.task_labels)
    at = layout.extra_offset
    assert vec[at] == labelled and 0 <= vec[at + 1] <= labelled
    assert vec[at + 3 :].sum() == labelled  # one histogram entry per labelled record
    # The main task's part is what a run without extra tasks sends.
    main = eval_sums(model, test, layout=plain, device=torch.device("cpu"))
    assert np.array_equal(vec[: plain.length], main)
    figures = decode_sums(vec, layout)
    assert figures["eval-records-task-view"] == labelled
    assert 0 <= figures["eval-auroc-task-view"] <= 1 or math.isnan(figures["eval-auroc-task-view"])
    own = evaluate_site(model, test, cfg=cfg, device=torch.device("cpu"))
    assert own["eval-records-task-view"] == labelled
    assert own["eval-accuracy-task-view"] == figures["eval-accuracy-task-view"]
