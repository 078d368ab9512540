import hashlib
import math
import random
import subprocess
import sys

import numpy as np
import pytest

from fedsec_flwr.core import commitments as c
from fedsec_flwr.core.errors import AuthenticationError
from fedsec_flwr.core.keys import derive_key
from fedsec_flwr.core.masks import chacha20_keystream

P = c.MODP_3072_PRIME
Q = c.GROUP_ORDER
GROUP = c.MODP_3072_GROUP

RUN_ID = 7
SERVER_ROUND = 3
KEY_LIST_DIGEST = bytes(range(32, 64))

# Pinned outputs of this module. A change here changes every commitment, so
# clients and auditors of two versions would no longer agree.
GOLDEN_GENERATORS_SHA256 = (
    "3b7ee8ac1e874346c2882729841a42e2c8579817822360547449be1dd5ec0ac7"
)
GOLDEN_PROJECTION = 342919244725236777502885469106047790280303496000000
GOLDEN_SEED = "619098c1f06686e0fb9e830a3b6973df036cf4469c5ba190f9c2c33f0616bbcc"

# A safe prime small enough to enumerate its subgroup, with generators
# h_k = g**t_k for known t_k: commitments in it are hiding but not binding.
SMALL_PRIME = 2039
SMALL_ORDER = 1019
TRAPDOORS = (123, 456, 789)
TRAPDOOR_GROUP = c.PedersenGroup(
    modulus=SMALL_PRIME,
    order=SMALL_ORDER,
    generator_root=2,
    blinding_roots=tuple(pow(2, t, SMALL_PRIME) for t in TRAPDOORS),
)

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


def arctan_inverse(x: int, one: int) -> int:
    """Fixed-point arctan(1/x) * one by its Taylor series."""
    total, term, k = 0, one // x, 0
    while term:
        total += term // (2 * k + 1) if k % 2 == 0 else -(term // (2 * k + 1))
        term //= x * x
        k += 1
    return total


def pi_times_power_of_two(bits: int) -> int:
    """floor(pi * 2**bits) by Machin's formula, with guard bits."""
    guard = 64
    one = 1 << (bits + guard)
    pi = 16 * arctan_inverse(5, one) - 4 * arctan_inverse(239, one)
    # The series truncation errs by far less than 2**32 units of the guard.
    low = pi & ((1 << guard) - 1)
    assert 2**32 < low < 2**guard - 2**32
    return pi >> guard


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


def reference_weights(rho_seed: bytes, length: int) -> list[int]:
    """The weights written out from the key schedule and bare ChaCha20."""
    key = derive_key(rho_seed, info=c.PROJECTION_KEY_INFO)
    words = chacha20_keystream(key, length=4 * length).tolist()
    return [sum(words[4 * j + k] << (32 * k) for k in range(4)) for j in range(length)]


def reference_projection(vector: np.ndarray, rho_seed: bytes) -> int:
    weights = reference_weights(rho_seed, vector.size)
    return sum(w * int(x) for w, x in zip(weights, vector.tolist(), strict=True))


# Group constants


def test_prime_matches_rfc3526_formula():
    expected = 2**3072 - 2**3008 - 1 + 2**64 * (pi_times_power_of_two(2942) + 1690314)

    assert expected == P


def test_prime_and_order_pass_miller_rabin():
    assert is_probable_prime(P)
    assert is_probable_prime(Q)
    assert P == 2 * Q + 1


def test_prime_and_order_pass_sympy():
    sympy = pytest.importorskip("sympy")

    assert sympy.isprime(P)
    assert sympy.isprime(Q)


def test_miller_rabin_rejects_composites():
    assert not is_probable_prime(P * 3)
    assert not is_probable_prime(3215031751)  # strong pseudoprime to 2, 3, 5, 7
    assert not is_probable_prime(Q - 2)


def test_generators_have_order_q():
    # Euler's criterion on a sample. Every generator is a square by
    # construction, which the next tests check.
    for generator in (GROUP.g, *GROUP.blinding_generators[:2]):
        assert pow(generator, Q, P) == 1


def test_generators_are_distinct_group_elements():
    generators = (GROUP.g, *GROUP.blinding_generators)

    assert len(GROUP.blinding_generators) == c.BLINDING_LIMBS
    assert len(set(generators)) == len(generators)
    assert 1 not in generators
    assert all(c.is_group_element(h, group=GROUP) for h in generators)


def test_blinding_generators_are_squared_sha512_expansions():
    for index in (0, 1, 255):
        domain = c.BLINDING_GENERATOR_DOMAIN + index.to_bytes(4, "big")
        expansion = b"".join(
            hashlib.sha512(domain + counter.to_bytes(4, "big")).digest()
            for counter in range(7)
        )
        root = int.from_bytes(expansion, "big") % P

        assert len(expansion) * 8 >= 3072 + 128
        assert pow(root, 2, P) == GROUP.blinding_generators[index]


def test_generator_g_is_four():
    assert GROUP.g == 4


def test_blinding_generators_match_golden_value():
    encoded = b"".join(
        h.to_bytes(c.COMMITMENT_SIZE, "big") for h in GROUP.blinding_generators
    )

    assert hashlib.sha256(encoded).hexdigest() == GOLDEN_GENERATORS_SHA256


def test_group_membership_matches_euler_criterion():
    rng = random.Random(5)
    values = [rng.randrange(1, P) for _ in range(8)]
    values += [1, 2, 3, P - 1, P - 2, GROUP.blinding_generators[0]]

    for value in values:
        assert c.is_group_element(value, group=GROUP) == (pow(value, Q, P) == 1)


@pytest.mark.parametrize("value", [0, P, P + 4, -4, True, 4.0, "4"])
def test_group_membership_rejects_non_elements(value):
    assert not c.is_group_element(value, group=GROUP)


def test_small_group_is_safe_prime_group():
    assert is_probable_prime(SMALL_PRIME)
    assert is_probable_prime(SMALL_ORDER)
    assert TRAPDOOR_GROUP.element_size == 2
    assert TRAPDOOR_GROUP.blinding_generators == tuple(
        pow(4, t, SMALL_PRIME) for t in TRAPDOORS
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"order": 1000}, "safe prime"),
        ({"generator_root": 1}, r"roots must be in \[2, p - 2\]"),
        ({"blinding_roots": (2038,)}, r"roots must be in \[2, p - 2\]"),
        ({"blinding_roots": ()}, "must not be empty"),
        ({"blinding_roots": (2,)}, "must all differ"),
        ({"blinding_roots": (3, 2036)}, "must all differ"),
    ],
)
def test_group_rejects_bad_parameters(fields, message):
    arguments = {
        "modulus": SMALL_PRIME,
        "order": SMALL_ORDER,
        "generator_root": 2,
        "blinding_roots": (3, 5),
    }
    arguments.update(fields)

    with pytest.raises(ValueError, match=message):
        c.PedersenGroup(**arguments)


def test_hash_to_root_gives_generator():
    root = c.hash_to_root(b"another domain", modulus=SMALL_PRIME)

    assert 2 <= root <= SMALL_PRIME - 2


# Projection


@pytest.mark.parametrize("length", [0, 1, 7, 16383, 16384, 16385])
def test_project_matches_reference(length):
    rng = np.random.default_rng(length)
    vector = rng.integers(0, 2**32, size=length, dtype=np.uint32)
    rho_seed = bytes(range(32))

    assert c.project(vector, rho_seed=rho_seed) == reference_projection(
        vector, rho_seed
    )


def test_project_exact_at_max_values():
    vector = np.full(20000, 2**32 - 1, dtype=np.uint32)
    rho_seed = bytes(32)

    assert c.project(vector, rho_seed=rho_seed) == reference_projection(
        vector, rho_seed
    )


def test_block_sums_exact_at_max_weights_and_values():
    # The worst case for uint64 overflow: a full block of the largest values
    # times weights of 2**128 - 1.
    block = c._PROJECTION_BLOCK
    values = np.full(block, 2**32 - 1, dtype=np.uint32)
    words = np.full((block, 4), 2**32 - 1, dtype=np.uint32)
    wide_words = np.empty((block, 4), dtype=np.uint64)
    halves = np.empty((2, block), dtype=np.uint64)

    sums = c._block_sums(values, words, wide_words=wide_words, halves=halves)

    expected = block * (2**16 - 1) * (2**32 - 1)
    assert sums == [[expected] * 4, [expected] * 4]


def test_project_weights_cover_full_range():
    weights = reference_weights(bytes(range(32)), 4000)

    assert max(weights) > 2**128 - 2**120
    assert max(weights) < 2**128


def test_project_matches_golden_value():
    vector = np.arange(1000, dtype=np.uint32) * np.uint32(4_000_000)

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
        "print(c.commit(value, blinding=blinding.astype(np.uint32)))\n"
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
    assert int(output[1]) == c.commit(value, blinding=blinding)


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


def test_blinding_min_entropy_exceeds_order_with_margin():
    # Two honest clients: given the limb sums, each limb keeps
    # log2(2**32 / (2**17 - 1)) bits of average min-entropy.
    bits_per_limb = math.log2((2**16) ** 2 / (2**17 - 1))
    min_entropy = c.BLINDING_LIMBS * bits_per_limb

    assert min_entropy - Q.bit_length() >= 2 * 384


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


def test_commit_is_pedersen_vector_commitment():
    blinding = c.draw_blinding(random_bytes=random.Random(2).randbytes)
    expected = pow(4, 12, P)
    for generator, exponent in zip(
        GROUP.blinding_generators, blinding.tolist(), strict=True
    ):
        expected = expected * pow(generator, exponent, P) % P

    commitment = c.commit(12, blinding=blinding)

    assert commitment == expected
    assert c.is_group_element(commitment, group=GROUP)


def test_commit_reduces_value_mod_q():
    blinding = np.arange(c.BLINDING_LIMBS, dtype=np.uint32)

    assert c.commit(Q + 5, blinding=blinding) == c.commit(5, blinding=blinding)


@pytest.mark.parametrize(
    "exponents",
    [[0, 0, 0], [1, 0, 2**32 - 1], [2**16 - 1, 2**16 - 1, 2**16 - 1], [64, 63, 65]],
)
def test_multi_power_matches_pow(exponents):
    bases = TRAPDOOR_GROUP.blinding_generators
    expected = 1
    for base, exponent in zip(bases, exponents, strict=True):
        expected = expected * pow(base, exponent, SMALL_PRIME) % SMALL_PRIME

    assert c._multi_power(bases, exponents, modulus=SMALL_PRIME) == expected


def test_commit_rejects_negative_value():
    with pytest.raises(ValueError, match="value must be non-negative"):
        c.commit(-1, blinding=np.zeros(c.BLINDING_LIMBS, dtype=np.uint32))


def test_commitment_encoding_round_trip():
    commitment = c.commit(99, blinding=np.ones(c.BLINDING_LIMBS, dtype=np.uint32))

    encoded = c.encode_commitment(commitment)

    assert len(encoded) == c.COMMITMENT_SIZE
    assert c.decode_commitment(encoded) == commitment


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes(383), "must be 384 bytes long"),
        (bytes(384), r"must be in \[1, p\)"),
        (P.to_bytes(384, "big"), r"must be in \[1, p\)"),
    ],
)
def test_decode_commitment_rejects_malformed_bytes(data, message):
    with pytest.raises(ValueError, match=message):
        c.decode_commitment(data)


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

        assert result == c.VerificationResult(False, c._PRODUCT_MISMATCH)


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


def test_tamper_commitment_outside_subgroup(round_of_ten):
    node_id = round_of_ten["node_ids"][3]
    commitments = dict(round_of_ten["commitments"])
    commitments[node_id] = P - commitments[node_id]

    result = verify(round_of_ten, commitments=commitments)

    assert result == c.VerificationResult(
        False, f"the commitment of node {node_id} is not a group element"
    )


def test_tamper_two_negated_commitments_keep_product_but_fail(round_of_ten):
    # -1 is a non-residue (p = 3 mod 4): negating two commitments keeps the
    # product, so only the per-commitment subgroup check catches it.
    first, second = round_of_ten["node_ids"][:2]
    commitments = dict(round_of_ten["commitments"])
    commitments[first] = P - commitments[first]
    commitments[second] = P - commitments[second]

    assert not verify(round_of_ten, commitments=commitments).verified


@pytest.mark.parametrize("value", [0, P, P + 1, 1.0])
def test_tamper_commitment_out_of_range(round_of_ten, value):
    node_id = round_of_ten["node_ids"][0]
    commitments = dict(round_of_ten["commitments"])
    commitments[node_id] = value

    assert not verify(round_of_ten, commitments=commitments).verified


def recommit(round_data: dict, rho_seed: bytes) -> dict[int, int]:
    return {
        node_id: c.commit(
            c.project(round_data["updates"][node_id], rho_seed=rho_seed),
            blinding=round_data["blindings"][node_id],
        )
        for node_id in round_data["node_ids"]
    }


# Hiding and binding in a group with known logarithms t_k = log_g h_k


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


def test_each_generator_hides_over_a_full_period():
    subgroup = {pow(4, k, SMALL_PRIME) for k in range(SMALL_ORDER)}

    for value in (0, 5, 700, 10**30):
        commitments = {
            c.commit(value, blinding=trapdoor_blinding(r, 0, 0), group=TRAPDOOR_GROUP)
            for r in range(SMALL_ORDER)
        }
        assert commitments == subgroup


def test_blinding_exponent_near_uniform_given_limb_sums():
    # Two clients, and the server receives only L = l_1 + l_2. Given L, l_1 is
    # uniform in a box, and its exponent sum_k t_k l_1[k] mod q, which
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


def test_different_updates_share_commitment_with_matched_blinding():
    # C = g**(m + sum_k t_k l_k): for m' != m, changing l_0 by (m - m') / t_0
    # gives the same commitment, so C alone reveals nothing about m.
    rng = np.random.default_rng(6)
    rho_seed = bytes(range(32))
    x = rng.integers(0, 2**32, size=100, dtype=np.uint32)
    x_other = rng.integers(0, 2**32, size=100, dtype=np.uint32)
    m = c.project(x, rho_seed=rho_seed)
    m_other = c.project(x_other, rho_seed=rho_seed)
    inverse = pow(TRAPDOORS[0], -1, SMALL_ORDER)
    blinding = trapdoor_blinding(77, 5000, 60000)
    blinding_other = blinding.copy()
    blinding_other[0] = (77 + (m - m_other) * inverse) % SMALL_ORDER

    commitment = c.commit(m, blinding=blinding, group=TRAPDOOR_GROUP)
    commitment_other = c.commit(m_other, blinding=blinding_other, group=TRAPDOOR_GROUP)

    assert m % SMALL_ORDER != m_other % SMALL_ORDER
    assert commitment == commitment_other


def test_trapdoor_group_lets_server_forge():
    # Why the h_k must come from a hash: a server that knows log_g h_0 passes
    # a wrong aggregate by adjusting the limb sums.
    rng = np.random.default_rng(8)
    updates = [rng.integers(0, 2**20, size=50, dtype=np.uint32) for _ in range(3)]
    blindings = [trapdoor_blinding(11 * i, 22 * i, 33 * i) for i in (1, 2, 3)]
    rho_seed = bytes(range(32))
    commitments = {
        node_id: c.commit(
            c.project(update, rho_seed=rho_seed),
            blinding=blinding,
            group=TRAPDOOR_GROUP,
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
    forged_sums[0] = (
        int(forged_sums[0]) - shift * pow(TRAPDOORS[0], -1, SMALL_ORDER)
    ) % SMALL_ORDER

    result = c.verify_aggregate(
        commitments,
        forged,
        blinding_sums=forged_sums,
        rho_seed=rho_seed,
        group=TRAPDOOR_GROUP,
    )

    assert result.verified
