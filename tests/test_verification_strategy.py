"""Aggregate verification through SecureFedAvg, the mods and the loopback Grid.

Honest runs must verify every round. Each hostile server is the honest
server with one piece replaced in the test: a `ServerRound` subclass that
changes the aggregate, or a `ServerVerification` subclass that changes what
the clients are shown. Reply rewrites in the loopback Grid stand for a server
that substitutes what it received. Each test checks what the clients report,
because a dishonest server would not report its own failure.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from collections.abc import Mapping
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
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

import fedsec_flwr.rounds as rounds
from fedsec_flwr import (
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    TooFewSurvivorsError,
)
from fedsec_flwr.config import KEY_LIFETIME_ROUND, KEY_LIFETIME_RUN, KEY_LIFETIMES
from fedsec_flwr.core import commitments, signatures
from fedsec_flwr.core.encoding import encode_update
from fedsec_flwr.core.messages import (
    IdentityKeyList,
    RoundHeader,
    Stage,
    VerifyRequest,
)
from fedsec_flwr.core.server import ServerRound
from fedsec_flwr.core.transcript import RoundTranscript
from fedsec_flwr.mod import (
    CLIENT_TIMING_METRICS,
    make_plain_verification_mod,
    make_secure_aggregation_mod,
    plain_verification_mod,
    secure_aggregation_mod,
)
from fedsec_flwr.models import CommitmentLayout
from fedsec_flwr.privacy import DPConfig, DPMode
from fedsec_flwr.records import (
    AGGREGATE_KEY,
    AGGREGATE_RECORD,
    BLINDING_KEY,
    PLAIN_INPUT_RECORD,
    PROTOCOL_RECORD,
    VERIFICATION_ARRAYS_RECORD,
    VERIFICATION_STATE_RECORD,
)
from fedsec_flwr.verification import (
    FailurePolicy,
    ServerVerification,
    VerificationConfig,
    VerificationError,
    check_blinding_capacity,
)
from tests.loopback import LoopbackGrid, _load_context, stage_of
from tests.test_secure_strategy import (
    CONFIG,
    NODE_IDS,
    NUM_NODES,
    TrainFn,
    assert_close,
    expected_model,
    honest_train,
    initial_model,
)

REPORT = VerificationConfig(on_failure=FailurePolicy.REPORT)
SUM_MISMATCH = "sum of the commitments does not match"

Verdicts = dict[int, tuple[bool, str]]


def make_app(
    train: TrainFn = honest_train, *, secure: bool = True, mod: Mod | None = None
) -> ClientApp:
    chosen = mod or (secure_aggregation_mod if secure else plain_verification_mod)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return chosen(msg, context, train)

    return app


def run(
    grid: LoopbackGrid,
    *,
    verification: VerificationConfig | bool = True,
    secure: bool = True,
    rounds: int = 1,
    reports: list[RoundReport] | None = None,
    dp: DPConfig | None = None,
    key_lifetime: str = KEY_LIFETIME_ROUND,
) -> dict[str, np.ndarray]:
    config = dataclasses.replace(CONFIG, key_lifetime=key_lifetime)
    strategy = SecureFedAvg(
        secure_aggregation=config if secure else None,
        differential_privacy=dp,
        verification=verification,
        rng=random.Random(3),
        on_round_end=reports.append if reports is not None else None,
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}


def verdicts(
    grid: LoopbackGrid, server_round: int = 1, *, record: str = PROTOCOL_RECORD
) -> Verdicts:
    """Collect the verify replies the clients sent in one round's exchanges.

    A pipelined verify reply travels in the next round, in `DEFERRED_RECORD`.
    """
    found: Verdicts = {}
    for reply in grid.received:
        if reply.has_error() or reply.metadata.group_id != str(server_round):
            continue
        fields = reply.content.config_records.get(record)
        if fields is not None and "verified" in fields:
            found[reply.metadata.src_node_id] = (
                bool(fields["verified"]),
                str(fields["reason"]),
            )
    return found


def error_reasons(grid: LoopbackGrid, server_round: int) -> dict[int, str]:
    return {
        reply.metadata.src_node_id: reply.error.reason or ""
        for reply in grid.received
        if reply.has_error() and reply.metadata.group_id == str(server_round)
    }


def plain_config() -> VerificationConfig:
    return VerificationConfig(plain_encoding=CONFIG)


# --- Honest runs ---------------------------------------------------------------


def test_secure_rounds_verify_every_round() -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, rounds=2, reports=reports)

    assert [r.verified for r in reports] == [True, True]
    assert [r.verification_reason for r in reports] == ["", ""]
    assert all(verified for verified, _ in verdicts(grid, 2).values())
    assert len(verdicts(grid, 2)) == NUM_NODES


@pytest.mark.parametrize("key_lifetime", KEY_LIFETIMES)
def test_secure_round_model_equals_plaintext_mean(key_lifetime: str) -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    model = run(grid, key_lifetime=key_lifetime)

    assert_close(model, expected_model(list(range(NUM_NODES))))


def test_plain_rounds_verify_every_round() -> None:
    reports: list[RoundReport] = []
    mod = make_plain_verification_mod(require_verification=True)
    grid = LoopbackGrid(make_app(secure=False, mod=mod), NODE_IDS)

    model = run(grid, verification=plain_config(), secure=False, reports=reports)

    assert reports[0].verified is True
    assert reports[0].dropped_by_stage == {
        "setup": 0,
        "plain-input": 0,
        "commit": 0,
        "verify": 0,
    }
    assert_close(model, expected_model(list(range(NUM_NODES))))


def test_plain_rounds_send_update_and_blinding() -> None:
    grid = LoopbackGrid(make_app(secure=False), NODE_IDS)

    run(grid, verification=plain_config(), secure=False, rounds=2)

    inputs = [r for r in grid.received if PLAIN_INPUT_RECORD in r.content]
    assert len(inputs) == 2 * NUM_NODES
    for reply in inputs:
        assert reply.content[PLAIN_INPUT_RECORD][BLINDING_KEY].shape == (256,)


def test_plain_mod_passes_unverified_rounds_through() -> None:
    grid = LoopbackGrid(make_app(secure=False), NODE_IDS)

    model = run(grid, verification=False, secure=False)

    assert_close(model, expected_model(list(range(NUM_NODES))))


@pytest.mark.parametrize(
    ("key_lifetime", "stage", "input_counted"),
    [
        (KEY_LIFETIME_ROUND, "masked-input", False),
        (KEY_LIFETIME_ROUND, "unmask", True),
        (KEY_LIFETIME_RUN, "keyed-input", False),
        (KEY_LIFETIME_RUN, "keyed-unmask", True),
    ],
)
def test_dropout_still_verifies(
    key_lifetime: str, stage: str, input_counted: bool
) -> None:
    lost = NODE_IDS[1]

    def fault(node: int, name: str, _: Message) -> object:
        return "drop" if node == lost and name == stage else None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    model = run(grid, reports=reports, key_lifetime=key_lifetime)

    included = [p for p in range(NUM_NODES) if input_counted or p != 1]
    assert reports[0].verified is True
    assert reports[0].num_aggregated == len(included)
    assert set(verdicts(grid)) == {NODE_IDS[p] for p in included}
    assert_close(model, expected_model(included))


def test_no_verification_reports_none() -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=False, reports=reports)

    assert reports[0].verified is None
    assert reports[0].verification_reason == ""
    assert "commit" not in reports[0].dropped_by_stage


# Noise this large pushes many encoded coordinates below zero, where they wrap.
DISTRIBUTED_DP = DPConfig(
    mode=DPMode.DISTRIBUTED,
    noise_multiplier=3.0,
    clipping_norm=1.0,
    adaptive_clipping=True,
)


@pytest.mark.parametrize("key_lifetime", KEY_LIFETIMES)
def test_distributed_dp_rounds_verify(key_lifetime: str) -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, rounds=2, reports=reports, dp=DISTRIBUTED_DP, key_lifetime=key_lifetime)

    assert [r.verified for r in reports] == [True, True]
    assert reports[1].epsilon is not None


def test_distributed_dp_fails_without_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_offset(cls: type[CommitmentLayout], params, **_: object):  # type: ignore[no-untyped-def]
        return cls(modulus=params.modulus)

    monkeypatch.setattr(CommitmentLayout, "distributed", classmethod(no_offset))
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, reports=reports, dp=DISTRIBUTED_DP)

    assert reports[0].verified is False
    assert SUM_MISMATCH in reports[0].verification_reason


def test_commitment_offsets_cancel_in_sum() -> None:
    modulus = 2**20
    layout = CommitmentLayout(modulus=modulus, noisy_slots=3, bit_slot=4, offset=500)
    noisy = [
        np.array([10, 2**20 - 7, 300, 9, 2**20 - 1], dtype=np.uint32),
        np.array([2**20 - 40, 5, 2**20 - 100, 1, 1], dtype=np.uint32),
    ]

    committed = [layout.client_vector(vector) for vector in noisy]
    total = (noisy[0] + noisy[1]) & np.uint32(modulus - 1)

    plain_sum = committed[0].astype(np.int64) + committed[1].astype(np.int64)
    assert int(plain_sum.max()) < modulus
    np.testing.assert_array_equal(
        plain_sum, layout.aggregate_vector(total, num_included=2)
    )


def test_distributed_layout_rejects_small_modulus() -> None:
    params = CONFIG.encoding()
    tight = dataclasses.replace(params, modulus=2**32, noise_headroom=2 * 10**8)

    with pytest.raises(ValueError, match="Verification with distributed DP"):
        CommitmentLayout.distributed(
            tight, num_coordinates=4, bit_slot=None, bit_sigma_client=0.0
        )


# --- Configuration -------------------------------------------------------------


def test_central_dp_with_verification_rejected() -> None:
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=1.0)

    with pytest.raises(ValueError, match="central DP"):
        SecureFedAvg(differential_privacy=dp, verification=True)


def test_unknown_failure_policy_rejected() -> None:
    with pytest.raises(ValueError, match="on_failure must be 'refuse' or 'report'"):
        VerificationConfig(on_failure="ignore")  # type: ignore[arg-type]


def test_missing_audit_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="audit_path must be in an existing folder"):
        VerificationConfig(audit_path=tmp_path / "missing" / "audit.json")


def test_stale_audit_file_rejected_when_built(tmp_path: Path) -> None:
    stale = tmp_path / "audit.json"
    stale.write_text('{"results": []}')

    with pytest.raises(ValueError, match=r"audit file '.*audit\.json': the file must"):
        VerificationConfig(audit_path=stale)


@pytest.mark.parametrize("kind", ["folder", "empty", "int"])
def test_audit_path_not_a_file_rejected(tmp_path: Path, kind: str) -> None:
    value: object = {"folder": tmp_path, "empty": "", "int": 5}[kind]
    message = "audit_path must be a path" if kind == "int" else "not a folder"

    with pytest.raises(ValueError, match=message):
        VerificationConfig(audit_path=value)  # type: ignore[arg-type]


def test_modulus_too_small_for_blinding_rejected() -> None:
    small = SecAggConfig(modulus=2**20, max_weight=1, max_clients=100)

    with pytest.raises(ValueError, match="blinding sums do not wrap"):
        SecureFedAvg(secure_aggregation=small, verification=True)


@pytest.mark.parametrize(
    ("modulus", "max_clients", "advice"),
    [
        (
            2**20,
            100,
            "Lower max_clients to at most 16, or raise the modulus (at most 2**32).",
        ),
        # The modulus is already the largest, so only max_clients can help.
        (2**32, 70_000, "Lower max_clients to at most 65537."),
        # One client per sum is not allowed, so only the modulus can help.
        (2**16, 2, "Raise the modulus (at most 2**32)."),
        (
            2**16,
            70_000,
            "Raise the modulus to 2**32 and lower max_clients to at most 65537.",
        ),
    ],
)
def test_blinding_capacity_advice(modulus: int, max_clients: int, advice: str) -> None:
    with pytest.raises(ValueError) as raised:
        check_blinding_capacity(modulus=modulus, max_clients=max_clients)

    assert str(raised.value).endswith(advice)


def test_unknown_client_policy_rejected() -> None:
    with pytest.raises(ValueError, match="on_verification_failure"):
        make_secure_aggregation_mod(on_verification_failure="ignore")


# --- Hostile servers -----------------------------------------------------------


def replace_server_round(
    monkeypatch: pytest.MonkeyPatch, hostile: type[ServerRound]
) -> None:
    monkeypatch.setattr(rounds, "ServerRound", hostile)


def replace_verifier(
    monkeypatch: pytest.MonkeyPatch, hostile: type[ServerVerification]
) -> None:
    monkeypatch.setattr(rounds, "ServerVerification", hostile)


def assert_all_failed(found: Verdicts, reason: str, count: int = NUM_NODES) -> None:
    assert len(found) == count
    for node, (verified, text) in found.items():
        assert not verified, node
        assert reason in text, (node, text)


def test_tamper_one_aggregate_coordinate_detected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class AlterCoordinate(ServerRound):
        def receive_unmask(self, replies):  # type: ignore[no-untyped-def]
            total = super().receive_unmask(replies)
            total[0] += np.uint32(1)
            return total

    replace_server_round(monkeypatch, AlterCoordinate)
    audit_path = tmp_path / "audit.json"
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    with pytest.raises(VerificationError, match="No model from this round"):
        run(
            grid,
            verification=VerificationConfig(audit_path=audit_path),
            reports=reports,
        )

    assert reports == []
    assert_all_failed(verdicts(grid), SUM_MISMATCH)
    assert run_auditor(audit_path).returncode == 1


def test_hostile_drop_of_included_update_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class DropIncluded(ServerRound):
        """Leaves one masked input out of the sum but keeps its sender in S."""

        victim = NODE_IDS[2]

        def receive_masked_inputs(self, replies):  # type: ignore[no-untyped-def]
            kept = {node: v for node, v in replies.items() if node != self.victim}
            super().receive_masked_inputs(kept)

        def receive_unmask(self, replies):  # type: ignore[no-untyped-def]
            total = super().receive_unmask(replies)
            self._survivors.add(self.victim)
            return total

    replace_server_round(monkeypatch, DropIncluded)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, reports=reports)

    assert reports[0].num_aggregated == NUM_NODES
    assert reports[0].verified is False
    assert_all_failed(verdicts(grid), SUM_MISMATCH)


def test_hostile_substituted_update_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    class Substitute(ServerRound):
        """Replaces one client's input by an encoding of another update."""

        victim = NODE_IDS[3]

        def receive_masked_inputs(self, replies):  # type: ignore[no-untyped-def]
            kept = {node: v for node, v in replies.items() if node != self.victim}
            super().receive_masked_inputs(kept)

        def receive_unmask(self, replies):  # type: ignore[no-untyped-def]
            total = super().receive_unmask(replies)
            forged, _ = encode_update(
                np.full(16, 0.5),
                weight=1000,
                params=CONFIG.encoding(),
                rng=np.random.default_rng(0),
            )
            total[: forged.size] += forged
            total[forged.size :] += commitments.draw_blinding()
            self._survivors.add(self.victim)
            return total

    replace_server_round(monkeypatch, Substitute)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, reports=reports)

    assert reports[0].verified is False
    assert_all_failed(verdicts(grid), SUM_MISMATCH)


def test_hostile_plain_update_replayed_detected() -> None:
    """Round 2 gets another client's round-1 input in place of a client's own."""
    recorded: dict[int, Message] = {}
    source, victim = NODE_IDS[0], NODE_IDS[4]

    def fault(node: int, name: str, msg: Message) -> object:
        if name != "plain-input":
            return None
        if msg.metadata.group_id == "1" and node == source:

            def keep(reply: Message) -> Message:
                recorded[node] = reply
                return reply

            return keep
        if msg.metadata.group_id == "2" and node == victim:

            def substitute(reply: Message) -> Message:
                old = recorded[source].content[PLAIN_INPUT_RECORD]
                reply.content[PLAIN_INPUT_RECORD] = ArrayRecord(
                    {key: Array(array.numpy()) for key, array in old.items()}
                )
                return reply

            return substitute
        return None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(secure=False), NODE_IDS, fault=fault)

    run(
        grid,
        verification=dataclasses.replace(plain_config(), on_failure="report"),  # type: ignore[arg-type]
        secure=False,
        rounds=2,
        reports=reports,
    )

    assert [r.verified for r in reports] == [True, False]
    assert_all_failed(verdicts(grid, 2), SUM_MISMATCH)


def test_hostile_replayed_aggregate_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    first: list[np.ndarray] = []

    class ReplayAggregate(ServerRound):
        def receive_unmask(self, replies):  # type: ignore[no-untyped-def]
            total = super().receive_unmask(replies)
            if not first:
                first.append(total.copy())
                return total
            return first[0].copy()

    replace_server_round(monkeypatch, ReplayAggregate)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, rounds=2, reports=reports)

    assert [r.verified for r in reports] == [True, False]
    assert_all_failed(verdicts(grid, 2), SUM_MISMATCH)


def test_hostile_other_aggregate_at_verify_detected() -> None:
    # The server commits the clients to one aggregate and shows one of them
    # another aggregate at the verify stage.
    victim = NODE_IDS[1]

    def fault(node: int, name: str, msg: Message) -> object:
        if node == victim and name == "verify":
            record = msg.content[AGGREGATE_RECORD]
            altered = record[AGGREGATE_KEY].numpy().copy()
            altered[0] += np.uint32(1)
            msg.content[AGGREGATE_RECORD] = ArrayRecord({AGGREGATE_KEY: Array(altered)})
        return None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, verification=REPORT, reports=reports)

    found = verdicts(grid)
    assert found[victim] == (
        False,
        "the aggregate differs from the one this client committed to",
    )
    assert reports[0].verified is False
    assert all(ok for node, (ok, _) in found.items() if node != victim)


def test_hostile_replayed_transcript_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    first: list[RoundTranscript] = []

    class ReplayTranscript(ServerVerification):
        def verify_request(self, node_id, round_transcript):  # type: ignore[no-untyped-def]
            if not first:
                first.append(round_transcript)
            return super().verify_request(node_id, first[0])

    replace_verifier(monkeypatch, ReplayTranscript)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, rounds=2, reports=reports)

    assert reports[0].verified is True
    assert_all_failed(verdicts(grid, 2), "the transcript is for another round")


def test_hostile_deeply_nested_transcript_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NestedTranscript(ServerVerification):
        def verify_request(self, node_id, round_transcript):  # type: ignore[no-untyped-def]
            return VerifyRequest(transcript="[" * 100_000 + "]" * 100_000)

    replace_verifier(monkeypatch, NestedTranscript)
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, rounds=1)

    assert_all_failed(verdicts(grid, 1), "nests too deeply")


class SplitView(ServerVerification):
    """Shows one client a list with a server-made key for another client."""

    victim, impersonated = NODE_IDS[0], NODE_IDS[1]

    def key_list_request(self, node_id: int) -> IdentityKeyList:
        keys = dict(self.identity_keys)
        if node_id == self.victim:
            fake = signatures.generate_identity_key()
            keys[self.impersonated] = signatures.identity_public_bytes(fake)
        return IdentityKeyList(identity_keys=keys)

    def receive_key_list_signatures(self, replies):  # type: ignore[no-untyped-def]
        self.key_list_signatures = {n: r.signature for n, r in replies.items()}
        return set(self.key_list_signatures)


def test_hostile_split_key_lists_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    replace_verifier(monkeypatch, SplitView)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, verification=REPORT, reports=reports)

    found = verdicts(grid)
    victim_verified, victim_reason = found.pop(SplitView.victim)
    assert not victim_verified
    assert "the key list differs from the one this client signed" in victim_reason
    assert_all_failed(found, "a key-list signature is not valid", NUM_NODES - 1)


@pytest.mark.parametrize(
    ("signatures_field", "reason"),
    [
        ("commitment_signatures", "a commitment signature is not valid"),
        ("key_list_signatures", "a key-list signature is not valid"),
    ],
)
def test_tamper_forged_signature_detected(
    monkeypatch: pytest.MonkeyPatch, signatures_field: str, reason: str
) -> None:
    forged_node = NODE_IDS[3]

    class ForgeSignature(ServerVerification):
        def transcript(self) -> RoundTranscript:
            honest = super().transcript()
            forged = dict(getattr(honest, signatures_field))
            forged[forged_node] = (
                bytes([forged[forged_node][0] ^ 1]) + forged[forged_node][1:]
            )
            return dataclasses.replace(honest, **{signatures_field: forged})

    replace_verifier(monkeypatch, ForgeSignature)
    grid = LoopbackGrid(make_app(), NODE_IDS)

    with pytest.raises(VerificationError, match=reason):
        run(grid)

    assert_all_failed(verdicts(grid), reason)


# --- Client-side policy --------------------------------------------------------


class OtherRoundForOne(ServerVerification):
    """Shows one client a transcript that claims another round."""

    victim = NODE_IDS[2]

    def verify_request(self, node_id, round_transcript):  # type: ignore[no-untyped-def]
        if node_id == self.victim and self.server_round == 1:
            round_transcript = dataclasses.replace(round_transcript, server_round=99)
        return super().verify_request(node_id, round_transcript)


def recording_train(calls: list[tuple[int, str]]) -> TrainFn:
    def train(msg: Message, context: Context) -> Message:
        calls.append((context.node_id, msg.metadata.group_id))
        return honest_train(msg, context)

    return train


@pytest.mark.parametrize(
    "verification",
    [REPORT, dataclasses.replace(REPORT, pipelined=True)],
    ids=["separate", "pipelined"],
)
def test_client_refuses_training_after_failed_verification(
    monkeypatch: pytest.MonkeyPatch, verification: VerificationConfig
) -> None:
    replace_verifier(monkeypatch, OtherRoundForOne)
    victim = OtherRoundForOne.victim
    calls: list[tuple[int, str]] = []
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(recording_train(calls)), NODE_IDS)

    run(grid, verification=verification, rounds=2, reports=reports)

    assert reports[0].verified is False
    assert reports[0].verification_reason.startswith(f"node {victim} reports")
    assert (victim, "2") not in calls
    assert len([call for call in calls if call[1] == "2"]) == NUM_NODES - 1
    reason = error_reasons(grid, 2)[victim]
    assert "does not train on this model: round 1 failed" in reason
    assert reports[1].dropped_by_stage["masked-input"] == 1
    assert reports[1].verified is True


@pytest.mark.parametrize("key_lifetime", KEY_LIFETIMES)
def test_hostile_other_run_id_keeps_failure(
    monkeypatch: pytest.MonkeyPatch, key_lifetime: str
) -> None:
    replace_verifier(monkeypatch, OtherRoundForOne)
    victim = OtherRoundForOne.victim
    calls: list[tuple[int, str]] = []

    def other_run_in_round_two(node: int, stage: str, message: Message) -> object:
        fields = message.content.config_records.get(PROTOCOL_RECORD)
        if node == victim and fields is not None and fields["server-round"] == 2:
            fields["run-id"] = (message.metadata.run_id + 1).to_bytes(8, "big")
        return None

    grid = LoopbackGrid(
        make_app(recording_train(calls)), NODE_IDS, fault=other_run_in_round_two
    )

    run(grid, verification=REPORT, rounds=2, key_lifetime=key_lifetime)

    assert (victim, "2") not in calls
    reason = error_reasons(grid, 2)[victim]
    assert f"must be for this client's Flower run {grid.run_id}" in reason
    state = grid.context_of(victim).state.config_records[VERIFICATION_STATE_RECORD]
    assert state["failed-round"] == 1


def test_report_policy_client_keeps_training(monkeypatch: pytest.MonkeyPatch) -> None:
    replace_verifier(monkeypatch, OtherRoundForOne)
    calls: list[tuple[int, str]] = []
    mod = make_secure_aggregation_mod(on_verification_failure="report")
    grid = LoopbackGrid(make_app(recording_train(calls), mod=mod), NODE_IDS)

    run(grid, verification=REPORT, rounds=2)

    assert (OtherRoundForOne.victim, "2") in calls


def test_client_without_transcript_refuses_next_round() -> None:
    victim = NODE_IDS[4]

    def fault(node: int, name: str, msg: Message) -> object:
        withheld = node == victim and name == "verify"
        return "drop" if withheld and msg.metadata.group_id == "1" else None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, rounds=2, reports=reports)

    assert reports[0].verified is True
    assert reports[0].dropped_by_stage["verify"] == 1
    assert "no transcript arrived" in error_reasons(grid, 2)[victim]
    assert reports[1].num_aggregated == NUM_NODES - 1


def test_require_verification_refuses_unverified_round() -> None:
    mod = make_secure_aggregation_mod(require_verification=True)
    grid = LoopbackGrid(make_app(mod=mod), NODE_IDS)

    with pytest.raises(TooFewSurvivorsError):
        run(grid, verification=False)

    reasons = error_reasons(grid, 1)
    assert set(reasons) == set(NODE_IDS)
    assert all("requires verification" in text for text in reasons.values())


def test_plain_mod_refuses_after_failed_verification(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replace_verifier(monkeypatch, OtherRoundForOne)
    reports: list[RoundReport] = []
    mod = make_plain_verification_mod()
    grid = LoopbackGrid(make_app(secure=False, mod=mod), NODE_IDS)

    run(
        grid,
        verification=dataclasses.replace(plain_config(), on_failure="report"),  # type: ignore[arg-type]
        secure=False,
        rounds=2,
        reports=reports,
    )

    assert "round 1 failed verification" in error_reasons(grid, 2)[NODE_IDS[2]]
    assert reports[1].num_aggregated == NUM_NODES - 1


@pytest.mark.parametrize("report_timings", [False, True])
def test_plain_mod_sends_timings_only_when_asked(report_timings: bool) -> None:
    reports: list[RoundReport] = []
    mod = make_plain_verification_mod(report_timings=report_timings)
    grid = LoopbackGrid(make_app(secure=False, mod=mod), NODE_IDS)

    run(grid, verification=plain_config(), secure=False, reports=reports)

    sent = set(CLIENT_TIMING_METRICS) & set(reports[0].train_metrics)
    assert reports[0].verified is True
    assert sent == ({"fedsec.client-train-seconds"} if report_timings else set())


def test_timings_option_must_be_bool() -> None:
    with pytest.raises(ValueError, match="report_timings must be True or False"):
        make_secure_aggregation_mod(report_timings="yes")  # type: ignore[arg-type]


# --- Messages a hostile server could send --------------------------------------


def deliver(
    grid: LoopbackGrid, node: int, stage: Stage, fields: Mapping[str, object]
) -> Message:
    header = RoundHeader(stage=stage, run_id=grid.run_id, server_round=1)
    content = RecordDict(
        {PROTOCOL_RECORD: ConfigRecord({**header.to_fields(), **fields})}  # type: ignore[dict-item]
    )
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    reply = grid._deliver(Message(content, node, MessageType.TRAIN, group_id="1"))
    assert reply is not None
    return reply


def test_hostile_plain_input_request_rejected_by_secure_mod() -> None:
    calls: list[tuple[int, str]] = []
    grid = LoopbackGrid(make_app(recording_train(calls)), NODE_IDS)

    reply = deliver(grid, NODE_IDS[0], Stage.PLAIN_INPUT, {})

    assert reply.has_error()
    assert "in clear" in (reply.error.reason or "")
    assert calls == []


def test_hostile_second_commit_request_rejected() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)
    run(grid)
    node = NODE_IDS[0]
    commit = next(
        m
        for m in grid.sent
        if stage_of(m) == "commit" and m.metadata.dst_node_id == node
    )

    replayed = grid._deliver(commit)

    assert replayed is not None
    assert replayed.has_error()
    assert "Commit requests for round 1 must follow" in (replayed.error.reason or "")


def test_blinding_deleted_after_commit() -> None:
    def fault(node: int, name: str, _: Message) -> object:
        return "drop" if name == "verify" else None

    grid = LoopbackGrid(make_app(), NODE_IDS)
    grid.fault = fault

    run(grid, verification=REPORT)

    # After the commit a client keeps no vector: not x_i or l_i, and not A,
    # which only the verify request carries.
    for node in NODE_IDS:
        state = _load_context(grid._contexts[node]).state
        assert VERIFICATION_ARRAYS_RECORD not in state.array_records, node


def test_invalid_key_list_signature_counts_as_dropped() -> None:
    cheat = NODE_IDS[1]

    def fault(node: int, name: str, _: Message) -> object:
        if node != cheat or name != "share-keys":
            return None

        def corrupt(reply: Message) -> Message:
            record = reply.content[PROTOCOL_RECORD]
            signature = record["key-list-signature"]
            record["key-list-signature"] = bytes([signature[0] ^ 1]) + signature[1:]
            return reply

        return corrupt

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, reports=reports)

    assert reports[0].dropped_by_stage["share-keys"] == 1
    assert reports[0].verified is True


# --- Offline audit ---------------------------------------------------------------


def run_auditor(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsec_flwr.audit", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def honest_audit_file(tmp_path: Path) -> Path:
    audit_path = tmp_path / "audit.json"
    grid = LoopbackGrid(make_app(), NODE_IDS)
    run(grid, verification=VerificationConfig(audit_path=audit_path), rounds=2)
    return audit_path


def test_honest_audit_file_passes_auditor(tmp_path: Path) -> None:
    audit_path = honest_audit_file(tmp_path)

    completed = run_auditor(audit_path)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "2 of 2 entries verified, 0 discarded" in completed.stdout


def test_tampered_audit_file_fails_auditor(tmp_path: Path) -> None:
    audit_path = honest_audit_file(tmp_path)
    document = json.loads(audit_path.read_text())
    entry = document["rounds"][1]
    aggregate = np.frombuffer(bytes.fromhex(entry["aggregate_hex"]), dtype="<u4")
    aggregate = aggregate.astype(np.uint32)
    aggregate[0] += np.uint32(1)
    entry["aggregate_hex"] = aggregate.astype("<u4").tobytes().hex()
    entry["transcript"]["aggregate_sha256"] = commitments.aggregate_digest(
        aggregate
    ).hex()
    audit_path.write_text(json.dumps(document))

    completed = run_auditor(audit_path)

    assert completed.returncode == 1
    assert "round 1: verified" in completed.stdout
    # The signatures cover the projection seed, which hashes the aggregate.
    assert "round 2: FAILED: a commitment signature is not valid" in completed.stdout
