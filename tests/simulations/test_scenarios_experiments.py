"""Scenario presets parse; the experiment runner writes a CSV and valid PNGs (tiny grid)."""

import csv
import json
import math
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.errors import ConfigError
from fedfuse.simulations.scenarios import list_scenarios, load_scenario
from tests.support import inprocess
from tests.support.inprocess import patch_simulation


def test_every_scenario_parses():
    names = list_scenarios()
    assert {"smoke", "hospitals-3", "hospitals-10-noniid", "missing-modality", "large-100"} <= set(
        names
    )
    for name in names:
        scen = load_scenario(name)
        cfg = scen.run_config()
        assert scen.description
        assert scen.data.sites >= cfg.min_sites or cfg.fraction_train < 1
    large = load_scenario("large-100")
    assert large.data.sites == 100 and large.run_config().fraction_train == 0.1
    assert load_scenario("missing-modality").data.site_lacks == ("report", "image", "")


def test_unknown_keys_and_names_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="Unknown scenario 'nope'. Built-in: .*smoke"):
        load_scenario("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nsitez = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sitez'\]. Known keys: .*sites"):
        load_scenario(bad)
    bad.write_text("[run]\nnum-rounds = 0\n")
    with pytest.raises(ConfigError, match="'num-rounds' must be an integer >= 1"):
        load_scenario(bad)


def test_site_lacks_writes_sites_without_that_modality(tmp_path):
    from fedfuse.common.data.manifest import load_manifest
    from fedfuse.common.data.synthetic import generate

    paths = generate(
        tmp_path, sites=3, records=30, seed=1, absent={"site-0": ["report"], "site-1": ["image"]}
    )
    m0, m1, m2 = (load_manifest(p) for p in paths)
    assert m0.modalities_present()["report"] == 0 and m0.modalities_present()["image"] > 0
    assert m1.modalities_present()["image"] == 0 and m1.modalities_present()["report"] > 0
    assert min(m2.modalities_present()[k] for k in ("image", "report")) == len(m2.records)


@pytest.mark.e2e
def test_utility_vs_epsilon_tiny_grid_on_the_smoke_scenario(tmp_path, monkeypatch):
    """Runs the smoke scenario end to end twice (epsilon 2 and no DP) plus the baseline, through
    the command line, over the in-process grid (the sweep's logic is the claim here, not Ray's;
    Flower's engine runs in tests/simulations/test_e2e_simulation.py)."""
    out = tmp_path / "exp"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    patch_simulation(monkeypatch)
    before = len(inprocess.RUNS)
    res = CliRunner().invoke(
        app,
        [
            "experiment",
            "utility-vs-epsilon",
            "--scenario",
            "smoke",
            "--epsilons",
            "2,inf",
            "--seeds",
            "0",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output[-3000:] + repr(res.exception)
    assert len(inprocess.RUNS) == before + 2  # the two federations (the baseline is central)
    # Run N of M, with an estimate of what is left from the second run on.
    assert "run 1 of 3: centralised baseline, seed 0 (estimate after the first run)" in res.output
    assert re.search(r"run 3 of 3: epsilon inf, seed 0 \(about \d+ (s|min) left\)", res.output)
    rows = list(csv.DictReader((out / "utility_vs_epsilon.csv").open()))
    variants = [(r["variant"], float(r["epsilon"])) for r in rows]
    assert variants == [("centralised", math.inf), ("federated", 2.0), ("federated", math.inf)]
    for r in rows:
        assert 0.0 <= float(r["auroc"]) <= 1.0
    fed2 = rows[1]
    assert 0 < float(fed2["max_epsilon"]) <= 2.0
    assert rows[2]["max_epsilon"] == "inf"
    with Image.open(out / "utility_vs_epsilon.png") as im:
        im.verify()
        assert im.format == "PNG"
    for run, row in zip(("eps2-seed0", "epsinf-seed0"), rows[1:], strict=True):
        assert (out / "runs" / run / "learning_curve.png").exists()
        # auroc: the final model on the pooled test splits (the baseline's metric);
        # sites_auroc: the run's own report.
        last = json.loads((out / "runs" / run / "metrics.jsonl").read_text().splitlines()[-1])
        assert float(row["sites_auroc"]) == pytest.approx(last["eval-auroc"])
    assert (out / "runs" / "eps2-seed0" / "epsilon.png").exists()


def test_time_left_of_a_sweep():
    from fedfuse.simulations.experiments import time_left

    assert time_left([], 3) == "estimate after the first run"
    assert time_left([20.0, 40.0], 2) == "about 60 s left"
    assert time_left([100.0, 140.0], 3) == "about 6 min left"
    assert time_left([5.0], 0) == "done"
