"""Record-level DP training of the fusion model at a site, with Opacus.

The site's (epsilon, delta) budget covers the whole federation: the noise multiplier is planned
once, for every round, before the first one (common/privacy/planning.py), and each round appends
one :class:`DpSgdEvent` to the site's history, from which epsilon is recomputed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedfuse.common.config import RunConfig
from fedfuse.common.models.multitask import AllTasks
from fedfuse.common.models.objectives import WithAuxiliaryLoss, make_objective, modality_dropout
from fedfuse.common.privacy.accounting import DpSgdEvent, epsilon_from_events
from fedfuse.common.privacy.bookkeeping import make_private_bookkeeping
from fedfuse.common.privacy.planning import PrivacyPlan, batches_per_epoch
from fedfuse.common.privacy.secure_rng import SecureDPDataLoader, SecureRandom, use_secure_noise

# Opacus' ghost clipping runs two backward passes through hooks that warn on every step. Not
# actionable for a site; silence exactly those messages. (Its "Secure RNG turned off" warning is
# never shown raw: false where the noise comes from a SecureRandom, and said once per simulation
# by `fedfuse simulate` where it is true, below.)
for _msg in (
    ".*Full backward hook is firing.*",
    ".*Optimal order is the largest alpha.*",
):
    warnings.filterwarnings("ignore", message=_msg)


def pick_device() -> torch.device:
    """``cuda`` when a GPU is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def limit_threads() -> None:
    """Respect the CPUs the simulation backend gave this worker (OMP_NUM_THREADS)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # learning-rate is the rate for the default (linear) head; a head that needs smaller steps
    # says so with its ``learning_rate_scale`` (see AttentionHead).
    lr = cfg.learning_rate * getattr(getattr(model, "head", None), "learning_rate_scale", 1.0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    # Momentum averages the DP noise over steps (De et al. 2022, arXiv:2204.13650).
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class RoundResult:
    train_loss: float
    num_examples: int
    event: DpSgdEvent | None
    epsilon: float
    # Wall time of the local epochs (the training loop alone: no Opacus set-up, no accounting);
    # it stays at the site (its train.jsonl; bench/real_data.py compares devices with it).
    seconds: float = math.nan


def train_round(
    model: nn.Module,
    train_set: Dataset,
    *,
    cfg: RunConfig,
    plan: PrivacyPlan | None,
    history: list[DpSgdEvent],
    seed: int,
    device: torch.device,
    secure_rng: SecureRandom | None = None,
) -> RoundResult:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs.

    With ``plan`` (DP on), uses Opacus DP-SGD with Poisson sampling and the planned noise; the
    returned event covers every planned step of this round, and ``epsilon`` composes it with
    ``history`` (all earlier rounds). With ``plan=None`` trains without privacy (baseline only):
    epsilon is infinite.

    ``secure_rng`` (what a deployed site passes): the DP noise, the Poisson batches and the
    modality dropout come from this cryptographically secure generator
    (common/privacy/secure_rng.py). ``None`` (simulation): from torch generators keyed with
    ``seed``, reproducible -- and predictable by whoever knows
    the seed, hence Opacus' "Secure RNG turned off" warning.
    """
    fusion = model
    if cfg.task_classes and hasattr(train_set, "with_task_labels"):
        # Extra tasks: train on every task's logits and labels (the same parameters).
        model, train_set = AllTasks(model), train_set.with_task_labels()
    model.to(device).train()
    # FedProx: the proximal pull towards the global weights is applied as a separate,
    # data-independent step after each optimizer step, so it never passes through per-sample
    # clipping and costs no privacy (post-processing).
    anchor = (
        [p.detach().clone() for p in model.parameters()]
        if cfg.strategy == "fedprox" and cfg.proximal_mu > 0
        else None
    )
    data_gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=plan is None, generator=data_gen
    )
    optimizer = make_optimizer(model, cfg)
    # The task's loss plus the model's own per-record terms (the pool encoder's centring):
    # one loss per record, clipped and noised as one under DP.
    objective = make_objective(cfg, fusion)
    criterion: nn.Module = objective
    # Modality dropout: from the secure generator at a deployed site; in a simulation from its
    # own keyed stream (reproducible). Independent of the data either way.
    drop_gen: torch.Generator | SecureRandom = (
        secure_rng if secure_rng is not None else torch.Generator().manual_seed(seed + 2)
    )
    if plan is None:
        started = time.perf_counter()
        plain = _train_plain(
            model,
            loader,
            optimizer,
            objective,
            cfg=cfg,
            device=device,
            anchor=anchor,
            drop_gen=drop_gen,
        )
        return dataclasses.replace(plain, seconds=time.perf_counter() - started)

    if secure_rng is not None:
        with warnings.catch_warnings():
            # False here: the noise and batches come from secure_rng, not Opacus' generators.
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine(accountant=cfg.accountant)
        secure_loader = SecureDPDataLoader(
            train_set,
            sample_rate=plan.sample_rate,
            steps=batches_per_epoch(len(train_set), cfg.batch_size),  # type: ignore[arg-type]
            rng=secure_rng,
        )
        sampling: dict = dict(data_loader=secure_loader, poisson_sampling=False)
    else:
        with warnings.catch_warnings():
            # True here (keyed, reproducible generators), and said once for the whole run by
            # `fedfuse simulate` instead of once per round from every simulated site.
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine(accountant=cfg.accountant)
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        sampling = dict(data_loader=loader, poisson_sampling=True, noise_generator=noise_gen)
    private_kwargs = dict(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        **sampling,
    )
    if cfg.grad_sample_mode == "bookkeeping":
        made = make_private_bookkeeping(engine, **private_kwargs)
    else:
        made = engine.make_private(grad_sample_mode=cfg.grad_sample_mode, **private_kwargs)
    if cfg.grad_sample_mode in ("bookkeeping", "ghost"):
        private_model, dp_optimizer, criterion, dp_loader = made
    else:
        private_model, dp_optimizer, dp_loader = made
    if secure_rng is not None:
        use_secure_noise(dp_optimizer, secure_rng)
        # What make_private does for the Poisson loader it builds itself.
        private_model.forbid_grad_accumulation()  # type: ignore[operator]
    if abs(dp_loader.sample_rate - plan.sample_rate) > 1e-12:  # type: ignore[attr-defined]
        raise RuntimeError(
            f"sampling rate {dp_loader.sample_rate} differs from the planned {plan.sample_rate}: "  # type: ignore[attr-defined]
            "the site's training set changed since the privacy plan was made"
        )
    started = time.perf_counter()
    try:
        total, count = _dp_epochs(
            private_model,
            dp_optimizer,
            criterion,
            dp_loader,
            cfg=cfg,
            device=device,
            anchor=anchor,
            params=list(model.parameters()),
            drop_gen=drop_gen,
            objective=objective,
        )
        seconds = time.perf_counter() - started
    finally:
        # Leave the caller's model as it was given: no Opacus hooks or per-sample state.
        private_model.remove_hooks()  # type: ignore[operator]
        for p in model.parameters():
            for attr in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
    accounted = sum(steps for _, _, steps in engine.accountant.history)
    if accounted > plan.steps_per_round:
        raise RuntimeError(
            f"Opacus accounted {accounted} steps but only {plan.steps_per_round} were planned"
        )
    event = DpSgdEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    epsilon = epsilon_from_events(
        [*history, event], delta=cfg.target_delta, accountant=cfg.accountant
    )
    return RoundResult(total / max(count, 1), len(train_set), event, epsilon, seconds)  # type: ignore[arg-type]


def proximal_step(
    params: list[torch.Tensor], anchor: list[torch.Tensor] | None, *, lr: float, mu: float
) -> None:
    """FedProx's proximal term as its own step: w <- w - lr * mu * (w - w_global)."""
    if anchor is None:
        return
    with torch.no_grad():
        for p, a in zip(params, anchor, strict=True):
            p.sub_(lr * mu * (p - a))


def _dp_epochs(
    private_model,
    dp_optimizer,
    criterion,
    dp_loader,
    *,
    cfg,
    device,  # noqa: ANN001
    anchor=None,
    params=None,
    drop_gen=None,
    objective,
):  # noqa: ANN001
    total, count = 0.0, 0
    for _ in range(cfg.local_epochs):
        for *inputs, labels in dp_loader:
            if len(labels) == 0:
                # An empty Poisson batch: nothing to learn. The step is still accounted
                # (the event below covers every planned step), which only over-counts.
                continue
            inputs[0] = modality_dropout(inputs[0], cfg.modality_dropout, generator=drop_gen)
            inputs = [x.to(device) for x in inputs]
            labels = labels.to(device)
            dp_optimizer.zero_grad(set_to_none=True)
            loss = criterion(private_model(*inputs), labels)
            loss.backward()
            dp_optimizer.step()
            proximal_step(params or [], anchor, lr=cfg.learning_rate, mu=cfg.proximal_mu)
            total += objective.task_loss_sum  # the task's loss alone (no centring term)
            count += len(labels)
    return total, count


def _train_plain(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: WithAuxiliaryLoss,
    *,
    cfg: RunConfig,
    device: torch.device,
    drop_gen: torch.Generator | SecureRandom,
    anchor: list[torch.Tensor] | None = None,
) -> RoundResult:
    total, count = 0.0, 0
    for _ in range(cfg.local_epochs):
        for *inputs, labels in loader:
            inputs[0] = modality_dropout(inputs[0], cfg.modality_dropout, generator=drop_gen)
            inputs = [x.to(device) for x in inputs]
            labels = labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(*inputs), labels)
            loss.backward()
            optimizer.step()
            proximal_step(
                list(model.parameters()), anchor, lr=cfg.learning_rate, mu=cfg.proximal_mu
            )
            total += criterion.task_loss_sum  # the task's loss alone
            count += len(labels)
    return RoundResult(total / max(count, 1), len(loader.dataset), None, math.inf)  # type: ignore[arg-type]
