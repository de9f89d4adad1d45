"""A site that lacks a modality entirely (README's multimodal example): the run completes, as
every site sends the same evaluation vector; ``fedfuse explain`` says when a run failed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfuse.cli import app


@pytest.mark.e2e
def test_attention_with_a_site_lacking_audio_completes(tmp_path: Path) -> None:
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = runner.invoke(
            app,
            ["data", "synth", "--out", "data/mm", "--sites", "3", "--records", "90",
             "--modalities", "image,report,audio,tabular", "--missing-rate", "0.3",
             "--absent", "site-2:audio"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        res = runner.invoke(
            app,
            ["simulate", "--data", "data/mm", "--run-name", "mm-attention", "--rounds", "1",
             "--set", "modalities=image,report,audio,tabular",
             "--set", "tabular-columns=crp,wbc,temp",
             "--set", "tabular-ranges=crp=0:200,wbc=0:25,temp=35:41",
             "--set", "fusion=attention", "--set", "batch-size=128", "--set", "target-epsilon=inf",
             "--engine", "inprocess"],  # the claim is the apps', not Ray's: no Ray start-up
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        (row,) = [
            json.loads(x) for x in Path("runs/mm-attention/metrics.jsonl").read_text().splitlines()
        ]
        assert row["num-sites"] == 3 and row["eval-sites"] == 3
        # The pooled weight of audio comes from the two sites that have it.
        assert 0.0 < row["eval-weight-audio"] < 1.0 and math.isfinite(row["eval-auroc"])
        res = runner.invoke(app, ["explain", "runs/mm-attention", "--data", "data/mm/site-0"])
        assert res.exit_code == 0 and "the run" not in res.output, res.output

        # The same run marked failed: explain says so before its table.
        status = Path("runs/mm-attention/status.json")
        status.write_text(json.dumps({"status": "failed", "reason": "secure aggregation failed"}))
        res = runner.invoke(app, ["explain", "runs/mm-attention", "--data", "data/mm/site-0"])
        assert "the run failed (secure aggregation failed)" in res.output, res.output
    finally:
        os.chdir(cwd)
