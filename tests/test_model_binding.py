"""Clients check that each global model follows from the round they verified.

A server can release an aggregate that passes verification and then send a
model that is not built from it. After verifying round r, a client computes
round r's model plus the decoded mean of the verified aggregate, and refuses
a round r + 1 model that differs. The honest runs prove that the client's
computation matches the server's exactly, in every mode. The hostile runs
replace the model after an honestly verified round.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.serde import config_record_to_proto
from flwr.serverapp import Grid

from fedsec_flwr import RoundReport, SecureFedAvg, TooFewSurvivorsError
from fedsec_flwr.config import KEY_LIFETIME_ROUND, KEY_LIFETIME_RUN
from fedsec_flwr.mod import make_secure_aggregation_mod
from fedsec_flwr.models import model_digest
from fedsec_flwr.privacy import DPConfig
from fedsec_flwr.records import (
    AGGREGATE_KEY,
    AGGREGATE_RECORD,
    ARRAYS_RECORD,
    MASKED_INPUT_RECORD,
    MASKED_VECTOR_KEY,
    PROTOCOL_RECORD,
    ROUND_MODEL_RECORD,
    VERIFICATION_STATE_RECORD,
)
from fedsec_flwr.rounds import PendingVerification, PrivacyRound, RoundOutcome
from fedsec_flwr.strategy import EvaluateFn
from fedsec_flwr.verification import (
    ClientVerificationState,
    FailurePolicy,
    VerificationConfig,
    client_check_model,
)
from tests.loopback import LoopbackGrid, _load_context, _wire, stage_of
from tests.test_secure_strategy import (
    CONFIG,
    NODE_IDS,
    NUM_NODES,
    honest_train,
    initial_model,
)
from tests.test_verification_strategy import (
    DISTRIBUTED_DP,
    error_reasons,
    make_app,
    recording_train,
)

MISMATCH = "is not the one that round 1 implies"
SIGNATURE_INVALID = "a commitment signature is not valid"
OTHER_MODEL_NAMED = (
    "the transcript names another model than the one this client trained on"
)
OTHER_SETTINGS_NAMED = (
    "the transcript names other settings than the ones this client trained with"
)
OTHER_ROUND_MODEL = "the verify request does not carry the model this client trained on"


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way to run verified rounds: secure or plain, keys, pipelining, DP."""

    name: str
    secure: bool = True
    key_lifetime: str = KEY_LIFETIME_ROUND
    pipelined: bool = False
    dp: DPConfig | None = None

    def input_stage(self) -> str:
        if not self.secure:
            return "plain-input"
        return (
            "keyed-input" if self.key_lifetime == KEY_LIFETIME_RUN else "masked-input"
        )


MODES = [
    Mode("round-keys"),
    Mode("run-keys", key_lifetime=KEY_LIFETIME_RUN),
    Mode("pipelined", pipelined=True),
    Mode("plain", secure=False),
    Mode("distributed-dp", dp=DISTRIBUTED_DP),
    Mode("distributed-dp-run-keys", dp=DISTRIBUTED_DP, key_lifetime=KEY_LIFETIME_RUN),
]

Rewrite = Callable[[ArrayRecord], ArrayRecord]


def one_ulp_up(record: ArrayRecord) -> ArrayRecord:
    """Move the first value of the first array up by one unit in the last place."""
    arrays = {key: array.numpy().copy() for key, array in record.items()}
    first = next(iter(arrays))
    flat = arrays[first].reshape(-1)
    flat[0] = np.nextafter(flat[0], np.inf)
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


class RewritingFedAvg(SecureFedAvg):
    """An honest server that rewrites the model after round 1 is aggregated."""

    def __init__(self, rewrite: Rewrite | None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rewrite = rewrite

    def _run_round(
        self,
        grid: Grid,
        server_round: int,
        nodes: list[int],
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        privacy: PrivacyRound | None,
        previous: PendingVerification | None,
    ) -> RoundOutcome:
        outcome = super()._run_round(
            grid, server_round, nodes, arrays, train_config, privacy, previous
        )
        if server_round == 1 and self.rewrite is not None:
            outcome.arrays = self.rewrite(outcome.arrays)
        return outcome


def run(
    grid: LoopbackGrid,
    mode: Mode,
    *,
    rewrite: Rewrite | None = None,
    rounds: int = 3,
    reports: list[RoundReport] | None = None,
    on_failure: FailurePolicy = FailurePolicy.REFUSE,
    audit_path: Path | None = None,
    model: dict[str, np.ndarray] | None = None,
    train_config: ConfigRecord | None = None,
    evaluate_fn: EvaluateFn | None = None,
) -> dict[str, np.ndarray]:
    strategy = RewritingFedAvg(
        rewrite,
        secure_aggregation=(
            dataclasses.replace(CONFIG, key_lifetime=mode.key_lifetime)
            if mode.secure
            else None
        ),
        differential_privacy=mode.dp,
        verification=VerificationConfig(
            pipelined=mode.pipelined,
            on_failure=on_failure,
            plain_encoding=CONFIG,
            audit_path=audit_path,
        ),
        rng=random.Random(5),
        plain_timeout=CONFIG.stage_timeout,
        on_round_end=reports.append if reports is not None else None,
    )
    first = initial_model() if model is None else model
    initial = ArrayRecord({k: Array(v) for k, v in first.items()})
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )
    return {k: v.numpy() for k, v in result.arrays.items()}


def trained(calls: list[tuple[int, str]], server_round: int) -> set[int]:
    return {node for node, group in calls if group == str(server_round)}


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_honest_models_pass_check(mode: Mode) -> None:
    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(recording_train(calls), secure=mode.secure), NODE_IDS)

    run(grid, mode, reports=reports)

    assert [r.verified for r in reports] == [True, True, True]
    for server_round in (1, 2, 3):
        assert trained(calls, server_round) == set(NODE_IDS)
        assert error_reasons(grid, server_round) == {}


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_tamper_next_model_refused(mode: Mode) -> None:
    # Round 1's aggregate is honest and verifies. The model sent for round 2
    # differs by one ulp from round 1's model plus that aggregate's mean.
    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(recording_train(calls), secure=mode.secure), NODE_IDS)

    with pytest.raises((TooFewSurvivorsError, ValueError)):
        run(grid, mode, rewrite=one_ulp_up, reports=reports)

    assert reports[0].verified is True
    assert trained(calls, 2) == set()
    reasons = error_reasons(grid, 2)
    assert set(reasons) == set(NODE_IDS)
    assert all(MISMATCH in reason for reason in reasons.values())


def test_hostile_replayed_model_refused() -> None:
    # The server sends round 1's model again in round 2, as if round 1's
    # aggregate had never been applied.
    def replay(_: ArrayRecord) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    grid = LoopbackGrid(make_app(), NODE_IDS)

    with pytest.raises(TooFewSurvivorsError):
        run(grid, MODES[0], rewrite=replay)

    reasons = error_reasons(grid, 2)
    assert len(reasons) == NUM_NODES
    assert all(MISMATCH in reason for reason in reasons.values())


def split_model_for(victim: int, stage: str) -> object:
    """Return a fault that shows ``victim`` a one-ulp different model in round 2."""

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == stage and msg.metadata.group_id == "2":
            msg.content[ARRAYS_RECORD] = one_ulp_up(msg.content[ARRAYS_RECORD])
        return None

    return fault


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_hostile_split_model_refused(mode: Mode) -> None:
    # Different models for different clients in one round: only the victim
    # gets the altered one, and only the victim can tell.
    victim = NODE_IDS[2]
    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(recording_train(calls), secure=mode.secure),
        NODE_IDS,
        fault=split_model_for(victim, mode.input_stage()),  # type: ignore[arg-type]
    )

    run(grid, mode, reports=reports)

    assert trained(calls, 2) == set(NODE_IDS) - {victim}
    assert MISMATCH in error_reasons(grid, 2)[victim]
    # Under the refuse policy the victim also refuses every later model.
    assert victim not in trained(calls, 3)
    assert "round 2 failed verification" in error_reasons(grid, 3)[victim]
    assert [r.num_aggregated for r in reports] == [NUM_NODES] + [NUM_NODES - 1] * 2


def test_report_policy_trains_on_mismatch(caplog: pytest.LogCaptureFixture) -> None:
    victim = NODE_IDS[0]
    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    mod = make_secure_aggregation_mod(on_verification_failure="report")
    grid = LoopbackGrid(
        make_app(recording_train(calls), mod=mod),
        NODE_IDS,
        fault=split_model_for(victim, "masked-input"),  # type: ignore[arg-type]
    )

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr.verification"):
        run(grid, MODES[0], rounds=2, reports=reports, on_failure=FailurePolicy.REPORT)

    assert victim in trained(calls, 2)
    assert any(MISMATCH in record.getMessage() for record in caplog.records)
    # The victim's commitment signature covers the model it trained on, so
    # the round fails for everyone.
    assert reports[1].verified is False
    assert reports[1].verification_reason == SIGNATURE_INVALID


def failure_reason(grid: LoopbackGrid, node: int) -> str:
    state = _load_context(grid._contexts[node]).state
    fields = dict(state.config_records[VERIFICATION_STATE_RECORD])
    return ClientVerificationState.from_fields(fields).failure_reason


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_hostile_split_first_model_detected(mode: Mode) -> None:
    # No round precedes round 1, so no client can predict its model. The
    # commitment signatures still cover each client's model, so a split
    # fails the round for every included client.
    victim = NODE_IDS[3]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == mode.input_stage():
            msg.content[ARRAYS_RECORD] = one_ulp_up(msg.content[ARRAYS_RECORD])
        return None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(secure=mode.secure), NODE_IDS, fault=fault)

    run(grid, mode, rounds=1, reports=reports, on_failure=FailurePolicy.REPORT)

    assert reports[0].verified is False
    assert reports[0].verification_reason == SIGNATURE_INVALID
    assert failure_reason(grid, victim) == OTHER_MODEL_NAMED
    for node in set(NODE_IDS) - {victim}:
        assert failure_reason(grid, node) == SIGNATURE_INVALID


def test_skipped_round_split_caught_by_signature() -> None:
    # A client that did not verify round 1 cannot predict round 2's model, so
    # it trains on a split model. Its commitment signature still covers that
    # model, so round 2 fails verification.
    victim = NODE_IDS[1]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and msg.metadata.group_id == "1" and name == "setup":
            return "drop"
        return split_model_for(victim, "masked-input")(node, name, msg)  # type: ignore[operator]

    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(recording_train(calls)), NODE_IDS, fault=fault)

    run(grid, MODES[0], rounds=2, reports=reports, on_failure=FailurePolicy.REPORT)

    assert victim not in trained(calls, 1)
    assert victim in trained(calls, 2)
    assert reports[1].verified is False
    assert failure_reason(grid, victim) == OTHER_MODEL_NAMED


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_client_expects_released_model(mode: Mode) -> None:
    grid = LoopbackGrid(make_app(secure=mode.secure), NODE_IDS)

    released = run(grid, mode, rounds=1)

    for node in NODE_IDS:
        state = _load_context(grid._contexts[node]).state
        # The verify request carries the round's model, so none is kept.
        assert not state.array_records
        saved = ClientVerificationState.from_fields(
            dict(state.config_records[VERIFICATION_STATE_RECORD])
        )
        assert saved.verified_round == 1
        assert saved.next_model_sha256 == model_digest(released)


def test_model_digest_is_canonical() -> None:
    model = initial_model()
    model["dense.weight"] = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    reordered = dict(reversed(list(model.items())))
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in model.items()}
    fortran = {k: np.asfortranarray(v) for k, v in model.items()}

    digest = model_digest(model)

    # The key order sets the coordinates of the update, so it counts.
    assert model_digest(reordered) != digest
    assert model_digest(big_endian) == digest
    assert model_digest(fortran) == digest
    nudged = dict(model)
    nudged["dense.weight"] = model["dense.weight"].copy()
    nudged["dense.weight"][2, 3] = np.nextafter(nudged["dense.weight"][2, 3], 0)
    assert model_digest(nudged) != digest
    renamed = {("x" + k if k == "dense.bias" else k): v for k, v in model.items()}
    assert model_digest(renamed) != digest
    reshaped = dict(model)
    reshaped["dense.weight"] = model["dense.weight"].reshape(4, 3)
    assert model_digest(reshaped) != digest
    retyped = dict(model)
    retyped["dense.bias"] = model["dense.bias"].astype(np.float32)
    assert model_digest(retyped) != digest


def reversed_keys(record: ArrayRecord) -> ArrayRecord:
    return ArrayRecord(dict(reversed(list(record.items()))))


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_hostile_key_order_split_detected(mode: Mode) -> None:
    # The victim gets the same arrays in another order, so its update lands
    # on other coordinates, where the others add nothing.
    victim = NODE_IDS[2]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == mode.input_stage():
            msg.content[ARRAYS_RECORD] = reversed_keys(msg.content[ARRAYS_RECORD])
        return None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(secure=mode.secure), NODE_IDS, fault=fault)

    run(grid, mode, rounds=1, reports=reports, on_failure=FailurePolicy.REPORT)

    assert reports[0].verified is False
    assert failure_reason(grid, victim) == OTHER_MODEL_NAMED


def test_model_digest_rejects_object_arrays() -> None:
    with pytest.raises(ValueError, match="dtype object for key 'bad'"):
        model_digest({"bad": np.array([None, 1], dtype=object)})


# --- Hostile requests around the model check ----------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_hostile_decoy_request_still_checked(mode: Mode) -> None:
    # Before each real round-2 input request, which carries a changed model,
    # the server sends the client a decoy with the honest model. In secure
    # modes the decoy has a malformed field, so it fails after the model
    # check. The real request must still be checked.
    honest: dict[str, ArrayRecord] = {}
    decoyed: set[int] = set()

    def rewrite(record: ArrayRecord) -> ArrayRecord:
        honest["model"] = record
        return one_ulp_up(record)

    def fault(node: int, name: str, msg: Message) -> object:
        if name != mode.input_stage() or msg.metadata.group_id != "2":
            return None
        if node in decoyed:
            return None
        decoyed.add(node)
        decoy = _wire(msg)
        decoy.content[ARRAYS_RECORD] = honest["model"]
        if mode.secure:
            decoy.content[PROTOCOL_RECORD]["clip-range"] = 2
        grid.deliver_again(decoy)
        return None

    calls: list[tuple[int, str]] = []
    grid = LoopbackGrid(
        make_app(recording_train(calls), secure=mode.secure), NODE_IDS, fault=fault
    )

    with pytest.raises((TooFewSurvivorsError, ValueError)):
        run(grid, mode, rewrite=rewrite, rounds=2)

    assert decoyed == set(NODE_IDS)
    assert all(MISMATCH in reason for reason in error_reasons(grid, 2).values())
    # The plain decoy is a valid request, so clients train on it once; the
    # changed model is never trained on.
    assert len(calls) - len(NODE_IDS) == (0 if mode.secure else len(NODE_IDS))


def test_hostile_repeated_round_number_refused() -> None:
    # After round 1 verified, the server sends a round-1 input request again.
    grid = LoopbackGrid(make_app(), NODE_IDS)
    run(grid, MODES[0], rounds=1)
    first_input = next(m for m in grid.sent if stage_of(m) == "masked-input")

    reply = grid.deliver_again(_wire(first_input))

    assert reply.has_error()
    assert "round numbers must increase" in (reply.error.reason or "")


def reusing_train(msg: Message, context: Context) -> Message:
    """Train like `honest_train`, but write the result into the received record."""
    trained = honest_train(msg, context)
    record = msg.content[ARRAYS_RECORD]
    for key, array in trained.content[ARRAYS_RECORD].items():
        record[key] = array
    return Message(
        RecordDict({ARRAYS_RECORD: record, "metrics": trained.content["metrics"]}),
        reply_to=msg,
    )


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_app_reusing_received_record_passes(mode: Mode) -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(reusing_train, secure=mode.secure), NODE_IDS)

    run(grid, mode, reports=reports)

    assert [r.verified for r in reports] == [True, True, True]
    for server_round in (1, 2, 3):
        assert error_reasons(grid, server_round) == {}


def test_report_policy_mismatch_reaches_server() -> None:
    # Every client gets the same changed model and trains on it under
    # "report"; their round-2 verdicts carry the mismatch to the server.
    reports: list[RoundReport] = []
    mod = make_secure_aggregation_mod(on_verification_failure="report")
    grid = LoopbackGrid(make_app(mod=mod), NODE_IDS)

    run(
        grid,
        MODES[0],
        rewrite=one_ulp_up,
        reports=reports,
        on_failure=FailurePolicy.REPORT,
    )

    assert reports[0].verified is True
    assert reports[1].verified is False
    assert MISMATCH in reports[1].verification_reason
    # Round 3's model follows the changed round-2 model, which was used.
    assert reports[2].verified is True


def _changed_plain_train_after_round_one(group_id: str) -> Message:
    """Verify one plain round, then send a plain train message of a changed model.

    The message has no protocol record, and ``group_id`` as its group id.
    """
    grid = LoopbackGrid(make_app(secure=False), NODE_IDS)
    released = run(grid, MODES[3], rounds=1)
    record = one_ulp_up(ArrayRecord({k: Array(v) for k, v in released.items()}))
    message = grid.create_message(
        RecordDict({ARRAYS_RECORD: record, "config": ConfigRecord()}),
        MessageType.TRAIN,
        NODE_IDS[0],
        group_id,
    )
    return grid.deliver_again(message)


def test_hostile_unprotocoled_plain_round_checked() -> None:
    reply = _changed_plain_train_after_round_one("2")

    assert reply.has_error()
    assert MISMATCH in (reply.error.reason or "")


@pytest.mark.parametrize("group_id", ["", "-1", "two"])
def test_hostile_unnumbered_plain_round_refused(group_id: str) -> None:
    # Without a round number in the group id the model check cannot run, so
    # a client that verified a round refuses such a message.
    reply = _changed_plain_train_after_round_one(group_id)

    assert reply.has_error()
    assert "which is not a round number" in (reply.error.reason or "")


def test_hostile_foreign_array_gets_error_reply() -> None:
    victim = NODE_IDS[0]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == "masked-input" and msg.metadata.group_id == "2":
            items = dict(msg.content[ARRAYS_RECORD].items())
            first = next(iter(items))
            items[first] = Array(
                dtype="float32", shape=(2, 3), stype="torch.raw", data=bytes(24)
            )
            msg.content[ARRAYS_RECORD] = ArrayRecord(items)
        return None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, MODES[0], rounds=2, reports=reports)

    assert "must be a serialized numpy array" in error_reasons(grid, 2)[victim]
    assert reports[1].num_aggregated == NUM_NODES - 1


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (
            Array(
                dtype="float64",
                shape=(3,),
                stype="numpy.ndarray",
                data=_npy(np.zeros(2, dtype=np.float32)),
            ),
            "declares dtype 'float64' and shape [3], but its data has dtype "
            "'float32' and shape [2]",
        ),
        (
            Array(np.empty(2 * 10**9, dtype=np.dtype("V0"))),
            "whose values take no bytes, and must be empty. Found 2000000000",
        ),
    ],
    ids=["metadata-lie", "zero-byte-values"],
)
def test_hostile_misdeclared_array_gets_error_reply(array: Array, reason: str) -> None:
    victim = NODE_IDS[0]
    calls: list[tuple[int, str]] = []

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == "masked-input" and msg.metadata.group_id == "2":
            items = dict(msg.content[ARRAYS_RECORD].items())
            items[next(iter(items))] = array
            msg.content[ARRAYS_RECORD] = ArrayRecord(items)
        return None

    grid = LoopbackGrid(make_app(recording_train(calls)), NODE_IDS, fault=fault)

    run(grid, MODES[0], rounds=2)

    assert reason in error_reasons(grid, 2)[victim]
    assert victim not in trained(calls, 2)


def with_extra_arrays(model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        **model,
        "labels": np.array(["cat", "dog"]),
        "precise": np.arange(3, dtype=np.longdouble) / 3,
    }


def test_string_and_longdouble_arrays_pass() -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, MODES[0], reports=reports, model=with_extra_arrays(initial_model()))

    assert [r.verified for r in reports] == [True, True, True]
    assert error_reasons(grid, 2) == {}


def test_model_digest_ignores_longdouble_padding() -> None:
    values = np.arange(4, dtype=np.longdouble) / 3
    padded = values.copy()
    width = padded.dtype.itemsize
    if width <= 10:
        pytest.skip("np.longdouble has no padding bytes on this platform")
    raw = padded.view(np.uint8).reshape(-1, width)
    raw[:, 10:] = 0xAB

    assert model_digest({"x": padded}) == model_digest({"x": values})
    nudged = values.copy()
    nudged[1] = np.nextafter(nudged[1], np.longdouble(2))
    assert model_digest({"x": nudged}) != model_digest({"x": values})


def split_settings(victim: int, stage: str, *, encoding: bool) -> object:
    """Return a fault that changes the round-1 settings of every client but one.

    With ``encoding`` it changes the clip range of the encoding. Otherwise
    it sets a learning rate of 0 in the training configuration, so that
    only the victim's update would be in the sum.
    """

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim or name != stage or msg.metadata.group_id != "1":
            return None
        if encoding:
            msg.content[PROTOCOL_RECORD]["clip-range"] = 1.5
        else:
            msg.content["config"] = ConfigRecord({"learning-rate": 0.0})
        return None

    return fault


@pytest.mark.parametrize("encoding", [False, True], ids=["config", "encoding"])
@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_hostile_split_settings_detected(mode: Mode, encoding: bool) -> None:
    victim = NODE_IDS[1]
    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(secure=mode.secure),
        NODE_IDS,
        fault=split_settings(victim, mode.input_stage(), encoding=encoding),  # type: ignore[arg-type]
    )

    run(grid, mode, rounds=1, reports=reports, on_failure=FailurePolicy.REPORT)

    # The transcript names the settings the server computed, the victim's.
    assert failure_reason(grid, victim) == SIGNATURE_INVALID
    for node in set(NODE_IDS) - {victim}:
        assert failure_reason(grid, node) == OTHER_SETTINGS_NAMED
    assert reports[0].verified is False


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_config_of_every_value_type_passes(mode: Mode) -> None:
    config = ConfigRecord(
        {
            "learning-rate": 0.01,
            "epochs": 2,
            "name": "tiny",
            "salt": b"\x00\x01",
            "shuffle": False,
            "weights": [0.5, -0.0],
            "tags": ["a", "b"],
            "sizes": [],
        }
    )
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(secure=mode.secure), NODE_IDS)

    run(grid, mode, rounds=2, reports=reports, train_config=config)

    assert [r.verified for r in reports] == [True, True]


@pytest.mark.filterwarnings("ignore:Field flwr.proto.SintList.vals")
def test_config_changed_by_serialization_passes() -> None:
    # Flower sends a bool in a list of ints as an int; the server hashes the
    # configuration as the clients receive it.
    config = ConfigRecord({"layers": [1, True]})
    try:
        config_record_to_proto(config)
    except (TypeError, ValueError):
        pytest.skip("this protobuf rejects a bool in a list of ints")
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, MODES[0], rounds=1, reports=reports, train_config=config)

    assert reports[0].verified is True


def test_hostile_clip_range_without_grid_step_rejected() -> None:
    # 2 * 1e308 overflows, so the grid step would be infinite and the
    # client's decoding would divide by zero.
    victim = NODE_IDS[0]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == "masked-input":
            msg.content[PROTOCOL_RECORD]["clip-range"] = 1e308
        return None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, MODES[0], rounds=1)

    assert "finite, nonzero grid step" in error_reasons(grid, 1)[victim]


def replace_round_model(victim: int, change: str) -> object:
    """Return a fault that alters or removes the model in ``victim``'s verify requests."""

    def fault(node: int, name: str, msg: Message) -> object:
        if node != victim or ROUND_MODEL_RECORD not in msg.content.array_records:
            return None
        if change == "remove":
            del msg.content[ROUND_MODEL_RECORD]
        elif change == "one-ulp":
            msg.content[ROUND_MODEL_RECORD] = one_ulp_up(
                msg.content[ROUND_MODEL_RECORD]
            )
        else:
            record = msg.content[ROUND_MODEL_RECORD]
            first = next(iter(record))
            msg.content[ROUND_MODEL_RECORD] = ArrayRecord(
                {**dict(record.items()), first: malformed_array(change)}
            )
        return None

    return fault


def malformed_array(kind: str) -> Array:
    """Return an Array whose data numpy cannot load, in one of three ways."""
    if kind == "empty-data":
        return Array(dtype="<u4", shape=(4,), stype="numpy.ndarray", data=b"")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<u4", "fortran_order": False, "shape": (2**40,)}
    )
    data = header.getvalue() if kind == "huge-header" else header.getvalue()[:15]
    return Array(dtype="<u4", shape=(4,), stype="numpy.ndarray", data=data)


@pytest.mark.parametrize(
    "change", ["one-ulp", "remove", "empty-data", "huge-header", "cut-header"]
)
@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_hostile_round_model_in_verify_request(mode: Mode, change: str) -> None:
    # The client computes the next model from the model its verify request
    # carries. One that is not the model it trained on fails the round, so
    # the server cannot steer the next model through it.
    victim = NODE_IDS[1]
    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(recording_train(calls), secure=mode.secure),
        NODE_IDS,
        fault=replace_round_model(victim, change),  # type: ignore[arg-type]
    )

    run(grid, mode, rounds=2, reports=reports, on_failure=FailurePolicy.REPORT)

    assert reports[0].verified is False
    assert reports[0].verification_reason.endswith(f"reports: {OTHER_ROUND_MODEL}")
    assert failure_reason(grid, victim) == OTHER_ROUND_MODEL
    assert trained(calls, 2) == set(NODE_IDS) - {victim}
    assert "round 1 failed verification" in error_reasons(grid, 2)[victim]


def test_model_check_fails_without_expected_model() -> None:
    # A verified round whose next model the client could not compute, for
    # example because its aggregate does not decode: an honest server
    # releases no model, so any model of the next round fails.
    state = ClientVerificationState(
        run_id=1, identity_private_key=bytes(32), verified_round=3
    )

    checked = client_check_model(state, server_round=4, model_sha256=lambda: bytes(32))
    later = client_check_model(state, server_round=5, model_sha256=lambda: bytes(32))

    assert checked.failed_round == 4
    assert "could not compute the model that follows round 3" in checked.failure_reason
    assert later == state


@pytest.mark.parametrize("kind", ["empty-data", "huge-header", "cut-header"])
def test_hostile_malformed_aggregate_fails_round(kind: str) -> None:
    # numpy raises EOFError, MemoryError or a header error for these. The
    # client records a failed round with a reason instead of crashing.
    victim = NODE_IDS[1]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and AGGREGATE_RECORD in msg.content.array_records:
            msg.content[AGGREGATE_RECORD] = ArrayRecord(
                {AGGREGATE_KEY: malformed_array(kind)}
            )
        return None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, MODES[0], rounds=1, reports=reports, on_failure=FailurePolicy.REPORT)

    assert reports[0].verified is False
    assert "the aggregate is malformed" in failure_reason(grid, victim)


@pytest.mark.parametrize("kind", ["empty-data", "huge-header", "cut-header"])
def test_hostile_malformed_masked_input_counts_as_dropped(kind: str) -> None:
    # A client's malformed masked vector must not stop the server's run.
    victim = NODE_IDS[3]

    def rewrite(reply: Message) -> Message:
        reply.content[MASKED_INPUT_RECORD] = ArrayRecord(
            {MASKED_VECTOR_KEY: malformed_array(kind)}
        )
        return reply

    def fault(node: int, name: str, msg: Message) -> object:
        return rewrite if node == victim and name == "masked-input" else None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, MODES[0], rounds=1, reports=reports)

    assert reports[0].num_aggregated == NUM_NODES - 1
    assert reports[0].dropped_by_stage["masked-input"] == 1


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_hostile_non_finite_model_not_trained_on(mode: Mode) -> None:
    victim = NODE_IDS[0]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == mode.input_stage():
            items = {
                key: array.numpy().copy()
                for key, array in msg.content[ARRAYS_RECORD].items()
            }
            first = next(iter(items))
            items[first].reshape(-1)[0] = np.nan
            msg.content[ARRAYS_RECORD] = ArrayRecord(
                {key: Array(value) for key, value in items.items()}
            )
        return None

    calls: list[tuple[int, str]] = []
    grid = LoopbackGrid(
        make_app(recording_train(calls), secure=mode.secure), NODE_IDS, fault=fault
    )

    run(grid, mode, rounds=1)

    assert victim not in trained(calls, 1)
    reason = error_reasons(grid, 1)[victim]
    assert "contains NaN or inf values; this client does not train on it" in reason


def test_hostile_replayed_plain_input_trains_once() -> None:
    # The server sends the victim's plain-input request twice in one round.
    victim = NODE_IDS[0]
    copies: list[Message] = []

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == "plain-input" and not copies:
            copies.append(msg)
            copies[0] = grid.deliver_again(_wire(msg))
        return None

    calls: list[tuple[int, str]] = []
    grid = LoopbackGrid(
        make_app(recording_train(calls), secure=False), NODE_IDS, fault=fault
    )

    run(grid, MODES[3], rounds=1)

    assert not copies[0].has_error()
    reason = error_reasons(grid, 1)[victim]
    assert "already trained for its input of round 1" in reason
    assert [call for call in calls if call[0] == victim] == [(victim, "1")]
