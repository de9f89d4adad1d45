"""FedAvg that records every site's metrics and privacy spend, and rejects bad updates.

Flower's FedAvg aggregates metrics into one weighted mean; a privacy tool must also keep each
site's own epsilon. Updates with NaN/Inf or the wrong shape are dropped, with the site named,
before they can poison the average.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from server.checkpoint import save_checkpoint
from server.client_dp import make_client_dp
from server.privacy_report import FederationStopped, note_error, note_ledger, stop_reason
from server.rundir import RoundCallback, RunDirectory


def site_name(msg: Message) -> str:
    """The site's self-declared name, else its node id."""
    if msg.has_content() and "site" in msg.content.config_records:
        return str(msg.content.config_records["site"].get("name", msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def check_update(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why an update must be rejected (wrong keys/shapes, non-finite values), or None."""
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, arr in arrays.items():
        a = arr.numpy()
        if tuple(a.shape) != tuple(reference[key].shape):
            return f"'{key}' has shape {tuple(a.shape)}, expected {tuple(reference[key].shape)}"
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            return f"'{key}' contains NaN or Inf"
    return None


def match_dtypes(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each array cast to the dtype of the same key in ``reference``.

    Server optimisers compute in float64 (FedAdam's bias-corrected step is a numpy float64
    scalar, which promotes float32 arrays under NumPy 2); the sites check that the model they
    receive has their own dtypes, so the global model keeps the dtypes it started with.
    """
    if all(arrays[k].dtype == reference[k].dtype for k in arrays.keys() if k in reference):
        return arrays
    out = {}
    for key in arrays.keys():
        a = arrays[key].numpy()
        if key in reference and a.dtype != np.dtype(reference[key].dtype):
            a = a.astype(reference[key].dtype)
        out[key] = Array(np.ascontiguousarray(a))
    return ArrayRecord(out)


def aggregate_finite(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean of every metric over the sites where it is finite (a site whose test split
    has one class only reports AUROC NaN; it must not turn the mean into NaN)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rd in records:
        rec = next(iter(rd.metric_records.values()))
        w = float(rec[weighting_key])  # type: ignore[arg-type]
        for k, v in rec.items():
            if k == weighting_key or not isinstance(v, (int, float)):
                continue
            if math.isfinite(float(v)):
                sums[k] = sums.get(k, 0.0) + w * float(v)
                weights[k] = weights.get(k, 0.0) + w
    out: dict[str, Any] = {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
    out[weighting_key] = sum(
        float(next(iter(rd.metric_records.values()))[weighting_key])  # type: ignore[arg-type]
        for rd in records
    )
    return MetricRecord(out)


class SiteRecordingMixin:
    """Put in front of a Flower strategy: per-site records, update checks, run directory rows."""

    def __init__(
        self,
        *,
        run_dir: RunDirectory,
        on_round: RoundCallback | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_finite)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_finite)
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.run_dir = run_dir
        self.on_round = on_round
        self.current: dict[str, Any] = {}
        self.global_arrays: ArrayRecord | None = None
        self.client_dp = make_client_dp(run_dir.cfg, run_dir.rounds)
        self._t0 = time.time()
        # A resumed run: Flower's loop counts 1, 2, ...; the federation is at round offset + 1.
        self.round_offset = 0
        self.evaluated_arrays: ArrayRecord | None = None
        # Node id -> site name, from every reply that named its site: a later failure or
        # silence is reported by the site's name, not a bare node id.
        self._node_names: dict[int, str] = {}

    def _name_of(self, node_id: int) -> str:
        known = self._node_names.get(node_id) or getattr(self, "_secagg_names", {}).get(node_id)
        return known or f"node-{node_id}"

    def _site_of(self, msg: Message) -> str:
        if msg.has_content() and "site" in msg.content.config_records:
            name = site_name(msg)
            self._node_names[msg.metadata.src_node_id] = name
            return name
        return self._name_of(msg.metadata.src_node_id)

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        server_round += self.round_offset
        self.global_arrays = arrays
        self.current = {
            "round": server_round,
            "sites": {},
            "rejected": {},
            "failed": {},
            "refused": {},
        }
        self._t0 = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # Sites asked to train: one that never answers is reported, not silently dropped.
        self._expected = {m.metadata.dst_node_id for m in messages}
        if self.client_dp is not None:
            available = len(list(grid.get_node_ids()))
            self._available = available
            if messages:  # under SecAgg+ the workflow sampled the sites (server/secagg.py)
                self.client_dp.begin_round(sampled=len(messages), available=available)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        answered = {m.metadata.src_node_id for m in replies}
        for nid in sorted(getattr(self, "_expected", set()) - answered):
            self.current["failed"][self._name_of(nid)] = "no reply within the round's timeout"
            log(WARNING, "Round %s: %s sent no reply", server_round, self._name_of(nid))
        good: list[Message] = []
        for msg in replies:
            name = self._site_of(msg)
            if msg.has_error():
                name, why, refused = note_error(self.current, msg, name)
                what = "refused the round" if refused else "failed"
                log(WARNING, "Round %s: site %s %s: %s", server_round, name, what, why)
                continue
            arrays = msg.content.array_records.get("arrays")
            reason = (
                "no 'arrays' record in the reply"
                if arrays is None
                else check_update(arrays, self.global_arrays)
                if self.global_arrays is not None
                else None
            )
            if reason:
                self.current["rejected"][name] = reason
                log(WARNING, "Round %s: update of site %s rejected: %s", server_round, name, reason)
                continue
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            self.current["sites"].setdefault(name, {}).update(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            )
            note_ledger(self.current["sites"][name], msg)
            good.append(msg)
        if self.client_dp is not None and good:
            good = self.client_dp.privatize_replies(
                good, self.global_arrays, weight_key=self.weighted_by_key
            )
            self.current["client-dp"] = self.client_dp.summary()
        arrays, metrics = super().aggregate_train(server_round, good)
        if arrays is not None and self.global_arrays is not None:
            arrays = match_dtypes(arrays, self.global_arrays)
        # After aggregation, counted from the recorded sites: under SecAgg+ the replies here are
        # empty and the secure aggregation records the sites it summed, the ones that dropped
        # (refusals included), and raises its own failure first when a round cannot finish.
        trained = len(self.current["sites"])
        stop = stop_reason(self.current, trained=trained, min_sites=self.min_train_nodes)
        if stop is not None:
            # Keep what happened in this round (refusals included) before stopping the run.
            self.current.update({"num-sites": trained, "stopped": stop})
            self.run_dir.add_round(dict(self.current))
            if self.on_round is not None:
                self.on_round(dict(self.current))
            log(WARNING, "Stopping the run: %s", stop)
            raise FederationStopped(stop)
        if metrics is not None:
            self.current["train-loss"] = metrics.get("train-loss")
        eps = [s["epsilon"] for s in self.current["sites"].values() if "epsilon" in s]
        self.current["max-epsilon"] = max(eps) if eps else None
        # Counted from the recorded sites: under SecAgg+ the replies here are empty.
        self.current["num-sites"] = len(self.current["sites"])
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        # The model evaluated this round is the one a checkpoint of this round must hold.
        self.evaluated_arrays = arrays
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            site = self.current.setdefault("sites", {}).setdefault(self._site_of(msg), {})
            site.update(
                {
                    k: v
                    for k, v in metrics.items()
                    if k.startswith("eval-") and isinstance(v, (int, float))
                }
            )
        agg = super().aggregate_evaluate(server_round, replies)
        if agg is not None:
            # eval-loss/-accuracy/-auroc, plus per-class AUROC and modality contributions.
            self.current.update({k: v for k, v in agg.items() if k.startswith("eval-")})
        self.current["round"] = server_round
        self.current["seconds"] = round(time.time() - self._t0, 3)
        self.run_dir.add_round(dict(self.current))
        if self.evaluated_arrays is not None:
            save_checkpoint(
                self.run_dir, server_round=server_round, arrays=self.evaluated_arrays, strategy=self
            )
        log(
            INFO,
            "Round %s/%s done: test AUROC %s, max epsilon %s",
            server_round,
            self.run_dir.cfg.num_rounds,
            self.current.get("eval-auroc"),
            self.current.get("max-epsilon"),
        )
        if self.on_round is not None:
            self.on_round(dict(self.current))
        return agg


class FedfuseFedAvg(SiteRecordingMixin, FedAvg):
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629)."""


class FedfuseFedProx(SiteRecordingMixin, FedProx):
    """FedProx (Li et al. 2020, arXiv:1812.06127): sites pull towards the global model."""


class FedfuseFedAdam(SiteRecordingMixin, FedAdam):
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295): Adam on the server over the mean update."""


STRATEGIES: dict[str, type] = {
    "fedavg": FedfuseFedAvg,
    "fedprox": FedfuseFedProx,
    "fedadam": FedfuseFedAdam,
}


def make_strategy(
    cfg: Any, *, run_dir: RunDirectory, on_round: RoundCallback | None, **common: Any
) -> FedAvg:
    """The strategy the run config names, with its own hyper-parameters from the config."""
    extra: dict[str, Any] = {}
    if cfg.strategy == "fedprox":
        extra["proximal_mu"] = cfg.proximal_mu
    elif cfg.strategy == "fedadam":
        extra["eta"] = cfg.server_learning_rate
    cls = STRATEGIES[cfg.strategy]
    if cfg.secagg:  # the strategy then only ever holds the masked sum (server/secagg.py)
        from common.secagg import SecAggSettings
        from server.secagg import secagg_variant

        cls = secagg_variant(cls, SecAggSettings.from_run_config(cfg))
    return cls(run_dir=run_dir, on_round=on_round, **common, **extra)
