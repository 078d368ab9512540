import itertools
import random

import pytest

from fedsec_flwr.core.shamir import (
    ENCODED_SHARE_SIZE,
    MAX_NUM_SHARES,
    MAX_SECRET_SIZE,
    PRIME,
    Share,
    combine_shares,
    decode_share,
    encode_share,
    split_secret,
)

SECRET = bytes(range(1, 33))


def deterministic_randbelow(seed: int):
    return random.Random(seed).randrange


def interpolate(points: list[tuple[int, int]], x: int) -> int:
    """Evaluate at x the polynomial through points, by Lagrange's formula."""
    result = 0
    for j, (x_j, y_j) in enumerate(points):
        term = y_j
        for m, (x_m, _) in enumerate(points):
            if m != j:
                term = term * (x - x_m) * pow(x_j - x_m, -1, PRIME)
        result += term
    return result % PRIME


def test_prime_is_mersenne_521():
    assert PRIME == 2**521 - 1
    assert pow(3, PRIME - 1, PRIME) == 1


def test_split_returns_indexed_shares():
    shares = split_secret(SECRET, threshold=3, num_shares=5)

    assert [share.index for share in shares] == [1, 2, 3, 4, 5]
    assert all(0 <= share.value < PRIME for share in shares)


def test_all_subsets_recover_small():
    shares = split_secret(SECRET, threshold=3, num_shares=5)

    for size in range(3, 6):
        for subset in itertools.combinations(shares, size):
            recovered = combine_shares(subset, threshold=3, secret_size=len(SECRET))
            assert recovered == SECRET, [share.index for share in subset]


def test_random_subsets_recover_large():
    rng = random.Random(20)
    shares = split_secret(SECRET, threshold=11, num_shares=20)

    for _ in range(50):
        subset = rng.sample(shares, rng.randint(11, 20))
        recovered = combine_shares(subset, threshold=11, secret_size=len(SECRET))
        assert recovered == SECRET, [share.index for share in subset]


@pytest.mark.parametrize(
    "secret",
    [b"\x00", b"\x01", b"\x00\x00\x07", bytes(MAX_SECRET_SIZE), b"\xff" * 64],
)
def test_edge_secrets_round_trip(secret):
    shares = split_secret(secret, threshold=2, num_shares=3)

    recovered = combine_shares(shares[1:], threshold=2, secret_size=len(secret))

    assert recovered == secret


def test_shares_are_random():
    first = split_secret(SECRET, threshold=2, num_shares=2)
    second = split_secret(SECRET, threshold=2, num_shares=2)

    assert first != second


def test_randbelow_makes_split_deterministic():
    first = split_secret(
        SECRET, threshold=3, num_shares=4, randbelow=deterministic_randbelow(7)
    )
    second = split_secret(
        SECRET, threshold=3, num_shares=4, randbelow=deterministic_randbelow(7)
    )

    assert first == second


def test_polynomial_has_threshold_coefficients():
    # With coefficients (s, 1, 2) the shares are s + x + 2 x**2.
    coefficients = iter([1, 2])
    secret_value = int.from_bytes(SECRET, "big")

    shares = split_secret(
        SECRET, threshold=3, num_shares=4, randbelow=lambda _: next(coefficients)
    )

    for share in shares:
        x = share.index
        assert share.value == (secret_value + x + 2 * x * x) % PRIME


def test_too_few_shares_fail_to_recover():
    shares = split_secret(
        SECRET, threshold=3, num_shares=5, randbelow=deterministic_randbelow(11)
    )

    for subset in itertools.combinations(shares, 2):
        with pytest.raises(ValueError, match=r"does not fit in secret_size=32"):
            combine_shares(subset, threshold=2, secret_size=len(SECRET))


def test_too_few_shares_fit_any_secret():
    # For threshold - 1 shares and any other secret, one polynomial of degree
    # threshold - 1 passes through all of them, so the shares reveal nothing.
    shares = split_secret(SECRET, threshold=3, num_shares=5)
    other_secret = bytes(32)
    points = [(0, 0), (shares[0].index, shares[0].value)]
    points.append((shares[1].index, shares[1].value))
    forged = Share(5, interpolate(points, 5))

    recovered = combine_shares(
        [shares[0], shares[1], forged], threshold=3, secret_size=len(SECRET)
    )

    assert recovered == other_secret


def test_too_few_distinct_shares_raise():
    shares = split_secret(SECRET, threshold=3, num_shares=5)
    message = r"shares must contain at least threshold=3 distinct indices\. Found 2\."

    with pytest.raises(ValueError, match=message):
        combine_shares(shares[:2], threshold=3, secret_size=len(SECRET))


def test_repeated_share_counts_once():
    shares = split_secret(SECRET, threshold=3, num_shares=5)
    repeated = [shares[0], shares[0], shares[1], shares[1]]
    message = r"at least threshold=3 distinct indices\. Found 2\."

    with pytest.raises(ValueError, match=message):
        combine_shares(repeated, threshold=3, secret_size=len(SECRET))


def test_repeated_share_still_recovers():
    shares = split_secret(SECRET, threshold=3, num_shares=5)
    repeated = [shares[0], shares[0], shares[2], shares[4]]

    recovered = combine_shares(repeated, threshold=3, secret_size=len(SECRET))

    assert recovered == SECRET


def test_conflicting_duplicate_raises():
    shares = split_secret(SECRET, threshold=3, num_shares=5)
    conflicting = Share(shares[0].index, (shares[0].value + 1) % PRIME)

    with pytest.raises(ValueError, match=r"two different values for index 1\."):
        combine_shares([*shares, conflicting], threshold=3, secret_size=len(SECRET))


@pytest.mark.parametrize(("position", "lagrange_at_zero"), [(0, 3), (1, -3), (2, 1)])
def test_shifted_share_shifts_secret(position, lagrange_at_zero):
    # Adding 1 to share j adds L_j(0) to the secret: 3, -3 and 1 for x = 1, 2, 3.
    shares = split_secret(SECRET, threshold=3, num_shares=3)
    tampered = list(shares)
    original = tampered[position]
    tampered[position] = Share(original.index, (original.value + 1) % PRIME)

    recovered = combine_shares(tampered, threshold=3, secret_size=len(SECRET))

    assert recovered != SECRET
    assert int.from_bytes(recovered, "big") == (
        int.from_bytes(SECRET, "big") + lagrange_at_zero
    )


@pytest.mark.parametrize("position", range(3))
def test_random_share_value_detected(position):
    rng = random.Random(position)
    shares = split_secret(SECRET, threshold=3, num_shares=3)
    tampered = list(shares)
    tampered[position] = Share(tampered[position].index, rng.randrange(PRIME))

    with pytest.raises(ValueError, match=r"does not fit in secret_size=32 bytes"):
        combine_shares(tampered, threshold=3, secret_size=len(SECRET))


def test_wrong_threshold_detected():
    shares = split_secret(SECRET, threshold=4, num_shares=6)

    with pytest.raises(ValueError, match=r"does not fit in secret_size"):
        combine_shares(shares, threshold=3, secret_size=len(SECRET))


def test_combine_error_hides_values():
    shares = split_secret(SECRET, threshold=2, num_shares=2)
    tampered = [shares[0], Share(shares[1].index, random.Random(1).randrange(PRIME))]

    with pytest.raises(ValueError) as caught:
        combine_shares(tampered, threshold=2, secret_size=len(SECRET))

    for share in tampered:
        assert str(share.value) not in str(caught.value)


def test_share_repr_hides_value():
    share = Share(3, 123456789)

    assert "123456789" not in repr(share)
    assert "index=3" in repr(share)


def test_encode_decode_round_trip():
    for share in split_secret(SECRET, threshold=3, num_shares=5):
        encoded = encode_share(share)
        assert len(encoded) == ENCODED_SHARE_SIZE
        assert decode_share(encoded) == share


def test_encode_extreme_values():
    for share in [Share(1, 0), Share(MAX_NUM_SHARES, PRIME - 1)]:
        assert decode_share(encode_share(share)) == share


def test_encoding_layout():
    encoded = encode_share(Share(0x01020304, 5))

    assert encoded[:4] == bytes([1, 2, 3, 4])
    assert encoded[4:] == (5).to_bytes(66, "big")


@pytest.mark.parametrize("size", [0, 69, 71])
def test_decode_bad_length(size):
    message = rf"Encoded share must be 70 bytes long\. Found {size} bytes\."

    with pytest.raises(ValueError, match=message):
        decode_share(bytes(size))


def test_decode_zero_index():
    data = bytes(4) + (1).to_bytes(66, "big")

    with pytest.raises(ValueError, match=r"Share index must be between 1 and .* 0\."):
        decode_share(data)


def test_decode_value_not_below_prime():
    data = (1).to_bytes(4, "big") + PRIME.to_bytes(66, "big")

    with pytest.raises(ValueError, match=r"Share value must be in \[0, PRIME\)"):
        decode_share(data)


@pytest.mark.parametrize(
    ("share", "message"),
    [
        (Share(0, 1), r"Share index must be between 1 and 4294967295\. Found 0\."),
        (Share(-1, 1), r"Share index must be between 1 and 4294967295\. Found -1\."),
        (Share(2**32, 1), r"Share index must be between 1 and \d+\. Found 4294967296"),
        (Share(1, -1), r"Share value must be in \[0, PRIME\)\. .* at index 1\."),
        (Share(1, PRIME), r"Share value must be in \[0, PRIME\)\. .* at index 1\."),
    ],
)
def test_share_range_checks(share, message):
    valid = split_secret(SECRET, threshold=2, num_shares=3)

    with pytest.raises(ValueError, match=message):
        encode_share(share)
    with pytest.raises(ValueError, match=message):
        combine_shares([share, *valid], threshold=2, secret_size=len(SECRET))


@pytest.mark.parametrize("size", [0, MAX_SECRET_SIZE + 1])
def test_split_bad_secret_length(size):
    message = rf"secret length must be between 1 and 64 bytes\. Found {size}\."

    with pytest.raises(ValueError, match=message):
        split_secret(bytes(size), threshold=2, num_shares=3)


@pytest.mark.parametrize("threshold", [1, 0, -3])
def test_split_bad_threshold(threshold):
    message = rf"threshold must be at least 2\. Found {threshold}\."

    with pytest.raises(ValueError, match=message):
        split_secret(SECRET, threshold=threshold, num_shares=3)


def test_split_threshold_above_num_shares():
    message = r"num_shares must be between threshold=4 and 4294967295\. Found 3\."

    with pytest.raises(ValueError, match=message):
        split_secret(SECRET, threshold=4, num_shares=3)


def test_split_too_many_shares():
    message = rf"num_shares must be between .*\. Found {MAX_NUM_SHARES + 1}\."

    with pytest.raises(ValueError, match=message):
        split_secret(SECRET, threshold=2, num_shares=MAX_NUM_SHARES + 1)


@pytest.mark.parametrize("threshold", [1, 0])
def test_combine_bad_threshold(threshold):
    shares = split_secret(SECRET, threshold=2, num_shares=3)

    message = rf"threshold must be at least 2\. Found {threshold}\."

    with pytest.raises(ValueError, match=message):
        combine_shares(shares, threshold=threshold, secret_size=len(SECRET))


@pytest.mark.parametrize("secret_size", [0, MAX_SECRET_SIZE + 1])
def test_combine_bad_secret_size(secret_size):
    shares = split_secret(SECRET, threshold=2, num_shares=3)
    message = rf"secret_size must be between 1 and 64 bytes\. Found {secret_size}\."

    with pytest.raises(ValueError, match=message):
        combine_shares(shares, threshold=2, secret_size=secret_size)


def test_combine_smaller_secret_size_rejects():
    shares = split_secret(SECRET, threshold=2, num_shares=3)

    with pytest.raises(ValueError, match=r"does not fit in secret_size=31 bytes"):
        combine_shares(shares, threshold=2, secret_size=31)
