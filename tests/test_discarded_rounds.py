"""A round whose included clients did not all commit is discarded, not failed.

A client that drops out after its masked input leaves its update in the
aggregate with no commitment, so no party can check the aggregate. The server
then discards the round's update: the next round trains on the same model
again, and every client expects exactly that model. Honest runs therefore
go on through such dropouts under the refuse policy, while a server that
uses the unchecked aggregate anyway, or hides a commitment it received, is
caught.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord

from fedsec_flwr import RoundReport, TooFewSurvivorsError, audit
from fedsec_flwr.models import model_digest
from fedsec_flwr.records import ARRAYS_RECORD, DEFERRED_RECORD, PROTOCOL_RECORD
from fedsec_flwr.verification import FailurePolicy, VerificationError
from tests.loopback import LoopbackGrid
from tests.test_model_binding import MISMATCH, MODES, Mode, one_ulp_up, run
from tests.test_secure_strategy import NODE_IDS, honest_train, initial_model
from tests.test_verification_strategy import error_reasons, make_app

VICTIM = NODE_IDS[2]


def recording_models(received: dict[tuple[int, str], bytes]):  # type: ignore[no-untyped-def]
    """Return a train function that records the digest of each model it gets."""

    def train(msg: Message, context: Context) -> Message:
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        received[(context.node_id, msg.metadata.group_id)] = model_digest(arrays)
        return honest_train(msg, context)

    return train


def drop_commit_of_round_one(mode: Mode):  # type: ignore[no-untyped-def]
    """Return a fault that loses the victim's commitment of round 1.

    Pipelined, round 1's commit request travels with round 2's setup, so the
    victim drops that setup exchange; otherwise it drops the commit stage.
    """
    stage, group = ("setup", "2") if mode.pipelined else ("commit", "1")

    def fault(node: int, name: str, msg: Message) -> object:
        dropped = name == stage and msg.metadata.group_id == group
        return "drop" if node == VICTIM and dropped else None

    return fault


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_dropout_at_commit_discards_round(
    mode: Mode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    received: dict[tuple[int, str], bytes] = {}
    reports: list[RoundReport] = []
    path = tmp_path / "audit.json"
    grid = LoopbackGrid(
        make_app(recording_models(received), secure=mode.secure),
        NODE_IDS,
        fault=drop_commit_of_round_one(mode),  # type: ignore[arg-type]
    )

    released = run(grid, mode, rounds=3, reports=reports, audit_path=path)

    assert [r.discarded for r in reports] == [True, False, False]
    assert [r.verified for r in reports] == [False, True, True]
    assert reports[0].verification_reason.startswith("1 of 5 included clients")
    assert error_reasons(grid, 2) == {}
    assert error_reasons(grid, 3) == {}
    initial = model_digest(initial_model())
    others = set(NODE_IDS) - {VICTIM}
    # Round 2 trains on round 1's model again, so round 1's update is unused.
    assert {received[(node, "2")] for node in others} == {initial}
    assert {received[(node, "1")] for node in NODE_IDS} == {initial}
    initial_path, final_path = tmp_path / "initial.npz", tmp_path / "final.npz"
    np.savez(initial_path, **initial_model())
    np.savez(final_path, **released)
    command = [str(path), "--initial-model", str(initial_path)]
    capsys.readouterr()
    assert audit.main([*command, "--final-model", str(final_path)]) == 0
    assert "note:" not in capsys.readouterr().out
    # Without the models, a discard is only the server's account.
    assert audit.main([str(path)]) == 0
    assert "note: a discarded round is the server's account" in capsys.readouterr().out


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_discarded_round_evaluates_kept_model(mode: Mode) -> None:
    # Pipelined, round 1 is evaluated before its verification discards it,
    # on a model no client ever receives. Its report must carry the metrics
    # of the model it kept, in every mode.
    model_numbers: dict[bytes, int] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        digest = model_digest({k: v.numpy() for k, v in arrays.items()})
        number = model_numbers.setdefault(digest, len(model_numbers))
        return MetricRecord({"model": number})

    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(honest_train, secure=mode.secure),
        NODE_IDS,
        fault=drop_commit_of_round_one(mode),  # type: ignore[arg-type]
    )

    run(grid, mode, rounds=2, reports=reports, evaluate_fn=evaluate)

    assert [r.discarded for r in reports] == [True, False]
    # Model 0 is the initial model, evaluated before round 1.
    assert reports[0].evaluate_metrics == {"model": 0.0}
    assert reports[1].evaluate_metrics["model"] != 0.0


@pytest.mark.parametrize("mode", MODES[:4], ids=lambda mode: mode.name)
def test_tamper_model_after_discarded_round_refused(mode: Mode) -> None:
    # The server discards round 1 but sends another model than round 1's
    # in round 2: every client that saw the discard refuses it.
    drop = drop_commit_of_round_one(mode)

    def fault(node: int, name: str, msg: Message) -> object:
        if name == mode.input_stage() and msg.metadata.group_id == "2":
            msg.content[ARRAYS_RECORD] = one_ulp_up(msg.content[ARRAYS_RECORD])
        return drop(node, name, msg)

    grid = LoopbackGrid(
        make_app(honest_train, secure=mode.secure), NODE_IDS, fault=fault
    )

    # Too few clients remain, or, in plain mode, the victim's lone input
    # fails verification.
    with pytest.raises((TooFewSurvivorsError, ValueError, VerificationError)):
        run(grid, mode, rounds=2)

    reasons = error_reasons(grid, 2)
    assert set(reasons) >= set(NODE_IDS) - {VICTIM}
    assert all(MISMATCH in reasons[node] for node in set(NODE_IDS) - {VICTIM})


def hide_commitment(node_id: int):  # type: ignore[no-untyped-def]
    """Return a fault that removes a committed client's entry from each transcript."""

    def fault(node: int, name: str, msg: Message) -> object:
        for record_name in (PROTOCOL_RECORD, DEFERRED_RECORD):
            record = msg.content.config_records.get(record_name)
            if record is None or not isinstance(record.get("transcript"), str):
                continue
            transcript = json.loads(str(record["transcript"]))
            for field in ("commitments", "commitment_signatures"):
                transcript[field].pop(str(node_id), None)
            msg.content[record_name] = ConfigRecord(
                {**dict(record), "transcript": json.dumps(transcript)}
            )
        return None

    return fault


@pytest.mark.parametrize("mode", MODES[:4], ids=lambda mode: mode.name)
def test_hostile_hidden_commitment_fails_round(mode: Mode) -> None:
    # The victim committed, but the transcript leaves it out, so the round
    # looks discarded to everyone else. The victim detects the omission, and
    # the round fails instead of being discarded.
    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(honest_train, secure=mode.secure),
        NODE_IDS,
        fault=hide_commitment(VICTIM),  # type: ignore[arg-type]
    )

    run(grid, mode, rounds=1, reports=reports, on_failure=FailurePolicy.REPORT)

    assert reports[0].verified is False
    assert reports[0].discarded is False
    assert "reports:" in reports[0].verification_reason


def report_failure_for(node_id: int):  # type: ignore[no-untyped-def]
    """Return a fault that turns ``node_id``'s verify reply into a failure."""

    def rewrite(reply: Message) -> Message:
        for record_name in (PROTOCOL_RECORD, DEFERRED_RECORD):
            record = reply.content.config_records.get(record_name)
            if record is None or "verified" not in record:
                continue
            reply.content[record_name] = ConfigRecord(
                {**dict(record), "verified": 0, "discarded": 0, "reason": "disputed"}
            )
        return reply

    def fault(node: int, name: str, msg: Message) -> object:
        return rewrite if node == node_id else None

    return fault


@pytest.mark.parametrize("mode", MODES[:4], ids=lambda mode: mode.name)
def test_disputed_discard_keeps_model(mode: Mode) -> None:
    # The server's own audit discards round 1 and one client reports a
    # failure instead. Under the report policy the round must stay
    # discarded: its aggregate was never checked, so it is never applied.
    drop = drop_commit_of_round_one(mode)
    disputing = report_failure_for(NODE_IDS[0])
    received: dict[tuple[int, str], bytes] = {}

    def fault(node: int, name: str, msg: Message) -> object:
        return drop(node, name, msg) or disputing(node, name, msg)

    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(recording_models(received), secure=mode.secure),
        NODE_IDS,
        fault=fault,
    )

    run(grid, mode, rounds=2, reports=reports, on_failure=FailurePolicy.REPORT)

    assert reports[0].discarded is True
    assert f"node {NODE_IDS[0]} reports: disputed" in reports[0].verification_reason
    initial = model_digest(initial_model())
    assert {received[(node, "2")] for node in NODE_IDS[1:] if node != VICTIM} == {
        initial
    }
