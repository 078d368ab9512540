import hashlib
import hmac
import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.stats import chi2

from fedsec_flwr.core.masks import (
    MASK_DOMAIN,
    MAX_MASK_LENGTH,
    add_mask,
    chacha20_keystream,
    expand_mask,
    mask_key,
)

# RFC 8439, appendix A.1: keystream of the all-zero key and nonce, blocks 0
# (test vector #1) and 1 (test vector #2).
RFC8439_BLOCK_0 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)
RFC8439_BLOCK_1 = bytes.fromhex(
    "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
    "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"
)
VALUES_PER_BLOCK = 16

# Pinned output of this module for one seed and context. A change here changes
# every mask, so clients of two versions would no longer cancel.
GOLDEN_SEED = bytes(range(32))
GOLDEN_CONTEXT = b"golden-vector"
GOLDEN_FIRST_VALUES = [
    0x222BE03C,
    0xDB78E02A,
    0xC22A4472,
    0x9DEC40D6,
    0x786E27CB,
    0x536A236D,
    0xED527345,
    0x648A4BE5,
]
GOLDEN_LENGTH = 1_000_000
GOLDEN_SHA256 = "8e17a41b187f797251d56219f37e7daaa1b90481e911d73c4fe5397d98dab23c"

# Each uniformity test fails for a correct generator with this probability.
FALSE_FAILURE_RATE = 1e-6
NUM_BINS = 16

SEED = bytes(range(100, 132))
CONTEXT = b"run 1, round 2, nodes 3 and 4"


def reference_mask(seed: bytes, context: bytes, length: int) -> np.ndarray:
    """The mask construction written out with stdlib HMAC and bare ChaCha20."""
    pseudorandom_key = hmac.digest(bytes(32), seed, "sha256")
    key = hmac.digest(pseudorandom_key, MASK_DOMAIN + context + b"\x01", "sha256")
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    keystream = encryptor.update(bytes(4 * length))
    return np.frombuffer(keystream, dtype="<u4").astype(np.uint32)


def chi_square_statistic(bins: np.ndarray) -> float:
    counts = np.bincount(bins, minlength=NUM_BINS)
    expected = bins.size / NUM_BINS
    return float(np.sum((counts - expected) ** 2 / expected))


def test_keystream_rfc8439_block_0():
    words = chacha20_keystream(bytes(32), length=VALUES_PER_BLOCK)

    assert words.astype("<u4").tobytes() == RFC8439_BLOCK_0


def test_keystream_rfc8439_block_1():
    words = chacha20_keystream(bytes(32), length=2 * VALUES_PER_BLOCK)

    assert words[VALUES_PER_BLOCK:].astype("<u4").tobytes() == RFC8439_BLOCK_1


def test_keystream_bad_key_length():
    with pytest.raises(ValueError, match=r"key must be 32 bytes long\. Found 16"):
        chacha20_keystream(bytes(16), length=1)


def test_golden_first_values():
    mask = expand_mask(GOLDEN_SEED, context=GOLDEN_CONTEXT, length=8)

    assert mask.tolist() == GOLDEN_FIRST_VALUES


def test_golden_digest():
    mask = expand_mask(GOLDEN_SEED, context=GOLDEN_CONTEXT, length=GOLDEN_LENGTH)
    digest = hashlib.sha256(mask.astype("<u4").tobytes()).hexdigest()

    assert digest == GOLDEN_SHA256


@pytest.mark.parametrize("length", [1, 15, 16, 17, 65_536, 200_003])
def test_expand_mask_matches_reference(length):
    mask = expand_mask(SEED, context=CONTEXT, length=length)

    np.testing.assert_array_equal(mask, reference_mask(SEED, CONTEXT, length))


def test_mask_key_matches_reference():
    pseudorandom_key = hmac.digest(bytes(32), SEED, "sha256")
    expected = hmac.digest(pseudorandom_key, MASK_DOMAIN + CONTEXT + b"\x01", "sha256")

    assert mask_key(SEED, context=CONTEXT) == expected


def test_expand_mask_dtype_and_shape():
    mask = expand_mask(SEED, context=CONTEXT, length=1000)

    assert mask.dtype == np.uint32
    assert mask.shape == (1000,)
    assert mask.flags.writeable


def test_expand_mask_zero_length():
    mask = expand_mask(SEED, context=CONTEXT, length=0)

    assert mask.dtype == np.uint32
    assert mask.shape == (0,)


def test_expand_mask_prefix_stable():
    short = expand_mask(SEED, context=CONTEXT, length=10)
    long = expand_mask(SEED, context=CONTEXT, length=100_000)

    np.testing.assert_array_equal(short, long[:10])


def test_expand_mask_contexts_differ():
    first = expand_mask(SEED, context=b"round 1", length=64)
    second = expand_mask(SEED, context=b"round 2", length=64)
    empty = expand_mask(SEED, context=b"", length=64)

    assert not np.array_equal(first, second)
    assert not np.array_equal(first, empty)


@pytest.mark.parametrize("position", range(32))
def test_every_seed_byte_matters(position):
    changed = bytearray(SEED)
    changed[position] ^= 0x80

    original = expand_mask(SEED, context=CONTEXT, length=64)
    modified = expand_mask(bytes(changed), context=CONTEXT, length=64)

    assert not np.array_equal(original, modified)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_expand_mask_bad_seed_length(size):
    with pytest.raises(ValueError, match=rf"seed must be 32 bytes long\. Found {size}"):
        expand_mask(bytes(size), context=CONTEXT, length=4)


@pytest.mark.parametrize("length", [-1, MAX_MASK_LENGTH + 1])
def test_expand_mask_bad_length(length):
    message = rf"length must be between 0 and {MAX_MASK_LENGTH}\. Found {length}\."

    with pytest.raises(ValueError, match=message):
        expand_mask(SEED, context=CONTEXT, length=length)


@pytest.mark.parametrize(
    ("name", "shift"),
    [("top 4 bits", 28), ("bottom 4 bits", 0)],
)
def test_mask_bits_uniform(name, shift):
    mask = expand_mask(SEED, context=name.encode(), length=1_000_000)
    bins = (mask >> shift) & (NUM_BINS - 1)

    statistic = chi_square_statistic(bins)

    assert statistic < chi2.isf(FALSE_FAILURE_RATE, df=NUM_BINS - 1)


def test_chi_square_detects_bias():
    # A mask whose top bit is always clear must fail the same test.
    mask = expand_mask(SEED, context=CONTEXT, length=1_000_000) >> 1
    bins = mask >> 28

    statistic = chi_square_statistic(bins)

    assert statistic > chi2.isf(FALSE_FAILURE_RATE, df=NUM_BINS - 1)


def test_add_mask_wraps_modulo_2_32():
    rng = np.random.default_rng(1)
    accumulator = rng.integers(0, 2**32, size=1000, dtype=np.uint32)
    expected = accumulator.astype(np.int64)
    mask = expand_mask(SEED, context=CONTEXT, length=1000).astype(np.int64)

    add_mask(accumulator, SEED, context=CONTEXT, sign=1)

    np.testing.assert_array_equal(accumulator, (expected + mask) % 2**32)


def test_subtract_mask_wraps_modulo_2_32():
    rng = np.random.default_rng(2)
    accumulator = rng.integers(0, 2**32, size=1000, dtype=np.uint32)
    expected = accumulator.astype(np.int64)
    mask = expand_mask(SEED, context=CONTEXT, length=1000).astype(np.int64)

    add_mask(accumulator, SEED, context=CONTEXT, sign=-1)

    np.testing.assert_array_equal(accumulator, (expected - mask) % 2**32)


def test_add_then_subtract_restores():
    rng = np.random.default_rng(3)
    original = rng.integers(0, 2**32, size=10_000, dtype=np.uint32)
    accumulator = original.copy()

    add_mask(accumulator, SEED, context=CONTEXT, sign=1)
    masked = accumulator.copy()
    add_mask(accumulator, SEED, context=CONTEXT, sign=-1)

    assert not np.array_equal(masked, original)
    np.testing.assert_array_equal(accumulator, original)


def test_add_mask_multidimensional_uses_c_order():
    accumulator = np.zeros((3, 5), dtype=np.uint32)

    add_mask(accumulator, SEED, context=CONTEXT, sign=1)

    expected = expand_mask(SEED, context=CONTEXT, length=15)
    np.testing.assert_array_equal(accumulator.ravel(), expected)


@pytest.mark.parametrize("num_parties", [2, 3, 5])
def test_pairwise_masks_cancel(num_parties):
    rng = np.random.default_rng(num_parties)
    length = 1000
    inputs = rng.integers(0, 2**32, size=(num_parties, length), dtype=np.uint32)
    masked = inputs.copy()

    for i, j in itertools.combinations(range(num_parties), 2):
        seed = rng.bytes(32)
        context = f"pair {i} {j}".encode()
        add_mask(masked[i], seed, context=context, sign=1)
        add_mask(masked[j], seed, context=context, sign=-1)

    masked_sum = masked.sum(axis=0, dtype=np.uint32)
    plain_sum = inputs.sum(axis=0, dtype=np.uint32)
    for party in range(num_parties):
        assert not np.array_equal(masked[party], inputs[party])
    np.testing.assert_array_equal(masked_sum, plain_sum)


@pytest.mark.parametrize("sign", [0, 2, -2])
def test_add_mask_bad_sign(sign):
    accumulator = np.zeros(4, dtype=np.uint32)

    with pytest.raises(ValueError, match=rf"sign must be 1 or -1\. Found {sign}\."):
        add_mask(accumulator, SEED, context=CONTEXT, sign=sign)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.float32])
def test_add_mask_bad_dtype(dtype):
    accumulator = np.zeros(4, dtype=dtype)
    message = rf"accumulator must have dtype uint32\. Found {np.dtype(dtype)}\."

    with pytest.raises(ValueError, match=message):
        add_mask(accumulator, SEED, context=CONTEXT, sign=1)


def test_add_mask_not_an_array():
    with pytest.raises(ValueError, match=r"must be a numpy array\. Found list\."):
        add_mask([0, 0], SEED, context=CONTEXT, sign=1)


def test_add_mask_read_only():
    accumulator = np.zeros(4, dtype=np.uint32)
    accumulator.flags.writeable = False

    with pytest.raises(ValueError, match=r"accumulator must be writable"):
        add_mask(accumulator, SEED, context=CONTEXT, sign=1)


def test_add_mask_bad_seed_leaves_accumulator():
    accumulator = np.arange(4, dtype=np.uint32)

    with pytest.raises(ValueError, match=r"seed must be 32 bytes long"):
        add_mask(accumulator, bytes(8), context=CONTEXT, sign=1)

    np.testing.assert_array_equal(accumulator, np.arange(4, dtype=np.uint32))
