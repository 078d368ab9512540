"""Fixed-point encoding: round trips, capacity checks and the neighbour graph."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from fedsec_flwr.core.encoding import (
    MIN_CLIP_RANGE,
    TRAILER_SIZE,
    EncodingParams,
    decode_sum,
    encode_update,
    max_quantization_bits,
    validate_capacity,
)
from fedsec_flwr.core.graph import (
    default_num_neighbours,
    default_threshold,
    neighbour_graph,
)

PARAMS = EncodingParams(
    clip_range=2.0,
    quantization_levels=2**10,
    modulus=2**32,
    max_weight=100,
    max_clients=10,
)


def test_round_trip_within_one_step() -> None:
    update = np.random.default_rng(0).uniform(-2, 2, 10_000)

    encoded, clipped = encode_update(
        update, weight=1, params=PARAMS, rng=np.random.default_rng(1)
    )
    result = decode_sum(encoded, params=PARAMS)
    decoded, total_weight, total_clipped = (
        result.mean,
        result.total_weight,
        result.num_clipped,
    )

    assert np.max(np.abs(decoded - update)) < PARAMS.step
    assert total_weight == 1
    assert clipped == total_clipped == 0


def test_stochastic_rounding_is_unbiased() -> None:
    value = 0.3 * PARAMS.step - PARAMS.clip_range
    update = np.full(200_000, value)

    encoded, _ = encode_update(
        update, weight=1, params=PARAMS, rng=np.random.default_rng(2)
    )
    decoded = decode_sum(encoded, params=PARAMS).mean

    # The mean of 200k Bernoulli(0.3) draws has standard deviation 0.001 steps;
    # 0.006 steps is six standard deviations (false-failure rate below 1e-8).
    assert abs(decoded.mean() - value) < 0.006 * PARAMS.step


def test_weighted_sum_decodes_to_weighted_mean() -> None:
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-1, 1, 500) for _ in range(4)]
    weights = [1, 10, 50, 100]

    total = np.zeros(500 + TRAILER_SIZE, dtype=np.uint32)
    for update, weight in zip(updates, weights, strict=True):
        encoded, _ = encode_update(update, weight=weight, params=PARAMS, rng=rng)
        total += encoded
    result = decode_sum(total, params=PARAMS)
    decoded, total_weight = result.mean, result.total_weight

    expected = sum(u * w for u, w in zip(updates, weights, strict=True)) / sum(weights)
    assert total_weight == sum(weights)
    assert np.max(np.abs(decoded - expected)) < PARAMS.step


def test_out_of_range_values_are_clipped_and_counted() -> None:
    update = np.array([1.9, 2.5, 100.0, -1000.0, 0.0])

    encoded, clipped = encode_update(
        update, weight=3, params=PARAMS, rng=np.random.default_rng(4)
    )
    result = decode_sum(encoded, params=PARAMS)
    decoded, total_clipped = result.mean, result.num_clipped

    assert clipped == 3
    assert total_clipped == 3
    np.testing.assert_allclose(decoded, [1.9, 2.0, 2.0, -2.0, 0.0], atol=PARAMS.step)


def test_overwrite_false_keeps_update() -> None:
    update = np.linspace(-1, 1, 11)
    original = update.copy()

    encode_update(update, weight=1, params=PARAMS, rng=np.random.default_rng(5))

    np.testing.assert_array_equal(update, original)


def test_encode_rejects_non_finite_update() -> None:
    with pytest.raises(ValueError, match="update must be finite"):
        encode_update(
            np.array([0.0, np.nan]),
            weight=1,
            params=PARAMS,
            rng=np.random.default_rng(),
        )


def test_encode_rejects_weight_above_max() -> None:
    with pytest.raises(ValueError, match="weight must be between 0 and max_weight 100"):
        encode_update(
            np.zeros(3), weight=101, params=PARAMS, rng=np.random.default_rng()
        )


def test_decode_rejects_zero_total_weight() -> None:
    with pytest.raises(ValueError, match="total weight of the aggregated clients is 0"):
        decode_sum(np.zeros(10, dtype=np.uint32), params=PARAMS)


@pytest.mark.parametrize("clip_range", [0.0, -1.0, math.nan, math.inf])
def test_invalid_clip_range_rejected(clip_range: float) -> None:
    with pytest.raises(ValueError, match="clip_range must be a finite number above 0"):
        validate_capacity(
            clip_range=clip_range,
            quantization_levels=16,
            modulus=2**32,
            max_weight=1,
            max_clients=2,
        )


@pytest.mark.parametrize("modulus", [3, 1000, 2**32 + 1, 2**33, 1])
def test_invalid_modulus_rejected(modulus: int) -> None:
    with pytest.raises(ValueError, match="modulus must be a power of two"):
        validate_capacity(
            clip_range=1.0,
            quantization_levels=2,
            modulus=modulus,
            max_weight=1,
            max_clients=1,
        )


@pytest.mark.parametrize("levels", [2**16, 2**20])
def test_modulus_not_above_levels_rejected(levels: int) -> None:
    with pytest.raises(ValueError, match="below the modulus 65536"):
        validate_capacity(
            clip_range=1.0,
            quantization_levels=levels,
            modulus=2**16,
            max_weight=1,
            max_clients=1,
        )


@pytest.mark.parametrize(
    ("num_clients", "num_examples"),
    list(itertools.product([3, 7, 10, 50], [100, 60_000])),
)
def test_capacity_check_matches_worst_case(num_clients: int, num_examples: int) -> None:
    bits = 16
    worst = num_clients * num_examples * (2**bits - 1)
    kwargs = {
        "clip_range": 1.0,
        "quantization_levels": 2**bits,
        "modulus": 2**32,
        "max_weight": num_examples,
        "max_clients": num_clients,
    }

    if worst >= 2**32:
        with pytest.raises(ValueError, match="would wrap the modulus 4294967296"):
            EncodingParams(**kwargs)  # type: ignore[arg-type]
        return

    params = EncodingParams(**kwargs)  # type: ignore[arg-type]
    total = np.zeros(1 + TRAILER_SIZE, dtype=np.uint32)
    for _ in range(num_clients):
        encoded, _ = encode_update(
            np.array([1.0]),
            weight=num_examples,
            params=params,
            rng=np.random.default_rng(),
        )
        total += encoded
    decoded = decode_sum(total, params=params).mean
    assert abs(decoded[0] - 1.0) < params.step


def test_max_quantization_bits_fits_exactly() -> None:
    bits = max_quantization_bits(modulus=2**32, max_weight=60_000, max_clients=50)

    assert 50 * 60_000 * (2**bits - 1) < 2**32
    assert 50 * 60_000 * (2 ** (bits + 1) - 1) >= 2**32


@pytest.mark.parametrize("num_nodes", [2, 3, 5, 10, 11, 100])
@pytest.mark.parametrize("degree", [2, 3, 4, 9])
def test_graph_is_regular_and_symmetric(num_nodes: int, degree: int) -> None:
    nodes = [1000 + i for i in range(num_nodes)]

    graph = neighbour_graph(nodes, num_neighbours=degree, rng=random.Random(num_nodes))

    expected = min(degree, num_nodes - 1)
    if expected % 2 == 1 and num_nodes % 2 == 1:
        expected += 1
    assert {len(peers) for peers in graph.values()} == {expected}
    for node, peers in graph.items():
        assert node not in peers
        for peer in peers:
            assert node in graph[peer]


def test_complete_graph_when_degree_reaches_n_minus_one() -> None:
    nodes = list(range(6))

    graph = neighbour_graph(nodes, num_neighbours=5, rng=random.Random(0))

    assert all(len(peers) == 5 for peers in graph.values())


def test_graph_rejects_repeated_ids() -> None:
    with pytest.raises(ValueError, match="node_ids must be distinct"):
        neighbour_graph([1, 1, 2], num_neighbours=1, rng=random.Random(0))


def test_default_degree_grows_like_log() -> None:
    assert default_num_neighbours(2) == 1
    assert default_num_neighbours(10) == 5
    assert default_num_neighbours(1000) == 11


def test_default_threshold_is_strict_majority() -> None:
    for degree in range(1, 30):
        holders = degree + 1
        assert default_threshold(degree) > holders / 2
        assert default_threshold(degree) <= holders


def test_extra_slots_are_summed() -> None:
    total = np.zeros(4 + TRAILER_SIZE + 2, dtype=np.uint32)
    for extra in ([1, 7], [0, 9], [1, 2**20]):
        encoded, _ = encode_update(
            np.zeros(4),
            weight=1,
            params=PARAMS,
            rng=np.random.default_rng(),
            extra=extra,
        )
        total += encoded

    result = decode_sum(total, params=PARAMS, num_extra=2)

    assert result.extra.tolist() == [2, 2**20 + 16]
    assert result.total_weight == 3


def test_negative_noise_decodes_within_headroom() -> None:
    params = EncodingParams(
        clip_range=1.0,
        quantization_levels=2**8,
        modulus=2**16,
        max_weight=1,
        max_clients=10,
        noise_headroom=1000,
    )
    encoded, _ = encode_update(
        np.array([-1.0, 1.0]), weight=1, params=params, rng=np.random.default_rng()
    )
    noisy = encoded.astype(np.int64)
    noisy[:2] += [-300, 300]
    noisy %= params.modulus

    result = decode_sum(noisy.astype(np.uint32), params=params)

    np.testing.assert_allclose(
        result.mean, [-1 - 300 * params.step, 1 + 300 * params.step]
    )


def test_smallest_clip_range_decodes_full_sum() -> None:
    # 255 clients at 24 bits nearly fill the 2**32 modulus, so the total
    # weight times (levels - 1) is as large as any encoding allows.
    params = EncodingParams(
        clip_range=MIN_CLIP_RANGE,
        quantization_levels=2**24,
        modulus=2**32,
        max_weight=1,
        max_clients=255,
    )
    update = np.random.default_rng(0).uniform(-MIN_CLIP_RANGE, MIN_CLIP_RANGE, 1000)
    encoded, _ = encode_update(
        update, weight=1, params=params, rng=np.random.default_rng(1)
    )
    total = (encoded.astype(np.uint64) * 255 % params.modulus).astype(np.uint32)

    result = decode_sum(total, params=params)

    assert result.total_weight == 255
    assert np.max(np.abs(result.mean - update)) < params.step


@pytest.mark.parametrize("clip_range", [np.nextafter(MIN_CLIP_RANGE, 0.0), 1e-300])
def test_clip_range_below_minimum_rejected(clip_range: float) -> None:
    with pytest.raises(
        ValueError, match=r"clip_range must be at least 4.779e-299 \(2\*\*-991\)"
    ):
        EncodingParams(
            clip_range=clip_range,
            quantization_levels=2**24,
            modulus=2**32,
            max_weight=1,
            max_clients=64,
        )


def test_headroom_counts_in_capacity() -> None:
    with pytest.raises(ValueError, match="plus twice the noise headroom 40000"):
        EncodingParams(
            clip_range=1.0,
            quantization_levels=2**8,
            modulus=2**16,
            max_weight=1,
            max_clients=10,
            noise_headroom=40_000,
        )


@pytest.mark.parametrize(
    ("settings", "advice"),
    [
        (
            {"max_clients": 2**17, "quantization_levels": 2**16},
            "Lower max_clients or the quantization bits.",
        ),
        # Under DP every weight is 1, so max_weight cannot be lowered.
        (
            {"max_clients": 2**17, "quantization_levels": 2**16, "max_weight": 4},
            "Lower max_clients or the quantization bits.",
        ),
        (
            {"max_clients": 1, "quantization_levels": 2, "noise_headroom": 2**31},
            "Lower the noise.",
        ),
        (
            {"max_clients": 1, "quantization_levels": 2, "max_weight": 2**32},
            "Lower max_weight.",
        ),
        (
            {"max_clients": 2**10, "quantization_levels": 2**8, "modulus": 2**16},
            "Lower max_clients or the quantization bits, "
            "or raise the modulus (at most 2**32).",
        ),
        # Two clients are the fewest that SecAggConfig allows.
        (
            {
                "max_clients": 2,
                "max_weight": 3,
                "quantization_levels": 2**18,
                "modulus": 2**20,
            },
            "Lower max_weight or the quantization bits, or raise the modulus "
            "(at most 2**32).",
        ),
        # No single setting is enough, so every one that can be lowered is named.
        (
            {"max_clients": 2**17, "quantization_levels": 2**16, "max_weight": 2**17},
            "Lower max_clients, max_weight or the quantization bits.",
        ),
    ],
)
def test_capacity_error_names_settings_that_help(
    settings: dict[str, int], advice: str
) -> None:
    arguments = {"clip_range": 1.0, "modulus": 2**32, "max_weight": 1} | settings

    with pytest.raises(ValueError) as raised:
        EncodingParams(**arguments)  # type: ignore[arg-type]

    assert str(raised.value).endswith(advice)
