"""A Flower ``Grid`` that delivers messages to a ClientApp in this process, one node after another.

For tests and debugging (no Ray, no SuperLink): the same ServerApp logic, strategy and ClientApp run,
Flower's messages and records included; only the transport is a function call. Node ids are
``1..N`` and node ``i`` gets ``partition-id = i - 1``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


class InProcessGrid(Grid):
    """``num_nodes`` simulated nodes, each running ``client_app`` when a message reaches it."""

    def __init__(self, client_app: ClientApp, num_nodes: int, node_config: dict[str, Any] | None = None,
                 run_config: dict[str, Any] | None = None):
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(run_id=1, node_id=i + 1,
                           node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                           state=RecordDict(), run_config=dict(run_config or {}))
            for i in range(num_nodes)
        }
        self._run: Any = None

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Any:  # noqa: D102
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # noqa: D102
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def get_nodes(self) -> Iterable[Any]:  # noqa: D102
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError("InProcessGrid answers send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError("InProcessGrid answers send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Each message (a copy, as a real transport delivers: Flower's SecAgg+ workflow sends one content
        object to every node and its client mod edits what it receives) to its node's ClientApp, in order;
        the replies."""
        return [self.client_app(copy.deepcopy(m), self.contexts[m.metadata.dst_node_id]) for m in messages]


@contextmanager
def server_identity(run_id: int = 1) -> Iterator[None]:
    """Flower's task identity of a ServerApp, so that strategies can create messages outside Flower's runtime."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
