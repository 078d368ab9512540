"""Server side of one secure-aggregation round.

``ServerRound`` walks the four stages. For each stage it produces one request
per client and takes the replies that arrived; a client that sends no reply,
an error reply or an invalid reply is a dropout from that stage on. The server
keeps only the running modular sum of masked inputs, never one client's
input, and it checks every reply before any of it touches that sum.

A round fails with ``TooFewSurvivorsError`` when fewer clients than the
threshold are left at any stage, or when a secret cannot be recovered from the
shares revealed; nothing is released then.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from . import keys, masks, shamir
from .client import SEED_SIZE, min_secure_threshold, share_holders
from .errors import ProtocolError, TooFewSurvivorsError
from .graph import (
    connected_groups,
    default_num_neighbours,
    default_threshold,
    neighbour_graph,
)
from .messages import (
    EncryptedShares,
    SetupReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    pair_mask_context,
    pair_sign,
    self_mask_context,
)

logger = logging.getLogger("fedsec_flwr.core")


@dataclass(frozen=True)
class RoundPlan:
    """The neighbour graph and threshold of one round."""

    neighbours: dict[int, tuple[int, ...]]
    threshold: int


def plan_round(
    node_ids: list[int],
    *,
    num_neighbours: int | None,
    threshold: int | None,
    rng: random.Random,
) -> RoundPlan:
    """Choose the neighbour graph and the threshold for the clients of a round.

    Raises:
        TooFewSurvivorsError: Fewer than two clients, or fewer clients than a
            configured threshold.
        ValueError: The configured threshold exceeds the share holders.

    """
    if len(node_ids) < 2:
        raise TooFewSurvivorsError(
            f"Secure aggregation needs at least 2 clients. Found {len(node_ids)}."
        )
    degree = num_neighbours or default_num_neighbours(len(node_ids))
    graph = neighbour_graph(node_ids, num_neighbours=degree, rng=rng)
    min_degree = min(len(peers) for peers in graph.values())
    chosen = threshold or default_threshold(min_degree)
    max_degree = max(len(peers) for peers in graph.values())
    if chosen < min_secure_threshold(max_degree):
        raise ValueError(
            f"threshold must be a strict majority of each client's share holders "
            f"(at least {min_secure_threshold(max_degree)} for {max_degree} "
            f"neighbours); clients reject lower ones. Found {chosen}."
        )
    if chosen > min_degree + 1:
        raise ValueError(
            f"threshold must not exceed the share holders per client "
            f"(neighbours + 1 = {min_degree + 1}) for {len(node_ids)} clients. "
            f"Found {chosen}."
        )
    if len(node_ids) < chosen:
        raise TooFewSurvivorsError(
            f"{len(node_ids)} clients are fewer than the threshold {chosen}."
        )
    return RoundPlan(neighbours=graph, threshold=chosen)


@dataclass(kw_only=True)
class RoundState:
    """What the server keeps about a round in either key lifetime.

    Subclasses run the exchanges. This class keeps the plan, the survivors
    and the running sum, and the checks that both lifetimes apply.
    """

    run_id: int
    server_round: int
    vector_size: int
    modulus: int
    num_neighbours: int | None = None
    threshold: int | None = None
    min_inputs: int = 0
    """Fewest masked inputs whose sum may be unmasked; 0 leaves only the threshold."""
    min_inputs_reason: str = ""
    """Reason for ``min_inputs``, named in the error of a round that falls short."""
    rng: random.Random = field(default_factory=random.SystemRandom)
    dropped_by_stage: dict[str, int] = field(default_factory=dict)
    _plan: RoundPlan | None = None
    _routed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    _survivors: set[int] = field(default_factory=set)
    _total: NDArray[np.uint32] | None = None

    PLANNED_AT: ClassVar[str] = "its first exchange"
    """Name of the exchange that makes the plan, for the error of a plan read early."""

    @property
    def plan(self) -> RoundPlan:
        """The round's graph and threshold."""
        if self._plan is None:
            raise ProtocolError(f"The round has no plan before {self.PLANNED_AT}.")
        return self._plan

    @property
    def survivors(self) -> tuple[int, ...]:
        """Clients whose masked input is in the sum."""
        return tuple(sorted(self._survivors))

    def _record_drops(self, stage: Stage, expected: set[int], kept: set[int]) -> None:
        record_drops(
            self.dropped_by_stage,
            server_round=self.server_round,
            stage=stage,
            lost=expected - kept,
        )

    def _require(self, remaining: int, stage: Stage) -> None:
        require_survivors(
            remaining,
            threshold=self.plan.threshold,
            server_round=self.server_round,
            stage=stage,
        )

    def _require_inputs(self, survivors: set[int], stage: Stage) -> None:
        """Abort before unmasking unless the inputs received may be unmasked.

        There must be enough of them, and the neighbour graph must connect
        them among themselves.
        """
        received = len(survivors)
        self._require(received, stage)
        if received < self.min_inputs:
            reason = f" ({self.min_inputs_reason})" if self.min_inputs_reason else ""
            raise TooFewSurvivorsError(
                f"Round {self.server_round}: {received} masked input(s) arrived, "
                f"fewer than min_inputs {self.min_inputs}{reason}. The round is "
                "aborted before unmasking, so no sum is released."
            )

        groups = connected_groups(self.plan.neighbours, survivors)
        if len(groups) > 1:
            sizes = sorted(len(group) for group in groups)
            raise TooFewSurvivorsError(
                f"Round {self.server_round}: the {received} masked inputs that "
                f"arrived form {len(groups)} groups of sizes {sizes} with no "
                "neighbours between them, after the dropouts at stage "
                f"{stage.value!r}. Unmasking would reveal the sum of each group, "
                "so the round is aborted before unmasking. A higher num_neighbours "
                "keeps the graph connected through more dropouts."
            )

    def _is_well_formed(self, node: int, vector: NDArray[np.uint32]) -> bool:
        """Return whether a masked input has the round's dtype and shape."""
        if vector.dtype == np.uint32 and vector.shape == (self.vector_size,):
            return True
        logger.warning(
            "Round %d: node %d sent a masked input of dtype %s and shape %s, "
            "expected uint32 and (%d,); it counts as dropped",
            self.server_round,
            node,
            vector.dtype,
            vector.shape,
            self.vector_size,
        )
        return False

    def _release(self, total: NDArray[np.uint32]) -> NDArray[np.uint32]:
        """Reduce the unmasked sum to the modulus and forget the running sum."""
        if self.modulus < 2**32:
            np.bitwise_and(total, np.uint32(self.modulus - 1), out=total)
        self._total = None
        return total


@dataclass(kw_only=True)
class ServerRound(RoundState):
    """State of the server through the four stages of one round.

    Call the methods in order: ``receive_setup``, ``share_keys_requests``,
    ``receive_share_keys``, ``masked_input_requests``,
    ``receive_masked_inputs``, ``unmask_requests``, ``receive_unmask``.
    """

    _public_keys: dict[int, SetupReply] = field(default_factory=dict)
    _share_keys_done: set[int] = field(default_factory=set)

    PLANNED_AT: ClassVar[str] = "the setup replies"

    def receive_setup(
        self, sampled: list[int], replies: Mapping[int, SetupReply]
    ) -> None:
        """Keep the valid key advertisements and plan the graph over their senders."""
        valid = {
            node: reply
            for node, reply in replies.items()
            if node in sampled
            and keys.is_usable_public_key(reply.encryption_public_key)
            and keys.is_usable_public_key(reply.mask_public_key)
        }
        self._record_drops(Stage.SETUP, set(sampled), set(valid))
        self._public_keys = valid
        if len(valid) < 2:
            raise TooFewSurvivorsError(
                "Secure aggregation needs at least 2 clients. "
                f"{len(valid)} of the {len(sampled)} sampled clients sent a valid "
                "setup reply; a client that does not reply within the stage "
                "timeout counts as dropped."
            )
        self._plan = plan_round(
            sorted(valid),
            num_neighbours=self.num_neighbours,
            threshold=self.threshold,
            rng=self.rng,
        )

    def share_keys_requests(self) -> dict[int, ShareKeysRequest]:
        """Send each client the public keys of its neighbours."""
        requests = {}
        for node, peers in self.plan.neighbours.items():
            requests[node] = ShareKeysRequest(
                threshold=self.plan.threshold,
                neighbour_ids=peers,
                encryption_public_keys=tuple(
                    self._public_keys[p].encryption_public_key for p in peers
                ),
                mask_public_keys=tuple(
                    self._public_keys[p].mask_public_key for p in peers
                ),
            )
        return requests

    def receive_share_keys(self, replies: Mapping[int, EncryptedShares]) -> None:
        """Route the encrypted shares of every client that shared with all its peers."""
        graph = self.plan.neighbours
        valid = {
            node: reply
            for node, reply in replies.items()
            if node in graph and set(reply.ciphertexts) == set(graph[node])
        }
        self._record_drops(Stage.SHARE_KEYS, set(graph), set(valid))
        self._require(len(valid), Stage.SHARE_KEYS)

        self._share_keys_done = set(valid)
        self._routed = {node: {} for node in valid}
        for sender, reply in valid.items():
            for receiver, ciphertext in reply.ciphertexts.items():
                if receiver in valid:
                    self._routed[receiver][sender] = ciphertext

    def masked_input_requests(self) -> dict[int, EncryptedShares]:
        """Forward to each client the shares addressed to it."""
        return {
            node: EncryptedShares(ciphertexts=dict(shares))
            for node, shares in self._routed.items()
        }

    def receive_masked_inputs(self, replies: Mapping[int, NDArray[np.uint32]]) -> None:
        """Add every well-formed masked input to the running sum."""
        total = np.zeros(self.vector_size, dtype=np.uint32)
        survivors: set[int] = set()
        for node, vector in replies.items():
            if node not in self._share_keys_done:
                continue
            if not self._is_well_formed(node, vector):
                continue
            total += vector
            survivors.add(node)

        self._record_drops(Stage.MASKED_INPUT, self._share_keys_done, survivors)
        self._require_inputs(survivors, Stage.MASKED_INPUT)
        self._survivors = survivors
        self._total = total

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Ask every survivor for the shares that remove the remaining masks."""
        survivor_ids = self.survivors
        dropped_ids = tuple(sorted(self._share_keys_done - self._survivors))
        request = UnmaskRequest(survivor_ids=survivor_ids, dropped_ids=dropped_ids)
        return {node: request for node in survivor_ids}

    def receive_unmask(self, replies: Mapping[int, UnmaskReply]) -> NDArray[np.uint32]:
        """Recover the needed secrets and return the sum of the survivors' inputs."""
        if self._total is None:
            raise ProtocolError("Unmasking must follow the masked-input stage.")
        responders = {node: r for node, r in replies.items() if node in self._survivors}
        self._record_drops(Stage.UNMASK, self._survivors, set(responders))

        total = self._total
        for owner in self.survivors:
            seed = self._recover(owner, responders, size=SEED_SIZE)
            masks.add_mask(
                total,
                seed,
                context=self_mask_context(self.run_id, self.server_round, owner),
                sign=-1,
            )

        for owner in sorted(self._share_keys_done - self._survivors):
            self._remove_pair_masks(owner, responders, total)

        return self._release(total)

    def _remove_pair_masks(
        self,
        owner: int,
        responders: Mapping[int, UnmaskReply],
        total: NDArray[np.uint32],
    ) -> None:
        """Remove the masks that surviving neighbours added for a dropped client.

        Each surviving neighbour reveals the pairwise seed it shares with
        ``owner``; only the two clients of a pair can compute it.

        Raises:
            TooFewSurvivorsError: A surviving neighbour of ``owner`` sent no
                unmask reply with that seed.

        """
        for peer in self.plan.neighbours[owner]:
            if peer not in self._survivors:
                continue
            reply = responders.get(peer)
            seed = reply.pair_seeds.get(owner) if reply is not None else None
            if seed is None or len(seed) != SEED_SIZE:
                raise TooFewSurvivorsError(
                    f"Round {self.server_round}: node {peer} did not reveal the "
                    f"pairwise seed it shares with node {owner}, which dropped "
                    "before its masked input; only those two clients can, so the "
                    "round is aborted and no model is released."
                )
            # The peer added sign(peer, owner) * mask; subtract the same.
            masks.add_mask(
                total,
                seed,
                context=pair_mask_context(self.run_id, self.server_round, owner, peer),
                sign=-pair_sign(peer, owner),
            )

    def _recover(
        self,
        owner: int,
        responders: Mapping[int, UnmaskReply],
        *,
        size: int,
    ) -> bytes:
        revealed = {
            holder: reply.seed_shares.get(owner) for holder, reply in responders.items()
        }
        return recover_secret(
            owner,
            share_holders(owner, self.plan.neighbours[owner]),
            revealed,
            threshold=self.plan.threshold,
            server_round=self.server_round,
            kind="seed",
            size=size,
        )


def record_drops(
    dropped_by_stage: dict[str, int], *, server_round: int, stage: Stage, lost: set[int]
) -> None:
    """Count the clients lost at a stage and log their number."""
    dropped_by_stage[stage.value] = len(lost)
    if lost:
        logger.info(
            "Round %d: %d client(s) dropped at stage %s",
            server_round,
            len(lost),
            stage.value,
        )


def require_survivors(
    remaining: int, *, threshold: int, server_round: int, stage: Stage
) -> None:
    """Abort the round when fewer clients than the threshold remain.

    Raises:
        TooFewSurvivorsError: ``remaining`` is below ``threshold``.

    """
    if remaining < threshold:
        raise TooFewSurvivorsError(
            f"Round {server_round}: {remaining} client(s) remain after stage "
            f"{stage.value!r}, fewer than the threshold {threshold}. The round "
            "is aborted and no model is released."
        )


def recover_secret(
    owner: int,
    holders: tuple[int, ...],
    revealed: Mapping[int, bytes | None],
    *,
    threshold: int,
    server_round: int,
    kind: str,
    size: int,
) -> bytes:
    """Combine the shares of ``owner``'s secret that its holders revealed.

    ``revealed`` maps a responding holder to its encoded share, or None. A
    share that does not decode or does not carry its holder's index is
    ignored.

    Raises:
        TooFewSurvivorsError: Fewer than ``threshold`` usable shares.
        ProtocolError: The shares do not lie on one polynomial.

    """
    shares = []
    for position, holder in enumerate(holders):
        encoded = revealed.get(holder)
        if encoded is None:
            continue
        try:
            share = shamir.decode_share(encoded)
        except ValueError:
            continue
        if share.index == position + 1:
            shares.append(share)

    if len(shares) < threshold:
        raise TooFewSurvivorsError(
            f"Round {server_round}: {len(shares)} share(s) of the {kind} of node "
            f"{owner} were revealed, fewer than the threshold {threshold}. The "
            "round is aborted and no model is released."
        )
    try:
        shamir.check_consistent(shares, threshold=threshold)
        return shamir.combine_shares(shares, threshold=threshold, secret_size=size)
    except ValueError:
        raise ProtocolError(
            f"Round {server_round}: the revealed shares of the {kind} of node "
            f"{owner} are inconsistent; a client sent a corrupt share. The round "
            "is aborted and no model is released."
        ) from None
