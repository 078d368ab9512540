"""Cryptographically secure random numbers for differential-privacy noise.

`SecureRandom` reads uniform bits from a ChaCha20 keystream (RFC 8439, through
the `cryptography` package) and turns them into vectorized uniform, integer and
normal draws. Noise drawn from NumPy's global generator or from a seeded
Mersenne Twister is predictable to anyone who learns the seed, and predictable
noise can be subtracted, which voids the privacy guarantee.

Keystream layout: every instance has one 32-byte key. The 16-byte ChaCha20
nonce is a 4-byte little-endian block counter starting at 0, 4 zero bytes and
a 64-bit little-endian stream index. The instance reads at most
`BYTES_PER_NONCE` bytes under one stream index and then moves to the next, so
no keystream block is ever read twice by one instance.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from ..core.bounds import upper_bound_text

KEY_SIZE = 32
"""Size in bytes of a ChaCha20 key."""

BYTES_PER_NONCE = 1 << 30
"""Keystream bytes read under one nonce before the next stream index is used.

The ChaCha20 block counter has 32 bits, so one nonce covers 2**32 blocks of
64 bytes (256 GiB). 1 GiB per nonce stays far below that limit.
"""

MAX_STREAM_INDEX = 2**64 - 1
"""Largest stream index that fits the 8 bytes reserved for it in the nonce."""

FLOAT_MANTISSA_BITS = 53
"""Random bits in each float64 returned by `SecureRandom.uniform`."""

MAX_GAUSSIAN_STD = sys.float_info.max / 16
"""Largest standard deviation that `SecureRandom.normal` accepts.

Its draws are at most about 8.57 standard deviations from 0, so up to this
bound every draw is a finite float64.
"""

_UNIFORM_SHIFT = np.uint64(64 - FLOAT_MANTISSA_BITS)
_UNIFORM_SCALE = 2.0**-FLOAT_MANTISSA_BITS
_BYTES_PER_DRAW = 8
_COUNTER_SIZE = 4
_INDEX_PADDING = bytes(4)
# The keystream is written in chunks of this size so that the all-zero input
# of each call is one shared buffer.
_CHUNK_SIZE = 1 << 18
_ZERO_CHUNK = memoryview(bytes(_CHUNK_SIZE))

Size = int | tuple[int, ...]


class SecureRandom:
    """Source of uniform, integer and normal draws from a ChaCha20 keystream.

    The default key comes from `os.urandom`, so draws are unpredictable. An
    explicit key makes the stream reproducible, which is meant for tests: two
    instances with the same key return the same values, so never share a key
    between noise sources of a real run.

    Instances are not thread-safe.
    """

    def __init__(self, *, key: bytes | None = None) -> None:
        """Create a source with a fresh random key or with `key`.

        Args:
            key: 32-byte ChaCha20 key, or None for a key from `os.urandom`.

        Raises:
            ValueError: If `key` is not 32 bytes long.

        """
        if key is None:
            key = os.urandom(KEY_SIZE)
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            found = len(key) if isinstance(key, bytes) else type(key).__name__
            raise ValueError(f"key must be {KEY_SIZE} bytes. Found {found}.")

        self._key = key
        self._stream_index = 0
        self._bytes_left = BYTES_PER_NONCE
        self._encryptor = self._open_stream(0)

    def __repr__(self) -> str:
        # The key is secret, so the representation leaves it out.
        return f"SecureRandom(stream_index={self._stream_index})"

    def random_bytes(self, num_bytes: int) -> npt.NDArray[np.uint8]:
        """Read the next `num_bytes` bytes of the keystream.

        Args:
            num_bytes: Number of bytes, zero or more.

        Returns:
            Array of dtype uint8 and shape (num_bytes,).

        Raises:
            ValueError: If `num_bytes` is negative.

        """
        _check_count("num_bytes", num_bytes)

        output = np.empty(num_bytes, dtype=np.uint8)
        position = 0
        while position < num_bytes:
            if self._bytes_left == 0:
                self._next_stream()
            chunk = min(num_bytes - position, self._bytes_left, _CHUNK_SIZE)
            self._encryptor.update_into(
                _ZERO_CHUNK[:chunk], output.data[position : position + chunk]
            )
            position += chunk
            self._bytes_left -= chunk

        return output

    def bits(self, size: Size) -> npt.NDArray[np.uint64]:
        """Draw independent uniform 64-bit words.

        Args:
            size: Output shape, an int or a tuple of ints.

        Returns:
            Array of dtype uint64 and shape `size`.

        """
        shape = as_shape(size)
        count = math.prod(shape)

        words = self.random_bytes(count * _BYTES_PER_DRAW).view("<u8")

        return words.astype(np.uint64, copy=False).reshape(shape)

    def integers(self, size: Size, *, high: int) -> npt.NDArray[np.int64]:
        """Draw integers uniformly from {0, ..., high - 1}.

        Each draw keeps the low bits of a 64-bit word that can hold `high - 1`
        and rejects values of `high` or more, so every value is exactly
        equally likely. At least half of the words are accepted.

        Args:
            size: Output shape, an int or a tuple of ints.
            high: Exclusive upper bound, from 1 to 2**63.

        Returns:
            Array of dtype int64 and shape `size`.

        Raises:
            ValueError: If `high` is outside [1, 2**63].

        """
        if isinstance(high, bool) or not isinstance(high, int):
            raise ValueError(f"high must be an int. Found {high!r}.")
        if not 1 <= high <= 2**63:
            raise ValueError(f"high must be in [1, 2**63]. Found {high}.")
        shape = as_shape(size)
        count = math.prod(shape)

        num_bits = (high - 1).bit_length()
        mask = np.uint64((1 << num_bits) - 1)
        acceptance = high / 2.0**num_bits
        accepted: list[npt.NDArray[np.uint64]] = []
        missing = count
        while missing > 0:
            # The acceptance rate is at least 1/2. Drawing 5% more than the
            # expected need usually finishes in one pass.
            num_candidates = math.ceil(1.05 * missing / acceptance) + 16
            candidates = self.bits(num_candidates)
            candidates &= mask
            in_range = candidates[candidates < np.uint64(high)]
            accepted.append(in_range[:missing])
            missing -= accepted[-1].size

        values = np.concatenate(accepted) if accepted else np.empty(0, np.uint64)

        return values.astype(np.int64).reshape(shape)

    def uniform(self, size: Size) -> npt.NDArray[np.float64]:
        """Draw floats uniformly from the grid {k * 2**-53 : 0 <= k < 2**53}.

        Every value is in [0, 1), and 0 can occur.

        Args:
            size: Output shape, an int or a tuple of ints.

        Returns:
            Array of dtype float64 and shape `size`.

        """
        words = self.bits(size)

        words >>= _UNIFORM_SHIFT
        values = words.astype(np.float64)
        values *= _UNIFORM_SCALE

        return values

    def normal(self, size: Size, *, std: float = 1.0) -> npt.NDArray[np.float64]:
        """Draw independent normal values with mean 0 and standard deviation `std`.

        Uses the Box-Muller transform: for independent
        U1 in (0, 1] and U2 in [0, 1), sqrt(-2 ln U1) * cos(2 pi U2) and
        sqrt(-2 ln U1) * sin(2 pi U2) are two independent standard normals.
        U1 comes from the 53-bit grid, so |value| <= std * sqrt(2 ln 2**53),
        about 8.57 * std. The normal distribution puts a mass of about 1e-17
        beyond that point.

        NOTE: The values are float64 approximations of a continuous
        distribution. Mironov (2012, "On Significance of the Least Significant
        Bits for Differential Privacy") shows that the low-order bits of
        floating-point noise can leak the input. The discrete Gaussian sampler
        in `fedsec_flwr.dp.noise` avoids this.

        Args:
            size: Output shape, an int or a tuple of ints.
            std: Standard deviation, from 0 to `MAX_GAUSSIAN_STD`.

        Returns:
            Array of dtype float64 and shape `size`.

        Raises:
            ValueError: If `std` is negative, not finite or above
                `MAX_GAUSSIAN_STD`.

        """
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be finite and non-negative. Found {std}.")
        if std > MAX_GAUSSIAN_STD:
            raise ValueError(
                f"std must be at most {upper_bound_text(MAX_GAUSSIAN_STD)}, or the "
                "largest draws "
                f"overflow float64. Found {std}."
            )
        shape = as_shape(size)
        count = math.prod(shape)

        num_pairs = (count + 1) // 2
        uniforms = self.uniform(2 * num_pairs)
        radius = uniforms[:num_pairs]
        angle = uniforms[num_pairs:]
        # The steps run in place so that large draws need no temporary arrays.
        # 1 - U is in (0, 1], so the logarithm is finite.
        np.negative(radius, out=radius)
        np.log1p(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        # Scaling after the square root keeps std**2 out of the computation,
        # which would underflow below about 1e-162 and overflow above 1e154.
        radius *= std
        angle *= 2.0 * np.pi
        values = np.empty(2 * num_pairs, dtype=np.float64)
        np.cos(angle, out=values[:num_pairs])
        np.sin(angle, out=values[num_pairs:])
        values[:num_pairs] *= radius
        values[num_pairs:] *= radius

        return values[:count].reshape(shape)

    def _open_stream(self, stream_index: int) -> CipherContext:
        nonce = (
            bytes(_COUNTER_SIZE)
            + _INDEX_PADDING
            + stream_index.to_bytes(8, byteorder="little")
        )
        cipher = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None)
        return cipher.encryptor()

    def _next_stream(self) -> None:
        if self._stream_index == MAX_STREAM_INDEX:
            raise RuntimeError(
                "SecureRandom has used every stream index of its key. "
                "Create a new instance."
            )
        self._stream_index += 1
        self._bytes_left = BYTES_PER_NONCE
        self._encryptor = self._open_stream(self._stream_index)


def as_shape(size: Size) -> tuple[int, ...]:
    """Convert an int or a tuple of ints into a shape, rejecting negative lengths."""
    shape = (size,) if isinstance(size, int) else tuple(size)
    for length in shape:
        _check_count("size", length)
    return shape


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be a non-negative int. Found {value!r}.")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int. Found {value}.")
