"""The run's plots are readable: titles, axes that fit, a summary at 100 sites (issue 18)."""

from __future__ import annotations

import json
import random

import pytest

from fedfuse.common import plots
from fedfuse.common.config import RunConfig
from fedfuse.server.rundir import RunDirectory


def _history(num_sites: int, num_rounds: int, *, sampled: int, seed: int = 0) -> list[dict]:
    """A run's metrics.jsonl as the server writes it: only sampled sites appear in a round;
    site-i spends 0.01 * (i + 1) per round it trains (so the top spenders are known)."""
    rng = random.Random(seed)
    spent = {f"site-{i}": 0.0 for i in range(num_sites)}
    rounds = []
    for r in range(1, num_rounds + 1):
        chosen = sorted(rng.sample(range(num_sites), sampled))
        if r == 1:  # the three heaviest spenders train every round
            chosen = sorted(set(chosen) | {num_sites - 1, num_sites - 2, num_sites - 3})
        sites = {}
        for i in chosen:
            spent[f"site-{i}"] += 0.01 * (i + 1)
            sites[f"site-{i}"] = {"epsilon": spent[f"site-{i}"], "delta": 1e-5}
        rounds.append(
            {
                "round": r,
                "sites": sites,
                "eval-auroc": 0.375 + 0.01 * r,
                "eval-accuracy": 0.62,
                "eval-loss": 0.9 - 0.01 * r,
                "max-epsilon": max(s["epsilon"] for s in sites.values()),
            }
        )
    for r in range(2, num_rounds + 1):  # the heaviest three: every round
        for i in (num_sites - 1, num_sites - 2, num_sites - 3):
            name = f"site-{i}"
            if name not in rounds[r - 1]["sites"]:
                spent[name] += 0.01 * (i + 1)
                rounds[r - 1]["sites"][name] = {"epsilon": spent[name], "delta": 1e-5}
    return rounds


def _labels(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_hundred_sites_drawn_as_a_summary_with_the_top_spenders(tmp_path):
    rounds = _history(100, 6, sampled=10)
    run = RunDirectory(tmp_path, RunConfig(target_epsilon=8.0), run_id="big")
    for rec in rounds:
        run.add_round(rec)
    run._plots()
    assert (run.path / "epsilon.png").stat().st_size > 0
    assert (run.path / "learning_curve.png").stat().st_size > 0
    history = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    title = plots.run_title("big", history, target_epsilon=8.0)
    fig = plots.epsilon_figure(plots.epsilon_history(history), budget=8.0, title=title)
    labels = _labels(fig)
    # Not 100 unlabelled lines: the range, the median, the three top spenders, the target.
    assert len(fig.axes[0].get_lines()) <= 6, len(fig.axes[0].get_lines())
    trained = {n for r in history for n in r["sites"]}  # sites never sampled spent nothing
    assert 30 < len(trained) < 100
    assert {"median site", f"range over {len(trained)} sites"} <= set(labels)
    top = [x.split(" ")[0] for x in labels if "spent most" in x]
    assert top == ["site-99", "site-98", "site-97"]
    assert "run target 8" in labels
    assert fig.axes[0].get_title() == title and title.startswith("run big: epsilon")
    heaviest = 0.01 * 100 * 6  # site-99 trained all 6 rounds
    lo, hi = fig.axes[0].get_ylim()
    assert lo == 0 and 8.0 <= hi < 8.0 * 1.1 and heaviest < hi
    fig.savefig(tmp_path / "epsilon-100.png")
    plots.plt.close(fig)


def test_a_round_without_the_site_is_not_drawn_as_spending(tmp_path):
    per_site = {"site-0": [(1, 1.0), (2, 2.0), (3, 3.0)], "site-1": [(1, 1.5), (3, 2.5)]}
    fig = plots.epsilon_figure(per_site, budget=None, site_budget={"site-1": 5.0})
    line = next(x for x in fig.axes[0].get_lines() if x.get_label() == "site-1")
    assert line.get_drawstyle() == "steps-post"  # flat until the next round it trained
    assert list(line.get_xdata()) == [0, 1, 3] and list(line.get_ydata()) == [0.0, 1.5, 2.5]
    assert "budget 5 (site-1)" in _labels(fig)  # the site's own budget, not only the run's
    assert fig.axes[0].get_ylim()[1] >= 5.0
    plots.plt.close(fig)


def test_learning_curve_fits_its_data_and_shows_accuracy_beside_auroc(tmp_path):
    rounds = [
        {"round": 1, "eval-auroc": 0.375, "eval-accuracy": 0.6, "eval-loss": 0.7},
        {
            "round": 2,
            "eval-auroc": 0.41,
            "eval-accuracy": 0.6,
            "eval-loss": 0.69,
            "eval-sensitivity": 0.0,
            "eval-specificity": 1.0,
        },
    ]
    fig = plots.learning_curve_figure(rounds, title="run r: epsilon 1.2 of 8")
    lo, hi = fig.axes[0].get_ylim()
    assert lo <= 0.375 and hi >= 0.6  # an AUROC of 0.375 stays in view
    assert lo <= 0.0 and hi >= 1.0  # sensitivity 0 / specificity 1 once recorded
    assert _labels(fig) == [
        "test AUROC",
        "test accuracy",
        "test sensitivity",
        "test specificity",
    ]
    # No train loss recorded (it stays at the sites): no empty "train loss" line.
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["test loss"]
    lo2, hi2 = fig.axes[1].get_ylim()
    assert lo2 <= 0.69 and 0.7 <= hi2 < 1.0
    assert fig._suptitle.get_text() == "run r: epsilon 1.2 of 8"
    plots.plt.close(fig)


@pytest.mark.parametrize("target", [8.0, float("inf")])
def test_title_names_run_and_epsilon(target):
    rounds = [{"round": 1, "max-epsilon": 2.5}, {"round": 2, "max-epsilon": 4.25}]
    title = plots.run_title("demo", rounds, target_epsilon=target)
    assert title == ("run demo: epsilon 4.25 of 8" if target == 8.0 else "run demo: no DP")


def test_client_level_only_run_shows_its_client_level_epsilon(tmp_path):
    """dp-level client: the sites report an infinite record-level epsilon (no DP-SGD), which
    must not be drawn as nothing spent; the title and epsilon.png show the client-level one."""
    rounds = [
        {
            "round": r,
            "sites": {"site-0": {"epsilon": float("inf")}, "site-1": {"epsilon": float("inf")}},
            "max-epsilon": float("inf"),
            "client-dp": {"epsilon": eps},
            "eval-auroc": 0.9,
            "eval-loss": 0.6,
        }
        for r, eps in ((1, 4.73), (2, 7.08), (3, 9.01))
    ]
    title = plots.run_title("cdp", rounds, target_epsilon=8.0)
    assert title == "run cdp: no record-level DP, client-level epsilon 9.01"
    run = RunDirectory(tmp_path, RunConfig(dp_level="client"), run_id="cdp")
    for rec in rounds:
        run.add_round(rec)
    run._plots()
    assert (run.path / "epsilon.png").stat().st_size > 0
    per = {"client-level, every site": plots.client_level_history(rounds)}
    fig = plots.epsilon_figure(per, budget=None, title=title)
    line = next(x for x in fig.axes[0].get_lines() if x.get_label().startswith("client-level"))
    assert list(line.get_ydata()) == [0.0, 4.73, 7.08, 9.01]
    assert fig.axes[0].get_ylim()[1] >= 9.01
    plots.plt.close(fig)


def test_a_run_that_stopped_before_any_round_finished_still_gets_its_curves(tmp_path):
    """No loss or score was recorded (every site refused at setup): the figures are drawn with
    empty axes instead of failing the run's finish."""
    rounds = [{"round": 1, "sites": {}, "refused": {"site-0": "budget"}, "stopped": "too few"}]
    path = plots.learning_curve(rounds, tmp_path / "learning_curve.png", title="run r")
    assert path.stat().st_size > 0
