import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedsec_flwr.core.aead import (
    MAX_UINT64,
    NONCE_SIZE,
    SHARE_AD_DOMAIN,
    TAG_SIZE,
    decrypt,
    encrypt,
    share_associated_data,
)
from fedsec_flwr.core.errors import AuthenticationError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PLAINTEXT = b"share of node 7 for node 9"
AD_FIELDS = {
    "run_id": 12,
    "server_round": 3,
    "stage": "share-keys",
    "sender": 7,
    "receiver": 9,
}
ONE_MESSAGE = r"^Decryption failed: the token is not authentic\.$"

# One changed field of the associated data for each parameter.
CHANGED_AD_FIELDS = [
    ("run_id", 13),
    ("server_round", 4),
    ("stage", "unmask"),
    ("sender", 9),
    ("receiver", 7),
]


def associated_data(**changes) -> bytes:
    return share_associated_data(**(AD_FIELDS | changes))


def flip_bit(token: bytes, position: int) -> bytes:
    changed = bytearray(token)
    changed[position] ^= 0x01
    return bytes(changed)


@pytest.fixture
def token() -> bytes:
    return encrypt(KEY, PLAINTEXT, associated_data=associated_data())


def test_round_trip(token):
    assert decrypt(KEY, token, associated_data=associated_data()) == PLAINTEXT


def test_empty_plaintext_round_trip():
    token = encrypt(KEY, b"", associated_data=b"")

    assert len(token) == NONCE_SIZE + TAG_SIZE
    assert decrypt(KEY, token, associated_data=b"") == b""


def test_token_layout(token):
    nonce = token[:NONCE_SIZE]
    expected = ChaCha20Poly1305(KEY).encrypt(nonce, PLAINTEXT, associated_data())

    assert len(token) == NONCE_SIZE + len(PLAINTEXT) + TAG_SIZE
    assert token[NONCE_SIZE:] == expected


def test_nonces_are_fresh():
    first = encrypt(KEY, PLAINTEXT, associated_data=b"")
    second = encrypt(KEY, PLAINTEXT, associated_data=b"")

    assert first[:NONCE_SIZE] != second[:NONCE_SIZE]
    assert first != second


@pytest.mark.parametrize(
    ("part", "position"),
    [
        ("nonce", 0),
        ("nonce", NONCE_SIZE - 1),
        ("ciphertext", NONCE_SIZE),
        ("ciphertext", NONCE_SIZE + len(PLAINTEXT) - 1),
        ("tag", -TAG_SIZE),
        ("tag", -1),
    ],
)
def test_flipped_bit_rejected(token, part, position):
    changed = flip_bit(token, position)

    with pytest.raises(AuthenticationError, match=ONE_MESSAGE):
        decrypt(KEY, changed, associated_data=associated_data())


@pytest.mark.parametrize(("field", "value"), CHANGED_AD_FIELDS)
def test_changed_associated_data_rejected(token, field, value):
    changed = associated_data(**{field: value})

    with pytest.raises(AuthenticationError, match=ONE_MESSAGE):
        decrypt(KEY, token, associated_data=changed)


def test_wrong_key_rejected(token):
    with pytest.raises(AuthenticationError, match=ONE_MESSAGE):
        decrypt(OTHER_KEY, token, associated_data=associated_data())


@pytest.mark.parametrize(
    "length", [0, 1, NONCE_SIZE, NONCE_SIZE + TAG_SIZE - 1, NONCE_SIZE + TAG_SIZE]
)
def test_truncated_token_rejected(token, length):
    with pytest.raises(AuthenticationError, match=ONE_MESSAGE):
        decrypt(KEY, token[:length], associated_data=associated_data())


def test_dropped_last_byte_rejected(token):
    with pytest.raises(AuthenticationError, match=ONE_MESSAGE):
        decrypt(KEY, token[:-1], associated_data=associated_data())


def test_appended_byte_rejected(token):
    with pytest.raises(AuthenticationError, match=ONE_MESSAGE):
        decrypt(KEY, token + b"\x00", associated_data=associated_data())


def test_failure_hides_cause(token):
    with pytest.raises(AuthenticationError) as caught:
        decrypt(OTHER_KEY, token, associated_data=associated_data())

    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_encrypt_bad_key_length(size):
    with pytest.raises(ValueError, match=rf"key must be 32 bytes long\. Found {size}"):
        encrypt(bytes(size), PLAINTEXT, associated_data=b"")


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_decrypt_bad_key_length(token, size):
    with pytest.raises(ValueError, match=rf"key must be 32 bytes long\. Found {size}"):
        decrypt(bytes(size), token, associated_data=b"")


def test_associated_data_layout():
    encoded = associated_data()
    integers = b"".join(value.to_bytes(8, "big") for value in (12, 3, 7, 9))

    assert encoded == SHARE_AD_DOMAIN + integers + b"\x00\x0ashare-keys"


@pytest.mark.parametrize(("field", "value"), CHANGED_AD_FIELDS)
def test_associated_data_fields_distinct(field, value):
    assert associated_data(**{field: value}) != associated_data()


def test_associated_data_sender_receiver_ordered():
    forward = associated_data(sender=1, receiver=2)
    backward = associated_data(sender=2, receiver=1)

    assert forward != backward


def test_associated_data_stage_prefix_unambiguous():
    short = associated_data(stage="a")
    long = associated_data(stage="ab")

    assert not long.startswith(short)


def test_associated_data_accepts_uint64_bounds():
    lowest = associated_data(run_id=0, server_round=0, sender=0, receiver=0)
    highest = associated_data(
        run_id=MAX_UINT64,
        server_round=MAX_UINT64,
        sender=MAX_UINT64,
        receiver=MAX_UINT64,
    )

    assert len(lowest) == len(highest)
    assert highest[len(SHARE_AD_DOMAIN) :].startswith(b"\xff" * 32)


@pytest.mark.parametrize("field", ["run_id", "server_round", "sender", "receiver"])
@pytest.mark.parametrize("value", [-1, MAX_UINT64 + 1])
def test_associated_data_integer_range(field, value):
    message = rf"^{field} must be between 0 and {MAX_UINT64}\. Found {value}\.$"

    with pytest.raises(ValueError, match=message):
        associated_data(**{field: value})


def test_associated_data_empty_stage():
    with pytest.raises(ValueError, match=r"stage must be between 1 and 65535 bytes"):
        associated_data(stage="")


def test_associated_data_long_stage():
    message = r"stage must be between 1 and 65535 bytes in UTF-8\. Found 65536 bytes\."

    with pytest.raises(ValueError, match=message):
        associated_data(stage="x" * 65536)


def test_associated_data_utf8_stage():
    encoded = associated_data(stage="é")

    assert encoded.endswith(b"\x00\x02\xc3\xa9")
