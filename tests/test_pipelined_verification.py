"""Pipelined verification: round r's commit and verify ride on round r + 1.

The runs go through SecureFedAvg, the secure-aggregation mod and the
loopback Grid, which serializes every message and Context. The hostile
servers are the honest one with one piece replaced, as in
tests/test_verification_strategy.py. Each test checks what the clients did
and reported as well as what the server raised.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

import fedsec_flwr.rounds as rounds
from fedsec_flwr import RoundReport, SecAggConfig, SecureFedAvg
from fedsec_flwr.core.messages import RoundHeader, Stage
from fedsec_flwr.core.server import ServerRound
from fedsec_flwr.records import DEFERRED_RECORD, PROTOCOL_RECORD
from fedsec_flwr.verification import (
    FailurePolicy,
    VerificationConfig,
    VerificationError,
)
from tests.loopback import LoopbackGrid, _wire, stage_of
from tests.test_secure_strategy import (
    CONFIG,
    NODE_IDS,
    NUM_NODES,
    initial_model,
)
from tests.test_verification_strategy import (
    SUM_MISMATCH,
    make_app,
    recording_train,
    verdicts,
)

PIPELINED = VerificationConfig(pipelined=True)
PIPELINED_REPORT = VerificationConfig(pipelined=True, on_failure=FailurePolicy.REPORT)


class CountingGrid(LoopbackGrid):
    """A loopback Grid that counts its exchanges: one push per exchange."""

    exchanges = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.exchanges += 1
        return super().push_messages(messages)


def run(
    grid: LoopbackGrid,
    *,
    verification: VerificationConfig | bool = PIPELINED,
    num_rounds: int = 3,
    reports: list[RoundReport] | None = None,
    fraction_train: float = 1.0,
    seed: int = 3,
) -> dict[str, np.ndarray]:
    strategy = SecureFedAvg(
        secure_aggregation=CONFIG,
        verification=verification,
        fraction_train=fraction_train,
        min_train_nodes=3,
        min_available_nodes=NUM_NODES,
        rng=random.Random(seed),
        on_round_end=reports.append if reports is not None else None,
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}


def trained(calls: list[tuple[int, str]], server_round: int) -> set[int]:
    return {node for node, group in calls if group == str(server_round)}


# --- Honest runs -------------------------------------------------------------------


def test_pipelined_rounds_verify_every_round_in_fewer_exchanges() -> None:
    reports: list[RoundReport] = []
    grid = CountingGrid(make_app(), NODE_IDS)

    model = run(grid, reports=reports)

    assert [r.server_round for r in reports] == [1, 2, 3]
    assert [r.verified for r in reports] == [True, True, True]
    assert [r.verification_reason for r in reports] == ["", "", ""]
    # Four exchanges per round, and commit and verify once at the end.
    assert grid.exchanges == 3 * 4 + 2
    for server_round in (1, 2):
        found = verdicts(grid, server_round + 1, record=DEFERRED_RECORD)
        assert found == dict.fromkeys(NODE_IDS, (True, ""))
    assert verdicts(grid, 3) == dict.fromkeys(NODE_IDS, (True, ""))

    unpipelined = CountingGrid(make_app(), NODE_IDS)
    expected = run(unpipelined, verification=True)
    assert unpipelined.exchanges == 3 * 6
    # Stochastic rounding differs between the runs: a few units of the last
    # encoding step per round.
    for key, value in expected.items():
        np.testing.assert_allclose(model[key], value, atol=1e-4)


def test_deferred_stages_nest_in_first_exchanges() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, num_rounds=2)

    carried = {
        (stage_of(message), str(message.content[DEFERRED_RECORD]["stage"]))
        for message in grid.sent
        if DEFERRED_RECORD in message.content
    }
    assert carried == {("setup", "commit"), ("share-keys", "verify")}
    for message in grid.sent:
        if DEFERRED_RECORD in message.content:
            assert message.metadata.group_id == "2"
            assert message.content[DEFERRED_RECORD]["server-round"] == 1


def test_unsampled_clients_commit_and_verify_on_their_own() -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, num_rounds=4, reports=reports, fraction_train=0.6, seed=11)

    assert [r.verified for r in reports] == [True] * 4
    standalone = [
        message
        for message in grid.sent
        if stage_of(message) in ("commit", "verify")
        and message.metadata.group_id != "4"
    ]
    # With 3 of 5 clients per round, some included clients of a round are
    # not sampled in the next one and get the requests on their own.
    assert standalone
    for message in standalone:
        header = RoundHeader.from_fields(dict(message.content[PROTOCOL_RECORD]))
        assert header.server_round == int(message.metadata.group_id) - 1


# --- Hostile servers -----------------------------------------------------------------


class AlterCoordinate(ServerRound):
    """Adds one to the first coordinate of the sum in the chosen round."""

    target_round = 1

    def receive_unmask(self, replies):  # type: ignore[no-untyped-def]
        total = super().receive_unmask(replies)
        if self.server_round == self.target_round:
            total[0] += np.uint32(1)
        return total


@pytest.mark.parametrize("target_round", [1, 3])
def test_tamper_detected_before_anyone_trains_on_the_model(
    monkeypatch: pytest.MonkeyPatch, target_round: int
) -> None:
    monkeypatch.setattr(AlterCoordinate, "target_round", target_round)
    monkeypatch.setattr(rounds, "ServerRound", AlterCoordinate)
    reports: list[RoundReport] = []
    calls: list[tuple[int, str]] = []
    grid = LoopbackGrid(make_app(recording_train(calls)), NODE_IDS)

    with pytest.raises(VerificationError, match=f"Round {target_round}: .*No model"):
        run(grid, reports=reports)

    # The failed round is reported, with its verdict, before the run fails.
    assert [r.server_round for r in reports] == list(range(1, target_round + 1))
    assert reports[-1].verified is False
    assert SUM_MISMATCH in reports[-1].verification_reason
    assert all(r.verified for r in reports[:-1])
    assert trained(calls, target_round + 1) == set()
    if target_round < 3:
        found = verdicts(grid, target_round + 1, record=DEFERRED_RECORD)
    else:
        found = verdicts(grid, target_round)
    assert set(found) == set(NODE_IDS)
    assert all(not ok and SUM_MISMATCH in reason for ok, reason in found.values())


def test_withheld_pipelined_transcript_refuses_next_model() -> None:
    victim = NODE_IDS[4]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == "share-keys" and msg.metadata.group_id == "2":
            del msg.content[DEFERRED_RECORD]
        return None

    reports: list[RoundReport] = []
    calls: list[tuple[int, str]] = []
    grid = LoopbackGrid(make_app(recording_train(calls)), NODE_IDS, fault=fault)

    run(grid, verification=PIPELINED_REPORT, num_rounds=2, reports=reports)

    assert reports[0].verified is True
    assert reports[0].dropped_by_stage["verify"] == 1
    assert victim not in trained(calls, 2)
    assert reports[1].num_aggregated == NUM_NODES - 1


def test_client_dropped_before_next_setup_discards_round() -> None:
    # The lost client's update is in round 1's aggregate without a
    # commitment, so round 1 cannot be checked: its update is discarded,
    # and round 2 trains on round 1's model again and verifies.
    lost = NODE_IDS[1]

    def fault(node: int, name: str, msg: Message) -> object:
        late = name == "setup" and msg.metadata.group_id == "2"
        return "drop" if node == lost and late else None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, num_rounds=2, reports=reports)

    assert [r.server_round for r in reports] == [1, 2]
    assert [r.verified for r in reports] == [False, True]
    assert [r.discarded for r in reports] == [True, False]
    assert reports[1].num_aggregated == NUM_NODES - 1


# --- Hostile requests to a client ------------------------------------------------------


def send_with_deferred(
    grid: LoopbackGrid, deferred: RoundHeader, server_round: int = 2
) -> Message:
    header = RoundHeader(
        stage=Stage.SETUP, run_id=grid.run_id, server_round=server_round
    )
    content = RecordDict(
        {
            PROTOCOL_RECORD: ConfigRecord({**header.to_fields(), "verification": 1}),
            DEFERRED_RECORD: ConfigRecord(deferred.to_fields()),  # type: ignore[arg-type]
        }
    )
    reply = grid._deliver(
        Message(content, NODE_IDS[0], "train", group_id=str(server_round))
    )
    assert reply is not None
    return reply


@pytest.mark.parametrize(
    ("stage", "deferred_round", "run_offset", "message"),
    [
        (Stage.MASKED_INPUT, 1, 0, "must be a commit or verify stage"),
        (Stage.UNMASK, 1, 0, "must be a commit or verify stage"),
        (Stage.COMMIT, 2, 0, "must be for an earlier round of the same run"),
        (Stage.VERIFY, 3, 0, "must be for an earlier round of the same run"),
        (Stage.COMMIT, 1, 1, "must be for an earlier round of the same run"),
        (Stage.COMMIT, 1, 0, "must follow a verified setup stage"),
        (Stage.VERIFY, 1, 0, "must follow a verified setup stage"),
    ],
)
def test_hostile_deferred_request_rejected(
    stage: Stage, deferred_round: int, run_offset: int, message: str
) -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)
    deferred = RoundHeader(
        stage=stage, run_id=grid.run_id + run_offset, server_round=deferred_round
    )

    reply = send_with_deferred(grid, deferred)

    assert reply.has_error()
    assert message in (reply.error.reason or "")


def test_hostile_failed_message_keeps_deferred_commit() -> None:
    # A round-2 setup carrying round 1's commit fails on its own field. The
    # commit must not consume the kept input, so the correct resend commits.
    victim = NODE_IDS[0]
    failed: list[Message] = []

    def broken_copy_first(node: int, stage: str, message: Message) -> object:
        deferred = DEFERRED_RECORD in message.content
        if node == victim and stage == "setup" and deferred and not failed:
            broken = _wire(message)
            broken.content[PROTOCOL_RECORD]["verification"] = 7
            failed.append(broken)
            failed[0] = grid.deliver_again(broken)
        return None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=broken_copy_first)

    run(grid, num_rounds=2, reports=reports)

    assert len(failed) == 1
    assert "'verification' must be 0 or 1. Found 7" in (failed[0].error.reason or "")
    assert [r.verified for r in reports] == [True, True]


# --- Configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secure_aggregation", "found"),
    [
        (None, "secure_aggregation=None"),
        (SecAggConfig(key_lifetime="run"), "key_lifetime='run'"),
    ],
)
def test_pipelined_needs_keys_per_round(
    secure_aggregation: SecAggConfig | None, found: str
) -> None:
    with pytest.raises(ValueError, match=f"keys per round.*{found}"):
        SecureFedAvg(secure_aggregation=secure_aggregation, verification=PIPELINED)


def test_pipelined_must_be_bool() -> None:
    with pytest.raises(ValueError, match=r"pipelined must be a bool\. Found str"):
        VerificationConfig(pipelined="yes")  # type: ignore[arg-type]
