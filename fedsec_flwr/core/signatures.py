"""Ed25519 identity signatures bound to a run, a round and a protocol stage.

Each client generates one identity key per run. It signs the digest of the
identity-key list it received (`SignedStage.KEY_LIST`) and its commitment
(`SignedStage.COMMITMENT`). Security contract:

- The signed message is an unambiguous encoding of `SIGNATURE_DOMAIN`, the
  run id, the round, the stage and the payload, every variable-length field
  prefixed by its length. A signature for one run, round or stage never
  verifies for another, so the server cannot replay or move it.
- Every verification failure raises `AuthenticationError` with the same
  message, whatever failed.
- Signing keys are secret: never log them or send them.
- Two honest clients that hold each other's real identity keys detect a
  server that shows them different key lists, because each signs the digest
  of its own list. A server that replaces every other client's key in one
  client's view, and so impersonates them all, is not detected: that needs
  identity keys distributed outside the server.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from enum import StrEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import AuthenticationError

SIGNATURE_DOMAIN = b"fedsec_flwr/signature/v1"
"""Prefix of every signed message."""

KEY_LIST_DOMAIN = b"fedsec_flwr/key-list/v1"
"""Prefix of the hash input of `key_list_digest`."""

IDENTITY_KEY_SIZE = 32
"""Size in bytes of a raw Ed25519 private or public key."""

SIGNATURE_SIZE = 64
"""Size in bytes of an Ed25519 signature."""

DIGEST_SIZE = 32
"""Size in bytes of a key-list digest (SHA-256)."""

_VERIFICATION_FAILED = "Signature verification failed."


class SignedStage(StrEnum):
    """Protocol stages at which a client signs something."""

    KEY_LIST = "key-list"
    COMMITMENT = "commitment"


def generate_identity_key() -> Ed25519PrivateKey:
    """Generate an Ed25519 identity key from the operating system's CSPRNG."""
    return Ed25519PrivateKey.generate()


def identity_private_bytes(key: Ed25519PrivateKey) -> bytes:
    """Encode an identity key as its raw 32 bytes, for storing client state."""
    return key.private_bytes_raw()


def load_identity_key(raw: bytes) -> Ed25519PrivateKey:
    """Load an identity key from the raw 32 bytes of `identity_private_bytes`.

    Raises:
        ValueError: If `raw` is not 32 bytes long.

    """
    _check_size("raw", raw, IDENTITY_KEY_SIZE)

    return Ed25519PrivateKey.from_private_bytes(raw)


def identity_public_bytes(key: Ed25519PrivateKey) -> bytes:
    """Compute the raw 32-byte public key that belongs to an identity key."""
    return key.public_key().public_bytes_raw()


def signed_message(
    *, run_id: int, server_round: int, stage: str, payload: bytes
) -> bytes:
    """Encode what `sign` signs.

    The encoding is, in order: the length-prefixed `SIGNATURE_DOMAIN`, the
    run id and the round (uint64 each), the length-prefixed UTF-8 stage name
    and the length-prefixed payload. Lengths are uint64, and every integer
    is big-endian.

    Raises:
        ValueError: If `run_id` or `server_round` is not a uint64 or `stage`
            is empty.

    """
    _check_uint64("run_id", run_id)
    _check_uint64("server_round", server_round)
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage must be a non-empty str. Found {stage!r}.")
    if not isinstance(payload, bytes):
        raise ValueError(f"payload must be bytes. Found {type(payload).__name__}.")

    return b"".join(
        [
            _length_prefixed(SIGNATURE_DOMAIN),
            struct.pack(">QQ", run_id, server_round),
            _length_prefixed(stage.encode()),
            _length_prefixed(payload),
        ]
    )


def sign(
    key: Ed25519PrivateKey,
    *,
    run_id: int,
    server_round: int,
    stage: str,
    payload: bytes,
) -> bytes:
    """Sign a payload for one stage of one round of one run.

    Pass a `SignedStage` member, or another protocol stage enum, as `stage`.

    Returns:
        The 64-byte Ed25519 signature of `signed_message`.

    Raises:
        ValueError: If an argument is malformed (see `signed_message`).

    """
    message = signed_message(
        run_id=run_id, server_round=server_round, stage=stage, payload=payload
    )

    return key.sign(message)


def verify(
    public_key: bytes,
    signature: bytes,
    *,
    run_id: int,
    server_round: int,
    stage: str,
    payload: bytes,
) -> None:
    """Verify a signature made by `sign` with the same run, round and stage.

    Args:
        public_key: The signer's raw 32-byte identity public key.
        signature: The untrusted signature.
        run_id: The run the signature must belong to.
        server_round: The round the signature must belong to.
        stage: The stage the signature must belong to.
        payload: The payload the signature must cover.

    Raises:
        ValueError: If `public_key` is not 32 bytes long or another argument
            is malformed.
        AuthenticationError: If the signature is not valid, which includes a
            signature of the wrong size.

    """
    _check_size("public_key", public_key, IDENTITY_KEY_SIZE)
    message = signed_message(
        run_id=run_id, server_round=server_round, stage=stage, payload=payload
    )
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise AuthenticationError(_VERIFICATION_FAILED)

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise AuthenticationError(_VERIFICATION_FAILED) from None


def key_list_digest(identity_keys: Mapping[int, bytes]) -> bytes:
    """Compute the canonical SHA-256 digest of a list of identity public keys.

    The hash input is the length-prefixed `KEY_LIST_DOMAIN`, the number of
    entries, then each node id (uint64) and its 32-byte key in increasing
    node-id order. The digest does not depend on the mapping's order.

    Raises:
        ValueError: If `identity_keys` is empty, a node id is not a uint64 or
            a key is not 32 bytes long.

    """
    if not identity_keys:
        raise ValueError("identity_keys must not be empty. Found none.")
    for node_id, public_key in identity_keys.items():
        _check_uint64("node id", node_id)
        _check_size(f"identity key of node {node_id}", public_key, IDENTITY_KEY_SIZE)

    digest = hashlib.sha256(_length_prefixed(KEY_LIST_DOMAIN))
    digest.update(struct.pack(">Q", len(identity_keys)))
    for node_id in sorted(identity_keys):
        digest.update(struct.pack(">Q", node_id))
        digest.update(identity_keys[node_id])

    return digest.digest()


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _check_uint64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int. Found {type(value).__name__}.")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be a uint64. Found {value}.")


def _check_size(name: str, data: bytes, size: int) -> None:
    if not isinstance(data, bytes):
        raise ValueError(f"{name} must be bytes. Found {type(data).__name__}.")
    if len(data) != size:
        raise ValueError(f"{name} must be {size} bytes long. Found {len(data)} bytes.")
