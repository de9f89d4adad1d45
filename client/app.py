"""The fedfuse ClientApp: wiring only; the logic is in client.training and client.site."""

from __future__ import annotations

import zlib

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secagg_mod import secaggplus_mod
from client.site import PrivacyState, SiteInfo, resolve_site, site_data
from client.training import limit_threads, pick_device, plan_site_privacy, train_round
from common.config import RunConfig
from common.metrics import evaluate as evaluate_model
from common.models import build_model

app = ClientApp()

# Keys the server adds to the run config it forwards; not part of RunConfig.
_SERVER_KEYS = ("server-round",)


def _config(msg: Message) -> tuple[RunConfig, int]:
    raw = dict(msg.content["config"])
    server_round = int(raw.get("server-round", 0))  # type: ignore[arg-type]
    for k in _SERVER_KEYS:
        raw.pop(k, None)
    return RunConfig.from_mapping(raw), server_round


def _model(msg: Message, cfg: RunConfig) -> torch.nn.Module:
    model = build_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _site_record(site: SiteInfo) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


# SecAgg+: the trained model leaves the site only masked (client/secagg_mod.py).
@app.train(mods=[secaggplus_mod])
def train(msg: Message, context: Context) -> Message:
    """One round of DP training on the site's train split."""
    limit_threads()
    cfg, server_round = _config(msg)
    site = resolve_site(dict(context.node_config), cfg)
    _, datasets = site_data(site, cfg)
    model = _model(msg, cfg)
    state = PrivacyState.load(context)
    if cfg.private and state is None:
        # First round at this site: plan the noise for ALL rounds of the run, once.
        state = PrivacyState(plan_site_privacy(cfg=cfg, num_train=len(datasets["train"])), [])
    plan = state.plan if cfg.private and state is not None else None
    # Seeded per (run seed, site, round): reproducible simulations; differs across sites.
    seed = cfg.seed * 1_000_003 + zlib.crc32(site.name.encode()) % 100_003 * 101 + server_round
    torch.manual_seed(seed)
    result = train_round(
        model,
        datasets["train"],
        cfg=cfg,
        plan=plan,
        history=state.events if state else [],
        seed=seed,
        device=pick_device(),
    )
    if state is not None and result.event is not None:
        state.events.append(result.event)
        state.save(context)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.train_loss,
            "epsilon": result.epsilon,
            "delta": cfg.target_delta,
            "noise-multiplier": plan.noise_multiplier if plan else 0.0,
            "steps": sum(e.steps for e in state.events) if state else 0,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.to("cpu").state_dict()),
            "metrics": metrics,
            "site": _site_record(site),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's test split (metrics only leave the site)."""
    limit_threads()
    cfg, _ = _config(msg)
    site = resolve_site(dict(context.node_config), cfg)
    _, datasets = site_data(site, cfg)
    model = _model(msg, cfg)
    res = evaluate_model(model.to(pick_device()), datasets["test"], device=pick_device())
    metrics = MetricRecord(
        {
            "num-examples": res["num-examples"],
            "eval-loss": res["loss"],
            "eval-accuracy": res["accuracy"],
            "eval-auroc": res["auroc"],
        }
    )
    content = RecordDict({"metrics": metrics, "site": _site_record(site)})
    return Message(content=content, reply_to=msg)
