"""A ClientApp train request as a deployed site receives it, for tests that call the ClientApp
directly."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedfuse.common.config import RunConfig
from fedfuse.common.models import build_model


def _train_request(cfg: RunConfig, site: Path, **server_keys: object) -> tuple[Message, Context]:
    """A train message for round 1 with a freshly built model, and the SuperNode's context of
    a deployed site (node config ``data-path``)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 99, 7, 1
    config = ConfigRecord({**cfg.to_mapping(), "server-round": 1, **server_keys})
    msg = Message(
        RecordDict({"arrays": ArrayRecord(build_model(cfg).state_dict()), "config": config}),
        dst_node_id=7,
        message_type="train",
    )
    context = Context(
        run_id=99,
        node_id=7,
        node_config={"data-path": str(site)},
        state=RecordDict(),
        run_config={},
    )
    return msg, context
