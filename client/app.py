"""The fedfuse ClientApp: wiring only. What a site does with each message is in
fedfuse.client.handlers; the logic of a round in fedfuse.client.training and fedfuse.client.site.

In deployment, Flower 1.42's SuperNode starts one `flwr-clientapp` process per message, and a
SecAgg+ round sends each site four messages for training (setup, share-keys, collect-masked-
vectors, unmask) and four for evaluation. So this module, which every one of those processes
loads, imports neither torch nor Opacus (tests/client/test_app_imports.py): the handlers are
imported by the messages that need the site's data, model or ledger (training's setup, which
checks the budget, and both collect stages). The other five of a round's eight messages start
in the time Flower itself takes.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedfuse.client.secagg_mod import make_secaggplus_mod, secaggplus_mod
from fedfuse.client.wire import contain_errors
from fedfuse.common.privacy.refusal import Refusal

app = ClientApp()


def refusal_before_key_exchange(msg: Message, context: Context) -> Refusal | None:
    """Will this site refuse the round that a SecAgg+ setup message announces? (its budget;
    fedfuse.client.handlers.refusal_before_key_exchange)"""
    # lazy: the budget check loads the site's data and Opacus' accountant (module docstring)
    from fedfuse.client import handlers

    return handlers.refusal_before_key_exchange(msg, context)


# SecAgg+: the trained model leaves the site only masked (client/secagg_mod.py); a site that
# will refuse says so at setup, before the key exchange.
@app.train(mods=[contain_errors, make_secaggplus_mod(precheck=refusal_before_key_exchange)])
def train(msg: Message, context: Context) -> Message:
    """One round of DP training on the site's train split, within the site's privacy budget."""
    # lazy: torch and Opacus, for the one message of a round that trains (module docstring)
    from fedfuse.client import handlers

    return handlers.train(msg, context)


# Under SecAgg+ the evaluation is a secure round of its own: the mod masks the sums vector.
@app.evaluate(mods=[contain_errors, secaggplus_mod])
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's test split (its sums vector, masked under
    SecAgg+)."""
    # lazy: torch, for the one message of a round that evaluates (module docstring)
    from fedfuse.client import handlers

    return handlers.evaluate(msg, context)
