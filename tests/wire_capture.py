"""A ServerApp for the deployment test: fedfuse's own ServerApp over a Grid that writes down
every message the server receives (``<out-dir>/received.jsonl``), as the strategy and the
SecAgg+ workflow get it. Test code only: ``tests/deploy/test_deploy.py`` runs it in place of
``fedfuse.server.app:app`` from a copy of the project."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedfuse.common.config import RunConfig
from fedfuse.server.app import run_federation
from fedfuse.server.checkpoint import open_run


def describe(msg: Message) -> dict[str, Any]:
    """What a message holds: its kind, error, and per record its keys (and scalar values)."""
    out: dict[str, Any] = {"type": msg.metadata.message_type, "error": None, "records": {}}
    if msg.has_error():
        out["error"] = str(msg.error.reason)
        return out
    content: RecordDict = msg.content
    for name, rec in content.items():
        values = {}
        if name not in content.array_records:
            values = {
                k: v if isinstance(v, (int, float, str)) else repr(v)[:80] for k, v in rec.items()
            }
        out["records"][name] = {"keys": sorted(rec.keys()), "values": values}
    return out


class RecordingGrid(Grid):
    """Delegates to ``inner``; appends every received message to ``path``."""

    def __init__(self, inner: Grid, path: Path) -> None:
        self.inner, self.path = inner, path

    def _keep(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        with self.path.open("a") as f:
            for m in messages:
                f.write(json.dumps(describe(m), default=str) + "\n")
        return messages

    @property
    def run(self):  # type: ignore[no-untyped-def]  # noqa: D102
        return self.inner.run

    def set_run(self, run_id: int) -> None:  # noqa: D102
        self.inner.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self._keep(self.inner.pull_messages(message_ids))

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._keep(self.inner.send_and_receive(messages, timeout=timeout))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(dict(context.run_config))
    run_dir, checkpoint = open_run(cfg)
    recording = RecordingGrid(grid, run_dir.path / "received.jsonl")
    run_federation(recording, cfg, run_dir=run_dir, checkpoint=checkpoint)
