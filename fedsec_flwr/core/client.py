"""Client side of one secure-aggregation round, as pure functions over its state.

Each stage function takes the state left by the previous stage and the
server's request, checks both, and returns the new state and the reply. The
state is a flat record (``ClientState.to_fields``) so that it can live in
Flower's ``Context.state`` between stages, which in a deployment run in
separate processes.

Two rules keep an input private when the server lies about dropouts. For
each neighbour it masked with, a client reveals either the share of the
neighbour's self-mask seed (its masked input was included) or the seed of
their pairwise mask in this round (it was not), never both, and it answers
the unmask request of a round only once. And it accepts at most
``threshold - 2`` neighbours that sent it no shares or are listed as
dropped, together (see `client_unmask`). The mask private key is never
shared, so a pairwise seed reaches the server only from the two clients of
the pair.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from . import aead, keys, masks, shamir
from .errors import AuthenticationError, ProtocolError
from .messages import (
    PAIR_SEED_INFO,
    SHARE_KEY_INFO,
    EncryptedShares,
    Fields,
    SetupReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    _bytes_list,
    _field,
    _node_map,
    _node_map_fields,
    pack_node_ids,
    pair_mask_context,
    pair_sign,
    round_context,
    self_mask_context,
    unpack_node_ids,
    unpack_single_id,
)

SEED_SIZE = 32
MIN_THRESHOLD = 2
MAX_NEIGHBOURS = 1024
"""Most neighbours a client shares with. Sharing costs time in the number of
neighbours times the threshold, so a request with more is refused before any
work (20,000 neighbours took a minute of CPU)."""


@dataclass(frozen=True)
class ClientState:
    """Everything a client keeps between the stages of one round.

    ``stage`` is the last stage the client completed. Secret fields (private
    keys, the self-mask seed and held shares) never leave the client except as
    the shares ``client_unmask`` reveals.
    """

    run_id: int
    server_round: int
    node_id: int
    stage: Stage
    encryption_private_key: bytes
    mask_private_key: bytes
    threshold: int = 0
    neighbour_ids: tuple[int, ...] = ()
    encryption_public_keys: tuple[bytes, ...] = ()
    mask_public_keys: tuple[bytes, ...] = ()
    self_seed: bytes = b""
    own_seed_share: bytes = b""
    held_seed_shares: dict[int, bytes] = field(default_factory=dict)

    @property
    def active_neighbour_ids(self) -> tuple[int, ...]:
        """Neighbours whose shares this client holds; it masks with exactly these."""
        return tuple(sorted(self.held_seed_shares))

    def to_fields(self) -> Fields:
        """Convert to record fields for ``Context.state``."""
        return {
            "run-id": pack_node_ids([self.run_id]),
            "server-round": self.server_round,
            "node-id": pack_node_ids([self.node_id]),
            "stage": self.stage.value,
            "encryption-private-key": self.encryption_private_key,
            "mask-private-key": self.mask_private_key,
            "threshold": self.threshold,
            "neighbour-ids": pack_node_ids(self.neighbour_ids),
            "encryption-public-keys": list(self.encryption_public_keys),
            "mask-public-keys": list(self.mask_public_keys),
            "self-seed": self.self_seed,
            "own-seed-share": self.own_seed_share,
            **_node_map_fields(self.held_seed_shares, "seed-holder-ids", "seed-shares"),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> ClientState:
        """Restore a state stored by ``to_fields``.

        Raises:
            ProtocolError: A field is missing or of the wrong type, or a
                state after setup has a threshold outside 2 to the number of
                share holders.

        """
        run_id = unpack_single_id(fields, "run-id")
        node_id = unpack_single_id(fields, "node-id")
        state = cls(
            run_id=run_id,
            server_round=_field(fields, "server-round", int),
            node_id=node_id,
            stage=Stage(_field(fields, "stage", str)),
            encryption_private_key=_field(fields, "encryption-private-key", bytes),
            mask_private_key=_field(fields, "mask-private-key", bytes),
            threshold=_field(fields, "threshold", int),
            neighbour_ids=unpack_node_ids(
                _field(fields, "neighbour-ids", bytes), field="neighbour-ids"
            ),
            encryption_public_keys=tuple(_bytes_list(fields, "encryption-public-keys")),
            mask_public_keys=tuple(_bytes_list(fields, "mask-public-keys")),
            self_seed=_field(fields, "self-seed", bytes),
            own_seed_share=_field(fields, "own-seed-share", bytes),
            held_seed_shares=_node_map(fields, "seed-holder-ids", "seed-shares"),
        )
        holders = len(state.neighbour_ids) + 1
        if state.stage is not Stage.SETUP and not (
            MIN_THRESHOLD <= state.threshold <= holders
        ):
            raise ProtocolError(
                f"The stored client state has threshold {state.threshold}, outside "
                f"{MIN_THRESHOLD} to its {holders} share holders."
            )
        return state


def min_secure_threshold(num_neighbours: int) -> int:
    """Return the smallest threshold that is a strict majority of the holders.

    With ``k + 1`` holders and ``2t > k + 1``, two groups of holders that a
    server shows different survivor lists cannot both reach ``t``, so a seed
    is recovered from one account of the round at most.
    """
    return (num_neighbours + 1) // 2 + 1


def _require_stage(state: ClientState, expected: Stage, requested: Stage) -> None:
    if state.stage is not expected:
        raise ProtocolError(
            f"Stage {requested.value!r} must follow stage {expected.value!r}. "
            f"Found the client after stage {state.stage.value!r}."
        )


def client_setup(
    *, run_id: int, server_round: int, node_id: int
) -> tuple[ClientState, SetupReply]:
    """Start a round: create the round's encryption and mask key pairs."""
    encryption_key = keys.generate_private_key()
    mask_key = keys.generate_private_key()
    state = ClientState(
        run_id=run_id,
        server_round=server_round,
        node_id=node_id,
        stage=Stage.SETUP,
        encryption_private_key=keys.private_key_bytes(encryption_key),
        mask_private_key=keys.private_key_bytes(mask_key),
    )
    reply = SetupReply(
        encryption_public_key=keys.public_key_bytes(encryption_key),
        mask_public_key=keys.public_key_bytes(mask_key),
    )
    return state, reply


def share_holders(node_id: int, neighbour_ids: tuple[int, ...]) -> tuple[int, ...]:
    """Return the holders of a client's shares, in share-index order.

    The client itself is a holder, so a round stays recoverable when only the
    client and a few neighbours remain.
    """
    return tuple(sorted((*neighbour_ids, node_id)))


def check_neighbour_request(state: ClientState, request: ShareKeysRequest) -> None:
    """Check the neighbour list, threshold and key sizes the server sent."""
    neighbours = request.neighbour_ids
    if not 1 <= len(neighbours) <= MAX_NEIGHBOURS:
        raise ProtocolError(
            f"neighbour-ids must name 1 to {MAX_NEIGHBOURS} neighbours. "
            f"Found {len(neighbours)}."
        )
    if len(set(neighbours)) != len(neighbours) or state.node_id in neighbours:
        raise ProtocolError(
            "neighbour-ids must be distinct and must not contain the client itself."
        )
    holders = len(neighbours) + 1
    minimum = max(MIN_THRESHOLD, min_secure_threshold(len(neighbours)))
    if not minimum <= request.threshold <= holders:
        raise ProtocolError(
            f"threshold must be between {minimum} (a strict majority of the "
            f"{holders} share holders) and {holders}. Found {request.threshold}."
        )
    for public_key in (*request.encryption_public_keys, *request.mask_public_keys):
        if len(public_key) != keys.KEY_SIZE:
            raise ProtocolError(
                f"Public keys must be {keys.KEY_SIZE} bytes. Found {len(public_key)}."
            )
    # Reject unusable keys now: key agreement with a mask key would fail only
    # after training.
    for peer, encryption_key, mask_key in zip(
        request.neighbour_ids,
        request.encryption_public_keys,
        request.mask_public_keys,
        strict=True,
    ):
        if not (
            keys.is_usable_public_key(encryption_key)
            and keys.is_usable_public_key(mask_key)
        ):
            raise ProtocolError(
                f"The public keys of neighbour {peer} are not usable X25519 keys "
                "(a low-order point)."
            )
    own_keys = {
        keys.public_key_bytes(keys.load_private_key(private))
        for private in (state.encryption_private_key, state.mask_private_key)
    }
    for kind, public_keys in (
        ("encryption", request.encryption_public_keys),
        ("mask", request.mask_public_keys),
    ):
        # Honest neighbours never share a key, so a repeated key means the
        # server altered the list. The masks would still differ, because each
        # pair's mask expansion binds both node ids.
        if len(set(public_keys)) != len(public_keys) or own_keys & set(public_keys):
            raise ProtocolError(
                f"The neighbours' {kind} public keys must be distinct and differ "
                "from this client's own keys. Found a repeated key."
            )


def share_key(state: ClientState, peer_public_key: bytes) -> bytes:
    """Derive the round's key that encrypts shares between this client and a peer."""
    return keys.derive_shared_key(
        keys.load_private_key(state.encryption_private_key),
        peer_public_key,
        info=SHARE_KEY_INFO + round_context(state.run_id, state.server_round),
    )


def client_share_keys(
    state: ClientState, request: ShareKeysRequest
) -> tuple[ClientState, EncryptedShares]:
    """Share the self-mask seed among the holders.

    Each neighbour's share is encrypted with a key agreed with that
    neighbour, and the associated data binds run, round, stage, sender and
    receiver, so the relaying server can neither read nor redirect it. The
    mask private key is never shared: a dropped neighbour's masks are
    removed with the pairwise seeds that its surviving neighbours reveal.
    """
    _require_stage(state, Stage.SETUP, Stage.SHARE_KEYS)
    check_neighbour_request(state, request)

    self_seed = os.urandom(SEED_SIZE)
    holders = share_holders(state.node_id, request.neighbour_ids)
    seed_shares = shamir.split_secret(
        self_seed, threshold=request.threshold, num_shares=len(holders)
    )

    ciphertexts: dict[int, bytes] = {}
    own_seed_share = b""
    for holder, seed_share in zip(holders, seed_shares, strict=True):
        plaintext = shamir.encode_share(seed_share)
        if holder == state.node_id:
            own_seed_share = plaintext
            continue
        position = request.neighbour_ids.index(holder)
        ciphertexts[holder] = aead.encrypt(
            share_key(state, request.encryption_public_keys[position]),
            plaintext,
            associated_data=aead.share_associated_data(
                run_id=state.run_id,
                server_round=state.server_round,
                stage=Stage.SHARE_KEYS.value,
                sender=state.node_id,
                receiver=holder,
            ),
        )

    new_state = replace(
        state,
        stage=Stage.SHARE_KEYS,
        threshold=request.threshold,
        neighbour_ids=request.neighbour_ids,
        encryption_public_keys=request.encryption_public_keys,
        mask_public_keys=request.mask_public_keys,
        self_seed=self_seed,
        own_seed_share=own_seed_share,
    )
    return new_state, EncryptedShares(ciphertexts=ciphertexts)


def client_receive_shares(
    state: ClientState, request: EncryptedShares, *, trust_dropouts: bool = False
) -> ClientState:
    """Decrypt and keep the shares the neighbours sent through the server.

    Any share that fails authentication aborts the round for this client:
    skipping it would leave a pairwise mask that the server could not remove.

    A neighbour whose share is missing has a share of this client's seed
    but gets no pairwise mask, so it could reveal that share at no cost to
    the server. At most ``threshold - 2`` of them are accepted, counted with
    the dropouts at unmask (see `client_unmask`), unless ``trust_dropouts``
    is set.
    """
    _require_stage(state, Stage.SHARE_KEYS, Stage.MASKED_INPUT)
    unknown = set(request.ciphertexts) - set(state.neighbour_ids)
    if unknown:
        raise ProtocolError(
            f"Received shares from {len(unknown)} node(s) that are not neighbours."
        )
    missing = len(state.neighbour_ids) - len(request.ciphertexts)
    if not trust_dropouts and missing > state.threshold - 2:
        raise ProtocolError(
            f"{missing} of this client's neighbours sent no shares, more than "
            f"threshold - 2 = {state.threshold - 2}; masking without them could "
            "expose this client's input."
        )

    share_size = len(state.own_seed_share)
    seed_shares: dict[int, bytes] = {}
    for sender, ciphertext in request.ciphertexts.items():
        position = state.neighbour_ids.index(sender)
        plaintext = decrypt_share(
            share_key(state, state.encryption_public_keys[position]),
            ciphertext,
            associated_data=aead.share_associated_data(
                run_id=state.run_id,
                server_round=state.server_round,
                stage=Stage.SHARE_KEYS.value,
                sender=sender,
                receiver=state.node_id,
            ),
            sender=sender,
            size=share_size,
        )
        seed_shares[sender] = plaintext

    if len(seed_shares) + 1 < state.threshold:
        raise ProtocolError(
            f"Only {len(seed_shares)} neighbour(s) shared keys, fewer than the "
            f"threshold {state.threshold} minus the client itself."
        )
    return replace(state, stage=Stage.MASKED_INPUT, held_seed_shares=seed_shares)


def decrypt_share(
    key: bytes, token: bytes, *, associated_data: bytes, sender: int, size: int
) -> bytes:
    """Decrypt a neighbour's share token and check its plaintext size.

    Raises:
        AuthenticationError: If the token is not authentic or its plaintext
            is not ``size`` bytes. The message names the sender, so that the
            server's error for an aborted round shows which client sent it.

    """
    try:
        plaintext = aead.decrypt(key, token, associated_data=associated_data)
    except AuthenticationError as error:
        raise AuthenticationError(
            f"Decryption failed for the share from node {sender}: {error}"
        ) from None
    if len(plaintext) != size:
        raise AuthenticationError(
            f"Decryption failed for the share from node {sender}: the plaintext "
            f"is {len(plaintext)} bytes, not {size}."
        )
    return plaintext


def pair_seed(
    mask_private_key: bytes,
    peer_mask_public_key: bytes,
    run_id: int,
    server_round: int,
    *,
    node_ids: tuple[int, int],
) -> bytes:
    """Derive the 32-byte seed of the pairwise mask between two clients.

    The derivation binds the two node ids, in increasing order, besides the
    run and round. A server that swaps two neighbours' mask keys in a
    client's list then gets, for a neighbour it calls dropped, a seed that
    matches no mask the client added for the other neighbour.
    """
    low, high = sorted(node_ids)
    return keys.derive_shared_key(
        keys.load_private_key(mask_private_key),
        peer_mask_public_key,
        info=PAIR_SEED_INFO
        + round_context(run_id, server_round)
        + pack_node_ids([low, high]),
    )


def client_mask(
    state: ClientState, encoded: NDArray[np.uint32], *, modulus: int
) -> NDArray[np.uint32]:
    """Add the self mask and the pairwise masks to an encoded input.

    Returns a new array of values modulo ``modulus``; ``encoded`` is unchanged.
    """
    _require_stage(state, Stage.MASKED_INPUT, Stage.MASKED_INPUT)
    masked = encoded.astype(np.uint32, copy=True)
    masks.add_mask(
        masked,
        state.self_seed,
        context=self_mask_context(state.run_id, state.server_round, state.node_id),
        sign=1,
    )
    for peer in state.active_neighbour_ids:
        position = state.neighbour_ids.index(peer)
        seed = pair_seed(
            state.mask_private_key,
            state.mask_public_keys[position],
            state.run_id,
            state.server_round,
            node_ids=(state.node_id, peer),
        )
        masks.add_mask(
            masked,
            seed,
            context=pair_mask_context(
                state.run_id, state.server_round, state.node_id, peer
            ),
            sign=pair_sign(state.node_id, peer),
        )
    if modulus < 2**32:
        np.bitwise_and(masked, np.uint32(modulus - 1), out=masked)
    return masked


def client_unmask(
    state: ClientState, request: UnmaskRequest, *, trust_dropouts: bool = False
) -> tuple[ClientState, UnmaskReply]:
    """Reveal, per neighbour, its seed share or the pairwise seed shared with it.

    A surviving neighbour gets its share of the self-mask seed revealed, a
    dropped one the pairwise seed of this round, which only the two clients
    of the pair can compute. To remove every mask of this client's input,
    a server needs each pairwise seed, from this client or the neighbour,
    and ``threshold`` shares of its seed. A neighbour that reveals the seed
    it shares with this client received a list with this client as dropped,
    so it reveals no share of this client's seed. Shares can then come only from
    this client, from the neighbours it lists as dropped and from those that
    sent it no shares. Their number is kept at ``threshold - 1`` or less by
    rejecting more than ``threshold - 2`` of the last two kinds, whatever the
    server tells the other clients. That margin is one share: a colluding
    neighbour, which gives both its share and its pair's seed, closes it.
    ``trust_dropouts`` lifts that limit for a client that trusts the
    server's dropout lists: it then tolerates as many dropouts as the
    threshold allows, and a server that lies about them can unmask its
    input.

    Raises:
        ProtocolError: The request lists a node as both survivor and dropped,
            leaves this client out of the survivors, includes fewer of its
            holders than the threshold, or lists too many neighbours as
            dropped.

    """
    _require_stage(state, Stage.MASKED_INPUT, Stage.UNMASK)
    survivors = set(request.survivor_ids)
    dropped = set(request.dropped_ids)
    holders = {*state.active_neighbour_ids, state.node_id}
    if survivors & dropped:
        raise ProtocolError("A node is listed both as survivor and as dropped.")
    if state.node_id not in survivors:
        raise ProtocolError("The survivor list must contain the client itself.")
    # Count only the holders this client has shares from, so padding the list with
    # made-up ids does not pass the check.
    included_holders = len(survivors & holders)
    if included_holders < state.threshold:
        raise ProtocolError(
            f"Only {included_holders} of this client's share holders have their "
            f"masked input included, fewer than the threshold {state.threshold}; "
            "revealing shares could expose an input."
        )
    listed_dropped = dropped & set(state.active_neighbour_ids)
    silent = len(state.neighbour_ids) - len(state.active_neighbour_ids)
    if not trust_dropouts and silent + len(listed_dropped) > state.threshold - 2:
        raise ProtocolError(
            f"{len(listed_dropped)} of this client's neighbours are listed as "
            f"dropped and {silent} sent it no shares, more than threshold - 2 = "
            f"{state.threshold - 2} together; revealing their pairwise seeds could "
            "expose this client's input."
        )

    # The lists cover the whole round; only this client's share holders matter.
    seed_shares = {
        owner: state.held_seed_shares[owner]
        for owner in survivors & holders
        if owner != state.node_id
    }
    seed_shares[state.node_id] = state.own_seed_share
    pair_seeds = {
        peer: pair_seed(
            state.mask_private_key,
            state.mask_public_keys[state.neighbour_ids.index(peer)],
            state.run_id,
            state.server_round,
            node_ids=(state.node_id, peer),
        )
        for peer in sorted(listed_dropped)
    }
    return replace(state, stage=Stage.UNMASK), UnmaskReply(
        seed_shares=seed_shares, pair_seeds=pair_seeds
    )
