"""The stage deadline is kept when a pull from the SuperLink blocks.

In a flwr 1.42 deployment, ``Grid.pull_messages`` downloads each reply's
contents before it returns. A SuperNode killed right after its reply's
``PushMessages``, before it uploads the contents, leaves a reply that the
SuperLink hands out but whose contents never come. The pull retries until
the SuperLink drops the unfinished upload, 180 s later. `HalfUploadGrid`
plays that SuperLink with a shorter block.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsec_flwr.rounds import _Exchange, _pulls_for

STAGE_TIMEOUT = 0.5
BLOCK_SECONDS = 5.0
HALF_NODE = 3
LIVE_NODES = (1, 2)


class HalfUploadGrid(Grid):
    """Replies become available after a delay; ``HALF_NODE``'s never completes.

    ``pull_messages`` hands out every available reply among the ids at once,
    as the SuperLink does, and then downloads their contents one after the
    other. The half-uploaded reply blocks the call for ``BLOCK_SECONDS``, or
    until ``release`` is set, and then comes back as an error message.
    """

    def __init__(self, live_delay: float) -> None:
        # Messages are stamped with the run and node of the current task.
        TaskIdentity.run_id = 42
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1
        self.live_delay = live_delay
        self.release = threading.Event()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[float, Message]] = {}

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [*LIVE_NODES, HALF_NODE]

    def send_and_receive(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        now = time.monotonic()
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            delay = 0.0 if node == HALF_NODE else self.live_delay
            with self._lock:
                self._waiting[message_id] = (now + delay, message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        with self._lock:
            handed_out = [
                self._waiting.pop(message_id)[1]
                for message_id in list(message_ids)
                if message_id in self._waiting and self._waiting[message_id][0] <= now
            ]
        replies = []
        for request in handed_out:
            if request.metadata.dst_node_id == HALF_NODE:
                self.release.wait(BLOCK_SECONDS)
                replies.append(
                    Message(
                        Error(0, "Reply message objects are unavailable"),
                        reply_to=request,
                    )
                )
            else:
                replies.append(Message(RecordDict(), reply_to=request))
        return replies


@pytest.mark.parametrize("live_delay", [0.0, 0.1], ids=["same-pull", "later"])
def test_half_upload_keeps_deadline(live_delay: float) -> None:
    grid = HalfUploadGrid(live_delay)
    exchange = _Exchange(grid, server_round=2, timeout=STAGE_TIMEOUT)
    contents = {node: RecordDict() for node in (*LIVE_NODES, HALF_NODE)}
    try:
        started = time.monotonic()
        replies = exchange.send(contents)
        elapsed = time.monotonic() - started
    finally:
        grid.release.set()

    assert elapsed < STAGE_TIMEOUT + 1.0
    assert sorted(replies) == sorted(LIVE_NODES)


def test_pull_error_fails_exchange() -> None:
    class FailingGrid(HalfUploadGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            raise RuntimeError("SuperLink unreachable")

    exchange = _Exchange(FailingGrid(0.0), server_round=1, timeout=STAGE_TIMEOUT)
    with pytest.raises(RuntimeError, match="SuperLink unreachable"):
        exchange.send({node: RecordDict() for node in LIVE_NODES})


def test_many_missing_replies_poll_less_often() -> None:
    # Each missing reply costs one request per poll, so the SuperLink gets
    # about as many requests as from one pull of all replies every 50 ms.
    pulls = _pulls_for(HalfUploadGrid(0.0))

    assert pulls.max_interval(1) == 0.05
    assert pulls.max_interval(3) == pytest.approx(0.15)
    assert pulls.max_interval(10) == pytest.approx(0.5)
    assert pulls.max_interval(400) == 1.0


def test_in_memory_grid_pulls_all_replies_at_once() -> None:
    # run_simulation's grid reads replies from memory, so none can block.
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = InMemoryGrid.__new__(InMemoryGrid)

    assert _pulls_for(grid).max_interval(400) == 0.05
