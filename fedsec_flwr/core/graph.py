"""Random regular neighbour graphs for SecAgg+ (Bell et al. 2020).

Each client masks its input only with its neighbours, so its mask work grows
with the degree ``k`` instead of the number of clients ``n``. The graph is a
Harary graph over a uniformly random ordering of the clients: on that ring,
each client is joined to the ``k // 2`` nearest clients on each side, and for
odd ``k`` also to the client opposite it. ``k >= n - 1`` gives the complete
graph, which is classic SecAgg (Bonawitz et al. 2017).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence


def default_num_neighbours(num_clients: int) -> int:
    """Return the default degree for ``num_clients``: ``ceil(log2 n) + 1``, capped.

    The cap is ``n - 1``, the complete graph.
    """
    if num_clients < 2:
        raise ValueError(f"num_clients must be at least 2. Found {num_clients}.")
    return min(num_clients - 1, math.ceil(math.log2(num_clients)) + 1)


def default_threshold(num_neighbours: int) -> int:
    """Return the default Shamir threshold: a strict majority of share holders.

    A client's secrets are shared among its neighbours and itself, so there are
    ``num_neighbours + 1`` holders.
    """
    return (num_neighbours + 1) // 2 + 1


def neighbour_graph(
    node_ids: Sequence[int], *, num_neighbours: int, rng: random.Random
) -> dict[int, tuple[int, ...]]:
    """Build a random ``k``-regular graph over ``node_ids``.

    When ``n * k`` is odd no ``k``-regular graph exists, and each client gets
    ``k + 1`` neighbours instead.

    Args:
        node_ids: Distinct node ids, at least two.
        num_neighbours: The degree ``k``: at least 2 for more than two
            clients, since a degree of 1 would pair them up and the server
            would learn each pair's sum. Values of ``n - 1`` and above give
            the complete graph.
        rng: Source of the random ordering (``random.SystemRandom()`` in
            production).

    Returns:
        For each node id, its neighbours in increasing order.

    """
    num_nodes = len(node_ids)
    if num_nodes < 2:
        raise ValueError(f"node_ids must hold at least 2 ids. Found {num_nodes}.")
    if len(set(node_ids)) != num_nodes:
        raise ValueError("node_ids must be distinct. Found a repeated id.")
    if num_neighbours < 1:
        raise ValueError(f"num_neighbours must be at least 1. Found {num_neighbours}.")
    if num_neighbours < 2 < num_nodes:
        raise ValueError(
            f"num_neighbours must be at least 2 for {num_nodes} clients, because a "
            "degree of 1 pairs them up and the server would learn each pair's sum. "
            f"Found {num_neighbours}."
        )

    ring = list(node_ids)
    rng.shuffle(ring)
    degree = min(num_neighbours, num_nodes - 1)
    if degree % 2 == 1 and num_nodes % 2 == 1:
        degree += 1

    neighbours: dict[int, set[int]] = {node: set() for node in ring}
    for position, node in enumerate(ring):
        offsets = list(range(1, degree // 2 + 1))
        if degree % 2 == 1:
            offsets.append(num_nodes // 2)
        for offset in offsets:
            for other in (
                ring[(position + offset) % num_nodes],
                ring[(position - offset) % num_nodes],
            ):
                if other != node:
                    neighbours[node].add(other)
                    neighbours[other].add(node)

    return {node: tuple(sorted(peers)) for node, peers in neighbours.items()}


def connected_groups(
    neighbours: Mapping[int, Sequence[int]], members: Collection[int]
) -> list[set[int]]:
    """Split ``members`` into the groups that the graph connects among themselves.

    Only edges between two members count. Pairwise masks cancel within each
    group, so unmasking the sum of more than one group would reveal the sum
    of each.
    """
    remaining = set(members)
    groups = []
    while remaining:
        start = min(remaining)
        group = {start}
        frontier = [start]
        while frontier:
            node = frontier.pop()
            for peer in neighbours.get(node, ()):
                if peer in remaining and peer not in group:
                    group.add(peer)
                    frontier.append(peer)
        remaining -= group
        groups.append(group)

    return groups
