"""Secure aggregation with keys agreed once per run: two exchanges per round.

Each client registers two X25519 key pairs once per run: one encrypts the
shares it sends to its neighbours, one agrees the seeds of its pairwise masks.
A round then has two exchanges with the clients:

- keyed-input: the server sends the model, the round's neighbour graph and
  the neighbours' public keys. The client trains, draws a fresh self-mask
  seed, masks its input with that seed and with one pairwise mask per
  neighbour, and returns the masked input together with Shamir shares of the
  seed, each encrypted for one neighbour.
- keyed-unmask: the server names the clients whose masked input it included
  (survivors) and those it lacks (dropouts), and forwards to each survivor the
  shares its surviving neighbours addressed to it. The client reveals the
  seed share of every surviving neighbour, and, for every dropped neighbour,
  the seed of the pairwise mask it shares with that neighbour in this round.

A pairwise seed is derived per round from the run's key agreement
(HKDF with the run and round in its info), so revealing one discloses that
round's mask with that neighbour and nothing about other rounds. The long-term
mask keys are never shared or revealed, so a client that drops out and
returns renews nothing but its per-round self-mask seed, which is fresh in
every round anyway.

Two rules keep an input private when the server lies about dropouts. First,
for each neighbour a client reveals either the neighbour's seed share (its
input was included) or their pairwise seed (it was not), never both, and it
replies to the unmask request of a round only once. Second, a client rejects
an unmask request that lists more than ``threshold - 2`` of its neighbours as
dropped. A pairwise seed reaches the server from either end of the pair, so
a server that wants every mask of one client's input can get the seeds of the
listed dropouts from the client and the other seeds from the neighbours told
that the client dropped. Only the client and the listed dropouts then reveal
shares of its self-mask seed, at most ``threshold - 1`` of them.

Keys per round (`fedsec_flwr.core.client`) follow the same rules. Revealing
seeds costs dropout tolerance. Each included client accepts at most
``threshold - 2`` dropped neighbours. The
server can remove the mask between a survivor and a dropped neighbour only
with the survivor's own reply, so a round in which a client drops before
sending its input and one of its neighbours drops after sending its own is
aborted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from . import aead, keys, masks, shamir
from .client import (
    SEED_SIZE,
    ClientState,
    check_neighbour_request,
    client_mask,
    decrypt_share,
    pair_seed,
    share_holders,
    share_key,
)
from .errors import ProtocolError, TooFewSurvivorsError
from .messages import (
    EncryptedShares,
    Fields,
    KeyedUnmaskReply,
    KeyedUnmaskRequest,
    SetupReply,
    ShareKeysRequest,
    Stage,
    _field,
    pack_node_ids,
    pair_mask_context,
    pair_sign,
    self_mask_context,
    unpack_single_id,
)
from .server import (
    RoundState,
    plan_round,
    recover_secret,
)

logger = logging.getLogger("fedsec_flwr.core")


@dataclass(frozen=True)
class RunKeys:
    """A client's private keys for one run; they never leave the client."""

    run_id: int
    node_id: int
    encryption_private_key: bytes
    mask_private_key: bytes
    last_round: int = 0
    """The last round in which the client started to mask an input, or 0."""

    def to_fields(self) -> Fields:
        """Convert to record fields for ``Context.state``."""
        return {
            "run-id": pack_node_ids([self.run_id]),
            "node-id": pack_node_ids([self.node_id]),
            "last-round": self.last_round,
            "encryption-private-key": self.encryption_private_key,
            "mask-private-key": self.mask_private_key,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> RunKeys:
        """Restore keys stored by ``to_fields``."""
        run_id = unpack_single_id(fields, "run-id")
        node_id = unpack_single_id(fields, "node-id")
        return cls(
            run_id=run_id,
            node_id=node_id,
            encryption_private_key=_field(fields, "encryption-private-key", bytes),
            mask_private_key=_field(fields, "mask-private-key", bytes),
            last_round=_field(fields, "last-round", int),
        )

    def public(self) -> SetupReply:
        """Return the public keys the client registers with the server."""
        return SetupReply(
            encryption_public_key=keys.public_key_bytes(
                keys.load_private_key(self.encryption_private_key)
            ),
            mask_public_key=keys.public_key_bytes(
                keys.load_private_key(self.mask_private_key)
            ),
        )


def client_register(
    existing: RunKeys | None, *, run_id: int, node_id: int
) -> tuple[RunKeys, SetupReply]:
    """Return the client's run keys, creating them on the first request of a run.

    A repeated request in the same run returns the same public keys, so a
    server that lost its directory cannot make a client mask with two keys.

    Raises:
        ProtocolError: The client already has keys of another run or node.
            Flower keeps one ``Context`` per run and node, so only a server
            that tampers with the header asks for that, and new keys would
            also reset the client's record of the rounds it masked.

    """
    if existing is not None:
        if (existing.run_id, existing.node_id) != (run_id, node_id):
            raise ProtocolError(
                f"Invalid register request: this client has the keys of run "
                f"{existing.run_id} as node {existing.node_id}, so it does not "
                f"register again as node {node_id} of run {run_id}."
            )
        return existing, existing.public()

    run_keys = RunKeys(
        run_id=run_id,
        node_id=node_id,
        encryption_private_key=keys.private_key_bytes(keys.generate_private_key()),
        mask_private_key=keys.private_key_bytes(keys.generate_private_key()),
    )
    return run_keys, run_keys.public()


def client_start_round(
    run_keys: RunKeys, request: ShareKeysRequest, *, server_round: int
) -> tuple[ClientState, RunKeys]:
    """Check a keyed-input request before the client trains for it.

    A client masks at most one input per round, so it rejects a request for
    a round not later than ``run_keys.last_round``. Store the returned keys,
    which record this round, before training.
    """
    if server_round <= run_keys.last_round:
        raise ProtocolError(
            f"Round {server_round} must come after round "
            f"{run_keys.last_round}, in which this client already sent "
            "a masked input."
        )

    state = ClientState(
        run_id=run_keys.run_id,
        server_round=server_round,
        node_id=run_keys.node_id,
        stage=Stage.REGISTER,
        encryption_private_key=run_keys.encryption_private_key,
        mask_private_key=run_keys.mask_private_key,
    )
    check_neighbour_request(state, request)
    started = replace(
        state,
        threshold=request.threshold,
        neighbour_ids=request.neighbour_ids,
        encryption_public_keys=request.encryption_public_keys,
        mask_public_keys=request.mask_public_keys,
    )
    return started, replace(run_keys, last_round=server_round)


def client_keyed_input(
    state: ClientState, encoded: NDArray[np.uint32], *, modulus: int
) -> tuple[ClientState, NDArray[np.uint32], EncryptedShares]:
    """Mask an encoded input and share the round's self-mask seed.

    Returns the round's state, the masked input and the encrypted shares keyed
    by receiver.
    """
    if state.stage is not Stage.REGISTER:
        raise ProtocolError(
            f"A masked input needs a state from client_start_round. Found the "
            f"client after stage {state.stage.value!r}."
        )
    self_seed = os.urandom(SEED_SIZE)
    holders = share_holders(state.node_id, state.neighbour_ids)
    seed_shares = shamir.split_secret(
        self_seed, threshold=state.threshold, num_shares=len(holders)
    )

    ciphertexts: dict[int, bytes] = {}
    own_seed_share = b""
    for holder, share in zip(holders, seed_shares, strict=True):
        encoded_share = shamir.encode_share(share)
        if holder == state.node_id:
            own_seed_share = encoded_share
            continue
        position = state.neighbour_ids.index(holder)
        ciphertexts[holder] = aead.encrypt(
            share_key(state, state.encryption_public_keys[position]),
            encoded_share,
            associated_data=_associated_data(state, holder, sender=state.node_id),
        )

    # Mask with every neighbour: their keys are known before the round, and a
    # neighbour that drops is removed with the pairwise seed revealed later.
    masking = replace(
        state,
        stage=Stage.MASKED_INPUT,
        self_seed=self_seed,
        held_seed_shares=dict.fromkeys(state.neighbour_ids, b""),
    )
    masked = client_mask(masking, encoded, modulus=modulus)

    # The seed is needed only to mask; the server recovers it from shares.
    masked_state = replace(
        state, stage=Stage.KEYED_INPUT, own_seed_share=own_seed_share
    )
    return masked_state, masked, EncryptedShares(ciphertexts=ciphertexts)


def _associated_data(state: ClientState, receiver: int, *, sender: int) -> bytes:
    return aead.share_associated_data(
        run_id=state.run_id,
        server_round=state.server_round,
        stage=Stage.KEYED_INPUT.value,
        sender=sender,
        receiver=receiver,
    )


def client_keyed_unmask(
    state: ClientState, request: KeyedUnmaskRequest, *, trust_dropouts: bool = False
) -> tuple[ClientState, KeyedUnmaskReply]:
    """Reveal, per neighbour, either its seed share or the pairwise seed.

    ``trust_dropouts`` lifts the limit of ``threshold - 2`` dropped
    neighbours, for a client that trusts the server's dropout lists (see
    `fedsec_flwr.core.client.client_unmask`).

    Raises:
        ProtocolError: The request names this client as dropped, lists a node
            twice, includes fewer of its holders than the threshold, or comes
            a second time in the round.
        AuthenticationError: A forwarded share fails authentication.

    """
    if state.stage is not Stage.KEYED_INPUT:
        raise ProtocolError(
            f"Stage {Stage.KEYED_UNMASK.value!r} must follow stage "
            f"{Stage.KEYED_INPUT.value!r} of the same round, once. Found the "
            f"client after stage {state.stage.value!r}."
        )
    survivors = set(request.survivor_ids)
    dropped = set(request.dropped_ids)
    neighbours = set(state.neighbour_ids)
    if survivors & dropped:
        raise ProtocolError("A node is listed both as survivor and as dropped.")
    if state.node_id not in survivors:
        raise ProtocolError("The survivor list must contain the client itself.")

    # Count only this client's own holders, so padding the list with made-up
    # ids does not pass the check.
    included_holders = len(survivors & (neighbours | {state.node_id}))
    if included_holders < state.threshold:
        raise ProtocolError(
            f"Only {included_holders} of this client's share holders have their "
            f"masked input included, fewer than the threshold {state.threshold}; "
            "revealing shares could expose an input."
        )
    # Beyond threshold - 2 listed dropouts, the seeds revealed here and by the
    # other neighbours could cover every mask while threshold holders still
    # reveal shares of this client's seed (see the module docstring).
    listed_dropped = len(dropped & neighbours)
    if not trust_dropouts and listed_dropped > state.threshold - 2:
        raise ProtocolError(
            f"{listed_dropped} of this client's neighbours are listed as dropped, "
            f"more than threshold - 2 = {state.threshold - 2}; revealing their "
            "pairwise seeds could expose this client's input."
        )
    unexpected = set(request.ciphertexts) - (survivors & neighbours)
    if unexpected:
        raise ProtocolError(
            f"Received shares from {len(unexpected)} node(s) that are not "
            "surviving neighbours."
        )

    seed_shares = {state.node_id: state.own_seed_share}
    for sender, ciphertext in request.ciphertexts.items():
        seed_shares[sender] = _open_share(state, sender, ciphertext)

    pair_seeds = {
        peer: _round_pair_seed(state, peer) for peer in sorted(dropped & neighbours)
    }
    done = replace(state, stage=Stage.KEYED_UNMASK, own_seed_share=b"")
    return done, KeyedUnmaskReply(seed_shares=seed_shares, pair_seeds=pair_seeds)


def _open_share(state: ClientState, sender: int, ciphertext: bytes) -> bytes:
    position = state.neighbour_ids.index(sender)
    return decrypt_share(
        share_key(state, state.encryption_public_keys[position]),
        ciphertext,
        associated_data=_associated_data(state, state.node_id, sender=sender),
        sender=sender,
        size=shamir.ENCODED_SHARE_SIZE,
    )


def _round_pair_seed(state: ClientState, peer: int) -> bytes:
    position = state.neighbour_ids.index(peer)
    return pair_seed(
        state.mask_private_key,
        state.mask_public_keys[position],
        state.run_id,
        state.server_round,
        node_ids=(state.node_id, peer),
    )


@dataclass
class KeyDirectory:
    """The public keys the clients of a run registered, kept by the server."""

    entries: dict[int, SetupReply] = field(default_factory=dict)
    identity_keys: dict[int, bytes] = field(default_factory=dict)
    """Ed25519 identity public keys by node, in a run whose rounds are verified."""

    def missing(self, nodes: list[int]) -> list[int]:
        """Return the nodes that have no registered keys, in order."""
        return [node for node in nodes if node not in self.entries]

    def register(
        self,
        replies: Mapping[int, SetupReply],
        identity_keys: Mapping[int, bytes] | None = None,
    ) -> None:
        """Keep the usable keys among the replies; a node's keys never change.

        A node that registers different keys than it did before is ignored
        and keeps its first keys: a client keeps one pair per run. With
        ``identity_keys``, a node registers only with an identity key.
        """
        for node, reply in replies.items():
            if not (
                keys.is_usable_public_key(reply.encryption_public_key)
                and keys.is_usable_public_key(reply.mask_public_key)
            ):
                continue
            if identity_keys is not None and node not in identity_keys:
                continue
            known = self.entries.get(node)
            if known is not None and known != reply:
                logger.warning(
                    "Node %d registered other keys than before; they are ignored",
                    node,
                )
                continue
            self.entries[node] = reply
            if identity_keys is not None:
                self.identity_keys.setdefault(node, identity_keys[node])

    def forget(self, nodes: set[int]) -> None:
        """Drop the keys of nodes that failed a round, so that they register again."""
        for node in nodes:
            self.entries.pop(node, None)
            self.identity_keys.pop(node, None)


@dataclass(kw_only=True)
class KeyedServerRound(RoundState):
    """State of the server through the two exchanges of a round with run keys.

    Call ``input_requests``, ``receive_inputs``, ``unmask_requests`` and
    ``receive_unmask`` in order.
    """

    directory: KeyDirectory
    nodes: list[int]

    PLANNED_AT: ClassVar[str] = "its input requests"

    def input_requests(self) -> dict[int, ShareKeysRequest]:
        """Plan the round over the registered nodes and address each its neighbours."""
        keyed = [node for node in self.nodes if node in self.directory.entries]
        self._record_drops(Stage.REGISTER, set(self.nodes), set(keyed))
        self._plan = plan_round(
            sorted(keyed),
            num_neighbours=self.num_neighbours,
            threshold=self.threshold,
            rng=self.rng,
        )
        entries = self.directory.entries
        return {
            node: ShareKeysRequest(
                threshold=self._plan.threshold,
                neighbour_ids=peers,
                encryption_public_keys=tuple(
                    entries[p].encryption_public_key for p in peers
                ),
                mask_public_keys=tuple(entries[p].mask_public_key for p in peers),
            )
            for node, peers in self._plan.neighbours.items()
        }

    def receive_inputs(
        self, replies: Mapping[int, tuple[NDArray[np.uint32], EncryptedShares]]
    ) -> None:
        """Add each well-formed masked input to the sum and route its shares.

        A reply counts only if its vector has the round's dtype and shape and
        it carries one share for every neighbour.
        """
        graph = self.plan.neighbours
        total = np.zeros(self.vector_size, dtype=np.uint32)
        survivors: set[int] = set()
        routed: dict[int, dict[int, bytes]] = {node: {} for node in graph}
        for node, (vector, shares) in replies.items():
            if node not in graph:
                continue
            if not self._is_well_formed(node, vector):
                continue
            if set(shares.ciphertexts) != set(graph[node]):
                logger.warning(
                    "Round %d: node %d sent shares for %d node(s), not one for each "
                    "of its %d neighbours; it counts as dropped",
                    self.server_round,
                    node,
                    len(shares.ciphertexts),
                    len(graph[node]),
                )
                continue
            total += vector
            survivors.add(node)
            for receiver, ciphertext in shares.ciphertexts.items():
                routed[receiver][node] = ciphertext

        self._record_drops(Stage.KEYED_INPUT, set(graph), survivors)
        self._require_inputs(survivors, Stage.KEYED_INPUT)
        self._survivors = survivors
        self._routed = routed
        self._total = total

    def unmask_requests(self) -> dict[int, KeyedUnmaskRequest]:
        """Send each survivor the round's lists and the shares addressed to it."""
        survivor_ids = self.survivors
        dropped_ids = tuple(sorted(set(self.plan.neighbours) - self._survivors))
        return {
            node: KeyedUnmaskRequest(
                survivor_ids=survivor_ids,
                dropped_ids=dropped_ids,
                ciphertexts={
                    sender: ciphertext
                    for sender, ciphertext in self._routed[node].items()
                    if sender in self._survivors
                },
            )
            for node in survivor_ids
        }

    def can_unmask(self, replies: Mapping[int, KeyedUnmaskReply]) -> bool:
        """Return whether the replies so far suffice to remove every mask.

        That takes ``threshold`` seed shares of each survivor and, for each
        dropped client, the pairwise seed from each of its surviving
        neighbours. The server can stop waiting then, so the slowest
        survivors do not delay the round. It forgoes the consistency check
        that extra shares would allow.
        """
        neighbours = self.plan.neighbours
        for owner in self._survivors:
            holders = share_holders(owner, neighbours[owner])
            revealed = sum(
                1 for h in holders if h in replies and owner in replies[h].seed_shares
            )
            if revealed < self.plan.threshold:
                return False

        for dropped in set(neighbours) - self._survivors:
            for peer in neighbours[dropped]:
                reply = replies.get(peer)
                if peer in self._survivors and (
                    reply is None or dropped not in reply.pair_seeds
                ):
                    return False
        return True

    def receive_unmask(
        self,
        replies: Mapping[int, KeyedUnmaskReply],
        *,
        skipped: set[int] | frozenset[int] = frozenset(),
    ) -> NDArray[np.uint32]:
        """Remove every remaining mask and return the sum of the survivors' inputs.

        ``skipped`` names survivors whose replies the server did not wait for
        after ``can_unmask`` accepted the others; they do not count as dropped.

        Raises:
            TooFewSurvivorsError: A self-mask seed has fewer revealed shares
                than the threshold, or a survivor did not reveal the seed it
                shares with a dropped neighbour.
            ProtocolError: The revealed shares of a seed are inconsistent.

        """
        if self._total is None:
            raise ProtocolError("Unmasking must follow the keyed-input exchange.")
        responders = {n: r for n, r in replies.items() if n in self._survivors}
        self._record_drops(
            Stage.KEYED_UNMASK, self._survivors - set(skipped), set(responders)
        )

        total = self._total
        for owner in self.survivors:
            masks.add_mask(
                total,
                self._recover_seed(owner, responders),
                context=self_mask_context(self.run_id, self.server_round, owner),
                sign=-1,
            )
        for owner in sorted(set(self.plan.neighbours) - self._survivors):
            self._remove_pair_masks(owner, responders, total)

        return self._release(total)

    def _remove_pair_masks(
        self,
        dropped: int,
        responders: Mapping[int, KeyedUnmaskReply],
        total: NDArray[np.uint32],
    ) -> None:
        for peer in self.plan.neighbours[dropped]:
            if peer not in self._survivors:
                continue
            reply = responders.get(peer)
            seed = None if reply is None else reply.pair_seeds.get(dropped)
            if seed is None or len(seed) != keys.KEY_SIZE:
                raise TooFewSurvivorsError(
                    f"Round {self.server_round}: node {peer}, whose input is "
                    "included, did not reveal the mask it shares with dropped "
                    f"node {dropped}. The round is aborted and no model is "
                    "released."
                )
            # The peer added sign(peer, dropped) * mask; subtract the same.
            masks.add_mask(
                total,
                seed,
                context=pair_mask_context(
                    self.run_id, self.server_round, dropped, peer
                ),
                sign=-pair_sign(peer, dropped),
            )

    def _recover_seed(
        self, owner: int, responders: Mapping[int, KeyedUnmaskReply]
    ) -> bytes:
        return recover_secret(
            owner,
            share_holders(owner, self.plan.neighbours[owner]),
            {
                holder: reply.seed_shares.get(owner)
                for holder, reply in responders.items()
            },
            threshold=self.plan.threshold,
            server_round=self.server_round,
            kind="seed",
            size=SEED_SIZE,
        )
