import hashlib

import pytest

from fedsec_flwr.core import signatures as s
from fedsec_flwr.core.errors import AuthenticationError
from fedsec_flwr.core.messages import Stage

RUN_ID = 2**63 + 5
SERVER_ROUND = 4
PAYLOAD = b"digest of something"
FAILED = r"^Signature verification failed\.$"

FIXED_PRIVATE_KEY = bytes(range(32))
# Pinned outputs for FIXED_PRIVATE_KEY, run 1, round 2, stage "key-list" and
# payload b"abc". Ed25519 (RFC 8032) signatures are deterministic.
GOLDEN_SIGNATURE = (
    "b455e30324b5be6d110b7fada6f133865f17f0840a115dd06ca45d1e798e8a91"
    "cbf15dd6f51919d9b2083a27e79a13edb3e17c03793541b5da365951bea31a0e"
)
GOLDEN_KEY_LIST_DIGEST = (
    "22ffb4841d3611986a21cddbb744d2f119fa5b8628b0f393c3a134e14e730fab"
)


@pytest.fixture(scope="module")
def key():
    return s.generate_identity_key()


@pytest.fixture(scope="module")
def public_key(key):
    return s.identity_public_bytes(key)


def sign_default(key, **changes):
    arguments = {
        "run_id": RUN_ID,
        "server_round": SERVER_ROUND,
        "stage": s.SignedStage.COMMITMENT,
        "payload": PAYLOAD,
    }
    arguments.update(changes)
    return s.sign(key, **arguments)


def verify_default(public_key, signature, **changes):
    arguments = {
        "run_id": RUN_ID,
        "server_round": SERVER_ROUND,
        "stage": s.SignedStage.COMMITMENT,
        "payload": PAYLOAD,
    }
    arguments.update(changes)
    s.verify(public_key, signature, **arguments)


def test_signature_verifies(key, public_key):
    signature = sign_default(key)

    assert len(signature) == s.SIGNATURE_SIZE
    verify_default(public_key, signature)


def test_signed_message_encoding():
    expected = (
        (24).to_bytes(8, "big")
        + b"fedsec_flwr/signature/v1"
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + (8).to_bytes(8, "big")
        + b"key-list"
        + (3).to_bytes(8, "big")
        + b"abc"
    )

    message = s.signed_message(
        run_id=1, server_round=2, stage=s.SignedStage.KEY_LIST, payload=b"abc"
    )

    assert message == expected


def test_signature_matches_golden_value():
    key = s.load_identity_key(FIXED_PRIVATE_KEY)

    signature = s.sign(
        key, run_id=1, server_round=2, stage=s.SignedStage.KEY_LIST, payload=b"abc"
    )

    assert signature.hex() == GOLDEN_SIGNATURE


def test_stage_and_payload_boundary_is_unambiguous():
    first = s.signed_message(run_id=1, server_round=2, stage="ab", payload=b"c")
    second = s.signed_message(run_id=1, server_round=2, stage="a", payload=b"bc")

    assert first != second


def test_accepts_protocol_stage_enum(key, public_key):
    signature = sign_default(key, stage=Stage.SETUP)

    verify_default(public_key, signature, stage=Stage.SETUP)


def test_identity_key_round_trip(key, public_key):
    raw = s.identity_private_bytes(key)
    loaded = s.load_identity_key(raw)

    assert len(raw) == s.IDENTITY_KEY_SIZE
    assert s.identity_public_bytes(loaded) == public_key
    assert sign_default(loaded) == sign_default(key)


def test_load_identity_key_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"raw must be 32 bytes long\. Found 31 bytes"):
        s.load_identity_key(bytes(31))


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": RUN_ID + 1},
        {"server_round": SERVER_ROUND + 1},
        {"server_round": SERVER_ROUND - 1},
        {"stage": s.SignedStage.KEY_LIST},
        {"payload": PAYLOAD + b"\x00"},
        {"payload": b""},
    ],
)
def test_hostile_replay_in_other_context_rejected(key, public_key, change):
    signature = sign_default(key)

    with pytest.raises(AuthenticationError, match=FAILED):
        verify_default(public_key, signature, **change)


def test_hostile_signature_under_other_key_rejected(key):
    other = s.identity_public_bytes(s.generate_identity_key())

    with pytest.raises(AuthenticationError, match=FAILED):
        verify_default(other, sign_default(key))


@pytest.mark.parametrize(
    "forge",
    [
        lambda signature: bytes(64),
        lambda signature: signature[:-1] + bytes([signature[-1] ^ 1]),
        lambda signature: bytes([signature[0] ^ 0x80]) + signature[1:],
        lambda signature: signature[:63],
        lambda signature: signature + b"\x00",
        lambda signature: b"",
        lambda signature: signature.hex(),
    ],
)
def test_tamper_forged_signature_rejected(key, public_key, forge):
    signature = forge(sign_default(key))

    with pytest.raises(AuthenticationError, match=FAILED):
        verify_default(public_key, signature)


def test_verify_rejects_wrong_size_public_key(key):
    with pytest.raises(ValueError, match="public_key must be 32 bytes long"):
        verify_default(bytes(33), sign_default(key))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"run_id": -1}, "run_id must be a uint64"),
        ({"server_round": 2**64}, "server_round must be a uint64"),
        ({"stage": ""}, "stage must be a non-empty str"),
        ({"payload": "text"}, "payload must be bytes"),
    ],
)
def test_sign_rejects_malformed_input(key, change, message):
    with pytest.raises(ValueError, match=message):
        sign_default(key, **change)


# Key-list digests


def keys_of(count: int) -> dict[int, bytes]:
    return {
        node_id: hashlib.sha256(bytes([node_id])).digest() for node_id in range(count)
    }


def test_key_list_digest_matches_golden_value():
    digest = s.key_list_digest({2: bytes([2]) * 32, 1: bytes([1]) * 32})

    assert digest.hex() == GOLDEN_KEY_LIST_DIGEST


def test_key_list_digest_ignores_order():
    keys = keys_of(5)
    reordered = dict(reversed(list(keys.items())))

    assert s.key_list_digest(reordered) == s.key_list_digest(keys)


@pytest.mark.parametrize(
    "change",
    [
        lambda keys: keys.update({1: bytes(32)}),
        lambda keys: keys.update({99: bytes(32)}),
        lambda keys: keys.pop(0),
        lambda keys: keys.update({5: keys.pop(4)}),
    ],
)
def test_key_list_digest_binds_every_entry(change):
    keys = keys_of(5)
    original = s.key_list_digest(keys)

    change(keys)

    assert s.key_list_digest(keys) != original


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({}, "must not be empty"),
        ({1: bytes(31)}, "identity key of node 1 must be 32 bytes long"),
        ({-1: bytes(32)}, "node id must be a uint64"),
    ],
)
def test_key_list_digest_rejects_malformed_input(keys, message):
    with pytest.raises(ValueError, match=message):
        s.key_list_digest(keys)


def test_hostile_split_view_detected():
    # The server shows client 0 a list where client 2's key is its own. Client
    # 1 received the true list and checks client 0's key-list signature.
    private_keys = {node_id: s.generate_identity_key() for node_id in range(3)}
    true_keys = {
        node_id: s.identity_public_bytes(key) for node_id, key in private_keys.items()
    }
    forged_keys = dict(true_keys)
    forged_keys[2] = s.identity_public_bytes(s.generate_identity_key())
    signature_of_0 = s.sign(
        private_keys[0],
        run_id=RUN_ID,
        server_round=SERVER_ROUND,
        stage=s.SignedStage.KEY_LIST,
        payload=s.key_list_digest(forged_keys),
    )

    with pytest.raises(AuthenticationError, match=FAILED):
        s.verify(
            true_keys[0],
            signature_of_0,
            run_id=RUN_ID,
            server_round=SERVER_ROUND,
            stage=s.SignedStage.KEY_LIST,
            payload=s.key_list_digest(true_keys),
        )
