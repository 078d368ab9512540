"""The SecAgg+ state machines, run in-process without Flower.

Every configuration compares the unmasked result with the plaintext weighted
mean of the same updates; the tolerance is the quantization step, since
stochastic rounding moves each coordinate by less than one step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from fedsec_flwr.core import client as protocol
from fedsec_flwr.core.encoding import EncodingParams, decode_sum, encode_update
from fedsec_flwr.core.errors import ProtocolError, TooFewSurvivorsError
from fedsec_flwr.core.messages import (
    SECURE_AGGREGATION_STAGES,
    EncryptedShares,
    SetupReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
)
from fedsec_flwr.core.server import ServerRound

RUN_ID = 7
ROUND = 3
DIM = 50

PARAMS = EncodingParams(
    clip_range=1.0,
    quantization_levels=2**12,
    modulus=2**32,
    max_weight=1000,
    max_clients=50,
)


def _updates(num_clients: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    node_ids = [1000 + 17 * i for i in range(num_clients)]
    return {node: rng.uniform(-0.9, 0.9, DIM) for node in node_ids}


def _through_fields(message):  # type: ignore[no-untyped-def]
    """Serialize and parse, as the Flower layer does."""
    return type(message).from_fields(message.to_fields())


def run_round(
    updates: dict[int, np.ndarray],
    weights: dict[int, int],
    *,
    drop_at: dict[Stage, Sequence[int]] | None = None,
    num_neighbours: int | None = None,
    threshold: int | None = None,
) -> tuple[np.ndarray, ServerRound]:
    """Run one round; clients in ``drop_at[stage]`` never reply to that stage."""
    drop_at = drop_at or {}
    alive = set(updates)
    server = ServerRound(
        run_id=RUN_ID,
        server_round=ROUND,
        vector_size=DIM + 2,
        modulus=PARAMS.modulus,
        num_neighbours=num_neighbours,
        threshold=threshold,
        rng=random.Random(5),
    )
    states: dict[int, protocol.ClientState] = {}

    def answering(stage: Stage, candidates: Sequence[int]) -> list[int]:
        alive.difference_update(drop_at.get(stage, ()))
        return [node for node in candidates if node in alive]

    setup: dict[int, SetupReply] = {}
    for node in answering(Stage.SETUP, sorted(updates)):
        states[node], reply = protocol.client_setup(
            run_id=RUN_ID, server_round=ROUND, node_id=node
        )
        setup[node] = _through_fields(reply)
    server.receive_setup(sorted(updates), setup)

    requests = server.share_keys_requests()
    shared: dict[int, EncryptedShares] = {}
    for node in answering(Stage.SHARE_KEYS, sorted(requests)):
        request = _through_fields(requests[node])
        states[node], reply = protocol.client_share_keys(states[node], request)
        shared[node] = _through_fields(reply)
    server.receive_share_keys(shared)

    forwarded = server.masked_input_requests()
    masked: dict[int, np.ndarray] = {}
    for node in answering(Stage.MASKED_INPUT, sorted(forwarded)):
        states[node] = protocol.client_receive_shares(
            states[node], _through_fields(forwarded[node])
        )
        encoded, _ = encode_update(
            updates[node],
            weight=weights[node],
            params=PARAMS,
            rng=np.random.default_rng(node),
        )
        masked[node] = protocol.client_mask(
            states[node], encoded, modulus=PARAMS.modulus
        )
    server.receive_masked_inputs(masked)

    unmask_requests = server.unmask_requests()
    revealed: dict[int, UnmaskReply] = {}
    for node in answering(Stage.UNMASK, sorted(unmask_requests)):
        states[node], reply = protocol.client_unmask(
            states[node], _through_fields(unmask_requests[node])
        )
        revealed[node] = _through_fields(reply)
    total = server.receive_unmask(revealed)
    mean = decode_sum(total, params=PARAMS).mean
    return mean, server


def plaintext_mean(
    updates: dict[int, np.ndarray], weights: dict[int, int], included: Sequence[int]
) -> np.ndarray:
    total = sum(weights[n] for n in included)
    return sum(updates[n] * weights[n] for n in included) / total  # type: ignore[return-value]


@pytest.mark.parametrize("num_clients", [2, 3, 5, 10])
@pytest.mark.parametrize("weight", [1, 10, 100, 1000])
def test_round_equals_plaintext_mean(num_clients: int, weight: int) -> None:
    updates = _updates(num_clients, seed=num_clients)
    weights = {node: weight for node in updates}

    mean, server = run_round(updates, weights)

    expected = plaintext_mean(updates, weights, list(updates))
    assert np.max(np.abs(mean - expected)) <= PARAMS.step
    assert server.survivors == tuple(sorted(updates))


@pytest.mark.parametrize("dropout", [False, True])
def test_mixed_weights_equal_weighted_mean(dropout: bool) -> None:
    updates = _updates(4, seed=11)
    nodes = sorted(updates)
    weights = dict(zip(nodes, [1, 10, 100, 1000], strict=True))
    drop = {Stage.MASKED_INPUT: [nodes[2]]} if dropout else {}

    mean, server = run_round(updates, weights, drop_at=drop)

    included = [n for n in nodes if not dropout or n != nodes[2]]
    assert (
        np.max(np.abs(mean - plaintext_mean(updates, weights, included))) <= PARAMS.step
    )
    assert list(server.survivors) == included


@pytest.mark.parametrize("num_clients", [3, 5, 10])
@pytest.mark.parametrize("stage", SECURE_AGGREGATION_STAGES)
def test_one_dropout_at_each_stage(num_clients: int, stage: Stage) -> None:
    updates = _updates(num_clients, seed=num_clients + 100)
    weights = {node: 1 + i * 37 for i, node in enumerate(sorted(updates))}
    dropped = sorted(updates)[1]
    if num_clients == 3 and stage in (Stage.SHARE_KEYS, Stage.MASKED_INPUT):
        # Two neighbours and threshold 2 leave no room for a dropped one:
        # threshold - 2 = 0 (see `client_unmask`).
        with pytest.raises(ProtocolError, match="threshold - 2 = 0"):
            run_round(updates, weights, drop_at={stage: [dropped]})
        return

    mean, server = run_round(updates, weights, drop_at={stage: [dropped]})

    included = [n for n in sorted(updates) if stage == Stage.UNMASK or n != dropped]
    assert list(server.survivors) == included
    assert (
        np.max(np.abs(mean - plaintext_mean(updates, weights, included))) <= PARAMS.step
    )


def test_two_clients_cannot_lose_one() -> None:
    updates = _updates(2, seed=1)
    weights = dict.fromkeys(updates, 5)

    with pytest.raises(TooFewSurvivorsError, match="fewer than the threshold"):
        run_round(updates, weights, drop_at={Stage.MASKED_INPUT: [sorted(updates)[0]]})


def test_setup_without_two_replies_names_the_count() -> None:
    updates = _updates(3, seed=4)
    weights = dict.fromkeys(updates, 5)

    with pytest.raises(
        TooFewSurvivorsError, match="1 of the 3 sampled clients sent a valid setup"
    ):
        run_round(updates, weights, drop_at={Stage.SETUP: sorted(updates)[:2]})


def test_too_many_dropouts_abort_round() -> None:
    updates = _updates(5, seed=2)
    weights = dict.fromkeys(updates, 5)
    nodes = sorted(updates)

    with pytest.raises(TooFewSurvivorsError, match="no model is"):
        run_round(updates, weights, drop_at={Stage.MASKED_INPUT: nodes[:3]})


def test_dropouts_at_masked_input_and_unmask() -> None:
    updates = _updates(10, seed=3)
    weights = {node: 1 + i for i, node in enumerate(sorted(updates))}
    nodes = sorted(updates)

    mean, server = run_round(
        updates, weights, drop_at={Stage.UNMASK: [nodes[5]]}, num_neighbours=9
    )

    assert np.max(np.abs(mean - plaintext_mean(updates, weights, nodes))) <= PARAMS.step
    assert server.dropped_by_stage[Stage.UNMASK.value] == 1


def test_neighbours_dropping_at_masked_input_and_unmask_abort() -> None:
    # Only the two clients of a pair can reveal its seed, so a pair in which
    # one drops before its masked input and the other after it leaves a mask
    # that no client can remove.
    updates = _updates(10, seed=3)
    weights = {node: 1 + i for i, node in enumerate(sorted(updates))}
    nodes = sorted(updates)

    with pytest.raises(TooFewSurvivorsError, match="did not reveal the pairwise seed"):
        run_round(
            updates,
            weights,
            drop_at={Stage.MASKED_INPUT: [nodes[0]], Stage.UNMASK: [nodes[5]]},
            num_neighbours=9,
        )


def test_sparse_graph_with_dropout() -> None:
    updates = _updates(10, seed=4)
    weights = dict.fromkeys(updates, 3)
    nodes = sorted(updates)

    mean, server = run_round(
        updates, weights, drop_at={Stage.MASKED_INPUT: [nodes[4]]}, num_neighbours=4
    )

    assert max(len(p) for p in server.plan.neighbours.values()) == 4
    included = [n for n in nodes if n != nodes[4]]
    assert (
        np.max(np.abs(mean - plaintext_mean(updates, weights, included))) <= PARAMS.step
    )


def _client_after_masked_input(
    num_clients: int = 3,
) -> tuple[protocol.ClientState, list[int]]:
    """Run a round up to one client's masked input; return it and the node ids."""
    nodes = [10, 20, 30, 40, 50][:num_clients]
    server = ServerRound(
        run_id=RUN_ID,
        server_round=ROUND,
        vector_size=DIM + 2,
        modulus=2**32,
        rng=random.Random(0),
    )
    states = {}
    setup = {}
    for node in nodes:
        states[node], setup[node] = protocol.client_setup(
            run_id=RUN_ID, server_round=ROUND, node_id=node
        )
    server.receive_setup(nodes, setup)
    shared = {}
    for node, request in server.share_keys_requests().items():
        states[node], shared[node] = protocol.client_share_keys(states[node], request)
    server.receive_share_keys(shared)
    forwarded = server.masked_input_requests()
    state = protocol.client_receive_shares(states[nodes[0]], forwarded[nodes[0]])
    return state, nodes


def test_client_reveals_one_kind_per_peer() -> None:
    state, nodes = _client_after_masked_input(5)

    state, reply = protocol.client_unmask(
        state, UnmaskRequest(survivor_ids=tuple(nodes[:4]), dropped_ids=(nodes[4],))
    )

    assert set(reply.seed_shares) == set(nodes[:4])
    assert set(reply.pair_seeds) == {nodes[4]}
    position = state.neighbour_ids.index(nodes[4])
    assert reply.pair_seeds[nodes[4]] == protocol.pair_seed(
        state.mask_private_key,
        state.mask_public_keys[position],
        RUN_ID,
        ROUND,
        node_ids=(nodes[0], nodes[4]),
    )


def test_client_rejects_too_many_dropped_neighbours() -> None:
    state, nodes = _client_after_masked_input(5)

    with pytest.raises(ProtocolError, match="more than threshold - 2 = 1 together"):
        protocol.client_unmask(
            state,
            UnmaskRequest(survivor_ids=tuple(nodes[:3]), dropped_ids=tuple(nodes[3:])),
        )


def test_client_answers_unmask_once() -> None:
    state, nodes = _client_after_masked_input()
    state, _ = protocol.client_unmask(
        state, UnmaskRequest(survivor_ids=tuple(nodes), dropped_ids=())
    )

    with pytest.raises(ProtocolError, match="must follow stage"):
        protocol.client_unmask(
            state, UnmaskRequest(survivor_ids=tuple(nodes[:2]), dropped_ids=(nodes[2],))
        )


def test_client_rejects_peer_listed_twice() -> None:
    state, nodes = _client_after_masked_input()

    with pytest.raises(ProtocolError, match="both as survivor and as dropped"):
        protocol.client_unmask(
            state, UnmaskRequest(survivor_ids=tuple(nodes), dropped_ids=(nodes[1],))
        )


def test_client_rejects_survivors_below_threshold() -> None:
    state, nodes = _client_after_masked_input()

    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        protocol.client_unmask(
            state, UnmaskRequest(survivor_ids=(nodes[0],), dropped_ids=tuple(nodes[1:]))
        )


def test_client_rejects_threshold_below_two() -> None:
    state, _ = protocol.client_setup(run_id=RUN_ID, server_round=ROUND, node_id=1)
    request = ShareKeysRequest(
        threshold=1,
        neighbour_ids=(2,),
        encryption_public_keys=(bytes(32),),
        mask_public_keys=(bytes(32),),
    )

    with pytest.raises(ProtocolError, match="threshold must be between 2"):
        protocol.client_share_keys(state, request)


def test_tampered_share_aborts_client() -> None:
    nodes = [10, 20, 30]
    server = ServerRound(
        run_id=RUN_ID,
        server_round=ROUND,
        vector_size=DIM + 2,
        modulus=2**32,
        rng=random.Random(0),
    )
    states, setup, shared = {}, {}, {}
    for node in nodes:
        states[node], setup[node] = protocol.client_setup(
            run_id=RUN_ID, server_round=ROUND, node_id=node
        )
    server.receive_setup(nodes, setup)
    for node, request in server.share_keys_requests().items():
        states[node], shared[node] = protocol.client_share_keys(states[node], request)
    server.receive_share_keys(shared)
    forwarded = server.masked_input_requests()[10].ciphertexts
    sender = next(iter(forwarded))
    tampered = bytearray(forwarded[sender])
    tampered[-1] ^= 1
    forwarded[sender] = bytes(tampered)

    with pytest.raises(
        ProtocolError, match=f"Decryption failed for the share from node {sender}: "
    ):
        protocol.client_receive_shares(states[10], EncryptedShares(forwarded))


def test_shares_redirected_to_other_client_rejected() -> None:
    nodes = [10, 20, 30]
    server = ServerRound(
        run_id=RUN_ID,
        server_round=ROUND,
        vector_size=DIM + 2,
        modulus=2**32,
        rng=random.Random(0),
    )
    states, setup, shared = {}, {}, {}
    for node in nodes:
        states[node], setup[node] = protocol.client_setup(
            run_id=RUN_ID, server_round=ROUND, node_id=node
        )
    server.receive_setup(nodes, setup)
    for node, request in server.share_keys_requests().items():
        states[node], shared[node] = protocol.client_share_keys(states[node], request)
    # The share 20 encrypted for 30 is presented to 10 as if 20 had sent it to 10.
    redirected = {20: shared[20].ciphertexts[30], 30: shared[30].ciphertexts[10]}

    with pytest.raises(ProtocolError, match="the share from node 20: "):
        protocol.client_receive_shares(states[10], EncryptedShares(redirected))


def test_state_survives_record_round_trip() -> None:
    state, _ = _client_after_masked_input()

    restored = protocol.ClientState.from_fields(state.to_fields())

    assert restored == state


def test_masked_input_hides_update() -> None:
    state, _ = _client_after_masked_input()
    encoded = np.zeros(DIM + 2, dtype=np.uint32)

    masked = protocol.client_mask(state, encoded, modulus=2**32)

    assert np.count_nonzero(masked) > DIM - 3
    assert not np.array_equal(masked, encoded)
