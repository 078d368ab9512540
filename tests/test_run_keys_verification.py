"""Aggregate verification with keys agreed once per run.

With run keys a client registers its identity key with its X25519 keys, and
signs each round's identity-key list in its keyed-input reply. The commit
and verify exchanges follow the keyed-unmask exchange. Each hostile server
is the honest one with one piece replaced, as in the tests with keys per
round, and each test checks what the clients report.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

import fedsec_flwr.rounds as rounds
from fedsec_flwr import RoundReport, SecureFedAvg
from fedsec_flwr.core import signatures
from fedsec_flwr.core.run_keys import KeyedServerRound
from fedsec_flwr.privacy import DPConfig
from fedsec_flwr.records import PROTOCOL_RECORD
from fedsec_flwr.verification import (
    VerificationConfig,
    VerificationError,
)
from tests.loopback import LoopbackGrid, stage_of
from tests.test_secure_strategy import (
    CONFIG,
    NODE_IDS,
    NUM_NODES,
    assert_close,
    expected_model,
    initial_model,
)
from tests.test_verification_strategy import (
    REPORT,
    SUM_MISMATCH,
    OtherRoundForOne,
    SplitView,
    assert_all_failed,
    error_reasons,
    make_app,
    recording_train,
    replace_verifier,
    run_auditor,
    verdicts,
)

RUN_KEYS = dataclasses.replace(CONFIG, key_lifetime="run")


def run(
    grid: LoopbackGrid,
    *,
    verification: VerificationConfig | bool = True,
    rounds: int = 1,
    reports: list[RoundReport] | None = None,
    dp: DPConfig | None = None,
) -> dict[str, np.ndarray]:
    strategy = SecureFedAvg(
        secure_aggregation=RUN_KEYS,
        differential_privacy=dp,
        verification=verification,
        rng=random.Random(3),
        on_round_end=reports.append if reports is not None else None,
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}


def replace_keyed_round(
    monkeypatch: pytest.MonkeyPatch, hostile: type[KeyedServerRound]
) -> None:
    monkeypatch.setattr(rounds, "KeyedServerRound", hostile)


# --- Honest runs -----------------------------------------------------------------


def test_run_keys_rounds_verify_every_round(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit.json"
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(
        grid,
        verification=VerificationConfig(audit_path=audit_path),
        rounds=3,
        reports=reports,
    )

    assert [r.verified for r in reports] == [True, True, True]
    assert len(verdicts(grid, 3)) == NUM_NODES
    assert all(verified for verified, _ in verdicts(grid, 3).values())
    assert run_auditor(audit_path).returncode == 0
    stages = [stage_of(message) for message in grid.sent]
    assert stages.count("register") == NUM_NODES
    assert "setup" not in stages
    assert "share-keys" not in stages


def test_run_keys_register_replies_carry_identity_keys() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid)

    registered = [
        reply
        for reply in grid.received
        if not reply.has_error()
        and "identity-public-key" in reply.content[PROTOCOL_RECORD]
    ]
    assert len(registered) == NUM_NODES
    for reply in registered:
        key = reply.content[PROTOCOL_RECORD]["identity-public-key"]
        assert len(key) == signatures.IDENTITY_KEY_SIZE  # type: ignore[arg-type]


# --- Hostile servers and clients -------------------------------------------------


def test_tamper_run_keys_aggregate_coordinate_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class AlterCoordinate(KeyedServerRound):
        def receive_unmask(self, replies, *, skipped=frozenset()):  # type: ignore[no-untyped-def]
            total = super().receive_unmask(replies, skipped=skipped)
            total[0] += np.uint32(1)
            return total

    replace_keyed_round(monkeypatch, AlterCoordinate)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    with pytest.raises(VerificationError, match="No model from this round"):
        run(grid, reports=reports)

    assert reports == []
    assert_all_failed(verdicts(grid), SUM_MISMATCH)


def test_hostile_run_keys_drop_of_included_update_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    victim = NODE_IDS[2]

    class DropIncluded(KeyedServerRound):
        """Leaves one masked input out of the sum but keeps its sender in S."""

        def receive_inputs(self, replies):  # type: ignore[no-untyped-def]
            super().receive_inputs({n: r for n, r in replies.items() if n != victim})

        def receive_unmask(self, replies, *, skipped=frozenset()):  # type: ignore[no-untyped-def]
            total = super().receive_unmask(replies, skipped=skipped)
            self._survivors.add(victim)
            return total

    replace_keyed_round(monkeypatch, DropIncluded)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, reports=reports)

    assert reports[0].verified is False
    assert_all_failed(verdicts(grid), SUM_MISMATCH)


def test_hostile_run_keys_replayed_aggregate_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first: list[np.ndarray] = []

    class ReplayAggregate(KeyedServerRound):
        def receive_unmask(self, replies, *, skipped=frozenset()):  # type: ignore[no-untyped-def]
            total = super().receive_unmask(replies, skipped=skipped)
            if not first:
                first.append(total.copy())
                return total
            return first[0].copy()

    replace_keyed_round(monkeypatch, ReplayAggregate)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, rounds=2, reports=reports)

    assert [r.verified for r in reports] == [True, False]
    assert_all_failed(verdicts(grid, 2), SUM_MISMATCH)


def test_hostile_run_keys_split_key_lists_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replace_verifier(monkeypatch, SplitView)
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT)

    found = verdicts(grid)
    victim_verified, victim_reason = found.pop(SplitView.victim)
    assert not victim_verified
    assert "the key list differs from the one this client signed" in victim_reason
    assert_all_failed(found, "a key-list signature is not valid", NUM_NODES - 1)


def test_run_keys_client_refuses_training_after_failed_verification(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replace_verifier(monkeypatch, OtherRoundForOne)
    victim = OtherRoundForOne.victim
    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(recording_train(calls)), NODE_IDS)

    run(grid, verification=REPORT, rounds=2, reports=reports)

    assert reports[0].verified is False
    assert (victim, "2") not in calls
    reason = error_reasons(grid, 2)[victim]
    assert "does not train on this model: round 1 failed" in reason
    assert reports[1].dropped_by_stage["keyed-input"] == 1
    assert reports[1].verified is True


def test_run_keys_bad_signature_drops_client() -> None:
    cheat = NODE_IDS[1]

    def fault(node: int, name: str, _: Message) -> object:
        if node != cheat or name != "keyed-input":
            return None

        def corrupt(reply: Message) -> Message:
            record = reply.content[PROTOCOL_RECORD]
            signature = record["key-list-signature"]
            record["key-list-signature"] = bytes([signature[0] ^ 1]) + signature[1:]  # type: ignore[index]
            return reply

        return corrupt

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    model = run(grid, reports=reports)

    assert reports[0].dropped_by_stage["keyed-input"] == 1
    assert reports[0].verified is True
    assert_close(model, expected_model([p for p in range(NUM_NODES) if p != 1]))


def test_hostile_register_without_identity_key() -> None:
    cheat = NODE_IDS[3]

    def fault(node: int, name: str, _: Message) -> object:
        if node != cheat or name != "register":
            return None

        def strip(reply: Message) -> Message:
            del reply.content[PROTOCOL_RECORD]["identity-public-key"]
            return reply

        return strip

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, reports=reports)

    assert reports[0].dropped_by_stage["register"] == 1
    assert reports[0].num_aggregated == NUM_NODES - 1
    assert reports[0].verified is True
