import hashlib
import math
import random
import subprocess
import sys

import nacl.bindings as sodium
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from threadpoolctl import ThreadpoolController

from fedsec_flwr.core import commitments as c
from fedsec_flwr.core.errors import AuthenticationError
from fedsec_flwr.core.keys import derive_key

Q = c.GROUP_ORDER
GROUP = c.ED25519_GROUP
IDENTITY = c.ED25519_IDENTITY

RUN_ID = 7
SERVER_ROUND = 3
KEY_LIST_DIGEST = bytes(range(32, 64))

# The Ed25519 base point of RFC 8032: y = 4/5 mod 2**255 - 19, x even.
BASE_POINT = bytes.fromhex(
    "5866666666666666666666666666666666666666666666666666666666666666"
)
# y = -1 mod 2**255 - 19: the point of order 2.
ORDER_TWO_POINT = bytes.fromhex(
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"
)

# Pinned outputs of this module. A change here changes every commitment, so
# clients and auditors of two versions would no longer agree.
GOLDEN_BLINDING_GENERATOR = (
    "0bfe1237ab64a6c3085852364f71d7aeb20a3dd9128f1b7ad894bc8054a1e5ab"
)
GOLDEN_WEIGHTS_SHA256 = (
    "58236d62e8be6f8c12721e3cbaeb2503780528ea4575d08d4a4f89670a45830a"
)
GOLDEN_PROJECTION = 293527134644233904194756567571859082539432938182500007455344860496670775886770839947400000
GOLDEN_SEED = "619098c1f06686e0fb9e830a3b6973df036cf4469c5ba190f9c2c33f0616bbcc"


class SmallGroup:
    """The order-q subgroup of Z_p^* for p = 2039, with H = G**TRAPDOOR.

    Its logarithms are known, so commitments in it hide but bind nothing.
    It has the interface of `commitments.CommitmentGroup`.
    """

    modulus = 2039
    order = 1019
    element_size = 2
    generator = 4
    trapdoor = 321
    blinding_weights = (123, 456, 789)

    def combination(self, value: int, blinding: int) -> bytes:
        exponent = (value + self.trapdoor * blinding) % self.order
        return self.encode(pow(self.generator, exponent, self.modulus))

    def sum(self, elements) -> bytes:
        product = 1
        for element in elements:
            product = product * int.from_bytes(element, "big") % self.modulus
        return self.encode(product)

    def is_element(self, data: bytes) -> bool:
        value = int.from_bytes(data, "big")
        return 1 < value < self.modulus and pow(value, self.order, self.modulus) == 1

    def encode(self, value: int) -> bytes:
        return value.to_bytes(self.element_size, "big")


SMALL = SmallGroup()
SMALL_PRIME = SmallGroup.modulus
SMALL_ORDER = SmallGroup.order
TRAPDOORS = SmallGroup.blinding_weights

MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13)


def is_probable_prime(n: int) -> bool:
    """Miller-Rabin with the first six primes as bases."""
    if n < 2:
        return False
    for base in MILLER_RABIN_BASES:
        if n % base == 0:
            return n == base
    odd, exponent = n - 1, 0
    while odd % 2 == 0:
        odd //= 2
        exponent += 1
    for base in MILLER_RABIN_BASES:
        x = pow(base, odd, n)
        if x in (1, n - 1):
            continue
        for _ in range(exponent - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def honest_round(n: int, d: int, seed: int) -> dict:
    """Updates, blindings, aggregate, limb sums, seed and commitments."""
    rng = np.random.default_rng(seed)
    draw = random.Random(seed).randbytes
    node_ids = [int(i) for i in rng.choice(2**40, size=n, replace=False)]
    updates = {
        node_id: rng.integers(0, 2**32 // n, size=d, dtype=np.uint32)
        for node_id in node_ids
    }
    blindings = {node_id: c.draw_blinding(random_bytes=draw) for node_id in node_ids}

    aggregate = np.zeros(d, dtype=np.uint32)
    blinding_sums = np.zeros(c.BLINDING_LIMBS, dtype=np.uint32)
    for node_id in node_ids:
        aggregate += updates[node_id]
        blinding_sums += blindings[node_id]

    rho_seed = c.projection_seed(
        run_id=RUN_ID,
        server_round=SERVER_ROUND,
        node_ids=node_ids,
        aggregate=aggregate,
        blinding_sums=blinding_sums,
        key_list_digest=KEY_LIST_DIGEST,
    )
    commitments = {
        node_id: c.commit(
            c.project(updates[node_id], rho_seed=rho_seed),
            blinding=blindings[node_id],
        )
        for node_id in node_ids
    }
    return {
        "node_ids": node_ids,
        "updates": updates,
        "blindings": blindings,
        "aggregate": aggregate,
        "blinding_sums": blinding_sums,
        "rho_seed": rho_seed,
        "commitments": commitments,
    }


@pytest.fixture(scope="module")
def round_of_ten() -> dict:
    return honest_round(10, 3000, seed=1)


def verify(round_data: dict, **changes) -> c.VerificationResult:
    arguments = {
        "commitments": round_data["commitments"],
        "aggregate": round_data["aggregate"],
        "blinding_sums": round_data["blinding_sums"],
        "rho_seed": round_data["rho_seed"],
    }
    arguments.update(changes)
    return c.verify_aggregate(
        arguments["commitments"],
        arguments["aggregate"],
        blinding_sums=arguments["blinding_sums"],
        rho_seed=arguments["rho_seed"],
    )


def seed_for(round_data: dict, aggregate: np.ndarray, **changes) -> bytes:
    arguments = {
        "run_id": RUN_ID,
        "server_round": SERVER_ROUND,
        "node_ids": round_data["node_ids"],
        "aggregate": aggregate,
        "blinding_sums": round_data["blinding_sums"],
        "key_list_digest": KEY_LIST_DIGEST,
    }
    arguments.update(changes)
    return c.projection_seed(**arguments)


def reference_keystream_words(rho_seed: bytes, count: int) -> list[int]:
    """The first `count` keystream words, from the key schedule and AES-256-ECB.

    Counter mode encrypts the counter blocks 0, 1, ... as big-endian 128-bit
    integers, and each word reads its block of keystream little-endian.
    """
    key = derive_key(rho_seed, info=c.PROJECTION_KEY_INFO)
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    counters = b"".join(j.to_bytes(16, "big") for j in range(count))
    blocks = encryptor.update(counters) + encryptor.finalize()
    return [
        int.from_bytes(blocks[16 * j : 16 * j + 16], "little") for j in range(count)
    ]


def reference_weights(rho_seed: bytes, length: int) -> list[int]:
    """rho_j = u_a * v_b for j = a * C + b, as the module docstring defines it."""
    columns = c.PROJECTION_COLUMNS
    rows = -(-length // columns)
    words = reference_keystream_words(rho_seed, columns + rows)
    column_weights, row_weights = words[:columns], words[columns:]
    return [
        row_weights[j // columns] * column_weights[j % columns] for j in range(length)
    ]


def reference_projection(vector: np.ndarray, rho_seed: bytes) -> int:
    weights = reference_weights(rho_seed, vector.size)
    return sum(w * int(x) for w, x in zip(weights, vector.tolist(), strict=True))


# Group constants


def point_times(scalar: int, point: bytes) -> bytes:
    """scalar * point by double-and-add over libsodium's point addition."""
    total, addend = IDENTITY, point
    while scalar:
        if scalar & 1:
            total = sodium.crypto_core_ed25519_add(total, addend)
        addend = sodium.crypto_core_ed25519_add(addend, addend)
        scalar >>= 1
    return total


def test_order_is_the_ed25519_prime():
    assert Q == 2**252 + 27742317777372353535851937790883648493
    assert is_probable_prime(Q)


def test_miller_rabin_rejects_composites():
    assert not is_probable_prime(Q * 3)
    assert not is_probable_prime(3215031751)  # strong pseudoprime to 2, 3, 5, 7
    assert not is_probable_prime(Q - 2)


@pytest.mark.parametrize("name", ["base", "blinding"])
def test_generators_have_order_q(name):
    point = BASE_POINT if name == "base" else GROUP.blinding_generator

    assert point_times(Q, point) == IDENTITY
    assert point_times(Q - 1, point) != IDENTITY
    assert GROUP.is_element(point)


def test_base_multiple_matches_libsodium():
    assert (
        sodium.crypto_scalarmult_ed25519_base_noclamp((1).to_bytes(32, "little"))
        == BASE_POINT
    )
    assert GROUP.combination(5, 0) == point_times(5, BASE_POINT)


def test_blinding_generator_is_sum_of_two_elligator_images():
    images = [
        sodium.crypto_core_ed25519_from_uniform(
            hashlib.sha512(c.BLINDING_GENERATOR_DOMAIN + bytes([index])).digest()[:32]
        )
        for index in (0, 1)
    ]

    expected = sodium.crypto_core_ed25519_add(images[0], images[1])

    assert GROUP.blinding_generator == expected
    assert GROUP.blinding_generator != BASE_POINT


def test_blinding_generator_matches_golden_value():
    assert GROUP.blinding_generator.hex() == GOLDEN_BLINDING_GENERATOR


def test_blinding_weights_are_sha512_mod_q():
    for index in (0, 1, 255):
        domain = c.BLINDING_WEIGHT_DOMAIN + index.to_bytes(4, "big")
        digest = hashlib.sha512(domain).digest()

        assert GROUP.blinding_weights[index] == int.from_bytes(digest, "little") % Q


def test_blinding_weights_match_golden_value():
    encoded = b"".join(t.to_bytes(32, "little") for t in GROUP.blinding_weights)

    assert len(GROUP.blinding_weights) == c.BLINDING_LIMBS
    assert len(set(GROUP.blinding_weights)) == c.BLINDING_LIMBS
    assert hashlib.sha256(encoded).hexdigest() == GOLDEN_WEIGHTS_SHA256


def test_group_rejects_no_blinding_weights():
    with pytest.raises(ValueError, match=r"blinding_limbs must be positive\. Found 0"):
        c.Ed25519Group(blinding_limbs=0)


def small_order_points() -> list[bytes]:
    """The identity, the point of order 2 and two points of order 4."""
    order_four = [
        bytes(32),  # y = 0, x = +-sqrt(-1)
        bytes(31) + b"\x80",
    ]
    return [IDENTITY, ORDER_TWO_POINT, *order_four]


def test_group_membership_rejects_small_order_points():
    for point in small_order_points():
        assert not c.is_group_element(point)


def test_group_membership_rejects_points_with_torsion():
    mixed = sodium.crypto_core_ed25519_add(GROUP.blinding_generator, ORDER_TWO_POINT)

    assert not c.is_group_element(mixed)
    assert point_times(2, mixed) == point_times(2, GROUP.blinding_generator)


def test_group_membership_rejects_non_canonical_encoding():
    # y = 2**255 - 19 + 1 encodes y = 1 without reduction.
    non_canonical = (2**255 - 19 + 1).to_bytes(32, "little")

    assert not c.is_group_element(non_canonical)


def test_group_membership_rejects_points_off_the_curve():
    # y = 2 gives x**2 = 3 / (4d + 1), which has no square root mod p.
    off_curve = (2).to_bytes(32, "little")

    assert not c.is_group_element(off_curve)


@pytest.mark.parametrize("value", [b"", bytes(31), bytes(33), 5, "58" * 32, None])
def test_group_membership_rejects_malformed_values(value):
    assert not c.is_group_element(value)


def test_small_group_is_safe_prime_group():
    assert is_probable_prime(SMALL_PRIME)
    assert is_probable_prime(SMALL_ORDER)
    assert SMALL_PRIME == 2 * SMALL_ORDER + 1
    assert SMALL.is_element(SMALL.combination(1, 0))


COLUMNS = c.PROJECTION_COLUMNS
BLOCK_VALUES = c._ROWS_PER_BLOCK * COLUMNS


@pytest.mark.parametrize(
    "length",
    [0, 1, 7, COLUMNS - 1, COLUMNS, COLUMNS + 1, BLOCK_VALUES, BLOCK_VALUES + 3],
)
def test_project_matches_reference(length):
    rng = np.random.default_rng(length)
    vector = rng.integers(0, 2**32, size=length, dtype=np.uint32)
    rho_seed = bytes(range(32))

    assert c.project(vector, rho_seed=rho_seed) == reference_projection(
        vector, rho_seed
    )


def test_project_exact_at_max_values():
    vector = np.full(3 * COLUMNS + 5, 2**32 - 1, dtype=np.uint32)
    rho_seed = bytes(32)

    assert c.project(vector, rho_seed=rho_seed) == reference_projection(
        vector, rho_seed
    )


def test_row_projections_exact_at_maximum():
    # The worst case for float64 rounding: full rows of the largest values
    # times column weights whose bytes are all 255, so every row sum is
    # C * (2**32 - 1) * 255 in each byte position, just below 2**53.
    rows = c._ROWS_PER_BLOCK
    vector = np.full(rows * COLUMNS, 2**32 - 1, dtype=np.uint32)
    block = np.empty((rows, COLUMNS), dtype=np.float64)
    column_weights = np.full((COLUMNS, 16), 255.0)

    row_values = c._row_projections(vector, 0, block, column_weights)

    assert COLUMNS * (2**32 - 1) * 255 < 2**53
    assert row_values == [COLUMNS * (2**32 - 1) * (2**128 - 1)] * rows


def test_project_restores_blas_threads():
    controller = ThreadpoolController()
    before = [info["num_threads"] for info in controller.info()]
    vector = np.arange(3 * COLUMNS, dtype=np.uint32)

    c.project(vector, rho_seed=bytes(32))

    after = [info["num_threads"] for info in ThreadpoolController().info()]
    assert after == before


def test_project_weights_cover_full_range():
    words = reference_keystream_words(bytes(range(32)), 4000)

    assert max(words) > 2**128 - 2**120
    assert max(words) < 2**128


def test_project_weights_all_distinct():
    # A coordinate's weight depends on both its row and its column, so an
    # error moved to another row or column is weighted differently.
    weights = reference_weights(bytes(range(32)), 2 * COLUMNS + 2)

    assert len(set(weights)) == len(weights)


def test_project_matches_golden_value():
    vector = np.arange(2 * COLUMNS + 5, dtype=np.uint32) * np.uint32(200_000)

    assert c.project(vector, rho_seed=bytes(range(32))) == GOLDEN_PROJECTION


def test_project_is_linear():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2**31, size=5000, dtype=np.uint32)
    y = rng.integers(0, 2**31, size=5000, dtype=np.uint32)
    rho_seed = bytes(range(1, 33))

    assert c.project(x + y, rho_seed=rho_seed) == c.project(
        x, rho_seed=rho_seed
    ) + c.project(y, rho_seed=rho_seed)


def test_project_reads_strided_and_memory_mapped_input(tmp_path):
    rng = np.random.default_rng(4)
    vector = rng.integers(0, 2**32, size=40000, dtype=np.uint32)
    rho_seed = bytes(range(32))
    np.save(tmp_path / "v.npy", vector)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    strided = np.repeat(vector, 2)[::2]

    expected = c.project(vector, rho_seed=rho_seed)
    assert c.project(mapped, rho_seed=rho_seed) == expected
    assert c.project(strided, rho_seed=rho_seed) == expected


@pytest.mark.parametrize(
    ("vector", "rho_seed", "message"),
    [
        (np.zeros(3, dtype=np.int64), bytes(32), "dtype uint32"),
        (np.zeros((2, 2), dtype=np.uint32), bytes(32), "one-dimensional"),
        ([1, 2], bytes(32), "numpy array"),
        (np.zeros(3, dtype=np.uint32), bytes(31), "32 bytes long"),
        (np.zeros(3, dtype=np.uint32), "x" * 32, "must be bytes"),
    ],
)
def test_project_rejects_malformed_input(vector, rho_seed, message):
    with pytest.raises(ValueError, match=message):
        c.project(vector, rho_seed=rho_seed)


def test_project_same_in_another_process(tmp_path):
    rng = np.random.default_rng(9)
    update = rng.integers(0, 2**32, size=30000, dtype=np.uint32)
    rho_seed = bytes(range(64, 96))
    blinding = c.draw_blinding(random_bytes=random.Random(9).randbytes)
    np.save(tmp_path / "update.npy", update)
    script = (
        "import sys, numpy as np\n"
        "from fedsec_flwr.core import commitments as c\n"
        "update = np.load(sys.argv[1])\n"
        "value = c.project(update, rho_seed=bytes.fromhex(sys.argv[2]))\n"
        "print(value)\n"
        "blinding = np.frombuffer(bytes.fromhex(sys.argv[3]), dtype='<u4')\n"
        "print(c.commit(value, blinding=blinding.astype(np.uint32)).hex())\n"
    )

    output = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "update.npy"),
            rho_seed.hex(),
            blinding.astype("<u4").tobytes().hex(),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()

    value = c.project(update, rho_seed=rho_seed)
    assert int(output[0]) == value
    assert bytes.fromhex(output[1]) == c.commit(value, blinding=blinding)


# Projection seed


def test_projection_seed_matches_golden_value():
    vector = np.arange(1000, dtype=np.uint32) * np.uint32(4_000_000)

    seed = c.projection_seed(
        run_id=7,
        server_round=3,
        node_ids=[30, 10, 20],
        aggregate=vector,
        blinding_sums=np.arange(256, dtype=np.uint32),
        key_list_digest=KEY_LIST_DIGEST,
    )

    assert seed.hex() == GOLDEN_SEED


def test_projection_seed_ignores_node_id_order(round_of_ten):
    aggregate = round_of_ten["aggregate"]
    reordered = list(reversed(round_of_ten["node_ids"]))

    assert (
        seed_for(round_of_ten, aggregate, node_ids=reordered)
        == (round_of_ten["rho_seed"])
    )


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": RUN_ID + 1},
        {"server_round": SERVER_ROUND + 1},
        {"blinding_sums": np.ones(c.BLINDING_LIMBS, dtype=np.uint32)},
        {"key_list_digest": bytes(32)},
    ],
)
def test_projection_seed_binds_every_input(round_of_ten, change):
    seed = seed_for(round_of_ten, round_of_ten["aggregate"], **change)

    assert seed != round_of_ten["rho_seed"]


def test_projection_seed_binds_node_ids_and_aggregate(round_of_ten):
    aggregate = round_of_ten["aggregate"]
    changed = aggregate.copy()
    changed[-1] += 1

    fewer = seed_for(round_of_ten, aggregate, node_ids=round_of_ten["node_ids"][1:])
    assert fewer != round_of_ten["rho_seed"]
    assert seed_for(round_of_ten, changed) != round_of_ten["rho_seed"]
    assert seed_for(round_of_ten, aggregate[:-1]) != round_of_ten["rho_seed"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node_ids": []}, "must not be empty"),
        ({"node_ids": [1, 2, 1]}, "must be distinct"),
        ({"node_ids": [2**64]}, "must be a uint64"),
        ({"run_id": -1}, "run_id must be a uint64"),
        ({"blinding_sums": [1, 2]}, "blinding_sums must be a numpy array"),
        ({"key_list_digest": bytes(31)}, "key_list_digest must be 32 bytes"),
    ],
)
def test_projection_seed_rejects_malformed_input(round_of_ten, change, message):
    with pytest.raises(ValueError, match=message):
        seed_for(round_of_ten, round_of_ten["aggregate"], **change)


# Blinding vectors


def test_blinding_limb_constants_fit():
    assert c.MAX_BLINDING_CLIENTS * (2**16 - 1) <= 2**32 - 1
    assert (c.MAX_BLINDING_CLIENTS + 1) * (2**16 - 1) > 2**32 - 1
    assert c.MAX_BLINDING_CLIENTS >= 65535


def test_draw_blinding_shape_and_range():
    blinding = c.draw_blinding(random_bytes=random.Random(1).randbytes)

    assert blinding.dtype == np.uint32
    assert blinding.shape == (c.BLINDING_LIMBS,)
    assert int(blinding.max()) < 2**16
    assert int(blinding.max()) > 2**15


def test_draw_blinding_uses_given_source():
    sizes = []

    def source(size):
        sizes.append(size)
        return bytes([1, 2]) * (size // 2)

    blinding = c.draw_blinding(random_bytes=source)

    assert sizes == [2 * c.BLINDING_LIMBS]
    assert blinding.tolist() == [0x0201] * c.BLINDING_LIMBS


def test_draw_blinding_rejects_short_source():
    with pytest.raises(ValueError, match="random_bytes must return 512 bytes"):
        c.draw_blinding(random_bytes=lambda size: bytes(size - 1))


def test_draw_blinding_defaults_to_csprng():
    first = c.draw_blinding()
    second = c.draw_blinding()

    assert not np.array_equal(first, second)


def test_blinding_sums_fit_at_max_clients():
    # MAX_BLINDING_CLIENTS vectors of the largest values, summed modulo
    # 2**32 as secure aggregation does, keep their exact integer sum.
    sums = np.full(c.BLINDING_LIMBS, 2**16 - 1, dtype=np.uint64)
    sums *= c.MAX_BLINDING_CLIENTS

    assert int(sums.max()) <= 2**32 - 1


@pytest.mark.parametrize(
    ("blinding", "message"),
    [
        (np.full(c.BLINDING_LIMBS, 2**16, dtype=np.uint32), "below 2\\*\\*16"),
        (np.zeros(c.BLINDING_LIMBS - 1, dtype=np.uint32), "must have 256 values"),
        (np.zeros(c.BLINDING_LIMBS, dtype=np.uint16), "dtype uint32"),
    ],
)
def test_check_blinding_rejects_malformed_vector(blinding, message):
    with pytest.raises(ValueError, match=message) as raised:
        c.check_blinding(blinding)

    assert "65536" not in str(raised.value)


# Commitments


def test_commit_is_pedersen_commitment():
    blinding = c.draw_blinding(random_bytes=random.Random(2).randbytes)
    scalar = sum(
        t * int(value)
        for t, value in zip(GROUP.blinding_weights, blinding.tolist(), strict=True)
    )
    expected = sodium.crypto_core_ed25519_add(
        point_times(12, BASE_POINT), point_times(scalar % Q, GROUP.blinding_generator)
    )

    commitment = c.commit(12, blinding=blinding)

    assert commitment == expected
    assert len(commitment) == c.COMMITMENT_SIZE
    assert c.is_group_element(commitment)


def test_blinding_scalar_is_weighted_sum_mod_q():
    limbs = np.full(c.BLINDING_LIMBS, 2**16 - 1, dtype=np.uint32)

    expected = sum(GROUP.blinding_weights) * (2**16 - 1) % Q

    assert c.blinding_scalar(limbs) == expected


def test_commit_reduces_value_mod_q():
    blinding = np.arange(c.BLINDING_LIMBS, dtype=np.uint32)

    assert c.commit(Q + 5, blinding=blinding) == c.commit(5, blinding=blinding)


def test_commit_of_zero_value_and_blinding_is_identity():
    zeros = np.zeros(c.BLINDING_LIMBS, dtype=np.uint32)

    assert c.commit(0, blinding=zeros) == IDENTITY
    assert c.commit(Q, blinding=zeros) == IDENTITY
    assert not c.is_group_element(IDENTITY)


def test_commitments_add_like_their_openings():
    first = np.arange(c.BLINDING_LIMBS, dtype=np.uint32)
    second = np.full(c.BLINDING_LIMBS, 7, dtype=np.uint32)

    total = GROUP.sum([c.commit(40, blinding=first), c.commit(2, blinding=second)])

    assert total == c.commit(42, blinding=first + second)


def test_commit_rejects_negative_value():
    with pytest.raises(ValueError, match="value must be non-negative"):
        c.commit(-1, blinding=np.zeros(c.BLINDING_LIMBS, dtype=np.uint32))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes(31), "must be 32 bytes long. Found 31 bytes"),
        (bytes(384), "must be 32 bytes long. Found 384 bytes"),
        ("00" * 32, "must be bytes. Found str"),
    ],
)
def test_check_commitment_rejects_malformed_bytes(data, message):
    with pytest.raises(ValueError, match=f"commitment {message}"):
        c.check_commitment("commitment", data)


# Verification of honest rounds


@pytest.mark.parametrize(("n", "seed"), [(1, 11), (3, 12), (10, 13)])
def test_honest_clients_verify(n, seed):
    d = int(np.random.default_rng(seed).integers(1, 5000))
    round_data = honest_round(n, d, seed=seed)

    assert verify(round_data) == c.VerificationResult(True)


def test_verify_ignores_commitment_order(round_of_ten):
    reordered = dict(reversed(list(round_of_ten["commitments"].items())))

    assert verify(round_of_ten, commitments=reordered).verified


def test_verified_result_does_not_raise(round_of_ten):
    verify(round_of_ten).require_verified()


def test_failed_result_raises_authentication_error():
    with pytest.raises(AuthenticationError, match=r"^Aggregate verification failed\.$"):
        c.VerificationResult(False, "a reason").require_verified()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"commitments": {}}, "must not be empty"),
        ({"commitments": {-1: 4}}, "must be a uint64"),
        ({"blinding_sums": np.zeros(3, dtype=np.uint32)}, "must have 256 values"),
        ({"aggregate": np.zeros(3, dtype=np.int32)}, "dtype uint32"),
        ({"rho_seed": b"short"}, "32 bytes long"),
    ],
)
def test_verify_rejects_malformed_input(round_of_ten, change, message):
    with pytest.raises(ValueError, match=message):
        verify(round_of_ten, **change)


# Hostile servers


def test_tamper_one_coordinate_plus_one_detected(round_of_ten):
    for index in (0, round_of_ten["aggregate"].size - 1):
        aggregate = round_of_ten["aggregate"].copy()
        aggregate[index] += 1
        # Clients commit under the seed of the aggregate they are shown.
        rho_seed = seed_for(round_of_ten, aggregate)
        commitments = recommit(round_of_ten, rho_seed)

        result = verify(
            round_of_ten,
            aggregate=aggregate,
            rho_seed=rho_seed,
            commitments=commitments,
        )

        assert result == c.VerificationResult(False, c._SUM_MISMATCH)


def test_tamper_aggregate_with_old_seed_detected(round_of_ten):
    aggregate = round_of_ten["aggregate"].copy()
    aggregate[7] -= 1

    assert not verify(round_of_ten, aggregate=aggregate).verified


def test_tamper_included_update_dropped_from_sum(round_of_ten):
    dropped = round_of_ten["node_ids"][0]
    aggregate = round_of_ten["aggregate"] - round_of_ten["updates"][dropped]
    rho_seed = seed_for(round_of_ten, aggregate)
    commitments = recommit(round_of_ten, rho_seed)

    result = verify(
        round_of_ten, aggregate=aggregate, rho_seed=rho_seed, commitments=commitments
    )

    assert not result.verified


def test_tamper_included_client_missing_from_commitments(round_of_ten):
    missing = round_of_ten["node_ids"][0]
    commitments = dict(round_of_ten["commitments"])
    del commitments[missing]

    assert not verify(round_of_ten, commitments=commitments).verified


def test_tamper_substituted_update_detected(round_of_ten):
    substituted = round_of_ten["node_ids"][1]
    forged_update = round_of_ten["updates"][substituted].copy()
    forged_update[::2] = 0
    aggregate = (
        round_of_ten["aggregate"] - round_of_ten["updates"][substituted] + forged_update
    )
    rho_seed = seed_for(round_of_ten, aggregate)

    result = verify(
        round_of_ten,
        aggregate=aggregate,
        rho_seed=rho_seed,
        commitments=recommit(round_of_ten, rho_seed),
    )

    assert not result.verified


def test_tamper_previous_round_aggregate_replayed():
    previous = honest_round(4, 2000, seed=21)
    current = honest_round(4, 2000, seed=22)
    current["node_ids"] = previous["node_ids"]
    # The server releases the previous round's aggregate in this round, so
    # clients derive the seed of this round from it and commit.
    rho_seed = seed_for(current, previous["aggregate"])
    commitments = {
        new_id: c.commit(
            c.project(current["updates"][old_id], rho_seed=rho_seed),
            blinding=current["blindings"][old_id],
        )
        for new_id, old_id in zip(previous["node_ids"], current["updates"], strict=True)
    }

    result = c.verify_aggregate(
        commitments,
        previous["aggregate"],
        blinding_sums=current["blinding_sums"],
        rho_seed=rho_seed,
    )

    assert not result.verified


def test_tamper_blinding_sums_changed(round_of_ten):
    for index in (0, c.BLINDING_LIMBS - 1):
        blinding_sums = round_of_ten["blinding_sums"].copy()
        blinding_sums[index] += 1

        assert not verify(round_of_ten, blinding_sums=blinding_sums).verified


def test_tamper_blinding_sums_zeroed(round_of_ten):
    zeros = np.zeros(c.BLINDING_LIMBS, dtype=np.uint32)

    assert not verify(round_of_ten, blinding_sums=zeros).verified


def test_tamper_commitment_from_another_round(round_of_ten):
    other_seed = seed_for(round_of_ten, round_of_ten["aggregate"], server_round=2)
    node_id = round_of_ten["node_ids"][2]
    commitments = dict(round_of_ten["commitments"])
    commitments[node_id] = c.commit(
        c.project(round_of_ten["updates"][node_id], rho_seed=other_seed),
        blinding=round_of_ten["blindings"][node_id],
    )

    assert not verify(round_of_ten, commitments=commitments).verified


def test_tamper_commitment_from_another_client(round_of_ten):
    first, second = round_of_ten["node_ids"][:2]
    commitments = dict(round_of_ten["commitments"])
    commitments[first] = commitments[second]

    assert not verify(round_of_ten, commitments=commitments).verified


@pytest.mark.parametrize("index", range(4))
def test_tamper_small_order_commitment_rejected(round_of_ten, index):
    node_id = round_of_ten["node_ids"][3]
    commitments = dict(round_of_ten["commitments"])
    commitments[node_id] = small_order_points()[index]

    result = verify(round_of_ten, commitments=commitments)

    assert result == c.VerificationResult(
        False, f"the commitment of node {node_id} is not a group element"
    )


def test_tamper_torsion_pair_keeps_sum_but_fails(round_of_ten):
    # Adding the point of order 2 to two commitments keeps their sum, so
    # only the per-commitment membership check catches it.
    first, second = round_of_ten["node_ids"][:2]
    commitments = dict(round_of_ten["commitments"])
    for node_id in (first, second):
        commitments[node_id] = sodium.crypto_core_ed25519_add(
            commitments[node_id], ORDER_TWO_POINT
        )

    result = verify(round_of_ten, commitments=commitments)

    assert GROUP.sum(list(commitments.values())) == GROUP.sum(
        list(round_of_ten["commitments"].values())
    )
    assert result == c.VerificationResult(
        False, f"the commitment of node {min(first, second)} is not a group element"
    )


@pytest.mark.parametrize(
    "value", [b"", bytes(31), bytes(33), (2**255 - 18).to_bytes(32, "little"), 1.0]
)
def test_tamper_malformed_commitment_rejected(round_of_ten, value):
    node_id = round_of_ten["node_ids"][0]
    commitments = dict(round_of_ten["commitments"])
    commitments[node_id] = value

    assert not verify(round_of_ten, commitments=commitments).verified


def recommit(round_data: dict, rho_seed: bytes) -> dict[int, bytes]:
    return {
        node_id: c.commit(
            c.project(round_data["updates"][node_id], rho_seed=rho_seed),
            blinding=round_data["blindings"][node_id],
        )
        for node_id in round_data["node_ids"]
    }


# Hiding and binding in a group with known logarithm H = G**TRAPDOOR


def trapdoor_blinding(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


def box_exponent_distribution(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Distribution of sum_k t_k l_k mod q for l uniform in the box [low, high]."""
    distribution = np.zeros(SMALL_ORDER)
    distribution[0] = 1.0
    for t, lo, hi in zip(TRAPDOORS, low.tolist(), high.tolist(), strict=True):
        residues = (t * np.arange(lo, hi + 1)) % SMALL_ORDER
        limb = np.bincount(residues, minlength=SMALL_ORDER) / (hi - lo + 1)
        # Circular convolution modulo q.
        spectrum = np.fft.rfft(distribution) * np.fft.rfft(limb)
        distribution = np.fft.irfft(spectrum, n=SMALL_ORDER)
    return distribution


def test_blinding_hides_over_a_full_period():
    subgroup = {SMALL.encode(pow(4, k, SMALL_PRIME)) for k in range(SMALL_ORDER)}

    for value in (0, 5, 700, 10**30):
        commitments = {
            c.commit(value, blinding=trapdoor_blinding(r, 0, 0), group=SMALL)
            for r in range(SMALL_ORDER)
        }
        assert commitments == subgroup


def test_blinding_exponent_near_uniform_given_limb_sums():
    # Two clients, and the server receives only L = l_1 + l_2. Given L, l_1 is
    # uniform in a box, and its blinding scalar sum_k t_k l_1[k] mod q, which
    # shifts the commitment, is close to uniform whatever the value is.
    rng = np.random.default_rng(12)
    top = 2**16 - 1
    first = rng.integers(0, 2**16, size=3)
    second = rng.integers(0, 2**16, size=3)
    sums = first + second
    low = np.maximum(0, sums - top)
    high = np.minimum(top, sums)

    distribution = box_exponent_distribution(low, high)
    distance = 0.5 * np.abs(distribution - 1 / SMALL_ORDER).sum()

    assert distribution.sum() == pytest.approx(1.0)
    assert distance < 1e-6


def test_blinding_min_entropy_exceeds_order_with_margin():
    # Two honest clients: given the limb sums, each limb keeps
    # log2(2**32 / (2**17 - 1)) bits of average min-entropy. A margin of
    # 2 * 897 bits gives a leftover-hash-lemma distance of 2**-897.
    bits_per_limb = math.log2((2**16) ** 2 / (2**17 - 1))
    min_entropy = c.BLINDING_LIMBS * bits_per_limb

    assert min_entropy - math.log2(Q) >= 2 * 897


def test_different_updates_share_commitment_with_matched_blinding():
    # C = G**(m + trapdoor * s(l)): for m' != m, changing l_0 by
    # (m - m') / (trapdoor * t_0) gives the same commitment, so C alone
    # reveals nothing about m.
    rng = np.random.default_rng(6)
    rho_seed = bytes(range(32))
    x = rng.integers(0, 2**32, size=100, dtype=np.uint32)
    x_other = rng.integers(0, 2**32, size=100, dtype=np.uint32)
    m = c.project(x, rho_seed=rho_seed)
    m_other = c.project(x_other, rho_seed=rho_seed)
    inverse = pow(SMALL.trapdoor * TRAPDOORS[0], -1, SMALL_ORDER)
    blinding = trapdoor_blinding(77, 5000, 60000)
    blinding_other = blinding.copy()
    blinding_other[0] = (77 + (m - m_other) * inverse) % SMALL_ORDER

    commitment = c.commit(m, blinding=blinding, group=SMALL)
    commitment_other = c.commit(m_other, blinding=blinding_other, group=SMALL)

    assert m % SMALL_ORDER != m_other % SMALL_ORDER
    assert commitment == commitment_other


def test_trapdoor_lets_server_forge_under_a_known_seed():
    # Why the seed must hash the limb sums: a server that can compute log_G H
    # and learns rho before it fixes L passes a wrong aggregate by adjusting L.
    rng = np.random.default_rng(8)
    updates = [rng.integers(0, 2**20, size=50, dtype=np.uint32) for _ in range(3)]
    blindings = [trapdoor_blinding(11 * i, 22 * i, 33 * i) for i in (1, 2, 3)]
    rho_seed = bytes(range(32))
    commitments = {
        node_id: c.commit(
            c.project(update, rho_seed=rho_seed), blinding=blinding, group=SMALL
        )
        for node_id, (update, blinding) in enumerate(
            zip(updates, blindings, strict=True)
        )
    }
    forged = sum(updates)
    forged[0] += 1
    shift = c.project(forged, rho_seed=rho_seed) - c.project(
        sum(updates), rho_seed=rho_seed
    )
    forged_sums = sum(blindings)
    inverse = pow(SMALL.trapdoor * TRAPDOORS[0], -1, SMALL_ORDER)
    forged_sums[0] = (int(forged_sums[0]) - shift * inverse) % SMALL_ORDER

    result = c.verify_aggregate(
        commitments,
        forged,
        blinding_sums=forged_sums,
        rho_seed=rho_seed,
        group=SMALL,
    )

    assert result.verified
