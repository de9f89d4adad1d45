"""End to end: a federation over image + report + audio + tabular sites with 30% of records
missing a modality; then ``fedfuse explain`` on the run.

The federation runs in process (``engine="inprocess"``: the real ServerApp and ClientApp, each
message serialised as on the wire, the sites in turn): the claim is the fusion pipeline's, and
Ray's start-up and workers cost the suite about a minute here. Flower's engine stays covered by
test_e2e_simulation.py, test_e2e_pathvqa.py and the empirical audit's DP run."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.config import RunConfig
from fedfuse.common.data.synthetic import TABULAR_COLUMNS, TABULAR_RANGES, generate
from fedfuse.simulations.runner import simulate


@pytest.mark.e2e
@pytest.mark.slow
def test_four_modalities_with_missing_records(tmp_path):
    sites = generate(
        tmp_path / "data",
        sites=3,
        records=400,
        seed=21,
        modalities=("image", "report", "audio", "tabular"),
        missing_rate=0.3,
    )
    cfg = RunConfig(
        data_dir=str(tmp_path / "data"),
        out_dir=str(tmp_path / "runs"),
        run_name="mm",
        modalities="image,report,audio,tabular",
        tabular_columns=",".join(TABULAR_COLUMNS),
        tabular_ranges=TABULAR_RANGES,
        fusion="attention",
        # The CNN: this federation's figure above chance was measured with it (BENCHMARKS). With
        # the default `pool` it passed 3 of 3 runs but at 0.615, 0.572, 0.507 (issue 19, fourth
        # pass): too thin a margin to rely on. Its config is not planned (RunConfig directly).
        image_encoder="cnn",
        # Five rounds: round 1 is below chance (about 0.36: the sites' label priors come first),
        # then the AUROC rises each round. With 3 rounds it ended at 0.58, 0.63, 0.72 and once in
        # CI at 0.48; with 5 at 0.69, 0.70, 0.73 (BENCHMARKS, seventh pass).
        num_rounds=5,
        local_epochs=2,
        batch_size=128,
        target_epsilon=8.0,
    )
    run_dir = simulate(cfg, num_sites=3, engine="inprocess")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == cfg.num_rounds
    final = rounds[-1]
    assert final["eval-auroc"] > 0.5, final["eval-auroc"]  # above chance (see docs/BENCHMARKS.md)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert set(privacy["sites"]) == {"site-0", "site-1", "site-2"}
    for s in privacy["sites"].values():
        assert 0 < float(s["epsilon"]) <= cfg.target_epsilon + 1e-6
    # Contributions travelled as scalars and reached the summary.
    for m in ("image", "report", "audio", "tabular"):
        assert math.isfinite(final[f"eval-auroc-drop-{m}"])
        assert 0.0 <= final[f"eval-weight-{m}"] <= 1.0
    summary = (run_dir / "summary.md").read_text()
    assert "## Modality contributions" in summary and "| audio |" in summary

    result = CliRunner().invoke(app, ["explain", str(run_dir), "--data", str(sites[1])])
    assert result.exit_code == 0, result.output
    assert "fusion attention" in result.output
    for m in ("image", "report", "audio", "tabular"):
        assert m in result.output
