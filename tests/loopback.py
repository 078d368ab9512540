"""A Grid that delivers messages to ClientApps in this process, for tests.

Every message and every node's Context goes through Flower's protobuf
serialization on the way, as in a deployment where each message starts a new
ClientApp process, so state kept outside ``Context.state`` is lost and
records that Flower cannot serialize fail here too. Hooks let a test drop a
node at a stage, turn its reply into an error, or alter what it sends.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsec_flwr.records import MASKED_INPUT_RECORD, MASKED_VECTOR_KEY, PROTOCOL_RECORD

SERVER_NODE_ID = 1

# A fault hook gets (node id, stage name or "plain", request) and returns None
# to deliver normally, "drop" for no reply, "error" for an error reply, or a
# function that rewrites the reply.
Fault = Callable[[int, str, Message], object]


def inflate_weight_slot(target: int, amount: int = 10**6) -> Fault:
    """Return a fault that adds ``amount`` to the weight slot of a masked input.

    The weight slot is second to last when the input has no extra slots.
    """
    return add_to_slot(target, -2, amount)


def add_to_slot(target: int, index: int, amount: int) -> Fault:
    """Return a fault that adds ``amount`` to slot ``index`` of a masked input."""

    def fault(node: int, stage: str, _: Message) -> object:
        if node != target or stage != "masked-input":
            return None

        def inflate(reply: Message) -> Message:
            vector = (
                reply.content[MASKED_INPUT_RECORD][MASKED_VECTOR_KEY].numpy().copy()
            )
            # The slot wraps modulo 2**32, as the secure sum does.
            vector[index] = np.uint32((int(vector[index]) + amount) % 2**32)
            reply.content[MASKED_INPUT_RECORD] = ArrayRecord(
                {MASKED_VECTOR_KEY: Array(vector)}
            )
            return reply

        return inflate

    return fault


def stage_of(message: Message) -> str:
    record = message.content.config_records.get(PROTOCOL_RECORD)
    if record is None:
        return "plain"
    return str(record["stage"])


@dataclass
class LoopbackGrid(Grid):
    client_app: ClientApp
    node_ids: list[int]
    run_id: int = 42
    run_config: dict[str, object] = field(default_factory=dict)
    fault: Fault | None = None
    sent: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    _contexts: dict[int, bytes] = field(default_factory=dict)
    _replies: dict[str, Message] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        TaskIdentity.run_id = self.run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        for partition, node in enumerate(self.node_ids):
            context = Context(
                run_id=self.run_id,
                node_id=node,
                node_config={
                    "partition-id": partition,
                    "num-partitions": len(self.node_ids),
                },
                state=RecordDict(),
                run_config=dict(self.run_config),  # type: ignore[arg-type]
            )
            self._contexts[node] = context_to_proto(context).SerializeToString()

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        self.run_id = run_id

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            reply = self._deliver(message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def context_of(self, node: int) -> Context:
        """Return the node's Context as it is stored between messages."""
        return _load_context(self._contexts[node])

    def deliver_again(self, message: Message) -> Message:
        """Deliver a message that was already sent, as a replaying server would."""
        reply = self._deliver(message)
        assert reply is not None
        return reply

    def _deliver(self, message: Message) -> Message | None:
        message.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
        self.sent.append(message)
        node = message.metadata.dst_node_id
        action = self.fault(node, stage_of(message), message) if self.fault else None
        if action == "drop":
            return None

        from flwr.app import Error

        context = _load_context(self._contexts[node])
        delivered = _wire(message)
        if action == "error":
            reply = Message(Error(2, "injected failure"), reply_to=delivered)
        else:
            reply = self.client_app(delivered, context)
            self._contexts[node] = context_to_proto(context).SerializeToString()
        if callable(action):
            reply = action(reply)
        reply = _wire(reply)
        self.received.append(reply)
        return reply


def _wire(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


def _load_context(data: bytes) -> Context:
    from flwr.proto.message_pb2 import Context as ProtoContext

    proto = ProtoContext()
    proto.ParseFromString(data)
    return context_from_proto(proto)
