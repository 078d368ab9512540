"""X25519 key agreement and HKDF-SHA256 key derivation.

Each client has X25519 key pairs. Two clients turn their keys into a shared
32-byte key with `derive_shared_key`, and seeds turn into per-round keys with
`derive_key`. Security contract:

- Every derived key is HKDF-SHA256 output, never a raw X25519 result, and the
  caller's `info` separates keys for different purposes, rounds and peers.
  Two calls with the same inputs return the same key, so `info` must differ
  wherever the keys must differ.
- A peer public key of the wrong length raises `ValueError`. A peer key that
  makes the exchange fail (a low-order point, which gives an all-zero shared
  secret) raises `AuthenticationError` with no detail.
"""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AuthenticationError

KEY_SIZE = 32
"""Size in bytes of X25519 private and public keys and of every derived key."""

HKDF_SHA256_MAX_LENGTH = 255 * 32
"""Maximum HKDF-SHA256 output in bytes (RFC 5869: 255 times the hash size)."""

_KEY_AGREEMENT_FAILED = "Key agreement failed."


def generate_private_key() -> X25519PrivateKey:
    """Generate an X25519 private key from the operating system's CSPRNG."""
    return X25519PrivateKey.generate()


def private_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """Encode a private key as its raw 32 bytes, for storing client state."""
    return private_key.private_bytes_raw()


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Load a private key from the raw 32 bytes of `private_key_bytes`.

    Raises:
        ValueError: If `raw` is not 32 bytes long.

    """
    _check_size("raw", raw)

    return X25519PrivateKey.from_private_bytes(raw)


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """Compute the raw 32-byte public key that belongs to `private_key`."""
    return private_key.public_key().public_bytes_raw()


def derive_shared_key(
    private_key: X25519PrivateKey, peer_public_key: bytes, *, info: bytes
) -> bytes:
    """Derive a 32-byte key shared with a peer by X25519 and HKDF-SHA256.

    Both parties get the same key: each passes its own private key, the
    other's raw public key and the same `info`.

    Args:
        private_key: This party's private key.
        peer_public_key: The peer's raw 32-byte public key (untrusted input).
        info: HKDF context that binds the key to its purpose.

    Returns:
        HKDF-SHA256 (no salt) of the X25519 shared secret, 32 bytes.

    Raises:
        ValueError: If `peer_public_key` is not 32 bytes long.
        AuthenticationError: If the exchange fails, as it does for a
            low-order peer point.

    """
    _check_size("peer_public_key", peer_public_key)
    peer = X25519PublicKey.from_public_bytes(peer_public_key)

    try:
        shared_secret = private_key.exchange(peer)
    except ValueError:
        raise AuthenticationError(_KEY_AGREEMENT_FAILED) from None

    return hkdf_sha256(shared_secret, info=info)


def derive_key(secret: bytes, *, info: bytes) -> bytes:
    """Derive a 32-byte key from a 32-byte secret by HKDF-SHA256 (no salt).

    Raises:
        ValueError: If `secret` is not 32 bytes long.

    """
    _check_size("secret", secret)

    return hkdf_sha256(secret, info=info)


def is_usable_public_key(public_key: bytes) -> bool:
    """Return whether an untrusted X25519 public key is 32 bytes and not low order.

    A low-order point makes every key agreement with it fail, so a client
    that advertises one would stall all its neighbours.
    """
    if len(public_key) != KEY_SIZE:
        return False
    try:
        generate_private_key().exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        return False
    return True


def hkdf_sha256(
    key_material: bytes,
    *,
    info: bytes,
    salt: bytes | None = None,
    length: int = KEY_SIZE,
) -> bytes:
    """Derive `length` bytes from `key_material` by HKDF-SHA256 (RFC 5869).

    A `salt` of None is HKDF's default, a string of 32 zero bytes.

    Raises:
        ValueError: If `length` is not between 1 and `HKDF_SHA256_MAX_LENGTH`.

    """
    if not 1 <= length <= HKDF_SHA256_MAX_LENGTH:
        raise ValueError(
            f"length must be between 1 and {HKDF_SHA256_MAX_LENGTH}. Found {length}."
        )

    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info)
    return hkdf.derive(key_material)


def _check_size(name: str, key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(
            f"{name} must be {KEY_SIZE} bytes long. Found {len(key)} bytes."
        )
