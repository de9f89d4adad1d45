"""README commands that failed for a newcomer (issue 18): FedAdam, resources. (Client-level
DP: tests/cli/test_readme.py runs the README example and asserts that it learns.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedfuse.common.privacy.ledger import Ledger
from fedfuse.server.strategy import match_dtypes
from fedfuse.simulations.runner import check_resources, simulate

ROOT = Path(__file__).resolve().parents[2]


def _cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HOME": str(cwd),
    }
    return subprocess.run(
        [sys.executable, "-m", "fedfuse.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_server_optimiser_output_keeps_the_global_dtypes():
    # FedAdam's step is a numpy float64 scalar: under NumPy 2 it promotes float32 to float64.
    ref = ArrayRecord({"w": Array(np.zeros(3, np.float32)), "n": Array(np.arange(2))})
    promoted = np.float64(0.5) * np.ones(3, np.float32)
    assert promoted.dtype == np.float64
    out = match_dtypes(ArrayRecord({"w": Array(promoted), "n": Array(np.arange(2))}), ref)
    assert {k: v.dtype for k, v in out.items()} == {"w": "float32", "n": "int64"}
    np.testing.assert_array_equal(out["w"].numpy(), np.full(3, 0.5, np.float32))


@pytest.mark.e2e
def test_fedadam_runs_two_rounds_under_secagg(synth_sites, small_cfg, tmp_path):
    """`fedfuse simulate --set strategy=fedadam --set server-learning-rate=0.01` failed in
    round 2 ("dtype float32, expected float64") and charged every ledger for it."""
    data = tmp_path / "data"
    for s in synth_sites[:2]:
        shutil.copytree(s, data / s.name, ignore=shutil.ignore_patterns(".fedfuse"))
    cfg = small_cfg.replace(
        data_dir=str(data), strategy="fedadam", server_learning_rate=0.01, run_name="adam"
    )
    assert cfg.secagg
    # In process (no Ray start-up): the bug was in the strategy, not the engine, and every
    # message is serialised there as on the wire, where the dtype broke.
    run_dir = simulate(cfg, num_sites=2, engine="inprocess")
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["num-sites"] == 2 and not r.get("failed") for r in rounds), rounds
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert {str(v.dtype) for v in state.values() if v.is_floating_point()} == {"torch.float32"}
    for site in ("site-0", "site-1"):  # one ledger entry per round trained, none extra
        assert len(Ledger(data / site / ".fedfuse" / "ledger.sqlite").entries()) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gpu_share_without_a_gpu_runs_on_cpu_with_a_warning():
    gpus, notes = check_resources(cpus_per_site=1, gpus_per_site=0.25)
    assert gpus == 0.0
    assert len(notes) == 1 and "no GPU is visible" in notes[0] and "CPU" in notes[0]


def test_impossible_cpu_request_fails_at_once_in_one_line(tmp_path):
    """`--cpus-per-site` above the machine's CPUs made Ray wait forever ("ActorPool is empty")."""
    t0 = time.monotonic()
    res = _cli(["simulate", "--scenario", "smoke", "--cpus-per-site", "4096"], tmp_path, 60)
    assert res.returncode == 2
    assert time.monotonic() - t0 < 60
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--cpus-per-site 4096" in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert list(tmp_path.iterdir()) == []  # no data made, nothing started
