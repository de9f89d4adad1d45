"""SecAgg+ protocol tests for the site's mod, in the manner of Flower's secaggplus_mod_test.py:
every stage transition, every key missing or of the wrong type, and a server that cheats."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod.utils import make_ffn
from flwr.supercore.task_identity import TaskIdentity

from fedfuse.client.secagg_mod import SiteState, secaggplus_mod
from fedfuse.common.config import RunConfig
from fedfuse.common.errors import ConfigError
from fedfuse.common.secagg import RoundParams, SecAggProtocolError, SecAggSettings, crypto
from fedfuse.common.secagg.protocol import INS, RECORD_KEY, REQUIRE_NODE_CONFIG, SCHEMAS, Key, Stage
from fedfuse.server.secagg import SecAggPlusWorkflow
from fedfuse.simulations.inprocess import InProcessGrid
from tests.support.secagg import fixed_update_app, stage_of

NID = 123
ALL = ("", *Stage.ORDER)  # "" = a site that never took part


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _ctxt(node_config: dict | None = None) -> Context:
    return Context(
        run_id=1, node_id=NID, node_config=node_config or {}, state=RecordDict(), run_config={}
    )


def _handler(ctxt: Context):
    calls: list[Message] = []

    def plain_train(msg: Message, _: Context) -> Message:
        calls.append(msg)
        return Message(RecordDict(), reply_to=msg)

    app = make_ffn(plain_train, [secaggplus_mod])

    def send(configs: dict) -> ConfigRecord:
        msg = Message(
            RecordDict({RECORD_KEY: ConfigRecord(configs)}),
            dst_node_id=NID,
            message_type=MessageType.TRAIN,
        )
        return app(msg, ctxt).content.config_records[RECORD_KEY]

    send.calls = calls  # type: ignore[attr-defined]
    return send


def _set_stage(ctxt: Context, stage: str) -> None:
    state = SiteState.load(ctxt)
    state.stage = stage
    state.save(ctxt)


def _valid_setup() -> dict:
    return {Key.STAGE: Stage.SETUP, **RoundParams(5, 5, 3, 8.0, 2**22, 2**32, 1000.0).to_record()}


def test_every_stage_transition() -> None:
    """Valid transitions get past the stage check (then fail on the missing keys); every other
    transition is refused, naming the stage expected."""
    valid = {
        ("", Stage.SETUP),
        (Stage.UNMASK, Stage.SETUP),
        (Stage.SETUP, Stage.SHARE_KEYS),
        (Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS),
        (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK),
        # Setup may restart an unfinished round from anywhere (with a warning).
        (Stage.SETUP, Stage.SETUP),
        (Stage.SHARE_KEYS, Stage.SETUP),
        (Stage.COLLECT_MASKED_VECTORS, Stage.SETUP),
    }
    ctxt = _ctxt()
    send = _handler(ctxt)
    for current, nxt in product(ALL, Stage.ORDER):
        _set_stage(ctxt, current)
        if (current, nxt) in valid:
            with pytest.raises(KeyError, match="lacks the key"):
                send({Key.STAGE: nxt})
        else:
            with pytest.raises(SecAggProtocolError, match=f"expects '.*', but received '{nxt}'"):
                send({Key.STAGE: nxt})
        # A refused message leaves the site where it was.
        assert SiteState.load(ctxt).stage == current


def test_stage_key_missing_wrong_type_or_unknown() -> None:
    send = _handler(_ctxt())
    with pytest.raises(KeyError, match="'stage'"):
        send({Key.SAMPLE_NUM: 3})
    with pytest.raises(TypeError, match="'stage' must be a str"):
        send({Key.STAGE: 1})
    with pytest.raises(SecAggProtocolError, match="names no stage: 'fit'"):
        send({Key.STAGE: "fit"})


_VALUES = {int: 10, bool: True, float: 1.0, str: "x", bytes: b"x"}


@pytest.mark.parametrize("stage", Stage.ORDER)
def test_every_key_missing_or_of_the_wrong_type_is_named(stage: str) -> None:
    previous = {
        Stage.SETUP: "",
        Stage.SHARE_KEYS: Stage.SETUP,
        Stage.COLLECT_MASKED_VECTORS: Stage.SHARE_KEYS,
        Stage.UNMASK: Stage.COLLECT_MASKED_VECTORS,
    }[stage]
    schema = SCHEMAS[(stage, INS)]
    valid = {k: ([_VALUES[s[0]]] if isinstance(s, list) else _VALUES[s]) for k, s in schema.items()}
    ctxt = _ctxt()
    send = _handler(ctxt)
    for key, spec in schema.items():
        missing = {Key.STAGE: stage, **{k: v for k, v in valid.items() if k != key}}
        _set_stage(ctxt, previous)
        with pytest.raises(KeyError, match=f"'{stage}'.*lacks the key '{key}'"):
            send(missing)
        wrong_types = [t for t in _VALUES if t is not (spec[0] if isinstance(spec, list) else spec)]
        for t in wrong_types:
            bad = {
                Key.STAGE: stage,
                **valid,
                key: [_VALUES[t]] if isinstance(spec, list) else _VALUES[t],
            }
            _set_stage(ctxt, previous)
            with pytest.raises(TypeError, match=f"'{stage}'.*key '{key}' must be a"):
                send(bad)
        if isinstance(spec, list):  # a scalar where a list belongs
            _set_stage(ctxt, previous)
            with pytest.raises(TypeError, match=f"key '{key}' must be a list"):
                send({Key.STAGE: stage, **valid, key: _VALUES[spec[0]]})


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        (Key.THRESHOLD, 2, "'threshold' must be in (2.5, 5]"),  # a minority could unmask
        (Key.THRESHOLD, 6, "'threshold' must be in (2.5, 5]"),
        (Key.SHARE_NUM, 6, "'share-num' must be in [2, sample-num = 5]"),
        (Key.SAMPLE_NUM, 1, "'sample-num' must be >= 2"),
        (Key.MODULUS_RANGE, 3 * 2**20, "'modulus-range' must be a power of two"),
        (Key.QUANTIZATION_RANGE, 2**30, "'quantization-range' must be >= 2 and such that"),
        (Key.CLIPPING_RANGE, float("inf"), "'clipping-range' must be finite and > 0"),
        (Key.MAX_WEIGHT, 0.0, "'max-weight' must be finite and > 0"),
    ],
)
def test_setup_refuses_unsafe_parameters(key: str, value, needle: str) -> None:
    send = _handler(_ctxt())
    with pytest.raises(SecAggProtocolError) as exc:
        send({**_valid_setup(), key: value})
    assert needle in str(exc.value)


def test_setup_returns_two_distinct_public_keys() -> None:
    ctxt = _ctxt()
    reply = _handler(ctxt)(_valid_setup())
    assert reply[Key.STAGE] == Stage.SETUP
    pk1, pk2 = reply[Key.PK1], reply[Key.PK2]
    assert crypto.is_public_key(pk1) and crypto.is_public_key(pk2) and pk1 != pk2
    # Real X25519 keys: both ends of a pair derive the same seed, a third key does not.
    sk_a, pk_a = crypto.generate_key_pair()
    state_keys = SiteState.load(ctxt)
    assert crypto.public_key_of(state_keys.sk1) == pk1
    assert crypto.mask_seed(state_keys.sk1, pk_a) == crypto.mask_seed(sk_a, pk1)
    assert crypto.mask_seed(state_keys.sk2, pk_a) != crypto.mask_seed(sk_a, pk1)
    state = SiteState.load(ctxt)
    assert state.stage == Stage.SETUP and state.nid == NID and state.params is not None


def test_share_keys_refuses_relayed_keys_that_are_not_its_own() -> None:
    ctxt = _ctxt()
    send = _handler(ctxt)
    send(_valid_setup())
    own = SiteState.load(ctxt)
    base = {Key.STAGE: Stage.SHARE_KEYS, Key.NODE_IDS: [NID, 7, 8]}
    keys = {Key.PK1_LIST: [own.pk1, b"a", b"b"], Key.PK2_LIST: [own.pk2, b"c", b"d"]}
    with pytest.raises(SecAggProtocolError, match="must have equal lengths"):
        send({**base, **keys, Key.PK2_LIST: [own.pk2]})
    with pytest.raises(SecAggProtocolError, match="do not hold this site's own public keys"):
        send({**base, **keys, Key.PK1_LIST: [b"z", b"a", b"b"]})
    with pytest.raises(SecAggProtocolError, match="lists 2 neighbours"):
        send({**base, Key.NODE_IDS: [NID, 7], Key.PK1_LIST: [own.pk1, b"a"],
              Key.PK2_LIST: [own.pk2, b"c"]})  # fmt: skip


def test_require_secagg_refuses_a_plain_training_request() -> None:
    def train(msg: Message, _: Context) -> Message:
        return Message(RecordDict({"x": ConfigRecord({"ok": 1})}), reply_to=msg)

    app = make_ffn(train, [secaggplus_mod])
    plain = Message(RecordDict(), dst_node_id=NID, message_type=MessageType.TRAIN)
    with pytest.raises(SecAggProtocolError, match="requires secure aggregation"):
        app(plain, _ctxt({REQUIRE_NODE_CONFIG: "true"}))
    # Without that node config, a plain request passes through to the train function.
    assert app(plain, _ctxt()).content.config_records["x"]["ok"] == 1


# -- a server that cheats: a man in the middle rewrites what the sites receive ---------------


def _run_with_tamper(tamper, n: int = 5):
    updates = [{"w": np.full(4, float(i), np.float32)} for i in range(n)]
    grid = InProcessGrid(fixed_update_app(updates, [10.0] * n), n)

    def respond(msg: Message) -> bool:
        tamper(msg, grid)
        return True

    grid.respond = respond
    out = SecAggPlusWorkflow(SecAggSettings())(
        grid,
        node_ids=grid.node_ids,
        arrays=ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
        config=ConfigRecord({}),
        server_round=1,
    )
    return out, grid


def test_sites_refuse_to_reveal_both_secrets_of_one_site() -> None:
    """Listing a survivor as dropped too would hand the server its mask seed AND its masking
    key, unmasking its update: every site refuses."""

    def tamper(msg: Message, grid: InProcessGrid) -> None:
        if stage_of(msg) == Stage.UNMASK:
            rec = msg.content.config_records[RECORD_KEY]
            rec[Key.DEAD] = [*rec[Key.DEAD], rec[Key.ACTIVE][0]]  # type: ignore[misc]

    out, _ = _run_with_tamper(tamper)
    assert out.arrays is None and out.error is not None
    assert len(out.dropped) == 5
    assert all("listed both in 'active' and 'dead'" in r for r in out.dropped.values())


def test_sites_refuse_a_lowered_threshold() -> None:
    def tamper(msg: Message, grid: InProcessGrid) -> None:
        if stage_of(msg) == Stage.SETUP:
            msg.content.config_records[RECORD_KEY][Key.THRESHOLD] = 1

    out, _ = _run_with_tamper(tamper)
    assert out.arrays is None
    assert all("'threshold' must be in" in r for r in out.dropped.values())


def test_a_tampered_key_share_is_detected_and_names_its_source() -> None:
    victim: dict[str, int] = {}

    def tamper(msg: Message, grid: InProcessGrid) -> None:
        if stage_of(msg) == Stage.COLLECT_MASKED_VECTORS and not victim:
            rec = msg.content.config_records[RECORD_KEY]
            ctxts = list(rec[Key.CIPHERTEXTS])  # type: ignore[arg-type]
            ctxts[0] = ctxts[0][:-2] + b"AA"
            rec[Key.CIPHERTEXTS] = ctxts
            victim["src"] = rec[Key.SOURCES][0]  # type: ignore[index]
            victim["dst"] = msg.metadata.dst_node_id

    out, _ = _run_with_tamper(tamper)
    reason = out.dropped[victim["dst"]]
    assert f"the ciphertext from site {victim['src']} does not authenticate" in reason
    # One site out of five is a dropout the protocol tolerates: the round still completes.
    assert out.error is None and out.arrays is not None


# -- the run-config keys, checked where they enter ------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("num-shares", 4, "'num-shares' must be 0"),
        ("num-shares", 1, "'num-shares' must be 0"),
        ("reconstruction-threshold", 1, "'reconstruction-threshold' must be 0"),
        ("clipping-range", 0.0, "'clipping-range' must be a finite number > 0"),
        ("max-weight", -1.0, "'max-weight' must be a finite number > 0"),
        ("timeout", float("inf"), "'timeout' must be a finite number > 0"),
        ("modulus-range", 1000, "'modulus-range' must be a power of two in [4, 2**32]"),
        ("modulus-range", 2**33, "'modulus-range' must be a power of two in [4, 2**32]"),
        ("quantization-range", 2**31 + 1, "'quantization-range' must be an integer in [2,"),
        ("secagg", "maybe", "'secagg' must be true or false"),
    ],
)
def test_run_config_secagg_keys_name_the_key(key: str, value, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_mapping({key: value})
    assert needle in str(exc.value)


def test_threshold_must_be_a_majority_of_the_shares() -> None:
    with pytest.raises(ConfigError, match=r"must be in range \(2.5, 5\] for num-shares 5"):
        RunConfig.from_mapping({"num-shares": 5, "reconstruction-threshold": 2})
    assert RunConfig.from_mapping({"secagg": "false"}).secagg is False


def test_round_parameters_for_the_sampled_sites() -> None:
    s = SecAggSettings()
    assert (s.for_round(5).share_num, s.for_round(5).threshold) == (5, 3)
    assert (s.for_round(2).share_num, s.for_round(2).threshold) == (2, 2)
    ring = SecAggSettings(num_shares=5).for_round(20)
    assert (ring.share_num, ring.threshold) == (5, 3)
    with pytest.raises(ConfigError, match="at least 2 sites"):
        s.for_round(1)
    with pytest.raises(ConfigError, match="would overflow modulus-range"):
        s.for_round(1024)
    with pytest.raises(ConfigError, match="exceeds the 3 shares"):
        SecAggSettings(reconstruction_threshold=4).for_round(3)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sites", "1"], "secure aggregation needs at least 2 sites"),
        (["--set", "num-shares=4"], "'num-shares' must be 0"),
        (["--no-secagg", "--set", "timeout=0"], "'timeout' must be a finite number > 0"),
    ],
)
def test_simulate_refuses_bad_secagg_settings_before_anything_runs(
    tmp_path, synth_root, args, needle
) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "PYTHONPATH": str(root),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HOME": str(tmp_path),
    }
    res = subprocess.run(
        [sys.executable, "-m", "fedfuse.cli", "simulate", "--data", str(synth_root), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert needle in res.stderr
    assert list(tmp_path.iterdir()) == []  # no runs, nothing trained
