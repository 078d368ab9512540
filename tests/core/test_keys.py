import hmac

import pytest

from fedsec_flwr.core.errors import AuthenticationError
from fedsec_flwr.core.keys import (
    HKDF_SHA256_MAX_LENGTH,
    KEY_SIZE,
    derive_key,
    derive_shared_key,
    generate_private_key,
    hkdf_sha256,
    load_private_key,
    private_key_bytes,
    public_key_bytes,
)

# RFC 7748, section 6.1.
ALICE_PRIVATE = bytes.fromhex(
    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
)
ALICE_PUBLIC = bytes.fromhex(
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
)
BOB_PRIVATE = bytes.fromhex(
    "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
)
BOB_PUBLIC = bytes.fromhex(
    "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
)
SHARED_SECRET = bytes.fromhex(
    "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
)

# RFC 5869, appendix A.1 (test case 1) and A.3 (test case 3, no salt or info).
HKDF_IKM = bytes([0x0B] * 22)
HKDF_SALT = bytes.fromhex("000102030405060708090a0b0c")
HKDF_INFO = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
HKDF_OKM_CASE_1 = bytes.fromhex(
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db0"
    "2d56ecc4c5bf34007208d5b887185865"
)
HKDF_OKM_CASE_3 = bytes.fromhex(
    "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec345"
    "4e5f3c738d2d9d201395faa4b61a96c8"
)

LOW_ORDER_POINTS = [bytes(32), b"\x01" + bytes(31)]


def reference_hkdf_sha256(key_material: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 with no salt and one output block, written from RFC 5869."""
    pseudorandom_key = hmac.digest(bytes(32), key_material, "sha256")
    return hmac.digest(pseudorandom_key, info + b"\x01", "sha256")


def test_rfc7748_public_keys():
    alice = load_private_key(ALICE_PRIVATE)
    bob = load_private_key(BOB_PRIVATE)

    assert public_key_bytes(alice) == ALICE_PUBLIC
    assert public_key_bytes(bob) == BOB_PUBLIC


def test_rfc7748_shared_key_is_hkdf_of_secret():
    alice = load_private_key(ALICE_PRIVATE)
    info = b"rfc7748 test"

    key = derive_shared_key(alice, BOB_PUBLIC, info=info)

    assert key == reference_hkdf_sha256(SHARED_SECRET, info)


def test_rfc7748_both_parties_agree():
    alice = load_private_key(ALICE_PRIVATE)
    bob = load_private_key(BOB_PRIVATE)

    alice_key = derive_shared_key(alice, BOB_PUBLIC, info=b"pair")
    bob_key = derive_shared_key(bob, ALICE_PUBLIC, info=b"pair")

    assert alice_key == bob_key


def test_generated_keys_agree():
    alice = generate_private_key()
    bob = generate_private_key()

    alice_key = derive_shared_key(alice, public_key_bytes(bob), info=b"pair")
    bob_key = derive_shared_key(bob, public_key_bytes(alice), info=b"pair")

    assert alice_key == bob_key
    assert len(alice_key) == KEY_SIZE


def test_generated_keys_differ():
    first = private_key_bytes(generate_private_key())
    second = private_key_bytes(generate_private_key())

    assert first != second


def test_shared_key_info_separates():
    alice = load_private_key(ALICE_PRIVATE)

    first = derive_shared_key(alice, BOB_PUBLIC, info=b"round 1")
    second = derive_shared_key(alice, BOB_PUBLIC, info=b"round 2")

    assert first != second


def test_private_key_round_trip():
    private_key = generate_private_key()

    raw = private_key_bytes(private_key)
    loaded = load_private_key(raw)

    assert len(raw) == KEY_SIZE
    assert private_key_bytes(loaded) == raw
    assert public_key_bytes(loaded) == public_key_bytes(private_key)


def test_public_key_size():
    assert len(public_key_bytes(generate_private_key())) == KEY_SIZE


@pytest.mark.parametrize("size", [0, 31, 33])
def test_load_private_key_bad_length(size):
    with pytest.raises(ValueError, match=rf"raw must be 32 bytes long\. Found {size}"):
        load_private_key(bytes(size))


@pytest.mark.parametrize("size", [0, 31, 33])
def test_peer_public_key_bad_length(size):
    alice = load_private_key(ALICE_PRIVATE)
    message = rf"peer_public_key must be 32 bytes long\. Found {size} bytes"

    with pytest.raises(ValueError, match=message):
        derive_shared_key(alice, bytes(size), info=b"pair")


@pytest.mark.parametrize("peer_public_key", LOW_ORDER_POINTS)
def test_low_order_peer_key_rejected(peer_public_key):
    alice = load_private_key(ALICE_PRIVATE)

    with pytest.raises(AuthenticationError, match=r"^Key agreement failed\.$"):
        derive_shared_key(alice, peer_public_key, info=b"pair")


def test_low_order_error_hides_cause():
    alice = load_private_key(ALICE_PRIVATE)

    with pytest.raises(AuthenticationError) as caught:
        derive_shared_key(alice, bytes(32), info=b"pair")

    assert caught.value.__suppress_context__
    assert caught.value.__cause__ is None


def test_rfc5869_case_1():
    okm = hkdf_sha256(HKDF_IKM, info=HKDF_INFO, salt=HKDF_SALT, length=42)

    assert okm == HKDF_OKM_CASE_1


def test_rfc5869_case_3_no_salt():
    okm = hkdf_sha256(HKDF_IKM, info=b"", length=42)

    assert okm == HKDF_OKM_CASE_3


def test_hkdf_default_length_is_prefix():
    # HKDF-Expand output blocks do not depend on the requested length.
    okm = hkdf_sha256(HKDF_IKM, info=b"")

    assert okm == HKDF_OKM_CASE_3[:KEY_SIZE]


@pytest.mark.parametrize("length", [0, -1, HKDF_SHA256_MAX_LENGTH + 1])
def test_hkdf_bad_length(length):
    message = rf"length must be between 1 and 8160\. Found {length}\."

    with pytest.raises(ValueError, match=message):
        hkdf_sha256(HKDF_IKM, info=b"", length=length)


def test_derive_key_matches_reference():
    secret = bytes(range(KEY_SIZE))
    info = b"per-round key"

    assert derive_key(secret, info=info) == reference_hkdf_sha256(secret, info)


def test_derive_key_info_separates():
    secret = bytes(range(KEY_SIZE))

    first = derive_key(secret, info=b"a")
    second = derive_key(secret, info=b"b")

    assert first != second


def test_derive_key_secret_separates():
    first = derive_key(bytes(KEY_SIZE), info=b"a")
    second = derive_key(b"\x01" + bytes(KEY_SIZE - 1), info=b"a")

    assert first != second


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_derive_key_bad_secret_length(size):
    message = rf"secret must be 32 bytes long\. Found {size} bytes\."

    with pytest.raises(ValueError, match=message):
        derive_key(bytes(size), info=b"a")


def test_reference_hkdf_matches_rfc5869():
    # The reference used above is itself checked against RFC 5869 test case 3.
    assert reference_hkdf_sha256(HKDF_IKM, b"") == HKDF_OKM_CASE_3[:KEY_SIZE]
