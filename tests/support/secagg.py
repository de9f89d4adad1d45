"""Helpers for the SecAgg+ tests: a ClientApp whose 'training' returns fixed updates."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedfuse.client.secagg_mod import secaggplus_mod
from fedfuse.common.privacy.refusal import REFUSAL_KEY, Refusal
from fedfuse.common.privacy.site_secret import secret_path
from fedfuse.common.secagg.protocol import RECORD_KEY, Key


def fixed_update_app(
    updates: Sequence[dict[str, np.ndarray]],
    weights: Sequence[float],
    *,
    outer_mods: Sequence[Mod] = (),
    refusals: Mapping[int, Refusal] | None = None,
) -> ClientApp:
    """A ClientApp behind ``secaggplus_mod`` whose node ``i`` returns global + ``updates[i]``,
    or for ``i`` in ``refusals`` that refusal's fields (a site refusing once the model came)."""
    app = ClientApp()

    @app.train(mods=[*outer_mods, secaggplus_mod])
    def train(msg: Message, ctxt: Context) -> Message:
        i = int(ctxt.node_config["partition-id"])
        if refusals and i in refusals:
            refused = RecordDict(
                {
                    REFUSAL_KEY: ConfigRecord(refusals[i].to_record()),
                    "site": ConfigRecord({"name": f"site-{i}"}),
                }
            )
            return Message(refused, reply_to=msg)
        glob = msg.content["arrays"]
        trained = {
            # A wrong-shaped 'update' is returned as the trained array itself.
            k: Array(glob[k].numpy() + u if glob[k].numpy().shape == u.shape else u)
            for k, u in updates[i].items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord(trained),  # type: ignore[arg-type]
                "metrics": MetricRecord({"num-examples": weights[i], "train-loss": float(i)}),
                "site": ConfigRecord({"name": f"site-{i}"}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def stage_of(msg: Message) -> str | None:
    rec = msg.content.config_records.get(RECORD_KEY) if msg.has_content() else None
    return None if rec is None else rec.get(Key.STAGE)  # type: ignore[return-value]


def silence(
    grid_partition: Callable[[int], int], sites: set[int], stages: set[str]
) -> Callable[[Message], bool]:
    """A ``respond`` hook: the given sites stay silent from the first of ``stages`` on."""
    gone: set[int] = set()

    def respond(msg: Message) -> bool:
        site = grid_partition(msg.metadata.dst_node_id)
        if site in sites and (stage_of(msg) in stages or site in gone):
            gone.add(site)
            return False
        return True

    return respond


def weighted_mean(updates: Sequence[dict[str, np.ndarray]], weights: Sequence[float]):
    w = np.asarray(weights, dtype=np.float64)
    return {
        k: sum(wi * u[k].astype(np.float64) for wi, u in zip(w, updates, strict=True)) / w.sum()
        for k in updates[0]
    }


def fresh_sites(sites: Sequence[Path], dest: Path) -> Path:
    """A copy of the fixture's site folders without the privacy ledgers other runs left there
    (a site's ledger lives in its folder and carries its spend from run to run). The site's DP
    secret is kept: the copies draw the same noise for the same inputs."""
    for site in sites:
        shutil.copytree(site, dest / site.name, ignore=shutil.ignore_patterns(".fedfuse"))
        secret = secret_path(site)
        if secret.exists():  # nothing else of .fedfuse: no ledger, no budget other tests set
            secret_path(dest / site.name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(secret, secret_path(dest / site.name))
    return dest
