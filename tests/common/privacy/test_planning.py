"""The training planner (common/privacy/planning.py): within budget, deterministic, and the
user's keys kept."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedfuse.common.config import RunConfig
from fedfuse.common.privacy.planning import (
    PLANNED_KEYS,
    PROXIMAL_MU,
    plan_for_sites,
    plan_site_privacy,
    plan_text_buckets,
    plan_training,
)

COUNTS = {"small": 300, "large": 2610, "one": 1}


def _independent_epsilon(accountant: str, sigma: float, q: float, steps: int) -> float:
    """Epsilon straight from an Opacus accountant, not through fedfuse.common.privacy.accounting."""
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta=1e-5))


@pytest.mark.parametrize(("eps", "accountant"), [(8.0, "prv"), (1.0, "prv"), (2.0, "rdp")])
def test_every_site_ends_within_its_budget(eps, accountant):
    plan = plan_training(COUNTS, target_epsilon=eps, target_delta=1e-5, accountant=accountant)
    batch = plan.settings["batch-size"]
    rounds, epochs = plan.settings["num-rounds"], plan.settings["local-epochs"]
    assert [s.site for s in plan.sites] == sorted(COUNTS)
    for s in plan.sites:
        # Sampling and steps recomputed from the settings, as a site's DataLoader will see them.
        per_epoch = max(1, math.ceil(s.num_train / batch))
        assert s.sample_rate == pytest.approx(1 / per_epoch)
        assert s.steps == per_epoch * epochs * rounds
        spent = _independent_epsilon(accountant, s.noise_multiplier, s.sample_rate, s.steps)
        assert spent <= eps * (1 + 1e-9)
        assert spent >= 0.9 * eps  # the budget is used, not wasted on needless noise
        assert s.epsilon == pytest.approx(spent, rel=1e-6)


def test_the_plan_is_the_noise_each_site_will_draw():
    plan = plan_training(COUNTS, target_epsilon=4.0, target_delta=1e-5)
    cfg = RunConfig.from_mapping({**plan.settings, "target-epsilon": 4.0})
    for s in plan.sites:
        site = plan_site_privacy(cfg=cfg, num_train=s.num_train)
        assert site.noise_multiplier == s.noise_multiplier
        assert site.sample_rate == s.sample_rate
        assert site.planned_steps == s.steps


def test_the_plan_is_deterministic():
    a = plan_training(COUNTS, target_epsilon=8.0, target_delta=1e-5)
    b = plan_training(dict(reversed(COUNTS.items())), target_epsilon=8.0, target_delta=1e-5)
    assert a == b
    assert a.explanation and a.explanation.count(".") >= 1


def test_the_batch_is_a_third_of_the_median_site():
    small = plan_training({"a": 300, "b": 310}, target_epsilon=8.0, target_delta=1e-5)
    large = plan_training({"a": 2400, "b": 2500}, target_epsilon=8.0, target_delta=1e-5)
    assert small.settings["batch-size"] == 100 and large.settings["batch-size"] == 800
    assert [s.steps for s in small.sites] == [3 * 3 * 5, 4 * 3 * 5]
    # Text buckets follow the median site's records (times epsilon / 8), 1,024 to 4,096.
    assert small.settings["text-buckets"] == 1024 and large.settings["text-buckets"] == 4096


def test_text_buckets_shrink_with_the_budget_and_grow_without_noise():
    assert plan_text_buckets(2400, target_epsilon=8.0) == 4096
    assert plan_text_buckets(2400, target_epsilon=4.0) == 2048  # 1,200 records' worth
    assert plan_text_buckets(2400, target_epsilon=1.0) == 1024
    assert plan_text_buckets(100_000, target_epsilon=8.0) == 4096
    assert plan_text_buckets(300, target_epsilon=math.inf) == 65536


def test_keys_the_user_set_are_kept():
    fixed = {"num-rounds": 7, "batch-size": 50, "text-buckets": 512}
    plan = plan_training(COUNTS, target_epsilon=8.0, target_delta=1e-5, fixed=fixed)
    assert plan.settings["num-rounds"] == 7 and plan.settings["batch-size"] == 50
    assert plan.settings["text-buckets"] == 512
    assert set(plan.chosen) == set(PLANNED_KEYS) - set(fixed)
    small = next(s for s in plan.sites if s.site == "small")
    assert small.steps == math.ceil(300 / 50) * plan.settings["local-epochs"] * 7


def test_the_explanation_names_the_penalty_only_when_there_is_one():
    planned = plan_training(COUNTS, target_epsilon=8.0, target_delta=1e-5)
    assert f"L2 penalty of {planned.settings['weight-decay']:g}" in planned.explanation
    unset = plan_training(
        COUNTS, target_epsilon=8.0, target_delta=1e-5, fixed={"weight-decay": 0.0}
    )
    assert "L2 penalty" not in unset.explanation


def test_no_dp_plans_no_noise():
    plan = plan_training(COUNTS, target_epsilon=math.inf, target_delta=1e-5)
    assert all(s.noise_multiplier is None and math.isinf(s.epsilon) for s in plan.sites)
    assert plan.settings["text-buckets"] == 65536
    # Without noise: word trigrams (room for their ids); a weaker L2 penalty than under DP.
    private = plan_training(COUNTS, target_epsilon=8.0, target_delta=1e-5).settings
    assert (plan.settings["text-ngrams"], private["text-ngrams"]) == (3, 2)
    assert (plan.settings["max-tokens"], private["max-tokens"]) == (96, 64)
    assert 0 < plan.settings["weight-decay"] < private["weight-decay"]
    assert (
        plan.settings["learning-rate"]
        < plan_training(COUNTS, target_epsilon=8.0, target_delta=1e-5).settings["learning-rate"]
    )


def test_the_private_rate_shrinks_on_small_sites():
    rates = [
        plan_training({"a": n}, target_epsilon=8.0, target_delta=1e-5).settings["learning-rate"]
        for n in (150, 600, 2048, 2500)
    ]
    assert rates == sorted(rates) and rates[0] < 0.03 and rates[2] == rates[3] == 0.1
    # Without DP the rate does not depend on the site's size.
    plain = plan_training({"a": 150}, target_epsilon=math.inf, target_delta=1e-5)
    assert plain.settings["learning-rate"] == 0.03


def test_under_dp_the_plan_pulls_sites_toward_the_global_model():
    """Under DP the plan trains with FedProx (mu set, named in the explanation); without DP,
    FedAvg and no mu. A strategy the user set is kept, and only FedProx gets a planned mu."""
    private = plan_training(COUNTS, target_epsilon=8.0, target_delta=1e-5)
    assert private.settings["strategy"] == "fedprox"
    assert private.settings["proximal-mu"] == PROXIMAL_MU > 0
    assert f"FedProx's pull (mu {PROXIMAL_MU:g})" in private.explanation
    plain = plan_training(COUNTS, target_epsilon=math.inf, target_delta=1e-5)
    assert plain.settings["strategy"] == "fedavg" and "proximal-mu" not in plain.settings
    assert "FedProx" not in plain.explanation
    mine = plan_training(
        COUNTS, target_epsilon=8.0, target_delta=1e-5, fixed={"strategy": "fedadam"}
    )
    assert mine.settings["strategy"] == "fedadam" and "proximal-mu" not in mine.settings
    assert "strategy" not in mine.chosen and "FedProx" not in mine.explanation
    # A user's FedProx without DP gets the plan's mu; a user's mu is kept.
    theirs = plan_training(
        COUNTS, target_epsilon=math.inf, target_delta=1e-5, fixed={"strategy": "fedprox"}
    )
    assert theirs.settings["proximal-mu"] == PROXIMAL_MU
    kept = plan_training(COUNTS, target_epsilon=8.0, target_delta=1e-5, fixed={"proximal-mu": 0.05})
    assert kept.settings["proximal-mu"] == 0.05 and "proximal-mu" not in kept.chosen


def test_the_planned_run_config_trains_with_the_proximal_step(synth_sites):
    plan, cfg = plan_for_sites(synth_sites, {"target-epsilon": "8"}, build=RunConfig.from_mapping)
    assert plan is not None
    assert (cfg.strategy, cfg.proximal_mu) == ("fedprox", PROXIMAL_MU)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no site"):
        plan_training({}, target_epsilon=8.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="no training records"):
        plan_training({"a": 0}, target_epsilon=8.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="does not choose"):
        plan_training({"a": 5}, target_epsilon=8.0, target_delta=1e-5, fixed={"seed": 1})


def test_auto_and_unset_keys_take_the_plan_and_set_keys_survive(synth_sites):
    raw = {"batch-size": "40", "learning-rate": "auto", "target-epsilon": "3"}
    plan, cfg = plan_for_sites(synth_sites, raw, build=RunConfig.from_mapping)
    assert plan is not None
    assert cfg.batch_size == 40 and "batch-size" not in plan.chosen
    assert cfg.learning_rate == plan.settings["learning-rate"] < 0.1  # 300-record sites
    assert cfg.num_rounds == plan.settings["num-rounds"]
    assert all(s.epsilon <= 3.0 for s in plan.sites)
    # Client-level DP is not planned: the keys keep their configured values.
    none, client = plan_for_sites(
        synth_sites, {"dp-level": "client", "learning-rate": "auto"}, build=RunConfig.from_mapping
    )
    assert none is None and client.learning_rate == RunConfig.learning_rate


def test_one_noise_planner_for_the_site_the_plan_and_the_tests(tmp_path):
    """What a site plans before its first round (SiteLedger), what `fedfuse plan` reports and
    plan_site_privacy are the same noise: one planner (plan_site_noise) behind all three."""
    from fedfuse.client.budget import SiteLedger, resolve_budget

    cfg = RunConfig(num_rounds=2, local_epochs=1, batch_size=40, accountant="rdp")
    site = tmp_path / "site-a"
    site.mkdir()
    permit = SiteLedger(resolve_budget({}, site), site="site-a").prepare(
        cfg=cfg, run_id="r", server_round=1, num_train=200
    )
    fixed = {"num-rounds": 2, "local-epochs": 1, "batch-size": 40}
    (planned,) = plan_training(
        {"site-a": 200},
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        accountant="rdp",
        fixed=fixed,
    ).sites
    direct = plan_site_privacy(cfg=cfg, num_train=200)
    assert permit.plan == direct
    assert planned.noise_multiplier == direct.noise_multiplier
    assert (planned.sample_rate, planned.steps) == (direct.sample_rate, direct.planned_steps)


def test_fedfuse_plan_hands_over_a_run_config_flower_parses(synth_sites):
    """The printed `flwr run` line, strings quoted, parses (by Flower's own parser) back to the
    plan's settings: what a deployment copies is what was planned."""
    import shlex

    from flwr.common.config import parse_config_args
    from typer.testing import CliRunner

    from fedfuse.cli import app

    data = synth_sites[0].parent
    res = CliRunner().invoke(app, ["plan", "--data", str(data), "--epsilon", "8"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("Use it with: "))
    args = shlex.split(line.removeprefix("Use it with: "))
    assert args[:4] == ["flwr", "run", ".", "--run-config"]
    plan, _ = plan_for_sites(
        synth_sites, {"target-epsilon": 8.0, "data-dir": str(data)}, build=RunConfig.from_mapping
    )
    assert plan is not None and plan.settings["strategy"] == "fedprox"
    assert parse_config_args([args[4]]) == plan.settings
