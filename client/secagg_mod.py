"""The site's half of SecAgg+ on Flower's Message API: a ClientApp mod for ``@app.train``.

Use as ``@app.train(mods=[secaggplus_mod])``, or ``make_secaggplus_mod(precheck=...)`` for a
site that may refuse a round. A training request that carries the SecAgg+ record runs one stage
of the protocol (Bell et al. 2020, "Secure single-server aggregation with (poly)logarithmic
overhead", arXiv:2002.04156; Bonawitz et al. 2017, arXiv:1611.04482):

- setup: check the round's parameters; ask ``precheck`` whether the site will refuse the round
  (its privacy budget) and if so say so now, as fields, before any key exchange, so that the
  round goes on without it; else make two X25519 key pairs and return the public keys;
- share-keys: Shamir-share a fresh mask seed and the masking key among the neighbours, each
  share encrypted for its holder (X25519 + HKDF + Fernet; ``common/secagg/crypto.py``);
- collect-masked-vectors: train (the wrapped train function), check the update, and return
  only ``[w, q(w * update)]`` masked with the private and the pairwise masks;
- unmask: hand the server the shares it needs, never both secrets of the same site.

The trained model never leaves the site in the clear: the reply holds the masked vector, the
scalar metrics and the site record, and nothing else. Requests without the record pass through
untouched, unless the node config sets ``require-secagg`` (then they are refused).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from logging import WARNING
from typing import Any

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedfuse.client.node_config import NodeConfig
from fedfuse.common.privacy.refusal import Refusal
from fedfuse.common.secagg import crypto, masking
from fedfuse.common.secagg.params import RoundParams
from fedfuse.common.secagg.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    INS,
    MASKED_ARRAY,
    MASKED_KEY,
    PARAMS_STATE_KEY,
    RECORD_KEY,
    REFUSAL_KEY,
    REQUIRE_NODE_CONFIG,
    STATE_KEY,
    WEIGHT_METRIC,
    Key,
    SecAggProtocolError,
    Stage,
    check_record,
    check_stage,
    check_transition,
)

_LOG = logging.getLogger(__name__)


@dataclass
class SiteState:
    """What a site keeps between the stages of one round, in ``Context.state`` (ConfigRecord
    values only: the simulation engine and the SuperNode persist the context between calls)."""

    stage: str = ""
    nid: int = 0
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""  # the private mask seed b
    # The neighbours this round (self included) and their public keys, in the server's order.
    nbr_ids: list[int] = field(default_factory=list)
    nbr_pk1: list[bytes] = field(default_factory=list)
    nbr_pk2: list[bytes] = field(default_factory=list)
    # The symmetric keys (ECDH of sk2 with each neighbour's pk2) sealing the key shares.
    enc_keys: list[bytes] = field(default_factory=list)
    # Neighbours whose shares this site holds (they finished share-keys), self included.
    holder_ids: list[int] = field(default_factory=list)
    seed_shares: list[bytes] = field(default_factory=list)
    sk1_shares: list[bytes] = field(default_factory=list)

    # The round's parameters as announced at setup (kept in a ConfigRecord of their own).
    params: RoundParams | None = None

    @classmethod
    def load(cls, ctxt: Context) -> SiteState:
        rec = ctxt.state.config_records.get(STATE_KEY)
        if rec is None:
            return cls()
        state = cls(**{f.name: rec[f.name] for f in fields(cls) if f.name in rec})
        params = ctxt.state.config_records.get(PARAMS_STATE_KEY)
        state.params = RoundParams.from_record(params) if params else None
        return state

    def save(self, ctxt: Context) -> None:
        ctxt.state.config_records[STATE_KEY] = ConfigRecord(
            {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        )
        if self.params is not None:
            ctxt.state.config_records[PARAMS_STATE_KEY] = ConfigRecord(self.params.to_record())

    @property
    def round_params(self) -> RoundParams:
        if self.params is None:
            raise SecAggProtocolError("SecAgg+: no round parameters; setup did not run")
        return self.params

    def forget_secrets(self) -> None:
        """After unmask nothing of this round is needed; keep no key material around."""
        self.sk1 = self.sk2 = self.seed = b""
        self.enc_keys, self.holder_ids, self.seed_shares, self.sk1_shares = [], [], [], []


# Would the site refuse the round the setup message (with the run config) announces? A refusal,
# or None to take part.
Precheck = Callable[[Message, Context], Refusal | None]


def make_secaggplus_mod(*, precheck: Precheck | None = None) -> Mod:
    """The SecAgg+ mod, asking ``precheck`` at setup whether the site will refuse the round."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        return _secaggplus(msg, ctxt, call_next, precheck)

    return mod


def secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run this site's part of the SecAgg+ stage named in ``msg`` (see the module docstring)."""
    return _secaggplus(msg, ctxt, call_next, None)


def _secaggplus(
    msg: Message, ctxt: Context, call_next: ClientAppCallable, precheck: Precheck | None
) -> Message:
    # Evaluation sums travel through a SecAgg+ round of their own (common/evaluation.py).
    if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
        return call_next(msg, ctxt)
    if RECORD_KEY not in msg.content.config_records:
        if NodeConfig.parse(ctxt.node_config).require_secagg:
            raise SecAggProtocolError(
                f"this site requires secure aggregation (node config '{REQUIRE_NODE_CONFIG}') "
                f"but the server asked for a plain {msg.metadata.message_type} round; refusing "
                "to send an update or evaluation sums in the clear. Run the federation with "
                "secagg=true."
            )
        return call_next(msg, ctxt)

    ins = msg.content.config_records[RECORD_KEY]
    stage = check_stage(ins.get(Key.STAGE))
    state = SiteState.load(ctxt)
    check_transition(state.stage, stage)
    check_record(ins, stage, INS)
    if stage == Stage.SETUP:
        if state.stage not in ("", Stage.UNMASK):
            log(WARNING, "SecAgg+: setup restarts an unfinished round (was at %s)", state.stage)
        state = SiteState(nid=msg.metadata.dst_node_id)
        state.params = RoundParams.from_record(ins)  # validates; a site refuses unsafe ones
        # Only a training round spends budget; an evaluation round's sums are not refused.
        is_train = msg.metadata.message_type == MessageType.TRAIN
        refusal = precheck(msg, ctxt) if precheck is not None and is_train else None
        if refusal is not None:
            # No keys made: the server leaves this site out before anyone shares a secret.
            state.params = None
            out = RecordDict(
                {
                    RECORD_KEY: ConfigRecord({Key.REFUSED: refusal.why}),
                    REFUSAL_KEY: ConfigRecord(refusal.to_record()),
                }
            )
        else:
            out = RecordDict({RECORD_KEY: ConfigRecord(_setup(state))})
    elif stage == Stage.SHARE_KEYS:
        out = RecordDict({RECORD_KEY: ConfigRecord(_share_keys(state, ins))})
    elif (
        stage == Stage.COLLECT_MASKED_VECTORS and msg.metadata.message_type == MessageType.EVALUATE
    ):
        out = _collect_eval_sums(state, ins, msg, ctxt, call_next)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        out = _collect_masked_vector(state, ins, msg, ctxt, call_next)
    else:
        out = RecordDict({RECORD_KEY: ConfigRecord(_unmask(state, ins))})
        state.forget_secrets()
    state.stage = stage
    state.save(ctxt)
    out.config_records[RECORD_KEY][Key.STAGE] = stage
    return Message(out, reply_to=msg)


def _setup(state: SiteState) -> dict[str, Any]:
    state.sk1, state.pk1 = crypto.generate_key_pair()
    state.sk2, state.pk2 = crypto.generate_key_pair()
    return {Key.PK1: state.pk1, Key.PK2: state.pk2}


def _share_keys(state: SiteState, ins: ConfigRecord) -> dict[str, Any]:
    params = state.round_params
    ids: list[int] = list(ins[Key.NODE_IDS])  # type: ignore[arg-type]
    pk1s: list[bytes] = list(ins[Key.PK1_LIST])  # type: ignore[arg-type]
    pk2s: list[bytes] = list(ins[Key.PK2_LIST])  # type: ignore[arg-type]
    if len(set(ids)) != len(ids):
        raise SecAggProtocolError(f"SecAgg+ share-keys: '{Key.NODE_IDS}' lists a site twice")
    if not params.threshold <= len(ids) <= params.share_num:
        raise SecAggProtocolError(
            f"SecAgg+ share-keys: '{Key.NODE_IDS}' lists {len(ids)} neighbours; expected "
            f"between the threshold {params.threshold} and {params.share_num} (self included)"
        )
    if state.nid not in ids or (pk1s[ids.index(state.nid)], pk2s[ids.index(state.nid)]) != (
        state.pk1,
        state.pk2,
    ):
        raise SecAggProtocolError(
            f"SecAgg+ share-keys: '{Key.PK1_LIST}'/'{Key.PK2_LIST}' do not hold this site's "
            "own public keys; the server relayed wrong keys"
        )
    if not all(crypto.is_public_key(pk) for pk in pk1s + pk2s):
        raise SecAggProtocolError(
            f"SecAgg+ share-keys: '{Key.PK1_LIST}'/'{Key.PK2_LIST}' hold a value that is not a "
            f"{crypto.KEY_BYTES}-byte X25519 public key of large order"
        )
    if len(set(pk1s + pk2s)) != 2 * len(ids):
        raise SecAggProtocolError("SecAgg+ share-keys: some public keys are identical")
    state.nbr_ids, state.nbr_pk1, state.nbr_pk2 = ids, pk1s, pk2s
    state.seed = os.urandom(32)
    seed_shares = crypto.create_shares(state.seed, params.threshold, len(ids))
    sk1_shares = crypto.create_shares(state.sk1, params.threshold, len(ids))
    dsts: list[int] = []
    ciphertexts: list[bytes] = []
    state.enc_keys = []
    for idx, (nid, pk2) in enumerate(zip(ids, pk2s, strict=True)):
        if nid == state.nid:
            state.enc_keys.append(b"")
            state.holder_ids = [nid]
            state.seed_shares, state.sk1_shares = [seed_shares[idx]], [sk1_shares[idx]]
            continue
        key = crypto.encryption_key(state.sk2, pk2)
        state.enc_keys.append(key)
        plain = share_keys_plaintext_concat(state.nid, nid, seed_shares[idx], sk1_shares[idx])
        dsts.append(nid)
        ciphertexts.append(encrypt(key, plain))
    return {Key.DESTINATIONS: dsts, Key.CIPHERTEXTS: ciphertexts}


def _receive_shares(state: SiteState, ins: ConfigRecord) -> None:
    params = state.round_params
    srcs: list[int] = list(ins[Key.SOURCES])  # type: ignore[arg-type]
    ctxts: list[bytes] = list(ins[Key.CIPHERTEXTS])  # type: ignore[arg-type]
    if len(set(srcs)) != len(srcs) or not set(srcs) <= set(state.nbr_ids) - {state.nid}:
        raise SecAggProtocolError(
            f"SecAgg+ collect: '{Key.SOURCES}' must list distinct neighbours of this site; "
            f"found {srcs}"
        )
    if len(srcs) + 1 < params.threshold:
        raise SecAggProtocolError(
            f"SecAgg+ collect: only {len(srcs) + 1} sites hold shares (threshold "
            f"{params.threshold}); refusing to upload a vector that could not be unmasked"
        )
    for src, ctxt in zip(srcs, ctxts, strict=True):
        try:
            plain = decrypt(state.enc_keys[state.nbr_ids.index(src)], ctxt)
        except InvalidToken:
            raise SecAggProtocolError(
                f"SecAgg+ collect: the ciphertext from site {src} does not authenticate"
            ) from None
        actual_src, dst, seed_share, sk1_share = share_keys_plaintext_separate(plain)
        if (actual_src, dst) != (src, state.nid):
            raise SecAggProtocolError(
                f"SecAgg+ collect: a ciphertext relayed as {src}->{state.nid} was sealed as "
                f"{actual_src}->{dst}"
            )
        state.holder_ids.append(src)
        state.seed_shares.append(seed_share)
        state.sk1_shares.append(sk1_share)


def check_local_update(
    trained: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]
) -> str | None:
    """Why this site must not upload ``trained`` (names/shapes differ, NaN/Inf), or None."""
    if set(trained) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(trained))
        extra = sorted(set(trained) - set(global_arrays))
        return f"parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, g in global_arrays.items():
        a = trained[key]
        if a.shape != g.shape:
            return f"'{key}' has shape {a.shape}, expected {g.shape}"
        if a.dtype != g.dtype:
            return f"'{key}' has dtype {a.dtype}, expected {g.dtype}"
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            return f"'{key}' contains NaN or Inf"
    return None


def _numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    """Each array of ``rec`` as numpy, converted once (each ``Array.numpy()`` deserialises)."""
    return {k: rec[k].numpy() for k in rec.keys()}


def _collect_masked_vector(
    state: SiteState,
    ins: ConfigRecord,
    msg: Message,
    ctxt: Context,
    call_next: ClientAppCallable,
) -> RecordDict:
    # lazy: distributed DP's modules load Opacus' accountant, which only the collect stages
    # need (client/app.py: the key exchange's messages start without torch or Opacus)
    from fedfuse.client import distributed_dp as site_ddp
    from fedfuse.common.secagg import distributed_dp

    _receive_shares(state, ins)
    params = state.round_params
    if ARRAYS_KEY not in msg.content.array_records:
        raise KeyError(f"SecAgg+ collect: the server's message lacks the model '{ARRAYS_KEY}'")
    global_arrays = msg.content.array_records[ARRAYS_KEY]
    # Distributed DP sizes each site's noise share by these (client/distributed_dp.py): handed
    # to the app under a declared key in the context's state, for this call only; the server's
    # message is left as it came.
    ctxt.state.config_records[distributed_dp.ROUND_KEY] = ConfigRecord(
        site_ddp.secagg_round(params)
    )
    try:
        reply = call_next(msg, ctxt)
    finally:
        del ctxt.state.config_records[distributed_dp.ROUND_KEY]
    if reply.has_error():
        raise SecAggProtocolError(f"training failed: {reply.error.reason}")
    content = reply.content
    # Everything but the model goes back: scalar metrics and the site record. The weight is
    # in the masked vector, so not in the clear (it is the site's training-set size).
    out = RecordDict()
    for name, rec in content.metric_records.items():
        out.metric_records[name] = MetricRecord(
            {k: v for k, v in rec.items() if k != WEIGHT_METRIC}
        )
    for name, crec in content.config_records.items():
        if name != RECORD_KEY:
            out.config_records[name] = crec
    if REFUSAL_KEY in content.config_records:
        # The site refused only once the model came (its ledger changed since setup): its
        # refusal's fields go back (copied above) beside its refusal to upload.
        why = content.config_records[REFUSAL_KEY].get("why", "")
        log(WARNING, "SecAgg+: not uploading this round's update: refused: %s", why)
        out.config_records[RECORD_KEY] = ConfigRecord({Key.REFUSED: f"refused: {why}"})
        return out
    trained = content.array_records.get(ARRAYS_KEY)
    weight = next(
        (r[WEIGHT_METRIC] for r in content.metric_records.values() if WEIGHT_METRIC in r), None
    )
    trained_np, ref = _numpy(trained) if trained is not None else {}, _numpy(global_arrays)
    if trained is None:
        reason: str | None = f"the train reply has no '{ARRAYS_KEY}' ArrayRecord"
    elif weight is None:
        reason = f"the train reply has no '{WEIGHT_METRIC}' metric"
    else:
        reason = check_local_update(trained_np, ref)
    if reason is not None:
        # Refuse rather than mask garbage: the server can name this site and leave it out
        # (its masks are then removed like those of a site that dropped out).
        log(WARNING, "SecAgg+: not uploading this round's update: %s", reason)
        out.config_records[RECORD_KEY] = ConfigRecord({Key.REFUSED: reason})
        return out
    if float(weight) > params.max_weight:  # type: ignore[arg-type]
        log(
            WARNING,
            "SecAgg+: this site's weight %s exceeds max-weight %s; it counts as %s (raise "
            "'max-weight' in the run config to weigh it fully)",
            weight,
            params.max_weight,
            params.max_weight,
        )
    noisy = content.array_records.get(distributed_dp.VECTOR_KEY)
    dp_level = (
        str(msg.content.config_records[CONFIG_KEY].get("dp-level", ""))
        if (CONFIG_KEY in msg.content.config_records)
        else ""
    )
    if noisy is not None:
        # Distributed DP: the site already noised its update (client/distributed_dp.py); mask that.
        vec, clipped = (
            distributed_dp.to_modular(
                noisy[distributed_dp.VECTOR_ARRAY].numpy(), params.modulus_range
            ),
            0,
        )
    elif "distributed" in dp_level:
        reason = f"dp-level {dp_level!r} but the training reply holds no noised vector"
        log(WARNING, "SecAgg+: not uploading this round's update: %s", reason)
        out.config_records[RECORD_KEY] = ConfigRecord({Key.REFUSED: reason})
        return out
    else:
        keys = masking.float_keys(ref)
        delta = masking.flatten(trained_np, keys) - masking.flatten(ref, keys)
        vec, clipped = masking.encode(delta, float(weight), params)  # type: ignore[arg-type]
    if clipped:
        log(
            WARNING,
            "SecAgg+: %d of %d update entries exceeded clipping-range %g and were clipped",
            clipped,
            delta.size,
            params.clipping_range,
        )
    out.array_records[MASKED_KEY] = ArrayRecord({MASKED_ARRAY: Array(_mask(state, vec))})
    out.config_records[RECORD_KEY] = ConfigRecord({})
    # Module logger, not Flower's: Flower's prints DEBUG in every simulation worker.
    _LOG.debug("SecAgg+: uploaded a masked vector of %d entries", vec.size)
    return out


def _mask(state: SiteState, vec: np.ndarray) -> np.ndarray:
    """``vec`` (uint32) plus the private mask and the pairwise masks, modulo the modulus."""
    params = state.round_params
    # uint32 arithmetic wraps modulo 2**32, a multiple of the modulus: reduce once at the end.
    vec += masking.prg(state.seed, vec.size)
    for nid in state.holder_ids:
        if nid == state.nid:
            continue
        pk1 = state.nbr_pk1[state.nbr_ids.index(nid)]
        mask = masking.prg(crypto.mask_seed(state.sk1, pk1), vec.size)
        # The pair's masks cancel: the larger node id adds, the smaller subtracts.
        if state.nid > nid:
            vec += mask
        else:
            vec -= mask
    return masking.mod(vec, params.modulus_range)


def _collect_eval_sums(
    state: SiteState,
    ins: ConfigRecord,
    msg: Message,
    ctxt: Context,
    call_next: ClientAppCallable,
) -> RecordDict:
    """Evaluate (the wrapped evaluate function) and upload only its sums vector, masked."""
    # lazy: torch and Opacus' accountant, which only the collect stages need (client/app.py)
    from fedfuse.common.evaluation import EVAL_SUMS_ARRAY, EVAL_SUMS_KEY
    from fedfuse.common.secagg import distributed_dp

    _receive_shares(state, ins)
    params = state.round_params
    reply = call_next(msg, ctxt)
    if reply.has_error():
        raise SecAggProtocolError(f"evaluation failed: {reply.error.reason}")
    content = reply.content
    out = RecordDict()
    # The site record, and the site's own figures only if it opted in (client/wire.py).
    for name, rec in content.metric_records.items():
        out.metric_records[name] = rec
    for name, crec in content.config_records.items():
        if name != RECORD_KEY:
            out.config_records[name] = crec
    sums = content.array_records.get(EVAL_SUMS_KEY)
    if sums is None or EVAL_SUMS_ARRAY not in sums:
        reason: str | None = f"the evaluate reply has no '{EVAL_SUMS_KEY}' vector"
        vec = np.zeros(0, dtype=np.int64)
    else:
        vec = sums[EVAL_SUMS_ARRAY].numpy().astype(np.int64)
        # The sum of sample-num such vectors must not wrap around the modulus.
        limit = params.modulus_range // max(params.sample_num, 1)
        reason = (
            None
            if vec.size == 0 or (int(vec.min()) >= 0 and int(vec.max()) < limit)
            else f"evaluation sums outside [0, {limit}) would wrap around modulus-range"
        )
    if reason is not None:
        log(WARNING, "SecAgg+: not uploading this round's evaluation: %s", reason)
        out.config_records[RECORD_KEY] = ConfigRecord({Key.REFUSED: reason})
        return out
    masked = _mask(state, distributed_dp.to_modular(vec, params.modulus_range))
    out.array_records[MASKED_KEY] = ArrayRecord({MASKED_ARRAY: Array(masked)})
    out.config_records[RECORD_KEY] = ConfigRecord({})
    return out


def _unmask(state: SiteState, ins: ConfigRecord) -> dict[str, Any]:
    params = state.round_params
    active: list[int] = list(ins[Key.ACTIVE])  # type: ignore[arg-type]
    dead: list[int] = list(ins[Key.DEAD])  # type: ignore[arg-type]
    if set(active) & set(dead):
        # Revealing both the seed share and the key share of one site unmasks its update.
        raise SecAggProtocolError(
            f"SecAgg+ unmask: sites {sorted(set(active) & set(dead))} are listed both in "
            f"'{Key.ACTIVE}' and '{Key.DEAD}'; refusing"
        )
    unknown = (set(active) | set(dead)) - set(state.holder_ids)
    if unknown or len(set(active)) != len(active) or len(set(dead)) != len(dead):
        raise SecAggProtocolError(
            f"SecAgg+ unmask: '{Key.ACTIVE}'/'{Key.DEAD}' must list distinct sites whose shares "
            f"this site holds; unknown: {sorted(unknown)}"
        )
    if state.nid not in active:
        raise SecAggProtocolError(f"SecAgg+ unmask: this site is not in '{Key.ACTIVE}'")
    if len(active) < params.threshold:
        raise SecAggProtocolError(
            f"SecAgg+ unmask: only {len(active)} active sites (threshold {params.threshold}); "
            "refusing to help unmask a sum of too few sites"
        )
    owners = active + dead
    shares = [state.seed_shares[state.holder_ids.index(n)] for n in active] + [
        state.sk1_shares[state.holder_ids.index(n)] for n in dead
    ]
    return {Key.SHARE_OWNERS: owners, Key.SHARES: shares}
