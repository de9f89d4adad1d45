"""SecAgg+ vocabulary shared by the site's mod and the server's workflow: stages, keys, schemas.

One module both sides import (as Flower keeps ``secaggplus_constants``), so a renamed key or a new
stage cannot leave the two ends disagreeing. Every protocol message carries one ConfigRecord under
:data:`RECORD_KEY`; :func:`check_record` validates it against :data:`SCHEMAS` and names the key
that is missing or of the wrong type.
"""

from __future__ import annotations

from typing import Any

from fedfuse.common.errors import FedfuseError

# REFUSAL_KEY: the ConfigRecord of a site's refusal at setup (Refusal.to_record: site, round,
# why, spent, budget, would-reach); defined with the refusal, which also travels without SecAgg+.
from fedfuse.common.privacy.refusal import REFUSAL_KEY as REFUSAL_KEY

# The ConfigRecord that every SecAgg+ message carries, in both directions.
RECORD_KEY = "secaggplus"
# The site's protocol state between messages, a ConfigRecord in ``Context.state``.
STATE_KEY = "secaggplus.state"
PARAMS_STATE_KEY = "secaggplus.state.params"
# The ArrayRecord holding a site's masked vector (one uint32 array under MASKED_ARRAY).
MASKED_KEY = "secaggplus.masked"
MASKED_ARRAY = "vector"
# Where the ClientApp's train function puts the model and its weight (Flower FedAvg's defaults).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
WEIGHT_METRIC = "num-examples"
# Node-config key: a site that sets it refuses any training request without SecAgg+.
REQUIRE_NODE_CONFIG = "require-secagg"

# Directions of a message.
INS = "server"  # server -> site
RES = "site"  # site -> server


class Stage:
    """The four stages of one SecAgg+ round (Bell et al. 2020, arXiv:2002.04156, Alg. 1)."""

    SETUP = "setup"
    SHARE_KEYS = "share-keys"
    COLLECT_MASKED_VECTORS = "collect-masked-vectors"
    UNMASK = "unmask"
    ORDER = (SETUP, SHARE_KEYS, COLLECT_MASKED_VECTORS, UNMASK)


class Key:
    """Keys of the protocol ConfigRecord."""

    STAGE = "stage"
    # setup (server -> site): the round's parameters
    SAMPLE_NUM = "sample-num"
    SHARE_NUM = "share-num"
    THRESHOLD = "threshold"
    CLIPPING_RANGE = "clipping-range"
    QUANTIZATION_RANGE = "quantization-range"
    MODULUS_RANGE = "modulus-range"
    MAX_WEIGHT = "max-weight"
    # setup (site -> server): the site's two public keys (masking, encryption)
    PK1 = "pk1"
    PK2 = "pk2"
    # share-keys (server -> site): the neighbours' public keys, as parallel lists
    NODE_IDS = "node-ids"
    PK1_LIST = "pk1-list"
    PK2_LIST = "pk2-list"
    # share-keys (site -> server) and collect (server -> site): encrypted key shares
    DESTINATIONS = "destinations"
    SOURCES = "sources"
    CIPHERTEXTS = "ciphertexts"
    # setup (site -> server): the site will not train this round (its fields in REFUSAL_KEY),
    # said before any key exchange; collect (site -> server): why a site refused to upload
    # (its update failed its own checks)
    REFUSED = "refused"
    # unmask (server -> site): who survived, who dropped
    ACTIVE = "active"
    DEAD = "dead"
    # unmask (site -> server): the shares it holds, and whose they are
    SHARE_OWNERS = "share-owners"
    SHARES = "shares"


class SecAggProtocolError(FedfuseError, ValueError):
    """A protocol message broke the rules (wrong stage, bad value); the message says which."""


class SecAggRoundFailed(FedfuseError):
    """A secure-aggregation round could not finish; the previous global model is kept."""


# What each message must hold: key -> int | float | bytes | str | [int] | [bytes].
# Types are checked exactly (a bool is not an int here, as in Flower's mod).
SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    (Stage.SETUP, INS): {
        Key.SAMPLE_NUM: int,
        Key.SHARE_NUM: int,
        Key.THRESHOLD: int,
        Key.CLIPPING_RANGE: float,
        Key.QUANTIZATION_RANGE: int,
        Key.MODULUS_RANGE: int,
        Key.MAX_WEIGHT: float,
    },
    (Stage.SETUP, RES): {Key.PK1: bytes, Key.PK2: bytes},
    (Stage.SHARE_KEYS, INS): {Key.NODE_IDS: [int], Key.PK1_LIST: [bytes], Key.PK2_LIST: [bytes]},
    (Stage.SHARE_KEYS, RES): {Key.DESTINATIONS: [int], Key.CIPHERTEXTS: [bytes]},
    (Stage.COLLECT_MASKED_VECTORS, INS): {Key.SOURCES: [int], Key.CIPHERTEXTS: [bytes]},
    # The masked vector itself travels in an ArrayRecord (MASKED_KEY), or REFUSED says why not.
    (Stage.COLLECT_MASKED_VECTORS, RES): {},
    (Stage.UNMASK, INS): {Key.ACTIVE: [int], Key.DEAD: [int]},
    (Stage.UNMASK, RES): {Key.SHARE_OWNERS: [int], Key.SHARES: [bytes]},
}

# Lists in one message that pair up element by element.
PARALLEL: dict[tuple[str, str], tuple[str, ...]] = {
    (Stage.SHARE_KEYS, INS): (Key.NODE_IDS, Key.PK1_LIST, Key.PK2_LIST),
    (Stage.SHARE_KEYS, RES): (Key.DESTINATIONS, Key.CIPHERTEXTS),
    (Stage.COLLECT_MASKED_VECTORS, INS): (Key.SOURCES, Key.CIPHERTEXTS),
    (Stage.UNMASK, RES): (Key.SHARE_OWNERS, Key.SHARES),
}


def _type_name(spec: Any) -> str:
    return f"list of {spec[0].__name__}" if isinstance(spec, list) else spec.__name__


def _matches(value: Any, spec: Any) -> bool:
    if isinstance(spec, list):
        return isinstance(value, list) and all(type(v) is spec[0] for v in value)
    return type(value) is spec


def check_stage(value: Any) -> str:
    """The stage named by a message's ``stage`` value; KeyError/TypeError/ValueError if bad."""
    if value is None:
        raise KeyError(f"SecAgg+ message lacks the key '{Key.STAGE}'")
    if not isinstance(value, str):
        raise TypeError(f"SecAgg+ key '{Key.STAGE}' must be a str; found {type(value).__name__}")
    if value not in Stage.ORDER:
        raise SecAggProtocolError(
            f"SecAgg+ key '{Key.STAGE}' names no stage: {value!r} (stages: {list(Stage.ORDER)})"
        )
    return value


def check_transition(current: str, requested: str) -> None:
    """Refuse a stage out of order. ``current`` is "" before a site's first round.

    Setup may (re)start at any time, which aborts an unfinished round; any other stage must
    follow the previous one. Unmask is answered at most once per round, so a server cannot ask
    for a site's secret shares twice with different lists of survivors.
    """
    if requested == Stage.SETUP:
        return
    expected = (
        Stage.ORDER[Stage.ORDER.index(current) + 1] if current in Stage.ORDER[:-1] else Stage.SETUP
    )
    if requested != expected:
        raise SecAggProtocolError(
            f"SecAgg+ stage out of order: the site is at stage {current or '(none)'!r} and "
            f"expects {expected!r}, but received {requested!r}; the round is aborted"
        )


def check_record(record: Any, stage: str, direction: str) -> None:
    """Check that ``record`` holds every key of ``stage``'s message with the right type.

    Raises KeyError (missing key), TypeError (wrong type) or SecAggProtocolError (parallel lists
    of different lengths), each naming the key.
    """
    who = "server's" if direction == INS else "site's"
    for key, spec in SCHEMAS[(stage, direction)].items():
        if key not in record:
            raise KeyError(f"SecAgg+ stage '{stage}': the {who} message lacks the key '{key}'")
        value = record[key]
        if not _matches(value, spec):
            found = (
                f"list holding {sorted({type(v).__name__ for v in value})}"
                if isinstance(value, list)
                else type(value).__name__
            )
            raise TypeError(
                f"SecAgg+ stage '{stage}': the {who} key '{key}' must be a "
                f"{_type_name(spec)}; found {found}"
            )
    keys = PARALLEL.get((stage, direction))
    if keys:
        lengths = {k: len(record[k]) for k in keys}
        if len(set(lengths.values())) > 1:
            raise SecAggProtocolError(
                f"SecAgg+ stage '{stage}': the {who} lists {list(keys)} must have equal "
                f"lengths; found {lengths}"
            )
