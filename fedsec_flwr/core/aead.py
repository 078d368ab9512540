"""ChaCha20-Poly1305 authenticated encryption of messages relayed by the server.

Clients send each other shares of their self-mask seeds through the server,
encrypted under their pairwise key. Security contract:

- `encrypt` draws a fresh random 96-bit nonce for every message and puts it
  in front of the ciphertext. By the birthday bound, q messages under one key
  repeat a nonce with probability below q**2 / 2**97, about 2**-33 for
  q = 2**32, far more messages than one pairwise key encrypts.
- `decrypt` verifies the tag before it returns anything, and every failure
  raises `AuthenticationError` with one message, so the error reveals
  nothing to an attacker.
- The associated data binds a ciphertext to its run, round, stage, sender
  and receiver, so the server cannot replay it elsewhere. Build it with
  `share_associated_data`.
"""

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import AuthenticationError
from .keys import KEY_SIZE

NONCE_SIZE = 12
"""Size in bytes of the ChaCha20-Poly1305 nonce at the start of a token."""

TAG_SIZE = 16
"""Size in bytes of the Poly1305 tag at the end of a token."""

SHARE_AD_DOMAIN = b"fedsec_flwr/aead/share/v1"
"""Prefix of the associated data of an encrypted share message."""

MAX_UINT64 = 2**64 - 1
"""Largest run id, round or node id in associated data (8 bytes unsigned)."""

MAX_STAGE_SIZE = 2**16 - 1
"""Maximum UTF-8 size in bytes of a stage name (2-byte length prefix)."""

_UINT64_SIZE = 8
_STAGE_LENGTH_SIZE = 2
_DECRYPTION_FAILED = "Decryption failed: the token is not authentic."


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt and authenticate `plaintext` under a 32-byte key.

    Returns:
        A token: the random 12-byte nonce, then the ciphertext and the 16-byte
        tag.

    Raises:
        ValueError: If `key` is not 32 bytes long.

    """
    _check_key(key)

    nonce = os.urandom(NONCE_SIZE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, token: bytes, *, associated_data: bytes) -> bytes:
    """Verify a token from `encrypt` and return its plaintext.

    Raises:
        ValueError: If `key` is not 32 bytes long.
        AuthenticationError: If the token is too short, was altered, or was
            made with another key or associated data. The message is the same
            in every case.

    """
    _check_key(key)
    if len(token) < NONCE_SIZE + TAG_SIZE:
        raise AuthenticationError(_DECRYPTION_FAILED)

    nonce = token[:NONCE_SIZE]
    unverified_ciphertext = token[NONCE_SIZE:]

    try:
        return ChaCha20Poly1305(key).decrypt(
            nonce, unverified_ciphertext, associated_data
        )
    except InvalidTag:
        raise AuthenticationError(_DECRYPTION_FAILED) from None


def share_associated_data(
    *, run_id: int, server_round: int, stage: str, sender: int, receiver: int
) -> bytes:
    """Encode the associated data of a share message canonically.

    The layout is `SHARE_AD_DOMAIN`, then run_id, server_round, sender and
    receiver as 8-byte unsigned big-endian integers, then the UTF-8 stage name
    after its 2-byte big-endian length. Every field before the stage name has
    a fixed size, so distinct inputs give distinct bytes.

    Raises:
        ValueError: If an integer is negative or above `MAX_UINT64`, or the
            stage name is empty or longer than `MAX_STAGE_SIZE` bytes.

    """
    fields = {
        "run_id": run_id,
        "server_round": server_round,
        "sender": sender,
        "receiver": receiver,
    }
    for name, value in fields.items():
        _check_uint64(name, value)
    stage_bytes = _encode_stage(stage)

    integers = b"".join(
        value.to_bytes(_UINT64_SIZE, "big") for value in fields.values()
    )
    stage_length = len(stage_bytes).to_bytes(_STAGE_LENGTH_SIZE, "big")
    return SHARE_AD_DOMAIN + integers + stage_length + stage_bytes


def _encode_stage(stage: str) -> bytes:
    stage_bytes = stage.encode("utf-8")
    if not 1 <= len(stage_bytes) <= MAX_STAGE_SIZE:
        raise ValueError(
            f"stage must be between 1 and {MAX_STAGE_SIZE} bytes in UTF-8. "
            f"Found {len(stage_bytes)} bytes."
        )
    return stage_bytes


def _check_uint64(name: str, value: int) -> None:
    if not 0 <= value <= MAX_UINT64:
        raise ValueError(f"{name} must be between 0 and {MAX_UINT64}. Found {value}.")


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes long. Found {len(key)} bytes.")
