"""Attacks on secure aggregation by a dishonest server or a malicious client."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import context_to_proto

from fedsec_flwr import (
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    TooFewSurvivorsError,
    make_secure_aggregation_mod,
)
from fedsec_flwr.config import KEY_LIFETIMES
from fedsec_flwr.core import client as protocol
from fedsec_flwr.core import keys
from fedsec_flwr.core.errors import ProtocolError
from fedsec_flwr.core.messages import (
    EncryptedShares,
    RoundHeader,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
)
from fedsec_flwr.core.server import ServerRound, recover_secret
from fedsec_flwr.records import PROTOCOL_RECORD, VERIFICATION_ARRAYS_RECORD
from tests.loopback import LoopbackGrid, inflate_weight_slot, stage_of
from tests.test_secure_strategy import NODE_IDS, honest_train, initial_model, make_app

RUN_ID = 9
ROUND = 1
CONFIG = SecAggConfig(
    clip_range=2.0, max_weight=1000, max_clients=10, stage_timeout=0.3
)


def _neighbour_keys(count: int) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    encryption = tuple(
        keys.public_key_bytes(keys.generate_private_key()) for _ in range(count)
    )
    masking = tuple(
        keys.public_key_bytes(keys.generate_private_key()) for _ in range(count)
    )
    return encryption, masking


def test_hostile_threshold_below_majority_rejected() -> None:
    state, _ = protocol.client_setup(run_id=RUN_ID, server_round=ROUND, node_id=1)
    encryption, masking = _neighbour_keys(4)
    request = ShareKeysRequest(
        threshold=2,
        neighbour_ids=(2, 3, 4, 5),
        encryption_public_keys=encryption,
        mask_public_keys=masking,
    )

    with pytest.raises(ProtocolError, match="strict majority of the 5 share holders"):
        protocol.client_share_keys(state, request)


def _five_clients_after_share_keys(
    rewrite: Callable[[int, ShareKeysRequest], ShareKeysRequest] | None = None,
) -> tuple[ServerRound, dict[int, protocol.ClientState], dict[int, EncryptedShares]]:
    """Run setup and share-keys for 5 clients; ``rewrite`` edits each request."""
    nodes = [10, 20, 30, 40, 50]
    server = ServerRound(
        run_id=RUN_ID,
        server_round=ROUND,
        vector_size=5,
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
        if rewrite is not None:
            request = rewrite(node, request)
        states[node], shared[node] = protocol.client_share_keys(states[node], request)
    server.receive_share_keys(shared)
    return server, states, server.masked_input_requests()


def _client_ready_to_unmask() -> tuple[protocol.ClientState, list[int]]:
    _, states, forwarded = _five_clients_after_share_keys()
    return protocol.client_receive_shares(states[10], forwarded[10]), sorted(states)


def test_hostile_survivor_list_padding_rejected() -> None:
    state, nodes = _client_ready_to_unmask()
    made_up = tuple(range(900, 910))

    with pytest.raises(ProtocolError, match="share holders have their masked input"):
        protocol.client_unmask(
            state,
            UnmaskRequest(
                survivor_ids=(nodes[0], *made_up), dropped_ids=tuple(nodes[1:])
            ),
        )


def test_hostile_two_hidden_shares_refused_before_masking() -> None:
    _, states, forwarded = _five_clients_after_share_keys()
    victim = 10
    # The victim gets the shares of 40 and 50 only, not those of 20 and 30.
    delivered = {p: c for p, c in forwarded[victim].ciphertexts.items() if p > 30}

    with pytest.raises(ProtocolError, match="2 of this client's neighbours sent no"):
        protocol.client_receive_shares(states[victim], EncryptedShares(delivered))


@pytest.mark.parametrize("hidden", [(), (20,), (40,)])
def test_hostile_split_dropout_views_cannot_unmask_one_client(
    hidden: tuple[int, ...],
) -> None:
    """No per-holder dropout lists give the server the victim's masks.

    To remove the victim's masks the server needs its seed and the seed of
    every pair it masked with. Each holder is shown one of two lists: the
    victim survived (it reveals its share of the victim's seed) or the
    victim dropped (it reveals the pair's seed). The victim is shown every
    possible list. The server takes the best choice for each holder.
    """
    server, states, forwarded = _five_clients_after_share_keys()
    victim = 10
    nodes = sorted(states)
    delivered = {
        peer: token
        for peer, token in forwarded[victim].ciphertexts.items()
        if peer not in hidden
    }
    states[victim] = protocol.client_receive_shares(
        states[victim], EncryptedShares(delivered)
    )
    for node in nodes[1:]:
        states[node] = protocol.client_receive_shares(states[node], forwarded[node])
    masked_with = set(states[victim].active_neighbour_ids)
    everyone = UnmaskRequest(survivor_ids=tuple(nodes), dropped_ids=())
    seed_share = {
        node: protocol.client_unmask(states[node], everyone)[1].seed_shares[victim]
        for node in nodes[1:]
    }
    pair_seed = {}
    for node in nodes[1:]:
        victim_dropped = UnmaskRequest(
            survivor_ids=tuple(n for n in nodes if n != victim), dropped_ids=(victim,)
        )
        pair_seed[node] = protocol.client_unmask(states[node], victim_dropped)[1]

    accepted = 0
    for size in range(len(masked_with) + 1):
        for listed in itertools.combinations(sorted(masked_with), size):
            view = UnmaskRequest(
                survivor_ids=tuple(n for n in nodes if n not in listed),
                dropped_ids=listed,
            )
            try:
                _, own = protocol.client_unmask(states[victim], view)
            except ProtocolError:
                continue
            accepted += 1
            # Pairs the victim did not reveal must come from the neighbour,
            # which then reveals no share of the victim's seed.
            from_neighbours = masked_with - set(own.pair_seeds)
            assert all(victim in pair_seed[n].pair_seeds for n in from_neighbours)
            shares = {
                node: share
                for node, share in seed_share.items()
                if node not in from_neighbours
            }
            shares[victim] = own.seed_shares[victim]
            with pytest.raises(TooFewSurvivorsError, match="fewer than the threshold"):
                recover_secret(
                    victim,
                    protocol.share_holders(victim, server.plan.neighbours[victim]),
                    shares,
                    threshold=server.plan.threshold,
                    server_round=ROUND,
                    kind="seed",
                    size=32,
                )
    assert accepted >= 1


def test_hostile_split_view_gets_one_kind_per_peer() -> None:
    """A client reveals a peer's seed share or their pair's seed, never both."""
    state, nodes = _client_ready_to_unmask()
    victim = nodes[1]

    _, survived_view_reply = protocol.client_unmask(
        state, UnmaskRequest(survivor_ids=tuple(nodes), dropped_ids=())
    )
    _, dropped_view_reply = protocol.client_unmask(
        state,
        UnmaskRequest(
            survivor_ids=tuple(n for n in nodes if n != victim), dropped_ids=(victim,)
        ),
    )

    assert victim in survived_view_reply.seed_shares
    assert victim not in survived_view_reply.pair_seeds
    assert victim in dropped_view_reply.pair_seeds
    assert victim not in dropped_view_reply.seed_shares
    assert state.threshold * 2 > len(state.neighbour_ids) + 1


def test_hostile_low_order_key_dropped_at_setup() -> None:
    def fault(node: int, stage: str, _: Message) -> object:
        if node != NODE_IDS[0] or stage != "setup":
            return None

        def replace_key(reply: Message) -> Message:
            reply.content[PROTOCOL_RECORD]["mask-public-key"] = bytes(32)
            return reply

        return replace_key

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    strategy = SecureFedAvg(
        secure_aggregation=CONFIG, rng=random.Random(1), on_round_end=reports.append
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)

    assert reports[0].dropped_by_stage["setup"] == 1
    assert reports[0].num_aggregated == len(NODE_IDS) - 1


def test_hostile_corrupt_seed_share_detected() -> None:
    def fault(node: int, stage: str, _: Message) -> object:
        if node != NODE_IDS[0] or stage != "unmask":
            return None

        def shift_shares(reply: Message) -> Message:
            parsed = UnmaskReply.from_fields(dict(reply.content[PROTOCOL_RECORD]))
            shifted = {}
            for owner, share in parsed.seed_shares.items():
                value = bytearray(share)
                value[-1] ^= 1
                shifted[owner] = bytes(value)
            corrupt = UnmaskReply(seed_shares=shifted, pair_seeds=parsed.pair_seeds)
            for key, value in corrupt.to_fields().items():
                reply.content[PROTOCOL_RECORD][key] = value
            return reply

        return shift_shares

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    strategy = SecureFedAvg(
        secure_aggregation=SecAggConfig(
            clip_range=2.0,
            max_weight=1000,
            max_clients=10,
            num_neighbours=4,
            threshold=3,
            stage_timeout=0.3,
        ),
        rng=random.Random(1),
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    with pytest.raises(
        ProtocolError, match="inconsistent; a client sent a corrupt share"
    ):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)


def test_hostile_weight_slot_inflation_rejected() -> None:
    fault = inflate_weight_slot(NODE_IDS[0])

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    strategy = SecureFedAvg(secure_aggregation=CONFIG, rng=random.Random(1))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    with pytest.raises(ProtocolError, match="exceeds max_weight \\* clients"):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)


def test_threshold_below_majority_rejected_before_round() -> None:
    strategy = SecureFedAvg(
        secure_aggregation=SecAggConfig(
            max_weight=1000, max_clients=10, num_neighbours=4, threshold=2
        ),
        rng=random.Random(1),
    )
    grid = LoopbackGrid(make_app(), NODE_IDS)
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    with pytest.raises(ValueError, match="strict majority"):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    assert all(
        str(message.content[PROTOCOL_RECORD]["stage"]) == "setup"
        for message in grid.sent
    )


def test_two_clients_losing_one_fail_loudly() -> None:
    def fault(node: int, stage: str, _: Message) -> object:
        return "drop" if node == NODE_IDS[0] and stage == "masked-input" else None

    grid = LoopbackGrid(make_app(), NODE_IDS[:2], fault=fault)
    strategy = SecureFedAvg(secure_aggregation=CONFIG, rng=random.Random(1))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    with pytest.raises(TooFewSurvivorsError):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)


def test_hostile_request_of_other_run_rejected() -> None:
    victim = NODE_IDS[0]

    def fault(node: int, stage: str, message: Message) -> object:
        if node == victim and stage == "masked-input":
            record = message.content[PROTOCOL_RECORD]
            record["run-id"] = (RUN_ID + 1000).to_bytes(8, "big")
        return None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    strategy = SecureFedAvg(secure_aggregation=CONFIG, rng=random.Random(1))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)

    errors = [
        reply.error.reason
        for reply in grid.received
        if reply.has_error() and reply.metadata.src_node_id == victim
    ]
    assert len(errors) == 1
    assert f"Found run {RUN_ID + 1000} in its header" in errors[0]


@pytest.mark.parametrize("kind", ["encryption", "mask", "own"])
def test_hostile_repeated_neighbour_keys_rejected(kind: str) -> None:
    state, _ = protocol.client_setup(run_id=RUN_ID, server_round=ROUND, node_id=1)
    encryption, masking = _neighbour_keys(3)
    if kind == "encryption":
        encryption = (encryption[0], encryption[0], encryption[2])
    elif kind == "mask":
        masking = (masking[1], masking[1], masking[2])
    else:
        own = keys.public_key_bytes(keys.load_private_key(state.mask_private_key))
        masking = (own, masking[1], masking[2])
    request = ShareKeysRequest(
        threshold=3,
        neighbour_ids=(2, 3, 4),
        encryption_public_keys=encryption,
        mask_public_keys=masking,
    )

    with pytest.raises(ProtocolError, match="Found a repeated key"):
        protocol.client_share_keys(state, request)


@pytest.mark.parametrize("key_lifetime", KEY_LIFETIMES)
def test_hostile_replayed_round_gets_no_second_input(key_lifetime: str) -> None:
    # Two masked inputs of one round, summed with different sets of other
    # clients, would give the server the victim's update by subtraction.
    victim = NODE_IDS[0]
    calls: list[int] = []

    def counting_train(msg: Message, context: Context) -> Message:
        calls.append(context.node_id)
        return honest_train(msg, context)

    grid = LoopbackGrid(make_app(counting_train), NODE_IDS)
    config = dataclasses.replace(CONFIG, key_lifetime=key_lifetime)
    strategy = SecureFedAvg(secure_aggregation=config, rng=random.Random(1))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    assert calls.count(victim) == 1
    header = RoundHeader(stage=Stage.SETUP, run_id=grid.run_id, server_round=1)
    setup = grid.create_message(
        RecordDict({PROTOCOL_RECORD: ConfigRecord(header.to_fields())}),
        "train",
        victim,
        "1",
    )

    reply = grid.deliver_again(setup)

    assert reply.has_error()
    assert "already trained for its input of round 1" in (reply.error.reason or "")
    assert calls.count(victim) == 1


def test_hostile_repeated_setup_of_a_round_trains_once() -> None:
    victim = NODE_IDS[0]
    calls: list[int] = []

    def counting_train(msg: Message, context: Context) -> Message:
        calls.append(context.node_id)
        return honest_train(msg, context)

    grid = LoopbackGrid(make_app(counting_train), NODE_IDS)
    strategy = SecureFedAvg(secure_aggregation=CONFIG, rng=random.Random(1))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    replies = [
        grid.deliver_again(message)
        for message in list(grid.sent)
        if message.metadata.dst_node_id == victim
        and stage_of(message) in ("setup", "share-keys", "masked-input")
    ]

    assert [reply.has_error() for reply in replies] == [True, True, True]
    assert calls.count(victim) == 1


def test_hostile_huge_field_is_not_echoed_in_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)
    header = RoundHeader(stage=Stage.SETUP, run_id=grid.run_id, server_round=1)
    fields = {**header.to_fields(), "stage": "x" * 1_000_000}
    request = grid.create_message(
        RecordDict({PROTOCOL_RECORD: ConfigRecord(fields)}), "train", NODE_IDS[0], "1"
    )

    with caplog.at_level("WARNING", logger="fedsec_flwr"):
        reply = grid.deliver_again(request)

    reason = reply.error.reason or ""
    assert reason.startswith("secure aggregation: Unknown protocol stage 'xxx")
    assert reason.endswith("... (1000026 characters in all)")
    assert len(reason) < 1100
    assert max(len(record.getMessage()) for record in caplog.records) < 1100


def test_hostile_too_many_neighbours_rejected_before_sharing() -> None:
    state, _ = protocol.client_setup(run_id=RUN_ID, server_round=ROUND, node_id=1)
    count = protocol.MAX_NEIGHBOURS + 1
    request = ShareKeysRequest(
        threshold=count // 2 + 1,
        neighbour_ids=tuple(range(2, count + 2)),
        encryption_public_keys=(bytes(32),) * count,
        mask_public_keys=(bytes(32),) * count,
    )

    with pytest.raises(ProtocolError, match=f"1 to 1024 neighbours. Found {count}"):
        protocol.client_share_keys(state, request)


def test_neighbour_limit_also_bounds_the_config() -> None:
    SecAggConfig(num_neighbours=protocol.MAX_NEIGHBOURS, max_clients=2000)

    with pytest.raises(ValueError, match="num_neighbours must be at most 1024"):
        SecAggConfig(num_neighbours=protocol.MAX_NEIGHBOURS + 1, max_clients=2000)


def test_hostile_low_order_mask_key_rejected() -> None:
    # A mask key fails key agreement only when the client masks, after it
    # trained, so share-keys checks it with the encryption keys.
    state, _ = protocol.client_setup(run_id=RUN_ID, server_round=ROUND, node_id=1)
    encryption, masking = _neighbour_keys(4)
    request = ShareKeysRequest(
        threshold=3,
        neighbour_ids=(2, 3, 4, 5),
        encryption_public_keys=encryption,
        mask_public_keys=(*masking[:2], bytes(32), masking[3]),
    )

    with pytest.raises(
        ProtocolError, match="public keys of neighbour 4 are not usable"
    ):
        protocol.client_share_keys(state, request)


@pytest.mark.parametrize(
    ("pair_seed_value", "error", "message"),
    [
        (b"\x07" * 32, ProtocolError, "aggregated weight"),
        (b"\x07" * 31, TooFewSurvivorsError, "did not reveal the pairwise seed"),
        (None, TooFewSurvivorsError, "did not reveal the pairwise seed"),
    ],
)
def test_hostile_client_wrong_pair_seed_aborts_round(
    pair_seed_value: bytes | None, error: type[Exception], message: str
) -> None:
    hostile, dropped = NODE_IDS[0], NODE_IDS[4]

    def fault(node: int, stage: str, _: Message) -> object:
        if node == dropped and stage == "masked-input":
            return "drop"
        if node != hostile or stage != "unmask":
            return None

        def replace_seed(reply: Message) -> Message:
            parsed = UnmaskReply.from_fields(dict(reply.content[PROTOCOL_RECORD]))
            seeds = dict(parsed.pair_seeds)
            assert dropped in seeds
            if pair_seed_value is None:
                del seeds[dropped]
            else:
                seeds[dropped] = pair_seed_value
            changed = UnmaskReply(seed_shares=parsed.seed_shares, pair_seeds=seeds)
            reply.content[PROTOCOL_RECORD] = ConfigRecord(
                {
                    **{
                        key: value
                        for key, value in reply.content[PROTOCOL_RECORD].items()
                        if key not in ("dropped-peer-ids", "pair-seeds")
                    },
                    **changed.to_fields(),
                }
            )
            return reply

        return replace_seed

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    strategy = SecureFedAvg(secure_aggregation=CONFIG, rng=random.Random(1))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    with pytest.raises(error, match=message):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)


@pytest.mark.parametrize("key_lifetime", KEY_LIFETIMES)
def test_three_clients_tolerate_a_dropout_only_when_trusting(key_lifetime: str) -> None:
    # With 3 clients each has 2 neighbours and threshold 2, so threshold - 2
    # = 0 dropped neighbours are accepted, unless the client trusts the
    # server's dropout lists.
    nodes = NODE_IDS[:3]
    config = dataclasses.replace(CONFIG, key_lifetime=key_lifetime)
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    def drop_input(node: int, stage: str, _: Message) -> object:
        inputs = ("masked-input", "keyed-input")
        return "drop" if node == nodes[1] and stage in inputs else None

    cautious = LoopbackGrid(make_app(), nodes, fault=drop_input)
    with pytest.raises(TooFewSurvivorsError, match="threshold - 2 = 0"):
        SecureFedAvg(secure_aggregation=config, rng=random.Random(1)).start(
            grid=cautious, initial_arrays=initial, num_rounds=1
        )

    reports: list[RoundReport] = []
    trusting = LoopbackGrid(
        make_app(mod=make_secure_aggregation_mod(trust_dropout_reports=True)),
        nodes,
        fault=drop_input,
    )
    SecureFedAvg(
        secure_aggregation=config, rng=random.Random(1), on_round_end=reports.append
    ).start(grid=trusting, initial_arrays=initial, num_rounds=1)
    assert reports[0].num_aggregated == 2


def test_tamper_corrupt_stored_record_gets_error_reply() -> None:
    # Only the client writes its state, so a record that does not parse was
    # changed on the node. The stage replies with an error that names it.
    grid = LoopbackGrid(make_app(), NODE_IDS)
    node = NODE_IDS[0]
    context = grid.context_of(node)
    context.state[VERIFICATION_ARRAYS_RECORD] = ArrayRecord(
        {"update": Array(dtype="uint32", shape=(2,), stype="unknown", data=bytes(8))}
    )
    grid._contexts[node] = context_to_proto(context).SerializeToString()
    header = RoundHeader(stage=Stage.SETUP, run_id=grid.run_id, server_round=1)
    setup = grid.create_message(
        RecordDict(
            {PROTOCOL_RECORD: ConfigRecord({**header.to_fields(), "verification": 1})}
        ),
        "train",
        node,
        "1",
    )

    reply = grid.deliver_again(setup)

    assert reply.has_error()
    assert f"stored {VERIFICATION_ARRAYS_RECORD!r} record is corrupt" in (
        reply.error.reason or ""
    )


def test_tamper_stored_threshold_below_two_rejected() -> None:
    state, _ = _client_ready_to_unmask()
    fields = {**state.to_fields(), "threshold": 0}

    with pytest.raises(ProtocolError, match="threshold 0, outside 2 to its 5 share"):
        protocol.ClientState.from_fields(fields)


def test_hostile_swapped_mask_keys_reveal_no_victim_seed() -> None:
    # In each holder's list the server swaps the victim's mask key with a
    # decoy neighbour's, then lists the decoy as dropped. The seed the holder
    # reveals for the decoy comes from its key agreement with the victim.
    # Because the seed binds the decoy's node id, it is not the seed of the
    # holder's pair with the victim.
    victim, decoy = 10, 20

    def swap_keys(node: int, request: ShareKeysRequest) -> ShareKeysRequest:
        if node in (victim, decoy):
            return request
        masking = list(request.mask_public_keys)
        first = request.neighbour_ids.index(victim)
        second = request.neighbour_ids.index(decoy)
        masking[first], masking[second] = masking[second], masking[first]
        return dataclasses.replace(request, mask_public_keys=tuple(masking))

    _, states, forwarded = _five_clients_after_share_keys(swap_keys)
    nodes = sorted(states)
    for node in nodes:
        states[node] = protocol.client_receive_shares(states[node], forwarded[node])

    for holder in (30, 40, 50):
        _, reply = protocol.client_unmask(
            states[holder],
            UnmaskRequest(
                survivor_ids=tuple(n for n in nodes if n != decoy), dropped_ids=(decoy,)
            ),
        )
        holder_key = keys.load_private_key(states[holder].mask_private_key)
        victim_seed = protocol.pair_seed(
            states[victim].mask_private_key,
            keys.public_key_bytes(holder_key),
            RUN_ID,
            ROUND,
            node_ids=(victim, holder),
        )
        assert victim in reply.seed_shares
        assert reply.pair_seeds[decoy] != victim_seed


def test_limit_lying_server_with_one_colluding_neighbour_unmasks() -> None:
    """A limit, not a guarantee: lying about dropouts tolerates no colluder.

    The threshold - 2 rule leaves a lying server one share of the victim's
    seed short. A colluding neighbour gives it that share and its own pair
    seed with the victim.
    """
    server, states, forwarded = _five_clients_after_share_keys()
    victim, colluder, listed, others = 10, 20, 30, (40, 50)
    for node in states:
        states[node] = protocol.client_receive_shares(states[node], forwarded[node])
    nodes = sorted(states)

    def view(dropped: tuple[int, ...]) -> UnmaskRequest:
        return UnmaskRequest(
            survivor_ids=tuple(n for n in nodes if n not in dropped),
            dropped_ids=dropped,
        )

    _, own = protocol.client_unmask(states[victim], view((listed,)))
    _, from_listed = protocol.client_unmask(states[listed], view(()))
    from_others = {
        node: protocol.client_unmask(states[node], view((victim,)))[1]
        for node in others
    }
    colluding = states[colluder]
    shares = {
        victim: own.seed_shares[victim],
        listed: from_listed.seed_shares[victim],
        colluder: colluding.held_seed_shares[victim],
    }
    seed = recover_secret(
        victim,
        protocol.share_holders(victim, server.plan.neighbours[victim]),
        shares,
        threshold=server.plan.threshold,
        server_round=ROUND,
        kind="seed",
        size=32,
    )

    assert seed == states[victim].self_seed
    assert listed in own.pair_seeds
    assert all(victim in from_others[node].pair_seeds for node in others)
