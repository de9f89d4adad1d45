"""An in-process Grid: the ServerApp's messages go to ClientApps in this same process.

For protocol tests and benchmarks that need to see, time or disturb every message without
Ray's start-up cost. The ClientApp (mods included) is the real one; every message crosses
Flower's protobuf serialisation both ways, as on the wire, and each node keeps its own
``Context`` between messages, as a SuperNode does. Sites run one after another. There is no
clock: a site that ``respond`` silences simply has no reply, which is what a timeout leaves.
Full federations use Flower's simulation engine (Ray) by default; ``fedfuse simulate --engine
inprocess`` runs them over this Grid instead (:func:`run_in_process`), e.g. where Ray cannot be
installed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """A Grid over ``num_nodes`` virtual nodes that all run ``client_app``.

    Parameters
    ----------
    client_app
        The ClientApp every node runs (node ``i`` has node config ``partition-id = i``).
    num_nodes
        How many nodes.
    seed
        Seeds the node ids (random 64-bit integers, as Flower's).
    respond
        Called with each delivered message; returning False makes that node stay silent.
    node_config
        Extra node-config entries given to every node.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        seed: int = 0,
        respond: Callable[[Message], bool] | None = None,
        node_config: dict[str, Any] | None = None,
        run_id: int = 1,
    ) -> None:
        rng = random.Random(seed)
        self.app = client_app
        self.respond = respond
        self.node_ids = [rng.getrandbits(64) | 2 for _ in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for i, nid in enumerate(self.node_ids)
        }
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        # Every message the server side received, as it received them (for inspection).
        self.received: list[Message] = []
        # Seconds spent inside ClientApps, per exchange and node (for benchmarks: sites that run
        # in parallel would take the slowest site's time of each exchange).
        self.exchanges: list[dict[int, float]] = []
        # Messages are created in the ServerApp's name (Flower reads this process-global).
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    def partition(self, node_id: int) -> int:
        return self.node_ids.index(node_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        seconds: dict[int, float] = {}
        self.exchanges.append(seconds)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            delivered = _wire(msg)
            ids.append(msg.metadata.message_id)
            if self.respond is not None and not self.respond(delivered):
                continue
            nid = delivered.metadata.dst_node_id
            t0 = time.perf_counter()
            try:
                reply = self.app(delivered, self.contexts[nid])
            except Exception as exc:  # reported as an error reply, as the simulation engine does
                reply = Message(
                    Error(
                        code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                        reason=f"{type(exc).__name__}: {exc}",
                    ),
                    reply_to=delivered,
                )
            seconds[nid] = seconds.get(nid, 0.0) + time.perf_counter() - t0
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            self._replies[msg.metadata.message_id] = _wire(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._replies.pop(i) for i in message_ids if i in self._replies]
        self.received.extend(out)
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _wire(msg: Message) -> Message:
    """The message as the other end sees it: serialised and parsed again."""
    return serde.message_from_proto(serde.message_to_proto(msg))


def run_in_process(
    *, server_app: ServerApp, client_app: ClientApp, num_supernodes: int, **_: object
) -> None:
    """``flwr.simulation.run_simulation`` without Ray: the ServerApp runs over an
    :class:`InProcessGrid` of ``num_supernodes`` nodes in this process, the sites one after
    another (``fedfuse simulate --engine inprocess``). Backend settings (CPUs and GPUs per
    site) do not apply: every site trains on this process's device."""
    grid = InProcessGrid(client_app, num_supernodes)
    server_app(
        grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    )
