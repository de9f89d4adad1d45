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
from flwr.app.message_type import MessageType
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
from fedfuse.server.round_record import EvalRound, RoundRecord, site_name
from fedfuse.server.rundir import RoundCallback, RunDirectory


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
    """Put in front of a Flower strategy: per-site records, update checks, run directory rows.

    Each round fills one typed :class:`RoundRecord` (``self.record``). Without SecAgg+ the
    replies arrive here; with SecAgg+ the wrapper in ``server/secagg.py`` runs the protocol
    and hands over what it produced through :meth:`note_site`, :meth:`apply_mean`,
    :meth:`finish_train` and :meth:`record_evaluation`.
    """

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
        self.record = RoundRecord()
        self.global_arrays: ArrayRecord | None = None
        self.client_dp = make_client_dp(run_dir.cfg, run_dir.rounds)
        self.eval_layout = EvalLayout.for_config(run_dir.cfg)
        self._t0 = time.time()
        # A resumed run: Flower's loop counts 1, 2, ...; the federation is at round offset + 1.
        self.round_offset = 0
        self.evaluated_arrays: ArrayRecord | None = None
        # Node id -> site name, from every reply that named its site: a later failure or
        # silence is reported by the site's name, not a bare node id.
        self.node_names: dict[int, str] = {}
        # How many sites were connected when the round's sites were sampled.
        self.available_nodes = 0
        self._expected: set[int] = set()

    def name_of(self, node_id: int) -> str:
        """The name a node gave for its site, else its node id."""
        return self.node_names.get(node_id) or f"node-{node_id}"

    def _site_of(self, msg: Message) -> str:
        if msg.has_content() and "site" in msg.content.config_records:
            name = site_name(msg)
            self.node_names[msg.metadata.src_node_id] = name
            return name
        return self.name_of(msg.metadata.src_node_id)

    def note_site(self, name: str, msg: Message) -> None:
        """Record a site whose update is in this round's aggregate: its metrics, its ledger head."""
        metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
        site = self.record.sites.setdefault(name, {})
        site.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        note_ledger(site, msg)

    def emit_round(self) -> None:
        """Write the round's record to the run directory and pass it to the callback."""
        row = self.record.to_row()
        self.run_dir.add_round(dict(row))
        if self.on_round is not None:
            self.on_round(dict(row))

    def seconds_so_far(self) -> float:
        """Seconds since this round's training was configured."""
        return round(time.time() - self._t0, 3)

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        server_round += self.round_offset
        self.global_arrays = arrays
        self.record = RoundRecord(round=server_round)
        self._t0 = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # Sites asked to train: one that never answers is reported, not silently dropped.
        self._expected = {m.metadata.dst_node_id for m in messages}
        self.available_nodes = len(list(grid.get_node_ids()))
        if self.client_dp is not None and messages:
            self.client_dp.begin_round(sampled=len(messages), available=self.available_nodes)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        answered = {m.metadata.src_node_id for m in replies}
        for nid in sorted(self._expected - answered):
            self.record.failed[self.name_of(nid)] = "no reply within the round's timeout"
            log(WARNING, "Round %s: %s sent no reply", server_round, self.name_of(nid))
        good: list[Message] = []
        for msg in replies:
            name = self._site_of(msg)
            if msg.has_error() or is_refusal(msg):
                name, why, refused = note_error(self.record, msg, name)
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
                self.record.rejected[name] = reason
                log(WARNING, "Round %s: update of site %s rejected: %s", server_round, name, reason)
                continue
            self.note_site(name, msg)
            good.append(msg)
        if self.client_dp is not None and good:
            good = self.client_dp.privatize_replies(
                good, self.global_arrays, weight_key=self.weighted_by_key
            )
            self.record.client_dp = self.client_dp.summary()
        arrays, metrics = super().aggregate_train(server_round, _common_metric_keys(good))
        return self.finish_train(server_round, arrays, metrics)

    def apply_mean(self, server_round: int, mean: ArrayRecord) -> ArrayRecord | None:
        """The strategy's server step on a mean aggregated elsewhere (SecAgg+), as round
        ``server_round`` (offset included): FedAvg and FedProx take the mean as the new model,
        FedAdam takes an Adam step towards it.

        Flower's strategies aggregate replies; the mean goes in as one reply of weight 1, whose
        weighted mean is the mean itself, so their own server step applies unchanged.
        """
        content = RecordDict({"arrays": mean, "metrics": MetricRecord({self.weighted_by_key: 1})})
        reply = Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = super().aggregate_train(server_round, [reply])  # type: ignore[misc]
        return arrays

    def finish_train(
        self, server_round: int, arrays: ArrayRecord | None, metrics: MetricRecord | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Close the training half of the round: stop the run if too few sites trained, else
        record the round's loss, largest epsilon and number of sites."""
        if arrays is not None and self.global_arrays is not None:
            arrays = match_dtypes(arrays, self.global_arrays)
        # Counted from the recorded sites: under SecAgg+ no replies reach the strategy; the
        # secure aggregation records the sites it summed and the ones that dropped (refusals
        # included), and raises its own failure first when a round cannot finish.
        trained = len(self.record.sites)
        stop = stop_reason(self.record, trained=trained, min_sites=self.min_train_nodes)
        if stop is not None:
            # Keep what happened in this round (refusals included) before stopping the run.
            self.record.num_sites, self.record.stopped = trained, stop
            self.emit_round()
            log(WARNING, "Stopping the run: %s", stop)
            raise FederationStopped(stop)
        if metrics is not None:
            loss = metrics.get("train-loss")
            self.record.train_loss = float(loss) if isinstance(loss, (int, float)) else None
        self.record.note_max_epsilon()
        self.record.num_sites = trained
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        # The model evaluated this round is the one a checkpoint of this round must hold.
        self.evaluated_arrays = arrays
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Without SecAgg+: each reply carries its evaluation-sums vector in the clear."""
        result = sum_clear_evaluations(list(replies), self.eval_layout)
        return self.record_evaluation(server_round + self.round_offset, result)

    def record_evaluation(self, server_round: int, result: EvalRound) -> MetricRecord | None:
        """Federation-wide figures from the summed vectors; per-site figures only from sites
        that opted in (``share-site-metrics``). Flower's metric averaging is not used: it
        needs every site to send the same metric keys, and a site's own figures by default.
        Writes the round's row and checkpoint."""
        for msg in result.contributors:
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is not None:
                self.record.sites.setdefault(site_name(msg), {}).update(
                    {
                        k: v
                        for k, v in metrics.items()
                        if k.startswith("eval-") and isinstance(v, (int, float))
                    }
                )
        for name, why in result.failed.items():
            self.record.eval_failed[name] = why
            log(WARNING, "Round %s: site %s did not evaluate: %s", server_round, name, why)
        agg: MetricRecord | None = None
        if result.total is not None and int(result.total[0]) > 0:
            figures = decode_sums(result.total, self.eval_layout)
            figures["eval-sites"] = float(len(result.contributors))
            # Average precision, operating point, calibration and bootstrap intervals from the
            # same pooled histograms (post-processing of the sum; common/clinical.py).
            clinical, diagrams = clinical_from_sums(result.total, self.eval_layout)
            figures.update(clinical)
            self.record.reliability = diagrams
            agg = MetricRecord(figures)  # type: ignore[arg-type]
            # eval-loss/-accuracy/-auroc, plus per-class AUROC and modality contributions.
            self.record.evaluation.update(
                {k: v for k, v in figures.items() if k.startswith("eval-")}
            )
        self.record.round = server_round
        self.record.seconds = self.seconds_so_far()
        self.run_dir.add_round(self.record.to_row())
        if self.evaluated_arrays is not None:
            save_checkpoint(
                self.run_dir, server_round=server_round, arrays=self.evaluated_arrays, strategy=self
            )
        log(
            INFO,
            "Round %s/%s done: test AUROC %s, max epsilon %s",
            server_round,
            self.run_dir.cfg.num_rounds,
            self.record.evaluation.get("eval-auroc"),
            self.record.max_epsilon,
        )
        if self.on_round is not None:
            self.on_round(self.record.to_row())
        return agg


class FedfuseFedAvg(SiteRecordingMixin, FedAvg):
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629)."""


class FedfuseFedProx(SiteRecordingMixin, FedProx):
    """FedProx (Li et al. 2020, arXiv:1812.06127): sites pull towards the global model."""


class FedfuseFedAdam(SiteRecordingMixin, FedAdam):
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295): Adam on the server over the mean update."""


STRATEGIES: dict[str, type[SiteRecordingMixin]] = {
    "fedavg": FedfuseFedAvg,
    "fedprox": FedfuseFedProx,
    "fedadam": FedfuseFedAdam,
}
