"""`fedfuse simulate --engine inprocess`: the whole federation (SecAgg+, DP, the sites' ledgers)
in one process without Ray, and what it writes is a run like the simulation engine's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.simulations.runner import simulate

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter in which Ray cannot be imported (as where it is not installed).
_RUN = """
import json, sys
sys.modules["ray"] = None  # `import ray` now raises ImportError
from pathlib import Path
from fedfuse.common.config import RunConfig
from fedfuse.common.data.synthetic import generate
from fedfuse.simulations.runner import simulate

tmp = Path(sys.argv[1])
generate(tmp / "data", sites=2, records=80, seed=4)
cfg = RunConfig(
    data_dir=str(tmp / "data"), out_dir=str(tmp / "runs"), run_name="inprocess",
    num_rounds=2, local_epochs=1, batch_size=64, target_epsilon=4.0,
)
run_dir = simulate(cfg, num_sites=2, engine="inprocess")
print(json.dumps({"run-dir": str(run_dir), "ray": sys.modules["ray"] is not None}))
"""


@pytest.mark.e2e
def test_the_inprocess_engine_runs_a_private_secure_federation_without_ray(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ray"] is False  # Ray could not be imported, and the run completed
    run_dir = Path(out["run-dir"])
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["secagg"] and set(r["sites"]) == {"site-0", "site-1"} for r in rounds)
    assert 0.0 <= rounds[-1]["eval-auroc"] <= 1.0
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert all(0 < s["epsilon"] <= 4.0 for s in privacy["sites"].values())
    for site in ("site-0", "site-1"):  # each site's ledger holds one entry per round
        assert (tmp_path / "data" / site / ".fedfuse" / "ledger.sqlite").is_file()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_an_unknown_engine_is_refused_before_anything_runs(tmp_path: Path) -> None:
    cfg = RunConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="engine 'threads' is not one of: simulation, inprocess"):
        simulate(cfg, num_sites=2, engine="threads")
    assert not (tmp_path / "runs").exists()
