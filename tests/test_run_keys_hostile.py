"""Attacks on secure aggregation with keys agreed once per run.

A dishonest server is played by ``HostileServer``, which writes each protocol
message by hand and delivers it through the loopback Grid, so the clients run
the real ``secure_aggregation_mod`` with Flower serialization between stages.
Hostile clients are played by the Grid's fault hooks, which rewrite replies.

Each attack has a test that asserts the documented guarantee: the attack is
rejected, and the lying request gets an error reply that names the reason.
Documented limits, such as key substitution, have tests that show the limit.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.serde import context_to_proto, message_to_proto

from fedsec_flwr import RoundReport, SecureFedAvg, TooFewSurvivorsError
from fedsec_flwr.core import aead, keys, masks, run_keys, shamir
from fedsec_flwr.core.client import pair_seed, share_holders
from fedsec_flwr.core.encoding import TRAILER_SIZE, decode_sum
from fedsec_flwr.core.errors import ProtocolError
from fedsec_flwr.core.messages import (
    SHARE_KEY_INFO,
    EncryptedShares,
    KeyedUnmaskReply,
    KeyedUnmaskRequest,
    SetupReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    pack_node_ids,
    pair_mask_context,
    pair_sign,
    round_context,
    self_mask_context,
)
from fedsec_flwr.core.server import ServerRound
from fedsec_flwr.models import FloatLayout
from fedsec_flwr.records import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    MASKED_INPUT_RECORD,
    MASKED_VECTOR_KEY,
    PROTOCOL_RECORD,
    RUN_KEYS_RECORD,
    STATE_RECORD,
    encoding_fields,
    protocol_fields,
)
from tests.loopback import LoopbackGrid, stage_of
from tests.test_secure_strategy import (
    CONFIG,
    client_update,
    client_weight,
    initial_model,
    make_app,
)

RUN_CONFIG = dataclasses.replace(CONFIG, key_lifetime="run")
PARAMS = RUN_CONFIG.encoding()
LAYOUT = FloatLayout.of(initial_model())
VECTOR_SIZE = LAYOUT.size + TRAILER_SIZE
FIVE = [2**63 + 11 * i for i in range(5)]
TEN = [2**62 + 7 * i for i in range(10)]
OTHER_RUN = 4242


# --- A dishonest server ----------------------------------------------------------


def _model_records() -> dict[str, ArrayRecord | ConfigRecord]:
    arrays = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    return {ARRAYS_RECORD: arrays, CONFIG_RECORD: ConfigRecord({})}


@dataclass
class HostileServer:
    """A server that writes every protocol message itself.

    ``send`` delivers one train message to one node and returns the reply.
    The header fields can be overridden through ``fields`` to send malformed
    headers.
    """

    grid: LoopbackGrid
    directory: run_keys.KeyDirectory = field(default_factory=run_keys.KeyDirectory)

    @property
    def run_id(self) -> int:
        return self.grid.run_id

    def send(
        self,
        node: int,
        stage: Stage | str,
        server_round: int,
        fields: dict[str, object] | None = None,
        *,
        run_id: int | None = None,
        with_model: bool = False,
    ) -> Message:
        header: dict[str, object] = {
            "stage": str(stage),
            "run-id": pack_node_ids([self.run_id if run_id is None else run_id]),
            "server-round": server_round,
        }
        content = RecordDict(
            {PROTOCOL_RECORD: ConfigRecord({**header, **(fields or {})})}  # type: ignore[dict-item]
        )
        if with_model:
            for name, record in _model_records().items():
                content[name] = record
        message = Message(content, node, MessageType.TRAIN, group_id=str(server_round))
        return self.grid.deliver_again(message)

    def register(self, nodes: Iterable[int], *, run_id: int | None = None) -> None:
        replies = {}
        for node in nodes:
            reply = self.send(node, Stage.REGISTER, 1, run_id=run_id)
            assert not reply.has_error(), reply.error.reason
            replies[node] = SetupReply.from_fields(protocol_fields(reply.content))
        self.directory.register(replies)

    def keyed_input(
        self,
        node: int,
        server_round: int,
        request: ShareKeysRequest,
        extra: dict[str, object] | None = None,
        *,
        run_id: int | None = None,
    ) -> Message:
        fields = {**request.to_fields(), **encoding_fields(PARAMS), **(extra or {})}
        return self.send(
            node,
            Stage.KEYED_INPUT,
            server_round,
            fields,
            run_id=run_id,
            with_model=True,
        )

    def keyed_unmask(
        self, node: int, server_round: int, request: KeyedUnmaskRequest
    ) -> Message:
        return self.send(node, Stage.KEYED_UNMASK, server_round, request.to_fields())

    def request_for(
        self, node: int, neighbours: Iterable[int], threshold: int
    ) -> ShareKeysRequest:
        """Build a keyed-input request with the registered keys of ``neighbours``."""
        peers = tuple(neighbours)
        entries = self.directory.entries
        return ShareKeysRequest(
            threshold=threshold,
            neighbour_ids=peers,
            encryption_public_keys=tuple(
                entries[p].encryption_public_key for p in peers
            ),
            mask_public_keys=tuple(entries[p].mask_public_key for p in peers),
        )

    def honest_inputs(
        self, nodes: list[int], server_round: int, *, num_neighbours: int | None = None
    ) -> tuple[
        run_keys.KeyedServerRound, dict[int, tuple[np.ndarray, EncryptedShares]]
    ]:
        """Run keyed-input honestly and return the server round and the replies."""
        keyed = run_keys.KeyedServerRound(
            run_id=self.run_id,
            server_round=server_round,
            vector_size=VECTOR_SIZE,
            modulus=PARAMS.modulus,
            directory=self.directory,
            nodes=nodes,
            num_neighbours=num_neighbours,
            rng=random.Random(server_round),
        )
        replies = {}
        for node, request in keyed.input_requests().items():
            reply = self.keyed_input(node, server_round, request)
            assert not reply.has_error(), reply.error.reason
            replies[node] = _masked_reply(reply)
        keyed.receive_inputs(replies)
        return keyed, replies


def _masked_vector(reply: Message) -> np.ndarray:
    assert not reply.has_error(), reply.error.reason
    return reply.content.array_records[MASKED_INPUT_RECORD][MASKED_VECTOR_KEY].numpy()


def _masked_reply(reply: Message) -> tuple[np.ndarray, EncryptedShares]:
    shares = EncryptedShares.from_fields(protocol_fields(reply.content))
    return _masked_vector(reply), shares


def _unmask_reply(reply: Message) -> KeyedUnmaskReply:
    assert not reply.has_error(), reply.error.reason
    return KeyedUnmaskReply.from_fields(protocol_fields(reply.content))


def _hostile(nodes: list[int]) -> HostileServer:
    return HostileServer(LoopbackGrid(make_app(), nodes))


def _expected_update(grid: LoopbackGrid, node: int) -> np.ndarray:
    """Return the flat update that the honest client ``node`` trains."""
    partition = grid.node_ids.index(node)
    local = {
        key: (value + client_update(partition).get(key, 0)).astype(value.dtype)
        for key, value in initial_model().items()
    }
    return LAYOUT.difference(local, initial_model())


def _unmask_one(
    masked: np.ndarray,
    *,
    run_id: int,
    server_round: int,
    owner: int,
    self_seed: bytes | None,
    pair_seeds: dict[int, bytes],
) -> np.ndarray:
    """Remove one client's self mask and pairwise masks from its masked input."""
    vector = masked.copy()
    if self_seed is not None:
        masks.add_mask(
            vector,
            self_seed,
            context=self_mask_context(run_id, server_round, owner),
            sign=-1,
        )
    for peer, seed in pair_seeds.items():
        masks.add_mask(
            vector,
            seed,
            context=pair_mask_context(run_id, server_round, owner, peer),
            sign=-pair_sign(owner, peer),
        )
    return vector


def _combine_seed(
    owner: int, neighbours: Iterable[int], revealed: dict[int, bytes], threshold: int
) -> bytes:
    """Recover a self-mask seed from the shares its holders revealed."""
    holders = share_holders(owner, tuple(neighbours))
    shares = [shamir.decode_share(revealed[h]) for h in holders if h in revealed]
    return shamir.combine_shares(shares, threshold=threshold, secret_size=32)


def _is_input_of(grid: LoopbackGrid, node: int, vector: np.ndarray) -> bool:
    """Return whether ``vector`` is the encoded update of ``node``, unmasked."""
    decoded = decode_sum(vector, params=PARAMS)
    if decoded.total_weight != client_weight(grid.node_ids.index(node)):
        return False
    error = np.max(np.abs(decoded.mean - _expected_update(grid, node)))
    return bool(error <= PARAMS.step + 1e-6)


# --- Lying about dropouts ---------------------------------------------------------


@dataclass
class _SplitView:
    """The outcome of a split-view attack."""

    recovered: bool
    """Whether the server recovered the victim's input."""
    victim_reply: Message
    """The victim's reply to the keyed-unmask request that lists D as dropped."""


TOO_MANY_DROPPED = "neighbours are listed as dropped, more than threshold - 2"


def _split_view_attack(
    server: HostileServer, nodes: list[int], threshold: int
) -> _SplitView:
    """Lie to a victim about its neighbours and to the neighbours about the victim.

    Every other node is a neighbour of the victim ``nodes[0]``. The victim's
    request lists ``threshold - 1`` neighbours (S) as survivors and the rest (D)
    as dropped, to make it reveal its own seed share and its pairwise seeds
    with D. The requests to S list the victim as dropped, to make them reveal
    their pairwise seeds with it. The requests to D list the victim as a
    survivor, to make them reveal their shares of its seed. Each client that
    rejects its request reveals nothing.
    """
    server_round = 3
    victim, *neighbours = nodes
    server.register(nodes)
    replies = {}
    for node in nodes:
        request = server.request_for(node, [n for n in nodes if n != node], threshold)
        reply = server.keyed_input(node, server_round, request)
        assert not reply.has_error(), reply.error.reason
        replies[node] = _masked_reply(reply)

    listed_survivors = neighbours[: threshold - 1]
    listed_dropped = neighbours[threshold - 1 :]
    seed_shares: dict[int, bytes] = {}
    pair_seeds: dict[int, bytes] = {}

    victim_reply = server.keyed_unmask(
        victim,
        server_round,
        KeyedUnmaskRequest(
            survivor_ids=tuple(sorted([victim, *listed_survivors])),
            dropped_ids=tuple(sorted(listed_dropped)),
            ciphertexts={},
        ),
    )
    if not victim_reply.has_error():
        revealed = _unmask_reply(victim_reply)
        seed_shares[victim] = revealed.seed_shares[victim]
        pair_seeds.update(revealed.pair_seeds)

    for node in listed_survivors:
        reply = server.keyed_unmask(
            node,
            server_round,
            KeyedUnmaskRequest(
                survivor_ids=tuple(sorted(n for n in nodes if n != victim)),
                dropped_ids=(victim,),
                ciphertexts={},
            ),
        )
        if not reply.has_error():
            pair_seeds[node] = _unmask_reply(reply).pair_seeds[victim]

    for node in listed_dropped:
        reply = server.keyed_unmask(
            node,
            server_round,
            KeyedUnmaskRequest(
                survivor_ids=tuple(sorted(nodes)),
                dropped_ids=(),
                ciphertexts={victim: replies[victim][1].ciphertexts[node]},
            ),
        )
        if not reply.has_error():
            seed_shares[node] = _unmask_reply(reply).seed_shares[victim]

    if len(seed_shares) < threshold or set(pair_seeds) != set(neighbours):
        return _SplitView(recovered=False, victim_reply=victim_reply)
    seed = _combine_seed(victim, neighbours, seed_shares, threshold)
    unmasked = _unmask_one(
        replies[victim][0],
        run_id=server.run_id,
        server_round=server_round,
        owner=victim,
        self_seed=seed,
        pair_seeds=pair_seeds,
    )
    recovered = _is_input_of(server.grid, victim, unmasked)
    return _SplitView(recovered=recovered, victim_reply=victim_reply)


@pytest.mark.parametrize("num_neighbours", [2, 3, 4, 5, 6])
def test_hostile_split_view_victim_side(num_neighbours: int) -> None:
    """The victim rejects a request that lists too many neighbours as dropped.

    With k neighbours and the minimum threshold t = (k + 1) // 2 + 1, the lie
    lists k - (t - 1) neighbours as dropped. For an even k that is more than
    t - 2, and those neighbours plus the victim would hold t shares of its
    seed, so the victim rejects the request. For an odd k it is t - 2, the
    victim replies, and the shares that the server can still collect stay
    below t.
    """
    nodes = TEN[: num_neighbours + 1]
    threshold = (num_neighbours + 1) // 2 + 1
    server = _hostile(nodes)

    attack = _split_view_attack(server, nodes, threshold)

    assert not attack.recovered
    listed_dropped = num_neighbours - (threshold - 1)
    if num_neighbours % 2 == 0:
        assert attack.victim_reply.has_error()
        assert (
            f"{listed_dropped} of this client's {TOO_MANY_DROPPED} = {threshold - 2};"
            in attack.victim_reply.error.reason
        )
    else:
        assert listed_dropped == threshold - 2
        assert not attack.victim_reply.has_error()


def test_hostile_split_view_default_five_clients() -> None:
    """The plan that SecureFedAvg picks for five clients is not open to the attack."""
    server = _hostile(FIVE)
    keyed = run_keys.KeyedServerRound(
        run_id=server.run_id,
        server_round=1,
        vector_size=VECTOR_SIZE,
        modulus=PARAMS.modulus,
        directory=server.directory,
        nodes=FIVE,
        rng=random.Random(1),
    )
    server.register(FIVE)
    keyed.input_requests()
    assert keyed.plan.threshold == 3
    assert all(len(peers) == 4 for peers in keyed.plan.neighbours.values())

    attack = _split_view_attack(server, FIVE, keyed.plan.threshold)

    assert not attack.recovered
    assert attack.victim_reply.has_error()
    assert (
        f"2 of this client's {TOO_MANY_DROPPED} = 1;"
        in attack.victim_reply.error.reason
    )


def test_hostile_keyed_unmask_in_per_round_mode() -> None:
    """Unmask a round of per-round keys with both unmask and keyed-unmask requests.

    A client after the per-round masked-input stage rejects a keyed-unmask
    request, so it reveals no pairwise seed, which that mode never sends, and
    the victim-side split view does not carry over to key_lifetime='round'.
    """
    server = _hostile(FIVE)
    server_round = 1
    server.register(FIVE)  # a keyed-unmask needs run keys, whatever the round used
    plain = ServerRound(
        run_id=server.run_id,
        server_round=server_round,
        vector_size=VECTOR_SIZE,
        modulus=PARAMS.modulus,
        rng=random.Random(1),
    )
    setup = {}
    for node in FIVE:
        reply = server.send(node, Stage.SETUP, server_round, {"verification": 0})
        setup[node] = SetupReply.from_fields(protocol_fields(reply.content))
    plain.receive_setup(FIVE, setup)
    shared = {}
    for node, request in plain.share_keys_requests().items():
        reply = server.send(node, Stage.SHARE_KEYS, server_round, request.to_fields())
        shared[node] = EncryptedShares.from_fields(protocol_fields(reply.content))
    plain.receive_share_keys(shared)
    masked = {}
    for node, request in plain.masked_input_requests().items():
        fields = {**request.to_fields(), **encoding_fields(PARAMS)}
        reply = server.send(
            node, Stage.MASKED_INPUT, server_round, fields, with_model=True
        )
        masked[node] = _masked_vector(reply)
    plain.receive_masked_inputs(masked)
    threshold = plain.plan.threshold
    victim = FIVE[0]
    neighbours = list(plain.plan.neighbours[victim])
    listed_survivors = neighbours[: threshold - 1]
    listed_dropped = neighbours[threshold - 1 :]

    seed_shares: dict[int, bytes] = {}
    pair_seeds: dict[int, bytes] = {}
    victim_reply = server.keyed_unmask(
        victim,
        server_round,
        KeyedUnmaskRequest(
            survivor_ids=tuple(sorted([victim, *listed_survivors])),
            dropped_ids=tuple(sorted(listed_dropped)),
            ciphertexts={},
        ),
    )
    keyed_replies = [victim_reply]
    if not victim_reply.has_error():
        revealed = _unmask_reply(victim_reply)
        seed_shares[victim] = revealed.seed_shares[victim]
        pair_seeds.update(revealed.pair_seeds)
    for node in listed_survivors:
        reply = server.keyed_unmask(
            node,
            server_round,
            KeyedUnmaskRequest(
                survivor_ids=tuple(n for n in FIVE if n != victim),
                dropped_ids=(victim,),
                ciphertexts={},
            ),
        )
        keyed_replies.append(reply)
        if not reply.has_error():
            pair_seeds[node] = _unmask_reply(reply).pair_seeds[victim]
    for node in listed_dropped:
        request = UnmaskRequest(survivor_ids=tuple(FIVE), dropped_ids=())
        reply = server.send(node, Stage.UNMASK, server_round, request.to_fields())
        if not reply.has_error():
            revealed_plain = UnmaskReply.from_fields(protocol_fields(reply.content))
            seed_shares[node] = revealed_plain.seed_shares[victim]

    recovered = False
    if len(seed_shares) >= threshold and set(pair_seeds) == set(neighbours):
        unmasked = _unmask_one(
            masked[victim],
            run_id=server.run_id,
            server_round=server_round,
            owner=victim,
            self_seed=_combine_seed(victim, neighbours, seed_shares, threshold),
            pair_seeds=pair_seeds,
        )
        recovered = _is_input_of(server.grid, victim, unmasked)
    assert not recovered
    assert pair_seeds == {}
    for reply in keyed_replies:
        assert reply.has_error()
        assert (
            "Stage 'keyed-unmask' must follow stage 'keyed-input' of the same round, "
            "once. Found the client after stage 'masked-input'." in reply.error.reason
        )


# --- Replaying a keyed-input request ---------------------------------------------

REPLAYED_ROUND = (
    "Round 2 must come after round 2, in which this client already sent a masked input."
)


def _reset_with_setup(server: HostileServer, node: int) -> None:
    server.send(node, Stage.SETUP, 1, {"verification": 0})


def _reset_with_setup_of_other_run(server: HostileServer, node: int) -> None:
    server.send(node, Stage.SETUP, 1, {"verification": 0}, run_id=OTHER_RUN)


def _reset_with_other_run(server: HostileServer, node: int) -> None:
    """Register and send a keyed-input for another run id, then register for this run.

    The client rejects requests for another run than its Context's, so it
    keeps its run keys and its record of the rounds it masked.
    """
    other_run = f"Found run {OTHER_RUN} in its header"
    register = server.send(node, Stage.REGISTER, 1, run_id=OTHER_RUN)
    assert register.has_error()
    assert other_run in register.error.reason
    peers = [n for n in FIVE if n != node]
    keyed_input = server.send(
        node,
        Stage.KEYED_INPUT,
        1,
        {**server.request_for(node, peers, 3).to_fields(), **encoding_fields(PARAMS)},
        run_id=OTHER_RUN,
        with_model=True,
    )
    assert keyed_input.has_error()
    assert other_run in keyed_input.error.reason
    again = server.send(node, Stage.REGISTER, 1)
    assert (
        SetupReply.from_fields(protocol_fields(again.content))
        == (server.directory.entries[node])
    )


RESETS = {
    "setup of round 1": _reset_with_setup,
    "setup of another run": _reset_with_setup_of_other_run,
    "keyed-input of another run": _reset_with_other_run,
}


@pytest.mark.parametrize("reset", list(RESETS))
def test_tamper_replayed_input_after_state_reset(reset: str) -> None:
    """The rounds a client masked are kept with its run keys, which no request resets."""
    server = _hostile(FIVE)
    server.register(FIVE)
    keyed, _ = server.honest_inputs(FIVE, server_round=2)
    node = FIVE[1]
    before = _run_private_keys(server.grid, node)

    RESETS[reset](server, node)
    request = server.request_for(
        node, keyed.plan.neighbours[node], keyed.plan.threshold
    )
    replayed = server.keyed_input(node, 2, request)

    assert replayed.has_error()
    assert REPLAYED_ROUND in replayed.error.reason
    assert _run_private_keys(server.grid, node) == before
    assert before.last_round == 2


def test_hostile_replay_after_setup_reveals_nothing() -> None:
    """After an honest round, a setup request does not let the neighbours mask it again.

    The server first learns the victim's self-mask seed from an honest unmask,
    then replays keyed-input of the same round to the victim's neighbours, to
    list the victim as dropped so that they reveal their pairwise seeds with
    it. Each neighbour rejects the replayed keyed-input.
    """
    server = _hostile(FIVE)
    server.register(FIVE)
    server_round = 2
    keyed, inputs = server.honest_inputs(FIVE, server_round)
    victim = FIVE[0]
    neighbours = keyed.plan.neighbours[victim]
    threshold = keyed.plan.threshold
    seed_shares = {}
    for node, request in keyed.unmask_requests().items():
        revealed = _unmask_reply(server.keyed_unmask(node, server_round, request))
        seed_shares[node] = revealed.seed_shares[victim]
    seed = _combine_seed(victim, neighbours, seed_shares, threshold)

    pair_seeds = {}
    replays = []
    for node in neighbours:
        _reset_with_setup(server, node)
        request = server.request_for(node, keyed.plan.neighbours[node], threshold)
        replayed = server.keyed_input(node, server_round, request)
        replays.append(replayed)
        if replayed.has_error():
            continue
        lists = KeyedUnmaskRequest(
            survivor_ids=tuple(n for n in FIVE if n != victim),
            dropped_ids=(victim,),
            ciphertexts={},
        )
        reply = server.keyed_unmask(node, server_round, lists)
        if not reply.has_error():
            pair_seeds[node] = _unmask_reply(reply).pair_seeds[victim]

    unmasked = _unmask_one(
        inputs[victim][0],
        run_id=server.run_id,
        server_round=server_round,
        owner=victim,
        self_seed=seed,
        pair_seeds=pair_seeds,
    )
    assert not _is_input_of(server.grid, victim, unmasked)
    assert pair_seeds == {}
    assert len(replays) == len(neighbours)
    for replayed in replays:
        assert replayed.has_error()
        assert REPLAYED_ROUND in replayed.error.reason


def test_tamper_second_input_in_round_rejected() -> None:
    server = _hostile(FIVE)
    server.register(FIVE)
    keyed, _ = server.honest_inputs(FIVE, server_round=2)
    node = FIVE[0]
    fewer = server.request_for(node, keyed.plan.neighbours[node][:2], 2)
    same = server.request_for(node, keyed.plan.neighbours[node], keyed.plan.threshold)

    other_neighbours = server.keyed_input(node, 2, fewer)
    earlier_round = server.keyed_input(node, 1, same)
    later_round = server.keyed_input(node, 3, fewer)

    assert other_neighbours.has_error()
    assert "already sent a masked input" in other_neighbours.error.reason
    assert earlier_round.has_error()
    assert "must come after round 2" in earlier_round.error.reason
    assert not later_round.has_error()


# --- Keyed-unmask out of order -----------------------------------------------------


def _unmask_lists(nodes: list[int]) -> KeyedUnmaskRequest:
    return KeyedUnmaskRequest(survivor_ids=tuple(nodes), dropped_ids=(), ciphertexts={})


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        ("nothing", "before this client registered its keys"),
        ("register", "Stage 'keyed-unmask' arrived before this client's 'keyed-input'"),
        ("setup", "must follow stage 'keyed-input'"),
        ("keyed-input of round 1", "round 2, but the client is in run"),
    ],
)
def test_tamper_unmask_before_input_rejected(before: str, expected: str) -> None:
    server = _hostile(FIVE)
    node = FIVE[0]
    if before != "nothing":
        server.register(FIVE)
    if before == "setup":
        server.send(node, Stage.SETUP, 2, {"verification": 0})
    if before == "keyed-input of round 1":
        server.honest_inputs(FIVE, server_round=1)

    reply = server.keyed_unmask(node, 2, _unmask_lists(FIVE))

    assert reply.has_error()
    assert expected in reply.error.reason


def test_tamper_per_round_unmask_after_keyed_input() -> None:
    """The per-round stages reject a client whose round state is keyed."""
    server = _hostile(FIVE)
    server.register(FIVE)
    server.honest_inputs(FIVE, server_round=1)
    lists = UnmaskRequest(survivor_ids=tuple(FIVE), dropped_ids=())

    unmask = server.send(FIVE[0], Stage.UNMASK, 1, lists.to_fields())
    masked_input = server.send(
        FIVE[0], Stage.MASKED_INPUT, 1, encoding_fields(PARAMS), with_model=True
    )

    assert unmask.has_error()
    assert (
        "Stage 'unmask' must follow stage 'masked-input'. Found the client after "
        "stage 'keyed-input'." in unmask.error.reason
    )
    assert masked_input.has_error()


def test_tamper_foreign_run_id_rejected() -> None:
    server = _hostile(FIVE)
    server.register(FIVE)
    keyed, _ = server.honest_inputs(FIVE, server_round=1)
    node = FIVE[0]
    request = server.request_for(node, keyed.plan.neighbours[node], 3)

    other_run = f"Found run {OTHER_RUN} in its header"

    keyed_input = server.keyed_input(node, 2, request, run_id=OTHER_RUN)
    keyed_unmask = server.send(
        node,
        Stage.KEYED_UNMASK,
        1,
        _unmask_lists(FIVE).to_fields(),
        run_id=OTHER_RUN,
    )

    assert keyed_input.has_error()
    assert other_run in keyed_input.error.reason
    assert keyed_unmask.has_error()


# --- Survivor and dropout lists -----------------------------------------------------


@dataclass
class _UnmaskCase:
    """One client after keyed-input of round 2, and its honest unmask requests."""

    server: HostileServer
    node: int
    neighbours: tuple[int, ...]
    requests: dict[int, KeyedUnmaskRequest]
    earlier: dict[int, KeyedUnmaskRequest]


def _unmask_case() -> _UnmaskCase:
    server = _hostile(FIVE)
    server.register(FIVE)
    first, _ = server.honest_inputs(FIVE, server_round=1)
    earlier = first.unmask_requests()
    for node, request in earlier.items():
        _unmask_reply(server.keyed_unmask(node, 1, request))
    keyed, _ = server.honest_inputs(FIVE, server_round=2)
    node = FIVE[0]
    return _UnmaskCase(
        server=server,
        node=node,
        neighbours=keyed.plan.neighbours[node],
        requests=keyed.unmask_requests(),
        earlier=earlier,
    )


def _lists(
    survivors: Iterable[int],
    dropped: Iterable[int] = (),
    ciphertexts: dict[int, bytes] | None = None,
) -> KeyedUnmaskRequest:
    return KeyedUnmaskRequest(
        survivor_ids=tuple(survivors),
        dropped_ids=tuple(dropped),
        ciphertexts=ciphertexts or {},
    )


def _overlap(case: _UnmaskCase) -> KeyedUnmaskRequest:
    return _lists(FIVE, [case.neighbours[0]], case.requests[case.node].ciphertexts)


def _client_omitted(case: _UnmaskCase) -> KeyedUnmaskRequest:
    return _lists(case.neighbours)


def _client_listed_dropped(case: _UnmaskCase) -> KeyedUnmaskRequest:
    return _lists(case.neighbours, [case.node])


def _padded_with_unknown_ids(case: _UnmaskCase) -> KeyedUnmaskRequest:
    made_up = [10**9 + i for i in range(10)]
    return _lists([case.node, *made_up], case.neighbours)


def _survivor_repeated(case: _UnmaskCase) -> KeyedUnmaskRequest:
    neighbour = case.neighbours[0]
    repeated = [case.node, case.node, neighbour, neighbour, neighbour]
    return _lists(repeated, case.neighbours[1:])


def _share_from_unknown_node(case: _UnmaskCase) -> KeyedUnmaskRequest:
    ciphertext = next(iter(case.requests[case.node].ciphertexts.values()))
    return _lists([*FIVE, 10**9], (), {10**9: ciphertext})


def _share_from_dropped_neighbour(case: _UnmaskCase) -> KeyedUnmaskRequest:
    dropped = case.neighbours[0]
    survivors = [n for n in FIVE if n != dropped]
    return _lists(survivors, [dropped], case.requests[case.node].ciphertexts)


def _share_from_unlisted_neighbour(case: _UnmaskCase) -> KeyedUnmaskRequest:
    unlisted = case.neighbours[0]
    survivors = [n for n in FIVE if n != unlisted]
    return _lists(survivors, (), case.requests[case.node].ciphertexts)


def _senders_swapped(case: _UnmaskCase) -> KeyedUnmaskRequest:
    honest = case.requests[case.node].ciphertexts
    first, second = case.neighbours[:2]
    return _lists(FIVE, (), {**honest, first: honest[second], second: honest[first]})


def _share_for_another_receiver(case: _UnmaskCase) -> KeyedUnmaskRequest:
    sender = case.neighbours[0]
    other = case.neighbours[1]
    honest = case.requests[case.node].ciphertexts
    return _lists(
        FIVE, (), {**honest, sender: case.requests[other].ciphertexts[sender]}
    )


def _share_of_earlier_round(case: _UnmaskCase) -> KeyedUnmaskRequest:
    sender = case.neighbours[0]
    honest = case.requests[case.node].ciphertexts
    return _lists(
        FIVE, (), {**honest, sender: case.earlier[case.node].ciphertexts[sender]}
    )


def _share_truncated(case: _UnmaskCase) -> KeyedUnmaskRequest:
    sender = case.neighbours[0]
    honest = case.requests[case.node].ciphertexts
    return _lists(FIVE, (), {**honest, sender: honest[sender][:20]})


def _share_empty(case: _UnmaskCase) -> KeyedUnmaskRequest:
    sender = case.neighbours[0]
    honest = case.requests[case.node].ciphertexts
    return _lists(FIVE, (), {**honest, sender: b""})


def _share_extended(case: _UnmaskCase) -> KeyedUnmaskRequest:
    sender = case.neighbours[0]
    honest = case.requests[case.node].ciphertexts
    return _lists(FIVE, (), {**honest, sender: honest[sender] + b"\x00"})


UNMASK_TAMPERING: dict[str, tuple[Callable[[_UnmaskCase], KeyedUnmaskRequest], str]] = {
    "survivor also dropped": (_overlap, "both as survivor and as dropped"),
    "client omitted": (_client_omitted, "must contain the client itself"),
    "client listed dropped": (_client_listed_dropped, "must contain the client itself"),
    "padded with unknown ids": (_padded_with_unknown_ids, "fewer than the threshold"),
    "survivor repeated": (_survivor_repeated, "fewer than the threshold"),
    "share from unknown node": (_share_from_unknown_node, "not surviving neighbours"),
    "share from dropped neighbour": (
        _share_from_dropped_neighbour,
        "not surviving neighbours",
    ),
    "share from unlisted neighbour": (
        _share_from_unlisted_neighbour,
        "not surviving neighbours",
    ),
    "senders swapped": (_senders_swapped, "Decryption failed"),
    "share for another receiver": (_share_for_another_receiver, "Decryption failed"),
    "share of earlier round": (_share_of_earlier_round, "Decryption failed"),
    "share truncated": (_share_truncated, "Decryption failed"),
    "share empty": (_share_empty, "Decryption failed"),
    "share extended": (_share_extended, "Decryption failed"),
}


@pytest.mark.parametrize("tampering", list(UNMASK_TAMPERING))
def test_tamper_unmask_lists_rejected(tampering: str) -> None:
    """A rejected request reveals nothing and leaves the honest request answerable."""
    case = _unmask_case()
    build, expected = UNMASK_TAMPERING[tampering]

    rejected = case.server.keyed_unmask(case.node, 2, build(case))
    honest = case.server.keyed_unmask(case.node, 2, case.requests[case.node])

    assert rejected.has_error()
    assert expected in rejected.error.reason
    revealed = _unmask_reply(honest)
    assert set(revealed.seed_shares) == {case.node, *case.neighbours}
    assert revealed.pair_seeds == {}


def test_tamper_unmask_padded_dropped_list() -> None:
    """Made-up ids in the dropped list get no pairwise seed."""
    case = _unmask_case()
    honest = case.requests[case.node]
    padded = _lists(FIVE, [10**9, 2**64 - 1, 0], honest.ciphertexts)

    revealed = _unmask_reply(case.server.keyed_unmask(case.node, 2, padded))

    assert revealed.pair_seeds == {}
    assert set(revealed.seed_shares) == {case.node, *case.neighbours}


# --- Key substitution (a documented limit) -------------------------------------------


def test_hostile_key_substitution_reads_input() -> None:
    """A server that substitutes the unsigned public keys reads the input at once.

    The server gives the victim its own keys in place of every neighbour's, so
    it decrypts every share of the victim's seed and derives every pairwise
    seed from the keyed-input reply alone, before any unmask request.
    """
    server = _hostile(FIVE)
    server.register(FIVE)
    server_round = 1
    victim = FIVE[0]
    neighbours = tuple(n for n in FIVE if n != victim)
    fake_encryption = {n: keys.generate_private_key() for n in neighbours}
    fake_mask = {n: keys.generate_private_key() for n in neighbours}
    substituted = ShareKeysRequest(
        threshold=3,
        neighbour_ids=neighbours,
        encryption_public_keys=tuple(
            keys.public_key_bytes(fake_encryption[n]) for n in neighbours
        ),
        mask_public_keys=tuple(keys.public_key_bytes(fake_mask[n]) for n in neighbours),
    )

    vector, shares = _masked_reply(
        server.keyed_input(victim, server_round, substituted)
    )

    victim_keys = server.directory.entries[victim]
    seed_shares = {}
    for node in neighbours:
        share_key = keys.derive_shared_key(
            fake_encryption[node],
            victim_keys.encryption_public_key,
            info=SHARE_KEY_INFO + round_context(server.run_id, server_round),
        )
        seed_shares[node] = aead.decrypt(
            share_key,
            shares.ciphertexts[node],
            associated_data=aead.share_associated_data(
                run_id=server.run_id,
                server_round=server_round,
                stage=Stage.KEYED_INPUT.value,
                sender=victim,
                receiver=node,
            ),
        )
    pair_seeds = {
        node: pair_seed(
            keys.private_key_bytes(fake_mask[node]),
            victim_keys.mask_public_key,
            server.run_id,
            server_round,
            node_ids=(node, victim),
        )
        for node in neighbours
    }
    unmasked = _unmask_one(
        vector,
        run_id=server.run_id,
        server_round=server_round,
        owner=victim,
        self_seed=_combine_seed(victim, neighbours, seed_shares, 3),
        pair_seeds=pair_seeds,
    )

    assert _is_input_of(server.grid, victim, unmasked)


# --- Thresholds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_neighbours", "threshold"),
    [
        (4, 2),
        (4, 1),
        (4, 0),
        (4, -1),
        (4, 6),
        (4, 2**62),
        (3, 2),
        (2, 1),
        (1, 1),
        (1, 3),
    ],
)
def test_hostile_threshold_out_of_range(num_neighbours: int, threshold: int) -> None:
    server = _hostile(FIVE)
    server.register(FIVE)
    node = FIVE[0]
    request = server.request_for(node, FIVE[1 : num_neighbours + 1], threshold)

    reply = server.keyed_input(node, 1, request)

    assert reply.has_error()
    assert "threshold must be between" in reply.error.reason


@pytest.mark.parametrize("value", ["3", True, 3.0, b"\x03"])
def test_hostile_threshold_wrong_type(value: object) -> None:
    server = _hostile(FIVE)
    server.register(FIVE)
    node = FIVE[0]
    request = server.request_for(node, FIVE[1:], 3)

    reply = server.keyed_input(node, 1, request, {"threshold": value})

    assert reply.has_error()
    assert "'threshold'" in reply.error.reason


def test_hostile_threshold_changes_between_rounds() -> None:
    """Each round's threshold is checked on its own, so changes within range pass."""
    server = _hostile(FIVE)
    server.register(FIVE)
    node = FIVE[0]
    plans = [
        (FIVE[1:], 3),
        (FIVE[1:], 5),
        (FIVE[1:3], 2),
        (FIVE[1:4], 3),
        (FIVE[1:], 2),
    ]

    replies = [
        server.keyed_input(node, rnd, server.request_for(node, peers, threshold))
        for rnd, (peers, threshold) in enumerate(plans, start=1)
    ]

    assert [r.has_error() for r in replies] == [False, False, False, False, True]


# --- Malformed fields ----------------------------------------------------------------

LOW_ORDER_POINT = (1).to_bytes(32, "little")
"""The X25519 point u = 1, which has order 4, so an exchange gives all-zero bytes."""


def _with_key(
    position: str, key: bytes
) -> Callable[[ShareKeysRequest], dict[str, object]]:
    def build(request: ShareKeysRequest) -> dict[str, object]:
        fields = request.to_fields()
        listed = list(fields[position])  # type: ignore[arg-type]
        listed[0] = key
        return {position: listed}

    return build


MALFORMED_INPUT: dict[str, Callable[[ShareKeysRequest], dict[str, object]]] = {
    "neighbour-ids of 7 bytes": lambda r: {"neighbour-ids": bytes(7)},
    "neighbour-ids as int": lambda r: {"neighbour-ids": 5},
    "neighbour-ids missing": lambda r: {"neighbour-ids": None},
    "no neighbours": lambda r: {
        "neighbour-ids": b"",
        "encryption-public-keys": [],
        "mask-public-keys": [],
    },
    "client among neighbours": lambda r: {
        "neighbour-ids": pack_node_ids([FIVE[0], *r.neighbour_ids[1:]])
    },
    "neighbour repeated": lambda r: {
        "neighbour-ids": pack_node_ids([r.neighbour_ids[0], *r.neighbour_ids[:-1]])
    },
    "key lists shorter": lambda r: {
        "encryption-public-keys": list(r.encryption_public_keys[1:])
    },
    "key list as bytes": lambda r: {"mask-public-keys": r.mask_public_keys[0]},
    "encryption key of 31 bytes": _with_key("encryption-public-keys", bytes(31)),
    "mask key of 33 bytes": _with_key("mask-public-keys", bytes(33)),
    "encryption key all zero": _with_key("encryption-public-keys", bytes(32)),
    "mask key all zero": _with_key("mask-public-keys", bytes(32)),
    "mask key of order 4": _with_key("mask-public-keys", LOW_ORDER_POINT),
    "clip-range as int": lambda r: {"clip-range": 2},
    "clip-range nan": lambda r: {"clip-range": float("nan")},
    "clip-range inf": lambda r: {"clip-range": float("inf")},
    "clip-range negative": lambda r: {"clip-range": -1.0},
    "quantization-levels 0": lambda r: {"quantization-levels": 0},
    "modulus 0": lambda r: {"modulus": 0},
    "modulus above 2**32": lambda r: {"modulus": 2**33},
    "max-weight 0": lambda r: {"max-weight": 0},
    "noise-headroom negative": lambda r: {"noise-headroom": -1},
    "run-id of 7 bytes": lambda r: {"run-id": bytes(7)},
    "run-id of 16 bytes": lambda r: {"run-id": bytes(16)},
    "run-id as int": lambda r: {"run-id": 42},
    "server-round 0": lambda r: {"server-round": 0},
    "server-round negative": lambda r: {"server-round": -3},
    "server-round as str": lambda r: {"server-round": "2"},
    "stage unknown": lambda r: {"stage": "keyed-input-2"},
    "stage as int": lambda r: {"stage": 7},
}


LOW_ORDER_KEYS = {
    "encryption key all zero",
    "mask key all zero",
    "mask key of order 4",
}
"""Requests whose keys have the right size but are low-order points."""


@pytest.mark.parametrize("malformed", list(MALFORMED_INPUT))
def test_tamper_malformed_input_request(malformed: str) -> None:
    """Each malformed keyed-input gets an error reply and sends no masked input.

    The client rejects it before training and changes no state, so it still
    accepts the well-formed request of the same round. An override of None
    removes the field.
    """
    server = _hostile(FIVE)
    server.register(FIVE)
    node = FIVE[0]
    request = server.request_for(node, FIVE[1:], 3)
    overrides = MALFORMED_INPUT[malformed](request)
    fields = {**request.to_fields(), **encoding_fields(PARAMS), **overrides}
    sent = {key: value for key, value in fields.items() if value is not None}

    # Overrides of run-id, server-round and stage replace the header fields.
    rejected = server.send(node, Stage.KEYED_INPUT, 1, sent, with_model=True)
    same_round = server.keyed_input(node, 1, request)
    next_round = server.keyed_input(node, 2, request)

    assert rejected.has_error()
    assert rejected.error.reason.startswith("secure aggregation: ")
    assert not rejected.has_content()
    assert not next_round.has_error()
    assert not same_round.has_error()
    if malformed in LOW_ORDER_KEYS:
        assert "not usable X25519 keys" in rejected.error.reason


def test_tamper_input_request_without_model() -> None:
    server = _hostile(FIVE)
    server.register(FIVE)
    request = server.request_for(FIVE[0], FIVE[1:], 3)
    fields = {**request.to_fields(), **encoding_fields(PARAMS)}

    reply = server.send(FIVE[0], Stage.KEYED_INPUT, 1, fields)

    assert reply.has_error()
    assert "'arrays'" in reply.error.reason


MALFORMED_UNMASK: dict[str, dict[str, object]] = {
    "survivor-ids of 9 bytes": {"survivor-ids": bytes(9)},
    "survivor-ids missing": {"survivor-ids": None},
    "dropped-ids as list": {"dropped-ids": [bytes(8)]},
    "more peer-ids than ciphertexts": {"ciphertexts": []},
    "peer-ids repeated": {"peer-ids": pack_node_ids([FIVE[1], FIVE[1]])},
    "ciphertexts as bytes": {"ciphertexts": b"x"},
}


@pytest.mark.parametrize("malformed", list(MALFORMED_UNMASK))
def test_tamper_malformed_unmask_request(malformed: str) -> None:
    case = _unmask_case()
    fields = {**case.requests[case.node].to_fields(), **MALFORMED_UNMASK[malformed]}
    sent = {k: v for k, v in fields.items() if v is not None}

    rejected = case.server.send(case.node, Stage.KEYED_UNMASK, 2, sent)
    honest = case.server.keyed_unmask(case.node, 2, case.requests[case.node])

    assert rejected.has_error()
    assert not honest.has_error()


def test_hostile_node_ids_at_uint64_bounds() -> None:
    """Neighbour ids 0 and 2**64 - 1 are valid uint64 ids and work as any other.

    The client has four neighbours and threshold 3, so it accepts one dropped
    neighbour, the most that threshold - 2 allows.
    """
    server = _hostile(FIVE)
    server.register(FIVE)
    edges = (0, 1, 2**64 - 2, 2**64 - 1)
    fake = [keys.generate_private_key() for _ in range(8)]
    request = ShareKeysRequest(
        threshold=3,
        neighbour_ids=edges,
        encryption_public_keys=tuple(keys.public_key_bytes(k) for k in fake[:4]),
        mask_public_keys=tuple(keys.public_key_bytes(k) for k in fake[4:]),
    )

    vector, shares = _masked_reply(server.keyed_input(FIVE[0], 1, request))
    revealed = _unmask_reply(
        server.keyed_unmask(FIVE[0], 1, _lists([FIVE[0], *edges[:3]], [2**64 - 1]))
    )

    assert vector.shape == (VECTOR_SIZE,)
    assert set(shares.ciphertexts) == set(edges)
    assert set(revealed.pair_seeds) == {2**64 - 1}
    assert set(revealed.seed_shares) == {FIVE[0]}


def test_tamper_run_id_of_two_ids_named() -> None:
    """Two packed run ids get a ProtocolError that names the field, not a bare error."""
    server = _hostile(FIVE)

    reply = server.send(FIVE[0], Stage.REGISTER, 1, {"run-id": bytes(16)})

    assert reply.has_error()
    assert reply.error.reason == "secure aggregation: run-id must hold one id. Found 2."
    assert RUN_KEYS_RECORD not in server.grid.context_of(FIVE[0]).state


# --- Hostile clients, through SecureFedAvg ---------------------------------------------

Rewrite = Callable[[Message], Message]


def _run_strategy(
    grid: LoopbackGrid, rounds: int
) -> tuple[dict[str, np.ndarray], list[RoundReport]]:
    reports: list[RoundReport] = []
    strategy = SecureFedAvg(
        secure_aggregation=RUN_CONFIG,
        rng=random.Random(5),
        on_round_end=reports.append,
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}, reports


def _expected_model(
    grid: LoopbackGrid, included_per_round: list[list[int]]
) -> dict[str, np.ndarray]:
    """Return the model after rounds that average the fixed updates of the nodes."""
    model = {k: v.astype(np.float64) for k, v in initial_model().items()}
    for included in included_per_round:
        partitions = [grid.node_ids.index(node) for node in included]
        total = sum(client_weight(p) for p in partitions)
        for key in LAYOUT.keys:
            weighted = sum(
                client_update(p)[key].astype(np.float64) * client_weight(p)
                for p in partitions
            )
            model[key] = model[key] + weighted / total
    return model


def _assert_model(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], rounds: int
) -> None:
    tolerance = rounds * (PARAMS.step + 1e-6)
    for key in LAYOUT.keys:
        np.testing.assert_allclose(
            actual[key], expected[key], atol=tolerance, err_msg=key
        )


def _round_of(message: Message) -> int:
    return int(message.content.config_records[PROTOCOL_RECORD]["server-round"])  # type: ignore[arg-type]


def _rewrite_vector(change: Callable[[np.ndarray], np.ndarray]) -> Rewrite:
    def rewrite(reply: Message) -> Message:
        vector = reply.content.array_records[MASKED_INPUT_RECORD][MASKED_VECTOR_KEY]
        changed = change(vector.numpy())
        reply.content[MASKED_INPUT_RECORD] = ArrayRecord(
            {MASKED_VECTOR_KEY: Array(changed)}
        )
        return reply

    return rewrite


def _rewrite_protocol(
    change: Callable[[dict[str, object]], dict[str, object]],
) -> Rewrite:
    def rewrite(reply: Message) -> Message:
        fields = change(protocol_fields(reply.content))
        reply.content[PROTOCOL_RECORD] = ConfigRecord(fields)  # type: ignore[arg-type]
        return reply

    return rewrite


def _rewrite_shares(change: Callable[[dict[int, bytes]], dict[int, bytes]]) -> Rewrite:
    def change_fields(fields: dict[str, object]) -> dict[str, object]:
        shares = EncryptedShares.from_fields(fields)
        return {
            **fields,
            **EncryptedShares(change(dict(shares.ciphertexts))).to_fields(),
        }

    return _rewrite_protocol(change_fields)


def _rewrite_unmask(change: Callable[[KeyedUnmaskReply], KeyedUnmaskReply]) -> Rewrite:
    def change_fields(fields: dict[str, object]) -> dict[str, object]:
        return change(KeyedUnmaskReply.from_fields(fields)).to_fields()  # type: ignore[return-value]

    return _rewrite_protocol(change_fields)


def _hostile_client(
    node: int, stage: Stage, rewrite: Rewrite
) -> Callable[[int, str, Message], object]:
    """Return a fault hook that rewrites every reply of ``node`` to ``stage``."""

    def fault(target: int, name: str, message: Message) -> object:
        return rewrite if (target, name) == (node, stage.value) else None

    return fault


MALFORMED_VECTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "int64": lambda v: v.astype(np.int64),
    "float32": lambda v: v.view(np.float32),
    "big-endian uint32": lambda v: v.astype(">u4"),
    "one value longer": lambda v: np.append(v, np.uint32(0)),
    "one value shorter": lambda v: v[:-1].copy(),
    "two dimensions": lambda v: v.reshape(1, -1),
    "empty": lambda v: v[:0].copy(),
}


@pytest.mark.parametrize("malformed", list(MALFORMED_VECTORS))
def test_hostile_client_malformed_vector(
    malformed: str, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = FIVE[2]
    rewrite = _rewrite_vector(MALFORMED_VECTORS[malformed])
    grid = LoopbackGrid(
        make_app(), FIVE, fault=_hostile_client(hostile, Stage.KEYED_INPUT, rewrite)
    )

    with caplog.at_level(logging.WARNING):
        model, reports = _run_strategy(grid, rounds=1)

    honest = [n for n in FIVE if n != hostile]
    _assert_model(model, _expected_model(grid, [honest]), rounds=1)
    assert reports[0].num_aggregated == 4
    assert reports[0].dropped_by_stage[Stage.KEYED_INPUT.value] == 1
    assert f"node {hostile} sent a masked input" in caplog.text


SHARE_SETS: dict[str, Callable[[dict[int, bytes]], dict[int, bytes]]] = {
    "one receiver missing": lambda c: dict(list(c.items())[1:]),
    "unknown receiver added": lambda c: {**c, 10**9: next(iter(c.values()))},
    "receiver renamed": lambda c: {
        (10**9 if i == 0 else r): v for i, (r, v) in enumerate(c.items())
    },
    "no shares": lambda c: {},
}


@pytest.mark.parametrize("share_set", list(SHARE_SETS))
def test_hostile_client_shares_wrong_neighbours(share_set: str) -> None:
    hostile = FIVE[1]
    rewrite = _rewrite_shares(SHARE_SETS[share_set])
    grid = LoopbackGrid(
        make_app(), FIVE, fault=_hostile_client(hostile, Stage.KEYED_INPUT, rewrite)
    )

    model, reports = _run_strategy(grid, rounds=1)

    honest = [n for n in FIVE if n != hostile]
    _assert_model(model, _expected_model(grid, [honest]), rounds=1)
    assert reports[0].num_aggregated == 4


def _garbage(ciphertext: bytes) -> bytes:
    return bytes(b ^ 0x5A for b in ciphertext)


def test_hostile_client_garbage_shares_abort_round() -> None:
    """Garbage shares to every neighbour make them all fail unmasking.

    The round aborts with the neighbours' reason, which names the sender, so
    the operator can tell which client to leave out of later rounds.
    """
    hostile = FIVE[3]
    rewrite = _rewrite_shares(lambda c: {r: _garbage(v) for r, v in c.items()})
    grid = LoopbackGrid(
        make_app(), FIVE, fault=_hostile_client(hostile, Stage.KEYED_INPUT, rewrite)
    )

    with pytest.raises(TooFewSurvivorsError) as raised:
        _run_strategy(grid, rounds=1)

    assert "no model is released" in str(raised.value)
    assert (
        f"4 x 'secure aggregation: Decryption failed for the share from node {hostile}:"
        in str(raised.value)
    )


def test_hostile_client_garbage_shares_to_two() -> None:
    """Two neighbours that fail unmasking leave three holders, the threshold."""
    hostile = FIVE[3]

    def spoil_two(ciphertexts: dict[int, bytes]) -> dict[int, bytes]:
        spoiled = sorted(ciphertexts)[:2]
        return {r: _garbage(v) if r in spoiled else v for r, v in ciphertexts.items()}

    rewrite = _rewrite_shares(spoil_two)
    grid = LoopbackGrid(
        make_app(), FIVE, fault=_hostile_client(hostile, Stage.KEYED_INPUT, rewrite)
    )

    model, reports = _run_strategy(grid, rounds=1)

    _assert_model(model, _expected_model(grid, [FIVE]), rounds=1)
    assert reports[0].num_aggregated == 5
    assert reports[0].dropped_by_stage[Stage.KEYED_UNMASK.value] == 2


def _corrupt_share(encoded: bytes, delta: int) -> bytes:
    share = shamir.decode_share(encoded)
    return shamir.encode_share(
        shamir.Share(share.index, (share.value + delta) % shamir.PRIME)
    )


def test_hostile_client_corrupt_seed_share() -> None:
    """With every holder replying, a corrupt share fails the consistency check."""
    hostile = FIVE[0]
    victim = FIVE[1]

    def corrupt(reply: KeyedUnmaskReply) -> KeyedUnmaskReply:
        shares = dict(reply.seed_shares)
        shares[victim] = _corrupt_share(shares[victim], 1)
        return KeyedUnmaskReply(seed_shares=shares, pair_seeds=reply.pair_seeds)

    grid = LoopbackGrid(
        make_app(),
        FIVE,
        fault=_hostile_client(hostile, Stage.KEYED_UNMASK, _rewrite_unmask(corrupt)),
    )

    with pytest.raises(ProtocolError, match=f"seed of node {victim} are inconsistent"):
        _run_strategy(grid, rounds=1)


def _lagrange_at_zero(index: int, indices: list[int]) -> int:
    """Return the Lagrange coefficient of ``index`` for interpolating at x = 0."""
    numerator = denominator = 1
    for other in indices:
        if other != index:
            numerator = numerator * other % shamir.PRIME
            denominator = denominator * (other - index) % shamir.PRIME
    return numerator * pow(denominator, -1, shamir.PRIME) % shamir.PRIME


@pytest.mark.parametrize("corruption", ["random", "seed plus one"])
def test_hostile_client_corrupt_share_at_threshold(corruption: str) -> None:
    """With exactly threshold shares nothing checks consistency, yet the round aborts.

    Two clients drop at keyed-unmask, so three shares of each seed arrive. A
    random corruption gives a value that does not fit in 32 bytes. A share
    shifted so that the seed becomes seed + 1 fits, and then the wrong self
    mask leaves noise in the weight slot.
    """
    hostile, victim = FIVE[0], FIVE[1]
    silent = FIVE[3:]
    responders = sorted(n for n in FIVE if n not in silent)

    def corrupt(reply: KeyedUnmaskReply) -> KeyedUnmaskReply:
        shares = dict(reply.seed_shares)
        if corruption == "random":
            delta = random.Random(7).randrange(1, shamir.PRIME)
        else:
            holders = share_holders(victim, tuple(n for n in FIVE if n != victim))
            indices = [holders.index(n) + 1 for n in responders]
            own = holders.index(hostile) + 1
            delta = pow(_lagrange_at_zero(own, indices), -1, shamir.PRIME)
        shares[victim] = _corrupt_share(shares[victim], delta)
        return KeyedUnmaskReply(seed_shares=shares, pair_seeds=reply.pair_seeds)

    def fault(node: int, name: str, message: Message) -> object:
        if name != Stage.KEYED_UNMASK.value:
            return None
        if node in silent:
            return "drop"
        return _rewrite_unmask(corrupt) if node == hostile else None

    grid = LoopbackGrid(make_app(), FIVE, fault=fault)

    expected = "inconsistent" if corruption == "random" else "aggregated weight"
    with pytest.raises(ProtocolError, match=expected):
        _run_strategy(grid, rounds=1)


@pytest.mark.parametrize(
    ("pair_seed_value", "error", "message"),
    [
        (b"\x07" * 32, ProtocolError, "aggregated weight"),
        (b"\x07" * 31, TooFewSurvivorsError, "did not reveal the mask"),
        (None, TooFewSurvivorsError, "did not reveal the mask"),
    ],
)
def test_hostile_client_wrong_pair_seed(
    pair_seed_value: bytes | None, error: type[Exception], message: str
) -> None:
    """A survivor's wrong pairwise seed with a dropped neighbour aborts the round."""
    hostile, dropped = FIVE[0], FIVE[4]

    def replace_seed(reply: KeyedUnmaskReply) -> KeyedUnmaskReply:
        seeds = dict(reply.pair_seeds)
        assert dropped in seeds
        if pair_seed_value is None:
            del seeds[dropped]
        else:
            seeds[dropped] = pair_seed_value
        return KeyedUnmaskReply(seed_shares=reply.seed_shares, pair_seeds=seeds)

    def fault(node: int, name: str, message: Message) -> object:
        if node == dropped and name == Stage.KEYED_INPUT.value:
            return "drop"
        if node == hostile and name == Stage.KEYED_UNMASK.value:
            return _rewrite_unmask(replace_seed)
        return None

    grid = LoopbackGrid(make_app(), FIVE, fault=fault)

    with pytest.raises(error, match=message):
        _run_strategy(grid, rounds=1)


def _shift_first(delta: int) -> Callable[[np.ndarray], np.ndarray]:
    def shift(vector: np.ndarray) -> np.ndarray:
        shifted = vector.copy()
        shifted[0] = (int(shifted[0]) + delta) % PARAMS.modulus
        return shifted

    return shift


def test_hostile_client_shift_outside_range_rejected() -> None:
    """A well-formed input that adds 2**31 to one coordinate aborts the round.

    One client of weight 1 out of a total weight of 1118 would move the
    coordinate far outside [-clip_range, clip_range], the range of any honest
    mean, so the server releases no model.
    """
    hostile = FIVE[0]
    grid = LoopbackGrid(
        make_app(),
        FIVE,
        fault=_hostile_client(
            hostile, Stage.KEYED_INPUT, _rewrite_vector(_shift_first(2**31))
        ),
    )

    with pytest.raises(ProtocolError, match="outside the clipping range") as raised:
        _run_strategy(grid, rounds=1)

    assert "no model is released" in str(raised.value)


def test_hostile_client_shift_within_range_documented_limit() -> None:
    """A well-formed input that moves the mean within the clipping range is released.

    Documented limit: the server checks only the weight slot and the range of
    the mean, so one client moves a coordinate of the mean to 0.9 * clip_range
    at the far side of the honest mean.
    """
    hostile = FIVE[0]
    grid = LoopbackGrid(make_app(), FIVE)
    initial = initial_model()["dense.weight"][0, 0]
    honest = _expected_model(grid, [FIVE])["dense.weight"][0, 0] - initial
    target = -0.9 * RUN_CONFIG.clip_range if honest > 0 else 0.9 * RUN_CONFIG.clip_range
    total_weight = sum(client_weight(p) for p in range(len(FIVE)))
    delta = round((target - honest) * total_weight * PARAMS.scale)
    grid.fault = _hostile_client(
        hostile, Stage.KEYED_INPUT, _rewrite_vector(_shift_first(delta))
    )

    model, reports = _run_strategy(grid, rounds=1)

    assert reports[0].num_aggregated == 5
    moved = model["dense.weight"][0, 0] - initial
    assert abs(moved - target) <= PARAMS.step + 1e-6
    assert abs(moved - honest) > 0.5 * RUN_CONFIG.clip_range


def test_hostile_client_unusable_keys_left_out() -> None:
    hostile = FIVE[2]
    zero = SetupReply(encryption_public_key=bytes(32), mask_public_key=bytes(32))
    rewrite = _rewrite_protocol(lambda fields: dict(zero.to_fields()))
    grid = LoopbackGrid(
        make_app(), FIVE, fault=_hostile_client(hostile, Stage.REGISTER, rewrite)
    )

    model, reports = _run_strategy(grid, rounds=2)

    honest = [n for n in FIVE if n != hostile]
    _assert_model(model, _expected_model(grid, [honest, honest]), rounds=2)
    assert [r.dropped_by_stage[Stage.REGISTER.value] for r in reports] == [1, 1]
    registers = [m for m in grid.sent if stage_of(m) == Stage.REGISTER.value]
    assert [m.metadata.dst_node_id for m in registers].count(hostile) == 2


def test_hostile_client_registers_copied_keys() -> None:
    """A client that registers another client's public keys aborts the round.

    Every client that sees both key sets rejects the repeated key before it
    trains, so the round ends at keyed-input.
    """
    hostile, copied = FIVE[4], FIVE[0]
    grid = LoopbackGrid(make_app(), FIVE)

    def copy_keys(fields: dict[str, object]) -> dict[str, object]:
        record = grid.context_of(copied).state.config_records[RUN_KEYS_RECORD]
        return dict(run_keys.RunKeys.from_fields(dict(record)).public().to_fields())

    grid.fault = _hostile_client(hostile, Stage.REGISTER, _rewrite_protocol(copy_keys))

    with pytest.raises(TooFewSurvivorsError, match="Found a repeated key"):
        _run_strategy(grid, rounds=1)


# --- Dropouts and lost client state --------------------------------------------------

# Faults keyed by (round, node, stage name). "drop" sends no reply, "error" an error.
# Each of five clients has four neighbours and threshold 3, so it accepts one
# neighbour that failed keyed-input (threshold - 2), and the plan fails one.
DROPOUT_PLAN: dict[tuple[int, int, str], str] = {
    (1, FIVE[0], "register"): "drop",
    (2, FIVE[1], "keyed-input"): "error",
    (3, FIVE[2], "keyed-unmask"): "drop",
    (4, FIVE[3], "keyed-unmask"): "drop",
    (4, FIVE[4], "keyed-unmask"): "error",
    (5, FIVE[0], "keyed-input"): "drop",
    (6, FIVE[1], "keyed-input"): "error",
}


def test_hostile_dropouts_across_rounds() -> None:
    def fault(node: int, name: str, message: Message) -> object:
        return DROPOUT_PLAN.get((_round_of(message), node, name))

    grid = LoopbackGrid(make_app(), FIVE, fault=fault)

    model, reports = _run_strategy(grid, rounds=7)

    included = [
        FIVE[1:],
        [n for n in FIVE if n != FIVE[1]],
        FIVE,
        FIVE,
        FIVE[1:],
        [n for n in FIVE if n != FIVE[1]],
        FIVE,
    ]
    _assert_model(model, _expected_model(grid, included), rounds=7)
    assert [r.num_aggregated for r in reports] == [4, 4, 5, 5, 4, 4, 5]
    assert reports[0].dropped_by_stage[Stage.REGISTER.value] == 1
    assert reports[1].dropped_by_stage[Stage.KEYED_INPUT.value] == 1
    # The server stops waiting once the shares suffice, so the silent client
    # counts as not waited for and only the error reply counts as dropped.
    assert reports[3].dropped_by_stage[Stage.KEYED_UNMASK.value] == 1
    assert reports[4].dropped_by_stage[Stage.KEYED_INPUT.value] == 1
    assert reports[5].dropped_by_stage[Stage.KEYED_INPUT.value] == 1
    registered = [
        (_round_of(m), m.metadata.dst_node_id)
        for m in grid.sent
        if stage_of(m) == Stage.REGISTER.value
    ]
    assert registered[5:] == [(2, FIVE[0]), (3, FIVE[1]), (6, FIVE[0]), (7, FIVE[1])]


@pytest.mark.parametrize("num_clients", [5, 10])
def test_hostile_two_dropouts_at_keyed_input(num_clients: int) -> None:
    """Two clients fail keyed-input, one silent and one with an error reply.

    With five clients (four neighbours, threshold 3) a survivor accepts only
    one dropped neighbour, so the survivors reject the unmask request and the
    round aborts, naming their reason. With ten clients (five neighbours,
    threshold 4) a survivor accepts two, and the round goes on without them.
    """
    nodes = (FIVE if num_clients == 5 else TEN)[:num_clients]
    faults = {nodes[0]: "drop", nodes[1]: "error"}

    def fault(node: int, name: str, message: Message) -> object:
        return faults.get(node) if name == Stage.KEYED_INPUT.value else None

    grid = LoopbackGrid(make_app(), nodes, fault=fault)

    if num_clients == 5:
        with pytest.raises(TooFewSurvivorsError) as raised:
            _run_strategy(grid, rounds=1)
        reason = str(raised.value)
        assert "no model is released" in reason
        assert (
            'Error replies from clients: 3 x "secure aggregation: 2 of this '
            f"client's {TOO_MANY_DROPPED} = 1;" in reason
        )
        assert "1 x 'injected failure'" in reason
        return
    model, reports = _run_strategy(grid, rounds=1)
    _assert_model(model, _expected_model(grid, [nodes[2:]]), rounds=1)
    assert reports[0].num_aggregated == num_clients - 2
    assert reports[0].dropped_by_stage[Stage.KEYED_INPUT.value] == 2


@pytest.mark.parametrize("neighbours", [False, True])
def test_hostile_dropouts_at_both_stages(neighbours: bool) -> None:
    """One client drops before keyed-input and another after it, among ten.

    The round survives when the two are not neighbours. When they are, the
    mask between them cannot be removed and the round aborts, as documented.
    """
    first = TEN[0]
    first_neighbours: set[int] = set()
    chosen: list[int] = []

    def fault(node: int, name: str, message: Message) -> object:
        fields = protocol_fields(message.content)
        if name == Stage.KEYED_INPUT.value and node == first:
            first_neighbours.update(ShareKeysRequest.from_fields(fields).neighbour_ids)
            return "drop"
        if name == Stage.KEYED_UNMASK.value:
            if not chosen:
                candidates = [
                    n
                    for n in TEN
                    if n != first and (n in first_neighbours) == neighbours
                ]
                chosen.append(candidates[0])
            return "drop" if node == chosen[0] else None
        return None

    grid = LoopbackGrid(make_app(), TEN, fault=fault)

    if neighbours:
        with pytest.raises(TooFewSurvivorsError, match="did not reveal the mask"):
            _run_strategy(grid, rounds=1)
        return
    model, reports = _run_strategy(grid, rounds=1)
    _assert_model(model, _expected_model(grid, [TEN[1:]]), rounds=1)
    assert reports[0].num_aggregated == 9
    assert len(first_neighbours) == 5


def _clear_state(grid: LoopbackGrid, node: int, names: Iterable[str]) -> None:
    """Delete records from a node's stored Context.state, as a restart would."""
    context = grid.context_of(node)
    for name in names:
        if name in context.state:
            del context.state[name]
    grid._contexts[node] = context_to_proto(context).SerializeToString()


def _run_private_keys(grid: LoopbackGrid, node: int) -> run_keys.RunKeys:
    record = grid.context_of(node).state.config_records[RUN_KEYS_RECORD]
    return run_keys.RunKeys.from_fields(dict(record))


@pytest.mark.parametrize(
    "lost", [(RUN_KEYS_RECORD,), (RUN_KEYS_RECORD, STATE_RECORD)], ids=["keys", "all"]
)
@pytest.mark.parametrize("stage", [Stage.KEYED_INPUT, Stage.KEYED_UNMASK])
def test_hostile_client_loses_state(stage: Stage, lost: tuple[str, ...]) -> None:
    """A node that loses its state misses rounds, then registers new keys.

    Losing it before keyed-input of round 2 drops the node from round 2.
    Losing it before keyed-unmask of round 2 keeps its input in round 2,
    drops it from round 3 and brings it back in round 4.
    """
    node = FIVE[2]
    old_keys: list[run_keys.RunKeys] = []
    grid = LoopbackGrid(make_app(), FIVE)

    def fault(target: int, name: str, message: Message) -> object:
        if (target, name, _round_of(message)) == (node, stage.value, 2):
            old_keys.append(_run_private_keys(grid, node))
            _clear_state(grid, node, lost)
        return None

    grid.fault = fault

    model, reports = _run_strategy(grid, rounds=4)

    without = [n for n in FIVE if n != node]
    if stage is Stage.KEYED_INPUT:
        included = [FIVE, without, FIVE, FIVE]
    else:
        included = [FIVE, FIVE, without, FIVE]
    _assert_model(model, _expected_model(grid, included), rounds=4)
    assert [r.num_aggregated for r in reports] == [len(i) for i in included]
    new_keys = _run_private_keys(grid, node)
    assert new_keys.mask_private_key != old_keys[0].mask_private_key
    assert new_keys.encryption_private_key != old_keys[0].encryption_private_key


def test_hostile_foreign_register_mid_run() -> None:
    """A register request with another run id is rejected and keeps the run keys.

    The client then sends keyed-input of its own run as before, so every round
    includes it and the server never registers it again.
    """
    node = FIVE[1]
    grid = LoopbackGrid(make_app(), FIVE)
    server = HostileServer(grid)
    foreign: list[Message] = []
    keys_before: list[run_keys.RunKeys] = []

    def fault(target: int, name: str, message: Message) -> object:
        if (target, name, _round_of(message)) == (node, "keyed-input", 2):
            grid.fault = None
            keys_before.append(_run_private_keys(grid, node))
            foreign.append(server.send(node, Stage.REGISTER, 2, run_id=OTHER_RUN))
            grid.fault = fault
        return None

    grid.fault = fault

    model, reports = _run_strategy(grid, rounds=3)

    _assert_model(model, _expected_model(grid, [FIVE, FIVE, FIVE]), rounds=3)
    assert [r.num_aggregated for r in reports] == [5, 5, 5]
    assert len(foreign) == 1
    assert foreign[0].has_error()
    assert f"Found run {OTHER_RUN} in its header" in foreign[0].error.reason
    after = _run_private_keys(grid, node)
    assert after.run_id == grid.run_id
    assert after.mask_private_key == keys_before[0].mask_private_key
    assert after.encryption_private_key == keys_before[0].encryption_private_key
    assert after.last_round == 3
    registered = [
        protocol_fields(m.content)["run-id"]
        for m in grid.sent
        if stage_of(m) == Stage.REGISTER.value and m.metadata.dst_node_id == node
    ]
    assert registered == [pack_node_ids([grid.run_id]), pack_node_ids([OTHER_RUN])]


# --- Secrets in messages and logs ------------------------------------------------------


def _appears(secret: bytes, blobs: list[bytes], texts: list[str]) -> bool:
    """Return whether a secret is in any serialized message, raw, hex or repr."""
    if any(secret in blob for blob in blobs):
        return True
    forms = (secret.hex(), repr(secret)[2:-1])
    return any(form in text for form in forms for text in texts)


def _keyed_unmask_request_to(
    grid: LoopbackGrid, node: int, server_round: int
) -> KeyedUnmaskRequest:
    for message in grid.sent:
        if (
            message.metadata.dst_node_id == node
            and stage_of(message) == Stage.KEYED_UNMASK.value
            and _round_of(message) == server_round
        ):
            return KeyedUnmaskRequest.from_fields(protocol_fields(message.content))
    raise AssertionError(
        f"No keyed-unmask request to node {node} in round {server_round}."
    )


def test_hostile_no_secret_leaves_client(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Scan every message and log line of a run with dropouts and rejected requests.

    Private keys, self-mask seeds, share encryption keys, unrevealed shares and
    unrevealed pairwise seeds must not appear, raw, as hex or as a bytes repr.
    """
    caplog.set_level(logging.DEBUG)
    sharings: list[tuple[bytes, list[bytes]]] = []
    split = shamir.split_secret

    def recording_split(secret: bytes, **kwargs: int) -> list[shamir.Share]:
        shares = split(secret, **kwargs)  # type: ignore[arg-type]
        sharings.append((secret, [shamir.encode_share(s) for s in shares]))
        return shares

    monkeypatch.setattr(shamir, "split_secret", recording_split)
    silent = FIVE[2]
    faults = {(2, FIVE[1], "keyed-input"): "drop", (3, silent, "keyed-unmask"): "drop"}

    def fault(node: int, name: str, message: Message) -> object:
        return faults.get((_round_of(message), node, name))

    grid = LoopbackGrid(make_app(), FIVE, fault=fault)
    _run_strategy(grid, rounds=3)

    # Requests rejected after the run produce error replies, which must not leak.
    grid.fault = None
    server = HostileServer(grid)
    forwarded = _keyed_unmask_request_to(grid, silent, 3).ciphertexts
    first, second = sorted(forwarded)[:2]
    swapped = {**forwarded, first: forwarded[second], second: forwarded[first]}
    rejected = [
        server.keyed_unmask(silent, 3, _lists(FIVE, (), swapped)),
        server.keyed_unmask(silent, 3, _lists([silent, 10**9, 10**9 + 1], FIVE)),
    ]
    peers = [n for n in FIVE if n != silent]
    # Each request is rejected before training, in a round of its own.
    for server_round, public in ((4, [bytes(32)] * 4), (5, [LOW_ORDER_POINT] * 4)):
        request = ShareKeysRequest(3, tuple(peers), tuple(public), tuple(public))
        rejected.append(server.keyed_input(silent, server_round, request))
    assert all(reply.has_error() for reply in rejected)

    blobs = [message_to_proto(m).SerializeToString() for m in grid.sent + grid.received]
    texts = [m.error.reason for m in grid.received if m.has_error()]
    texts.append(caplog.text)

    revealed_shares: set[bytes] = set()
    revealed_seeds: set[bytes] = set()
    for message in grid.received:
        if message.has_error():
            continue
        fields = protocol_fields(message.content)
        if "seed-owner-ids" in fields:
            revealed = KeyedUnmaskReply.from_fields(fields)
            revealed_shares.update(revealed.seed_shares.values())
            revealed_seeds.update(revealed.pair_seeds.values())

    run_keys_by_node = {node: _run_private_keys(grid, node) for node in FIVE}
    for node, private in run_keys_by_node.items():
        assert not _appears(private.encryption_private_key, blobs, texts), node
        assert not _appears(private.mask_private_key, blobs, texts), node
        state = grid.context_of(node).state.config_records[STATE_RECORD]
        own_share = bytes(state["own-seed-share"])  # type: ignore[arg-type]
        if own_share:
            assert node == silent
            assert not _appears(own_share, blobs, texts)

    # Three rounds of 5, 4 and 5 inputs; the bad-key requests share nothing.
    assert len(sharings) == 5 + 4 + 5
    unrevealed = 0
    for self_seed, shares in sharings:
        assert not _appears(self_seed, blobs, texts)
        for share in shares:
            if share not in revealed_shares:
                unrevealed += 1
                assert not _appears(share, blobs, texts)
    assert unrevealed > 0

    # The scan finds what the clients did reveal.
    assert revealed_seeds
    assert all(_appears(seed, blobs, []) for seed in revealed_seeds)
    assert all(_appears(share, blobs, []) for share in revealed_shares)
    for server_round in (1, 2, 3):
        context = round_context(grid.run_id, server_round)
        for a, b in ((a, b) for a in FIVE for b in FIVE if a < b):
            seed = pair_seed(
                run_keys_by_node[a].mask_private_key,
                run_keys_by_node[b].public().mask_public_key,
                grid.run_id,
                server_round,
                node_ids=(a, b),
            )
            if seed not in revealed_seeds:
                assert not _appears(seed, blobs, texts), (server_round, a, b)
            share_key = keys.derive_shared_key(
                keys.load_private_key(run_keys_by_node[a].encryption_private_key),
                run_keys_by_node[b].public().encryption_public_key,
                info=SHARE_KEY_INFO + context,
            )
            assert not _appears(share_key, blobs, texts), (server_round, a, b)
