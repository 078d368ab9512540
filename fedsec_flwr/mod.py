"""ClientApp mod that runs the client side of secure aggregation.

Wrap a ``@app.train`` handler with ``secure_aggregation_mod``. The server
sends four train messages per round, each naming its stage. The mod answers
the setup, share-keys and unmask stages itself; at the masked-input stage it
calls the wrapped handler, checks its reply, and sends back only the masked,
encoded update and the handler's metrics. No plaintext array ever leaves the
client through this mod; a reply it cannot encode becomes an error reply, and
the server counts the client as dropped.

The mod keeps the client's protocol state in ``Context.state``, so each stage
may run in a new ClientApp process.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from .core import client as protocol
from .core.encoding import encode_update
from .core.errors import ProtocolError
from .core.messages import (
    EncryptedShares,
    Fields,
    RoundHeader,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
)
from .dp.random import SecureRandom
from .privacy import ClientPrivacy, DPMode, add_distributed_noise, clip_flat_update
from .records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    MASKED_INPUT_RECORD,
    MASKED_VECTOR_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PROTOCOL_RECORD,
    STATE_RECORD,
    FloatLayout,
    arrays_to_numpy,
    check_client_arrays,
    num_examples,
    parse_encoding,
    protocol_fields,
    single_array_record,
    to_config_record,
)

logger = logging.getLogger("fedsec_flwr.mod")


def secure_aggregation_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Run one stage of secure aggregation for a train message.

    A train message without the protocol record gets an error reply: a client
    wrapped with this mod never sends a plaintext update.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)

    try:
        fields = protocol_fields(msg.content)
        header = RoundHeader.from_fields(fields)
        reply_fields, extra = _run_stage(header, fields, msg, context, call_next)
    except (ProtocolError, ValueError) as error:
        logger.warning("Secure aggregation stage failed: %s", error)
        return Message(
            Error(ErrorCode.MOD_FAILED_PRECONDITION, f"secure aggregation: {error}"),
            reply_to=msg,
        )
    except _InnerAppError as error:
        return error.reply

    content = RecordDict({PROTOCOL_RECORD: to_config_record(reply_fields)})
    for key, record in extra.items():
        content[key] = record
    return Message(content, reply_to=msg)


class _InnerAppError(Exception):
    """The wrapped handler replied with an error; pass that reply on."""

    def __init__(self, reply: Message) -> None:
        super().__init__("The wrapped ClientApp replied with an error.")
        self.reply = reply


def _load_state(context: Context, header: RoundHeader) -> protocol.ClientState:
    record = context.state.config_records.get(STATE_RECORD)
    if record is None:
        raise ProtocolError(
            f"Stage {header.stage.value!r} arrived before this client's setup stage."
        )
    state = protocol.ClientState.from_fields(dict(record))
    if (state.run_id, state.server_round) != (header.run_id, header.server_round):
        raise ProtocolError(
            f"Stage {header.stage.value!r} is for round {header.server_round}, but "
            f"the client is in round {state.server_round}."
        )
    return state


def _save_state(context: Context, state: protocol.ClientState) -> None:
    context.state[STATE_RECORD] = to_config_record(state.to_fields())


_Extra = dict[str, ArrayRecord | MetricRecord | ConfigRecord]


def _run_stage(
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
) -> tuple[Fields, _Extra]:
    if header.stage is Stage.SETUP:
        state, setup_reply = protocol.client_setup(
            run_id=header.run_id,
            server_round=header.server_round,
            node_id=msg.metadata.dst_node_id,
        )
        _save_state(context, state)
        return setup_reply.to_fields(), {}

    state = _load_state(context, header)
    if header.stage is Stage.SHARE_KEYS:
        state, shares = protocol.client_share_keys(
            state, ShareKeysRequest.from_fields(fields)
        )
        _save_state(context, state)
        return shares.to_fields(), {}

    if header.stage is Stage.MASKED_INPUT:
        return _masked_input(state, fields, msg, context, call_next)

    state, unmask_reply = protocol.client_unmask(
        state, UnmaskRequest.from_fields(fields)
    )
    _save_state(context, state)
    return unmask_reply.to_fields(), {}


def _masked_input(
    state: protocol.ClientState,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
) -> tuple[Fields, _Extra]:
    params = parse_encoding(fields)
    state = protocol.client_receive_shares(state, EncryptedShares.from_fields(fields))
    _save_state(context, state)

    global_record = msg.content.array_records.get(ARRAYS_RECORD)
    if global_record is None:
        raise ProtocolError(f"The message has no {ARRAYS_RECORD!r} ArrayRecord.")
    global_arrays = arrays_to_numpy(global_record)

    inner_content = RecordDict({ARRAYS_RECORD: global_record})
    train_config = msg.content.config_records.get(CONFIG_RECORD)
    if train_config is not None:
        inner_content[CONFIG_RECORD] = train_config
    msg.content = inner_content
    reply = call_next(msg, context)
    if reply.has_error():
        raise _InnerAppError(reply)

    privacy = ClientPrivacy.from_fields(fields)
    weight = num_examples(
        reply.content, max_weight=None if privacy else params.max_weight
    )
    local_arrays = arrays_to_numpy(
        single_array_record(reply.content, role="ClientApp reply")
    )
    check_client_arrays(local_arrays, global_arrays)

    layout = FloatLayout.of(global_arrays)
    update = layout.difference(local_arrays, global_arrays)
    num_coordinates = update.size
    extra_slots: list[int] = []
    if privacy is not None:
        # Under DP every client weighs 1, so one client's influence is bounded.
        weight = 1
        bit, _ = clip_flat_update(update, clipping_norm=privacy.clipping_norm)
        if privacy.adaptive:
            extra_slots.append(bit)
    rng = np.random.default_rng(secrets.randbits(128))
    encoded, num_clipped = encode_update(
        update,
        weight=weight,
        params=params,
        rng=rng,
        overwrite=True,
        extra=extra_slots,
    )
    del update
    if privacy is not None and privacy.mode is DPMode.DISTRIBUTED:
        add_distributed_noise(
            encoded,
            num_coordinates=num_coordinates,
            sigma_client=privacy.sigma_client,
            bit_slot=encoded.size - 1 if privacy.adaptive else None,
            bit_sigma_client=privacy.bit_sigma_client,
            rng=SecureRandom(),
        )
    if num_clipped:
        logger.warning(
            "Round %d: %d of %d update coordinates exceed the clip range %g and "
            "were clipped",
            state.server_round,
            num_clipped,
            num_coordinates,
            params.clip_range,
        )
    masked = protocol.client_mask(state, encoded, modulus=params.modulus)

    metrics = MetricRecord(
        {
            key: value
            for key, value in next(iter(reply.content.metric_records.values())).items()
            if key != NUM_EXAMPLES_KEY
        }
    )
    extra: _Extra = {
        MASKED_INPUT_RECORD: ArrayRecord({MASKED_VECTOR_KEY: Array(masked)}),
        METRICS_RECORD: metrics,
    }
    return {"stage": Stage.MASKED_INPUT.value}, extra
