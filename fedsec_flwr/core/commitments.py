"""Pedersen commitments to random projections of encoded updates.

Client i has an encoded update x_i, a uint32 vector of length d, and a
blinding vector l_i of K = `BLINDING_LIMBS` values drawn uniformly from
[0, 2**16). It appends l_i to its secure-aggregation input, so the server
learns only the limb sums L = sum_i l_i. After the server releases the
aggregate A and the projection seed is public, the client sends

    C_i = (rho . x_i) B + s(l_i) H,    s(l) = sum_k t_k l[k] mod q,

where rho_j = u_a v_b for coordinate j = a C + b is the product of a row
weight and a column weight, pseudorandom 128-bit integers expanded from the
seed (`project`), and the t_k are public scalars. Anyone can then check
(`verify_aggregate`)

    sum_i C_i == (rho . A) B + s(L) H.

Group: the prime-order subgroup of the Ed25519 curve, of order
q = 2**252 + 27742317777372353535851937790883648493, through libsodium's
point functions in PyNaCl. B is the standard base point. H is the sum of
two Elligator 2 images of SHA-512 outputs, so its discrete logarithm to B
is unknown to every party, and the t_k are SHA-512 outputs reduced mod q.

Security contract:

- Binding: a server that releases A' != sum x_i passes the check for a
  seed with probability at most 2**-127, even if it can compute log_B H,
  because the seed hashes A' and L', and u^T (A' - sum x_i) v is a nonzero
  polynomial of degree 2 in weights drawn from a set of 2**128 values
  (Schwartz-Zippel).
- Hiding: s(l) is a universal hash of l with the public key t. Given the
  limb sums L, l_i keeps about 15 bits of min-entropy per limb (3840 bits),
  far above log2 q = 252.4, so by the leftover hash lemma C_i is within
  2**-897 of uniform whatever x_i is, for all but a 2**-897 fraction of
  keys t.
- Blinding vectors and updates are secret: never log them or send them
  unmasked. A client commits at most once per blinding vector, because two
  commitments with the same l_i and different seeds reveal ((rho - rho') .
  x_i) B.
- libsodium's scalar multiplication runs in constant time. s(l) and the
  projection are computed with Python integers and numpy, which do not.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import nacl.bindings as sodium
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from threadpoolctl import ThreadpoolController

from .errors import AuthenticationError
from .keys import derive_key

logger = logging.getLogger("fedsec_flwr.verification")

ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493
"""The prime order q of the Ed25519 base point (RFC 8032, section 5.1)."""

ED25519_IDENTITY = (1).to_bytes(32, "little")
"""Encoding of the identity point (0, 1)."""

BLINDING_GENERATOR_DOMAIN = b"fedsec_flwr/pedersen-h/v2"
"""Prefix of the hash inputs that derive the blinding generator H."""

BLINDING_WEIGHT_DOMAIN = b"fedsec_flwr/pedersen-t/v2"
"""Prefix of the hash input that derives each public blinding weight t_k."""

BLINDING_LIMBS = 256
"""Number K of blinding values, and of public blinding weights t_k.

Two honest clients leave each other 15 bits of min-entropy per limb given
the limb sums, so 256 limbs give 3840 bits, far above log2 q = 252.4.
"""

BLINDING_LIMB_BITS = 16
"""Each blinding value is uniform in [0, 2**16)."""

MAX_BLINDING_CLIENTS = (2**32 - 1) // (2**BLINDING_LIMB_BITS - 1)
"""Maximum number of clients whose limb sums stay below 2**32 (65,537)."""

PROJECTION_KEY_INFO = b"fedsec_flwr/projection/v3"
"""HKDF info of the AES-256 key that expands a seed into projection weights."""

PROJECTION_SEED_DOMAIN = b"fedsec_flwr/projection-seed/v1"
"""Prefix of the hash input that derives the projection seed of a round."""

PROJECTION_WEIGHT_BITS = 128
"""Width of one row or column weight, uniform in [0, 2**128)."""

PROJECTION_COLUMNS = 2**13
"""Number C of columns: `project` reads a vector as a C-column matrix, row by row."""

MAX_PROJECTION_LENGTH = 2**34
"""Maximum vector length, 2**21 rows of `PROJECTION_COLUMNS` values."""

SEED_SIZE = 32
"""Size in bytes of a projection seed and of the digests that feed it."""

_WEIGHT_BYTES = PROJECTION_WEIGHT_BITS // 8
_ZERO_COUNTER = bytes(16)
_POINT_SIZE = 32

# project converts this many rows of values to float64 at a time (4 MiB) and
# multiplies them by the bytes of the column weights. Each product is below
# 2**40 and a row adds 2**13 of them, so every partial sum is an integer below
# 2**53, which float64 represents exactly in any order of addition.
_ROWS_PER_BLOCK = 64

# aggregate_digest hashes the aggregate in chunks of this many values.
_DIGEST_CHUNK = 1 << 20

_SUM_MISMATCH = "the sum of the commitments does not match the aggregate"


class CommitmentGroup(Protocol):
    """A prime-order group with two generators and no known relation between them.

    Elements are byte strings of `element_size` bytes. `Ed25519Group` is the
    group for production use. Tests also build small groups with known
    logarithms, which commit the same way but bind nothing.
    """

    @property
    def order(self) -> int:
        """The prime order q."""
        ...

    @property
    def element_size(self) -> int:
        """Size in bytes of an encoded element."""
        ...

    @property
    def blinding_weights(self) -> tuple[int, ...]:
        """The public scalars t_k, one per blinding value."""
        ...

    def combination(self, value: int, blinding: int) -> bytes:
        """Return value * G + blinding * H for scalars in [0, q)."""
        ...

    def sum(self, elements: Sequence[bytes]) -> bytes:
        """Return the group sum of valid elements."""
        ...

    def is_element(self, data: bytes) -> bool:
        """Test whether `data` encodes a group element other than the identity."""
        ...


class Ed25519Group:
    """The prime-order subgroup of Ed25519, with the base point and a hashed H.

    Args:
        blinding_limbs: Number K of public blinding weights t_k.

    Raises:
        ValueError: If `blinding_limbs` is not positive.

    """

    order = ED25519_ORDER
    element_size = _POINT_SIZE

    def __init__(self, *, blinding_limbs: int = BLINDING_LIMBS) -> None:
        if blinding_limbs < 1:
            raise ValueError(
                f"blinding_limbs must be positive. Found {blinding_limbs}."
            )
        self.blinding_generator = hash_to_point(BLINDING_GENERATOR_DOMAIN)
        self.blinding_weights = tuple(
            hash_to_scalar(blinding_weight_domain(index))
            for index in range(blinding_limbs)
        )

    def combination(self, value: int, blinding: int) -> bytes:
        """Return value * B + blinding * H for scalars in [0, q)."""
        terms = []
        if value:
            terms.append(sodium.crypto_scalarmult_ed25519_base_noclamp(_scalar(value)))
        if blinding:
            terms.append(
                sodium.crypto_scalarmult_ed25519_noclamp(
                    _scalar(blinding), self.blinding_generator
                )
            )
        return self.sum(terms)

    def sum(self, elements: Sequence[bytes]) -> bytes:
        """Return the sum of valid points, the identity for none."""
        total = ED25519_IDENTITY
        for element in elements:
            total = sodium.crypto_core_ed25519_add(total, element)
        return total

    def is_element(self, data: bytes) -> bool:
        """Test for a canonical encoding of a point of order q.

        libsodium rejects non-canonical encodings, points off the curve or
        outside the order-q subgroup, and points of small order, the
        identity included.
        """
        if not isinstance(data, bytes) or len(data) != _POINT_SIZE:
            return False
        return bool(sodium.crypto_core_ed25519_is_valid_point(data))


def hash_to_point(domain: bytes) -> bytes:
    """Hash a domain string to a point of order q with an unknown logarithm.

    The point is the sum of the Elligator 2 images (libsodium's
    `crypto_core_ed25519_from_uniform`, which also clears the cofactor) of
    the first 32 bytes of SHA-512(domain || 0) and SHA-512(domain || 1).
    Adding two images of independent hashes is how RFC 9380 builds a
    random-oracle hash to a curve.

    Raises:
        ValueError: If the sum is the identity or of small order.

    """
    images = [
        sodium.crypto_core_ed25519_from_uniform(
            hashlib.sha512(domain + bytes([index])).digest()[:_POINT_SIZE]
        )
        for index in (0, 1)
    ]
    point = sodium.crypto_core_ed25519_add(images[0], images[1])
    if not sodium.crypto_core_ed25519_is_valid_point(point):
        raise ValueError(f"domain {domain!r} hashes to a point of small order.")

    return bytes(point)


def hash_to_scalar(domain: bytes) -> int:
    """Hash a domain string to a scalar: SHA-512 as a little-endian int, mod q.

    Reducing 512 bits leaves a bias below 2**-259.
    """
    return int.from_bytes(hashlib.sha512(domain).digest(), "little") % ED25519_ORDER


def blinding_weight_domain(index: int) -> bytes:
    """Return the hash input of the public blinding weight t_index."""
    return BLINDING_WEIGHT_DOMAIN + struct.pack(">I", index)


def _scalar(value: int) -> bytes:
    return value.to_bytes(32, "little")


ED25519_GROUP = Ed25519Group()
"""The commitment group: Ed25519's order-q subgroup, B, H and 256 weights t_k."""

GROUP_ORDER = ED25519_ORDER
"""The prime q, the order of the commitment group."""

COMMITMENT_SIZE = _POINT_SIZE
"""Size in bytes of an encoded commitment (32)."""


def is_group_element(data: bytes, *, group: CommitmentGroup = ED25519_GROUP) -> bool:
    """Test whether `data` encodes an element of `group` other than the identity."""
    return group.is_element(data)


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of a verification.

    Attributes:
        verified: True if every check passed.
        reason: Empty when verified, else the first check that failed.
        discarded: True if every check that could run passed, but some
            included clients did not commit, so the aggregate cannot be
            checked and must not be used. ``verified`` is then False.

    """

    verified: bool
    reason: str = ""
    discarded: bool = False

    def require_verified(self) -> None:
        """Raise `AuthenticationError` unless verified.

        The message is the same for every failure. Read `reason` for logs.
        """
        if not self.verified:
            raise AuthenticationError("Aggregate verification failed.")


def project(vector: npt.NDArray[np.uint32], *, rho_seed: bytes) -> int:
    """Compute the exact projection rho . vector = sum_j rho_j * vector_j.

    The vector is read as a matrix of C = `PROJECTION_COLUMNS` columns, row
    by row, with zeros after the last value. Coordinate j = a * C + b has
    the weight rho_j = u_a * v_b, the product of a row weight and a column
    weight. The weights are the AES-256-CTR keystream (initial counter block
    zero) under the key HKDF-SHA256(rho_seed, info=PROJECTION_KEY_INFO),
    read in 16-byte little-endian words: first v_0 .. v_{C-1}, then u_0,
    u_1, ... for the rows. The same seed and length give the same weights
    on every platform.

    With weights of this form the keystream has C + d / C words instead of
    d, and the product of the matrix with v is a float64 matrix product
    (see `_ROWS_PER_BLOCK`), which is exact and runs through BLAS on one
    thread.

    Args:
        vector: One-dimensional uint32 array of length d.
        rho_seed: Public 32-byte seed from `projection_seed`.

    Returns:
        The projection as a non-negative Python integer, below d * 2**288.

    Raises:
        ValueError: If `vector` is not a one-dimensional uint32 array of at
            most `MAX_PROJECTION_LENGTH` values or `rho_seed` is not 32 bytes.

    """
    check_vector("vector", vector)
    _check_size("rho_seed", rho_seed, SEED_SIZE)

    rows = -(-vector.size // PROJECTION_COLUMNS)
    keystream = _projection_keystream(rho_seed, PROJECTION_COLUMNS + rows)
    column_bytes = np.frombuffer(
        keystream, dtype=np.uint8, count=PROJECTION_COLUMNS * _WEIGHT_BYTES
    )
    column_weight_bytes = column_bytes.reshape(PROJECTION_COLUMNS, _WEIGHT_BYTES)
    row_weights = _words(keystream[PROJECTION_COLUMNS * _WEIGHT_BYTES :])

    block = np.empty((_ROWS_PER_BLOCK, PROJECTION_COLUMNS), dtype=np.float64)
    column_weights = column_weight_bytes.astype(np.float64)
    total = 0
    with _blas_controller().limit(limits=1, user_api="blas"):
        for first_row in range(0, rows, _ROWS_PER_BLOCK):
            row_values = _row_projections(vector, first_row, block, column_weights)
            for offset, row_value in enumerate(row_values):
                total += row_weights[first_row + offset] * row_value

    return total


@functools.cache
def _blas_controller() -> ThreadpoolController:
    # project runs its matrix products on one BLAS thread. The product is
    # limited by memory, so a second thread saves little time, and OpenBLAS's
    # idle threads spin after each call, taking CPU from other processes.
    return ThreadpoolController()


def _projection_keystream(rho_seed: bytes, weights: int) -> bytes:
    key = derive_key(rho_seed, info=PROJECTION_KEY_INFO)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    return encryptor.update(bytes(weights * _WEIGHT_BYTES))


def _words(data: bytes) -> list[int]:
    return [
        int.from_bytes(data[start : start + _WEIGHT_BYTES], "little")
        for start in range(0, len(data), _WEIGHT_BYTES)
    ]


def _row_projections(
    vector: npt.NDArray[np.uint32],
    first_row: int,
    block: npt.NDArray[np.float64],
    column_weights: npt.NDArray[np.float64],
) -> list[int]:
    # Returns sum_b vector[a * C + b] * v_b for the rows a of one block,
    # starting at first_row. block is scratch space of _ROWS_PER_BLOCK rows,
    # and column_weights contains the 16 bytes of each v_b as float64.
    start = first_row * PROJECTION_COLUMNS
    values = vector[start : start + block.size]
    rows = -(-values.size // PROJECTION_COLUMNS)
    flat = block.reshape(-1)
    flat[: values.size] = values
    flat[values.size : rows * PROJECTION_COLUMNS] = 0

    byte_sums = (block[:rows] @ column_weights).tolist()
    return [
        sum(int(byte_sum) << (8 * position) for position, byte_sum in enumerate(row))
        for row in byte_sums
    ]


def aggregate_digest(aggregate: npt.NDArray[np.uint32]) -> bytes:
    """Compute SHA-256 of the aggregate's values as little-endian uint32 bytes.

    Raises:
        ValueError: If `aggregate` is not a one-dimensional uint32 array.

    """
    check_vector("aggregate", aggregate)

    digest = hashlib.sha256()
    for start in range(0, aggregate.size, _DIGEST_CHUNK):
        chunk = aggregate[start : start + _DIGEST_CHUNK]
        digest.update(np.ascontiguousarray(chunk, dtype="<u4").data)

    return digest.digest()


def projection_seed(
    *,
    run_id: int,
    server_round: int,
    node_ids: Sequence[int],
    aggregate: npt.NDArray[np.uint32],
    blinding_sums: npt.NDArray[np.uint32],
    key_list_digest: bytes,
) -> bytes:
    """Derive the public projection seed of a round once its aggregate is fixed.

    The seed is SHA-256 over these fields, in order, with big-endian
    integers:

    - `PROJECTION_SEED_DOMAIN`, after its length (uint64);
    - the run id, the round and the number of included clients (uint64);
    - the sorted node ids of the included clients (uint64 each);
    - the length d (uint64) and `aggregate_digest(aggregate)`;
    - the number of limb sums (uint64) and the limb sums (uint32 each);
    - the 32-byte digest of the identity-key list.

    Every variable-length part follows its count, so the encoding is
    unambiguous.

    A server that changes any of these inputs gets new weights, so an old
    aggregate replayed in a later round, or a different client set, is
    checked against weights it could not predict when it fixed the aggregate.

    Raises:
        ValueError: If a node id is not a uint64 or repeats, `node_ids` is
            empty, `aggregate` or `blinding_sums` is not a one-dimensional
            uint32 array, or `key_list_digest` is not 32 bytes.

    """
    return projection_seed_of_digest(
        run_id=run_id,
        server_round=server_round,
        node_ids=node_ids,
        aggregate_length=aggregate.size,
        aggregate_sha256=aggregate_digest(aggregate),
        blinding_sums=blinding_sums,
        key_list_digest=key_list_digest,
    )


def projection_seed_of_digest(
    *,
    run_id: int,
    server_round: int,
    node_ids: Sequence[int],
    aggregate_length: int,
    aggregate_sha256: bytes,
    blinding_sums: npt.NDArray[np.uint32],
    key_list_digest: bytes,
) -> bytes:
    """Derive the seed of `projection_seed` from the aggregate's length and digest.

    A client commits with this, so it needs only the 32-byte digest of A,
    not A itself, until it verifies.

    Raises:
        ValueError: As `projection_seed`, or if `aggregate_length` is not in
            [0, `MAX_PROJECTION_LENGTH`] or `aggregate_sha256` is not 32 bytes.

    """
    sorted_ids = _check_node_ids(node_ids)
    _check_uint64("run_id", run_id)
    _check_uint64("server_round", server_round)
    _check_uint64("aggregate_length", aggregate_length)
    if aggregate_length > MAX_PROJECTION_LENGTH:
        raise ValueError(
            f"aggregate_length must be at most {MAX_PROJECTION_LENGTH}. "
            f"Found {aggregate_length}."
        )
    _check_size("aggregate_sha256", aggregate_sha256, SEED_SIZE)
    check_vector("blinding_sums", blinding_sums)
    _check_size("key_list_digest", key_list_digest, SEED_SIZE)

    fields = [
        struct.pack(">Q", len(PROJECTION_SEED_DOMAIN)),
        PROJECTION_SEED_DOMAIN,
        struct.pack(">QQQ", run_id, server_round, len(sorted_ids)),
        struct.pack(f">{len(sorted_ids)}Q", *sorted_ids),
        struct.pack(">Q", aggregate_length),
        aggregate_sha256,
        struct.pack(">Q", blinding_sums.size),
        blinding_sums.astype(">u4").tobytes(),
        key_list_digest,
    ]

    return hashlib.sha256(b"".join(fields)).digest()


def draw_blinding(
    *,
    group: CommitmentGroup = ED25519_GROUP,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> npt.NDArray[np.uint32]:
    """Draw a blinding vector of K values uniform in [0, 2**16).

    The client appends the vector to its secure-aggregation input. The sum
    of each value over at most `MAX_BLINDING_CLIENTS` clients stays below
    2**32, so the server gets the exact limb sums. Keep the vector secret and
    commit with it only once.

    Args:
        group: The commitment group, which fixes K.
        random_bytes: Source of uniform random bytes. The default is the
            operating system's CSPRNG. Tests pass a seeded one.

    Returns:
        A uint32 array of shape (K,).

    """
    limbs = len(group.blinding_weights)
    raw = random_bytes(2 * limbs)
    if len(raw) != 2 * limbs:
        raise ValueError(
            f"random_bytes must return {2 * limbs} bytes. Found {len(raw)}."
        )

    return np.frombuffer(raw, dtype="<u2").astype(np.uint32)


def blinding_scalar(
    blinding: npt.NDArray[np.uint32], *, group: CommitmentGroup = ED25519_GROUP
) -> int:
    """Compute s(l) = sum_k t_k l[k] mod q for a blinding vector or limb sums.

    Raises:
        ValueError: If `blinding` is not a uint32 array of K values.

    """
    _check_blinding_shape("blinding", blinding, group=group)

    total = 0
    for weight, value in zip(group.blinding_weights, blinding.tolist(), strict=True):
        total += weight * int(value)

    return total % group.order


def commit(
    value: int,
    *,
    blinding: npt.NDArray[np.uint32],
    group: CommitmentGroup = ED25519_GROUP,
) -> bytes:
    """Compute the commitment value * B + s(blinding) * H.

    Args:
        value: The committed value, the projection rho . x_i. It is reduced
            mod q.
        blinding: The blinding vector from `draw_blinding`.
        group: The commitment group.

    Returns:
        The encoded commitment, `group.element_size` bytes.

    Raises:
        ValueError: If `value` is negative or not an int, or `blinding` is not
            a uint32 array of K values below 2**16.

    """
    _check_non_negative("value", value)
    check_blinding(blinding, group=group)

    return group.combination(
        value % group.order, blinding_scalar(blinding, group=group)
    )


def check_blinding(
    blinding: npt.NDArray[np.uint32], *, group: CommitmentGroup = ED25519_GROUP
) -> None:
    """Check that `blinding` is a uint32 array of K values below 2**16.

    The message never shows the values, which are secret.

    Raises:
        ValueError: If the check fails.

    """
    _check_blinding_shape("blinding", blinding, group=group)
    if blinding.size and int(blinding.max()) >= 2**BLINDING_LIMB_BITS:
        raise ValueError(
            f"blinding values must be below 2**{BLINDING_LIMB_BITS}. "
            "Found a larger value."
        )


def check_commitment(
    name: str, data: bytes, *, group: CommitmentGroup = ED25519_GROUP
) -> None:
    """Check that an untrusted commitment is bytes of the group's element size.

    Only the type and size are checked here. `verify_aggregate` checks that
    the bytes encode a group element.

    Raises:
        ValueError: Naming `name`, if the check fails.

    """
    _check_size(name, data, group.element_size)


def verify_aggregate(
    commitments: Mapping[int, bytes],
    aggregate: npt.NDArray[np.uint32],
    *,
    blinding_sums: npt.NDArray[np.uint32],
    rho_seed: bytes,
    group: CommitmentGroup = ED25519_GROUP,
) -> VerificationResult:
    """Check sum_i C_i == (rho . A) B + s(L) H.

    The commitments are untrusted: each must encode a group element other
    than the identity, or the result fails and names the node. Ed25519
    points of small order are not in the group: without that check a
    server could add one to two commitments and keep their sum. The clients
    included are the keys of `commitments`, in any order.

    Args:
        commitments: Commitment C_i of each included client, by node id.
        aggregate: The released aggregate A, a one-dimensional uint32 array.
        blinding_sums: The limb sums L, a uint32 array of K values.
        rho_seed: The seed from `projection_seed` for this aggregate.
        group: The commitment group.

    Returns:
        A verified result, or a failed one with the reason.

    Raises:
        ValueError: If `commitments` is empty or keyed by something other
            than distinct uint64 node ids, or another argument is malformed.

    """
    _check_node_ids(list(commitments))
    _check_blinding_shape("blinding_sums", blinding_sums, group=group)

    for node_id in sorted(commitments):
        if not group.is_element(commitments[node_id]):
            return VerificationResult(
                False, f"the commitment of node {node_id} is not a group element"
            )

    total = group.sum([commitments[node_id] for node_id in sorted(commitments)])
    projection = project(aggregate, rho_seed=rho_seed)
    expected = group.combination(
        projection % group.order, blinding_scalar(blinding_sums, group=group)
    )

    if total != expected:
        return VerificationResult(False, _SUM_MISMATCH)
    logger.debug(
        "Commitments of %d clients match an aggregate of %d values.",
        len(commitments),
        aggregate.size,
    )
    return VerificationResult(True)


def check_vector(name: str, vector: npt.NDArray[np.uint32]) -> None:
    """Check that `vector` is a one-dimensional uint32 array of a valid length.

    Raises:
        ValueError: Naming `name`, if the check fails.

    """
    if not isinstance(vector, np.ndarray):
        raise ValueError(
            f"{name} must be a numpy array. Found {type(vector).__name__}."
        )
    if vector.dtype != np.uint32:
        raise ValueError(f"{name} must have dtype uint32. Found {vector.dtype}.")
    if vector.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional. Found shape {vector.shape}.")
    if vector.size > MAX_PROJECTION_LENGTH:
        raise ValueError(
            f"{name} must have at most {MAX_PROJECTION_LENGTH} values. "
            f"Found {vector.size}."
        )


def _check_blinding_shape(
    name: str, values: npt.NDArray[np.uint32], *, group: CommitmentGroup
) -> None:
    check_vector(name, values)
    limbs = len(group.blinding_weights)
    if values.size != limbs:
        raise ValueError(f"{name} must have {limbs} values. Found {values.size}.")


def _check_node_ids(node_ids: Sequence[int]) -> list[int]:
    if not node_ids:
        raise ValueError("node ids must not be empty. Found none.")
    for node_id in node_ids:
        _check_uint64("node id", node_id)
    sorted_ids = sorted(node_ids)
    if len(set(sorted_ids)) != len(sorted_ids):
        raise ValueError(f"node ids must be distinct. Found {sorted_ids}.")

    return sorted_ids


def _check_uint64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int. Found {type(value).__name__}.")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be a uint64. Found {value}.")


def _check_non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int. Found {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"{name} must be non-negative. Found a negative value.")


def _check_size(name: str, data: bytes, size: int) -> None:
    if not isinstance(data, bytes):
        raise ValueError(f"{name} must be bytes. Found {type(data).__name__}.")
    if len(data) != size:
        raise ValueError(f"{name} must be {size} bytes long. Found {len(data)} bytes.")
