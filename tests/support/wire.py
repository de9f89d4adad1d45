"""What the server may receive from a site, field by field (the README's list), for the wire-privacy
tests."""

from __future__ import annotations

import re

# A refusal's fields (common/privacy/refusal.py).
REFUSAL = {"privacy-refusal": {"site", "round", "why", "spent", "budget", "would-reach"}}
TRAIN_COLLECT = {
    "metrics": {"epsilon", "delta", "ledger-seq"},  # the weight is inside the masked vector
    "site": {"name"},
    "ledger": {"hash", "seq", "run-id"},
    "secaggplus.masked": {"vector"},
    "secaggplus": {"stage", "refused"},
    **REFUSAL,
}
EVAL_COLLECT = {"site": {"name"}, "secaggplus.masked": {"vector"}, "secaggplus": {"stage"}}
SECAGG_STAGES = {  # the protocol's own fields (keys and shares are key material, not data)
    "setup": {"secaggplus": {"stage", "pk1", "pk2", "refused"}, **REFUSAL},
    "share-keys": {"secaggplus": {"stage", "destinations", "ciphertexts"}},
    "unmask": {"secaggplus": {"stage", "share-owners", "shares"}},
}
PATH_LIKE = re.compile(r"(?<![\w<])/[\w.\-]+/")
