"""A round whose surviving clients the neighbour graph splits is never unmasked.

Pairwise masks cancel within each connected group of survivors, so the
unmasked sum of a split graph would give the server the sum of each group.
With a degree of 1 every group is a pair; on a ring, two dropouts on
opposite sides leave two arcs. Both key lifetimes abort such a round
before any share is revealed.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Message

from fedsec_flwr import SecAggConfig, TooFewSurvivorsError
from fedsec_flwr.core.errors import ProtocolError
from fedsec_flwr.core.graph import connected_groups, neighbour_graph
from fedsec_flwr.core.messages import Stage, unpack_node_ids
from fedsec_flwr.core.server import plan_round
from fedsec_flwr.records import PROTOCOL_RECORD
from tests.core.test_protocol import run_round
from tests.core.test_run_keys import Federation, _updates
from tests.loopback import LoopbackGrid
from tests.test_secure_strategy import CONFIG, make_app, run

SPLIT = "groups of sizes"


def opposite_pair(graph: dict[int, tuple[int, ...]]) -> list[int]:
    """Return two nodes of a ring whose removal leaves two arcs of two or more."""
    nodes = sorted(graph)
    for first in nodes:
        for second in nodes:
            survivors = set(nodes) - {first, second}
            groups = connected_groups(graph, survivors)
            if len(groups) == 2 and min(len(group) for group in groups) >= 2:
                return [first, second]
    raise AssertionError("the graph has no pair of nodes that splits it")


def test_degree_one_rejected_above_two_clients() -> None:
    with pytest.raises(ValueError, match="pairs them up"):
        neighbour_graph([1, 2, 3, 4], num_neighbours=1, rng=random.Random(0))
    with pytest.raises(
        ValueError, match="num_neighbours must be an integer of at least 2"
    ):
        SecAggConfig(num_neighbours=1)

    assert neighbour_graph([1, 2], num_neighbours=1, rng=random.Random(0)) == {
        1: (2,),
        2: (1,),
    }


def test_connected_groups_of_ring() -> None:
    ring = {node: ((node - 1) % 6, (node + 1) % 6) for node in range(6)}

    assert connected_groups(ring, set(range(6))) == [set(range(6))]
    assert connected_groups(ring, {0, 1, 3, 4}) == [{0, 1}, {3, 4}]
    assert connected_groups(ring, set()) == []


def test_split_ring_aborts_before_unmask() -> None:
    nodes = list(range(1, 7))
    graph = plan_round(nodes, num_neighbours=2, threshold=None, rng=random.Random(5))
    dropped = opposite_pair(graph.neighbours)
    updates = {node: np.full(50, node / 10) for node in nodes}

    with pytest.raises(TooFewSurvivorsError, match=SPLIT):
        run_round(
            updates,
            dict.fromkeys(nodes, 1),
            drop_at={Stage.MASKED_INPUT: dropped},
            num_neighbours=2,
        )


def test_ring_dropout_rejected_by_neighbours() -> None:
    # Degree 2 gives threshold 2, and a client accepts at most threshold - 2
    # dropped neighbours, so a ring tolerates no dropout before the input.
    nodes = list(range(1, 7))
    updates = {node: np.full(50, node / 10) for node in nodes}

    with pytest.raises(ProtocolError, match="threshold - 2 = 0"):
        run_round(
            updates,
            dict.fromkeys(nodes, 1),
            drop_at={Stage.MASKED_INPUT: [3]},
            num_neighbours=2,
        )


def test_one_dropout_on_degree_four_graph_still_unmasks() -> None:
    nodes = list(range(1, 7))
    updates = {node: np.full(50, node / 10) for node in nodes}

    mean, server = run_round(
        updates,
        dict.fromkeys(nodes, 1),
        drop_at={Stage.MASKED_INPUT: [3]},
        num_neighbours=4,
    )

    assert server.survivors == (1, 2, 4, 5, 6)
    expected = np.mean([node / 10 for node in server.survivors])
    np.testing.assert_allclose(mean, np.full(50, expected), atol=1e-3)


def test_split_ring_with_run_keys_aborts_before_unmask() -> None:
    nodes = list(range(1, 7))
    federation = Federation(nodes, num_neighbours=2)
    graph = plan_round(nodes, num_neighbours=2, threshold=None, rng=random.Random(1))

    with pytest.raises(TooFewSurvivorsError, match=SPLIT):
        federation.run_round(
            1,
            _updates(nodes, 0),
            dict.fromkeys(nodes, 1),
            drop_input=opposite_pair(graph.neighbours),
        )


def test_split_ring_through_strategy_releases_nothing() -> None:
    # The fault reads each client's neighbours from its share-keys request,
    # then drops two clients on opposite sides of the ring at masked-input.
    node_ids = [2**63 + 11 * i for i in range(6)]
    graph: dict[int, tuple[int, ...]] = {}
    unmask_requests: list[int] = []

    def fault(node: int, name: str, msg: Message) -> object:
        fields = msg.content.config_records[PROTOCOL_RECORD]
        if name == "share-keys":
            packed = fields["neighbour-ids"]
            assert isinstance(packed, bytes)
            graph[node] = unpack_node_ids(packed, field="neighbour-ids")
        if name == "masked-input" and node in opposite_pair(graph):
            return "drop"
        if name == "unmask":
            unmask_requests.append(node)
        return None

    grid = LoopbackGrid(make_app(), node_ids, fault=fault)
    config = SecAggConfig(
        clip_range=CONFIG.clip_range,
        max_weight=CONFIG.max_weight,
        max_clients=CONFIG.max_clients,
        stage_timeout=CONFIG.stage_timeout,
        num_neighbours=2,
    )

    with pytest.raises(TooFewSurvivorsError, match=SPLIT):
        run(grid, config=config)

    assert len(graph) == len(node_ids)
    assert unmask_requests == []
