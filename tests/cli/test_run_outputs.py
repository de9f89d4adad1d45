"""What a run hands over: the HTML report (in a real headless browser), predictions and the
exported model with its card. One tiny in-process federation serves every test here."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfuse.cli import app
from fedfuse.common.config import RunConfig
from fedfuse.common.data.synthetic import generate
from fedfuse.server.report import SECTIONS, write_report
from fedfuse.simulations.inprocess import federate_in_process
from tests.support.browser import chromium, load

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-site, 2-round private run (SecAgg+ on), its sites under data/."""
    root = tmp_path_factory.mktemp("run")
    generate(root / "data", sites=2, records=160, seed=1)
    cfg = RunConfig(
        data_dir=str(root / "data"),
        out_dir=str(root / "runs"),
        num_rounds=2,
        local_epochs=1,
        batch_size=64,
        target_epsilon=4.0,
        run_name="tiny",
    )
    return federate_in_process(cfg, num_sites=2)


def _last_round(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def _shown(dom: str, pattern: str) -> tuple[float, str]:
    m = re.search(pattern + r'.*?<span data-value="([^"]+)">([^<]+)</span>', dom, re.S)
    assert m, pattern
    return float(m[1]), m[2]


def test_report_in_a_headless_browser(run: Path, tmp_path: Path) -> None:
    # Written at the end of the run, beside summary.md, with the ledgers verified (4 entries).
    page = run / "report.html"
    assert page.is_file() and (run / "summary.md").is_file()
    exe, why = chromium()
    if exe is None:
        pytest.skip(why)
    shot = tmp_path / "report.png"
    dom, log = load(exe, page, tmp_path, screenshot=shot)
    # No console message at all: the page's CSP turns any fetch or script into one.
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log[-2000:]
    assert shot.stat().st_size > 20_000
    for sid, title in SECTIONS:
        assert f'<section id="{sid}"><h2>{title}</h2>' in dom
    assert "http://" not in dom and "https://" not in dom
    privacy = json.loads((run / "privacy.json").read_text())
    for name, site in privacy["sites"].items():
        value, text = _shown(dom, f'data-site="{name}">.*?run ')
        assert value == site["epsilon"] and text == f"{site['epsilon']:.4f}"
    assert 'data-ledger-status="ok"' in dom
    last = _last_round(run)
    for key in ("eval-auroc", "eval-average-precision", "eval-specificity", "eval-ece"):
        value, _ = _shown(dom, f'data-metric="{key}"><td>[^<]*</td><td class="n">')
        assert value == last[key]
    assert dom.count('data-figure="reliability"') == 1
    assert 'data-wire-optin="none"' in dom


def test_report_shows_a_rewritten_ledger(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(run, copy)
    privacy = json.loads((copy / "privacy.json").read_text())
    privacy["sites"]["site-0"]["ledger"]["entries"][0]["hash"] = "0" * 64
    (copy / "privacy.json").write_text(json.dumps(privacy))
    res = CliRunner().invoke(app, ["report", str(copy), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "r.html").read_text()
    assert 'data-ledger-status="tampered or inconsistent"' in text
    assert "rewritten" in text


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path: Path) -> None:
    from fedfuse.common.errors import ConfigError

    with pytest.raises(ConfigError, match="not a finished run directory"):
        write_report(tmp_path)
    assert math.isfinite(1.0)
