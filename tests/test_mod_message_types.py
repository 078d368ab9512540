"""Every message that reaches a train handler goes through the mod's protocol."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedsec_flwr import make_plain_verification_mod, secure_aggregation_mod

TRAIN_TYPES = ["train", "train.default", "train.custom"]


def _trained(msg: Message, context: Context) -> Message:
    del context
    arrays = msg.content.array_records["arrays"]
    moved = ArrayRecord(
        {key: Array(array.numpy() + 1) for key, array in arrays.items()}
    )
    metrics = MetricRecord({"num-examples": 10})
    return Message(RecordDict({"arrays": moved, "metrics": metrics}), reply_to=msg)


def _app(mod: object) -> ClientApp:
    app = ClientApp(mods=[mod])  # type: ignore[list-item]
    app.train()(_trained)
    app.train("custom")(_trained)
    return app


def _message(message_type: str) -> Message:
    # Messages take their run and sender from the process's task identity.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    model = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    return Message(
        RecordDict({"arrays": model}), dst_node_id=7, message_type=message_type
    )


def _context() -> Context:
    return Context(
        run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={}
    )


@pytest.mark.parametrize("message_type", TRAIN_TYPES)
def test_hostile_train_action_gets_no_model_in_clear(message_type: str) -> None:
    # Flower routes "train.default" to a plain @app.train() handler, so a
    # server that picks that type must not get past the mod.
    reply = _app(secure_aggregation_mod)(_message(message_type), _context())

    assert reply.has_error()
    assert "has no 'fedsec.secagg' ConfigRecord" in reply.error.reason
    assert not reply.has_content()


@pytest.mark.parametrize("message_type", TRAIN_TYPES)
def test_hostile_train_action_refused_by_plain_verification(message_type: str) -> None:
    mod = make_plain_verification_mod(require_verification=True)

    reply = _app(mod)(_message(message_type), _context())

    assert reply.has_error()
    assert "verification" in reply.error.reason
    assert not reply.has_content()
