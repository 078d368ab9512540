"""ClientApp mods that run the client side of secure aggregation and verification.

Wrap a ``@app.train`` handler with ``secure_aggregation_mod``. The server
sends one train message per stage, each naming its stage. The mod replies
to every stage itself except masked-input, where it calls the wrapped handler,
checks its reply, and sends back only the masked, encoded update and the
handler's metrics. No plaintext array ever leaves the client through this
mod; a reply it cannot encode becomes an error reply, and the server counts
the client as dropped.

When the server asks for verification at setup, the mod also sends an
identity key, signs the round's identity-key list, appends a blinding vector
to its input, and answers the commit and verify stages. By default a client
whose round failed verification refuses to train on any later model of the
run (``make_secure_aggregation_mod`` changes that). A client that verified
round r and takes part in round r + 1 also checks that the model it gets is
round r's model plus the decoded mean of round r's aggregate, and treats any
other model as a failed verification.

``plain_verification_mod`` is the client side of plain FedAvg with
verification: it sends the encoded update and the blinding vector in clear.
Never stack it with ``secure_aggregation_mod``.

The mods keep the client's protocol state in ``Context.state``, so each stage
may run in a new ClientApp process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

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
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from numpy.typing import NDArray

from . import verification
from .budget import ClientPrivacyBudget, PrivacyBudgetError, SpentRound
from .core import client as protocol
from .core import commitments, run_keys
from .core.encoding import TRAILER_SIZE, EncodingParams, encode_update
from .core.errors import ProtocolError, shortened
from .core.messages import (
    CommitRequest,
    EncryptedShares,
    Fields,
    IdentityKey,
    IdentityKeyList,
    KeyedUnmaskRequest,
    RoundHeader,
    SetupRequest,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    VerifyRequest,
)
from .dp.random import SecureRandom
from .models import (
    CommitmentLayout,
    FloatLayout,
    ModelDecoding,
    RoundSettings,
    mapping_digest,
    model_digest,
    next_model,
)
from .privacy import ClientPrivacy, DPMode, add_distributed_noise, clip_flat_update
from .records import (
    AGGREGATE_KEY,
    AGGREGATE_RECORD,
    ARRAYS_RECORD,
    BLINDING_KEY,
    CONFIG_RECORD,
    DEFERRED_RECORD,
    ENCODED_UPDATE_KEY,
    INPUT_ROUND_RECORD,
    MASKED_INPUT_RECORD,
    MASKED_VECTOR_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PLAIN_INPUT_RECORD,
    PRIVACY_BUDGET_RECORD,
    PROTOCOL_RECORD,
    ROUND_MODEL_RECORD,
    RUN_KEYS_RECORD,
    STATE_RECORD,
    VERIFICATION_ARRAYS_RECORD,
    VERIFICATION_DECODING_RECORD,
    VERIFICATION_STATE_RECORD,
    array_to_numpy,
    arrays_to_numpy,
    check_client_arrays,
    encoding_fields,
    num_examples,
    parse_encoding,
    protocol_fields,
    single_array_record,
    to_config_record,
)
from .verification import (
    ClientVerificationState,
    FailurePolicy,
)

logger = logging.getLogger("fedsec_flwr.mod")

MAX_ERROR_REASON_LENGTH = 1000
"""Characters of an error text that an error reply or its log line quotes."""

CLIENT_TRAIN_SECONDS = "fedsec.client-train-seconds"
"""Reply metric: seconds in the wrapped training handler."""

CLIENT_TRAIN_AND_ENCODE_SECONDS = "fedsec.client-train-encode-seconds"
"""Reply metric: seconds from the start of training to the encoded update."""

CLIENT_MASK_SECONDS = "fedsec.client-mask-seconds"
"""Reply metric: seconds spent adding the masks."""

CLIENT_CPU_SECONDS = "fedsec.client-cpu-seconds"
"""Reply metric: CPU seconds of the client's process in the input stage."""

CLIENT_TIMING_METRICS = (
    CLIENT_TRAIN_SECONDS,
    CLIENT_TRAIN_AND_ENCODE_SECONDS,
    CLIENT_MASK_SECONDS,
    CLIENT_CPU_SECONDS,
)
"""Reply metrics sent only with ``report_timings=True``: they travel in clear,
and the training time hints at the size of the client's dataset."""

_Extra = dict[str, ArrayRecord | MetricRecord | ConfigRecord]


@dataclass(frozen=True)
class _Options:
    on_verification_failure: FailurePolicy
    require_verification: bool
    privacy_budget: ClientPrivacyBudget | None = None
    report_timings: bool = False
    trust_dropout_reports: bool = False
    forward_metrics: bool = True

    def __post_init__(self) -> None:
        names = (
            "require_verification",
            "report_timings",
            "trust_dropout_reports",
            "forward_metrics",
        )
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False. Found {value!r}.")


_DEFAULT_OPTIONS = _Options(
    on_verification_failure=FailurePolicy.REFUSE, require_verification=False
)
_DEFAULT_SECURE_OPTIONS = dataclasses.replace(_DEFAULT_OPTIONS, forward_metrics=False)


def secure_aggregation_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Run one stage of secure aggregation for a train message.

    A train message without the protocol record gets an error reply: a client
    wrapped with this mod never sends a plaintext update. The wrapped
    ClientApp's metrics are not sent either, since they would travel in
    clear; `make_secure_aggregation_mod` can forward them. After a round
    that failed verification, or a commitment that got no transcript, it
    refuses to train for the rest of the run.
    """
    return _secure_stage(msg, context, call_next, _DEFAULT_SECURE_OPTIONS)


def make_secure_aggregation_mod(
    *,
    on_verification_failure: FailurePolicy | str = FailurePolicy.REFUSE,
    require_verification: bool = False,
    privacy_budget: ClientPrivacyBudget | None = None,
    report_timings: bool = False,
    trust_dropout_reports: bool = False,
    forward_metrics: bool = False,
) -> Mod:
    """Build a ``secure_aggregation_mod`` with client-side policies.

    The server cannot change any of these choices.

    Args:
        on_verification_failure: With ``refuse`` (the default), the client
            trains on no model of the run after a round failed verification.
            With ``report``, it only reports the failure to the server.
        require_verification: Refuse to train in a round that the server
            does not verify.
        privacy_budget: Train only in rounds with distributed DP whose noise
            keeps this client's epsilon over the run within the budget. None
            follows the server's DP instructions, including none.
        report_timings: Add the seconds this client spent training, encoding
            and masking (``CLIENT_TIMING_METRICS``) to its input reply. They
            travel in clear, outside the secure sum, and the training time
            hints at the size of the client's dataset.
        trust_dropout_reports: Trust the server's lists of dropped clients.
            By default a client accepts at most ``threshold - 2`` neighbours
            that sent it no shares or dropped before their input, so that a
            server that lies about dropouts cannot unmask its input. With
            True it tolerates every dropout that the threshold allows, for
            example one of 3 clients, and a server that lies about dropouts
            can unmask its input.
        forward_metrics: Send the metrics of the wrapped ClientApp's reply,
            other than ``num-examples``, with the masked input. They travel
            in clear, outside the secure sum and any DP noise: a training
            loss is a statistic of this client's data. False sends none.

    Raises:
        ValueError: If `on_verification_failure` is not a policy,
            `require_verification`, `report_timings`, `trust_dropout_reports`
            or `forward_metrics` is not a bool, or `privacy_budget` is not a
            `ClientPrivacyBudget`.

    """
    if privacy_budget is not None and not isinstance(
        privacy_budget, ClientPrivacyBudget
    ):
        raise ValueError(
            "privacy_budget must be a ClientPrivacyBudget or None. "
            f"Found {type(privacy_budget).__name__}."
        )
    options = _Options(
        on_verification_failure=_parse_policy(on_verification_failure),
        require_verification=require_verification,
        privacy_budget=privacy_budget,
        report_timings=report_timings,
        trust_dropout_reports=trust_dropout_reports,
        forward_metrics=forward_metrics,
    )

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _secure_stage(msg, context, call_next, options)

    return mod


def plain_verification_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Run one stage of plain FedAvg with verification for a train message.

    The client sends its encoded update and its blinding vector in clear, so
    the server receives the update, as in plain FedAvg. A train message without
    the protocol record goes to the wrapped handler unchanged, unless the
    client refuses to train after a failed verification.
    """
    return _plain_stage(msg, context, call_next, _DEFAULT_OPTIONS)


def make_plain_verification_mod(
    *,
    on_verification_failure: FailurePolicy | str = FailurePolicy.REFUSE,
    require_verification: bool = False,
    report_timings: bool = False,
) -> Mod:
    """Build a ``plain_verification_mod`` with a client-side verification policy.

    The arguments are those of `make_secure_aggregation_mod`.

    Raises:
        ValueError: If `on_verification_failure` is not a policy, or
            `require_verification` or `report_timings` is not a bool.

    """
    options = _Options(
        on_verification_failure=_parse_policy(on_verification_failure),
        require_verification=require_verification,
        report_timings=report_timings,
    )

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _plain_stage(msg, context, call_next, options)

    return mod


def _parse_policy(policy: FailurePolicy | str) -> FailurePolicy:
    try:
        return FailurePolicy(str(policy))
    except ValueError:
        raise ValueError(
            f"on_verification_failure must be 'refuse' or 'report'. Found {policy!r}."
        ) from None


class _InnerAppError(Exception):
    """The wrapped handler replied with an error; pass that reply on."""

    def __init__(self, reply: Message) -> None:
        super().__init__("The wrapped ClientApp replied with an error.")
        self.reply = reply


def _is_train(msg: Message) -> bool:
    """Return whether ``msg`` reaches a train handler of the wrapped ClientApp.

    Flower routes ``train`` and ``train.<action>`` to train handlers, and a
    plain ``@app.train()`` handler receives ``train.default``. Each of them
    gets the protocol's handling, so none returns a model in clear.
    """
    message_type = msg.metadata.message_type
    return message_type == MessageType.TRAIN or message_type.startswith(
        f"{MessageType.TRAIN}."
    )


def _call_wrapped_app(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Run the wrapped handler; an exception it raises becomes its error reply.

    Without this, a ValueError from local training, such as a DP-SGD target
    that cannot be met, would read as a failure of the protocol stage.
    """
    try:
        return call_next(msg, context)
    except Exception as error:
        reason = shortened(
            f"ClientApp training failed: {_describe_exception(error)}",
            MAX_ERROR_REASON_LENGTH,
        )
        # The server receives the reason; the log also keeps the traceback.
        logger.error("%s", reason, exc_info=True)
        return Message(
            Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg
        )


def _describe_exception(error: Exception) -> str:
    """Return "Type: message", even when the exception's str() raises."""
    try:
        text = str(error)
    except Exception:
        text = "(its message could not be formatted)"
    return f"{type(error).__name__}: {text}"


def _error_reply(msg: Message, prefix: str, error: Exception) -> Message:
    reason = shortened(str(error), MAX_ERROR_REASON_LENGTH)
    logger.warning("%s stage failed: %s", prefix, reason)
    return Message(
        Error(ErrorCode.MOD_FAILED_PRECONDITION, f"{prefix}: {reason}"), reply_to=msg
    )


def _reply(
    msg: Message, reply_fields: Fields, extra: _Extra, options: _Options
) -> Message:
    content = RecordDict({PROTOCOL_RECORD: to_config_record(reply_fields)})
    for key, record in extra.items():
        content[key] = record
    metrics = extra.get(METRICS_RECORD)
    if isinstance(metrics, MetricRecord):
        for key in list(metrics.keys()):
            own = key in CLIENT_TIMING_METRICS
            if not (options.report_timings if own else options.forward_metrics):
                del metrics[key]
    return Message(content, reply_to=msg)


# --- Secure mode -----------------------------------------------------------------


def _secure_stage(
    msg: Message, context: Context, call_next: ClientAppCallable, options: _Options
) -> Message:
    if not _is_train(msg):
        return call_next(msg, context)

    # A message with a deferred request changes Context.state only if both
    # of its stages succeed, so a failure leaves the client's kept input for
    # a correct resend.
    saved = _copy_state(context) if DEFERRED_RECORD in msg.content else None
    try:
        fields = protocol_fields(msg.content)
        header = _parse_header(fields, msg, context)
        deferred = _deferred_stage(header, msg, context)
        reply_fields, extra = _run_secure_stage(
            header, fields, msg, context, call_next, options
        )
    except (ProtocolError, ValueError) as error:
        if saved is not None:
            _restore_state(context, saved)
        return _error_reply(msg, "secure aggregation", error)
    except _InnerAppError as error:
        return error.reply

    if deferred is not None:
        extra = {**extra, DEFERRED_RECORD: to_config_record(deferred)}
    return _reply(msg, reply_fields, extra, options)


def _copy_state(context: Context) -> dict[str, object]:
    """Return the records of ``Context.state``, ConfigRecords copied.

    The mod edits only ConfigRecords in place; it replaces or deletes the
    other records, so references to them stay as they were.
    """
    return {
        name: ConfigRecord(dict(record)) if isinstance(record, ConfigRecord) else record
        for name, record in context.state.items()
    }


def _restore_state(context: Context, saved: Mapping[str, object]) -> None:
    for name in list(context.state.keys()):
        if name not in saved:
            del context.state[name]
    for name, record in saved.items():
        context.state[name] = record  # type: ignore[assignment]


def _parse_header(
    fields: Mapping[str, object], msg: Message, context: Context
) -> RoundHeader:
    """Parse the request's header and bind it to the Flower run of ``context``.

    The client keeps one protocol and verification state per ``Context``,
    and Flower gives each run its own ``Context``. A request that names
    another run in its header would otherwise start that state afresh and
    erase what it records, such as a round that failed verification.
    """
    header = RoundHeader.from_fields(fields)
    if header.run_id != context.run_id or msg.metadata.run_id != context.run_id:
        raise ProtocolError(
            f"A request must be for this client's Flower run {context.run_id}. "
            f"Found run {header.run_id} in its header and {msg.metadata.run_id} "
            "in its metadata."
        )
    return header


def _deferred_stage(
    header: RoundHeader, msg: Message, context: Context
) -> Fields | None:
    """Run the earlier round's commit or verify request that ``msg`` carries.

    It runs before the message's own stage, so a client checks the previous
    round's aggregate before it trains on the model built from it.
    """
    record = msg.content.config_records.get(DEFERRED_RECORD)
    if record is None:
        return None
    fields: dict[str, object] = dict(record)
    deferred = RoundHeader.from_fields(fields)
    if deferred.stage not in (Stage.COMMIT, Stage.VERIFY):
        raise ProtocolError(
            "A deferred request must be a commit or verify stage. "
            f"Found {deferred.stage.value!r}."
        )
    if deferred.run_id != header.run_id or deferred.server_round >= header.server_round:
        raise ProtocolError(
            f"A deferred {deferred.stage.value!r} request must be for an earlier "
            f"round of the same run. Found run {deferred.run_id} round "
            f"{deferred.server_round} in a request of run {header.run_id} round "
            f"{header.server_round}."
        )

    reply_fields, _ = _verification_stage(deferred, fields, msg, context)
    return reply_fields


def _load_state(context: Context, header: RoundHeader) -> protocol.ClientState:
    record = context.state.config_records.get(STATE_RECORD)
    if record is None:
        raise ProtocolError(
            f"Stage {header.stage.value!r} arrived before this client's setup stage."
        )
    with _restoring(STATE_RECORD):
        state = protocol.ClientState.from_fields(dict(record))
    if (state.run_id, state.server_round) != (header.run_id, header.server_round):
        raise ProtocolError(
            f"Stage {header.stage.value!r} is for run {header.run_id} round "
            f"{header.server_round}, but the client is in run {state.run_id} "
            f"round {state.server_round}."
        )
    return state


def _last_input_round(context: Context) -> int:
    record = context.state.config_records.get(INPUT_ROUND_RECORD)
    if record is None:
        return 0
    last_round = record.get("last-round")
    if not isinstance(last_round, int) or isinstance(last_round, bool):
        raise ProtocolError(
            f"The client's stored {INPUT_ROUND_RECORD!r} record is corrupt. "
            f"Found last-round {last_round!r}."
        )
    return last_round


def _check_new_input_round(context: Context, header: RoundHeader) -> None:
    """Reject a round in which this client already trained for an input.

    Two masked inputs of one round, summed with different sets of other
    clients, would let the server subtract the sums and learn the client's
    update when training repeats exactly. Plain rounds follow the same rule.
    """
    last_round = _last_input_round(context)
    if header.server_round <= last_round:
        raise ProtocolError(
            f"Stage {header.stage.value!r} is for round {header.server_round}, "
            f"but this client already trained for its input of round {last_round} "
            "of this run and trains at most once per round, in increasing rounds."
        )


def _claim_input_round(context: Context, header: RoundHeader) -> None:
    """Record the round before training, so no later request trains for it again."""
    _check_new_input_round(context, header)
    context.state[INPUT_ROUND_RECORD] = to_config_record(
        {"last-round": header.server_round}
    )


@contextlib.contextmanager
def _restoring(name: str) -> Iterator[None]:
    """Raise ProtocolError for a ``Context.state`` record that does not parse.

    Only this client writes its state, so such a record was changed on the
    node. The stage then fails with an error reply, not with an exception
    out of the mod.
    """
    try:
        yield
    except (KeyError, TypeError, IndexError, AttributeError, OverflowError) as error:
        raise ProtocolError(
            f"This client's stored {name!r} record is corrupt "
            f"({type(error).__name__}: {error})."
        ) from error


def _save_state(context: Context, state: protocol.ClientState) -> None:
    context.state[STATE_RECORD] = to_config_record(state.to_fields())


def _run_secure_stage(
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    options: _Options,
) -> tuple[Fields, _Extra]:
    if header.stage is Stage.SETUP:
        _check_new_input_round(context, header)
        state, setup_reply = protocol.client_setup(
            run_id=header.run_id,
            server_round=header.server_round,
            node_id=msg.metadata.dst_node_id,
        )
        _save_state(context, state)
        identity = _setup_identity(header, fields, context)
        return {**setup_reply.to_fields(), **identity.to_fields()}, {}

    if header.stage in (Stage.COMMIT, Stage.VERIFY):
        return _verification_stage(header, fields, msg, context)
    if header.stage in (Stage.REGISTER, Stage.KEYED_INPUT, Stage.KEYED_UNMASK):
        return _run_keyed_stage(header, fields, msg, context, call_next, options)
    if header.stage is Stage.PLAIN_INPUT:
        raise ProtocolError(
            "Stage 'plain-input' would send the update in clear, which this "
            "secure-aggregation client never does."
        )

    state = _load_state(context, header)
    if header.stage is Stage.SHARE_KEYS:
        state, shares = protocol.client_share_keys(
            state, ShareKeysRequest.from_fields(fields)
        )
        _save_state(context, state)
        signature = _sign_key_list(header, fields, msg, context)
        return {**shares.to_fields(), **signature}, {}

    if header.stage is Stage.MASKED_INPUT:
        return _masked_input(state, header, fields, msg, context, call_next, options)

    unmask_request = UnmaskRequest.from_fields(fields)
    _check_budget_inputs(unmask_request.survivor_ids, options)
    state, unmask_reply = protocol.client_unmask(
        state, unmask_request, trust_dropouts=options.trust_dropout_reports
    )
    _save_state(context, state)
    return unmask_reply.to_fields(), {}


def _check_budget_inputs(survivor_ids: tuple[int, ...], options: _Options) -> None:
    """Reject unmasking a sum of fewer inputs than the privacy budget counts on.

    The budget counts the noise of ``min_honest_clients`` clients in each
    sum, so revealing shares for a sum of fewer inputs would release more
    than the client accounted for.
    """
    budget = options.privacy_budget
    num_inputs = len(set(survivor_ids))
    if budget is not None and num_inputs < budget.min_honest_clients:
        raise PrivacyBudgetError(
            f"The unmask request lists {num_inputs} masked input(s), fewer "
            f"than min_honest_clients {budget.min_honest_clients} of this client's "
            "privacy budget, which counts on their noise; no shares are revealed."
        )


def _masked_input(
    state: protocol.ClientState,
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    options: _Options,
) -> tuple[Fields, _Extra]:
    model_sha256 = _check_model(header.run_id, header.server_round, msg, context)
    _check_refusal(header, context, options)
    params = parse_encoding(fields)
    state = protocol.client_receive_shares(
        state,
        EncryptedShares.from_fields(fields),
        trust_dropouts=options.trust_dropout_reports,
    )
    _save_state(context, state)
    _claim_input_round(context, header)

    started = time.perf_counter()
    cpu_started = time.process_time()
    encoded, metrics = _train_for_round(
        header,
        fields,
        msg,
        context,
        call_next,
        options,
        params=params,
        model_sha256=model_sha256,
    )
    encoded_at = time.perf_counter()
    masked = protocol.client_mask(state, encoded, modulus=params.modulus)
    extra = _masked_input_records(masked, metrics, started, encoded_at, cpu_started)
    return {"stage": Stage.MASKED_INPUT.value}, extra


def _train_for_round(
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    options: _Options,
    *,
    params: EncodingParams,
    model_sha256: bytes | None,
) -> tuple[NDArray[np.uint32], MetricRecord]:
    """Train and encode; in a verified round, append and keep the blinding vector.

    A round is verified when this client signed its identity-key list.
    ``model_sha256`` is the digest of the global model if already computed.
    """
    verified_round = _signed_this_round(header, context)
    blinding = commitments.draw_blinding() if verified_round else None
    privacy = ClientPrivacy.from_fields(fields)
    # Training may replace or change the message's model, so digest it first.
    captured = None
    if blinding is not None:
        captured = _round_digests(msg, model_sha256, params=params, privacy=privacy)
    encoded, metrics = _train_and_encode(
        msg,
        context,
        call_next,
        params=params,
        privacy=privacy,
        blinding=blinding,
        server_round=header.server_round,
        budget=options.privacy_budget,
    )
    if blinding is not None and captured is not None:
        update = encoded[: encoded.size - blinding.size]
        layout = _commitment_layout(params, privacy, update_size=update.size)
        _keep_input(
            context,
            header,
            layout.client_vector(update),
            blinding,
            _KeptModel(*captured, ModelDecoding(params, layout)),
        )
    return encoded, metrics


def _masked_input_records(
    masked: NDArray[np.uint32],
    metrics: MetricRecord,
    started: float,
    encoded_at: float,
    cpu_started: float,
) -> _Extra:
    """Build the records of a masked-input reply, with the client's timings.

    The CPU seconds cover training, encoding, noise and masking in this
    process. A simulation's actor process runs its clients one at a time, so
    the figure is one client's, plus what the process's other threads use
    meanwhile.
    """
    metrics[CLIENT_MASK_SECONDS] = time.perf_counter() - encoded_at
    metrics[CLIENT_TRAIN_AND_ENCODE_SECONDS] = encoded_at - started
    metrics[CLIENT_CPU_SECONDS] = time.process_time() - cpu_started
    return {
        MASKED_INPUT_RECORD: ArrayRecord({MASKED_VECTOR_KEY: Array(masked)}),
        METRICS_RECORD: metrics,
    }


# --- Secure mode with run keys ---------------------------------------------------


def _run_keyed_stage(
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    options: _Options,
) -> tuple[Fields, _Extra]:
    existing = _load_run_keys(context)
    if header.stage is Stage.REGISTER:
        keys, public = run_keys.client_register(
            existing, run_id=header.run_id, node_id=msg.metadata.dst_node_id
        )
        context.state[RUN_KEYS_RECORD] = to_config_record(keys.to_fields())
        identity = _setup_identity(header, fields, context)
        return {**public.to_fields(), **identity.to_fields()}, {}

    if existing is None or existing.run_id != header.run_id:
        raise ProtocolError(
            f"Stage {header.stage.value!r} of run {header.run_id} arrived before "
            "this client registered its keys for the run."
        )
    if header.stage is Stage.KEYED_INPUT:
        return _keyed_input(existing, header, fields, msg, context, call_next, options)

    if STATE_RECORD not in context.state.config_records:
        raise ProtocolError(
            f"Stage {header.stage.value!r} arrived before this client's "
            f"{Stage.KEYED_INPUT.value!r} stage."
        )
    keyed_request = KeyedUnmaskRequest.from_fields(fields)
    _check_budget_inputs(keyed_request.survivor_ids, options)
    state, reply = run_keys.client_keyed_unmask(
        _load_state(context, header),
        keyed_request,
        trust_dropouts=options.trust_dropout_reports,
    )
    _save_state(context, state)
    return reply.to_fields(), {}


def _load_run_keys(context: Context) -> run_keys.RunKeys | None:
    record = context.state.config_records.get(RUN_KEYS_RECORD)
    if record is None:
        return None
    with _restoring(RUN_KEYS_RECORD):
        return run_keys.RunKeys.from_fields(dict(record))


def _keyed_input(
    keys: run_keys.RunKeys,
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    options: _Options,
) -> tuple[Fields, _Extra]:
    model_sha256 = _check_model(header.run_id, header.server_round, msg, context)
    _check_refusal(header, context, options)
    state, keys = run_keys.client_start_round(
        keys, ShareKeysRequest.from_fields(fields), server_round=header.server_round
    )
    params = parse_encoding(fields)
    # Record the round before training, so no request can get a second input.
    _claim_input_round(context, header)
    context.state[RUN_KEYS_RECORD] = to_config_record(keys.to_fields())
    # Vectors kept from an earlier round are never needed again.
    _take_kept_arrays(context)
    signature = _sign_key_list(header, fields, msg, context)

    started = time.perf_counter()
    cpu_started = time.process_time()
    encoded, metrics = _train_for_round(
        header,
        fields,
        msg,
        context,
        call_next,
        options,
        params=params,
        model_sha256=model_sha256,
    )
    encoded_at = time.perf_counter()
    state, masked, shares = run_keys.client_keyed_input(
        state, encoded, modulus=params.modulus
    )
    _save_state(context, state)
    return {**shares.to_fields(), **signature}, _masked_input_records(
        masked, metrics, started, encoded_at, cpu_started
    )


def _train_and_encode(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    *,
    params: EncodingParams,
    privacy: ClientPrivacy | None,
    blinding: NDArray[np.uint32] | None,
    server_round: int,
    budget: ClientPrivacyBudget | None = None,
) -> tuple[NDArray[np.uint32], MetricRecord]:
    """Train with the wrapped handler, then clip, encode and noise its update.

    The blinding vector, if any, fills the last slots of the encoded vector.
    With a privacy budget, a round that would exceed it is rejected before
    training, and an admitted round is recorded once its noise is added.
    """
    global_record = _global_model(msg)
    global_arrays = arrays_to_numpy(global_record)
    _check_finite_model(global_arrays)
    layout = FloatLayout.of(global_arrays)

    spent: tuple[SpentRound, ...] = ()
    cost = None
    if budget is not None:
        spent = _load_spent(context)
        cost = budget.admit(
            privacy,
            quantization_scale=params.scale,
            dimension=layout.size,
            spent=spent,
        )

    inner_content = RecordDict({ARRAYS_RECORD: global_record})
    train_config = msg.content.config_records.get(CONFIG_RECORD)
    if train_config is not None:
        inner_content[CONFIG_RECORD] = train_config
    msg.content = inner_content
    train_started = time.perf_counter()
    reply = _call_wrapped_app(msg, context, call_next)
    train_seconds = time.perf_counter() - train_started
    if reply.has_error():
        raise _InnerAppError(reply)

    weight = num_examples(
        reply.content, max_weight=None if privacy else params.max_weight
    )
    local_arrays = arrays_to_numpy(
        single_array_record(reply.content, role="ClientApp reply")
    )
    check_client_arrays(local_arrays, global_arrays)

    update = layout.difference(local_arrays, global_arrays)
    num_coordinates = update.size
    extra_slots: list[int] = []
    if privacy is not None:
        # Under DP every client weighs 1, so one client's influence is bounded.
        weight = 1
        bit, _ = clip_flat_update(update, clipping_norm=privacy.clipping_norm)
        if privacy.adaptive:
            extra_slots.append(bit)
    if blinding is not None:
        extra_slots.extend(blinding.tolist())
    if privacy is None:
        _warn_if_below_step(update, params, server_round=server_round)
    rng = np.random.default_rng(secrets.randbits(128))
    encoded, num_clipped = encode_update(
        update,
        weight=weight,
        params=params,
        rng=rng,
        overwrite=True,
        extra=extra_slots,
        report_clipped=privacy is None,
    )
    del update
    if privacy is not None and privacy.mode is DPMode.DISTRIBUTED:
        add_distributed_noise(
            encoded,
            num_coordinates=num_coordinates,
            sigma_client=privacy.sigma_client,
            bit_slot=num_coordinates + TRAILER_SIZE if privacy.adaptive else None,
            bit_sigma_client=privacy.bit_sigma_client,
            rng=SecureRandom(),
        )
    if budget is not None and cost is not None:
        _save_spent(context, (*spent, cost))
        logger.info(
            "Round %d: this client's epsilon is %.4f of its budget %g",
            server_round,
            budget.epsilon((*spent, cost)),
            budget.max_epsilon,
        )
    if num_clipped:
        logger.warning(
            "Round %d: %d of %d update coordinates exceed the clip range %g and "
            "were clipped",
            server_round,
            num_clipped,
            num_coordinates,
            params.clip_range,
        )

    metrics = MetricRecord(
        {
            key: value
            for key, value in next(iter(reply.content.metric_records.values())).items()
            if key != NUM_EXAMPLES_KEY
        }
    )
    metrics[CLIENT_TRAIN_SECONDS] = train_seconds
    return encoded, metrics


def _warn_if_below_step(
    update: NDArray[np.float64], params: EncodingParams, *, server_round: int
) -> None:
    """Log a warning if every coordinate is smaller than one quantization step.

    Stochastic rounding then replaces the update by noise of about one step
    per coordinate, which is the sign of a clip range far above the update's
    scale. The log names the step, never a value of the update.
    """
    if not update.size:
        return
    step = 1.0 / params.scale
    # Two reductions instead of np.abs, which would copy the whole update.
    largest = max(float(update.max()), -float(update.min()))
    if 0.0 < largest < step:
        logger.warning(
            "Round %d: every update coordinate is smaller than one quantization "
            "step (%.3g for clip range %g), so rounding noise outweighs the "
            "update. Lower the clip range to the scale of the updates.",
            server_round,
            step,
            params.clip_range,
        )


def _load_spent(context: Context) -> tuple[SpentRound, ...]:
    record = context.state.config_records.get(PRIVACY_BUDGET_RECORD)
    if record is None:
        return ()
    with _restoring(PRIVACY_BUDGET_RECORD):
        columns = [list(record[key]) for key in _SPENT_FIELDS]  # type: ignore[arg-type]
        return tuple(
            SpentRound(
                sigma_client=float(sigma),
                l2_sensitivity=float(sensitivity),
                dimension=int(dimension),
                bit_sigma_client=float(bit_sigma),
            )
            for sigma, sensitivity, dimension, bit_sigma in zip(*columns, strict=True)
        )


def _save_spent(context: Context, rounds: tuple[SpentRound, ...]) -> None:
    context.state[PRIVACY_BUDGET_RECORD] = ConfigRecord(
        {
            "sigma-client": [spent.sigma_client for spent in rounds],
            "l2-sensitivity": [spent.l2_sensitivity for spent in rounds],
            "dimension": [spent.dimension for spent in rounds],
            "bit-sigma-client": [spent.bit_sigma_client for spent in rounds],
        }
    )


_SPENT_FIELDS = ("sigma-client", "l2-sensitivity", "dimension", "bit-sigma-client")


def _commitment_layout(
    params: EncodingParams, privacy: ClientPrivacy | None, *, update_size: int
) -> CommitmentLayout:
    if privacy is None or privacy.mode is not DPMode.DISTRIBUTED:
        return CommitmentLayout(modulus=params.modulus)

    adaptive_slots = 1 if privacy.adaptive else 0
    num_coordinates = update_size - TRAILER_SIZE - adaptive_slots
    return CommitmentLayout.distributed(
        params,
        num_coordinates=num_coordinates,
        bit_slot=num_coordinates + TRAILER_SIZE if privacy.adaptive else None,
        bit_sigma_client=privacy.bit_sigma_client,
    )


# --- Verification stages, shared by both mods ------------------------------------


def _load_verification(context: Context) -> ClientVerificationState | None:
    record = context.state.config_records.get(VERIFICATION_STATE_RECORD)
    if record is None:
        return None
    with _restoring(VERIFICATION_STATE_RECORD):
        return ClientVerificationState.from_fields(dict(record))


def _require_verification_state(context: Context) -> ClientVerificationState:
    state = _load_verification(context)
    if state is None:
        raise ProtocolError("Verification stages must follow a verified setup stage.")
    return state


def _save_verification(context: Context, state: ClientVerificationState) -> None:
    context.state[VERIFICATION_STATE_RECORD] = to_config_record(state.to_fields())


def _setup_identity(
    header: RoundHeader, fields: dict[str, object], context: Context
) -> IdentityKey:
    # An input kept from an earlier round and never committed is not needed
    # again.
    _take_kept_arrays(context)
    if not SetupRequest.from_fields(fields).verification:
        return IdentityKey(public_key=b"")

    state = verification.client_identity(
        _load_verification(context), run_id=header.run_id
    )
    _save_verification(context, state)
    return IdentityKey(public_key=state.identity_public_key)


def _sign_key_list(
    header: RoundHeader, fields: dict[str, object], msg: Message, context: Context
) -> Fields:
    """Sign the round's identity-key list if the request carries one."""
    if not IdentityKeyList.present(fields):
        return {}

    state, signature = verification.client_sign_key_list(
        _require_verification_state(context),
        IdentityKeyList.from_fields(fields),
        run_id=header.run_id,
        server_round=header.server_round,
        node_id=msg.metadata.dst_node_id,
    )
    _save_verification(context, state)
    return signature.to_fields()


def _signed_this_round(header: RoundHeader, context: Context) -> bool:
    state = _load_verification(context)
    return (
        state is not None
        and state.run_id == header.run_id
        and state.server_round == header.server_round
        and bool(state.key_list_digest)
    )


def _check_refusal(header: RoundHeader, context: Context, options: _Options) -> None:
    reason = verification.refusal_reason(
        _load_verification(context),
        run_id=header.run_id,
        server_round=header.server_round,
        policy=options.on_verification_failure,
        require_verification=options.require_verification,
    )
    if reason:
        raise ProtocolError(f"This client does not train on this model: {reason}.")


@dataclass(frozen=True)
class _KeptModel:
    """Digests and decoding that a client keeps of a verified round's model."""

    sha256: bytes
    """The model's `model_digest`."""
    config_sha256: bytes
    """The `mapping_digest` of the training configuration."""
    fields_sha256: bytes
    """The `mapping_digest` of the encoding and DP fields."""
    decoding: ModelDecoding


def _round_digests(
    msg: Message,
    model_sha256: bytes | None,
    *,
    params: EncodingParams,
    privacy: ClientPrivacy | None,
) -> tuple[bytes, bytes, bytes]:
    """Digest the global model in ``msg`` and the round's settings.

    Returns the model's digest, unless ``model_sha256`` already contains it,
    and the digests of the training configuration and of the encoding and
    DP fields, as the server computes them for `RoundSettings`.
    """
    train_config = msg.content.config_records.get(CONFIG_RECORD)
    request_fields = {
        **encoding_fields(params),
        **(privacy.to_fields() if privacy is not None else {}),
    }
    config_sha256 = mapping_digest(
        dict(train_config.items()) if train_config is not None else {}
    )
    return (
        model_sha256 or model_digest(arrays_to_numpy(_global_model(msg))),
        config_sha256,
        mapping_digest(request_fields),
    )


def _keep_input(
    context: Context,
    header: RoundHeader,
    update: NDArray[np.uint32],
    blinding: NDArray[np.uint32],
    model: _KeptModel,
) -> None:
    """Keep the input to commit to, and how to decode the round's aggregate."""
    state = verification.client_start_input(
        _require_verification_state(context),
        run_id=header.run_id,
        server_round=header.server_round,
        model_sha256=model.sha256,
        settings_sha256=RoundSettings(
            config_sha256=model.config_sha256,
            fields_sha256=model.fields_sha256,
            decoding=model.decoding,
        ).digest(),
    )
    context.state[VERIFICATION_ARRAYS_RECORD] = ArrayRecord(
        {ENCODED_UPDATE_KEY: Array(update), BLINDING_KEY: Array(blinding)}
    )
    context.state[VERIFICATION_DECODING_RECORD] = to_config_record(
        {"server-round": header.server_round, **model.decoding.to_dict()}
    )
    _save_verification(context, state)


def _take_kept_arrays(context: Context) -> dict[str, NDArray[np.uint32]]:
    """Remove the kept vectors from ``Context.state`` and return them."""
    record = context.state.array_records.get(VERIFICATION_ARRAYS_RECORD)
    if record is None:
        return {}
    del context.state[VERIFICATION_ARRAYS_RECORD]
    with _restoring(VERIFICATION_ARRAYS_RECORD):
        return {key: array.numpy() for key, array in record.items()}


def _verification_stage(
    header: RoundHeader, fields: dict[str, object], msg: Message, context: Context
) -> tuple[Fields, _Extra]:
    if header.stage is Stage.COMMIT:
        return _commit(header, fields, msg, context), {}
    return _verify(header, fields, msg, context), {}


def _commit(
    header: RoundHeader, fields: dict[str, object], msg: Message, context: Context
) -> Fields:
    state = _require_verification_state(context)
    request = CommitRequest.from_fields(fields)
    # The first commit request consumes the blinding vector, whatever follows.
    kept = _take_kept_arrays(context)
    if ENCODED_UPDATE_KEY not in kept or BLINDING_KEY not in kept:
        raise ProtocolError(
            f"Commit requests for round {header.server_round} must follow this "
            "client's input of that round, and come once. Found no input kept."
        )

    state, reply = verification.client_commit(
        state,
        request,
        run_id=header.run_id,
        server_round=header.server_round,
        node_id=msg.metadata.dst_node_id,
        update=kept[ENCODED_UPDATE_KEY],
        blinding=kept[BLINDING_KEY],
    )
    _save_verification(context, state)
    decoding = context.state.config_records.get(VERIFICATION_DECODING_RECORD)
    if decoding is not None:
        decoding["num-included"] = len(request.included_node_ids)
    return reply.to_fields()


def _verify(
    header: RoundHeader, fields: dict[str, object], msg: Message, context: Context
) -> Fields:
    state = _require_verification_state(context)
    request = VerifyRequest.from_fields(fields)
    record = msg.content.array_records.get(AGGREGATE_RECORD)
    if record is None or list(record.keys()) != [AGGREGATE_KEY]:
        raise ProtocolError(
            f"The verify request must carry the {AGGREGATE_RECORD!r} ArrayRecord "
            f"with the single key {AGGREGATE_KEY!r}."
        )

    try:
        aggregate = array_to_numpy(AGGREGATE_KEY, record[AGGREGATE_KEY])
    except ProtocolError:
        # An empty aggregate fails the round with a recorded reason.
        aggregate = np.zeros(0, dtype=np.uint32)
    model, model_sha256 = _round_model(msg)
    state, reply = verification.client_verify(
        state,
        request,
        run_id=header.run_id,
        server_round=header.server_round,
        node_id=msg.metadata.dst_node_id,
        aggregate=aggregate,
        model_sha256=model_sha256,
    )
    # The transcript verified even if the reply reports a failed model check
    # of this round; the model then is the one this client trained on. A
    # discarded round already expects that model again.
    verified = (
        state.verified_round == header.server_round and not state.next_model_sha256
    )
    next_model = _take_next_model(
        context, header, aggregate, model if verified else None
    )
    if next_model is not None:
        state = verification.client_expect_model(
            state, server_round=header.server_round, model_sha256=next_model
        )
    _save_verification(context, state)
    return reply.to_fields()


def _round_model(msg: Message) -> tuple[dict[str, NDArray[np.generic]] | None, bytes]:
    """Return the round's model that a verify request carries, and its digest.

    A missing or malformed model, or one whose digest cannot be computed,
    counts as none, with an empty digest, which fails the round.
    """
    record = msg.content.array_records.get(ROUND_MODEL_RECORD)
    if record is None:
        return None, b""
    try:
        model = arrays_to_numpy(record)
        return model, model_digest(model)
    except (ProtocolError, ValueError):
        return None, b""


def _take_next_model(
    context: Context,
    header: RoundHeader,
    aggregate: NDArray[np.uint32],
    model: dict[str, NDArray[np.generic]] | None,
) -> bytes | None:
    """Remove the kept decoding and return the digest of the model after this round.

    ``model`` is the round's verified model, or ``None`` when the round
    failed verification. The next model is computed as the server computes
    it: that model plus the mean decoded from the aggregate without the
    commitment offset. Returns ``None`` when the round failed verification,
    when no decoding of this round is kept, or when the aggregate does not
    decode. An honest server then releases no model, so the next round's
    model check fails whatever model arrives.
    """
    decoding = context.state.config_records.get(VERIFICATION_DECODING_RECORD)
    if VERIFICATION_DECODING_RECORD in context.state:
        del context.state[VERIFICATION_DECODING_RECORD]
    if model is None or decoding is None:
        return None
    fields = dict(decoding)
    kept_round = fields.pop("server-round", None)
    num_included = fields.pop("num-included", None)
    if kept_round != header.server_round or not isinstance(num_included, int):
        return None

    try:
        round_decoding = ModelDecoding.from_dict(fields)
        following = next_model(
            model,
            aggregate,
            params=round_decoding.params,
            layout=round_decoding.layout,
            num_included=num_included,
        )
    except (ProtocolError, ValueError):
        return None

    return model_digest(following)


def _check_model(
    run_id: int, server_round: int, msg: Message, context: Context
) -> bytes | None:
    """Record a failure if this round's model is not the one the last round implies.

    Returns the model's digest if the check computed it, else ``None``.
    """
    state = _load_verification(context)
    if state is None or state.run_id != run_id or not state.verified_round:
        return None

    computed: list[bytes] = []

    def digest() -> bytes:
        computed.append(model_digest(arrays_to_numpy(_global_model(msg))))
        return computed[0]

    _save_verification(
        context,
        verification.client_check_model(
            state, server_round=server_round, model_sha256=digest
        ),
    )
    return computed[0] if computed else None


def _check_finite_model(arrays: Mapping[str, NDArray[np.generic]]) -> None:
    """Refuse a global model with NaN or inf before anyone trains on it."""
    for key, array in arrays.items():
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise ProtocolError(
                f"The global model's array {key!r} contains NaN or inf values; "
                "this client does not train on it."
            )


def _global_model(msg: Message) -> ArrayRecord:
    record = msg.content.array_records.get(ARRAYS_RECORD)
    if record is None:
        raise ProtocolError(f"The message has no {ARRAYS_RECORD!r} ArrayRecord.")
    return record


# --- Plain mode with verification -------------------------------------------------


def _plain_stage(
    msg: Message, context: Context, call_next: ClientAppCallable, options: _Options
) -> Message:
    if not _is_train(msg):
        return call_next(msg, context)

    try:
        if PROTOCOL_RECORD not in msg.content:
            _check_plain_refusal(msg, context, options)
            return call_next(msg, context)
        fields = protocol_fields(msg.content)
        header = _parse_header(fields, msg, context)
        reply_fields, extra = _run_plain_stage(
            header, fields, msg, context, call_next, options
        )
    except (ProtocolError, ValueError) as error:
        return _error_reply(msg, "plain verification", error)
    except _InnerAppError as error:
        return error.reply

    return _reply(msg, reply_fields, extra, options)


def _check_plain_refusal(msg: Message, context: Context, options: _Options) -> None:
    """Apply the model check and the refusal policy to an unverified plain round."""
    server_round = _round_of(msg)
    state = _load_verification(context)
    if server_round:
        _check_model(msg.metadata.run_id, server_round, msg, context)
        state = _load_verification(context)
    elif (
        state is not None
        and state.run_id == msg.metadata.run_id
        and state.verified_round
    ):
        # Without a round number the model check cannot run.
        raise ProtocolError(
            f"This client verified round {state.verified_round} of this run "
            "and trains only on models of numbered later rounds. Found the "
            f"group id {msg.metadata.group_id!r}, which is not a round number."
        )
    reason = verification.refusal_reason(
        state,
        run_id=msg.metadata.run_id,
        server_round=server_round,
        policy=options.on_verification_failure,
        require_verification=options.require_verification,
    )
    if reason:
        raise ProtocolError(f"This client does not train on this model: {reason}.")


def _round_of(msg: Message) -> int:
    # Strategies of the Message API name the round in the group id. A message
    # without one counts as round 0, in which no commitment is pending.
    group_id = msg.metadata.group_id
    return int(group_id) if group_id.isdecimal() else 0


def _run_plain_stage(
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    options: _Options,
) -> tuple[Fields, _Extra]:
    if header.stage is Stage.SETUP:
        identity = _setup_identity(header, fields, context)
        if not identity.public_key:
            raise ProtocolError(
                "Plain rounds send protocol messages only with verification. "
                "Found a setup request without it."
            )
        return identity.to_fields(), {}
    if header.stage is Stage.PLAIN_INPUT:
        return _plain_input(header, fields, msg, context, call_next, options)
    if header.stage in (Stage.COMMIT, Stage.VERIFY):
        return _verification_stage(header, fields, msg, context)

    raise ProtocolError(
        f"Stage {header.stage.value!r} belongs to secure aggregation, which "
        "plain_verification_mod does not run."
    )


def _plain_input(
    header: RoundHeader,
    fields: dict[str, object],
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    options: _Options,
) -> tuple[Fields, _Extra]:
    if ClientPrivacy.from_fields(fields) is not None:
        raise ProtocolError(
            "Plain rounds with verification must carry no DP fields. Found some."
        )
    params = parse_encoding(fields)
    signature = _sign_key_list(header, fields, msg, context)
    if not signature:
        raise ProtocolError(
            "A plain-input request must carry the identity-key list. Found none."
        )
    model_sha256 = _check_model(header.run_id, header.server_round, msg, context)
    _check_refusal(header, context, options)
    _claim_input_round(context, header)

    captured = _round_digests(msg, model_sha256, params=params, privacy=None)
    encoded, metrics = _train_and_encode(
        msg,
        context,
        call_next,
        params=params,
        privacy=None,
        blinding=None,
        server_round=header.server_round,
    )
    blinding = commitments.draw_blinding()
    _keep_input(
        context,
        header,
        encoded,
        blinding,
        _KeptModel(
            *captured,
            ModelDecoding(params, CommitmentLayout(modulus=params.modulus)),
        ),
    )

    extra: _Extra = {
        PLAIN_INPUT_RECORD: ArrayRecord(
            {ENCODED_UPDATE_KEY: Array(encoded), BLINDING_KEY: Array(blinding)}
        ),
        METRICS_RECORD: metrics,
    }
    return {"stage": Stage.PLAIN_INPUT.value, **signature}, extra
