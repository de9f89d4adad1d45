"""The site's privacy budget and ledger: before each round, train or refuse; after it, record.

Only the site sets its budget: node config ``epsilon-budget`` and ``delta`` (deployment), else
``.fedfuse/site.toml`` in the site's data folder (any site, and the only way in simulation),
else no cap (epsilon ``inf``: spend is still recorded, but nothing is refused). The budget is a
lifetime budget of the site's DATA: the ledger composes every round of every run on it.

A run's ``target-epsilon`` is what the run may spend at the site (its own rounds composed);
it is capped at the site's budget, never above it. The noise is planned once per run, for all
of its rounds, so that both hold: the run's own epsilon stays within the run's target, and the
site's lifetime epsilon (earlier events plus this run) stays within its budget. Before each
round the site recomputes the lifetime epsilon this round would reach -- the ledger may have
grown since the plan (another federation on the same data) or the site may have lowered its
budget -- and refuses the round if it would exceed the budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfuse.client.node_config import NodeConfig
from fedfuse.client.training import RoundResult
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError, FedfuseError, PrivacyBudgetExhaustedError
from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events
from fedfuse.common.privacy.anchor import (
    HEAD_META,
    LedgerHead,
    anchor_path,
    head_problems,
    read_head,
    write_head,
)
from fedfuse.common.privacy.ddgauss import DdgEvent
from fedfuse.common.privacy.ledger import (
    LEDGER_ACCOUNTANT,
    Ledger,
    LedgerEntry,
    LedgerError,
    cumulative_epsilon,
)
from fedfuse.common.privacy.planning import PrivacyPlan, plan_site_noise, plan_within_budget
from fedfuse.common.privacy.refusal import Refusal
from fedfuse.common.privacy.site_secret import (
    SiteSecretError,
    existing_secret,
    ledger_key,
    load_or_create_secret_file,
)
from fedfuse.common.site_state import (
    HEAD_NAME,
    SECRET_NAME,
    STATE_DIR,
    ledger_file,
    site_file,
    state_dir,
)

# Used when a site sets no delta: the run config's default, and well below 1/records for any
# site large enough to train on.
DEFAULT_DELTA = 1e-5
_SITE_KEYS = ("epsilon-budget", "delta")


@dataclass(frozen=True)
class SiteBudget:
    """The site's own limits, where its ledger lives, and the folder (``<data>/.fedfuse``)
    that holds its secret and its authenticated ledger head (the ledger's folder if None)."""

    epsilon: float
    delta: float
    ledger_path: Path
    source: str
    site_dir: Path | None = None

    @property
    def state_dir(self) -> Path:
        return self.site_dir if self.site_dir is not None else self.ledger_path.parent


def _number(value: Any, *, key: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be a number; found {value!r}") from None


def read_site_file(data_path: Path) -> dict[str, float]:
    """``<data>/.fedfuse/site.toml`` (``epsilon-budget``, ``delta``), or {} if absent."""
    path = site_file(data_path)
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(raw) - set(_SITE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known keys: {list(_SITE_KEYS)}")
    return {k: _number(v, key=k, where=str(path)) for k, v in raw.items()}


def write_site_file(data_path: Path, *, epsilon_budget: float, delta: float) -> Path:
    """Set a site's budget in its data folder (what ``.fedfuse/site.toml`` holds)."""
    check_budget(epsilon_budget, delta, where="site budget")
    path = site_file(data_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    eps = "inf" if math.isinf(epsilon_budget) else repr(float(epsilon_budget))
    path.write_text(
        "# This site's lifetime privacy budget over its data (all runs together).\n"
        f"epsilon-budget = {eps}\ndelta = {float(delta)!r}\n"
    )
    return path


def check_budget(epsilon: float, delta: float, *, where: str) -> None:
    if math.isnan(epsilon) or epsilon <= 0:
        raise ConfigError(
            f"{where}: 'epsilon-budget' must be in range (0, inf] (inf = not capped); "
            f"found {epsilon}"
        )
    if math.isnan(delta) or not 0 < delta < 1:
        raise ConfigError(f"{where}: 'delta' must be in range (0, 1); found {delta}")


def resolve_budget(node: NodeConfig | Mapping[str, Any], data_path: Path) -> SiteBudget:
    """The site's budget and ledger file, from its node config (parsed, or raw as Flower
    gives it), else its site file."""
    if not isinstance(node, NodeConfig):
        node = NodeConfig.parse(node)
    own = read_site_file(data_path)
    source = []
    if node.epsilon_budget is not None:
        eps = node.epsilon_budget
        source.append("node config")
    elif "epsilon-budget" in own:
        eps = own["epsilon-budget"]
        source.append(str(site_file(data_path)))
    else:
        eps = math.inf
        source.append("no budget set")
    if node.delta is not None:
        delta = node.delta
    else:
        delta = own.get("delta", DEFAULT_DELTA)
    check_budget(eps, delta, where=source[0])
    if node.ledger_path is not None:
        ledger = node.ledger_path
    else:
        ledger = ledger_file(data_path)
    return SiteBudget(eps, delta, ledger, source[0], state_dir(data_path))


def model_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the global model a round starts from (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class RoundRefused(FedfuseError):
    """The site will not train (or not release) this round; ``why`` goes back to the server,
    as a field of the refusal (:meth:`as_refusal`)."""

    def __init__(
        self,
        why: str,
        *,
        spent: float | None = None,
        budget: float | None = None,
        would_reach: float | None = None,
    ) -> None:
        self.why = why
        # A budget refusal's figures, sent as fields (common/privacy/refusal.py).
        self.spent, self.budget, self.would_reach = spent, budget, would_reach
        super().__init__(why)

    def as_refusal(self, *, site: str, server_round: int) -> Refusal:
        return Refusal(
            site,
            server_round,
            self.why,
            spent=self.spent,
            budget=self.budget,
            would_reach=self.would_reach,
        )


@dataclass(frozen=True)
class RoundPermit:
    """What :meth:`SiteLedger.prepare` allows: the plan, this run's earlier events, and the
    site's lifetime epsilon before the run, now, and after this round."""

    plan: PrivacyPlan | None
    run_events: list[DpSgdEvent]
    lifetime_start: float
    lifetime_spent: float
    lifetime_after: float


class SiteLedger:
    """The site's budget applied to its ledger, for one round of one run."""

    def __init__(self, budget: SiteBudget, *, site: str) -> None:
        self.budget = budget
        self.site = site
        self.head_file = anchor_path(budget.state_dir)
        self.secret_file = budget.state_dir / SECRET_NAME
        try:
            secret = existing_secret(self.secret_file)
            if secret is None and self.head_file.exists():
                raise RoundRefused(
                    f"its secret ({STATE_DIR}/{SECRET_NAME}) is missing, so its ledger head cannot "
                    "be authenticated: restore the secret from a backup, or reset the ledger on "
                    "purpose with `fedfuse ledger reset <site folder> --reason ...`"
                )
            self.head = read_head(self.head_file, key=ledger_key(secret) if secret else None)
            if self.head is not None and self.head.trained and not budget.ledger_path.exists():
                # Deleting the ledger must not reset the budget: the head says it existed.
                raise RoundRefused(
                    f"its privacy ledger ({budget.ledger_path.name}) is missing but this site "
                    f"has trained before ({self.head.count} entries, per {STATE_DIR}/"
                    f"{HEAD_NAME}): restore the ledger from a backup, or reset it on purpose "
                    "with `fedfuse ledger reset <site folder> --reason ...` (recorded)"
                )
            self.ledger = Ledger(budget.ledger_path)
        except (LedgerError, SiteSecretError) as exc:
            raise RoundRefused(f"its privacy ledger cannot be used: {exc}") from exc

    def _spent(self, entries: list[LedgerEntry]) -> float:
        # The last entry's stored epsilon covers every entry (the chain is verified first).
        if entries and entries[-1].delta == self.budget.delta:
            return entries[-1].epsilon
        return cumulative_epsilon(entries, delta=self.budget.delta)

    def _exhausted(self, spent: float, would_reach: float) -> RoundRefused:
        return RoundRefused(
            str(
                PrivacyBudgetExhaustedError(
                    spent=spent, would_reach=would_reach, budget=self.budget.epsilon
                )
            ),
            spent=spent,
            budget=self.budget.epsilon,
            would_reach=would_reach,
        )

    def prepare(
        self,
        *,
        cfg: RunConfig,
        run_id: str,
        server_round: int,
        num_train: int,
        distributed: DdgEvent | None = None,
    ) -> RoundPermit:
        """Decide whether this round may train; raise :class:`RoundRefused` if not.

        ``distributed``: the round's distributed-DP event (``dp-level = distributed``), which
        is then what the round spends (without DP-SGD it is the only bound the site has).
        """
        report = self.ledger.verify()
        if not report.ok:
            raise RoundRefused(
                f"its privacy ledger {self.ledger.path} is broken at {report.first_broken} "
                f"({report.problems[0]}); run `fedfuse audit {self.ledger.path}`"
            )
        entries = self.ledger.entries()
        problems = head_problems(self.head, entries)
        if self.head is None and entries and self.ledger.meta(HEAD_META) is not None:
            problems.append(f"its authenticated ledger head ({STATE_DIR}/{HEAD_NAME}) is missing")
        if problems:
            raise RoundRefused(
                f"its privacy ledger disagrees with its authenticated head ({problems[0]}); run "
                "`fedfuse audit <site folder>`, and restore the ledger or reset it on purpose "
                "with `fedfuse ledger reset <site folder> --reason ...`"
            )
        done = [e for e in entries if e.run_id == run_id and e.round == server_round]
        if done:
            # Trained before (a resumed run re-sends the round): training again is another
            # release of the data, accounted as such -- never merged with the first.
            warnings.warn(
                f"site {self.site}: round {server_round} of this run is already in the ledger "
                f"({done[-1].label()}); training it again is recorded as attempt "
                f"{len(done) + 1}",
                stacklevel=2,
            )
        budget = self.budget.epsilon
        spent = self._spent(entries)
        run_entries = [e for e in entries if e.run_id == run_id]
        start = spent
        if run_entries:
            before = [e for e in entries if e.seq < run_entries[0].seq]
            start = self._spent(before)
        if not cfg.record_level_dp and distributed is not None:
            # Distributed DP only: the site's own noise share, summed with at least the
            # threshold of other shares, bounds what the round reveals (client level, hence
            # also record level), under the recorded assumption.
            prior_d = [e.event for e in entries]
            after_d = (
                math.inf
                if any(p is None for p in prior_d)
                else epsilon_from_events(
                    [*prior_d, distributed],  # type: ignore[list-item]
                    delta=self.budget.delta,
                    accountant=LEDGER_ACCOUNTANT,
                )
            )
            if after_d > budget:
                raise self._exhausted(spent, after_d)
            events_d = [e.event for e in run_entries if e.event is not None]
            return RoundPermit(None, events_d, start, spent, after_d)  # type: ignore[arg-type]
        if not cfg.record_level_dp:
            # Training without DP-SGD (no DP, or only client-level DP, whose noise the server
            # adds) spends an unbounded epsilon here: only an uncapped site allows it.
            if math.isfinite(budget):
                raise self._exhausted(spent, math.inf)
            return RoundPermit(None, [], start, spent, math.inf)
        if math.isfinite(budget) and spent >= budget:
            raise self._exhausted(spent, spent)
        prior = [e.event for e in entries]
        plan = (
            self._plan_from(run_entries, cfg)
            if run_entries
            else self._new_plan(cfg, server_round, num_train, prior)
        )
        event = DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        if any(p is None for p in prior):
            after = math.inf
        else:
            after = epsilon_from_events(
                [*prior, event],  # type: ignore[list-item]
                delta=self.budget.delta,
                accountant=LEDGER_ACCOUNTANT,
            )
        if after > budget:
            raise self._exhausted(spent, after)
        run_events = [e.event for e in run_entries if e.event is not None]
        return RoundPermit(plan, run_events, start, spent, after)

    @staticmethod
    def _plan_from(run_entries: list[LedgerEntry], cfg: RunConfig) -> PrivacyPlan:
        """A restarted site continues its run with the noise it planned before (the ledger
        holds it), instead of planning again from a lost in-memory state."""
        first = run_entries[0]
        return PrivacyPlan(first.noise_multiplier, first.sample_rate, first.steps, cfg.num_rounds)

    def _new_plan(
        self,
        cfg: RunConfig,
        server_round: int,
        num_train: int,
        prior: list[DpSgdEvent | None],
    ) -> PrivacyPlan:
        budget = self.budget
        if cfg.target_epsilon > budget.epsilon or cfg.target_delta > budget.delta:
            warnings.warn(
                f"site {self.site}: the run asks (epsilon, delta) = ({cfg.target_epsilon:g}, "
                f"{cfg.target_delta:g}) but the site's budget is ({budget.epsilon:g}, "
                f"{budget.delta:g}); planning for the site's budget",
                stacklevel=2,
            )
        plan = plan_site_noise(
            num_train=num_train,
            batch_size=cfg.batch_size,
            local_epochs=cfg.local_epochs,
            num_rounds=cfg.num_rounds,
            target_epsilon=min(cfg.target_epsilon, budget.epsilon),
            target_delta=min(cfg.target_delta, budget.delta),
            accountant=cfg.accountant,
            first_round=server_round,
        )
        sigma, q, steps = plan.noise_multiplier, plan.sample_rate, plan.steps_from(server_round)
        earlier = [p for p in prior if p is not None]
        if math.isfinite(budget.epsilon) and earlier:
            lifetime = epsilon_from_events(
                [*earlier, DpSgdEvent(sigma, q, steps)],
                delta=budget.delta,
                accountant=LEDGER_ACCOUNTANT,
            )
            if lifetime > budget.epsilon:
                # The run's own target fits, but the site's lifetime budget binds: more noise.
                sigma = plan_within_budget(
                    earlier,
                    sample_rate=q,
                    steps=steps,
                    budget=budget.epsilon,
                    delta=budget.delta,
                    sigma_low=sigma,
                )
                if sigma is None:
                    raise self._exhausted(self._spent(self.ledger.entries()), lifetime)
        return dataclasses.replace(plan, noise_multiplier=sigma)

    def record(
        self,
        *,
        cfg: RunConfig,
        run_id: str,
        run_name: str,
        server_round: int,
        result: RoundResult,
        global_model_hash: str,
        distributed: DdgEvent | None = None,
    ) -> LedgerEntry:
        """Append the round's event (atomically re-checking the budget) and authenticate the
        new head before anything leaves the site; raise :class:`RoundRefused` if the ledger
        will not take it."""
        try:
            entry = self.ledger.append(
                site=self.site,
                run_id=run_id,
                run_name=run_name,
                round=server_round,
                # Distributed DP alone: its event is the round's; with DP-SGD, a note beside it.
                event=result.event if result.event is not None else distributed,
                distributed=distributed if result.event is not None else None,
                max_grad_norm=cfg.max_grad_norm,
                delta=self.budget.delta,
                epsilon_budget=self.budget.epsilon,
                model_hash=global_model_hash,
            )
        except (PrivacyBudgetExhaustedError, LedgerError) as exc:
            raise RoundRefused(str(exc)) from exc
        self._authenticate_head(entry)
        return entry

    def _authenticate_head(self, entry: LedgerEntry) -> None:
        """Write the HMAC-authenticated head after the entry is committed: the ledger may run
        ahead of its head after a crash here, never behind it."""
        try:
            key = ledger_key(load_or_create_secret_file(self.secret_file))
            resets = self.head.resets if self.head is not None else ()
            head = LedgerHead(entry.seq, entry.hash, resets)
            if self.head is None or self.head.count < head.count:
                write_head(self.head_file, head, key=key)
                self.head = head
            if self.ledger.meta(HEAD_META) is None:
                # Where the head lives (a node config may keep the ledger elsewhere).
                self.ledger.set_meta(HEAD_META, str(self.head_file.resolve()))
        except (OSError, SiteSecretError, LedgerError) as exc:
            raise RoundRefused(f"its ledger head cannot be written: {exc}") from exc


def privacy_metrics(
    budget: SiteBudget, permit: RoundPermit, entry: LedgerEntry
) -> dict[str, float | int]:
    """The numbers a site reports with its update (every site reports the same keys)."""
    return {
        "lifetime-epsilon": entry.epsilon,
        "lifetime-epsilon-start": permit.lifetime_start,
        "epsilon-budget": budget.epsilon,
        "site-delta": budget.delta,
        "ledger-seq": entry.seq,
    }
