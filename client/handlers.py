"""What a site does with the messages that need its data, its model or its ledger: train a
round, evaluate the global model, and check its budget before a SecAgg+ key exchange.

Imported on first use by fedfuse.client.app (the wiring), not when the ClientApp loads: in
deployment Flower starts one process per message, and the messages that need none of this (a
SecAgg+ round's key exchange and unmasking) start without torch or Opacus. The logic of a
round is in fedfuse.client.training, fedfuse.client.site and fedfuse.client.budget.
"""

from __future__ import annotations

import dataclasses
import zlib
from logging import WARNING

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log

from fedfuse.client import distributed_dp
from fedfuse.client.budget import (
    RoundRefused,
    SiteLedger,
    model_hash,
    privacy_metrics,
    resolve_budget,
)
from fedfuse.client.node_config import NodeConfig
from fedfuse.client.secagg_mod import check_local_update
from fedfuse.client.site import SiteInfo, manifest_digest, resolve_site, site_data
from fedfuse.client.training import PrivacyPlan, limit_threads, pick_device, train_round
from fedfuse.client.wire import (
    log_evaluation,
    log_training,
    public_reason,
)
from fedfuse.common.config import SERVER_KEYS, RunConfig, seeds_noise
from fedfuse.common.errors import ConfigError
from fedfuse.common.evaluation import EVAL_SUMS_ARRAY, EVAL_SUMS_KEY, site_evaluation
from fedfuse.common.models import build_model
from fedfuse.common.models.pretrained import load_wire_state, wire_state
from fedfuse.common.privacy.accounting import epsilon_from_events
from fedfuse.common.privacy.client_level_dp import clip_update_
from fedfuse.common.privacy.refusal import REFUSAL_KEY, Refusal
from fedfuse.common.privacy.secure_rng import SecureRandom
from fedfuse.common.privacy.site_secret import load_or_create_secret, round_seed
from fedfuse.common.secagg.distributed_dp import ROUND_KEY, VECTOR_KEY
from fedfuse.common.secagg.params import RoundParams
from fedfuse.common.secagg.protocol import RECORD_KEY


def _config(msg: Message) -> tuple[RunConfig, int]:
    raw = dict(msg.content["config"])
    server_round = int(raw.get("server-round", 0))  # type: ignore[arg-type]
    for k in SERVER_KEYS:
        raw.pop(k, None)
    return RunConfig.from_mapping(raw), server_round


def _model(msg: Message, cfg: RunConfig) -> torch.nn.Module:
    model = build_model(cfg)
    load_wire_state(model, cfg, msg.content["arrays"].to_torch_state_dict())
    return model


def _site_record(site: SiteInfo) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


def refusal_before_key_exchange(msg: Message, context: Context) -> Refusal | None:
    """Will this site refuse the round that a SecAgg+ setup message announces? Asked before any
    key exchange (client/secagg_mod.py), so that the round goes on with the other sites and
    none of them trains for a round that would be thrown away. The same check as :func:`train`
    makes before training; a refusal comes back as fields (site, spent, budget, would-reach).
    """
    if "config" not in msg.content.config_records:
        return None  # a server that sends no run config at setup: train() still refuses
    cfg, server_round = _config(msg)
    node = NodeConfig.parse(context.node_config)
    site = resolve_site(node, cfg)
    _, datasets = site_data(site, cfg)
    run_id, _ = _run_key(msg)
    budget = resolve_budget(node, site.data_path)
    ddp_event = None
    if cfg.distributed_dp:
        # The round's event needs the parameters' shapes, not their values: the site's own
        # model has the shapes any global model it accepts must have (train() checks), and the
        # threshold comes with this setup message. (It also refuses a sum that could wrap.)
        params = RoundParams.from_record(msg.content.config_records[RECORD_KEY])
        own = {k: v.numpy() for k, v in wire_state(build_model(cfg), cfg).items()}
        ddp_event = distributed_dp.site_round(
            cfg,
            own,
            distributed_dp.secagg_round(params),
            run_uid=run_id,
            server_round=server_round,
        ).event
    try:
        SiteLedger(budget, site=site.name).prepare(
            cfg=cfg,
            run_id=run_id,
            server_round=server_round,
            num_train=len(datasets["train"]),
            distributed=ddp_event,
        )
    except RoundRefused as refused:
        log(WARNING, "site %s refuses round %s: %s", site.name, server_round, refused.why)
        return _public_refusal(refused, site, server_round)
    return None


def train(msg: Message, context: Context) -> Message:
    """One round of DP training on the site's train split, within the site's privacy budget."""
    limit_threads()
    cfg, server_round = _config(msg)
    node = NodeConfig.parse(context.node_config)
    site = resolve_site(node, cfg)
    _, datasets = site_data(site, cfg)
    global_state = msg.content["arrays"].to_torch_state_dict()
    model = build_model(cfg)
    # A global model this site's model cannot hold unchanged (names, shapes, dtypes) is refused
    # before training: a round whose update could not be sent must not be charged to the ledger.
    # The global model leaves out what the site built from its checked weights file.
    mismatch = check_local_update(
        {k: v.numpy() for k, v in global_state.items()},
        {k: v.numpy() for k, v in wire_state(model, cfg).items()},
    )
    if mismatch:
        reason = f"site {site.name} refused round {server_round}: the global model {mismatch}"
        log(WARNING, "%s", reason)
        return Message(Error(code=0, reason=reason), reply_to=msg)
    load_wire_state(model, cfg, global_state)
    run_id, run_name = _run_key(msg)
    budget = resolve_budget(node, site.data_path)
    # Distributed DP: the round's mechanism (raises if SecAgg+ is off or the sum could wrap).
    ddp_round = (
        distributed_dp.site_round(
            cfg,
            {k: v.numpy() for k, v in global_state.items()},
            context.state.config_records.get(ROUND_KEY),
            run_uid=run_id,
            server_round=server_round,
        )
        if cfg.distributed_dp
        else None
    )
    ddp_event = ddp_round.event if ddp_round else None
    try:
        # Refuse BEFORE training when the round would take the site past its budget.
        guard = SiteLedger(budget, site=site.name)
        permit = guard.prepare(
            cfg=cfg,
            run_id=run_id,
            server_round=server_round,
            num_train=len(datasets["train"]),
            distributed=ddp_event,
        )
    except RoundRefused as refused:
        return _refuse(msg, site, server_round, refused)
    seed = _round_seed(msg, context, node, cfg, site, server_round, global_state, permit.plan)
    torch.manual_seed(seed)
    # One secure generator for the round's DP noise, batches and modality dropout (deployed).
    secure_rng = secure_randomness(node)
    device = pick_device()
    result = train_round(
        model,
        datasets["train"],
        cfg=cfg,
        plan=permit.plan,
        history=permit.run_events,
        seed=seed,
        device=device,
        secure_rng=secure_rng,
    )
    try:
        # Nothing leaves the site without its ledger entry (written atomically, budget
        # re-checked against anything another process appended meanwhile).
        entry = guard.record(
            cfg=cfg,
            run_id=run_id,
            run_name=run_name,
            server_round=server_round,
            result=result,
            global_model_hash=model_hash(global_state),
            distributed=ddp_event,
        )
    except RoundRefused as refused:
        return _refuse(msg, site, server_round, refused)
    plan = permit.plan
    epsilon = result.epsilon
    if ddp_event is not None and plan is None:  # distributed DP alone bounds this run's spend
        epsilon = epsilon_from_events([*permit.run_events, ddp_event], delta=cfg.target_delta)
    # What the server learns of this round by default: the FedAvg weight (masked under SecAgg+),
    # this run's epsilon and delta (what the run config asked for), the ledger head. The rest
    # (training size, loss, noise, steps, lifetime spend) only on the site's opt-in: together
    # they reveal the training-set size and the site's other uses of its data (README: Privacy).
    shared: dict[str, float | int] = {
        # Client-level DP bounds each site's share of the aggregate: equal weights.
        "num-examples": 1 if cfg.client_level_dp or cfg.distributed_dp else result.num_examples,
        "epsilon": epsilon,
        "delta": cfg.target_delta,
        "ledger-seq": entry.seq,
    }
    own = {
        "train-examples": result.num_examples,
        "train-loss": result.train_loss,
        "noise-multiplier": plan.noise_multiplier if plan else 0.0,
        "steps": sum(e.steps for e in permit.run_events) + (plan.steps_per_round if plan else 0),
    }
    # The site's own log also holds how long its local epochs took and where (cpu or cuda):
    # for the site's engineers and bench/real_data.py; it is not in `own`, so never in a reply.
    log_training(
        site.data_path,
        run_id=run_name or run_id,
        server_round=server_round,
        figures={**own, "train-seconds": round(result.seconds, 3), "device": device.type},
    )
    if node.share_site_metrics:
        shared.update({**own, **privacy_metrics(budget, permit, entry)})
    metrics = MetricRecord(shared)
    # The update: all but the fixed pretrained parts (common/models/pretrained.py).
    state = wire_state(model.to("cpu"), cfg)
    if cfg.client_level_dp:
        # Client-level DP: bound this site's update here, before it is sent (or masked).
        clip_update_(state, global_state, clip_norm=cfg.client_clip_norm)
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": metrics,
            "site": _site_record(site),
            # The head of the site's ledger, never its path (fedfuse audit checks it at the site).
            "ledger": ConfigRecord({"hash": entry.hash, "seq": entry.seq, "run-id": run_id}),
        }
    )
    if ddp_round is not None:
        # The noised integer vector the SecAgg+ mod masks (the model itself never leaves).
        content.array_records[VECTOR_KEY] = distributed_dp.noisy_vector(
            {k: v.numpy() for k, v in state.items()},
            {k: v.numpy() for k, v in global_state.items()},
            ddp_round,
            seed=seed,
            secure_rng=secure_rng,
        )
    return Message(content=content, reply_to=msg)


def secure_randomness(node: NodeConfig) -> SecureRandom | None:
    """A deployed site's DP noise (DP-SGD's and distributed DP's), Poisson batches and modality
    dropout come from a cryptographically secure generator with a fresh random key
    (common/privacy/secure_rng.py): nobody, the site's own secret included, can regenerate them.
    Virtual sites of a simulation (``partition-id``) keep the keyed generators, so that runs are
    reproducible (``noise-seed``)."""
    return None if node.simulated else SecureRandom()


def _round_seed(
    msg: Message,
    context: Context,
    node: NodeConfig,
    cfg: RunConfig,
    site: SiteInfo,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    plan: PrivacyPlan | None,
) -> int:
    """The seed of the round's randomness (DP noise, Poisson batches, modality dropout).

    Keyed with the site's secret over everything the server sent that shapes the update:
    unpredictable to the server, never reused on different inputs (so the ledger's composition
    of independent releases holds; common/privacy/site_secret.py). ``noise-seed = "public"``
    (simulation only) seeds from (seed, site, round), as controlled comparisons need.
    """
    if cfg.noise_seed == "public":
        if not node.simulated:
            raise ConfigError(
                f"site {site.name}: run config noise-seed = 'public' lets the server regenerate "
                "the site's DP noise; a deployed site accepts only noise-seed = 'secret'"
            )
        return cfg.seed * 1_000_003 + zlib.crc32(site.name.encode()) % 100_003 * 101 + server_round
    return round_seed(
        load_or_create_secret(site.data_path),
        {
            "site": site.name,
            "data": manifest_digest(site),
            "round": server_round,
            "model": model_hash(global_state),
            "config": {
                k: v
                for k, v in dict(msg.content["config"]).items()
                if seeds_noise(k, distributed_dp=cfg.distributed_dp)
            },
            "secagg-round": dict(context.state.config_records.get(ROUND_KEY, {})),
            "plan": dataclasses.asdict(plan) if plan else None,
        },
    )


def _run_key(msg: Message) -> tuple[str, str]:
    """(key of the run in the ledger, its name): the server's run uid survives a resumed run;
    without one (another server), Flower's run id."""
    config = msg.content["config"]
    uid = str(config.get("run-uid", "")) or f"flwr-{msg.metadata.run_id}"
    return uid, str(config.get("run-id", ""))


def _refuse(msg: Message, site: SiteInfo, server_round: int, refused: RoundRefused) -> Message:
    """A reply without an update: the refusal's fields (common/privacy/refusal.py), which the
    server records and leaves out of the round."""
    log(WARNING, "site %s refused round %s: %s", site.name, server_round, refused.why)
    refusal = _public_refusal(refused, site, server_round)
    content = RecordDict(
        {REFUSAL_KEY: ConfigRecord(refusal.to_record()), "site": _site_record(site)}
    )
    return Message(content=content, reply_to=msg)


def _public_refusal(refused: RoundRefused, site: SiteInfo, server_round: int) -> Refusal:
    """The refusal's fields, its why short and path-free as any reason that leaves the site
    (client/wire.py; the full text is in the site's log)."""
    refusal = refused.as_refusal(site=site.name, server_round=server_round)
    return dataclasses.replace(refusal, why=public_reason(refusal.why))


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's test split.

    The reply holds the site's evaluation-sums vector (common/evaluation.py), masked by SecAgg+
    when the run uses it; the site's own figures go to its local log (client/wire.py), and into
    the reply only when its node config sets ``share-site-metrics = true``.
    """
    limit_threads()
    cfg, server_round = _config(msg)
    node = NodeConfig.parse(context.node_config)
    site = resolve_site(node, cfg)
    _, datasets = site_data(site, cfg)
    model = _model(msg, cfg)
    device = pick_device()
    # One pass over the test split gives both the site's own figures and its sums vector.
    figures, sums = site_evaluation(model, datasets["test"], cfg=cfg, device=device)
    run_uid, run_name = _run_key(msg)
    log_evaluation(
        site.data_path, run_id=run_name or run_uid, server_round=server_round, figures=figures
    )
    content = RecordDict(
        {
            EVAL_SUMS_KEY: ArrayRecord({EVAL_SUMS_ARRAY: Array(sums)}),
            "site": _site_record(site),
        }
    )
    if node.share_site_metrics:
        content["metrics"] = MetricRecord(figures)
    return Message(content=content, reply_to=msg)
