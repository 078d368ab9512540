"""Pseudorandom masks for secure aggregation, expanded from 32-byte seeds.

A mask is a vector of uint32 values that is added to or subtracted from an
accumulator modulo 2**32. Pairwise masks added with opposite signs by the two
clients of a pair cancel in the sum. Security contract:

- The whole 256-bit seed feeds HKDF-SHA256, which derives a ChaCha20 key
  bound to `MASK_DOMAIN` and the caller's context. The mask is the ChaCha20
  keystream read as little-endian uint32 values, so it is the same on every
  platform and NumPy version.
- The nonce is all zeros. This is safe only because every key encrypts one
  stream: the caller must make each (seed, context) pair unique, for example
  by putting the run, the round and both node ids in the context.
- Masks are secret. Never log them or the seeds.
"""

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .keys import KEY_SIZE, derive_key

MASK_DOMAIN = b"fedsec_flwr/mask/v1"
"""Prefix of the HKDF info that derives a mask key from a seed and context."""

SEED_SIZE = KEY_SIZE
"""Size in bytes of a mask seed."""

MAX_MASK_LENGTH = 2**36
"""Maximum mask length in uint32 values.

RFC 8439 ChaCha20 has a 32-bit block counter: 2**32 blocks of 16 values.
"""

_ZERO_NONCE = bytes(16)

# The keystream is written in chunks of this many bytes, so the zero input of
# each call stays in cache. On a 2-core Xeon, 256 KiB was as fast as 4 MiB.
_CHUNK_SIZE = 1 << 18
_ZERO_CHUNK = memoryview(bytes(_CHUNK_SIZE))


def expand_mask(seed: bytes, *, context: bytes, length: int) -> npt.NDArray[np.uint32]:
    """Expand a 32-byte seed into a pseudorandom uint32 mask.

    Args:
        seed: Secret seed of 32 bytes, for example a pairwise shared key.
        context: Public bytes that make the mask unique to its use, such as
            the run, the round and the node ids.
        length: Number of uint32 values.

    Returns:
        Array of dtype uint32 and shape (length,).

    Raises:
        ValueError: If `seed` is not 32 bytes long or `length` is negative or
            above `MAX_MASK_LENGTH`.

    """
    return chacha20_keystream(mask_key(seed, context=context), length=length)


def add_mask(
    accumulator: npt.NDArray[np.uint32],
    seed: bytes,
    *,
    context: bytes,
    sign: int,
) -> None:
    """Add (sign +1) or subtract (sign -1) a mask in place, modulo 2**32.

    The mask has one value per element of `accumulator`, in C order, so a
    flat accumulator of the same length gets exactly `expand_mask`'s values.
    The only temporary is the mask itself.

    Raises:
        ValueError: If `sign` is not +1 or -1, `accumulator` is not a
            writable uint32 array, or the seed is invalid.

    """
    _check_sign(sign)
    _check_accumulator(accumulator)

    mask = expand_mask(seed, context=context, length=accumulator.size)
    mask = mask.reshape(accumulator.shape)

    if sign == 1:
        np.add(accumulator, mask, out=accumulator)
    else:
        np.subtract(accumulator, mask, out=accumulator)


def mask_key(seed: bytes, *, context: bytes) -> bytes:
    """Derive the ChaCha20 key of a mask: HKDF-SHA256 of the seed.

    The HKDF info is `MASK_DOMAIN` followed by `context`.

    Raises:
        ValueError: If `seed` is not 32 bytes long.

    """
    _check_seed(seed)

    return derive_key(seed, info=MASK_DOMAIN + context)


def chacha20_keystream(key: bytes, *, length: int) -> npt.NDArray[np.uint32]:
    """Compute ChaCha20 keystream words for `key` with a zero nonce and counter.

    This is the RFC 8439 keystream from block 0, read as little-endian uint32
    values. Use each key for one stream only.

    Raises:
        ValueError: If `key` is not 32 bytes long or `length` is negative or
            above `MAX_MASK_LENGTH`.

    """
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes long. Found {len(key)} bytes.")
    _check_length(length)

    words = np.empty(length, dtype="<u4")
    _write_keystream(key, words.data.cast("B"))

    # No copy on little-endian hosts. Big-endian hosts convert once.
    return words.astype(np.uint32, copy=False)


def _write_keystream(key: bytes, out: memoryview) -> None:
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()

    # ChaCha20 encryption of zero bytes writes the bare keystream.
    for start in range(0, len(out), _CHUNK_SIZE):
        chunk = out[start : start + _CHUNK_SIZE]
        encryptor.update_into(_ZERO_CHUNK[: len(chunk)], chunk)


def _check_seed(seed: bytes) -> None:
    if len(seed) != SEED_SIZE:
        raise ValueError(
            f"seed must be {SEED_SIZE} bytes long. Found {len(seed)} bytes."
        )


def _check_length(length: int) -> None:
    if not 0 <= length <= MAX_MASK_LENGTH:
        raise ValueError(
            f"length must be between 0 and {MAX_MASK_LENGTH}. Found {length}."
        )


def _check_sign(sign: int) -> None:
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1. Found {sign!r}.")


def _check_accumulator(accumulator: npt.NDArray[np.uint32]) -> None:
    if not isinstance(accumulator, np.ndarray):
        raise ValueError(
            f"accumulator must be a numpy array. Found {type(accumulator).__name__}."
        )
    if accumulator.dtype != np.uint32:
        raise ValueError(
            f"accumulator must have dtype uint32. Found {accumulator.dtype}."
        )
    if not accumulator.flags.writeable:
        raise ValueError("accumulator must be writable. Found a read-only array.")
