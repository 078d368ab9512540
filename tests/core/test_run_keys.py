"""Secure aggregation with run keys, run in-process without Flower.

A ``Federation`` keeps each client's run keys and last round state across
rounds, as ``Context.state`` does, and the server's key directory, as the
strategy does. Every round is compared with the plaintext weighted mean; the
tolerance is one quantization step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from fedsec_flwr.core import masks, run_keys
from fedsec_flwr.core.client import ClientState
from fedsec_flwr.core.encoding import EncodingParams, decode_sum, encode_update
from fedsec_flwr.core.errors import (
    AuthenticationError,
    ProtocolError,
    TooFewSurvivorsError,
)
from fedsec_flwr.core.messages import (
    EncryptedShares,
    KeyedUnmaskReply,
    KeyedUnmaskRequest,
    SetupReply,
    ShareKeysRequest,
    Stage,
    pair_mask_context,
    self_mask_context,
)

RUN_ID = 11
DIM = 40
PARAMS = EncodingParams(
    clip_range=1.0,
    quantization_levels=2**12,
    modulus=2**32,
    max_weight=1000,
    max_clients=50,
)


def _through_fields(message):  # type: ignore[no-untyped-def]
    """Serialize and parse, as the Flower layer does."""
    return type(message).from_fields(message.to_fields())


def _encode(update: np.ndarray, weight: int, seed: int) -> np.ndarray:
    encoded, _ = encode_update(
        update, weight=weight, params=PARAMS, rng=np.random.default_rng(seed)
    )
    return encoded


@dataclass
class Federation:
    """Clients with run keys and a server directory, kept across rounds."""

    nodes: list[int]
    num_neighbours: int | None = None
    directory: run_keys.KeyDirectory = field(default_factory=run_keys.KeyDirectory)
    keys: dict[int, run_keys.RunKeys] = field(default_factory=dict)
    states: dict[int, ClientState] = field(default_factory=dict)
    registrations: int = 0

    def register(self, nodes: Sequence[int]) -> None:
        replies: dict[int, SetupReply] = {}
        for node in self.directory.missing(list(nodes)):
            self.keys[node], reply = run_keys.client_register(
                self.keys.get(node), run_id=RUN_ID, node_id=node
            )
            replies[node] = _through_fields(reply)
            self.registrations += 1
        self.directory.register(replies)

    def server(self, server_round: int) -> run_keys.KeyedServerRound:
        return run_keys.KeyedServerRound(
            run_id=RUN_ID,
            server_round=server_round,
            vector_size=DIM + 2,
            modulus=PARAMS.modulus,
            directory=self.directory,
            nodes=list(self.nodes),
            num_neighbours=self.num_neighbours,
            rng=random.Random(server_round),
        )

    def send_input(
        self, node: int, request: ShareKeysRequest, encoded: np.ndarray, rnd: int
    ) -> tuple[np.ndarray, EncryptedShares]:
        state, self.keys[node] = run_keys.client_start_round(
            self.keys[node], _through_fields(request), server_round=rnd
        )
        state, masked, shares = run_keys.client_keyed_input(
            state, encoded, modulus=PARAMS.modulus
        )
        self.states[node] = ClientState.from_fields(state.to_fields())
        return masked, _through_fields(shares)

    def unmask(self, node: int, request: KeyedUnmaskRequest) -> KeyedUnmaskReply:
        state, reply = run_keys.client_keyed_unmask(
            self.states[node], _through_fields(request)
        )
        self.states[node] = state
        return _through_fields(reply)

    def run_round(
        self,
        rnd: int,
        updates: dict[int, np.ndarray],
        weights: dict[int, int],
        *,
        drop_input: Sequence[int] = (),
        drop_unmask: Sequence[int] = (),
    ) -> tuple[np.ndarray, run_keys.KeyedServerRound]:
        self.register(self.nodes)
        server = self.server(rnd)
        requests = server.input_requests()
        replies = {
            node: self.send_input(
                node, request, _encode(updates[node], weights[node], node + rnd), rnd
            )
            for node, request in requests.items()
            if node not in drop_input
        }
        server.receive_inputs(replies)
        revealed = {
            node: self.unmask(node, request)
            for node, request in server.unmask_requests().items()
            if node not in drop_unmask
        }
        total = server.receive_unmask(revealed)
        return decode_sum(total, params=PARAMS).mean, server


def _updates(nodes: Sequence[int], seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {node: rng.uniform(-0.9, 0.9, DIM) for node in nodes}


def _mean(
    updates: dict[int, np.ndarray], weights: dict[int, int], included: Sequence[int]
) -> np.ndarray:
    total = sum(weights[n] for n in included)
    return sum(updates[n] * weights[n] for n in included) / total  # type: ignore[return-value]


NODES = [500 + 13 * i for i in range(6)]


@pytest.mark.parametrize("num_clients", [2, 3, 6])
def test_rounds_equal_plaintext_mean_and_register_once(num_clients: int) -> None:
    federation = Federation(NODES[:num_clients])
    weights = {node: 1 + 97 * i for i, node in enumerate(federation.nodes)}

    for rnd in (1, 2, 3):
        updates = _updates(federation.nodes, seed=rnd)
        mean, server = federation.run_round(rnd, updates, weights)

        assert np.max(np.abs(mean - _mean(updates, weights, federation.nodes))) <= (
            PARAMS.step
        )
        assert server.survivors == tuple(federation.nodes)

    assert federation.registrations == num_clients


def test_dropout_before_input_removed_by_pair_seeds() -> None:
    federation = Federation(NODES)
    weights = dict.fromkeys(NODES, 3)
    updates = _updates(NODES, seed=4)
    dropped = NODES[2]

    mean, server = federation.run_round(1, updates, weights, drop_input=[dropped])

    included = [n for n in NODES if n != dropped]
    assert list(server.survivors) == included
    assert np.max(np.abs(mean - _mean(updates, weights, included))) <= PARAMS.step
    assert server.dropped_by_stage[Stage.KEYED_INPUT.value] == 1


def test_dropout_after_input_is_recovered_from_seed_shares() -> None:
    federation = Federation(NODES)
    weights = {node: 10 + node for node in NODES}
    updates = _updates(NODES, seed=5)

    mean, server = federation.run_round(1, updates, weights, drop_unmask=[NODES[4]])

    assert list(server.survivors) == NODES
    assert np.max(np.abs(mean - _mean(updates, weights, NODES))) <= PARAMS.step
    assert server.dropped_by_stage[Stage.KEYED_UNMASK.value] == 1


def test_dropped_client_returns_next_round_without_new_keys() -> None:
    federation = Federation(NODES)
    weights = dict.fromkeys(NODES, 1)
    federation.run_round(1, _updates(NODES, 6), weights, drop_input=[NODES[0]])
    keys_before = federation.keys[NODES[0]]

    updates = _updates(NODES, 7)
    mean, server = federation.run_round(2, updates, weights)

    assert server.survivors == tuple(NODES)
    kept = federation.keys[NODES[0]]
    assert kept.mask_private_key == keys_before.mask_private_key
    assert kept.encryption_private_key == keys_before.encryption_private_key
    assert kept.last_round == 2
    assert federation.registrations == len(NODES)
    assert np.max(np.abs(mean - _mean(updates, weights, NODES))) <= PARAMS.step


def test_dropout_before_and_neighbour_dropout_after_abort_round() -> None:
    federation = Federation(NODES, num_neighbours=len(NODES) - 1)
    weights = dict.fromkeys(NODES, 1)

    with pytest.raises(TooFewSurvivorsError, match="did not reveal the mask"):
        federation.run_round(
            1,
            _updates(NODES, 8),
            weights,
            drop_input=[NODES[0]],
            drop_unmask=[NODES[1]],
        )


def test_unregistered_nodes_are_left_out_of_the_round() -> None:
    federation = Federation(NODES)
    federation.register(NODES[:4])
    server = federation.server(1)

    requests = server.input_requests()

    assert sorted(requests) == NODES[:4]
    assert server.dropped_by_stage[Stage.REGISTER.value] == 2


def test_register_returns_the_same_keys_within_a_run() -> None:
    first, reply = run_keys.client_register(None, run_id=RUN_ID, node_id=9)

    again, reply_again = run_keys.client_register(first, run_id=RUN_ID, node_id=9)
    fresh, reply_fresh = run_keys.client_register(None, run_id=RUN_ID, node_id=9)

    assert again is first
    assert reply_again == reply
    assert reply_fresh != reply
    assert fresh.last_round == 0


@pytest.mark.parametrize(("run_id", "node_id"), [(RUN_ID + 1, 9), (RUN_ID, 10)])
def test_tamper_register_for_other_run_or_node_rejected(
    run_id: int, node_id: int
) -> None:
    first, _ = run_keys.client_register(None, run_id=RUN_ID, node_id=9)

    with pytest.raises(ProtocolError, match="does not register again"):
        run_keys.client_register(first, run_id=run_id, node_id=node_id)


def test_directory_keeps_first_keys_and_ignores_unusable_ones() -> None:
    directory = run_keys.KeyDirectory()
    _, first = run_keys.client_register(None, run_id=RUN_ID, node_id=1)
    _, second = run_keys.client_register(None, run_id=RUN_ID, node_id=1)
    zero = SetupReply(encryption_public_key=bytes(32), mask_public_key=bytes(32))

    directory.register({1: first, 2: zero})
    directory.register({1: second})

    assert directory.entries == {1: first}


# --- A hostile server ----------------------------------------------------------


def _first_round(federation: Federation) -> run_keys.KeyedServerRound:
    """Run keyed-input for every node of round 1 and return the server."""
    federation.register(federation.nodes)
    server = federation.server(1)
    requests = server.input_requests()
    updates = _updates(federation.nodes, seed=12)
    server.receive_inputs(
        {
            node: federation.send_input(node, request, _encode(updates[node], 1, 0), 1)
            for node, request in requests.items()
        }
    )
    return server


def test_tamper_second_input_in_same_round_is_refused() -> None:
    federation = Federation(NODES)
    server = _first_round(federation)
    node = NODES[0]
    request = ShareKeysRequest(
        threshold=server.plan.threshold,
        neighbour_ids=server.plan.neighbours[node],
        encryption_public_keys=tuple(
            federation.directory.entries[p].encryption_public_key
            for p in server.plan.neighbours[node]
        ),
        mask_public_keys=tuple(
            federation.directory.entries[p].mask_public_key
            for p in server.plan.neighbours[node]
        ),
    )

    with pytest.raises(ProtocolError, match="already sent a masked input"):
        federation.send_input(node, request, np.zeros(DIM + 2, np.uint32), 1)


def test_tamper_second_unmask_in_same_round_is_refused() -> None:
    federation = Federation(NODES)
    server = _first_round(federation)
    requests = server.unmask_requests()
    federation.unmask(NODES[0], requests[NODES[0]])

    with pytest.raises(ProtocolError, match="once"):
        federation.unmask(NODES[0], requests[NODES[0]])


@pytest.mark.parametrize("num_listed_dropped", range(6))
def test_hostile_split_view_keeps_input_masked(num_listed_dropped: int) -> None:
    """Neighbours reveal seed shares or pair seeds of a victim, as the list claims.

    For every split of the neighbours, the server never has enough shares of
    the victim's self-mask seed together with all its pairwise seeds, so the
    victim's masked input stays masked.
    """
    federation = Federation(NODES, num_neighbours=len(NODES) - 1)
    server = _first_round(federation)
    victim = NODES[0]
    neighbours = server.plan.neighbours[victim]
    honest = server.unmask_requests()
    listed_dropped = set(neighbours[:num_listed_dropped])

    seed_share_holders = {victim}  # the victim reveals its own share
    pair_seeds: dict[int, bytes] = {}
    for node in neighbours:
        request = honest[node]
        if node in listed_dropped:
            request = KeyedUnmaskRequest(
                survivor_ids=tuple(n for n in request.survivor_ids if n != victim),
                dropped_ids=(victim,),
                ciphertexts={
                    s: c for s, c in request.ciphertexts.items() if s != victim
                },
            )
        try:
            reply = federation.unmask(node, request)
        except ProtocolError:
            continue
        if victim in reply.seed_shares:
            seed_share_holders.add(node)
        if victim in reply.pair_seeds:
            pair_seeds[node] = reply.pair_seeds[victim]

    has_seed = len(seed_share_holders) >= server.plan.threshold
    has_pair_masks = set(pair_seeds) == set(neighbours)
    if has_pair_masks:
        assert not has_seed
    assert set(pair_seeds) <= listed_dropped
    assert not seed_share_holders & set(pair_seeds)


def test_tamper_forwarded_share_fails_authentication() -> None:
    federation = Federation(NODES)
    server = _first_round(federation)
    request = server.unmask_requests()[NODES[0]]
    sender, ciphertext = next(iter(request.ciphertexts.items()))
    flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    tampered = KeyedUnmaskRequest(
        survivor_ids=request.survivor_ids,
        dropped_ids=request.dropped_ids,
        ciphertexts={**request.ciphertexts, sender: flipped},
    )

    with pytest.raises(AuthenticationError):
        federation.unmask(NODES[0], tampered)


def test_tamper_share_redirected_to_another_holder_fails_authentication() -> None:
    federation = Federation(NODES, num_neighbours=len(NODES) - 1)
    server = _first_round(federation)
    requests = server.unmask_requests()
    first, second = NODES[0], NODES[1]
    sender = NODES[2]
    redirected = KeyedUnmaskRequest(
        survivor_ids=requests[second].survivor_ids,
        dropped_ids=requests[second].dropped_ids,
        ciphertexts={sender: requests[first].ciphertexts[sender]},
    )

    with pytest.raises(AuthenticationError):
        federation.unmask(second, redirected)


def test_hostile_survivor_list_without_enough_holders_is_refused() -> None:
    federation = Federation(NODES)
    server = _first_round(federation)
    node = NODES[0]
    request = server.unmask_requests()[node]
    lonely = KeyedUnmaskRequest(
        survivor_ids=(node, 10**9, 10**9 + 1, 10**9 + 2),
        dropped_ids=tuple(n for n in NODES if n != node),
        ciphertexts={},
    )

    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        federation.unmask(node, lonely)
    assert request.survivor_ids == tuple(NODES)


def test_revealed_pair_seed_unmasks_only_its_round() -> None:
    """A seed revealed in round 1 does not remove the same pair's mask in round 2."""
    federation = Federation(NODES[:3], num_neighbours=2)
    weights = dict.fromkeys(federation.nodes, 1)
    federation.run_round(1, _updates(federation.nodes, 1), weights)
    a, b = federation.nodes[:2]
    seeds = []
    for rnd in (1, 2):
        state = federation.states[a]
        position = state.neighbour_ids.index(b)
        seeds.append(
            run_keys.pair_seed(
                state.mask_private_key,
                state.mask_public_keys[position],
                RUN_ID,
                rnd,
                node_ids=(a, b),
            )
        )
    first = np.zeros(DIM, np.uint32)
    masks.add_mask(first, seeds[0], context=pair_mask_context(RUN_ID, 1, a, b), sign=1)
    second = np.zeros(DIM, np.uint32)
    masks.add_mask(second, seeds[1], context=pair_mask_context(RUN_ID, 2, a, b), sign=1)

    assert seeds[0] != seeds[1]
    assert not np.array_equal(first, second)
    assert self_mask_context(RUN_ID, 1, a) != self_mask_context(RUN_ID, 2, a)


def test_can_unmask_needs_shares_and_seeds() -> None:
    federation = Federation(NODES, num_neighbours=len(NODES) - 1)
    federation.register(NODES)
    server = federation.server(1)
    requests = server.input_requests()
    dropped = NODES[0]
    updates = _updates(NODES, seed=13)
    server.receive_inputs(
        {
            node: federation.send_input(node, request, _encode(updates[node], 1, 0), 1)
            for node, request in requests.items()
            if node != dropped
        }
    )
    replies = {
        node: federation.unmask(node, request)
        for node, request in server.unmask_requests().items()
    }
    threshold = server.plan.threshold
    survivors = list(server.survivors)

    too_few = {node: replies[node] for node in survivors[: threshold - 1]}
    without_pair_seed = dict(replies)
    first = survivors[0]
    without_pair_seed[first] = KeyedUnmaskReply(
        seed_shares=replies[first].seed_shares, pair_seeds={}
    )

    assert not server.can_unmask(too_few)
    assert not server.can_unmask(without_pair_seed)
    assert server.can_unmask(replies)


def test_hostile_many_listed_dropouts_rejected() -> None:
    """A client reveals the pairwise seeds of at most threshold - 2 dropouts.

    Otherwise a server that lists most neighbours as dropped to the victim,
    and the victim as included to those neighbours, gets every pairwise seed
    from the victim and enough shares of its self-mask seed from them.
    """
    federation = Federation(NODES[:5], num_neighbours=4)
    server = _first_round(federation)
    victim = NODES[0]
    neighbours = server.plan.neighbours[victim]
    threshold = server.plan.threshold
    too_many = neighbours[: threshold - 1]
    request = server.unmask_requests()[victim]
    lying = KeyedUnmaskRequest(
        survivor_ids=tuple(n for n in request.survivor_ids if n not in too_many),
        dropped_ids=too_many,
        ciphertexts={s: c for s, c in request.ciphertexts.items() if s not in too_many},
    )

    with pytest.raises(ProtocolError, match="listed as dropped"):
        federation.unmask(victim, lying)
