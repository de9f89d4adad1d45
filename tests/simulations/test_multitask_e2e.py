"""End to end: two tasks on shared encoders, one site without the second task's labels, DP."""

from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.config import RunConfig
from fedfuse.common.data.manifest import stable_split
from fedfuse.common.data.synthetic import _SYMPTOMS_POS, generate
from fedfuse.common.explain import explain_run
from fedfuse.common.privacy.planning import plan_learning_rate
from fedfuse.simulations.runner import simulate


def _label_symptoms(site) -> None:
    """label.symptoms = whether the note reports symptoms (a second task, from the text)."""
    path = site / "manifest.csv"
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        r["label.symptoms"] = "yes" if any(p in r["report"] for p in _SYMPTOMS_POS) else "no"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.e2e
def test_two_tasks_one_site_lacking_the_second(tmp_path):
    sites = generate(tmp_path / "data", sites=2, records=400, seed=3, image_size=16)
    _label_symptoms(sites[0])  # site-1 has no label.symptoms column at all
    cfg = RunConfig(
        data_dir=str(tmp_path / "data"),
        out_dir=str(tmp_path / "runs"),
        run_name="mt",
        image_size=16,
        tasks="symptoms=no|yes",
        task_weights="symptoms=1",
        num_rounds=2,
        local_epochs=2,
        batch_size=64,
        target_epsilon=8.0,
        # The rate `fedfuse plan` gives sites this small (about 320 training records): at
        # RunConfig's 0.1 (the rate for 2,048+ records) the report was unlearned in one CI run
        # (docs/BENCHMARKS.md, the demo's fourth pass: Adam 0.1 on small sites).
        learning_rate=plan_learning_rate(320),
    )
    run_dir = simulate(cfg, num_sites=2, engine="inprocess")  # the apps' claim: no Ray needed
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = rounds[-1]
    assert final["eval-auroc"] > 0.5, final["eval-auroc"]
    assert final["eval-auroc-task-symptoms"] > 0.5, final["eval-auroc-task-symptoms"]
    # Exactly site-0's test records carry the second task's label.
    rows = list(csv.DictReader((sites[0] / "manifest.csv").open()))
    site0_test = sum(1 for r in rows if stable_split(r["id"], cfg.seed) == "test")
    assert final["eval-records-task-symptoms"] == site0_test < final["eval-records"]
    print({k: v for k, v in final.items() if "auroc" in k and "without" not in k})
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert set(privacy["sites"]) == {"site-0", "site-1"}
    for s in privacy["sites"].values():
        assert 0 < float(s["epsilon"]) <= cfg.target_epsilon + 1e-6
    summary = (run_dir / "summary.md").read_text()
    assert "## Tasks" in summary and "| symptoms |" in summary
    # fedfuse explain: per-task figures over the records labelled for the task.
    _, report = explain_run(run_dir, sites[0])
    task = report["tasks"]["symptoms"]
    assert task["records"] == site0_test
    assert task["auroc"] > 0.5, task
    # The task's label is in the note: hiding the report must cost it more than the image.
    drop = {m: task["auroc"] - a for m, a in task["auroc-without"].items()}
    assert drop["report"] > drop["image"], drop
    _, report1 = explain_run(run_dir, sites[1])  # no label.symptoms column at site-1
    assert report1["tasks"]["symptoms"]["records"] == 0
    assert math.isnan(report1["tasks"]["symptoms"]["auroc"])
    result = CliRunner().invoke(app, ["explain", str(run_dir), "--data", str(sites[0])])
    assert result.exit_code == 0, result.output
    assert "Tasks" in result.output and "symptoms" in result.output
    assert f"{task['auroc']:.4f}" in result.output
