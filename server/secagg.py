"""The server's half of SecAgg+ on Flower's Message API, and the wrapper that trains through it.

:class:`SecAggPlusWorkflow` runs one round of the protocol over a Grid (setup, share keys,
collect masked vectors, unmask; see ``client/secagg_mod.py`` for the site's half) and returns
only the weighted mean update: the server never holds one site's update in the clear, only
masked vectors and their sum. Sites that vanish after sharing their keys are tolerated while
every site keeps at least ``threshold`` live neighbours; below that the round fails, loudly.

Unlike Flower's legacy ``SecAggPlusWorkflow`` this needs no ``LegacyContext``, masks the model
*update* (trained minus global, a smaller range than the weights), removes only the masks a
dropped site really added, and lets sites refuse unsafe parameters or a NaN update.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedfuse.common.errors import ConfigError
from fedfuse.common.privacy.refusal import Refusal
from fedfuse.common.secagg import crypto, masking
from fedfuse.common.secagg import distributed_dp as ddp_mech
from fedfuse.common.secagg.params import RoundParams, SecAggSettings
from fedfuse.common.secagg.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    MASKED_ARRAY,
    MASKED_KEY,
    RECORD_KEY,
    REFUSAL_KEY,
    RES,
    Key,
    SecAggRoundFailed,
    Stage,
    check_record,
)
from fedfuse.server.distributed_dp import DistributedDp
from fedfuse.server.privacy_report import FederationStopped, named_site, note_error
from fedfuse.server.round_record import EvalRound, site_name
from fedfuse.server.strategy import SiteRecordingMixin


@dataclass
class SecAggOutcome:
    """What one secure round produced. ``error`` set means it failed (``arrays`` is None)."""

    arrays: ArrayRecord | None = None
    params: RoundParams | None = None
    # Collect-stage replies whose masked vectors are in the sum (metrics and site record only).
    accepted: list[Message] = field(default_factory=list)
    # Node id -> why it left the round (no reply, error) and at which stage.
    dropped: dict[int, str] = field(default_factory=dict)
    # Node id -> its error reply, for those that left with one (e.g. a budget refusal).
    errors: dict[int, Message] = field(default_factory=dict)
    # Node id -> why its contribution was left out (refused by the site, malformed vector).
    rejected: dict[int, str] = field(default_factory=dict)
    # Node id -> the refusal it sent at setup, before any key exchange (its budget), or at
    # collect (then also in ``rejected``: its masks are removed like a dropout's).
    refused: dict[int, Refusal] = field(default_factory=dict)
    # The stage at which the round failed (None while it has not).
    failed_stage: str | None = None
    # Node id -> site name, from every reply that carried a site record.
    names: dict[int, str] = field(default_factory=dict)
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # Distributed DP: the round's mechanism (None for plain SecAgg+).
    ddp_spec: ddp_mech.DdpSpec | None = None
    # An evaluation round: the sum of the sites' evaluation-sums vectors.
    sums: np.ndarray | None = None


class SecAggPlusWorkflow:
    """One SecAgg+ round over a Message-API Grid (Bell et al. 2020, arXiv:2002.04156).

    Parameters
    ----------
    settings
        The run's secure-aggregation settings (validated run-config keys).
    rng
        Shuffles the sites before they are placed on the neighbour ring; pass a seeded
        ``random.Random`` for reproducible tests. The ring is public, so no secret randomness
        is needed.
    """

    def __init__(
        self,
        settings: SecAggSettings,
        *,
        rng: random.Random | None = None,
        ddp: DistributedDp | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        # Distributed DP: sites mask noised integer vectors instead of quantised updates.
        self.ddp = ddp

    def __call__(
        self,
        grid: Grid,
        *,
        node_ids: Iterable[int],
        arrays: ArrayRecord,
        config: ConfigRecord,
        server_round: int,
        names: Mapping[int, str] | None = None,
        sums_length: int | None = None,
    ) -> SecAggOutcome:
        """Train the sampled ``node_ids`` on ``arrays`` and securely aggregate their updates.

        With ``sums_length``, an evaluation round instead: the sites evaluate ``arrays`` and the
        outcome's ``sums`` is the sum of their evaluation-sums vectors (common/evaluation.py).
        """
        ids = list(dict.fromkeys(node_ids))
        out = SecAggOutcome(names=dict(names or {}))
        try:
            params = self.settings.for_round(len(ids))
            if self.ddp is not None and sums_length is None:
                # Refused before any site trains when the noisy sum could wrap around.
                out.ddp_spec = self.ddp.spec({k: arrays[k].numpy() for k in arrays.keys()})
                out.ddp_spec.check_modulus(
                    num_sites=len(ids), threshold=params.threshold, modulus=params.modulus_range
                )
        except ConfigError as exc:
            out.error = str(exc)
            return out
        out.params = params
        rnd = _Round(self, grid, ids, params, arrays, config, server_round, out, sums_length)
        log(
            INFO,
            "SecAgg+ round %s: %s sites, %s shares each, threshold %s",
            server_round,
            len(ids),
            params.share_num,
            params.threshold,
        )
        for stage, step in (
            (Stage.SETUP, rnd.setup),
            (Stage.SHARE_KEYS, rnd.share_keys),
            (Stage.COLLECT_MASKED_VECTORS, rnd.collect),
            (Stage.UNMASK, rnd.unmask),
        ):
            t0 = time.perf_counter()
            ok = step()
            out.seconds[stage] = round(time.perf_counter() - t0, 4)
            if not ok:
                log(ERROR, "SecAgg+ round %s failed at %s: %s", server_round, stage, out.error)
                out.arrays = None
                out.failed_stage = stage
                return out
        return out


class _Round:
    """The state of one secure round on the server: who is still in, and what they sent."""

    def __init__(
        self,
        wf: SecAggPlusWorkflow,
        grid: Grid,
        ids: list[int],
        params: RoundParams,
        arrays: ArrayRecord,
        config: ConfigRecord,
        server_round: int,
        out: SecAggOutcome,
        sums_length: int | None = None,
    ) -> None:
        self.grid, self.params, self.arrays, self.config = grid, params, arrays, config
        self.round, self.out, self.timeout = server_round, out, wf.settings.timeout
        self.sampled = set(ids)
        ring = list(ids)
        wf.rng.shuffle(ring)
        n, k = len(ring), params.share_num
        # Each site's neighbours (itself included): everyone when k = n (SecAgg), else the k
        # nearest on a random ring (SecAgg+). The relation is symmetric.
        self.nbrs: dict[int, set[int]] = {
            nid: set(ring) if k >= n else {ring[(i + d) % n] for d in range(-(k // 2), k // 2 + 1)}
            for i, nid in enumerate(ring)
        }
        self.pk1: dict[int, bytes] = {}
        self.pk2: dict[int, bytes] = {}
        self.u1: set[int] = set()  # sent public keys
        self.u2: set[int] = set()  # shared their secrets
        self.u3: set[int] = set()  # uploaded a valid masked vector
        self.forward: dict[int, tuple[list[int], list[bytes]]] = {}
        self.total: np.ndarray | None = None
        self.ref = {k: arrays[k].numpy() for k in arrays.keys()}
        self.spec = out.ddp_spec
        self.sums_length = sums_length
        self.message_type = MessageType.TRAIN if sums_length is None else MessageType.EVALUATE
        self.length = (
            sums_length
            if sums_length is not None
            else 1 + self.spec.padded
            if self.spec is not None
            else masking.vector_length(self.ref)
        )

    # -- helpers ---------------------------------------------------------------------------

    def name(self, nid: int) -> str:
        return self.out.names.get(nid, f"node-{nid}")

    def exchange(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """Send one stage's messages; return the well-formed replies by node, note the rest."""
        messages = [
            Message(
                content=content,
                dst_node_id=nid,
                message_type=self.message_type,
                group_id=str(self.round),
            )
            for nid, content in contents.items()
        ]
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        ok: dict[int, Message] = {}
        for msg in replies:
            nid = msg.metadata.src_node_id
            if nid not in contents or nid in ok:
                continue
            if msg.has_error():
                self.out.dropped[nid] = f"{stage}: {msg.error.reason}"
                self.out.errors[nid] = msg
                continue
            if "site" in msg.content.config_records:
                self.out.names[nid] = site_name(msg)
            rec = msg.content.config_records.get(RECORD_KEY)
            if stage == Stage.SETUP and rec is not None and Key.REFUSED in rec:
                try:
                    refusal = Refusal.from_record(msg.content.config_records[REFUSAL_KEY])
                except (KeyError, TypeError, ValueError) as exc:
                    self.out.dropped[nid] = f"{stage}: malformed refusal: {exc}"
                    continue
                self.out.refused[nid] = refusal
                self.out.names[nid] = refusal.site
                continue
            try:
                if rec is None:
                    raise KeyError(f"the reply has no '{RECORD_KEY}' record")
                if rec.get(Key.STAGE) != stage:
                    raise ValueError(f"the reply is for stage {rec.get(Key.STAGE)!r}")
                check_record(rec, stage, RES)
            except (KeyError, TypeError, ValueError) as exc:
                self.out.dropped[nid] = f"{stage}: malformed reply: {exc}"
                continue
            ok[nid] = msg
        for nid in contents:
            if nid not in ok and nid not in self.out.dropped and nid not in self.out.refused:
                self.out.dropped[nid] = f"{stage}: no reply within {self.timeout:g} s"
        for nid in set(contents) - set(ok):
            if nid in self.out.refused:
                log(
                    WARNING,
                    "SecAgg+ %s: site %s refused the round before the key exchange: %s",
                    stage,
                    self.name(nid),
                    self.out.refused[nid].why,
                )
                continue
            log(
                WARNING,
                "SecAgg+ %s: site %s left the round: %s",
                stage,
                self.name(nid),
                self.out.dropped.get(nid) or self.out.rejected.get(nid),
            )
        return ok

    def enough(self, stage: str, owners: set[int], alive: set[int]) -> bool:
        """Does every site in ``owners`` keep ``threshold`` neighbours in ``alive``?"""
        t = self.params.threshold
        for nid in sorted(owners):
            live = len(self.nbrs[nid] & alive)
            if live < t:
                self.out.error = (
                    f"after stage {stage}, {len(alive)} of {len(self.sampled)} sites remain and "
                    f"site {self.name(nid)} keeps {live} live neighbours (itself included), "
                    f"fewer than the reconstruction threshold {t}"
                )
                return False
        return True

    def record(self, stage: str, body: dict[str, Any]) -> RecordDict:
        return RecordDict({RECORD_KEY: ConfigRecord({Key.STAGE: stage, **body})})

    # -- the four stages -------------------------------------------------------------------

    def setup(self) -> bool:
        body = self.params.to_record()
        contents = {}
        for nid in self.sampled:
            content = self.record(Stage.SETUP, body)
            # The run config lets a site decide now whether it will refuse the round (budget).
            content.config_records[CONFIG_KEY] = self.config
            contents[nid] = content
        replies = self.exchange(Stage.SETUP, contents)
        for nid, msg in list(replies.items()):
            rec = msg.content.config_records[RECORD_KEY]
            pk1, pk2 = rec[Key.PK1], rec[Key.PK2]
            if not (crypto.is_public_key(pk1) and crypto.is_public_key(pk2)) or pk1 == pk2:
                self.out.dropped[nid] = (
                    f"{Stage.SETUP}: malformed reply: '{Key.PK1}'/'{Key.PK2}' must be two "
                    f"different {crypto.KEY_BYTES}-byte X25519 public keys of large order"
                )
                log(
                    WARNING,
                    "SecAgg+ setup: site %s left the round: %s",
                    self.name(nid),
                    self.out.dropped[nid],
                )
                del replies[nid]
                continue
            self.pk1[nid], self.pk2[nid] = pk1, pk2  # type: ignore[assignment]
        self.u1 = set(replies)
        return self.enough(Stage.SETUP, self.u1, self.u1)

    def share_keys(self) -> bool:
        contents = {}
        for nid in self.u1:
            ids = sorted(self.nbrs[nid] & self.u1)
            contents[nid] = self.record(
                Stage.SHARE_KEYS,
                {
                    Key.NODE_IDS: ids,
                    Key.PK1_LIST: [self.pk1[i] for i in ids],
                    Key.PK2_LIST: [self.pk2[i] for i in ids],
                },
            )
        replies = self.exchange(Stage.SHARE_KEYS, contents)
        sent: dict[int, tuple[list[int], list[bytes]]] = {}
        for nid, msg in replies.items():
            rec = msg.content.config_records[RECORD_KEY]
            dsts: list[int] = list(rec[Key.DESTINATIONS])  # type: ignore[arg-type]
            if sorted(dsts) != sorted(self.nbrs[nid] & self.u1 - {nid}):
                self.out.dropped[nid] = (
                    f"{Stage.SHARE_KEYS}: malformed reply: shares addressed to {sorted(dsts)}, "
                    "not to its neighbours"
                )
                continue
            sent[nid] = (dsts, list(rec[Key.CIPHERTEXTS]))  # type: ignore[arg-type]
        self.u2 = set(sent)
        self.forward = {nid: ([], []) for nid in self.u2}
        for src, (dsts, ctxts) in sent.items():
            for dst, ctxt in zip(dsts, ctxts, strict=True):
                if dst in self.u2:
                    self.forward[dst][0].append(src)
                    self.forward[dst][1].append(ctxt)
        return self.enough(Stage.SHARE_KEYS, self.u2, self.u2)

    def collect(self) -> bool:
        contents = {}
        for nid in self.u2:
            srcs, ctxts = self.forward[nid]
            content = self.record(
                Stage.COLLECT_MASKED_VECTORS, {Key.SOURCES: srcs, Key.CIPHERTEXTS: ctxts}
            )
            content.array_records[ARRAYS_KEY] = self.arrays
            content.config_records[CONFIG_KEY] = self.config
            contents[nid] = content
        replies = self.exchange(Stage.COLLECT_MASKED_VECTORS, contents)
        m = self.params.modulus_range
        total = np.zeros(self.length, dtype=np.uint32)  # wraps modulo 2**32 (see masking.prg)
        for nid, msg in replies.items():
            rec = msg.content.config_records[RECORD_KEY]
            if Key.REFUSED in rec:
                self.out.rejected[nid] = f"the site refused to upload: {rec[Key.REFUSED]}"
                if REFUSAL_KEY in msg.content.config_records:  # its budget: the fields
                    try:
                        refusal = Refusal.from_record(msg.content.config_records[REFUSAL_KEY])
                        self.out.refused[nid] = refusal
                    except (KeyError, TypeError, ValueError):
                        pass  # stays a plain refusal to upload
                continue
            reason, vec = self.check_vector(msg.content.array_records.get(MASKED_KEY), m)
            if reason:
                self.out.rejected[nid] = reason
                continue
            total += vec
            self.u3.add(nid)
            self.out.accepted.append(msg)
        for nid, reason in self.out.rejected.items():
            log(WARNING, "SecAgg+: contribution of site %s rejected: %s", self.name(nid), reason)
        self.total = total
        return self.enough(Stage.COLLECT_MASKED_VECTORS, self.u2, self.u3)

    def check_vector(self, rec: ArrayRecord | None, m: int) -> tuple[str | None, Any]:
        if rec is None or MASKED_ARRAY not in rec:
            return f"the reply holds no masked vector ('{MASKED_KEY}')", None
        arr = rec[MASKED_ARRAY]
        if arr.dtype != "uint32" or tuple(arr.shape) != (self.length,):
            return (
                f"the masked vector has dtype {arr.dtype} and shape {tuple(arr.shape)}; "
                f"expected uint32 and ({self.length},) for this model"
            ), None
        vec = arr.numpy()
        if vec.size and int(vec.max()) >= m:
            return f"the masked vector has entries >= modulus-range {m}", None
        return None, vec

    def unmask(self) -> bool:
        dead = self.u2 - self.u3
        contents = {
            nid: self.record(
                Stage.UNMASK,
                {
                    Key.ACTIVE: sorted(self.nbrs[nid] & self.u3),
                    Key.DEAD: sorted(self.nbrs[nid] & dead),
                },
            )
            for nid in self.u3
        }
        replies = self.exchange(Stage.UNMASK, contents)
        shares: dict[int, list[bytes]] = {nid: [] for nid in self.u2}
        for nid, msg in replies.items():
            rec = msg.content.config_records[RECORD_KEY]
            owners: list[int] = list(rec[Key.SHARE_OWNERS])  # type: ignore[arg-type]
            asked = self.nbrs[nid] & self.u2
            if not set(owners) <= asked or len(set(owners)) != len(owners):
                self.out.dropped[nid] = f"{Stage.UNMASK}: malformed reply: shares of {owners}"
                continue
            for owner, share in zip(owners, rec[Key.SHARES], strict=True):  # type: ignore[arg-type]
                shares[owner].append(share)  # type: ignore[arg-type]
        p = self.params
        total = self.total
        assert total is not None
        for nid in sorted(self.u2):
            if nid in dead and not self.nbrs[nid] & self.u3:
                continue  # nobody in the sum holds a mask shared with it
            if len(shares[nid]) < p.threshold:
                self.out.error = (
                    f"after stage {Stage.UNMASK}, only {len(shares[nid])} shares of site "
                    f"{self.name(nid)}'s {'key' if nid in dead else 'mask seed'} arrived, fewer "
                    f"than the reconstruction threshold {p.threshold}"
                )
                return False
            try:
                secret = crypto.combine_shares(shares[nid][: p.threshold])
            except ValueError:
                secret = b""
            if nid in self.u3:
                if len(secret) != crypto.SECRET_BYTES:
                    self.out.error = f"the mask seed of site {self.name(nid)} did not reconstruct"
                    return False
                total -= masking.prg(secret, self.length)
                continue
            # A dropped site: remove the pairwise masks its live neighbours added.
            if len(secret) != crypto.KEY_BYTES or crypto.public_key_of(secret) != self.pk1[nid]:
                self.out.error = f"the masking key of site {self.name(nid)} did not reconstruct"
                return False
            for other in sorted(self.nbrs[nid] & self.u3):
                mask = masking.prg(crypto.mask_seed(secret, self.pk1[other]), self.length)
                if other > nid:
                    total -= mask
                else:
                    total += mask
        if self.sums_length is not None:
            # Evaluation: non-negative integer sums that cannot wrap (each site checked its own).
            self.out.sums = masking.mod(total, p.modulus_range).astype(np.int64)
            return True
        try:
            if self.spec is not None:
                # Distributed DP: the sum is already noised; centre, unscale, unrotate.
                noisy_sum = ddp_mech.decode_sum(
                    masking.mod(total, p.modulus_range),
                    self.spec,
                    num_sites=len(self.u3),
                    threshold=p.threshold,
                    modulus=p.modulus_range,
                    seed=ddp_mech.rotation_seed(
                        str(self.config.get("run-uid", "")),
                        int(self.config.get("server-round", self.round)),  # type: ignore[arg-type]
                    ),
                )
                mean = noisy_sum / len(self.u3)
            else:
                _, mean = masking.decode(masking.mod(total, p.modulus_range), len(self.u3), p)
        except ValueError as exc:
            self.out.error = str(exc)
            return False
        keys = masking.float_keys(self.ref)
        delta = masking.unflatten(mean, self.ref, keys)
        new = {
            k: Array((self.ref[k] + delta[k]).astype(self.ref[k].dtype) if k in delta else a)
            for k, a in self.ref.items()
        }
        self.out.arrays = ArrayRecord(new)  # type: ignore[arg-type]
        log(
            INFO,
            "SecAgg+ round %s: unmasked the sum of %s sites (%s dropped after sharing keys)",
            self.round,
            len(self.u3),
            len(dead),
        )
        return True


class SecAggPlusStrategy(Strategy):
    """A fedfuse strategy whose rounds aggregate through SecAgg+ (wraps it, as Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy).

    The wrapped strategy samples the sites and builds the round's config (FedProx's ``mu``
    included); this wrapper runs the four-stage protocol on them and gives the wrapped strategy
    only the unmasked mean, to which its own server step applies (FedAdam's optimiser), and the
    sites' metrics, ledger heads, dropouts and refusals for its round record.

    ``Strategy.start`` sends what ``configure_train`` returns in a single exchange; SecAgg+ needs
    four, so the protocol runs inside ``configure_train`` (which has the Grid) and ``start``'s own
    exchange is left empty. A round that cannot finish is recorded, then raises
    :class:`SecAggRoundFailed`: the run stops with the previous model. Evaluation is a SecAgg+
    round of its own: the server learns only the sum of the sites' evaluation-sums vectors.
    """

    def __init__(
        self,
        strategy: SiteRecordingMixin,
        settings: SecAggSettings,
        *,
        rng: random.Random | None = None,
        ddp: DistributedDp | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.settings = settings
        # Shuffles the neighbour ring; tests pin it. The ring is public: no secret randomness.
        self.rng = rng
        # Distributed DP: sites mask noised integer vectors instead of quantised updates.
        self.ddp = ddp
        self._train: SecAggOutcome | None = None
        self._eval: SecAggOutcome | None = None

    def __repr__(self) -> str:
        return f"SecAggPlusStrategy({self.strategy!r})"

    def summary(self) -> None:
        log(INFO, "\t├──> SecAgg+ settings: %s", self.settings)
        self.strategy.summary()  # type: ignore[attr-defined]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        inner = self.strategy
        messages = list(inner.configure_train(server_round, arrays, config, grid))
        self._train = None
        if not messages:
            return []
        server_round += inner.round_offset
        workflow = SecAggPlusWorkflow(self.settings, rng=self.rng, ddp=self.ddp)
        outcome = workflow(
            grid,
            node_ids=[m.metadata.dst_node_id for m in messages],
            arrays=arrays,
            # The config the strategy built for the round (FedProx adds its mu).
            config=messages[0].content.config_records.get("config", config),
            server_round=server_round,
            names=inner.node_names,
        )
        inner.node_names.update(outcome.names)
        self._train = outcome
        # Record the round's sites now: the strategy's own checks (min-sites) run on them in
        # aggregate_train, and no replies of their own reach it.
        self._note_outcome(outcome)
        if outcome.error is not None:
            if outcome.refused and outcome.failed_stage == Stage.SETUP:
                self._stop(server_round, outcome)
            self._fail(server_round, outcome.error)
        if self.ddp is not None and outcome.ddp_spec is not None and outcome.params is not None:
            self.ddp.account(
                outcome.ddp_spec,
                threshold=outcome.params.threshold,
                sampled=outcome.params.sample_num,
                available=inner.available_nodes,
            )
            inner.record.distributed_dp = self.ddp.summary()
        return []

    def _note_outcome(self, outcome: SecAggOutcome) -> None:
        inner, record = self.strategy, self.strategy.record
        for nid, reason in outcome.dropped.items():
            if nid in outcome.errors:  # an error reply
                note_error(record, outcome.errors[nid], inner.name_of(nid))
            else:
                record.failed[named_site(reason, inner.name_of(nid))] = reason
        for refusal in outcome.refused.values():
            record.refused[refusal.site] = refusal.why
            record.refusals[refusal.site] = refusal.to_record()
        for nid, reason in outcome.rejected.items():
            if nid not in outcome.refused:  # a refusal at collect is recorded as one above
                record.rejected[inner.name_of(nid)] = reason
        for msg in outcome.accepted:
            inner.note_site(inner.name_of(msg.metadata.src_node_id), msg)
        record.secagg = {
            "sites": len(outcome.accepted),
            "dropped": len(outcome.dropped),
            "rejected": len(outcome.rejected),
            "threshold": outcome.params.threshold if outcome.params else None,
            "seconds": outcome.seconds,
        }

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The unmasked mean, through the wrapped strategy's server step (``replies`` is empty:
        the sites answered the protocol's own exchanges)."""
        inner, outcome = self.strategy, self._train
        server_round += inner.round_offset
        arrays, metrics = None, None
        if outcome is not None and outcome.arrays is not None:
            metrics = inner.train_metrics_aggr_fn(
                [m.content for m in outcome.accepted], inner.weighted_by_key
            )
            mean = outcome.arrays
            if inner.client_dp is not None and outcome.accepted:
                mean = self._client_level_noise(outcome)
            arrays = inner.apply_mean(server_round, mean)
        return inner.finish_train(server_round, arrays, metrics)

    def _client_level_noise(self, outcome: SecAggOutcome) -> ArrayRecord:
        """Client-level DP under SecAgg+: sites clipped their updates and sent weight 1, so the
        unmasked aggregate is the mean of clipped models; the noise goes on the sum."""
        inner = self.strategy
        client_dp, global_arrays = inner.client_dp, inner.global_arrays
        assert client_dp is not None and global_arrays is not None and outcome.arrays is not None
        # A site that uploaded, then missed unmask, is both accepted and dropped: count once.
        accepted = {m.metadata.src_node_id for m in outcome.accepted}
        sampled = len(accepted | set(outcome.dropped) | set(outcome.rejected))
        client_dp.begin_round(sampled=sampled, available=inner.available_nodes or sampled)
        global_state = global_arrays.to_torch_state_dict()
        noisy = client_dp.noisy_mean_from_sum(
            global_state,
            mean_to_delta_sum(
                outcome.arrays.to_torch_state_dict(), global_state, len(outcome.accepted)
            ),
        )
        inner.record.client_dp = client_dp.summary()
        return ArrayRecord(noisy)

    def _stop(self, server_round: int, outcome: SecAggOutcome) -> None:
        """Sites refused before the key exchange and too few are left for secure aggregation:
        a clean stop (nobody trained, nobody is charged), with the refusals as the reason."""
        record = self.strategy.record
        refused = "; ".join(f"{n} refused: {why}" for n, why in record.refused.items())
        params = outcome.params
        left = params.sample_num - len(outcome.refused) - len(outcome.dropped) if params else 0
        reason = (
            f"round {server_round}: {left} site(s) left to train after refusals, fewer than "
            f"secure aggregation's reconstruction threshold {params.threshold if params else 2} "
            f"({refused})"
        )
        record.num_sites, record.stopped = 0, reason
        self.strategy.emit_round()
        log(WARNING, "Stopping the run: %s", reason)
        raise FederationStopped(reason)

    def _fail(self, server_round: int, error: str) -> None:
        reason = (
            f"secure aggregation failed in round {server_round}: {error}. "
            "The global model of the previous round is kept."
        )
        log(ERROR, "%s", reason)
        record = self.strategy.record
        record.status, record.error, record.num_sites = "failed", reason, 0
        record.note_max_epsilon()
        # Record the failed round: its privacy spend is real.
        record.seconds = self.strategy.seconds_so_far()
        self.strategy.emit_round()
        raise SecAggRoundFailed(reason)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Run the round's evaluation as a SecAgg+ round of its own: the server learns only
        the sum of the sites' evaluation-sums vectors (common/evaluation.py)."""
        inner = self.strategy
        messages = list(inner.configure_evaluate(server_round, arrays, config, grid))
        self._eval = None
        if not messages:
            return []
        # Distributed DP noises updates only: evaluation sums carry no training noise.
        workflow = SecAggPlusWorkflow(self.settings, rng=self.rng)
        self._eval = workflow(
            grid,
            node_ids=[m.metadata.dst_node_id for m in messages],
            arrays=arrays,
            config=messages[0].content.config_records.get("config", config),
            server_round=server_round + inner.round_offset,
            names=inner.node_names,
            sums_length=inner.eval_layout.length,
        )
        inner.node_names.update(self._eval.names)
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.strategy.round_offset
        return self.strategy.record_evaluation(server_round, self._evaluation_sums(server_round))

    def _evaluation_sums(self, server_round: int) -> EvalRound:
        """The secure round's sum, its contributors, and the sites it left out (and why)."""
        outcome = self._eval
        if outcome is None:
            return EvalRound(total=None)
        name_of = self.strategy.name_of
        failed = {
            named_site(why, name_of(n)): why
            for n, why in {**outcome.dropped, **outcome.rejected}.items()
        }
        if outcome.error is not None:
            log(WARNING, "SecAgg+ evaluation of round %s failed: %s", server_round, outcome.error)
            return EvalRound(total=None, failed=failed or {"federation": outcome.error})
        return EvalRound(total=outcome.sums, contributors=list(outcome.accepted), failed=failed)


def mean_to_delta_sum(
    mean: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """Sum of the sites' updates from the (equal-weight) mean of their models."""
    return {
        k: (mean[k].to(torch.float64) - g.to(torch.float64)) * count
        for k, g in global_state.items()
        if torch.is_floating_point(g)
    }
