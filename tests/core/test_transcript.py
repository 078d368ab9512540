import dataclasses
import json
import random
import re
from dataclasses import dataclass, field

import nacl.bindings as sodium
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsec_flwr.core import commitments as c
from fedsec_flwr.core import signatures as s
from fedsec_flwr.core import transcript as t
from fedsec_flwr.core.errors import ProtocolError
from fedsec_flwr.core.messages import CommitRequest

RUN_ID = 2**64 - 3
# y = -1 mod 2**255 - 19: the Ed25519 point of order 2.
ORDER_TWO_POINT = bytes.fromhex(
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"
)
NODE_IDS = (2**63 + 1, 17, 2**40)
MODEL_SHA256 = bytes(range(32))
OTHER_MODEL_SHA256 = bytes(range(1, 33))
SETTINGS_SHA256 = bytes(range(2, 34))
OTHER_SETTINGS_SHA256 = bytes(range(3, 35))


@dataclass
class SimulatedRound:
    """One round of the protocol between honest clients and a chosen server."""

    run_id: int
    server_round: int
    private_keys: dict[int, Ed25519PrivateKey]
    updates: dict[int, np.ndarray]
    blindings: dict[int, np.ndarray]
    key_list_digests: dict[int, bytes]
    aggregate: np.ndarray
    transcript: t.RoundTranscript
    own_commitments: dict[int, int] = field(default_factory=dict)
    model_digests: dict[int, bytes] = field(default_factory=dict)
    settings_digests: dict[int, bytes] = field(default_factory=dict)

    @property
    def public_keys(self) -> dict[int, bytes]:
        return {
            node_id: s.identity_public_bytes(key)
            for node_id, key in self.private_keys.items()
        }

    def verify_as(self, node_id: int, **changes) -> t.AuditResult:
        """Run the client check of `node_id`; `as_node` overrides the id alone."""
        arguments = {
            "transcript": self.transcript,
            "aggregate": self.aggregate,
            "run_id": self.run_id,
            "server_round": self.server_round,
            "node_id": node_id,
            "identity_public_key": self.public_keys[node_id],
            "key_list_digest": self.key_list_digests[node_id],
            "commitment": self.own_commitments[node_id],
            "model_sha256": self.model_digests.get(node_id, MODEL_SHA256),
            "settings_sha256": self.settings_digests.get(node_id, SETTINGS_SHA256),
        }
        if "as_node" in changes:
            changes["node_id"] = changes.pop("as_node")
        arguments.update(changes)
        transcript = arguments.pop("transcript")
        aggregate = arguments.pop("aggregate")
        return t.verify_round_as_client(transcript, aggregate, **arguments)


def build_round(
    *,
    server_round: int = 1,
    d: int = 500,
    seed: int = 0,
    private_keys: dict[int, Ed25519PrivateKey] | None = None,
    included: tuple[int, ...] = NODE_IDS,
    summed: tuple[int, ...] | None = None,
    substitutes: dict[int, np.ndarray] | None = None,
    aggregate_offset: np.ndarray | None = None,
    blinding_sums_offset: np.ndarray | None = None,
    forged_key_lists: dict[int, dict[int, bytes]] | None = None,
    model_digests: dict[int, bytes] | None = None,
    settings_digests: dict[int, bytes] | None = None,
) -> SimulatedRound:
    """Run a round in which the server may cheat.

    `summed` are the clients whose updates the server adds (default: the
    included ones), `substitutes` replaces some of those updates,
    `aggregate_offset` and `blinding_sums_offset` are added to the released
    aggregate and limb sums, and
    `forged_key_lists` is the key list the server shows to some clients.
    `model_digests` is the digest of the model the server sends some
    clients; the others, and the transcript, get `MODEL_SHA256`.
    `settings_digests` does the same for the settings digest.
    """
    rng = np.random.default_rng(seed)
    draw = random.Random(seed).randbytes
    if private_keys is None:
        private_keys = {node_id: s.generate_identity_key() for node_id in NODE_IDS}
    public_keys = {
        node_id: s.identity_public_bytes(key) for node_id, key in private_keys.items()
    }
    forged_key_lists = forged_key_lists or {}

    digests, key_list_signatures = {}, {}
    for node_id, key in private_keys.items():
        digests[node_id], key_list_signatures[node_id] = t.sign_key_list(
            key,
            run_id=RUN_ID,
            server_round=server_round,
            identity_keys=forged_key_lists.get(node_id, public_keys),
        )

    updates = {
        node_id: rng.integers(0, 2**28, size=d, dtype=np.uint32) for node_id in NODE_IDS
    }
    blindings = {node_id: c.draw_blinding(random_bytes=draw) for node_id in NODE_IDS}
    summed_updates = dict(updates)
    summed_updates.update(substitutes or {})

    aggregate = np.zeros(d, dtype=np.uint32)
    limb_sums = np.zeros(c.BLINDING_LIMBS, dtype=np.uint32)
    for node_id in included if summed is None else summed:
        aggregate += summed_updates[node_id]
        limb_sums += blindings[node_id]
    if aggregate_offset is not None:
        aggregate += aggregate_offset
    if blinding_sums_offset is not None:
        limb_sums += blinding_sums_offset

    own_commitments, commitment_signatures = {}, {}
    for node_id in included:
        own_commitments[node_id], commitment_signatures[node_id] = t.client_commit(
            private_keys[node_id],
            run_id=RUN_ID,
            server_round=server_round,
            node_id=node_id,
            update=updates[node_id],
            blinding=blindings[node_id],
            included_node_ids=included,
            aggregate_length=aggregate.size,
            aggregate_sha256=c.aggregate_digest(aggregate),
            blinding_sums=limb_sums,
            key_list_digest=digests[node_id],
            model_sha256=(model_digests or {}).get(node_id, MODEL_SHA256),
            settings_sha256=(settings_digests or {}).get(node_id, SETTINGS_SHA256),
        )

    transcript = t.RoundTranscript(
        run_id=RUN_ID,
        server_round=server_round,
        included_node_ids=included,
        identity_keys=public_keys,
        key_list_signatures=key_list_signatures,
        aggregate_length=d,
        aggregate_sha256=c.aggregate_digest(aggregate),
        model_sha256=MODEL_SHA256,
        settings_sha256=SETTINGS_SHA256,
        blinding_sums=tuple(limb_sums.tolist()),
        commitments=own_commitments,
        commitment_signatures=commitment_signatures,
    )
    return SimulatedRound(
        run_id=RUN_ID,
        server_round=server_round,
        private_keys=private_keys,
        updates=updates,
        blindings=blindings,
        key_list_digests=digests,
        aggregate=aggregate,
        transcript=transcript,
        own_commitments=own_commitments,
        model_digests=dict(model_digests or {}),
        settings_digests=dict(settings_digests or {}),
    )


def replace(transcript: t.RoundTranscript, **changes) -> t.RoundTranscript:
    return dataclasses.replace(transcript, **changes)


@pytest.fixture(scope="module")
def honest() -> SimulatedRound:
    return build_round()


# Honest rounds


def test_honest_round_passes_audit(honest):
    assert t.audit_round(honest.transcript, honest.aggregate) == t.AuditResult(True)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_honest_round_passes_client_check(honest, node_id):
    assert honest.verify_as(node_id) == t.AuditResult(True)


def test_honest_round_with_dropped_client_passes():
    # The third client signed the key list but dropped before its masked
    # input: it stays in the key list, outside S.
    simulated = build_round(included=NODE_IDS[:2], seed=3)

    assert t.audit_round(simulated.transcript, simulated.aggregate).verified
    assert simulated.verify_as(NODE_IDS[0]).verified


def test_audit_passes_on_memory_mapped_aggregate(honest, tmp_path):
    np.save(tmp_path / "aggregate.npy", honest.aggregate)
    mapped = np.load(tmp_path / "aggregate.npy", mmap_mode="r")

    assert t.audit_round(honest.transcript, mapped).verified


# Serialization


def test_json_round_trip(honest):
    text = honest.transcript.to_json()

    assert t.RoundTranscript.from_json(text) == honest.transcript


def test_json_is_canonical_whatever_the_insertion_order(honest):
    transcript = honest.transcript
    reordered = replace(
        transcript,
        included_node_ids=tuple(reversed(transcript.included_node_ids)),
        identity_keys=dict(reversed(list(transcript.identity_keys.items()))),
        commitments=dict(reversed(list(transcript.commitments.items()))),
        commitment_signatures=dict(
            reversed(list(transcript.commitment_signatures.items()))
        ),
    )

    assert reordered.to_json() == transcript.to_json()
    assert t.audit_round(reordered, honest.aggregate).verified


def test_json_encodes_bytes_and_big_ints(honest):
    data = json.loads(honest.transcript.to_json())
    node_id = str(NODE_IDS[0])

    assert data["format"] == t.TRANSCRIPT_FORMAT
    assert data["run_id"] == str(RUN_ID)
    assert data["blinding_sums"] == list(honest.transcript.blinding_sums)
    assert data["commitments"][node_id] == honest.own_commitments[NODE_IDS[0]].hex()
    assert (
        bytes.fromhex(data["identity_keys"][node_id])
        == (honest.public_keys[NODE_IDS[0]])
    )
    assert sorted(data["included_node_ids"], key=int) == [
        str(i) for i in sorted(NODE_IDS)
    ]


def test_json_has_no_whitespace(honest):
    text = honest.transcript.to_json()

    assert " " not in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda data: data.pop("blinding_sums"), "blinding_sums must be a JSON list"),
        (lambda data: data.update(format="other/v1"), "format must be"),
        (lambda data: data.update(extra=1), "only known fields"),
        (lambda data: data.update(run_id=5), "run_id must be a JSON str"),
        (lambda data: data.update(run_id="0x10"), "decimal strings"),
        (lambda data: data.update(run_id="007"), "without leading zeros"),
        (lambda data: data.update(run_id=str(2**64)), "run_id must be between"),
        (
            lambda data: data.update(server_round=True),
            "server_round must be a JSON int",
        ),
        (lambda data: data.update(aggregate_sha256="zz"), "hex strings"),
        (lambda data: data.update(aggregate_sha256="AB" * 32), "lowercase hex"),
        (lambda data: data.update(aggregate_sha256="ab " * 32), "lowercase hex"),
        (lambda data: data.update(aggregate_sha256="abc"), "whole bytes"),
        (lambda data: data.update(run_id="1" * 5000), "at most 20 digits"),
        (lambda data: data.update(aggregate_sha256="00"), "32 bytes long"),
        (
            lambda data: data.update(model_sha256="00" * 33),
            "model_sha256 must be 32 bytes long. Found 33 bytes",
        ),
        (lambda data: data.pop("model_sha256"), "model_sha256 must be a JSON str"),
        (
            lambda data: data.update(settings_sha256="ab"),
            "settings_sha256 must be 32 bytes long. Found 1 bytes",
        ),
        (
            lambda data: data["blinding_sums"].__setitem__(0, 2**32),
            "blinding_sums value must be between 0 and 4294967295",
        ),
        (
            lambda data: data["blinding_sums"].__setitem__(0, "1"),
            "blinding_sums value must be an int",
        ),
        (
            lambda data: data["blinding_sums"].pop(),
            "blinding_sums must have 256 values",
        ),
        (lambda data: data.update(aggregate_length=-1), "aggregate_length must be"),
        (
            lambda data: data["commitments"].update({"5": "00" * 31}),
            "commitments entry of node 5 must be 32 bytes long. Found 31 bytes",
        ),
        (
            lambda data: data["identity_keys"].update({"5": "00"}),
            "identity_keys entry of node 5 must be 32 bytes",
        ),
        (
            lambda data: data["commitment_signatures"].update({"5": "00" * 63}),
            "commitment_signatures entry of node 5 must be 64 bytes",
        ),
        (
            lambda data: data.update(included_node_ids=["1", "1"]),
            "must be distinct",
        ),
    ],
)
def test_from_json_rejects_malformed_fields(honest, edit, message):
    data = json.loads(honest.transcript.to_json())
    edit(data)

    with pytest.raises(ValueError, match=message):
        t.RoundTranscript.from_json(json.dumps(data))


def test_from_json_rejects_non_object():
    with pytest.raises(ValueError, match="transcript must be an object"):
        t.RoundTranscript.from_json("[]")


def test_from_json_rejects_repeated_key(honest):
    text = honest.transcript.to_json()
    repeated = text.replace(
        '{"aggregate_length"', '{"run_id":"8","aggregate_length"', 1
    )

    with pytest.raises(ValueError, match=r"must not repeat a key\. Found 'run_id'"):
        t.RoundTranscript.from_json(repeated)


def test_from_json_rejects_deep_nesting():
    with pytest.raises(ValueError, match="nests too deeply"):
        t.RoundTranscript.from_json("[" * 100_000 + "]" * 100_000)


def test_from_json_names_field_of_huge_integer(honest):
    text = honest.transcript.to_json()
    huge = text.replace('"server_round":1', '"server_round":' + "9" * 5000, 1)

    with pytest.raises(ValueError) as raised:
        t.RoundTranscript.from_json(huge)

    assert str(raised.value) == (
        "server_round is an integer of 5000 digits (9999999999...), above the "
        "largest accepted 18446744073709551615."
    )


# Client helpers


def test_client_commit_rejects_client_outside_included(honest):
    node_id = NODE_IDS[0]

    with pytest.raises(ProtocolError, match=f"node {node_id} must be among"):
        t.client_commit(
            honest.private_keys[node_id],
            run_id=RUN_ID,
            server_round=1,
            node_id=node_id,
            update=honest.updates[node_id],
            blinding=honest.blindings[node_id],
            included_node_ids=NODE_IDS[1:],
            aggregate_length=honest.aggregate.size,
            aggregate_sha256=c.aggregate_digest(honest.aggregate),
            blinding_sums=honest.transcript.blinding_sum_array,
            key_list_digest=honest.key_list_digests[node_id],
            model_sha256=MODEL_SHA256,
            settings_sha256=SETTINGS_SHA256,
        )


def test_client_commit_rejects_aggregate_of_other_length(honest):
    node_id = NODE_IDS[0]

    with pytest.raises(ProtocolError, match="must have 500 values like the update"):
        t.client_commit(
            honest.private_keys[node_id],
            run_id=RUN_ID,
            server_round=1,
            node_id=node_id,
            update=honest.updates[node_id],
            blinding=honest.blindings[node_id],
            included_node_ids=NODE_IDS,
            aggregate_length=honest.aggregate.size + 1,
            aggregate_sha256=c.aggregate_digest(honest.aggregate),
            blinding_sums=honest.transcript.blinding_sum_array,
            key_list_digest=honest.key_list_digests[node_id],
            model_sha256=MODEL_SHA256,
            settings_sha256=SETTINGS_SHA256,
        )


def commit_with(honest, **changes):
    node_id = NODE_IDS[0]
    arguments = {
        "run_id": RUN_ID,
        "server_round": 1,
        "node_id": node_id,
        "update": honest.updates[node_id],
        "blinding": honest.blindings[node_id],
        "included_node_ids": NODE_IDS,
        "aggregate_length": honest.aggregate.size,
        "aggregate_sha256": c.aggregate_digest(honest.aggregate),
        "blinding_sums": honest.transcript.blinding_sum_array,
        "key_list_digest": honest.key_list_digests[node_id],
        "model_sha256": MODEL_SHA256,
        "settings_sha256": SETTINGS_SHA256,
    }
    arguments.update(changes)
    return t.client_commit(honest.private_keys[node_id], **arguments)


@pytest.mark.parametrize("count", [0, 1, 255, 257])
def test_client_commit_rejects_wrong_limb_sum_count(honest, count):
    sums = np.zeros(count, dtype=np.uint32)

    with pytest.raises(ProtocolError, match=f"must have 256 values.*Found {count}"):
        commit_with(honest, blinding_sums=sums)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"included_node_ids": None}, "included_node_ids must be a sequence"),
        ({"aggregate_length": "500"}, "aggregate_length must be an int"),
        ({"aggregate_length": -1}, "aggregate_length must be between"),
        ({"blinding": None}, "blinding must be a numpy array"),
    ],
)
def test_client_commit_rejects_malformed_arguments(honest, changes, message):
    with pytest.raises(ValueError, match=message):
        commit_with(honest, **changes)


def test_audit_checks_length_before_hashing(honest, monkeypatch):
    def fail(aggregate):
        raise AssertionError("the aggregate was hashed")

    monkeypatch.setattr(c, "aggregate_digest", fail)
    result = t.audit_round(honest.transcript, np.zeros(7, dtype=np.uint32))

    assert result.reason == "the aggregate has 7 values, not the 500 of the transcript"


def test_commitment_payload_encoding():
    commitment = bytes(range(32))

    payload = t.commitment_payload(
        node_id=258,
        commitment=commitment,
        rho_seed=bytes(32),
        model_sha256=MODEL_SHA256,
        settings_sha256=SETTINGS_SHA256,
    )

    assert payload == (
        (258).to_bytes(8, "big")
        + commitment
        + bytes(32)
        + MODEL_SHA256
        + SETTINGS_SHA256
    )


@pytest.mark.parametrize("size", [0, 31, 33])
def test_commitment_payload_rejects_model_digest_size(size):
    with pytest.raises(
        ValueError, match=f"model_sha256 must be 32 bytes long. Found {size}"
    ):
        t.commitment_payload(
            node_id=258,
            commitment=bytes(range(32)),
            rho_seed=bytes(32),
            model_sha256=bytes(size),
            settings_sha256=SETTINGS_SHA256,
        )


@pytest.mark.parametrize("size", [0, 31, 33])
def test_commitment_payload_rejects_settings_digest_size(size):
    with pytest.raises(
        ValueError, match=f"settings_sha256 must be 32 bytes long. Found {size}"
    ):
        t.commitment_payload(
            node_id=258,
            commitment=bytes(range(32)),
            rho_seed=bytes(32),
            model_sha256=MODEL_SHA256,
            settings_sha256=bytes(size),
        )


def test_hostile_split_settings_detected():
    # One client trained with other settings, for example a learning rate
    # of 0 for all but a victim, so that the sum isolates the victim.
    odd = NODE_IDS[0]
    split = build_round(settings_digests={odd: OTHER_SETTINGS_SHA256})

    assert t.audit_round(split.transcript, split.aggregate) == t.AuditResult(
        False, "a commitment signature is not valid"
    )
    assert split.verify_as(odd) == t.AuditResult(
        False,
        "the transcript names other settings than the ones this client trained with",
    )


def test_hostile_split_model_detected():
    # The server sends one client another model and names the others' model
    # in the transcript: that client's signature covers another digest.
    victim = NODE_IDS[1]
    split = build_round(model_digests={victim: OTHER_MODEL_SHA256})

    assert t.audit_round(split.transcript, split.aggregate) == t.AuditResult(
        False, "a commitment signature is not valid"
    )
    assert split.verify_as(victim) == t.AuditResult(
        False,
        "the transcript names another model than the one this client trained on",
    )
    for node_id in set(NODE_IDS) - {victim}:
        assert not split.verify_as(node_id).verified


def test_hostile_transcript_names_victims_model():
    # The transcript names the victim's model instead: now every other
    # client finds another model named.
    victim = NODE_IDS[1]
    split = build_round(model_digests={victim: OTHER_MODEL_SHA256})
    renamed = replace(split.transcript, model_sha256=OTHER_MODEL_SHA256)
    split.transcript = renamed

    for node_id in set(NODE_IDS) - {victim}:
        assert split.verify_as(node_id) == t.AuditResult(
            False,
            "the transcript names another model than the one this client trained on",
        )


# Hostile servers


def test_tamper_aggregate_shown_to_clients_detected():
    offset = np.zeros(500, dtype=np.uint32)
    offset[123] = 1
    simulated = build_round(aggregate_offset=offset, seed=4)

    result = t.audit_round(simulated.transcript, simulated.aggregate)

    assert result == t.AuditResult(False, c._SUM_MISMATCH)
    assert not simulated.verify_as(NODE_IDS[1]).verified


def test_tamper_aggregate_changed_after_commitments(honest):
    aggregate = honest.aggregate.copy()
    aggregate[0] += 1
    transcript = replace(
        honest.transcript, aggregate_sha256=c.aggregate_digest(aggregate)
    )

    result = t.audit_round(transcript, aggregate)

    assert result == t.AuditResult(False, "a commitment signature is not valid")


def test_tamper_aggregate_file_swapped(honest):
    aggregate = honest.aggregate.copy()
    aggregate[-1] ^= 1

    result = t.audit_round(honest.transcript, aggregate)

    assert result.reason == "the aggregate does not match the SHA-256 of the transcript"


def test_tamper_aggregate_of_other_length(honest):
    result = t.audit_round(honest.transcript, honest.aggregate[:-1])

    assert (
        result.reason == "the aggregate has 499 values, not the 500 of the transcript"
    )


def test_tamper_malformed_aggregate(honest):
    result = t.audit_round(honest.transcript, honest.aggregate.astype(np.int64))

    assert result.reason.startswith("the aggregate is malformed")


def test_tamper_surviving_client_excluded_but_summed():
    # The server sums all three updates but claims the third client dropped.
    simulated = build_round(included=NODE_IDS[:2], summed=NODE_IDS, seed=5)

    assert not t.audit_round(simulated.transcript, simulated.aggregate).verified


def test_tamper_included_update_dropped_from_sum():
    simulated = build_round(summed=NODE_IDS[1:], seed=6)

    assert not t.audit_round(simulated.transcript, simulated.aggregate).verified


def test_tamper_substituted_update_detected():
    substitute = np.full(500, 9, dtype=np.uint32)
    simulated = build_round(substitutes={NODE_IDS[2]: substitute}, seed=7)

    assert not t.audit_round(simulated.transcript, simulated.aggregate).verified


def test_tamper_previous_round_transcript_replayed(honest):
    # The old transcript is valid for its own round, so only a client that
    # knows the current round can reject it.
    current = build_round(server_round=2, private_keys=honest.private_keys, seed=8)

    result = current.verify_as(NODE_IDS[0], transcript=honest.transcript)

    assert t.audit_round(honest.transcript, honest.aggregate).verified
    assert result == t.AuditResult(False, "the transcript is for another round")


def test_tamper_previous_round_aggregate_replayed(honest):
    current = build_round(server_round=2, private_keys=honest.private_keys, seed=9)
    transcript = replace(
        current.transcript,
        aggregate_sha256=honest.transcript.aggregate_sha256,
    )

    result = current.verify_as(
        NODE_IDS[0], transcript=transcript, aggregate=honest.aggregate
    )

    assert not result.verified


def test_tamper_previous_round_commitments_replayed(honest):
    current = build_round(server_round=2, private_keys=honest.private_keys, seed=10)
    transcript = replace(
        current.transcript,
        commitments=honest.transcript.commitments,
        commitment_signatures=honest.transcript.commitment_signatures,
    )

    result = t.audit_round(transcript, current.aggregate)

    assert result == t.AuditResult(False, "a commitment signature is not valid")


def test_tamper_blinding_sums_changed(honest):
    sums = list(honest.transcript.blinding_sums)
    sums[3] += 1

    result = t.audit_round(
        replace(honest.transcript, blinding_sums=tuple(sums)), honest.aggregate
    )

    assert result == t.AuditResult(False, "a commitment signature is not valid")


def test_tamper_blinding_sums_shown_to_clients_detected():
    offset = np.zeros(c.BLINDING_LIMBS, dtype=np.uint32)
    offset[0] = 1
    simulated = build_round(blinding_sums_offset=offset, seed=12)

    result = t.audit_round(simulated.transcript, simulated.aggregate)

    assert result == t.AuditResult(False, c._SUM_MISMATCH)


def test_tamper_commitments_swapped_between_clients(honest):
    first, second = NODE_IDS[:2]
    commitments = dict(honest.transcript.commitments)
    commitments[first], commitments[second] = commitments[second], commitments[first]
    signatures = dict(honest.transcript.commitment_signatures)
    signatures[first], signatures[second] = signatures[second], signatures[first]
    transcript = replace(
        honest.transcript, commitments=commitments, commitment_signatures=signatures
    )

    result = t.audit_round(transcript, honest.aggregate)

    assert result == t.AuditResult(False, "a commitment signature is not valid")


def test_tamper_commitment_signature_forged(honest):
    node_id = NODE_IDS[1]
    signatures = dict(honest.transcript.commitment_signatures)
    signatures[node_id] = bytes([signatures[node_id][0] ^ 1]) + signatures[node_id][1:]

    result = t.audit_round(
        replace(honest.transcript, commitment_signatures=signatures), honest.aggregate
    )

    assert result == t.AuditResult(False, "a commitment signature is not valid")


def test_tamper_commitment_signed_by_server_key(honest):
    # The server swaps in a key of its own for one client, in one view only.
    node_id = NODE_IDS[2]
    server_key = s.generate_identity_key()
    identity_keys = dict(honest.transcript.identity_keys)
    identity_keys[node_id] = s.identity_public_bytes(server_key)

    result = t.audit_round(
        replace(honest.transcript, identity_keys=identity_keys), honest.aggregate
    )

    assert result == t.AuditResult(False, "a key-list signature is not valid")


def test_hostile_split_view_detected_by_client():
    # The server shows the first client a key list in which the third
    # client's key is the server's.
    private_keys = {node_id: s.generate_identity_key() for node_id in NODE_IDS}
    forged = {
        node_id: s.identity_public_bytes(key) for node_id, key in private_keys.items()
    }
    forged[NODE_IDS[2]] = s.identity_public_bytes(s.generate_identity_key())
    simulated = build_round(
        private_keys=private_keys, forged_key_lists={NODE_IDS[0]: forged}, seed=11
    )

    first = simulated.verify_as(NODE_IDS[0])
    second = simulated.verify_as(NODE_IDS[1])

    assert first == t.AuditResult(
        False, "the key list differs from the one this client signed"
    )
    assert second == t.AuditResult(False, "a key-list signature is not valid")


def test_tamper_commitment_outside_subgroup(honest):
    # A client whose software is broken signs a point of order 2q.
    node_id = NODE_IDS[0]
    bad = sodium.crypto_core_ed25519_add(
        honest.own_commitments[node_id], ORDER_TWO_POINT
    )
    rho_seed = honest.transcript.projection_seed(honest.aggregate)
    signature = s.sign(
        honest.private_keys[node_id],
        run_id=RUN_ID,
        server_round=1,
        stage=s.SignedStage.COMMITMENT,
        payload=t.commitment_payload(
            node_id=node_id,
            commitment=bad,
            rho_seed=rho_seed,
            model_sha256=MODEL_SHA256,
            settings_sha256=SETTINGS_SHA256,
        ),
    )
    transcript = replace(
        honest.transcript,
        commitments={**honest.transcript.commitments, node_id: bad},
        commitment_signatures={
            **honest.transcript.commitment_signatures,
            node_id: signature,
        },
    )

    result = t.audit_round(transcript, honest.aggregate)

    assert result == t.AuditResult(
        False, f"the commitment of node {node_id} is not a group element"
    )


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"included_node_ids": ()}, "no client is included"),
        (
            {"commitments": {}},
            "the signed commitments differ from the committed clients",
        ),
        (
            {"commitment_signatures": {}},
            "the signed commitments differ from the committed clients",
        ),
        ({"key_list_signatures": {}}, "an included client did not sign the key list"),
        ({"identity_keys": {}}, "an included client has no identity key"),
    ],
)
def test_tamper_missing_entries(honest, edit, reason):
    result = t.audit_round(replace(honest.transcript, **edit), honest.aggregate)

    assert result == t.AuditResult(False, reason)


def test_tamper_key_list_signature_from_outsider(honest):
    signatures = {**honest.transcript.key_list_signatures, 99: bytes(64)}

    result = t.audit_round(
        replace(honest.transcript, key_list_signatures=signatures), honest.aggregate
    )

    assert (
        result.reason == "a key-list signature comes from a client outside the key list"
    )


def test_tamper_extra_commitment_from_outsider(honest):
    outsider = NODE_IDS[0] + 1
    result = t.audit_round(
        replace(
            honest.transcript,
            commitments={**honest.transcript.commitments, outsider: bytes(32)},
        ),
        honest.aggregate,
    )

    assert result.reason == "a client outside the included clients committed"


def without_commitment(
    transcript: t.RoundTranscript, node_id: int
) -> t.RoundTranscript:
    return replace(
        transcript,
        commitments={k: v for k, v in transcript.commitments.items() if k != node_id},
        commitment_signatures={
            k: v for k, v in transcript.commitment_signatures.items() if k != node_id
        },
    )


def test_missing_commitment_discards_round(honest):
    # A client that dropped out after its input leaves its update in the
    # aggregate with no commitment: the aggregate cannot be checked.
    transcript = without_commitment(honest.transcript, NODE_IDS[1])

    result = t.audit_round(transcript, honest.aggregate)

    assert result.discarded
    assert not result.verified
    assert result.reason.startswith(f"1 of {len(NODE_IDS)} included clients did not")
    assert t.missing_commitments(transcript) == {NODE_IDS[1]}


def test_tamper_discarded_round_still_checks_signatures(honest):
    transcript = without_commitment(honest.transcript, NODE_IDS[1])
    signatures = dict(transcript.commitment_signatures)
    signatures[NODE_IDS[0]] = bytes(64)

    result = t.audit_round(
        replace(transcript, commitment_signatures=signatures), honest.aggregate
    )

    assert result == t.AuditResult(False, "a commitment signature is not valid")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"run_id": RUN_ID - 1}, "the transcript is for another run"),
        ({"server_round": 2}, "the transcript is for another round"),
        ({"as_node": 5}, "this client is not included"),
        ({"identity_public_key": bytes(32)}, "another identity key for this client"),
        ({"key_list_digest": bytes(32)}, "the key list differs"),
        ({"commitment": 4}, "another commitment for this client"),
    ],
)
def test_tamper_client_check_catches_own_entry(honest, change, reason):
    result = honest.verify_as(NODE_IDS[0], **change)

    assert not result.verified
    assert reason in result.reason


# The commit request, which carries the aggregate's digest in place of A


def commit_request_fields(**changes: object) -> dict[str, object]:
    request = CommitRequest(
        included_node_ids=(5, 2**63),
        blinding_sums=(1, 2**32 - 1),
        aggregate_length=2_000_000,
        aggregate_sha256=bytes(range(32)),
    )
    return {**request.to_fields(), **changes}


def test_commit_request_survives_record_round_trip():
    parsed = CommitRequest.from_fields(commit_request_fields())

    assert parsed.included_node_ids == (5, 2**63)
    assert parsed.blinding_sums == (1, 2**32 - 1)
    assert parsed.aggregate_length == 2_000_000
    assert parsed.aggregate_sha256 == bytes(range(32))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aggregate-length": -1}, "aggregate-length must be non-negative. Found -1"),
        ({"aggregate-sha256": bytes(31)}, "aggregate-sha256 must be 32 bytes"),
        ({"aggregate-sha256": "00" * 32}, "aggregate-sha256"),
    ],
)
def test_commit_request_rejects_malformed_digest_fields(changes, message):
    with pytest.raises(ProtocolError, match=re.escape(message)):
        CommitRequest.from_fields(commit_request_fields(**changes))
