"""One round of training over the Grid, in plain or secure mode."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid
from numpy.typing import NDArray

from .config import SecAggConfig
from .core.encoding import TRAILER_SIZE, decode_sum
from .core.errors import ProtocolError
from .core.messages import (
    EncryptedShares,
    RoundHeader,
    SetupReply,
    Stage,
    UnmaskReply,
)
from .core.server import ServerRound
from .privacy import (
    ClientPrivacy,
    RoundPrivacy,
    ServerPrivacy,
    clip_flat_update,
    signed,
)
from .records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    MASKED_INPUT_RECORD,
    MASKED_VECTOR_KEY,
    PROTOCOL_RECORD,
    FloatLayout,
    arrays_to_numpy,
    check_client_arrays,
    content_bytes,
    encoding_fields,
    num_examples,
    protocol_fields,
    single_array_record,
    to_config_record,
)

logger = logging.getLogger("fedsec_flwr.rounds")

POLL_START = 0.005
POLL_GROWTH = 1.5
POLL_MAX = 0.05

_Reply = TypeVar("_Reply")


@dataclass
class RoundOutcome:
    """The new global model of a round and what it cost."""

    arrays: ArrayRecord
    num_aggregated: int
    dropped_by_stage: dict[str, int]
    clipped_coordinates: int
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None


@dataclass
class PrivacyRound:
    """The DP state of a run and the plan of the current round."""

    server: ServerPrivacy
    plan: RoundPrivacy
    dimension: int

    def finish(
        self, mean: NDArray[np.float64], *, num_aggregated: int, bit_sum: float
    ) -> float:
        """Add central noise, adapt the clipping norm and return the new epsilon."""
        self.server.add_central_noise(mean, self.plan, num_aggregated=num_aggregated)
        self.server.update_clipping_norm(bit_sum, num_aggregated=num_aggregated)
        return self.server.record(
            self.plan, num_aggregated=num_aggregated, dimension=self.dimension
        )


@dataclass
class _Exchange:
    """Sends one request per node and collects the valid replies."""

    grid: Grid
    server_round: int
    timeout: float
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)

    def send(self, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        messages = []
        for node, content in contents.items():
            self.download_bytes[node] = self.download_bytes.get(
                node, 0
            ) + content_bytes(content)
            messages.append(
                Message(
                    content,
                    node,
                    MessageType.TRAIN,
                    group_id=str(self.server_round),
                )
            )

        replies: dict[int, Message] = {}
        for reply in self._send_and_receive(messages):
            node = reply.metadata.src_node_id
            if node not in contents or node in replies:
                continue
            if reply.has_error():
                logger.info(
                    "Round %d: node %d replied with an error: %s",
                    self.server_round,
                    node,
                    reply.error.reason,
                )
                continue
            self.upload_bytes[node] = self.upload_bytes.get(node, 0) + content_bytes(
                reply.content
            )
            replies[node] = reply
        return replies

    def _send_and_receive(self, messages: list[Message]) -> list[Message]:
        """Push the messages and poll for replies until all arrive or time runs out.

        ``Grid.send_and_receive`` polls every 0.1 s in flwr 1.42; a round has
        four exchanges, so this loop starts at 5 ms and backs off to 50 ms.
        """
        pending = set(self.grid.push_messages(messages))
        replies: list[Message] = []
        deadline = time.monotonic() + self.timeout
        interval = POLL_START
        while pending:
            pulled = list(self.grid.pull_messages(pending))
            for reply in pulled:
                pending.discard(reply.metadata.reply_to_message_id)
            replies.extend(pulled)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(interval)
            interval = min(interval * POLL_GROWTH, POLL_MAX)
        if pending:
            logger.info(
                "Round %d: %d node(s) did not reply within %.1f s",
                self.server_round,
                len(pending),
                self.timeout,
            )
        return replies


def _parse_replies(
    replies: Mapping[int, Message],
    parse: Callable[[Message], _Reply],
    stage: Stage,
    server_round: int,
) -> dict[int, _Reply]:
    parsed: dict[int, _Reply] = {}
    for node, reply in replies.items():
        try:
            parsed[node] = parse(reply)
        except (ProtocolError, ValueError, KeyError) as error:
            logger.warning(
                "Round %d: invalid %s reply from node %d counts as dropped: %s",
                server_round,
                stage.value,
                node,
                error,
            )
    return parsed


def _mean_metrics(replies: Mapping[int, Message]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for reply in replies.values():
        for record in reply.content.metric_records.values():
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def _with_protocol(header: RoundHeader, fields: Mapping[str, object]) -> RecordDict:
    return RecordDict(
        {PROTOCOL_RECORD: to_config_record({**header.to_fields(), **fields})}  # type: ignore[dict-item]
    )


def run_secure_round(
    grid: Grid,
    *,
    server_round: int,
    nodes: list[int],
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    config: SecAggConfig,
    rng: random.Random,
    privacy: PrivacyRound | None = None,
) -> RoundOutcome:
    """Run the four SecAgg+ stages and return the new global model.

    Raises:
        TooFewSurvivorsError: Too few clients remain at some stage.
        ValueError: The aggregated clients reported a total weight of zero.

    """
    global_arrays = arrays_to_numpy(arrays)
    layout = FloatLayout.of(global_arrays)
    params = config.encoding()
    request_fields: dict[str, object] = {}
    num_extra = 0
    if privacy is not None:
        assert privacy.plan.encoding is not None
        params = privacy.plan.encoding
        client_privacy = ClientPrivacy.of(privacy.plan, privacy.server.config)
        request_fields.update(client_privacy.to_fields())
        num_extra = 1 if client_privacy.adaptive else 0
    run_id = grid.run.run_id
    server = ServerRound(
        run_id=run_id,
        server_round=server_round,
        vector_size=layout.size + TRAILER_SIZE + num_extra,
        modulus=params.modulus,
        num_neighbours=config.num_neighbours,
        threshold=config.threshold,
        rng=rng,
    )
    exchange = _Exchange(grid, server_round, config.stage_timeout)

    def header(stage: Stage) -> RoundHeader:
        return RoundHeader(stage=stage, run_id=run_id, server_round=server_round)

    logger.debug("Round %d: stage %s", server_round, Stage.SETUP.value)
    replies = exchange.send({n: _with_protocol(header(Stage.SETUP), {}) for n in nodes})
    server.receive_setup(
        nodes,
        _parse_replies(
            replies,
            lambda m: SetupReply.from_fields(protocol_fields(m.content)),
            Stage.SETUP,
            server_round,
        ),
    )

    logger.debug("Round %d: stage %s", server_round, Stage.SHARE_KEYS.value)
    requests = server.share_keys_requests()
    replies = exchange.send(
        {
            n: _with_protocol(header(Stage.SHARE_KEYS), request.to_fields())
            for n, request in requests.items()
        }
    )
    server.receive_share_keys(
        _parse_replies(
            replies,
            lambda m: EncryptedShares.from_fields(protocol_fields(m.content)),
            Stage.SHARE_KEYS,
            server_round,
        )
    )

    logger.debug("Round %d: stage %s", server_round, Stage.MASKED_INPUT.value)
    contents = {}
    for n, shares in server.masked_input_requests().items():
        content = _with_protocol(
            header(Stage.MASKED_INPUT),
            {**shares.to_fields(), **encoding_fields(params), **request_fields},
        )
        content[ARRAYS_RECORD] = arrays
        content[CONFIG_RECORD] = train_config
        contents[n] = content
    masked_replies = exchange.send(contents)
    server.receive_masked_inputs(
        _parse_replies(masked_replies, _masked_vector, Stage.MASKED_INPUT, server_round)
    )

    logger.debug("Round %d: stage %s", server_round, Stage.UNMASK.value)
    replies = exchange.send(
        {
            n: _with_protocol(header(Stage.UNMASK), request.to_fields())
            for n, request in server.unmask_requests().items()
        }
    )
    total = server.receive_unmask(
        _parse_replies(
            replies,
            lambda m: UnmaskReply.from_fields(protocol_fields(m.content)),
            Stage.UNMASK,
            server_round,
        )
    )

    decoded = decode_sum(total, params=params, num_extra=num_extra)
    survivors = set(server.survivors)
    mean_update, num_clipped = decoded.mean, decoded.num_clipped
    if num_clipped:
        logger.warning(
            "Round %d: %d update coordinates were clipped to the range +-%g",
            server_round,
            num_clipped,
            params.clip_range,
        )
    epsilon = None
    if privacy is not None:
        bit_sum = (
            float(signed(int(decoded.extra[0]), params.modulus)) if num_extra else 0.0
        )
        epsilon = privacy.finish(
            mean_update, num_aggregated=len(survivors), bit_sum=bit_sum
        )
    new_arrays = layout.apply_update(global_arrays, mean_update)
    return RoundOutcome(
        arrays=ArrayRecord({k: _array(v) for k, v in new_arrays.items()}),
        num_aggregated=len(survivors),
        dropped_by_stage=server.dropped_by_stage,
        clipped_coordinates=num_clipped,
        upload_bytes=exchange.upload_bytes,
        download_bytes=exchange.download_bytes,
        train_metrics=_mean_metrics(
            {n: m for n, m in masked_replies.items() if n in survivors}
        ),
        epsilon=epsilon,
    )


def _masked_vector(reply: Message) -> NDArray[np.uint32]:
    record = reply.content.array_records.get(MASKED_INPUT_RECORD)
    if record is None or list(record.keys()) != [MASKED_VECTOR_KEY]:
        raise ProtocolError(
            f"The reply must carry the {MASKED_INPUT_RECORD!r} ArrayRecord with the "
            f"single key {MASKED_VECTOR_KEY!r}."
        )
    vector: NDArray[np.uint32] = record[MASKED_VECTOR_KEY].numpy()
    return vector


def _array(value: NDArray[np.generic]) -> Array:
    # np.ascontiguousarray would turn a 0-d array into shape (1,).
    return Array(np.array(value, order="C", copy=True))


def run_plain_round(
    grid: Grid,
    *,
    server_round: int,
    nodes: list[int],
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    timeout: float,
    privacy: PrivacyRound | None = None,
) -> RoundOutcome:
    """Run weighted FedAvg in plaintext: the server sees every client's model.

    Under central DP the server clips each update and weights clients equally.

    Raises:
        ValueError: No client replied validly, or their total weight is zero.

    """
    global_arrays = arrays_to_numpy(arrays)
    layout = FloatLayout.of(global_arrays)
    exchange = _Exchange(grid, server_round, timeout)
    replies = exchange.send(
        {
            n: RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: train_config})
            for n in nodes
        }
    )

    def parse(reply: Message) -> tuple[NDArray[np.float64], int]:
        local = arrays_to_numpy(single_array_record(reply.content, role="reply"))
        check_client_arrays(local, global_arrays)
        return layout.difference(local, global_arrays), num_examples(reply.content)

    updates = _parse_replies(replies, parse, Stage.MASKED_INPUT, server_round)
    bit_sum = 0
    if privacy is not None:
        for node, (update, _) in updates.items():
            bit, _ = clip_flat_update(update, clipping_norm=privacy.plan.clipping_norm)
            bit_sum += bit
            updates[node] = (update, 1)
    total_weight = sum(weight for _, weight in updates.values())
    if not updates or total_weight == 0:
        raise ValueError(
            f"Round {server_round}: the total weight of the {len(updates)} valid "
            "replies is 0, so their weighted mean is undefined."
        )
    mean_update = np.zeros(layout.size, dtype=np.float64)
    for update, weight in updates.values():
        update *= weight / total_weight
        mean_update += update

    epsilon = None
    if privacy is not None:
        epsilon = privacy.finish(
            mean_update, num_aggregated=len(updates), bit_sum=float(bit_sum)
        )
    new_arrays = layout.apply_update(global_arrays, mean_update)
    return RoundOutcome(
        arrays=ArrayRecord({k: _array(v) for k, v in new_arrays.items()}),
        num_aggregated=len(updates),
        epsilon=epsilon,
        dropped_by_stage={"train": len(nodes) - len(updates)},
        clipped_coordinates=0,
        upload_bytes=exchange.upload_bytes,
        download_bytes=exchange.download_bytes,
        train_metrics=_mean_metrics({n: replies[n] for n in updates}),
    )
