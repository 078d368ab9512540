import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from fedsec_flwr.dp import random as dp_random
from fedsec_flwr.dp.random import MAX_GAUSSIAN_STD, SecureRandom

KEY = bytes(range(32))
# Two-sided statistical checks below fail a correct generator with
# probability 1e-6 each.
FALSE_FAILURE_RATE = 1e-6


def chacha20_keystream(key: bytes, *, stream_index: int, num_bytes: int) -> bytes:
    nonce = bytes(8) + stream_index.to_bytes(8, "little")
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return encryptor.update(bytes(num_bytes))


def test_same_key_gives_same_stream() -> None:
    first = SecureRandom(key=KEY).bits(100)
    second = SecureRandom(key=KEY).bits(100)

    assert np.array_equal(first, second)


def test_default_keys_differ() -> None:
    first = SecureRandom().bits(4)
    second = SecureRandom().bits(4)

    assert not np.array_equal(first, second)


def test_stream_matches_chacha20_keystream() -> None:
    expected = chacha20_keystream(KEY, stream_index=0, num_bytes=1000)

    drawn = SecureRandom(key=KEY).random_bytes(1000)

    assert drawn.tobytes() == expected


def test_successive_draws_continue_the_stream() -> None:
    whole = SecureRandom(key=KEY).random_bytes(4096)
    rng = SecureRandom(key=KEY)

    parts = [rng.random_bytes(1000), rng.random_bytes(3096)]

    assert np.concatenate(parts).tobytes() == whole.tobytes()


def test_next_nonce_after_stream_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dp_random, "BYTES_PER_NONCE", 64)
    rng = SecureRandom(key=KEY)

    drawn = rng.random_bytes(160).tobytes()

    assert drawn[:64] == chacha20_keystream(KEY, stream_index=0, num_bytes=64)
    assert drawn[64:128] == chacha20_keystream(KEY, stream_index=1, num_bytes=64)
    assert drawn[128:] == chacha20_keystream(KEY, stream_index=2, num_bytes=32)


def test_repr_hides_key() -> None:
    text = repr(SecureRandom(key=KEY))

    assert KEY.hex() not in text
    assert str(list(KEY)) not in text


@pytest.mark.parametrize("key", [b"short", bytes(33), "0" * 32])
def test_invalid_key_rejected(key: object) -> None:
    with pytest.raises(ValueError, match=r"key must be 32 bytes\. Found"):
        SecureRandom(key=key)  # type: ignore[arg-type]


def test_uniform_on_53_bit_grid() -> None:
    values = SecureRandom().uniform(100_000)
    scaled = values * 2.0**53

    assert values.dtype == np.float64
    assert np.all(values >= 0.0)
    assert np.all(values < 1.0)
    assert np.array_equal(scaled, np.floor(scaled))


def test_uniform_distribution() -> None:
    values = SecureRandom().uniform(100_000)

    result = stats.kstest(values, "uniform")

    assert result.pvalue > FALSE_FAILURE_RATE


def test_integers_range_and_frequencies() -> None:
    high = 10
    values = SecureRandom().integers(100_000, high=high)
    counts = np.bincount(values, minlength=high)
    threshold = stats.chi2.isf(FALSE_FAILURE_RATE, df=high - 1)

    statistic = stats.chisquare(counts).statistic

    assert values.dtype == np.int64
    assert values.min() >= 0
    assert values.max() < high
    assert statistic < threshold


def test_integers_extreme_bounds() -> None:
    rng = SecureRandom()

    assert np.all(rng.integers(10, high=1) == 0)
    assert np.all(rng.integers(1000, high=2**63) >= 0)


@pytest.mark.parametrize("high", [0, -1, 2**63 + 1])
def test_integers_high_out_of_range(high: int) -> None:
    with pytest.raises(ValueError, match=r"high must be in \[1, 2\*\*63\]"):
        SecureRandom().integers(3, high=high)


def test_integers_high_not_int() -> None:
    with pytest.raises(ValueError, match=r"high must be an int\. Found 2\.5"):
        SecureRandom().integers(3, high=2.5)  # type: ignore[arg-type]


def test_normal_shape_and_dtype() -> None:
    values = SecureRandom().normal((3, 5), std=2.0)

    assert values.shape == (3, 5)
    assert values.dtype == np.float64


def test_normal_odd_count() -> None:
    assert SecureRandom().normal(7).shape == (7,)


def test_normal_distribution() -> None:
    std = 3.0
    values = SecureRandom().normal(100_000, std=std)

    result = stats.kstest(values / std, "norm")

    assert result.pvalue > FALSE_FAILURE_RATE


@pytest.mark.parametrize("std", [1e-170, 1e-300, 1e160, MAX_GAUSSIAN_STD])
def test_normal_extreme_std_keeps_its_scale(std: float) -> None:
    # std**2 underflows to 0 below about 1e-162 and overflows above 1e154,
    # so a sampler that squares std draws zeros or infinities here.
    values = SecureRandom().normal(10_000, std=std)

    assert np.all(np.isfinite(values))
    result = stats.kstest(values / std, "norm")
    assert result.pvalue > FALSE_FAILURE_RATE


def test_normal_std_above_limit_rejected() -> None:
    std = MAX_GAUSSIAN_STD * 2

    with pytest.raises(ValueError, match=r"std must be at most .*Found 2\.2"):
        SecureRandom().normal(3, std=std)


@pytest.mark.parametrize("std", [-1.0, float("nan"), float("inf")])
def test_normal_invalid_std(std: float) -> None:
    with pytest.raises(ValueError, match=r"std must be finite and non-negative"):
        SecureRandom().normal(3, std=std)


def test_negative_size_rejected() -> None:
    with pytest.raises(ValueError, match=r"size must be a non-negative int\. Found -1"):
        SecureRandom().uniform(-1)


def test_empty_draws() -> None:
    rng = SecureRandom()

    assert rng.uniform(0).shape == (0,)
    assert rng.normal(0).shape == (0,)
    assert rng.integers(0, high=5).shape == (0,)
