"""Public transcript of one verified round, and the checks clients and auditors run.

A round of verification goes:

1. Each client signs the digest of the identity-key list it received
   (`sign_key_list`).
2. Each client appends a fresh blinding vector l_i
   (`commitments.draw_blinding`) to its masked input. Secure aggregation
   gives the server the aggregate A and the limb sums L = sum_i l_i.
3. The server sends A, L and the included node ids S to the clients, which
   derive the projection seed, commit and sign the commitment with the
   digests of the global model and the settings they trained with
   (`client_commit`).
4. The server publishes a `RoundTranscript`. Clients check it with
   `verify_round_as_client` and anyone can check it later with `audit_round`.

The transcript contains no secret: commitments hide the updates, and A and L
are the public outputs of secure aggregation.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import commitments, signatures
from .commitments import VerificationResult
from .errors import AuthenticationError, ProtocolError
from .signatures import SignedStage

logger = logging.getLogger("fedsec_flwr.verification")

TRANSCRIPT_FORMAT = "fedsec_flwr/transcript/v4"
"""Value of the "format" field of a serialized transcript."""

MODEL_DIGEST_SIZE = 32
"""Length in bytes of a model or settings digest: SHA-256."""

_UINT64_DIGITS = len(str(2**64 - 1))

MAX_JSON_INTEGER_DIGITS = _UINT64_DIGITS
"""Digits of the longest integer literal that `parse_untrusted_json` converts."""
_LOWER_HEX = re.compile(r"(?:[0-9a-f]{2})*")

_FIELDS = frozenset(
    {
        "format",
        "run_id",
        "server_round",
        "included_node_ids",
        "identity_keys",
        "key_list_signatures",
        "aggregate_length",
        "aggregate_sha256",
        "model_sha256",
        "settings_sha256",
        "blinding_sums",
        "commitments",
        "commitment_signatures",
    }
)

AuditResult = VerificationResult
"""Outcome of `audit_round`: `verified`, and the first failed check as `reason`."""


@dataclass(frozen=True, kw_only=True)
class RoundTranscript:
    """Everything public that proves one round's aggregate.

    The constructor checks types, sizes and ranges and sorts every node-id
    collection, so equal rounds serialize to equal JSON. It does not check
    signatures, subgroup membership or that the collections agree with each
    other: `audit_round` does, so that a hostile transcript still loads and
    fails its audit with a reason.

    Attributes:
        run_id: The run, a uint64.
        server_round: The round, a uint64.
        included_node_ids: The clients S whose updates the aggregate sums.
        identity_keys: Identity public key (32 bytes) of each client in the
            round's key list, by node id. It contains S and may contain
            clients that dropped out earlier.
        key_list_signatures: Each client's signature over the digest of
            `identity_keys`.
        aggregate_length: Number of uint32 values d of the aggregate.
        aggregate_sha256: `commitments.aggregate_digest` of the aggregate.
        model_sha256: SHA-256 of the global model the server sent every
            client in S for this round. Each commitment signature covers
            the digest of the model its client trained on, so it verifies
            only if that model is this one.
        settings_sha256: SHA-256 of the training configuration and the
            encoding and DP fields the server sent every client in S. The
            commitment signatures cover it the same way.
        blinding_sums: The limb sums L, K uint32 values.
        commitments: Commitment C_i of each client in S.
        commitment_signatures: Each client's signature over its commitment.

    """

    run_id: int
    server_round: int
    included_node_ids: tuple[int, ...]
    identity_keys: Mapping[int, bytes]
    key_list_signatures: Mapping[int, bytes]
    aggregate_length: int
    aggregate_sha256: bytes
    model_sha256: bytes
    settings_sha256: bytes
    blinding_sums: tuple[int, ...]
    commitments: Mapping[int, bytes]
    commitment_signatures: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_uint64("run_id", self.run_id)
        _check_uint64("server_round", self.server_round)
        _check_length(self.aggregate_length)
        _check_bytes("aggregate_sha256", self.aggregate_sha256, commitments.SEED_SIZE)
        _check_bytes("model_sha256", self.model_sha256, MODEL_DIGEST_SIZE)
        _check_bytes("settings_sha256", self.settings_sha256, MODEL_DIGEST_SIZE)
        sums = tuple(self.blinding_sums)
        if len(sums) != commitments.BLINDING_LIMBS:
            raise ValueError(
                f"blinding_sums must have {commitments.BLINDING_LIMBS} values. "
                f"Found {len(sums)}."
            )
        for value in sums:
            _check_int_range("blinding_sums value", value, 0, 2**32 - 1)
        object.__setattr__(self, "blinding_sums", sums)

        ids = tuple(sorted(self.included_node_ids))
        for node_id in ids:
            _check_uint64("included node id", node_id)
        if len(set(ids)) != len(ids):
            raise ValueError(f"included_node_ids must be distinct. Found {list(ids)}.")
        object.__setattr__(self, "included_node_ids", ids)

        for name, size in (
            ("identity_keys", signatures.IDENTITY_KEY_SIZE),
            ("key_list_signatures", signatures.SIGNATURE_SIZE),
            ("commitments", commitments.COMMITMENT_SIZE),
            ("commitment_signatures", signatures.SIGNATURE_SIZE),
        ):
            object.__setattr__(
                self, name, _sorted_bytes_map(name, getattr(self, name), size)
            )

    @property
    def blinding_sum_array(self) -> npt.NDArray[np.uint32]:
        """`blinding_sums` as a uint32 array."""
        return np.array(self.blinding_sums, dtype=np.uint32)

    @property
    def key_list_digest(self) -> bytes:
        """`signatures.key_list_digest` of `identity_keys`.

        Raises:
            ValueError: If `identity_keys` is empty.

        """
        return signatures.key_list_digest(self.identity_keys)

    def projection_seed(self, aggregate: npt.NDArray[np.uint32]) -> bytes:
        """Derive the round's projection seed for `aggregate`.

        Raises:
            ValueError: If `included_node_ids` or `identity_keys` is empty or
                `aggregate` is malformed.

        """
        return commitments.projection_seed(
            run_id=self.run_id,
            server_round=self.server_round,
            node_ids=self.included_node_ids,
            aggregate=aggregate,
            blinding_sums=self.blinding_sum_array,
            key_list_digest=self.key_list_digest,
        )

    def to_dict(self) -> dict[str, Any]:
        """Convert to a JSON-ready dict: bytes as hex, large ints as decimal strings.

        Node ids and the run id are decimal strings, because they can exceed
        the 2**53 that JSON numbers carry exactly in many parsers.
        """
        return {
            "format": TRANSCRIPT_FORMAT,
            "run_id": str(self.run_id),
            "server_round": self.server_round,
            "included_node_ids": [str(node_id) for node_id in self.included_node_ids],
            "identity_keys": _hex_map(self.identity_keys),
            "key_list_signatures": _hex_map(self.key_list_signatures),
            "aggregate_length": self.aggregate_length,
            "aggregate_sha256": self.aggregate_sha256.hex(),
            "model_sha256": self.model_sha256.hex(),
            "settings_sha256": self.settings_sha256.hex(),
            "blinding_sums": list(self.blinding_sums),
            "commitments": _hex_map(self.commitments),
            "commitment_signatures": _hex_map(self.commitment_signatures),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundTranscript:
        """Parse an untrusted dict made by `to_dict`.

        Raises:
            ValueError: Naming the first field that is missing, has the wrong
                type or is out of range.

        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"transcript must be an object. Found {type(data).__name__}."
            )
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ValueError(
                f"transcript must have only known fields. Found {unknown}."
            )
        if data.get("format") != TRANSCRIPT_FORMAT:
            raise ValueError(
                f"format must be {TRANSCRIPT_FORMAT!r}. Found {data.get('format')!r}."
            )

        return cls(
            run_id=_parse_decimal(data, "run_id"),
            server_round=_require(data, "server_round", int),
            included_node_ids=tuple(
                _decimal("included_node_ids", item)
                for item in _require(data, "included_node_ids", list)
            ),
            identity_keys=_parse_hex_map(data, "identity_keys"),
            key_list_signatures=_parse_hex_map(data, "key_list_signatures"),
            aggregate_length=_require(data, "aggregate_length", int),
            aggregate_sha256=_hex(
                "aggregate_sha256", _require(data, "aggregate_sha256", str)
            ),
            model_sha256=_hex("model_sha256", _require(data, "model_sha256", str)),
            settings_sha256=_hex(
                "settings_sha256", _require(data, "settings_sha256", str)
            ),
            blinding_sums=tuple(_require(data, "blinding_sums", list)),
            commitments=_parse_hex_map(data, "commitments"),
            commitment_signatures=_parse_hex_map(data, "commitment_signatures"),
        )

    def to_json(self) -> str:
        """Serialize to canonical JSON: sorted keys, no whitespace."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RoundTranscript:
        """Parse untrusted JSON made by `to_json`.

        Raises:
            ValueError: If `text` is not JSON, repeats a key, nests too
                deeply or is not a valid transcript.

        """
        return cls.from_dict(parse_untrusted_json(text))


LONG_INTEGER_SHOWN_DIGITS = 10
"""Leading digits of a `LongJSONInteger` that its messages show."""


@dataclass(frozen=True)
class LongJSONInteger:
    """An integer literal of untrusted JSON too long for `parse_untrusted_json`.

    It is neither an int nor a str, so every type check rejects it. Its repr
    shows the digit count and the leading digits only, so a message that
    quotes it stays one line.

    Attributes:
        literal: The literal as the JSON text spells it, with its sign.

    """

    literal: str

    @property
    def digits(self) -> int:
        """Number of digits of the literal, without its sign."""
        return len(self.literal.lstrip("-"))

    def __repr__(self) -> str:
        sign = "-" if self.literal.startswith("-") else ""
        leading = self.literal.lstrip("-")[:LONG_INTEGER_SHOWN_DIGITS]
        return f"an integer of {self.digits} digits ({sign}{leading}...)"

    def range_error(
        self, name: str, *, low: int | None, high: int | None
    ) -> ValueError:
        """Build the error for field `name`, which accepts `low` to `high`.

        A bound of ``None`` means the field sets none, so the error names the
        parser's limit of `MAX_JSON_INTEGER_DIGITS` digits instead.
        """
        if self.literal.startswith("-") and low is not None:
            limit = f"below the smallest accepted {low}"
        elif not self.literal.startswith("-") and high is not None:
            limit = f"above the largest accepted {high}"
        else:
            limit = (
                f"longer than the {MAX_JSON_INTEGER_DIGITS} digits that an "
                "integer literal may have"
            )
        return ValueError(f"{name} is {self!r}, {limit}.")


def json_type_name(value: object) -> str:
    """Return the Python type name of a parsed JSON value, for messages.

    A `LongJSONInteger` gets its repr instead, which shows its digit count.
    """
    if isinstance(value, LongJSONInteger):
        return repr(value)
    return type(value).__name__


def parse_untrusted_json(text: str) -> Any:
    """Parse JSON from an untrusted source, with every failure a ValueError.

    A key that repeats in an object is rejected, because two parsers could
    keep different copies of it. An integer literal longer than
    `MAX_JSON_INTEGER_DIGITS` digits becomes a `LongJSONInteger`, so the
    field that contains it fails its own check and names itself, where a
    huge int would fail the whole document. Nesting deeper than Python's
    recursion limit is a ValueError too, not a RecursionError.

    Raises:
        ValueError: If `text` is not valid JSON or repeats a key.

    """
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None


def is_lower_hex(text: str) -> bool:
    """Return whether `text` is lowercase hex of whole bytes, the canonical form."""
    return _LOWER_HEX.fullmatch(text) is not None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(
                f"a JSON object must not repeat a key. Found {key!r} twice."
            )
        result[key] = value
    return result


def _bounded_int(text: str) -> int | LongJSONInteger:
    if len(text.lstrip("-")) <= MAX_JSON_INTEGER_DIGITS:
        return int(text)
    return LongJSONInteger(text)


def sign_key_list(
    identity_key: Ed25519PrivateKey,
    *,
    run_id: int,
    server_round: int,
    identity_keys: Mapping[int, bytes],
) -> tuple[bytes, bytes]:
    """Sign the digest of the identity-key list a client received.

    The client keeps the digest and later passes it to `client_commit` and
    `verify_round_as_client`, which fail if other clients saw another list.

    Returns:
        The key-list digest and the client's signature over it.

    Raises:
        ValueError: If `identity_keys` is malformed or empty.

    """
    digest = signatures.key_list_digest(identity_keys)
    signature = signatures.sign(
        identity_key,
        run_id=run_id,
        server_round=server_round,
        stage=SignedStage.KEY_LIST,
        payload=digest,
    )

    return digest, signature


def commitment_payload(
    *,
    node_id: int,
    commitment: bytes,
    rho_seed: bytes,
    model_sha256: bytes,
    settings_sha256: bytes,
) -> bytes:
    """Encode what a client signs with its commitment.

    The payload is the node id (uint64, big-endian), the commitment
    (`commitments.COMMITMENT_SIZE` bytes), the 32-byte projection seed, and
    the 32-byte digests of the global model and of the settings the client
    trained with. The seed binds the signature to the run, round, included
    clients, aggregate, limb sums and key list.

    Raises:
        ValueError: If `node_id` is not a uint64, `commitment` is not
            `commitments.COMMITMENT_SIZE` bytes, or `rho_seed`,
            `model_sha256` or `settings_sha256` is not 32 bytes.

    """
    _check_uint64("node_id", node_id)
    commitments.check_commitment("commitment", commitment)
    _check_bytes("rho_seed", rho_seed, commitments.SEED_SIZE)
    _check_bytes("model_sha256", model_sha256, MODEL_DIGEST_SIZE)
    _check_bytes("settings_sha256", settings_sha256, MODEL_DIGEST_SIZE)

    return (
        struct.pack(">Q", node_id)
        + commitment
        + rho_seed
        + model_sha256
        + settings_sha256
    )


def client_commit(
    identity_key: Ed25519PrivateKey,
    *,
    run_id: int,
    server_round: int,
    node_id: int,
    update: npt.NDArray[np.uint32],
    blinding: npt.NDArray[np.uint32],
    included_node_ids: Sequence[int],
    aggregate_length: int,
    aggregate_sha256: bytes,
    blinding_sums: npt.NDArray[np.uint32],
    key_list_digest: bytes,
    model_sha256: bytes,
    settings_sha256: bytes,
) -> tuple[bytes, bytes]:
    """Commit to this client's update once the aggregate is fixed, and sign.

    Args:
        identity_key: This client's identity key.
        run_id: The current run.
        server_round: The current round.
        node_id: This client's node id.
        update: The encoded update x_i this client put into secure
            aggregation, without the blinding limbs.
        blinding: The blinding vector l_i this client appended. Commit with
            it only once, then drop it from the client state: two
            commitments with one blinding vector and two seeds reveal
            ((rho - rho') . x_i) B.
        included_node_ids: The clients S that the server reports as
            included (untrusted).
        aggregate_length: The length of the aggregate A that the server
            released (untrusted).
        aggregate_sha256: `commitments.aggregate_digest` of A (untrusted).
            The client checks A against it when the transcript arrives.
        blinding_sums: The limb sums L the server released (untrusted).
        key_list_digest: The digest this client signed in `sign_key_list`.
        model_sha256: The digest of the global model this client trained on
            in this round.
        settings_sha256: The digest of the settings it trained and encoded
            with in this round.

    Returns:
        The commitment C_i and the client's signature over
        `commitment_payload`.

    Raises:
        ProtocolError: If this client is not in `included_node_ids` or the
            aggregate's length differs from the update's.
        ValueError: If an argument is malformed.

    """
    if not isinstance(included_node_ids, Sequence):
        raise ValueError(
            "included_node_ids must be a sequence of node ids. "
            f"Found {type(included_node_ids).__name__}."
        )
    if node_id not in included_node_ids:
        raise ProtocolError(
            f"node {node_id} must be among the included clients to commit. "
            "Found it missing."
        )
    commitments.check_vector("update", update)
    commitments.check_vector("blinding", blinding)
    commitments.check_vector("blinding_sums", blinding_sums)
    if blinding_sums.size != blinding.size:
        raise ProtocolError(
            f"blinding_sums must have {blinding.size} values, one per limb of "
            f"the blinding vector. Found {blinding_sums.size}."
        )
    _check_length(aggregate_length)
    if aggregate_length != update.size:
        raise ProtocolError(
            f"aggregate must have {update.size} values like the update. "
            f"Found {aggregate_length}."
        )

    rho_seed = commitments.projection_seed_of_digest(
        run_id=run_id,
        server_round=server_round,
        node_ids=included_node_ids,
        aggregate_length=aggregate_length,
        aggregate_sha256=aggregate_sha256,
        blinding_sums=blinding_sums,
        key_list_digest=key_list_digest,
    )
    commitment = commitments.commit(
        commitments.project(update, rho_seed=rho_seed), blinding=blinding
    )
    signature = signatures.sign(
        identity_key,
        run_id=run_id,
        server_round=server_round,
        stage=SignedStage.COMMITMENT,
        payload=commitment_payload(
            node_id=node_id,
            commitment=commitment,
            rho_seed=rho_seed,
            model_sha256=model_sha256,
            settings_sha256=settings_sha256,
        ),
    )

    return commitment, signature


def audit_round(
    transcript: RoundTranscript, aggregate: npt.NDArray[np.uint32]
) -> AuditResult:
    """Check a round's transcript against its aggregate.

    The checks, in order: the aggregate matches the transcript's length and
    SHA-256; the node-id sets agree (S is not empty, every client in S is in
    the key list and signed it, and only clients in S committed); every
    key-list signature is valid; the projection seed re-derives; every
    commitment signature is valid for the transcript's model and settings
    digests; every client in S committed; and the sum of the commitments
    matches the aggregate (`commitments.verify_aggregate`).

    Some clients in S may not have committed, for example because they
    dropped out after their input. When every other check up to that one
    passes, the result is discarded: the transcript shows nothing wrong,
    but the aggregate cannot be checked, so it must not be used.

    This proves the aggregate is the sum of the updates of exactly S, each
    committed under a key in `identity_keys` by a client that trained on
    the model of `model_sha256` with the settings of `settings_sha256`. It
    does not prove the keys belong to real clients: compare them with keys
    obtained elsewhere.

    Returns:
        A verified result, or a failed one with the first failed check.

    """
    failure = _check_aggregate_matches(transcript, aggregate)
    failure = failure or _check_node_sets(transcript)
    if failure:
        return _failed(transcript, failure)

    try:
        _verify_key_list_signatures(transcript)
    except AuthenticationError:
        return _failed(transcript, "a key-list signature is not valid")

    rho_seed = transcript.projection_seed(aggregate)
    try:
        _verify_commitment_signatures(transcript, rho_seed)
    except AuthenticationError:
        return _failed(transcript, "a commitment signature is not valid")

    missing = missing_commitments(transcript)
    if missing:
        return _discarded(transcript, len(missing))

    result = commitments.verify_aggregate(
        transcript.commitments,
        aggregate,
        blinding_sums=transcript.blinding_sum_array,
        rho_seed=rho_seed,
    )
    if not result.verified:
        return _failed(transcript, result.reason)

    logger.info(
        "Verified run %d round %d: %d clients, %d values.",
        transcript.run_id,
        transcript.server_round,
        len(transcript.included_node_ids),
        transcript.aggregate_length,
    )
    return result


def verify_round_as_client(
    transcript: RoundTranscript,
    aggregate: npt.NDArray[np.uint32],
    *,
    run_id: int,
    server_round: int,
    node_id: int,
    identity_public_key: bytes,
    key_list_digest: bytes,
    commitment: bytes,
    model_sha256: bytes,
    settings_sha256: bytes,
) -> AuditResult:
    """Check a transcript as one of its included clients.

    Beyond `audit_round`, the client checks what only it can check: the
    transcript is for the current run and round (so an old, valid
    transcript cannot be replayed), it is included with its own identity key
    and its own commitment, the key list is the one it signed (so a
    server that showed other clients another list is caught), and the model
    and settings digests are those it trained with.

    Args:
        transcript: The transcript the server published (untrusted).
        aggregate: The aggregate the server released (untrusted).
        run_id: The current run.
        server_round: The current round.
        node_id: This client's node id.
        identity_public_key: This client's identity public key.
        key_list_digest: The digest this client signed in `sign_key_list`.
        commitment: The commitment this client sent in `client_commit`.
        model_sha256: The digest of the model this client trained on.
        settings_sha256: The digest of the settings it trained with.

    Returns:
        A verified result, or a failed one with the first failed check.

    """
    same_key_list = (
        bool(transcript.identity_keys) and transcript.key_list_digest == key_list_digest
    )
    own_checks = (
        (transcript.run_id == run_id, "the transcript is for another run"),
        (
            transcript.server_round == server_round,
            "the transcript is for another round",
        ),
        (node_id in transcript.included_node_ids, "this client is not included"),
        (
            transcript.identity_keys.get(node_id) == identity_public_key,
            "the key list holds another identity key for this client",
        ),
        (same_key_list, "the key list differs from the one this client signed"),
        (
            transcript.model_sha256 == model_sha256,
            "the transcript names another model than the one this client trained on",
        ),
        (
            transcript.settings_sha256 == settings_sha256,
            "the transcript names other settings than the ones this client "
            "trained with",
        ),
        (
            transcript.commitments.get(node_id) == commitment,
            "the transcript holds another commitment for this client",
        ),
    )
    for passed, reason in own_checks:
        if not passed:
            return _failed(transcript, reason)

    return audit_round(transcript, aggregate)


def _check_aggregate_matches(
    transcript: RoundTranscript, aggregate: npt.NDArray[np.uint32]
) -> str:
    try:
        commitments.check_vector("aggregate", aggregate)
    except ValueError as error:
        return f"the aggregate is malformed: {error}"
    if aggregate.size != transcript.aggregate_length:
        return (
            f"the aggregate has {aggregate.size} values, "
            f"not the {transcript.aggregate_length} of the transcript"
        )
    if commitments.aggregate_digest(aggregate) != transcript.aggregate_sha256:
        return "the aggregate does not match the SHA-256 of the transcript"

    return ""


def _check_node_sets(transcript: RoundTranscript) -> str:
    included = set(transcript.included_node_ids)
    if not included:
        return "no client is included"
    if not included <= transcript.identity_keys.keys():
        return "an included client has no identity key"
    if not transcript.key_list_signatures.keys() <= transcript.identity_keys.keys():
        return "a key-list signature comes from a client outside the key list"
    if not included <= transcript.key_list_signatures.keys():
        return "an included client did not sign the key list"
    if not transcript.commitments.keys() <= included:
        return "a client outside the included clients committed"
    if transcript.commitment_signatures.keys() != transcript.commitments.keys():
        return "the signed commitments differ from the committed clients"

    return ""


def missing_commitments(transcript: RoundTranscript) -> set[int]:
    """Return the included clients whose commitment the transcript lacks."""
    return set(transcript.included_node_ids) - transcript.commitments.keys()


def _verify_key_list_signatures(transcript: RoundTranscript) -> None:
    digest = transcript.key_list_digest
    for node_id, signature in transcript.key_list_signatures.items():
        signatures.verify(
            transcript.identity_keys[node_id],
            signature,
            run_id=transcript.run_id,
            server_round=transcript.server_round,
            stage=SignedStage.KEY_LIST,
            payload=digest,
        )


def _verify_commitment_signatures(transcript: RoundTranscript, rho_seed: bytes) -> None:
    for node_id in sorted(transcript.commitments):
        payload = commitment_payload(
            node_id=node_id,
            commitment=transcript.commitments[node_id],
            rho_seed=rho_seed,
            model_sha256=transcript.model_sha256,
            settings_sha256=transcript.settings_sha256,
        )
        signatures.verify(
            transcript.identity_keys[node_id],
            transcript.commitment_signatures[node_id],
            run_id=transcript.run_id,
            server_round=transcript.server_round,
            stage=SignedStage.COMMITMENT,
            payload=payload,
        )


def _discarded(transcript: RoundTranscript, num_missing: int) -> AuditResult:
    reason = (
        f"{num_missing} of {len(transcript.included_node_ids)} included clients did "
        "not commit, so the aggregate cannot be checked and the round's update is "
        "discarded"
    )
    logger.info(
        "Run %d round %d is discarded: %s.",
        transcript.run_id,
        transcript.server_round,
        reason,
    )
    return AuditResult(False, reason, discarded=True)


def _failed(transcript: RoundTranscript, reason: str) -> AuditResult:
    logger.info(
        "Verification of run %d round %d failed: %s.",
        transcript.run_id,
        transcript.server_round,
        reason,
    )
    return AuditResult(False, reason)


def _sorted_bytes_map(
    name: str, mapping: Mapping[int, bytes], size: int
) -> dict[int, bytes]:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{name} must be a mapping. Found {type(mapping).__name__}.")
    for node_id, value in mapping.items():
        _check_uint64(f"node id in {name}", node_id)
        _check_bytes(f"{name} entry of node {node_id}", value, size)

    return {node_id: mapping[node_id] for node_id in sorted(mapping)}


def _hex_map(mapping: Mapping[int, bytes]) -> dict[str, str]:
    return {str(node_id): value.hex() for node_id, value in mapping.items()}


def _require(data: Mapping[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if kind is int and isinstance(value, LongJSONInteger):
        # __post_init__ checks the field's range, and so names its bound.
        return value
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(
            f"{key} must be a JSON {kind.__name__}. Found {json_type_name(value)}."
        )
    return value


def _parse_decimal(data: Mapping[str, Any], key: str) -> int:
    return _decimal(key, _require(data, key, str))


def _decimal(name: str, text: object) -> int:
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        raise ValueError(f"{name} must hold decimal strings. Found {text!r:.80}.")
    if len(text) > _UINT64_DIGITS:
        raise ValueError(
            f"{name} must hold uint64 decimal strings of at most {_UINT64_DIGITS} "
            f"digits. Found {len(text)} digits."
        )
    if len(text) > 1 and text.startswith("0"):
        raise ValueError(
            f"{name} must hold decimals without leading zeros. Found {text!r}."
        )
    return int(text)


def _hex(name: str, text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{name} must hold hex strings. Found {json_type_name(text)}.")
    if not is_lower_hex(text):
        raise ValueError(
            f"{name} must hold lowercase hex strings of whole bytes. "
            f"Found {text[:80]!r}."
        )
    return bytes.fromhex(text)


def _parse_hex_map(data: Mapping[str, Any], key: str) -> dict[int, bytes]:
    return {
        _decimal(key, node_id): _hex(key, value)
        for node_id, value in _require(data, key, dict).items()
    }


def _check_uint64(name: str, value: int) -> None:
    _check_int_range(name, value, 0, 2**64 - 1)


def _check_int_type(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int. Found {json_type_name(value)}.")


def _check_int_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, LongJSONInteger):
        raise value.range_error(name, low=low, high=high)
    _check_int_type(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}. Found {value}.")


def _check_length(length: int) -> None:
    _check_int_range("aggregate_length", length, 0, commitments.MAX_PROJECTION_LENGTH)


def _check_bytes(name: str, data: bytes, size: int) -> None:
    if not isinstance(data, bytes):
        raise ValueError(f"{name} must be bytes. Found {type(data).__name__}.")
    if len(data) != size:
        raise ValueError(f"{name} must be {size} bytes long. Found {len(data)} bytes.")
