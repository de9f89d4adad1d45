"""Plan a federation's training from the sites' record counts and the privacy budget.

:func:`plan_training` is deterministic: the same record counts, budget and fixed keys give the
same plan. It chooses the run-config keys in :data:`PLANNED_KEYS` that the user left unset or
set to ``auto`` (a key the user set is kept), then computes, with the sites' own calibration
(:func:`plan_site_noise`, the one noise planner: each site calls it before its first round,
client/budget.py), the noise multiplier each site will draw and the epsilon it will end the run
at. The rules follow the measurements on real data in
docs/BENCHMARKS.md#real-data-pathvqa (De et al. 2022, arXiv:2204.13650; Sander et al. 2023,
arXiv:2210.03403): under DP-SGD the noise a site's whole run adds is set by its epsilon and
record count, whatever the batch size, so the plan picks batches of about a third of a site
(three noisy steps an epoch, each averaging many records) and enough steps for Adam to
converge, and a model with few parameters (``hash-bag`` text into a ``linear`` head) so that
the noise is spread over few coordinates.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfuse.common.config import RunConfig
from fedfuse.common.data.dataset import manifest_for
from fedfuse.common.errors import DataValidationError
from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events, plan_noise_multiplier
from fedfuse.common.privacy.ledger import LEDGER_ACCOUNTANT

AUTO = "auto"
# The run-config keys the planner chooses (kebab-case, as in [tool.flwr.app.config]).
PLANNED_KEYS = (
    "num-rounds",
    "local-epochs",
    "batch-size",
    "learning-rate",
    "max-grad-norm",
    "text-buckets",
    "text-ngrams",
    "max-tokens",
    "weight-decay",
    "strategy",
    "proximal-mu",
)
# Noisy steps per local epoch at the median site: batches of a third of its records. Fewer,
# larger batches average more records into each noisy step; three keep enough steps per round.
STEPS_PER_EPOCH = 3
# The smallest batch planned: below it a step's noise swamps its signal at any budget.
MIN_BATCH = 32
# Clipping norm 1 with Adam at rate 0.1: Adam normalises the update's scale, so the clipping
# norm only sets which records are clipped (all of them, at 1, under a fresh linear model) and
# the rate alone sets the step (Li et al. 2022, arXiv:2110.05679, on clipping every record).
MAX_GRAD_NORM = 1.0
PRIVATE_LEARNING_RATE = 0.1
# That rate holds from a median site of PRIVATE_RATE_RECORDS training records up; smaller sites
# get PRIVATE_LEARNING_RATE * sqrt(median / PRIVATE_RATE_RECORDS): their batches (a third of the
# site) average fewer records against the same noise, and Adam moves a weight whose gradient is
# mostly noise by about the full rate each step. The square root interpolates between measured
# points (docs/BENCHMARKS.md#the-demo-make-demo, fourth pass): 140-320-record synthetic sites
# learned best at 0.01-0.03, PathVQA's 2,300-2,600-record sites at 0.1.
PRIVATE_RATE_RECORDS = 2048
# Without noise a smaller step: the larger one overfits the training records in a few rounds.
NON_PRIVATE_LEARNING_RATE = 0.03
LOCAL_EPOCHS = 3
ROUNDS = 5
# Hashed n-gram buckets (the text model's rows): without noise, 65,536 keep most n-grams apart
# (PathVQA's 19,186 share every one of 1,024 buckets); under DP every bucket draws the same
# noise while its signal grows with the records that use it, so the buckets follow the median
# site's records scaled by epsilon/8 (a power of two at or above, 1,024 to 4,096): on PathVQA
# 4,096 beat 1,024 at epsilon 8 with 2,400 records a site and lost at epsilon 1 or with 300
# records a site (docs/BENCHMARKS.md#real-data-pathvqa).
NON_PRIVATE_TEXT_BUCKETS = 65536
PRIVATE_TEXT_BUCKETS = (1024, 4096)
# Without noise the text model can afford word trigrams (more ids a record, hence more tokens)
# and needs an L2 penalty: unpenalised it overfits the training records (train loss 0.25) and
# stopped at 0.918 on PathVQA; with trigrams, 65,536 buckets and weight decay 1e-4 it reached
# 0.931 (docs/BENCHMARKS.md#real-data-pathvqa, fourth pass). Under DP trigrams did not help
# (epsilon 8: 0.901 against 0.903): each bucket's signal is already near its noise.
TEXT_NGRAMS = {"private": 2, "non-private": 3}
MAX_TOKENS = {"private": 64, "non-private": 96}
# Under DP a stronger pull toward zero: it shrinks what the noise has added to every weight
# (post-processing of the noisy gradient, no privacy cost). On PathVQA, 3 seeds, 1e-3 took
# epsilon 8 from 0.902 to 0.905 and epsilon 1 from 0.853 to 0.860 (BENCHMARKS, fifth pass).
WEIGHT_DECAY = {"private": 1e-3, "non-private": 1e-4}
# Under DP, FedProx (Li et al. 2020, arXiv:1812.06127): after each noisy step a site pulls its
# weights toward the round's global model by lr * mu (post-processing, no privacy cost). Each
# site's local epochs otherwise fit its own label mix and its noise, and the average of those
# drifts grows the global model's confidence from round to round. On the demo's skewed sites
# (90 %, 27 %, 76 % positive; loop, seeds 0-4) mu 0.3 made the pooled test loss fall and the
# AUROC rise in every round of every seed (FedAvg: the test loss rose in round 3 in 2 of 5),
# final AUROC 0.853 against 0.866; on PathVQA (3 seeds) it raised epsilon 8 from 0.904 to
# 0.909, epsilon 1 from 0.855 to 0.859 and 300-record sites from 0.806 to 0.822
# (docs/BENCHMARKS.md, seventh pass). Without DP it was not measured: FedAvg, as before.
STRATEGY = {"private": "fedprox", "non-private": "fedavg"}
PROXIMAL_MU = 0.3


@dataclass(frozen=True)
class PrivacyPlan:
    """What a site fixes before its first round and keeps for the whole federation."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    num_rounds: int

    @property
    def planned_steps(self) -> int:
        return self.steps_per_round * self.num_rounds

    def steps_from(self, first_round: int) -> int:
        """The steps of rounds ``first_round`` to the last (a site that joins late plans for
        the rounds left, as if it trains in every one: this can only over-estimate its spend)."""
        return self.steps_per_round * (self.num_rounds - min(first_round, self.num_rounds) + 1)


def batches_per_epoch(num_train: int, batch_size: int) -> int:
    """Noisy steps per local epoch: Poisson sampling at rate 1/this (Opacus' DPDataLoader)."""
    return max(1, math.ceil(num_train / batch_size))


def plan_site_noise(
    *,
    num_train: int,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
    target_epsilon: float,
    target_delta: float,
    accountant: str,
    first_round: int = 1,
    prior_events: Sequence[DpSgdEvent] = (),
) -> PrivacyPlan:
    """The noise multiplier with which a site's rounds ``first_round`` to ``num_rounds``
    together (after ``prior_events``) spend at most ``target_epsilon``: Poisson sampling at
    rate 1/batches-per-epoch and ``local_epochs * batches_per_epoch`` steps a round.

    The one noise planner: a site's own plan (client/budget.py), ``fedfuse plan`` and the
    tests all call it.
    """
    if num_train < 1:
        raise ValueError("the site has no training records (split 'train' is empty)")
    per_epoch = batches_per_epoch(num_train, batch_size)
    plan = PrivacyPlan(math.nan, 1.0 / per_epoch, per_epoch * local_epochs, num_rounds)
    with warnings.catch_warnings():
        # PRV at sample rate 1 takes log(0) on its way to a correct bound, and RDP notes its
        # largest order; neither is actionable.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        sigma = plan_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=plan.sample_rate,
            steps=plan.steps_from(first_round),
            accountant=accountant,
            prior_events=prior_events,
        )
    return dataclasses.replace(plan, noise_multiplier=sigma)


def plan_site_privacy(
    *, cfg: RunConfig, num_train: int, prior_events: Sequence[DpSgdEvent] = ()
) -> PrivacyPlan:
    """:func:`plan_site_noise` for a whole run of ``cfg`` at its own target (epsilon, delta)."""
    return plan_site_noise(
        num_train=num_train,
        batch_size=cfg.batch_size,
        local_epochs=cfg.local_epochs,
        num_rounds=cfg.num_rounds,
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        accountant=cfg.accountant,
        prior_events=prior_events,
    )


def plan_within_budget(
    earlier: list[DpSgdEvent],
    *,
    sample_rate: float,
    steps: int,
    budget: float,
    delta: float,
    sigma_low: float,
    rtol: float = 0.01,
) -> float | None:
    """Smallest noise multiplier (within ``rtol`` of what is left) keeping ``earlier`` plus
    ``steps`` new steps within ``budget`` by PRV; None when nothing useful is left.

    ``sigma_low`` is known to be too small. Brackets by doubling, then bisects in log-sigma,
    stopping once the plan uses all but ``rtol`` of what is left (not of the whole budget,
    which would waste most of a nearly spent budget on needless noise).
    """

    def eps(sigma: float) -> float:
        return epsilon_from_events(
            [*earlier, DpSgdEvent(sigma, sample_rate, steps)],
            delta=delta,
            accountant=LEDGER_ACCOUNTANT,
        )

    spent = epsilon_from_events(earlier, delta=delta, accountant=LEDGER_ACCOUNTANT)
    left = budget - spent
    if left <= rtol * budget:
        return None
    lo, hi = sigma_low, sigma_low * 1.5
    while eps(hi) > budget:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return None
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        e = eps(mid)
        if e > budget:
            lo = mid
        else:
            hi = mid
            if budget - e <= rtol * left:
                break
    return hi


@dataclass(frozen=True)
class SitePlan:
    """One site's part of the plan: what it will sample, and spend."""

    site: str
    num_train: int
    sample_rate: float
    steps: int
    noise_multiplier: float | None  # None: trains without DP
    epsilon: float


@dataclass(frozen=True)
class TrainingPlan:
    """The run-config values to use and what each site will spend with them."""

    settings: dict[str, Any]
    chosen: tuple[str, ...]  # the keys the planner set (the others were the user's)
    sites: tuple[SitePlan, ...]
    target_epsilon: float
    target_delta: float
    explanation: str


def user_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The planned keys the user set to a value (not ``auto``) in ``raw``."""
    return {
        k: v
        for k, v in raw.items()
        if k in PLANNED_KEYS and not (isinstance(v, str) and v.strip().lower() == AUTO)
    }


def without_auto(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` without the keys set to ``auto`` (the plan fills them in)."""
    return {k: v for k, v in raw.items() if not (isinstance(v, str) and v.strip().lower() == AUTO)}


def without_planned(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` without the keys the planner chooses."""
    return {k: v for k, v in raw.items() if k not in PLANNED_KEYS}


def plan_training(
    record_counts: Mapping[str, int],
    *,
    target_epsilon: float,
    target_delta: float,
    accountant: str = "prv",
    fixed: Mapping[str, Any] | None = None,
) -> TrainingPlan:
    """Choose rounds, local epochs, batch size, learning rate and clipping norm for sites
    holding ``record_counts`` training records, and the noise each site will draw.

    ``fixed`` holds planned keys the user set (kebab-case); they are kept as given.
    ``target_epsilon`` may be ``inf`` (no DP: no noise, a smaller learning rate).
    """
    if not record_counts:
        raise ValueError("record_counts is empty: there is no site to plan for")
    bad = {s: n for s, n in record_counts.items() if n < 1}
    if bad:
        raise ValueError(f"sites with no training records cannot train: {bad}")
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(PLANNED_KEYS))
    if unknown:
        raise ValueError(f"fixed holds keys the planner does not choose: {unknown}")
    private = math.isfinite(target_epsilon)
    kind = "private" if private else "non-private"
    median = statistics.median_low(sorted(record_counts.values()))
    planned: dict[str, Any] = {
        "num-rounds": ROUNDS,
        "local-epochs": LOCAL_EPOCHS,
        "batch-size": max(MIN_BATCH, math.ceil(median / STEPS_PER_EPOCH)),
        "learning-rate": plan_learning_rate(median) if private else NON_PRIVATE_LEARNING_RATE,
        "max-grad-norm": MAX_GRAD_NORM,
        "text-buckets": plan_text_buckets(median, target_epsilon=target_epsilon),
        "text-ngrams": TEXT_NGRAMS[kind],
        "max-tokens": MAX_TOKENS[kind],
        "weight-decay": WEIGHT_DECAY[kind],
        "strategy": STRATEGY[kind],
    }
    if fixed.get("strategy", planned["strategy"]) == "fedprox":
        planned["proximal-mu"] = PROXIMAL_MU  # only FedProx reads it
    settings = {**planned, **fixed}
    rounds, epochs = int(settings["num-rounds"]), int(settings["local-epochs"])
    batch = int(settings["batch-size"])
    sites = []
    for site in sorted(record_counts):
        n = record_counts[site]
        if not private:
            q = 1.0 / batches_per_epoch(n, batch)
            steps = batches_per_epoch(n, batch) * epochs * rounds
            sites.append(SitePlan(site, n, q, steps, None, math.inf))
            continue
        plan = plan_site_noise(
            num_train=n,
            batch_size=batch,
            local_epochs=epochs,
            num_rounds=rounds,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            accountant=accountant,
        )
        event = DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)
        with warnings.catch_warnings():
            # RDP notes its largest order; not actionable.
            warnings.simplefilter("ignore")
            eps = epsilon_from_events([event], delta=target_delta, accountant=accountant)
        sites.append(
            SitePlan(site, n, plan.sample_rate, plan.planned_steps, plan.noise_multiplier, eps)
        )
    chosen = tuple(k for k in planned if k not in fixed)
    return TrainingPlan(
        settings=settings,
        chosen=chosen,
        sites=tuple(sites),
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        explanation=_explain(settings, sites, median=median, private=private),
    )


def plan_learning_rate(median: int) -> float:
    """Adam's rate under DP for sites whose median holds ``median`` training records."""
    scale = math.sqrt(min(1.0, median / PRIVATE_RATE_RECORDS))
    return float(f"{PRIVATE_LEARNING_RATE * scale:.2g}")


def plan_text_buckets(median: int, *, target_epsilon: float) -> int:
    """Hashed text buckets for sites whose median holds ``median`` training records."""
    if not math.isfinite(target_epsilon):
        return NON_PRIVATE_TEXT_BUCKETS
    low, high = PRIVATE_TEXT_BUCKETS
    records = math.ceil(median * min(target_epsilon, 8.0) / 8.0)
    return min(high, max(low, 1 << max(0, records - 1).bit_length()))


def _explain(
    settings: Mapping[str, Any], sites: list[SitePlan], *, median: int, private: bool
) -> str:
    batch = settings["batch-size"]
    steps = sorted({s.steps for s in sites})
    span = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    if not private:
        return (
            f"Without DP, batches of {batch} (a third of the median site's {median} records), "
            f"Adam at {settings['learning-rate']:g} for {span} steps per site "
            f"and an L2 penalty of {settings['weight-decay']:g} keep the model from "
            f"overfitting the training records; {settings['text-buckets']} text buckets keep "
            f"most word 1-{settings['text-ngrams']}-grams apart."
        )
    sigmas = [s.noise_multiplier for s in sites if s.noise_multiplier is not None]
    return (
        f"Batches of {batch} (a third of the median site's {median} records) average many "
        f"records into each of {span} noisy steps per site, so the noise each site must add "
        f"for its budget (multiplier {min(sigmas):.2f}-{max(sigmas):.2f}) stays small beside "
        f"the clipped gradient, and Adam at {settings['learning-rate']:g} converges in that "
        f"many steps; {settings['text-buckets']} text buckets (fewer at a smaller budget or "
        "site) keep each bucket's signal above its noise"
        + (
            f", and an L2 penalty of {settings['weight-decay']:g} pulls back what the noise "
            "adds to every weight"
            if settings["weight-decay"] > 0
            else ""
        )
        + (
            f"; FedProx's pull (mu {settings['proximal-mu']:g}) toward each round's global "
            "model keeps a site's noisy local epochs from drifting to its own label mix"
            if settings["strategy"] == "fedprox" and settings.get("proximal-mu", 0) > 0
            else ""
        )
        + "."
    )


def count_train_records(site_dirs: list[Path], cfg: Any) -> dict[str, int]:
    """Training records of each site folder, read locally from its manifest (by name).

    Raises one :class:`DataValidationError` listing every site's problems.
    """
    counts: dict[str, int] = {}
    errors: dict[Path, DataValidationError] = {}
    for d in site_dirs:
        try:
            counts[d.name] = len(manifest_for(d, cfg).split("train"))
        except DataValidationError as exc:
            errors[d] = exc
    if errors:
        raise DataValidationError.of_sites(errors, source=str(site_dirs[0].parent))
    return counts


def plan_for_sites(
    site_dirs: list[Path], raw: Mapping[str, Any], *, build: Any
) -> tuple[TrainingPlan | None, Any]:
    """The plan for ``site_dirs`` and the run config with it applied.

    ``raw`` holds the kebab-case keys the user (or a scenario) gave, ``auto`` included;
    ``build(mapping)`` makes the run config from such a mapping. Only record-level DP (and
    training without DP) is planned: for client-level and distributed DP the noise is the
    server's or the sites' shares, and the keys keep their configured values.
    """
    cfg = build(without_auto(raw))
    # The user's values as the run config parsed them (``--set`` gives strings).
    fixed = {k: getattr(cfg, k.replace("-", "_")) for k in user_keys(raw)}
    if cfg.private and not cfg.record_level_dp:
        return None, cfg
    # A site without training records only evaluates: it has nothing to plan.
    counts = {s: n for s, n in count_train_records(site_dirs, cfg).items() if n > 0}
    if not counts:
        return None, cfg
    plan = plan_training(
        counts,
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        accountant=cfg.accountant,
        fixed=fixed,
    )
    return plan, build({**without_auto(raw), **plan.settings})
