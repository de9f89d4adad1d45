"""FedAvg that records every site's metrics and privacy spend, and rejects bad updates.

Flower's FedAvg aggregates metrics into one weighted mean; a privacy tool must also keep each
site's own epsilon. Updates with NaN/Inf or the wrong shape are dropped, with the site named,
before they can poison the average.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedfuse.common.clinical import clinical_from_sums
from fedfuse.common.evaluation import EVAL_SUMS_ARRAY, EVAL_SUMS_KEY, EvalLayout, decode_sums
from fedfuse.server.checkpoint import save_checkpoint
from fedfuse.server.client_level_dp import make_client_dp
from fedfuse.server.privacy_report import (
    FederationStopped,
    is_refusal,
    named_site,
    note_error,
    note_ledger,
    stop_reason,
)
from fedfuse.server.rundir import RoundCallback, RunDirectory


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
        # No weight in the clear (SecAgg+ masks it): plain mean.
        w = float(rec.get(weighting_key, 1.0))  # type: ignore[arg-type]
        for k, v in rec.items():
            if k == weighting_key or not isinstance(v, (int, float)):
                continue
            if math.isfinite(float(v)):
                sums[k] = sums.get(k, 0.0) + w * float(v)
                weights[k] = weights.get(k, 0.0) + w
    out: dict[str, Any] = {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
    out[weighting_key] = sum(
        float(next(iter(rd.metric_records.values())).get(weighting_key, 1.0))  # type: ignore[arg-type]
        for rd in records
    )
    return MetricRecord(out)


@dataclass
class EvalRound:
    """One evaluation round as the server sees it: the sum of the sites' evaluation-sums
    vectors (None if no site contributed), the contributing replies (site names, and the
    figures of sites that opted in), and why the other sites left it out."""

    total: np.ndarray | None
    contributors: list[Message] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def sum_clear_evaluations(replies: list[Message], layout: EvalLayout) -> EvalRound:
    """Add up the evaluation vectors of replies that carry them in the clear (no SecAgg+)."""
    total = np.zeros(layout.length, dtype=np.int64)
    out = EvalRound(total=None)
    for msg in replies:
        name = site_name(msg)
        if msg.has_error():
            out.failed[named_site(str(msg.error.reason), name)] = str(msg.error.reason)
            continue
        rec = msg.content.array_records.get(EVAL_SUMS_KEY)
        vec = rec[EVAL_SUMS_ARRAY].numpy() if rec is not None and EVAL_SUMS_ARRAY in rec else None
        if vec is None or vec.shape != (layout.length,) or (vec.size and int(vec.min()) < 0):
            out.failed[name] = f"no well-formed '{EVAL_SUMS_KEY}' vector in the reply"
            continue
        total += vec.astype(np.int64)
        out.contributors.append(msg)
    out.total = total if out.contributors else None
    return out


def _common_metric_keys(replies: list[Message]) -> list[Message]:
    """The replies with only the metric keys every one of them has: a site that opted in to
    share more (``share-site-metrics``) must not make Flower's aggregation refuse the round."""
    keys: set[str] | None = None
    for msg in replies:
        for rec in msg.content.metric_records.values():
            keys = set(rec.keys()) if keys is None else keys & set(rec.keys())
    for msg in replies:
        for name, rec in list(msg.content.metric_records.items()):
            if keys is not None and set(rec.keys()) != keys:
                msg.content.metric_records[name] = MetricRecord(
                    {k: v for k, v in rec.items() if k in keys}
                )
    return replies


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
            if msg.has_error() or is_refusal(msg):
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
        arrays, metrics = super().aggregate_train(server_round, _common_metric_keys(good))
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
        self.eval_layout = EvalLayout.for_config(self.run_dir.cfg)
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def evaluation_sums(self, server_round: int, replies: list[Message]) -> EvalRound:
        """The round's summed evaluation vectors: from the secure round when the strategy runs
        one (server/secagg.py), else added up here from the replies (each in the clear)."""
        secure = getattr(super(), "evaluation_sums", None)
        if secure is not None:
            return secure(server_round, replies)
        return sum_clear_evaluations(replies, self.eval_layout)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federation-wide figures from the summed vectors; per-site figures only from sites
        that opted in (``share-site-metrics``). Flower's metric averaging is not used: it
        needs every site to send the same metric keys, and a site's own figures by default."""
        server_round += self.round_offset
        result = self.evaluation_sums(server_round, list(replies))
        sites = self.current.setdefault("sites", {})
        for msg in result.contributors:
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is not None:
                sites.setdefault(site_name(msg), {}).update(
                    {
                        k: v
                        for k, v in metrics.items()
                        if k.startswith("eval-") and isinstance(v, (int, float))
                    }
                )
        for name, why in result.failed.items():
            self.current.setdefault("eval-failed", {})[name] = why
            log(WARNING, "Round %s: site %s did not evaluate: %s", server_round, name, why)
        agg: MetricRecord | None = None
        if result.total is not None and int(result.total[0]) > 0:
            figures = decode_sums(result.total, self.eval_layout)
            figures["eval-sites"] = float(len(result.contributors))
            # Average precision, operating point, calibration and bootstrap intervals from the
            # same pooled histograms (post-processing of the sum; common/clinical.py).
            clinical, diagrams = clinical_from_sums(result.total, self.eval_layout)
            figures.update(clinical)
            self.current["reliability"] = diagrams
            agg = MetricRecord(figures)  # type: ignore[arg-type]
            # eval-loss/-accuracy/-auroc, plus per-class AUROC and modality contributions.
            self.current.update({k: v for k, v in figures.items() if k.startswith("eval-")})
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
        from fedfuse.common.secagg import SecAggSettings
        from fedfuse.server.secagg import secagg_variant

        cls = secagg_variant(cls, SecAggSettings.from_run_config(cfg))
    return cls(run_dir=run_dir, on_round=on_round, **common, **extra)
