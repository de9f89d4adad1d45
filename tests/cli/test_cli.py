"""The `fedfuse` command as a user runs it (a real subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.sites import copy_site

FEDFUSE = [sys.executable, "-m", "fedfuse.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run(args, cwd, timeout=120):
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HOME": str(cwd),
    }
    return subprocess.run(
        FEDFUSE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--epsilon", "0"], ["--epsilon", "(0, inf]"]),
        (["--epsilon", "-1"], ["--epsilon", "(0, inf]"]),
        (["--delta", "1"], ["--delta", "(0, 1)"]),
        (["--delta", "0"], ["--delta", "(0, 1)"]),
        (["--sites", "0"], ["--sites", "x>=1"]),
        (["--rounds", "0"], ["--rounds", "x>=1"]),
        (["--set", "nonsense-key=1"], ["Unknown config key", "nonsense-key"]),
        (["--engine", "threads"], ["--engine must be one of: simulation, inprocess"]),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(tmp_path, args, needles):
    res = run(["simulate", *args], tmp_path)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    for n in needles:
        assert n in out, out
    assert list(tmp_path.iterdir()) == []  # no data, no runs, nothing


def test_broken_site_folder_stops_before_training_listing_every_problem(tmp_path, synth_sites):
    data = tmp_path / "data"
    for s in synth_sites[:2]:
        copy_site(s, data / s.name)
    m = data / "site-1" / "manifest.csv"
    lines = m.read_text().splitlines()
    lines[3] = lines[3].replace(".png", "-gone.png")  # missing image (row 4)
    lines[5] = lines[5].rsplit(",", 1)[0] + ",unknown_label"  # unknown label (row 6)
    m.write_text("\n".join(lines) + "\n")
    (data / "site-0" / "manifest.csv").write_text("id,label\n")  # no modality, no records
    res = run(["simulate", "--data", str(data), "--out", str(tmp_path / "runs")], tmp_path)
    assert res.returncode != 0
    err = res.stderr
    assert "site-1/manifest.csv:4: image: file" in err and "does not exist" in err
    assert "site-1/manifest.csv:6: label: unknown label 'unknown_label'" in err
    assert "site-0/manifest.csv" in err and "no modality column" in err
    assert "round 1/" not in res.stdout  # nothing trained
    assert not (tmp_path / "runs").exists()


def test_data_synth_then_check(tmp_path):
    res = run(
        ["data", "synth", "--out", "d", "--sites", "2", "--records", "40", "--seed", "3"], tmp_path
    )
    assert res.returncode == 0, res.stderr
    res = run(["data", "check", "d/site-1"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "all valid" in res.stdout and "image" in res.stdout and "labels:" in res.stdout
    (tmp_path / "d" / "site-1" / "manifest.csv").write_text("id,image,label\nx,nope.png,a\n")
    res = run(["data", "check", "d/site-1"], tmp_path)
    assert res.returncode == 1 and "nope.png' does not exist" in res.stderr


def test_the_privacy_table_leaves_out_what_stays_at_the_sites(tmp_path, capsys):
    """Noise multipliers, lifetime spend and budgets stay at a site unless it opts in: no
    column of dashes, but a line saying where they are; a site that shares them shows them."""
    from fedfuse.cli import _print_privacy

    base = {"epsilon": 1.5, "delta": 1e-5, "target_epsilon": 2.0, "rounds": 2}
    run = tmp_path / "run"
    run.mkdir()
    (run / "privacy.json").write_text(json.dumps({"sites": {"site-0": base, "site-1": base}}))
    _print_privacy(run)
    out = capsys.readouterr().out
    assert "run epsilon" in out and "1.5000" in out
    table = out.split("Not shown:")[0]
    assert "in this run" in table and "lifetime" not in table and "noise" not in table
    assert (
        "Not shown: noise multiplier, lifetime before, lifetime after, site budget. They stay "
        "at each site unless it shares them" in " ".join(out.split())
    )
    shared = {**base, "noise_multiplier": 1.1, "lifetime_epsilon_start": 0.5,
              "lifetime_epsilon": 2.0}  # fmt: skip
    (run / "privacy.json").write_text(json.dumps({"sites": {"site-0": shared, "site-1": base}}))
    _print_privacy(run)
    out = capsys.readouterr().out
    table = out.split("Not shown:")[0]
    assert "noise multiplier" in table and "lifetime after" in table and "1.1000" in table
    assert "Not shown: site budget." in " ".join(out.split())
