"""Kill one SuperNode half-way through uploading a reply, for a deployment test.

Python imports ``sitecustomize`` at start-up from any folder on
``PYTHONPATH``. In the ``flower-supernode`` whose ``FLWR_HOME`` is
``$FEDSEC_KILL_HOME``, this module wraps flwr 1.42's reply sender. Right
after the SuperLink accepts the ``PushMessages`` of that node's
``$FEDSEC_KILL_REPLY``-th reply in round ``$FEDSEC_KILL_ROUND``, and before
any of the reply's objects is uploaded, the node sends SIGKILL to its process
group. Every other process imports this module and leaves it unused.

NOTE: ``_push_messages`` is private to flwr 1.42, so an upgrade can break
this wrapper. The test then fails at its check that the node was killed.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_HOME = os.environ.get("FEDSEC_KILL_HOME")


def _install() -> None:
    import flwr.supernode.start_client_internal as supernode

    server_round = os.environ["FEDSEC_KILL_ROUND"]
    target = int(os.environ["FEDSEC_KILL_REPLY"])
    sent = 0
    push_messages = supernode._push_messages

    # flwr calls it with keyword arguments, so the parameter names must match.
    def push_then_kill(
        state: Any, object_store: Any, send: Any, push_object: Any
    ) -> None:
        def send_then_kill(message: Any, tree: Any, runtime: float) -> Any:
            nonlocal sent
            result = send(message, tree, runtime)
            if message.metadata.group_id == server_round:
                sent += 1
                if sent == target:
                    print("upload_kill: killed after PushMessages", flush=True)
                    os.killpg(os.getpgid(0), signal.SIGKILL)
            return result

        push_messages(state, object_store, send_then_kill, push_object)

    supernode._push_messages = push_then_kill


if (
    _HOME
    and os.environ.get("FLWR_HOME") == _HOME
    and os.path.basename(sys.argv[0]) == "flower-supernode"
):
    _install()
