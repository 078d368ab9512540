"""One round of training over the Grid, in plain or secure mode, verified or not."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from flwr.serverapp import Grid
from numpy.typing import NDArray

from .config import KEY_LIFETIME_RUN, SecAggConfig
from .core import commitments, signatures
from .core.commitments import BLINDING_LIMBS, VerificationResult
from .core.encoding import TRAILER_SIZE, EncodingParams, decode_sum
from .core.errors import ProtocolError, TooFewSurvivorsError, shortened
from .core.messages import (
    CommitReply,
    EncryptedShares,
    IdentityKey,
    KeyedUnmaskReply,
    KeyListSignature,
    RoundHeader,
    SetupReply,
    SetupRequest,
    Stage,
    UnmaskReply,
    VerifyReply,
)
from .core.run_keys import KeyDirectory, KeyedServerRound
from .core.server import ServerRound
from .core.transcript import RoundTranscript
from .models import (
    CommitmentLayout,
    FloatLayout,
    ModelDecoding,
    RoundSettings,
    mapping_digest,
    model_digest,
)
from .privacy import (
    ClientPrivacy,
    DPMode,
    RoundPrivacy,
    ServerPrivacy,
    clip_flat_update,
    signed,
)
from .records import (
    AGGREGATE_KEY,
    AGGREGATE_RECORD,
    ARRAYS_RECORD,
    BLINDING_KEY,
    CONFIG_RECORD,
    DEFERRED_RECORD,
    ENCODED_UPDATE_KEY,
    MASKED_INPUT_RECORD,
    MASKED_VECTOR_KEY,
    PLAIN_INPUT_RECORD,
    PROTOCOL_RECORD,
    ROUND_MODEL_RECORD,
    array_to_numpy,
    arrays_to_numpy,
    check_client_arrays,
    content_bytes,
    encoding_fields,
    num_examples,
    protocol_fields,
    single_array_record,
    to_config_record,
)
from .verification import ServerVerification, VerificationConfig

logger = logging.getLogger("fedsec_flwr.rounds")

POLL_START = 0.005
POLL_GROWTH = 1.5
POLL_MAX = 0.05

PULL_BLOCKED_SECONDS = 5.0
"""Seconds after which a pull still running is reported as blocked."""

PER_REPLY_POLL_SECONDS = 0.05
"""Maximum poll interval per missing reply when each reply is pulled on its own.

The SuperLink then gets about 20 requests a second, as many as from one
pull of every reply every `POLL_MAX` seconds. The interval grows from
`POLL_START` to 0.15 s with 3 missing replies, to 0.5 s with 10, and to
`MAX_POLL_INTERVAL` with 20 or more."""

MAX_POLL_INTERVAL = 1.0
"""Maximum poll interval, in seconds, whatever the number of missing replies."""

MAX_REASON_LENGTH = 300
"""Characters of a client's error reason kept for the round's error."""

MAX_REASONS_SHOWN = 3

MEAN_RANGE_TOLERANCE = 1e-9
"""Relative slack of the range check for the float rounding of the decoding."""

_Reply = TypeVar("_Reply")
_Source = TypeVar("_Source")


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
    verification: VerificationResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    pending: PendingVerification | None = None
    """With pipelined verification: this round's aggregate, fixed and not yet
    verified. ``verification`` is then ``None``."""
    previous: PendingVerification | None = None
    """With pipelined verification: the previous round, verified during this
    round's share-keys exchange, with its ``result``."""
    mean_update: NDArray[np.float64] | None = None
    """The mean update, with any DP noise, that ``arrays`` adds to the
    round's global model over its float arrays. A discarded round applies
    none, so it has ``None``."""


class PendingVerification:
    """A round whose aggregate is fixed and whose commit and verify stages wait.

    Under pipelined verification these stages travel with the next round's
    setup and share-keys requests, or, after the last round, run on their
    own (`finish_verification`). Without it they run at once, the same way.
    """

    def __init__(
        self,
        verifier: ServerVerification,
        *,
        included: list[int],
        aggregate: NDArray[np.uint32],
        blinding_sums: NDArray[np.uint32],
        model: ArrayRecord,
        audit_path: Path | None,
        settings: RoundSettings,
    ) -> None:
        self.verifier = verifier
        self.audit_path = audit_path
        self.settings = settings
        self.model = model
        """The round's global model, which the verify requests carry again."""
        self.dropped_by_stage: dict[str, int] = {}
        """The included clients lost at the commit and verify stages."""
        self.result: VerificationResult | None = None
        """The outcome, once the verify replies are in."""
        self._commit = verifier.commit_request(included, aggregate, blinding_sums)
        self._aggregate = aggregate
        self._transcript: RoundTranscript | None = None

    @property
    def server_round(self) -> int:
        """The round whose aggregate waits for verification."""
        return self.verifier.server_round

    def commit_requests(self) -> _Deferred:
        """Return the commit request of every included client."""
        return _Deferred(
            header=self._header(Stage.COMMIT),
            fields_by_node=dict.fromkeys(
                self.verifier.included_node_ids, self._commit.to_fields()
            ),
        )

    def receive_commitments(self, replies: Mapping[int, Mapping[str, object]]) -> None:
        """Keep the commitments; a client without a valid one counts as dropped."""
        parsed = _parse_replies(
            replies, CommitReply.from_fields, Stage.COMMIT, self.server_round
        )
        self.verifier.receive_commitments(parsed)
        self.dropped_by_stage[Stage.COMMIT.value] = len(
            self.verifier.included_node_ids
        ) - len(self.verifier.commitments)

    def verify_requests(self) -> _Deferred:
        """Build the transcript and the verify requests.

        They carry the aggregate and the round's model, from which a client
        computes the model that must follow the round.
        """
        self._transcript = self.verifier.transcript()
        return _Deferred(
            header=self._header(Stage.VERIFY),
            fields_by_node={
                node: self.verifier.verify_request(node, self._transcript).to_fields()
                for node in sorted(self.verifier.commitments)
            },
            records={
                AGGREGATE_RECORD: ArrayRecord({AGGREGATE_KEY: Array(self._aggregate)}),
                ROUND_MODEL_RECORD: self.model,
            },
        )

    def receive_verdicts(
        self, replies: Mapping[int, Mapping[str, object]]
    ) -> VerificationResult:
        """Audit the transcript, combine the verdicts and keep the result."""
        if self._transcript is None:
            raise ProtocolError("Verdicts must follow the verify requests.")
        verdicts = _parse_replies(
            replies, VerifyReply.from_fields, Stage.VERIFY, self.server_round
        )
        self.dropped_by_stage[Stage.VERIFY.value] = len(
            self.verifier.commitments
        ) - len(verdicts)
        self.result = self.verifier.finish(
            self._transcript,
            verdicts,
            audit_path=self.audit_path,
            settings=self.settings,
        )
        return self.result

    def _header(self, stage: Stage) -> RoundHeader:
        return RoundHeader(
            stage=stage,
            run_id=self.verifier.run_id,
            server_round=self.verifier.server_round,
        )


VerifiedCallback = Callable[[int, VerificationResult], None]
"""Called with a pipelined round and its result before the next round trains."""


DECODE_TIMING = "decode"
VERIFICATION_TIMING = "verification"


class _StageClock:
    """Wall seconds of consecutive parts of a round, by name."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


@dataclass
class PrivacyRound:
    """The DP state of a run and the plan of the current round."""

    server: ServerPrivacy
    plan: RoundPrivacy
    dimension: int

    def finish(
        self, mean: NDArray[np.float64], *, num_aggregated: int, bit_sum: float
    ) -> float:
        """Scale and noise the mean, adapt the clipping norm, return the epsilon."""
        self.server.release_mean(mean, self.plan, num_aggregated=num_aggregated)
        self.server.update_clipping_norm(
            bit_sum, self.plan, num_aggregated=num_aggregated
        )
        return self.server.record(
            self.plan, num_aggregated=num_aggregated, dimension=self.dimension
        )

    def record_unreleased(self, *, num_aggregated: int) -> float | None:
        """Record a distributed round whose unmasked sum is not used.

        Its sum failed to decode, or the round was discarded. No model is
        released, but the server has seen the noised sum. Returns the
        epsilon after the round, or ``None`` in central mode, whose noise
        was never added.
        """
        if self.server.config.mode is DPMode.DISTRIBUTED:
            return self.server.record(
                self.plan, num_aggregated=num_aggregated, dimension=self.dimension
            )
        return None


@dataclass
class _Exchange:
    """Sends one request per node and collects the valid replies."""

    grid: Grid
    server_round: int
    timeout: float
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)
    """Nodes of the last exchange whose replies were not waited for."""
    error_reasons: dict[str, int] = field(default_factory=dict)
    """Error replies of all exchanges so far, counted by reason."""

    def send(
        self,
        contents: Mapping[int, RecordDict],
        enough: Callable[[Mapping[int, Message]], bool] | None = None,
    ) -> dict[int, Message]:
        """Send the requests and return the valid replies by node.

        With ``enough``, stop waiting as soon as it accepts the valid replies
        received so far; replies that arrive later are ignored.
        """
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

        def keep(reply: Message) -> None:
            node = reply.metadata.src_node_id
            if node not in contents or node in replies:
                return
            if reply.has_error():
                reason = str(reply.error.reason)[:MAX_REASON_LENGTH]
                logger.info(
                    "Round %d: node %d replied with an error: %s",
                    self.server_round,
                    node,
                    shortened(str(reply.error.reason), MAX_REASON_LENGTH),
                )
                self.error_reasons[reason] = self.error_reasons.get(reason, 0) + 1
                return
            self.upload_bytes[node] = self.upload_bytes.get(node, 0) + content_bytes(
                reply.content
            )
            replies[node] = reply

        def satisfied(pulled: list[Message]) -> bool:
            for reply in pulled:
                keep(reply)
            # Nothing new arrived, so the answer cannot have changed.
            return bool(pulled) and enough is not None and enough(replies)

        self._send_and_receive(messages, satisfied)
        return replies

    def _send_and_receive(
        self, messages: list[Message], satisfied: Callable[[list[Message]], bool]
    ) -> None:
        """Push the messages and poll for replies until all arrive or time runs out.

        ``satisfied`` gets each batch of pulled replies and can end the wait
        early. ``Grid.send_and_receive`` polls every 0.1 s in flwr 1.42; a
        round has up to four exchanges, so this loop starts at 5 ms and backs
        off to 50 ms.

        Except on ``run_simulation``'s in-memory grid, each reply is pulled
        on its own, in a background thread, so the wait ends at the deadline
        even when a pull blocks. In flwr 1.42 a
        deployment's ``pull_messages`` downloads each reply's contents before
        it returns. A SuperNode that dies while it uploads a reply leaves
        that reply at the SuperLink without its contents. The pull then
        retries until the SuperLink drops the unfinished upload, 180 s after
        its last object (``OBJECT_PUSH_SESSION_TTL_SECONDS`` in
        ``flwr/supercore/constant.py``). Until then, the other replies that
        the same call received are delayed too.
        """
        message_ids = list(self.grid.push_messages(messages))
        node_of = {
            message_id: message.metadata.dst_node_id
            for message_id, message in zip(message_ids, messages, strict=True)
        }
        pending = set(message_ids)
        self.skipped = set()
        pulls = _pulls_for(self.grid)
        deadline = time.monotonic() + self.timeout
        interval = POLL_START
        while pending:
            wait = min(interval, max(deadline - time.monotonic(), 0.0))
            pulled = pulls.collect(pending, wait=wait)
            for reply in pulled:
                pending.discard(reply.metadata.reply_to_message_id)
            if satisfied(pulled):
                self.skipped = {node_of[message_id] for message_id in pending}
                logger.debug(
                    "Round %d: stopped waiting for %d node(s) whose replies are "
                    "not needed",
                    self.server_round,
                    len(pending),
                )
                return
            if not pending or time.monotonic() >= deadline:
                break
            interval = min(interval * POLL_GROWTH, pulls.max_interval(len(pending)))
        if pending:
            stuck = sorted(
                node_of[message_id]
                for message_id in pulls.running_for(PULL_BLOCKED_SECONDS)
            )
            logger.info(
                "Round %d: %d node(s) did not reply within %.1f s",
                self.server_round,
                len(pending),
                self.timeout,
            )
            if stuck:
                logger.info(
                    "Round %d: timed out while downloading the replies of "
                    "node(s) %s, so they count as dropped",
                    self.server_round,
                    ", ".join(map(str, stuck)),
                )


class _BatchPulls:
    """One pull for all missing replies, on a grid whose pulls cannot block.

    Flower's ``InMemoryGrid`` (``run_simulation``) reads the replies from
    memory in the ServerApp's process, so no reply can be half uploaded.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def collect(self, pending: Collection[str], *, wait: float) -> list[Message]:
        """Pull the pending replies; without any, wait ``wait`` seconds."""
        replies = list(self._grid.pull_messages(pending))
        if not replies:
            time.sleep(wait)
        return replies

    def running_for(self, seconds: float) -> set[str]:
        """Return no message: a pull here never outlives its call."""
        del seconds
        return set()

    def max_interval(self, num_pending: int) -> float:
        """Return `POLL_MAX`: one pull serves every missing reply."""
        del num_pending
        return POLL_MAX


def _pulls_for(grid: Grid) -> _BatchPulls | _ReplyPulls:
    # Importing the module costs half a second; an InMemoryGrid exists only
    # once it is imported.
    in_memory = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    if in_memory is not None and isinstance(grid, in_memory.InMemoryGrid):
        return _BatchPulls(grid)
    return _ReplyPulls(grid)


class _ReplyPulls:
    """Background pulls of one exchange's replies, one message per daemon thread.

    A pull that blocks delays only its own reply. A pull still running when
    the exchange ends is left behind, and its result is discarded. Daemon
    threads do not delay the ServerApp's exit.

    NOTE: Each poll sends one ``PullMessages`` request per missing reply, and
    a left-behind pull runs until flwr gives up on the upload (up to 180 s).
    flwr 1.42 itself calls its Runtime API client from several threads when it
    pulls a message's objects, which is what makes concurrent pulls safe here.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._results: queue.Queue[tuple[str, list[Message] | BaseException]] = (
            queue.Queue()
        )
        self._running: dict[str, float] = {}
        """Start time of each pull that has not returned yet, by message id."""

    def max_interval(self, num_pending: int) -> float:
        """Return the maximum poll interval for ``num_pending`` missing replies.

        Each missing reply costs one request per poll here, so the interval
        may grow by `PER_REPLY_POLL_SECONDS` per missing reply, up to
        `MAX_POLL_INTERVAL`. Replies that come early are still polled
        every few milliseconds, as the interval starts at `POLL_START`.
        """
        return min(
            max(POLL_MAX, PER_REPLY_POLL_SECONDS * num_pending), MAX_POLL_INTERVAL
        )

    def running_for(self, seconds: float) -> set[str]:
        """Return the message ids whose pull started ``seconds`` ago or earlier."""
        started_before = time.monotonic() - seconds
        return {
            message_id
            for message_id, started in self._running.items()
            if started <= started_before
        }

    def collect(self, pending: Collection[str], *, wait: float) -> list[Message]:
        """Start a pull for each pending id that has none, return the replies.

        Waits up to ``wait`` seconds for the pulls to return, and returns
        sooner once every pull returned and at least one reply arrived.

        Raises:
            BaseException: Whatever a pull raised; the exchange fails as it
                would if the pull had run in this thread.
        """
        for message_id in pending:
            if message_id not in self._running:
                self._running[message_id] = time.monotonic()
                threading.Thread(
                    target=self._pull,
                    args=(message_id,),
                    name="fedsec-pull",
                    daemon=True,
                ).start()
        replies: list[Message] = []
        end = time.monotonic() + wait
        while self._running:
            remaining = end - time.monotonic()
            try:
                if remaining > 0:
                    message_id, result = self._results.get(timeout=remaining)
                else:
                    message_id, result = self._results.get_nowait()
            except queue.Empty:
                return replies
            del self._running[message_id]
            if isinstance(result, BaseException):
                raise result
            replies.extend(result)
        # Every pull returned. Without replies, wait out the poll interval.
        if not replies:
            time.sleep(max(end - time.monotonic(), 0.0))
        return replies

    def _pull(self, message_id: str) -> None:
        try:
            result: list[Message] | BaseException = list(
                self._grid.pull_messages([message_id])
            )
        except BaseException as error:
            # The caller re-raises it, as if the pull had run in its thread.
            result = error
        self._results.put((message_id, result))


@contextlib.contextmanager
def _explain_client_errors(exchange: _Exchange) -> Iterator[None]:
    """Add the clients' error replies to a round that lost too many clients.

    A client that rejects a request (a weight above ``max_weight``, for
    example) reports the reason only in its reply, so the server's error
    repeats it.
    """
    try:
        yield
    except TooFewSurvivorsError as error:
        if not exchange.error_reasons:
            raise
        raise TooFewSurvivorsError(f"{error}{_client_errors(exchange)}") from error


def _client_errors(exchange: _Exchange) -> str:
    """Return the exchange's most frequent client error replies as a sentence."""
    return _most_frequent(" Error replies from clients: ", exchange.error_reasons)


def _most_frequent(label: str, counts: Mapping[str, int]) -> str:
    if not counts:
        return ""
    reasons = sorted(counts.items(), key=lambda item: -item[1])
    listed = "; ".join(
        f"{count} x {reason!r}" for reason, count in reasons[:MAX_REASONS_SHOWN]
    )
    return f"{label}{listed}"


def _parse_replies(
    replies: Mapping[int, _Source],
    parse: Callable[[_Source], _Reply],
    stage: Stage,
    server_round: int,
    invalid: dict[str, int] | None = None,
) -> dict[int, _Reply]:
    """Parse each reply; one that fails counts as dropped.

    With ``invalid``, each failure's reason is counted there too.
    """
    parsed: dict[int, _Reply] = {}
    for node, reply in replies.items():
        try:
            parsed[node] = parse(reply)
        except (ProtocolError, ValueError, KeyError) as error:
            if invalid is not None:
                reason = shortened(str(error), MAX_REASON_LENGTH)
                invalid[reason] = invalid.get(reason, 0) + 1
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
    verification: VerificationConfig | None = None,
    directory: KeyDirectory | None = None,
    previous: PendingVerification | None = None,
    on_verified: VerifiedCallback | None = None,
) -> RoundOutcome:
    """Run one round of secure aggregation for a new model.

    With ``config.key_lifetime == "round"`` the round runs the four SecAgg+
    stages, then commit and verify if asked. With ``"run"`` it registers the
    clients missing from ``directory`` and runs keyed-input and keyed-unmask,
    then commit and verify if asked.

    With ``verification.pipelined`` (keys per round only) the round's
    aggregate is fixed but not verified: the outcome's ``pending`` contains it,
    for the next round's ``previous`` or `finish_verification`. The setup
    and share-keys exchanges carry the commit and verify requests of
    ``previous``, and ``on_verified`` gets its result before masked-input.

    Raises:
        TooFewSurvivorsError: Too few clients remain at some stage.
        ValueError: The aggregated clients reported a total weight of zero,
            or the encoding leaves no room for verification under
            distributed DP.

    """
    global_arrays = arrays_to_numpy(arrays)
    layout = FloatLayout.of(global_arrays)
    plan = _secure_plan(layout.size, config, privacy, verification is not None)
    run_id = grid.run.run_id
    stages = _Stages(
        _Exchange(grid, server_round, config.stage_timeout), run_id, server_round
    )
    clock = _StageClock()
    model_sha256 = settings_sha256 = b""
    settings = None
    if verification is not None:
        settings = _round_settings(
            train_config,
            {**encoding_fields(plan.params), **plan.request_fields},
            ModelDecoding(plan.params, plan.commitment_layout),
        )
        model_sha256 = model_digest(global_arrays)
        settings_sha256 = settings.digest()
    with _explain_client_errors(stages.exchange):
        if config.key_lifetime == KEY_LIFETIME_RUN:
            if directory is None:
                raise ValueError("A round with run keys needs the run's key directory.")
            keyed = KeyedServerRound(
                run_id=run_id,
                server_round=server_round,
                vector_size=plan.vector_size,
                modulus=plan.params.modulus,
                directory=directory,
                nodes=nodes,
                num_neighbours=config.num_neighbours,
                threshold=config.threshold,
                min_inputs=plan.min_inputs,
                min_inputs_reason=plan.min_inputs_reason,
                rng=rng,
            )
            total, masked_replies, verifier = _keyed_exchanges(
                stages,
                keyed,
                plan,
                clock,
                arrays=arrays,
                train_config=train_config,
                verification=verification,
                model_sha256=model_sha256,
                settings_sha256=settings_sha256,
            )
            survivors = set(keyed.survivors)
            dropped_by_stage = dict(keyed.dropped_by_stage)
        else:
            total, masked_replies, server, verifier, sent = _per_round_key_stages(
                stages,
                plan,
                clock,
                nodes=nodes,
                arrays=arrays,
                train_config=train_config,
                config=config,
                rng=rng,
                verification=verification,
                model_sha256=model_sha256,
                settings_sha256=settings_sha256,
                previous=previous,
                on_verified=on_verified,
            )
            survivors = set(server.survivors)
            dropped_by_stage = dict(server.dropped_by_stage)
            if sent is not arrays:
                arrays = sent
                global_arrays = arrays_to_numpy(arrays)
        result = None
        pending = None
        if verifier is not None and verification is not None and settings:
            pending = _fix_secure_total(
                verifier,
                plan,
                total,
                included=sorted(survivors),
                model=arrays,
                audit_path=verification.audit_path,
                settings=settings,
            )
            if not verification.pipelined:
                result = _verification_stages(stages, pending)
                dropped_by_stage.update(pending.dropped_by_stage)
                pending = None

    clock.lap(VERIFICATION_TIMING)
    mean_update = None
    if result is not None and result.discarded:
        # The round's update is never applied, but its noised sum was seen.
        released, num_clipped = arrays, 0
        epsilon = (
            privacy.record_unreleased(num_aggregated=len(survivors))
            if privacy is not None
            else None
        )
    else:
        released, mean_update, num_clipped, epsilon = _apply_secure_total(
            total,
            plan,
            privacy,
            global_arrays,
            num_aggregated=len(survivors),
            server_round=server_round,
        )
    clock.lap(DECODE_TIMING)
    return RoundOutcome(
        arrays=released,
        num_aggregated=len(survivors),
        dropped_by_stage=dropped_by_stage,
        clipped_coordinates=num_clipped,
        upload_bytes=stages.exchange.upload_bytes,
        download_bytes=stages.exchange.download_bytes,
        train_metrics=_mean_metrics(
            {n: m for n, m in masked_replies.items() if n in survivors}
        ),
        epsilon=epsilon,
        verification=result,
        timings=clock.laps,
        pending=pending,
        previous=previous,
        mean_update=mean_update,
    )


def _apply_secure_total(
    total: NDArray[np.uint32],
    plan: _SecurePlan,
    privacy: PrivacyRound | None,
    global_arrays: dict[str, NDArray[np.generic]],
    *,
    num_aggregated: int,
    server_round: int,
) -> tuple[ArrayRecord, NDArray[np.float64], int, float | None]:
    """Decode the unmasked sum, add central noise and apply the mean update.

    Returns the new model, the mean update with any central noise, the
    number of clipped coordinates and the epsilon after the round
    (``None`` without DP).

    Raises:
        ProtocolError: If the sum does not decode.
        ValueError: If the total weight or the mean is out of range, or the
            new model is not finite.

    """
    params = plan.params
    try:
        decoded = decode_sum(total, params=params, num_extra=plan.num_extra)
        _check_total_weight(
            decoded.total_weight,
            params=params,
            num_aggregated=num_aggregated,
            server_round=server_round,
            private=privacy is not None,
        )
        mean_update, num_clipped = decoded.mean, decoded.num_clipped
        _check_mean_range(mean_update, params=params, server_round=server_round)
        bit_sum = 0.0
        if privacy is not None:
            if plan.adaptive_bit:
                bit_sum = float(signed(int(decoded.extra[0]), params.modulus))
            _check_private_slots(
                privacy,
                num_clipped=num_clipped,
                bit_sum=bit_sum,
                num_aggregated=num_aggregated,
                server_round=server_round,
            )
    except (ProtocolError, ValueError):
        if privacy is not None:
            privacy.record_unreleased(num_aggregated=num_aggregated)
        raise
    if num_clipped:
        logger.warning(
            "Round %d: %d update coordinates were clipped to the range +-%g",
            server_round,
            num_clipped,
            params.clip_range,
        )

    epsilon = None
    if privacy is not None:
        epsilon = privacy.finish(
            mean_update, num_aggregated=num_aggregated, bit_sum=bit_sum
        )
    return (
        _updated_model(global_arrays, mean_update, server_round),
        mean_update,
        num_clipped,
        epsilon,
    )


def _per_round_key_stages(
    stages: _Stages,
    plan: _SecurePlan,
    clock: _StageClock,
    *,
    nodes: list[int],
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    config: SecAggConfig,
    rng: random.Random,
    verification: VerificationConfig | None,
    model_sha256: bytes,
    settings_sha256: bytes,
    previous: PendingVerification | None,
    on_verified: VerifiedCallback | None,
) -> tuple[
    NDArray[np.uint32],
    dict[int, Message],
    ServerRound,
    ServerVerification | None,
    ArrayRecord,
]:
    """Run setup, share-keys, masked-input and unmask.

    Returns the unmasked sum, the masked-input replies, the round state,
    when verified the verifier with the clients' identity keys and key-list
    signatures, and the model the masked-input requests carried.

    With ``previous``, the setup exchange carries that round's commit
    requests and the share-keys exchange its verify requests.
    ``on_verified`` gets its result before any client trains on its model.
    When ``previous`` is discarded, its update must not reach any client,
    so this round trains on ``previous.model`` instead of ``arrays``.
    """
    server = ServerRound(
        run_id=stages.run_id,
        server_round=stages.server_round,
        vector_size=plan.vector_size,
        modulus=plan.params.modulus,
        num_neighbours=config.num_neighbours,
        threshold=config.threshold,
        min_inputs=plan.min_inputs,
        min_inputs_reason=plan.min_inputs_reason,
        rng=rng,
    )
    verifier = None
    if verification is not None:
        verifier = ServerVerification(
            run_id=stages.run_id,
            server_round=stages.server_round,
            model_sha256=model_sha256,
            settings_sha256=settings_sha256,
        )

    _setup_stage(stages, server, verifier, nodes, previous)
    clock.lap(Stage.SETUP.value)
    _share_keys_stage(stages, server, verifier, previous)
    clock.lap(Stage.SHARE_KEYS.value)
    if previous is not None and previous.result is not None:
        if previous.result.discarded:
            arrays = previous.model
            if verifier is not None:
                verifier.model_sha256 = model_digest(arrays_to_numpy(arrays))
        if on_verified:
            on_verified(previous.server_round, previous.result)
    masked_replies = _masked_input_stage(
        stages, server, plan, arrays=arrays, train_config=train_config
    )
    clock.lap(Stage.MASKED_INPUT.value)
    total = _unmask_stage(stages, server)
    clock.lap(Stage.UNMASK.value)

    return total, masked_replies, server, verifier, arrays


def _keyed_exchanges(
    stages: _Stages,
    keyed: KeyedServerRound,
    plan: _SecurePlan,
    clock: _StageClock,
    *,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    verification: VerificationConfig | None,
    model_sha256: bytes,
    settings_sha256: bytes,
) -> tuple[NDArray[np.uint32], dict[int, Message], ServerVerification | None]:
    """Register new clients and run keyed-input and keyed-unmask.

    Returns the unmasked sum, the keyed-input replies and, when verified, the
    verifier with the clients' identity keys and key-list signatures.

    Clients that fail keyed-input lose their registration, so a client that
    restarted without its keys registers again when next sampled. Under
    verification a client signs the round's identity-key list with its
    masked input, and one whose signature fails counts as dropped.
    """
    verifier = None
    if verification is not None:
        verifier = ServerVerification(
            run_id=stages.run_id,
            server_round=stages.server_round,
            model_sha256=model_sha256,
            settings_sha256=settings_sha256,
        )
    _register_stage(stages, keyed.directory, keyed.nodes, verify=verifier is not None)
    clock.lap(Stage.REGISTER.value)

    input_requests = keyed.input_requests()
    if verifier is not None:
        verifier.receive_identity_keys(
            {node: keyed.directory.identity_keys[node] for node in input_requests}
        )
    requests = {
        node: {
            **request.to_fields(),
            **encoding_fields(plan.params),
            **plan.request_fields,
            **(verifier.key_list_request(node).to_fields() if verifier else {}),
        }
        for node, request in input_requests.items()
    }
    replies = stages.send(
        Stage.KEYED_INPUT,
        requests,
        {ARRAYS_RECORD: arrays, CONFIG_RECORD: train_config},
    )

    def parse(
        message: Message,
    ) -> tuple[NDArray[np.uint32], EncryptedShares, KeyListSignature | None]:
        fields = protocol_fields(message.content)
        signature = KeyListSignature.from_fields(fields) if verifier else None
        return _masked_vector(message), EncryptedShares.from_fields(fields), signature

    parsed = stages.parse(replies, parse, Stage.KEYED_INPUT)
    if verifier is not None:
        signed = verifier.receive_key_list_signatures(
            {node: sig for node, (_, _, sig) in parsed.items() if sig is not None}
        )
        parsed = {node: reply for node, reply in parsed.items() if node in signed}
    keyed.directory.forget(set(requests) - set(parsed))
    keyed.receive_inputs(
        {node: (vector, shares) for node, (vector, shares, _) in parsed.items()}
    )
    clock.lap(Stage.KEYED_INPUT.value)

    unmask_parser = _ParsedUnmaskReplies()
    unmask_replies = stages.send(
        Stage.KEYED_UNMASK,
        {node: r.to_fields() for node, r in keyed.unmask_requests().items()},
        enough=lambda replies: keyed.can_unmask(unmask_parser.update(replies)),
    )
    total = keyed.receive_unmask(
        stages.parse(unmask_replies, _keyed_unmask_reply, Stage.KEYED_UNMASK),
        skipped=stages.exchange.skipped,
    )
    clock.lap(Stage.KEYED_UNMASK.value)

    return total, replies, verifier


def _keyed_unmask_reply(message: Message) -> KeyedUnmaskReply:
    return KeyedUnmaskReply.from_fields(protocol_fields(message.content))


class _ParsedUnmaskReplies:
    """Unmask replies parsed as they arrive, each message once.

    Invalid replies are skipped without a log line; ``stages.parse`` logs
    each of them once, after the exchange.
    """

    def __init__(self) -> None:
        self._valid: dict[int, KeyedUnmaskReply] = {}
        self._seen: set[int] = set()

    def update(self, replies: Mapping[int, Message]) -> dict[int, KeyedUnmaskReply]:
        """Parse the replies not seen before and return all valid ones."""
        for node in replies.keys() - self._seen:
            self._seen.add(node)
            try:
                self._valid[node] = _keyed_unmask_reply(replies[node])
            except (ProtocolError, ValueError):
                continue
        return self._valid


def _register_stage(
    stages: _Stages, directory: KeyDirectory, nodes: list[int], *, verify: bool
) -> None:
    missing = directory.missing(nodes)
    if not missing:
        return
    request = SetupRequest(verification=verify).to_fields()
    replies = stages.send(Stage.REGISTER, dict.fromkeys(missing, request))
    parsed = stages.parse(
        replies, lambda m: _setup_reply(m, verify=verify), Stage.REGISTER
    )
    directory.register(
        {node: reply for node, (reply, _) in parsed.items()},
        identity_keys=(
            {node: identity for node, (_, identity) in parsed.items()}
            if verify
            else None
        ),
    )


def _setup_reply(message: Message, *, verify: bool) -> tuple[SetupReply, bytes]:
    """Parse a setup or register reply and its identity key, checked if ``verify``."""
    fields = protocol_fields(message.content)
    identity = IdentityKey.from_fields(fields).public_key
    if verify and len(identity) != signatures.IDENTITY_KEY_SIZE:
        raise ProtocolError(
            f"identity-public-key must be {signatures.IDENTITY_KEY_SIZE} bytes. "
            f"Found {len(identity)}."
        )
    return SetupReply.from_fields(fields), identity


def _check_total_weight(
    total_weight: int,
    *,
    params: EncodingParams,
    num_aggregated: int,
    server_round: int,
    private: bool,
) -> None:
    """Reject a sum whose weight slot no set of honest clients could produce.

    Each honest client adds a weight of at most ``max_weight``, so a larger
    total means a client wrote into the weight slot. Under DP each adds
    exactly 1, and the noise is calibrated for a mean over the clients. A
    smaller total would divide by less and scale every honest update up
    against the same noise, so under DP the total must equal the count.
    """
    if private and total_weight != num_aggregated:
        raise ProtocolError(
            f"Round {server_round}: the aggregated weight {total_weight} differs "
            f"from the {num_aggregated} clients aggregated, although each client "
            "adds weight 1 under DP; a client sent a malformed input. The round "
            "is aborted and no model is released."
        )
    limit = params.max_weight * num_aggregated
    if total_weight > limit:
        raise ProtocolError(
            f"Round {server_round}: the aggregated weight {total_weight} exceeds "
            f"max_weight * clients = {limit}; a client sent a malformed input. "
            "The round is aborted and no model is released."
        )


BIT_SUM_NOISE_WIDTHS = 10.0
"""Widths of the total bit noise by which a distributed bit sum may leave 0 to m.

The sum of the clients' discrete Gaussian shares is sub-Gaussian, so an honest
sum leaves that range by more with probability at most 2 exp(-50), below 4e-22."""


def _check_private_slots(
    privacy: PrivacyRound,
    *,
    num_clipped: int,
    bit_sum: float,
    num_aggregated: int,
    server_round: int,
) -> None:
    """Reject DP sums whose count slots no honest clients could produce.

    Under DP every client clips its update before encoding, so none counts a
    coordinate clipped. In central mode each sends its clipping bit without
    noise, so the bits add up to between 0 and the number of clients, and in
    distributed mode to that range widened by `BIT_SUM_NOISE_WIDTHS` widths
    of the bits' total noise. A client that wrote other values would forge
    the report or steer the clipping norm. Within these ranges one client
    can still shift the sum, which changes the norm by a factor of at most
    exp(learning rate) per round, as an honest round can.
    """
    if num_clipped:
        raise ProtocolError(
            f"Round {server_round}: the sum counts {num_clipped} clipped "
            "coordinates, although every client clips before encoding under DP; "
            "a client sent a malformed input. The round is aborted and no model "
            "is released."
        )
    # In distributed mode each client's bit carries its noise share, so the
    # sum may leave 0 to m by a few widths of their total noise.
    margin = 0.0
    if privacy.server.config.mode is DPMode.DISTRIBUTED:
        total_sigma = privacy.plan.bit_sigma_client * math.sqrt(num_aggregated)
        margin = BIT_SUM_NOISE_WIDTHS * total_sigma
    # 0.0 - margin is +0.0 without a margin, so the message never shows -0.
    lower, upper = 0.0 - margin, num_aggregated + margin
    if not lower <= bit_sum <= upper:
        raise ProtocolError(
            f"Round {server_round}: the clipping bits sum to {bit_sum:g}, outside "
            f"{lower:g} to {upper:g} for the "
            f"{num_aggregated} clients aggregated; a client sent a malformed "
            "input. The round is aborted and no model is released."
        )


def _check_mean_range(
    mean: NDArray[np.float64], *, params: EncodingParams, server_round: int
) -> None:
    """Reject a mean outside the clipping range, which no honest clients produce.

    Every honest coordinate lies in ``[-clip_range, clip_range]``, so a mean
    outside it means that a client added to its masked vector. Distributed DP
    noise can leave the range honestly, so the check is skipped with it.
    """
    if params.noise_headroom or mean.size == 0:
        return
    worst = float(np.max(np.abs(mean)))
    if worst > params.clip_range * (1 + MEAN_RANGE_TOLERANCE):
        raise ProtocolError(
            f"Round {server_round}: a coordinate of the aggregated mean is "
            f"{worst:.6g}, outside the clipping range +-{params.clip_range:g}; a "
            "client sent a malformed input. The round is aborted and no model is "
            "released."
        )


def _round_settings(
    train_config: ConfigRecord,
    request_fields: Mapping[str, object],
    decoding: ModelDecoding,
) -> RoundSettings:
    """Return the settings of a round as the clients will receive them.

    The configuration is hashed after a round trip through Flower's
    serialization, which the clients' copy also took: it turns, for
    example, a bool in a list of ints into an int.
    """
    delivered = config_record_from_proto(config_record_to_proto(train_config))
    return RoundSettings(
        config_sha256=mapping_digest(dict(delivered.items())),
        fields_sha256=mapping_digest(request_fields),
        decoding=decoding,
    )


def _fix_secure_total(
    verifier: ServerVerification,
    plan: _SecurePlan,
    total: NDArray[np.uint32],
    *,
    included: list[int],
    model: ArrayRecord,
    audit_path: Path | None,
    settings: RoundSettings,
) -> PendingVerification:
    """Split the unmasked sum into aggregate and limb sums and fix both."""
    return PendingVerification(
        verifier,
        included=included,
        aggregate=plan.commitment_layout.aggregate_vector(
            total[: total.size - BLINDING_LIMBS], num_included=len(included)
        ),
        blinding_sums=total[total.size - BLINDING_LIMBS :],
        model=model,
        audit_path=audit_path,
        settings=settings,
    )


@dataclass(frozen=True)
class _SecurePlan:
    """The encoding of a secure round and the layout of its vectors."""

    params: EncodingParams
    request_fields: dict[str, object]
    adaptive_bit: bool
    blinding: bool
    vector_size: int
    commitment_layout: CommitmentLayout
    min_inputs: int = 0
    min_inputs_reason: str = ""

    @property
    def num_extra(self) -> int:
        """Slots after the trailer: the clipping bit, then the blinding limbs."""
        return int(self.adaptive_bit) + (BLINDING_LIMBS if self.blinding else 0)


def _secure_plan(
    num_coordinates: int,
    config: SecAggConfig,
    privacy: PrivacyRound | None,
    verify: bool,
) -> _SecurePlan:
    params = config.encoding()
    request_fields: dict[str, object] = {}
    client_privacy = None
    if privacy is not None:
        assert privacy.plan.encoding is not None
        params = privacy.plan.encoding
        client_privacy = ClientPrivacy.of(privacy.plan, privacy.server.config)
        request_fields.update(client_privacy.to_fields())
    adaptive_bit = client_privacy is not None and client_privacy.adaptive

    commitment_layout = CommitmentLayout(modulus=params.modulus)
    if (
        verify
        and client_privacy is not None
        and client_privacy.mode is DPMode.DISTRIBUTED
    ):
        commitment_layout = CommitmentLayout.distributed(
            params,
            num_coordinates=num_coordinates,
            bit_slot=num_coordinates + TRAILER_SIZE if adaptive_bit else None,
            bit_sigma_client=client_privacy.bit_sigma_client,
        )
    num_extra = int(adaptive_bit) + (BLINDING_LIMBS if verify else 0)
    min_inputs, min_inputs_reason = 0, ""
    if privacy is not None and privacy.plan.min_inputs:
        min_inputs = privacy.plan.min_inputs
        dp_config = privacy.server.config
        sampled = privacy.plan.num_sampled
        min_inputs_reason = (
            "the noise of fewer clients could take epsilon above target_epsilon "
            f"{dp_config.target_epsilon}; max_dropout_fraction "
            f"{dp_config.max_dropout_fraction} lets {sampled - min_inputs} of "
            f"{sampled} sampled clients drop"
        )

    return _SecurePlan(
        params=params,
        request_fields=request_fields,
        adaptive_bit=adaptive_bit,
        blinding=verify,
        vector_size=num_coordinates + TRAILER_SIZE + num_extra,
        commitment_layout=commitment_layout,
        min_inputs=min_inputs,
        min_inputs_reason=min_inputs_reason,
    )


@dataclass
class _Stages:
    """The exchange of a round and the header of each of its stages."""

    exchange: _Exchange
    run_id: int
    server_round: int

    def send(
        self,
        stage: Stage,
        fields_by_node: Mapping[int, Mapping[str, object]],
        records: Mapping[str, ArrayRecord | ConfigRecord] | None = None,
        enough: Callable[[Mapping[int, Message]], bool] | None = None,
        deferred: _Deferred | None = None,
    ) -> dict[int, Message]:
        """Send one stage's request to each node and return the replies.

        With ``deferred``, a node that gets both requests gets the deferred
        one in `DEFERRED_RECORD` of the same message, and a node that gets
        only the deferred one gets it as the message's stage.
        """
        logger.debug("Round %d: stage %s", self.server_round, stage.value)
        header = RoundHeader(
            stage=stage, run_id=self.run_id, server_round=self.server_round
        )
        contents = {}
        for node, fields in fields_by_node.items():
            content = _with_protocol(header, fields)
            _add_records(content, records or {})
            if deferred is not None and node in deferred.fields_by_node:
                content[DEFERRED_RECORD] = deferred.record(node)
                _add_records(content, deferred.records)
            contents[node] = content
        if deferred is not None:
            for node, fields in deferred.fields_by_node.items():
                if node not in contents:
                    content = _with_protocol(deferred.header, fields)
                    _add_records(content, deferred.records)
                    contents[node] = content
        return self.exchange.send(contents, enough)

    def parse(
        self,
        replies: Mapping[int, _Source],
        parse: Callable[[_Source], _Reply],
        stage: Stage,
    ) -> dict[int, _Reply]:
        """Parse replies; an invalid one counts as dropped."""
        return _parse_replies(replies, parse, stage, self.server_round)


@dataclass(frozen=True)
class _Deferred:
    """Requests of an earlier round's stage that travel with this exchange."""

    header: RoundHeader
    fields_by_node: Mapping[int, Mapping[str, object]]
    records: Mapping[str, ArrayRecord | ConfigRecord] = field(default_factory=dict)

    def record(self, node: int) -> ConfigRecord:
        """Return the request of ``node``, header included, as one ConfigRecord."""
        content = _with_protocol(self.header, self.fields_by_node[node])
        return content.config_records[PROTOCOL_RECORD]

    def reply_fields(
        self, replies: Mapping[int, Message], *, combined: Collection[int]
    ) -> dict[int, dict[str, object]]:
        """Return the fields of each reply to the deferred requests.

        A node in ``combined`` got the deferred request inside another stage's
        message and replies to it in `DEFERRED_RECORD`, so a reply without that
        record counts as missing. The other nodes reply in the protocol record.
        """
        found: dict[int, dict[str, object]] = {}
        for node, message in replies.items():
            if node not in self.fields_by_node:
                continue
            if node not in combined:
                found[node] = dict(
                    message.content.config_records.get(PROTOCOL_RECORD, {})
                )
                continue
            record = message.content.config_records.get(DEFERRED_RECORD)
            if record is None:
                logger.warning(
                    "Round %d: node %d sent no %s reply, so it counts as dropped",
                    self.header.server_round,
                    node,
                    self.header.stage.value,
                )
                continue
            found[node] = dict(record)
        return found


def _add_records(
    content: RecordDict, records: Mapping[str, ArrayRecord | ConfigRecord]
) -> None:
    for name, record in records.items():
        content[name] = record


def _setup_stage(
    stages: _Stages,
    server: ServerRound,
    verifier: ServerVerification | None,
    nodes: list[int],
    previous: PendingVerification | None = None,
) -> None:
    verify = verifier is not None
    request = SetupRequest(verification=verify).to_fields()
    commit = previous.commit_requests() if previous is not None else None
    replies = stages.send(Stage.SETUP, dict.fromkeys(nodes, request), deferred=commit)
    if previous is not None and commit is not None:
        previous.receive_commitments(commit.reply_fields(replies, combined=nodes))
    parsed = stages.parse(
        {node: reply for node, reply in replies.items() if node in nodes},
        lambda m: _setup_reply(m, verify=verify),
        Stage.SETUP,
    )
    server.receive_setup(nodes, {node: reply for node, (reply, _) in parsed.items()})
    if verifier is not None:
        verifier.receive_identity_keys(
            {node: parsed[node][1] for node in server.plan.neighbours}
        )


def _share_keys_stage(
    stages: _Stages,
    server: ServerRound,
    verifier: ServerVerification | None,
    previous: PendingVerification | None = None,
) -> None:
    requests = {
        node: {
            **request.to_fields(),
            **(verifier.key_list_request(node).to_fields() if verifier else {}),
        }
        for node, request in server.share_keys_requests().items()
    }
    verify = previous.verify_requests() if previous is not None else None
    replies = stages.send(Stage.SHARE_KEYS, requests, deferred=verify)
    if previous is not None and verify is not None:
        previous.receive_verdicts(verify.reply_fields(replies, combined=requests))
        replies = {node: reply for node, reply in replies.items() if node in requests}

    def parse(message: Message) -> tuple[EncryptedShares, KeyListSignature | None]:
        fields = protocol_fields(message.content)
        signature = KeyListSignature.from_fields(fields) if verifier else None
        return EncryptedShares.from_fields(fields), signature

    parsed = stages.parse(replies, parse, Stage.SHARE_KEYS)
    if verifier is not None:
        signed = verifier.receive_key_list_signatures(
            {node: sig for node, (_, sig) in parsed.items() if sig is not None}
        )
        parsed = {node: reply for node, reply in parsed.items() if node in signed}
    server.receive_share_keys({node: shares for node, (shares, _) in parsed.items()})


def _masked_input_stage(
    stages: _Stages,
    server: ServerRound,
    plan: _SecurePlan,
    *,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
) -> dict[int, Message]:
    requests = {
        node: {
            **shares.to_fields(),
            **encoding_fields(plan.params),
            **plan.request_fields,
        }
        for node, shares in server.masked_input_requests().items()
    }
    replies = stages.send(
        Stage.MASKED_INPUT,
        requests,
        {ARRAYS_RECORD: arrays, CONFIG_RECORD: train_config},
    )
    server.receive_masked_inputs(
        stages.parse(replies, _masked_vector, Stage.MASKED_INPUT)
    )
    return replies


def _unmask_stage(stages: _Stages, server: ServerRound) -> NDArray[np.uint32]:
    requests = {
        node: request.to_fields() for node, request in server.unmask_requests().items()
    }
    replies = stages.send(Stage.UNMASK, requests)
    return server.receive_unmask(
        stages.parse(
            replies,
            lambda m: UnmaskReply.from_fields(protocol_fields(m.content)),
            Stage.UNMASK,
        )
    )


def _verification_stages(
    stages: _Stages, pending: PendingVerification
) -> VerificationResult:
    """Run the commit and verify stages of a fixed aggregate on their own."""
    commit = pending.commit_requests()
    replies = stages.send(Stage.COMMIT, {}, deferred=commit)
    pending.receive_commitments(commit.reply_fields(replies, combined=()))

    verify = pending.verify_requests()
    replies = stages.send(Stage.VERIFY, {}, deferred=verify)
    return pending.receive_verdicts(verify.reply_fields(replies, combined=()))


def finish_verification(
    grid: Grid, pending: PendingVerification, *, timeout: float
) -> VerificationResult:
    """Run the commit and verify stages of a pipelined run's last round."""
    stages = _Stages(
        _Exchange(grid, pending.server_round, timeout),
        pending.verifier.run_id,
        pending.server_round,
    )
    with _explain_client_errors(stages.exchange):
        return _verification_stages(stages, pending)


def _masked_vector(reply: Message) -> NDArray[np.uint32]:
    record = reply.content.array_records.get(MASKED_INPUT_RECORD)
    if record is None or list(record.keys()) != [MASKED_VECTOR_KEY]:
        raise ProtocolError(
            f"The reply must carry the {MASKED_INPUT_RECORD!r} ArrayRecord with the "
            f"single key {MASKED_VECTOR_KEY!r}."
        )
    vector: NDArray[np.uint32] = array_to_numpy(
        MASKED_VECTOR_KEY, record[MASKED_VECTOR_KEY]
    )
    return vector


def apply_step(
    arrays: ArrayRecord, step: NDArray[np.float64], server_round: int
) -> ArrayRecord:
    """Add `step` to the float arrays of `arrays` and return the new model.

    Raises:
        ValueError: If the new model has a NaN or an infinity.
    """
    return _updated_model(arrays_to_numpy(arrays), step, server_round)


def _updated_model(
    global_arrays: dict[str, NDArray[np.generic]],
    mean_update: NDArray[np.float64],
    server_round: int,
) -> ArrayRecord:
    """Apply the mean update to the global model and return the new model.

    Raises:
        ValueError: If a float array of the new model has a NaN or an
            infinity, naming the round and the array, so that no such model
            is released.

    """
    arrays = FloatLayout.of(global_arrays).apply_update(global_arrays, mean_update)
    for key, value in arrays.items():
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise ValueError(
                f"Round {server_round}: the new model's array {key!r} has NaN or "
                "infinite values, for example from noise or updates beyond the "
                "float range of its dtype. No model from this round is released."
            )
    return ArrayRecord({k: _array(v) for k, v in arrays.items()})


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

    invalid: dict[str, int] = {}
    updates = _parse_replies(
        replies, parse, Stage.PLAIN_INPUT, server_round, invalid=invalid
    )
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
            f"{_client_errors(exchange)}"
            f"{_most_frequent(' Invalid replies: ', invalid)}"
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
    return RoundOutcome(
        arrays=_updated_model(global_arrays, mean_update, server_round),
        mean_update=mean_update,
        num_aggregated=len(updates),
        epsilon=epsilon,
        dropped_by_stage={"train": len(nodes) - len(updates)},
        clipped_coordinates=0,
        upload_bytes=exchange.upload_bytes,
        download_bytes=exchange.download_bytes,
        train_metrics=_mean_metrics({n: replies[n] for n in updates}),
    )


def run_plain_verified_round(
    grid: Grid,
    *,
    server_round: int,
    nodes: list[int],
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    timeout: float,
    verification: VerificationConfig,
) -> RoundOutcome:
    """Run plain FedAvg whose aggregate the clients verify.

    Clients send their encoded update and blinding vector in clear, encoded
    with ``verification.plain_encoding``. The server sums them as secure
    aggregation would, then runs the commit and verify stages.

    Raises:
        ValueError: No client replied validly, or their total weight is zero.

    """
    global_arrays = arrays_to_numpy(arrays)
    layout = FloatLayout.of(global_arrays)
    params = verification.plain_encoding.encoding()
    settings = _round_settings(
        train_config,
        encoding_fields(params),
        ModelDecoding(params, CommitmentLayout(modulus=params.modulus)),
    )
    run_id = grid.run.run_id
    verifier = ServerVerification(
        run_id=run_id,
        server_round=server_round,
        model_sha256=model_digest(global_arrays),
        settings_sha256=settings.digest(),
    )
    stages = _Stages(_Exchange(grid, server_round, timeout), run_id, server_round)

    replies = stages.send(
        Stage.SETUP, dict.fromkeys(nodes, SetupRequest(verification=True).to_fields())
    )
    identities = stages.parse(
        replies,
        lambda m: IdentityKey.from_fields(protocol_fields(m.content)).public_key,
        Stage.SETUP,
    )
    keyed = sorted(verifier.receive_identity_keys(identities))
    dropped_by_stage = {Stage.SETUP.value: len(nodes) - len(keyed)}

    inputs, input_replies = _plain_input_stage(
        stages, verifier, keyed, params, arrays=arrays, train_config=train_config
    )
    included = sorted(inputs)
    dropped_by_stage[Stage.PLAIN_INPUT.value] = len(keyed) - len(included)
    if not included:
        raise ValueError(
            f"Round {server_round}: none of the {len(nodes)} sampled clients sent a "
            "valid plain input, so there is nothing to aggregate."
        )
    total = np.zeros(layout.size + TRAILER_SIZE, dtype=np.uint32)
    blinding_sums = np.zeros(BLINDING_LIMBS, dtype=np.uint32)
    for update, blinding in inputs.values():
        total += update
        blinding_sums += blinding
    if params.modulus < 2**32:
        np.bitwise_and(total, np.uint32(params.modulus - 1), out=total)

    pending = PendingVerification(
        verifier,
        included=included,
        aggregate=total,
        blinding_sums=blinding_sums,
        model=arrays,
        audit_path=verification.audit_path,
        settings=settings,
    )
    result = _verification_stages(stages, pending)
    dropped_by_stage.update(pending.dropped_by_stage)
    # A discarded round keeps the model; otherwise the mean update is applied.
    released, num_clipped, mean_update = arrays, 0, None
    if not result.discarded:
        decoded = decode_sum(total, params=params)
        mean_update = decoded.mean
        released = _updated_model(global_arrays, mean_update, server_round)
        num_clipped = decoded.num_clipped
    return RoundOutcome(
        arrays=released,
        mean_update=mean_update,
        num_aggregated=len(included),
        dropped_by_stage=dropped_by_stage,
        clipped_coordinates=num_clipped,
        upload_bytes=stages.exchange.upload_bytes,
        download_bytes=stages.exchange.download_bytes,
        train_metrics=_mean_metrics({n: input_replies[n] for n in included}),
        verification=result,
    )


_PlainInput = tuple[NDArray[np.uint32], NDArray[np.uint32]]


def _plain_input_stage(
    stages: _Stages,
    verifier: ServerVerification,
    nodes: list[int],
    params: EncodingParams,
    *,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
) -> tuple[dict[int, _PlainInput], dict[int, Message]]:
    """Collect the checked plain inputs of the clients that signed the key list."""
    fields = {**encoding_fields(params)}
    replies = stages.send(
        Stage.PLAIN_INPUT,
        {
            node: {**fields, **verifier.key_list_request(node).to_fields()}
            for node in nodes
        },
        {ARRAYS_RECORD: arrays, CONFIG_RECORD: train_config},
    )
    expected_size = FloatLayout.of(arrays_to_numpy(arrays)).size + TRAILER_SIZE

    def parse(message: Message) -> tuple[_PlainInput, KeyListSignature]:
        signature = KeyListSignature.from_fields(protocol_fields(message.content))
        return _plain_input(message, params, size=expected_size), signature

    parsed = stages.parse(replies, parse, Stage.PLAIN_INPUT)
    signed = verifier.receive_key_list_signatures(
        {node: signature for node, (_, signature) in parsed.items()}
    )
    inputs = {node: value for node, (value, _) in parsed.items() if node in signed}
    return inputs, replies


def _plain_input(reply: Message, params: EncodingParams, *, size: int) -> _PlainInput:
    """Check a plain input so that honest inputs cannot wrap the modulus.

    Each model coordinate must be at most max_weight * (levels - 1), the
    weight at most max_weight and the clipped count at most its cap, which
    are the bounds honest encoding keeps.
    """
    record = reply.content.array_records.get(PLAIN_INPUT_RECORD)
    if record is None or sorted(record.keys()) != [BLINDING_KEY, ENCODED_UPDATE_KEY]:
        raise ProtocolError(
            f"The reply must carry the {PLAIN_INPUT_RECORD!r} ArrayRecord with the "
            f"keys {ENCODED_UPDATE_KEY!r} and {BLINDING_KEY!r}."
        )
    update = array_to_numpy(ENCODED_UPDATE_KEY, record[ENCODED_UPDATE_KEY])
    blinding = array_to_numpy(BLINDING_KEY, record[BLINDING_KEY])
    if update.dtype != np.uint32 or update.shape != (size,):
        raise ProtocolError(
            f"The encoded update must be uint32 of shape ({size},). "
            f"Found {update.dtype} of shape {update.shape}."
        )
    commitments.check_blinding(blinding)

    bounds = (
        (
            update[: size - TRAILER_SIZE],
            params.max_weight * (params.quantization_levels - 1),
        ),
        (update[size - TRAILER_SIZE : size - 1], params.max_weight),
        (update[size - 1 :], params.clip_count_cap),
    )
    for values, bound in bounds:
        if values.size and int(values.max()) > bound:
            raise ProtocolError(
                "The encoded update has a value above the bound of its slot. "
                f"Found {int(values.max())} above {bound}."
            )
    return update, blinding
