"""Protocol stages, domain-separation labels and the messages of one round.

Every message converts to and from a flat mapping of ``int``, ``bytes``,
``str`` and ``list[bytes]`` values, which the Flower layer stores in a
``ConfigRecord``. Node ids are uint64 values, wider than a ``ConfigRecord``
integer, so lists of them travel packed as 8-byte big-endian words.
``from_fields`` treats its input as untrusted and raises ``ProtocolError``
naming the first field that is missing or of the wrong type.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from .errors import ProtocolError

FieldValue = int | float | bytes | str | list[bytes]
Fields = dict[str, FieldValue]

NODE_ID_SIZE = 8
MAX_NODE_ID = 2**64 - 1
_SHA256_SIZE = 32
_UINT32_SIZE = 4

SHARE_KEY_INFO = b"fedsec_flwr/share-encryption/v1"
"""HKDF info prefix of the key that encrypts shares between two clients."""

PAIR_SEED_INFO = b"fedsec_flwr/pair-seed/v2"
"""HKDF info prefix of the seed of the pairwise mask between two clients."""

SELF_MASK_LABEL = b"self"
PAIR_MASK_LABEL = b"pair"


class Stage(StrEnum):
    """Stages of one round, in order.

    A secure round runs setup, share-keys, masked-input and unmask. A plain
    round with verification runs setup, plain-input, commit and verify, and a
    secure round with verification adds commit and verify after unmask. With
    keys agreed once per run, a client runs register once, then keyed-input
    and keyed-unmask in each round.
    """

    SETUP = "setup"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    PLAIN_INPUT = "plain-input"
    UNMASK = "unmask"
    COMMIT = "commit"
    VERIFY = "verify"
    REGISTER = "register"
    KEYED_INPUT = "keyed-input"
    KEYED_UNMASK = "keyed-unmask"


SECURE_AGGREGATION_STAGES = (
    Stage.SETUP,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.UNMASK,
)
"""The four stages of a secure round without verification, in order."""


def pack_node_ids(node_ids: Sequence[int]) -> bytes:
    """Pack node ids as consecutive 8-byte big-endian words."""
    for node_id in node_ids:
        if not 0 <= node_id <= MAX_NODE_ID:
            raise ValueError(f"node id must be a uint64. Found {node_id!r}.")
    return struct.pack(f">{len(node_ids)}Q", *node_ids)


def unpack_node_ids(data: bytes, *, field: str) -> tuple[int, ...]:
    """Unpack node ids packed by ``pack_node_ids``; ``field`` names them in errors."""
    if len(data) % NODE_ID_SIZE:
        raise ProtocolError(
            f"{field} must be a multiple of {NODE_ID_SIZE} bytes. Found {len(data)}."
        )
    return struct.unpack(f">{len(data) // NODE_ID_SIZE}Q", data)


def unpack_single_id(fields: Mapping[str, object], key: str) -> int:
    """Unpack a field that contains exactly one packed id."""
    node_ids = unpack_node_ids(_field(fields, key, bytes), field=key)
    if len(node_ids) != 1:
        raise ProtocolError(f"{key} must hold one id. Found {len(node_ids)}.")
    return node_ids[0]


def round_context(run_id: int, server_round: int) -> bytes:
    """Return the 16-byte label of one round of one run."""
    return struct.pack(">QQ", run_id, server_round)


def self_mask_context(run_id: int, server_round: int, node_id: int) -> bytes:
    """Return the mask-expansion context of a client's self mask."""
    return (
        SELF_MASK_LABEL
        + round_context(run_id, server_round)
        + struct.pack(">Q", node_id)
    )


def pair_mask_context(
    run_id: int, server_round: int, node_a: int, node_b: int
) -> bytes:
    """Return the mask-expansion context of the mask between two clients.

    The pair is ordered, so both clients derive the same context.
    """
    low, high = sorted((node_a, node_b))
    return (
        PAIR_MASK_LABEL
        + round_context(run_id, server_round)
        + struct.pack(">QQ", low, high)
    )


def pair_sign(node_id: int, peer_id: int) -> int:
    """Return the sign with which ``node_id`` adds the mask it shares with a peer."""
    return 1 if node_id < peer_id else -1


_T = TypeVar("_T", int, bytes, str)


def _field(fields: Mapping[str, object], key: str, kind: type[_T]) -> _T:
    value = fields.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(
            f"Field {key!r} must be of type {kind.__name__}. "
            f"Found {type(value).__name__}."
        )
    return value


def _bytes_list(fields: Mapping[str, object], key: str) -> list[bytes]:
    value = fields.get(key)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ProtocolError(f"Field {key!r} must be a list of bytes.")
    return list(value)


def _node_map(
    fields: Mapping[str, object], ids_key: str, values_key: str
) -> dict[int, bytes]:
    node_ids = unpack_node_ids(_field(fields, ids_key, bytes), field=ids_key)
    values = _bytes_list(fields, values_key)
    if len(node_ids) != len(values) or len(set(node_ids)) != len(node_ids):
        raise ProtocolError(
            f"Fields {ids_key!r} and {values_key!r} must pair distinct node ids "
            f"with values. Found {len(node_ids)} ids and {len(values)} values."
        )
    return dict(zip(node_ids, values, strict=True))


def _node_map_fields(
    mapping: Mapping[int, bytes], ids_key: str, values_key: str
) -> Fields:
    node_ids = sorted(mapping)
    return {
        ids_key: pack_node_ids(node_ids),
        values_key: [mapping[node_id] for node_id in node_ids],
    }


@dataclass(frozen=True)
class RoundHeader:
    """Fields every server request carries."""

    stage: Stage
    run_id: int
    server_round: int

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            "stage": self.stage.value,
            "run-id": pack_node_ids([self.run_id]),
            "server-round": self.server_round,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> RoundHeader:
        """Parse untrusted record fields."""
        stage_name = _field(fields, "stage", str)
        try:
            stage = Stage(stage_name)
        except ValueError:
            raise ProtocolError(f"Unknown protocol stage {stage_name!r}.") from None
        run_id = unpack_single_id(fields, "run-id")
        server_round = _field(fields, "server-round", int)
        if server_round < 1:
            raise ProtocolError(
                f"server-round must be at least 1. Found {server_round}."
            )
        return cls(stage=stage, run_id=run_id, server_round=server_round)


@dataclass(frozen=True)
class SetupReply:
    """A client's public keys for one round."""

    encryption_public_key: bytes
    mask_public_key: bytes

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            "encryption-public-key": self.encryption_public_key,
            "mask-public-key": self.mask_public_key,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> SetupReply:
        """Parse untrusted record fields."""
        return cls(
            encryption_public_key=_field(fields, "encryption-public-key", bytes),
            mask_public_key=_field(fields, "mask-public-key", bytes),
        )


@dataclass(frozen=True)
class ShareKeysRequest:
    """The threshold and the public keys of a client's neighbours."""

    threshold: int
    neighbour_ids: tuple[int, ...]
    encryption_public_keys: tuple[bytes, ...]
    mask_public_keys: tuple[bytes, ...]

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            "threshold": self.threshold,
            "neighbour-ids": pack_node_ids(self.neighbour_ids),
            "encryption-public-keys": list(self.encryption_public_keys),
            "mask-public-keys": list(self.mask_public_keys),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> ShareKeysRequest:
        """Parse untrusted record fields."""
        neighbour_ids = unpack_node_ids(
            _field(fields, "neighbour-ids", bytes), field="neighbour-ids"
        )
        encryption_keys = _bytes_list(fields, "encryption-public-keys")
        mask_keys = _bytes_list(fields, "mask-public-keys")
        if not len(neighbour_ids) == len(encryption_keys) == len(mask_keys):
            raise ProtocolError(
                "neighbour-ids, encryption-public-keys and mask-public-keys must "
                f"have one entry per neighbour. Found {len(neighbour_ids)}, "
                f"{len(encryption_keys)} and {len(mask_keys)}."
            )
        return cls(
            threshold=_field(fields, "threshold", int),
            neighbour_ids=neighbour_ids,
            encryption_public_keys=tuple(encryption_keys),
            mask_public_keys=tuple(mask_keys),
        )


@dataclass(frozen=True)
class EncryptedShares:
    """Encrypted shares, keyed by the node id of the other client.

    In a client's share-keys reply the keys are receivers; in a masked-input
    request they are senders.
    """

    ciphertexts: dict[int, bytes]

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return _node_map_fields(self.ciphertexts, "peer-ids", "ciphertexts")

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> EncryptedShares:
        """Parse untrusted record fields."""
        return cls(ciphertexts=_node_map(fields, "peer-ids", "ciphertexts"))


@dataclass(frozen=True)
class UnmaskRequest:
    """The clients whose masked input the server included, and those it lacks."""

    survivor_ids: tuple[int, ...]
    dropped_ids: tuple[int, ...]

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            "survivor-ids": pack_node_ids(self.survivor_ids),
            "dropped-ids": pack_node_ids(self.dropped_ids),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> UnmaskRequest:
        """Parse untrusted record fields."""
        return cls(
            survivor_ids=unpack_node_ids(
                _field(fields, "survivor-ids", bytes), field="survivor-ids"
            ),
            dropped_ids=unpack_node_ids(
                _field(fields, "dropped-ids", bytes), field="dropped-ids"
            ),
        )


@dataclass(frozen=True)
class UnmaskReply:
    """Seed shares of surviving owners and the round's seeds shared with dropouts.

    ``seed_shares`` is keyed by the share's owner, ``pair_seeds`` by the
    dropped neighbour.
    """

    seed_shares: dict[int, bytes]
    pair_seeds: dict[int, bytes]

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            **_node_map_fields(self.seed_shares, "seed-owner-ids", "seed-shares"),
            **_node_map_fields(self.pair_seeds, "dropped-peer-ids", "pair-seeds"),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> UnmaskReply:
        """Parse untrusted record fields."""
        return cls(
            seed_shares=_node_map(fields, "seed-owner-ids", "seed-shares"),
            pair_seeds=_node_map(fields, "dropped-peer-ids", "pair-seeds"),
        )


@dataclass(frozen=True)
class KeyedUnmaskRequest:
    """The survivors and dropouts of a round with run keys, and the held shares.

    ``ciphertexts`` contains the self-mask seed shares that the client's
    surviving neighbours addressed to it, keyed by sender.
    """

    survivor_ids: tuple[int, ...]
    dropped_ids: tuple[int, ...]
    ciphertexts: dict[int, bytes]

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            **UnmaskRequest(self.survivor_ids, self.dropped_ids).to_fields(),
            **EncryptedShares(self.ciphertexts).to_fields(),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> KeyedUnmaskRequest:
        """Parse untrusted record fields."""
        lists = UnmaskRequest.from_fields(fields)
        return cls(
            survivor_ids=lists.survivor_ids,
            dropped_ids=lists.dropped_ids,
            ciphertexts=EncryptedShares.from_fields(fields).ciphertexts,
        )


@dataclass(frozen=True)
class KeyedUnmaskReply:
    """Seed shares of surviving owners and the round's seeds shared with dropouts.

    ``seed_shares`` is keyed by the share's owner, ``pair_seeds`` by the
    dropped neighbour.
    """

    seed_shares: dict[int, bytes]
    pair_seeds: dict[int, bytes]

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            **_node_map_fields(self.seed_shares, "seed-owner-ids", "seed-shares"),
            **_node_map_fields(self.pair_seeds, "dropped-peer-ids", "pair-seeds"),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> KeyedUnmaskReply:
        """Parse untrusted record fields."""
        return cls(
            seed_shares=_node_map(fields, "seed-owner-ids", "seed-shares"),
            pair_seeds=_node_map(fields, "dropped-peer-ids", "pair-seeds"),
        )


def _optional_bytes(fields: Mapping[str, object], key: str) -> bytes:
    if key not in fields:
        return b""
    return _field(fields, key, bytes)


@dataclass(frozen=True)
class SetupRequest:
    """Whether the server verifies the round's aggregate with commitments."""

    verification: bool

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {"verification": int(self.verification)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> SetupRequest:
        """Parse untrusted record fields; a missing flag means no verification."""
        if "verification" not in fields:
            return cls(verification=False)
        flag = _field(fields, "verification", int)
        if flag not in (0, 1):
            raise ProtocolError(f"Field 'verification' must be 0 or 1. Found {flag}.")
        return cls(verification=bool(flag))


@dataclass(frozen=True)
class IdentityKey:
    """A client's Ed25519 identity public key, sent with its setup reply.

    ``public_key`` is empty when the round is not verified.
    """

    public_key: bytes

    def to_fields(self) -> Fields:
        """Convert to record fields; an empty key adds no field."""
        if not self.public_key:
            return {}
        return {"identity-public-key": self.public_key}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> IdentityKey:
        """Parse untrusted record fields."""
        return cls(public_key=_optional_bytes(fields, "identity-public-key"))


@dataclass(frozen=True)
class IdentityKeyList:
    """The identity public keys of every client of a round, by node id."""

    identity_keys: dict[int, bytes]

    @staticmethod
    def present(fields: Mapping[str, object]) -> bool:
        """Test whether a request carries an identity-key list."""
        return "identity-node-ids" in fields

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return _node_map_fields(
            self.identity_keys, "identity-node-ids", "identity-keys"
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> IdentityKeyList:
        """Parse untrusted record fields."""
        return cls(
            identity_keys=_node_map(fields, "identity-node-ids", "identity-keys")
        )


@dataclass(frozen=True)
class KeyListSignature:
    """A client's signature over the digest of the identity-key list it received."""

    signature: bytes

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {"key-list-signature": self.signature}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> KeyListSignature:
        """Parse untrusted record fields."""
        return cls(signature=_field(fields, "key-list-signature", bytes))


@dataclass(frozen=True)
class CommitRequest:
    """The included clients S, the limb sums L and the digest of a released aggregate.

    The aggregate A itself travels with the verify request: a client needs
    only its length and SHA-256 to derive the projection seed.
    ``blinding_sums`` contains the limb sums as big-endian uint32 values.
    """

    included_node_ids: tuple[int, ...]
    blinding_sums: tuple[int, ...]
    aggregate_length: int
    aggregate_sha256: bytes

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            "included-node-ids": pack_node_ids(self.included_node_ids),
            "blinding-sums": struct.pack(
                f">{len(self.blinding_sums)}I", *self.blinding_sums
            ),
            "aggregate-length": self.aggregate_length,
            "aggregate-sha256": self.aggregate_sha256,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CommitRequest:
        """Parse untrusted record fields."""
        included = unpack_node_ids(
            _field(fields, "included-node-ids", bytes), field="included-node-ids"
        )
        packed = _field(fields, "blinding-sums", bytes)
        if len(packed) % _UINT32_SIZE:
            raise ProtocolError(
                f"blinding-sums must be a multiple of {_UINT32_SIZE} bytes. "
                f"Found {len(packed)}."
            )
        sums = struct.unpack(f">{len(packed) // _UINT32_SIZE}I", packed)
        length = _field(fields, "aggregate-length", int)
        if length < 0:
            raise ProtocolError(
                f"aggregate-length must be non-negative. Found {length}."
            )
        digest = _field(fields, "aggregate-sha256", bytes)
        if len(digest) != _SHA256_SIZE:
            raise ProtocolError(
                f"aggregate-sha256 must be {_SHA256_SIZE} bytes. Found {len(digest)}."
            )
        return cls(
            included_node_ids=included,
            blinding_sums=sums,
            aggregate_length=length,
            aggregate_sha256=digest,
        )


@dataclass(frozen=True)
class CommitReply:
    """A client's encoded commitment and its signature over it."""

    commitment: bytes
    signature: bytes

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {"commitment": self.commitment, "commitment-signature": self.signature}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> CommitReply:
        """Parse untrusted record fields."""
        return cls(
            commitment=_field(fields, "commitment", bytes),
            signature=_field(fields, "commitment-signature", bytes),
        )


@dataclass(frozen=True)
class VerifyRequest:
    """The round's transcript, as canonical JSON."""

    transcript: str

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {"transcript": self.transcript}

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> VerifyRequest:
        """Parse untrusted record fields."""
        return cls(transcript=_field(fields, "transcript", str))


@dataclass(frozen=True)
class VerifyReply:
    """A client's verdict on the round's transcript, and why it failed.

    ``discarded`` means that the transcript passed every check it allows,
    but some included clients did not commit, so the client expects the
    round's update to be discarded.
    """

    verified: bool
    reason: str
    discarded: bool = False

    def to_fields(self) -> Fields:
        """Convert to record fields."""
        return {
            "verified": int(self.verified),
            "reason": self.reason,
            "discarded": int(self.discarded),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> VerifyReply:
        """Parse untrusted record fields."""
        flags = {name: _field(fields, name, int) for name in ("verified", "discarded")}
        for name, flag in flags.items():
            if flag not in (0, 1):
                raise ProtocolError(f"Field {name!r} must be 0 or 1. Found {flag}.")
        if flags["verified"] and flags["discarded"]:
            raise ProtocolError("A verify reply cannot be verified and discarded.")
        return cls(
            verified=bool(flags["verified"]),
            reason=_field(fields, "reason", str),
            discarded=bool(flags["discarded"]),
        )
