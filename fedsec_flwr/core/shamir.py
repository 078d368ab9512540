"""Shamir secret sharing over the prime field of p = 2**521 - 1.

`split_secret` hides a secret of up to 64 bytes in the constant term of a
random polynomial of degree threshold - 1 and returns its values at
x = 1..num_shares. Any `threshold` shares recover the secret with
`combine_shares`. Fewer shares fit every possible secret equally well, so
they reveal nothing about it. Security contract:

- Coefficients come from `secrets.randbelow` unless the caller passes
  another source, which only tests should do.
- Share values are secret. `Share`'s repr omits the value, and no error
  message contains a share value or a recovered secret.
- Shares are not authenticated. A share from another sharing or a random
  value recovers a random field element, which fails the `secret_size` check
  with overwhelming probability, so `combine_shares` raises ValueError. But a
  share changed on purpose can shift the secret by any chosen amount and pass
  that check. A caller that must detect tampering checks the recovered
  secret, for example against a public key derived from it.
- The arithmetic uses Python integers, which are not constant time.
"""

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PRIME = 2**521 - 1
"""Field modulus, the Mersenne prime 2**521 - 1."""

MAX_SECRET_SIZE = 64
"""Maximum secret size in bytes. Every 64-byte integer is below `PRIME`."""

SHARE_INDEX_SIZE = 4
"""Size in bytes of an encoded share index."""

SHARE_VALUE_SIZE = (PRIME.bit_length() + 7) // 8
"""Size in bytes of an encoded share value (66)."""

ENCODED_SHARE_SIZE = SHARE_INDEX_SIZE + SHARE_VALUE_SIZE
"""Size in bytes of `encode_share`'s output (70)."""

MAX_NUM_SHARES = 2 ** (8 * SHARE_INDEX_SIZE) - 1
"""Maximum number of shares, the largest index the encoding can hold."""


@dataclass(frozen=True)
class Share:
    """One point (index, value) of a sharing polynomial.

    Attributes:
        index: The x coordinate, from 1 to the number of shares.
        value: The polynomial's value at `index`, in [0, PRIME). Secret.

    """

    index: int
    value: int = field(repr=False)


def split_secret(
    secret: bytes,
    *,
    threshold: int,
    num_shares: int,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> list[Share]:
    """Split a secret into shares, any `threshold` of which recover it.

    Args:
        secret: From 1 to `MAX_SECRET_SIZE` bytes, read as a big-endian
            integer. Leading zero bytes are restored by `combine_shares`'s
            `secret_size`.
        threshold: Number of shares needed to recover the secret.
        num_shares: Number of shares, with indices 1..num_shares.
        randbelow: Source of uniform integers in [0, n). Production keeps the
            default CSPRNG.

    Returns:
        Shares in index order.

    Raises:
        ValueError: If the secret size, `threshold` or `num_shares` is out of
            range.

    """
    _check_secret_size("secret length", len(secret))
    _check_threshold(threshold)
    _check_num_shares(num_shares, threshold=threshold)

    constant_term = int.from_bytes(secret, "big")
    random_terms = [randbelow(PRIME) for _ in range(threshold - 1)]
    coefficients = [constant_term, *random_terms]

    return [
        Share(index, _evaluate_polynomial(coefficients, index))
        for index in range(1, num_shares + 1)
    ]


def combine_shares(
    shares: Sequence[Share], *, threshold: int, secret_size: int
) -> bytes:
    """Recover a secret by Lagrange interpolation at x = 0.

    Every share is validated first. Repeats of a share (same index and value)
    count once, and the first `threshold` distinct indices are used.

    Args:
        shares: Untrusted shares, at least `threshold` distinct indices.
        threshold: The threshold the secret was split with.
        secret_size: Size in bytes of the original secret.

    Returns:
        The secret as `secret_size` big-endian bytes.

    Raises:
        ValueError: If a share is out of range, two shares have the same
            index and different values, or fewer than `threshold` indices are
            distinct. Also if the recovered value does not fit in
            `secret_size` bytes, the usual result of mixing shares from
            different sharings.

    """
    _check_threshold(threshold)
    _check_secret_size("secret_size", secret_size)
    points = _distinct_points(shares)
    if len(points) < threshold:
        raise ValueError(
            f"shares must contain at least threshold={threshold} distinct "
            f"indices. Found {len(points)}."
        )

    selected = list(points.items())[:threshold]
    value = _interpolate_at_zero(selected)

    if value.bit_length() > 8 * secret_size:
        raise ValueError(
            f"The recovered secret does not fit in secret_size={secret_size} "
            "bytes. The shares are wrong or the threshold is not the one used "
            "to split."
        )
    return value.to_bytes(secret_size, "big")


def encode_share(share: Share) -> bytes:
    """Encode a share as a 4-byte index and a 66-byte value, big-endian.

    Raises:
        ValueError: If the index or value is out of range.

    """
    _check_share(share)

    index = share.index.to_bytes(SHARE_INDEX_SIZE, "big")
    return index + share.value.to_bytes(SHARE_VALUE_SIZE, "big")


def decode_share(data: bytes) -> Share:
    """Decode and validate a share encoded by `encode_share`.

    Raises:
        ValueError: If `data` is not `ENCODED_SHARE_SIZE` bytes long or the
            index or value is out of range.

    """
    if len(data) != ENCODED_SHARE_SIZE:
        raise ValueError(
            f"Encoded share must be {ENCODED_SHARE_SIZE} bytes long. "
            f"Found {len(data)} bytes."
        )

    index = int.from_bytes(data[:SHARE_INDEX_SIZE], "big")
    value = int.from_bytes(data[SHARE_INDEX_SIZE:], "big")
    share = Share(index, value)

    _check_share(share)
    return share


def check_consistent(shares: Sequence[Share], *, threshold: int) -> None:
    """Check that every share lies on the polynomial of the first ``threshold``.

    With more than ``threshold`` shares, a share changed on purpose (which
    ``combine_shares`` alone would turn into a shifted secret) shows up as a
    point off the polynomial. With exactly ``threshold`` shares nothing can be
    checked.

    Raises:
        ValueError: Fewer than ``threshold`` distinct shares, or a share off
            the polynomial; the message names its index only.
    """
    _check_threshold(threshold)
    points = sorted(_distinct_points(shares).items())
    if len(points) < threshold:
        raise ValueError(
            f"shares must hold at least {threshold} distinct indices. "
            f"Found {len(points)}."
        )
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _interpolate_at(base, x) != y:
            raise ValueError(f"The share at index {x} is not on the polynomial.")


def _interpolate_at(points: list[tuple[int, int]], x: int) -> int:
    # Lagrange: L(x) = sum of y_j * prod_{m != j} (x - x_m) / (x_j - x_m).
    result = 0
    for j, (x_j, y_j) in enumerate(points):
        numerator = 1
        denominator = 1
        for m, (x_m, _) in enumerate(points):
            if m != j:
                numerator = numerator * (x - x_m) % PRIME
                denominator = denominator * (x_j - x_m) % PRIME
        result += y_j * numerator * pow(denominator, -1, PRIME)
    return result % PRIME


def _evaluate_polynomial(coefficients: list[int], x: int) -> int:
    # Horner's rule, from the highest-degree coefficient down.
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    # L(0) = sum of y_j * prod_{m != j} x_m / (x_m - x_j), all mod PRIME.
    result = 0
    for j, (x_j, y_j) in enumerate(points):
        numerator = 1
        denominator = 1
        for m, (x_m, _) in enumerate(points):
            if m != j:
                numerator = numerator * x_m % PRIME
                denominator = denominator * (x_m - x_j) % PRIME
        result += y_j * numerator * pow(denominator, -1, PRIME)
    return result % PRIME


def _distinct_points(shares: Sequence[Share]) -> dict[int, int]:
    points: dict[int, int] = {}
    for share in shares:
        _check_share(share)
        if points.setdefault(share.index, share.value) != share.value:
            raise ValueError(
                f"shares contain two different values for index {share.index}."
            )
    return points


def _check_share(share: Share) -> None:
    if not 1 <= share.index <= MAX_NUM_SHARES:
        raise ValueError(
            f"Share index must be between 1 and {MAX_NUM_SHARES}. Found {share.index}."
        )
    if not 0 <= share.value < PRIME:
        # The value is secret, so the message gives its index only.
        raise ValueError(
            f"Share value must be in [0, PRIME). Found an out-of-range value "
            f"at index {share.index}."
        )


def _check_threshold(threshold: int) -> None:
    if threshold < 2:
        raise ValueError(f"threshold must be at least 2. Found {threshold}.")


def _check_num_shares(num_shares: int, *, threshold: int) -> None:
    if not threshold <= num_shares <= MAX_NUM_SHARES:
        raise ValueError(
            f"num_shares must be between threshold={threshold} and "
            f"{MAX_NUM_SHARES}. Found {num_shares}."
        )


def _check_secret_size(name: str, size: int) -> None:
    if not 1 <= size <= MAX_SECRET_SIZE:
        raise ValueError(
            f"{name} must be between 1 and {MAX_SECRET_SIZE} bytes. Found {size}."
        )
