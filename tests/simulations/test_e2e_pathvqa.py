"""A DP federation on a small subset of real data (PathVQA), with the defaults and the plan."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedfuse.common.privacy.planning import ROUNDS

ROOT = Path(__file__).resolve().parents[2]
PATHVQA = ROOT.parent / "shared" / "data" / "pathvqa-yesno"
SITES, TRAIN, TEST = 3, 300, 200


def copy_subset(dst: Path) -> Path:
    """The first SITES site folders, TRAIN train and TEST test records each (seeded), with
    only the images those records use."""
    for i in range(SITES):
        src = PATHVQA / f"site-{i}"
        with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields, rows = list(reader.fieldnames or []), list(reader)
        rng = random.Random(i)
        keep = []
        for split, n in (("train", TRAIN), ("test", TEST)):
            rows_s = [r for r in rows if r["split"] == split]
            keep += rng.sample(rows_s, min(n, len(rows_s)))
        site = dst / src.name
        (site / "images").mkdir(parents=True)
        for image in {r["image"] for r in keep}:
            shutil.copyfile(src / image, site / image)
        with open(site / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(keep)
    return dst


@pytest.mark.e2e
@pytest.mark.slow
def test_dp_federation_on_real_data_learns(tmp_path):
    if not (PATHVQA / "site-0" / "manifest.csv").is_file():
        msg = f"PathVQA sites not found at {PATHVQA} (see its NOTICE.md)"
        print(f"skipped: {msg}")
        pytest.skip(msg)
    data = copy_subset(tmp_path / "pathvqa")
    out = tmp_path / "runs"
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    # The defaults a user gets, and the plan `fedfuse simulate --data` takes (epsilon 8).
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedfuse.cli",
            "simulate",
            "--data",
            str(data),
            "--epsilon",
            "8",
            "--out",
            str(out),
            "--run-name",
            "pathvqa",
            "--set",
            "classes=no,yes",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # About a minute on an idle 2-core machine; ten under a heavily shared one.
        timeout=1200,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # With --data, the plan (not the demo scenario) chooses the rounds.
    assert f"Plan: num-rounds {ROUNDS}," in res.stdout
    run_dir = out / "pathvqa"
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert all(0 < s["epsilon"] <= 8.0 for s in privacy["sites"].values())
    # Training loss stays at each site (.fedfuse/train.jsonl); the mean over sites falls.
    losses: dict[int, list[float]] = {}
    for site in sorted(p for p in data.iterdir() if p.is_dir()):
        for line in (site / ".fedfuse" / "train.jsonl").read_text().splitlines():
            row = json.loads(line)
            losses.setdefault(int(row["round"]), []).append(float(row["train-loss"]))
    mean = [sum(v) / len(v) for _, v in sorted(losses.items())]
    assert len(mean) == len(rounds) and mean[-1] < mean[0], mean
    from fedfuse.common.config import RunConfig
    from fedfuse.simulations.baseline import pooled_test_metrics

    cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    pooled = pooled_test_metrics(cfg, run_dir / "model.pt")
    print(f"pooled test AUROC {pooled['auroc']:.3f} after {len(rounds)} rounds")
    assert pooled["auroc"] > 0.70
    # Each site's own log says where it trained and how long its local epochs took; the
    # benchmark reads them (bench/real_data.py compares devices with it). They stay at the site.
    import torch

    from bench.real_data import site_epoch_time

    timing = site_epoch_time(data, "pathvqa", epochs=cfg.local_epochs)
    assert timing["device"] == ("cuda" if torch.cuda.is_available() else "cpu"), timing
    assert 0 < timing["epoch_seconds"] < 600, timing
    assert all("train-seconds" not in fig for r in rounds for fig in r["sites"].values())
