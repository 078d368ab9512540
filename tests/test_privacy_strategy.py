"""Differential privacy through SecureFedAvg, the mod and the loopback Grid.

Clients send all-zero updates, so the released update is the noise itself.
The statistical checks compare the sample standard deviation of many
coordinates with the configured one; with n = 100,000 coordinates the sample
standard deviation has a relative standard error of 1/sqrt(2n) = 0.22%, so a
3% tolerance is over ten standard errors (false-failure rate below 1e-20).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedsec_flwr.strategy as strategy_module
from fedsec_flwr import (
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    TooFewSurvivorsError,
    secure_aggregation_mod,
)
from fedsec_flwr.core.encoding import decode_sum, encode_update
from fedsec_flwr.core.errors import ProtocolError
from fedsec_flwr.dp import SecureRandom, TargetEpsilonUnreachableError
from fedsec_flwr.privacy import (
    MIN_CLIPPING_NORM,
    DPConfig,
    DPMode,
    ServerPrivacy,
    add_distributed_noise,
    clip_flat_update,
)
from fedsec_flwr.strategy import (
    poisson_long_round_probability,
    poisson_short_round_probability,
)
from fedsec_flwr.verification import VerificationConfig
from tests.loopback import LoopbackGrid, add_to_slot, inflate_weight_slot, stage_of

NUM_COORDINATES = 100_000
NODE_IDS = [101, 202, 303, 404, 505]
SECAGG = SecAggConfig(
    clip_range=1.0, max_weight=1000, max_clients=10, stage_timeout=0.3
)
TOLERANCE = 0.03


def initial_model() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros(NUM_COORDINATES, dtype=np.float32),
        "counter": np.array(5, dtype=np.int64),
    }


def zero_train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    return Message(content, reply_to=msg)


def scaled_train(scale: float):  # type: ignore[no-untyped-def]
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        rng = np.random.default_rng(partition)
        step = scale * rng.standard_normal(NUM_COORDINATES) / np.sqrt(NUM_COORDINATES)
        arrays["w"] = (arrays["w"] + step).astype(np.float32)
        content = RecordDict(
            {
                "arrays": ArrayRecord(
                    {k: Array(np.asarray(v)) for k, v in arrays.items()}
                ),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)

    return train


def make_app(train=zero_train, secure: bool = True) -> ClientApp:  # type: ignore[no-untyped-def]
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if secure:
            return secure_aggregation_mod(msg, context, train)
        return train(msg, context)

    return app


def run(
    grid: LoopbackGrid,
    dp: DPConfig,
    *,
    secure: bool = True,
    secagg: SecAggConfig = SECAGG,
    rounds: int = 1,
    reports: list[RoundReport] | None = None,
    model: dict[str, np.ndarray] | None = None,
    **options: object,
) -> tuple[dict[str, np.ndarray], SecureFedAvg]:
    strategy = SecureFedAvg(
        secure_aggregation=secagg if secure else None,
        differential_privacy=dp,
        rng=random.Random(1),
        on_round_end=reports.append if reports is not None else None,
        **options,  # type: ignore[arg-type]
    )
    arrays = initial_model() if model is None else model
    initial = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}, strategy


SEVEN_NODE_IDS = [101, 202, 303, 404, 505, 606, 707]
SEVEN_SECAGG = dataclasses.replace(SECAGG, num_neighbours=6)
"""Seven clients in a complete graph: threshold 4, so each accepts
threshold - 2 = 2 dropped neighbours."""


def dropout_dp(target: float, **changes: object) -> DPConfig:
    """Distributed DP at ``target`` that lets 2 of 7 clients drop (f = 0.3)."""
    values: dict[str, object] = {
        "mode": DPMode.DISTRIBUTED,
        "target_epsilon": target,
        "clipping_norm": 1.0,
        "max_dropout_fraction": 0.3,
        **changes,
    }
    return DPConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_noise_std_matches_target_on_zero_updates(mode: DPMode) -> None:
    dp = DPConfig(mode=mode, noise_multiplier=1.5, clipping_norm=2.0)
    grid = LoopbackGrid(make_app(), NODE_IDS)

    model, _ = run(grid, dp)

    expected = 1.5 * 2.0 / len(NODE_IDS)
    assert model["w"].std() == pytest.approx(expected, rel=TOLERANCE)
    assert abs(model["w"].mean()) < 6 * expected / np.sqrt(NUM_COORDINATES)


def test_central_noise_in_plain_mode() -> None:
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=1.0, clipping_norm=1.0)
    grid = LoopbackGrid(make_app(secure=False), NODE_IDS)

    model, _ = run(grid, dp, secure=False)

    assert model["w"].std() == pytest.approx(1.0 / len(NODE_IDS), rel=TOLERANCE)


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_dropout_noise_matches_aggregated_count(mode: DPMode) -> None:
    def fault(node: int, stage: str, _: Message) -> object:
        return "drop" if node == NODE_IDS[0] and stage == "masked-input" else None

    dp = DPConfig(mode=mode, noise_multiplier=1.0, clipping_norm=1.0)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    model, _ = run(grid, dp, reports=reports)

    survivors = len(NODE_IDS) - 1
    if mode is DPMode.CENTRAL:
        expected = 1.0 / survivors
    else:
        # Noise was calibrated for 5 clients; 4 added theirs.
        expected = np.sqrt(survivors / len(NODE_IDS)) / survivors
    assert reports[0].num_aggregated == survivors
    assert model["w"].std() == pytest.approx(expected, rel=TOLERANCE)


def constant_train(shift: float):  # type: ignore[no-untyped-def]
    """Return a train function whose update adds ``shift`` to every weight."""

    def train(msg: Message, context: Context) -> Message:
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        arrays["w"] = (arrays["w"] + shift).astype(np.float32)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)

    return train


@pytest.mark.parametrize(
    ("mode", "secure"),
    [(DPMode.CENTRAL, True), (DPMode.CENTRAL, False), (DPMode.DISTRIBUTED, True)],
)
def test_poisson_round_hides_client_count(mode: DPMode, secure: bool) -> None:
    # Under Poisson sampling the count of clients depends on who was
    # sampled. Neither the update's scale nor its noise may show it: both
    # use q * N = 6 expected clients, whatever the sample.
    nodes = [1000 + i for i in range(12)]
    shift, z, clipping_norm = 0.01, 0.1, 4.0
    dp = DPConfig(mode=mode, noise_multiplier=z, clipping_norm=clipping_norm)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(constant_train(shift), secure=secure), nodes)

    model, _ = run(
        grid,
        dp,
        secure=secure,
        reports=reports,
        fraction_train=0.5,
        client_sampling="poisson",
    )

    [report] = reports
    expected_clients = 0.5 * len(nodes)
    # The test is meaningful only when the sample differs from its mean.
    assert report.num_aggregated != expected_clients
    std = z * clipping_norm / expected_clients
    assert model["w"].std() == pytest.approx(std, rel=TOLERANCE)
    mean_error = 6 * std / np.sqrt(NUM_COORDINATES)
    expected_mean = shift * report.num_aggregated / expected_clients
    assert abs(model["w"].mean() - expected_mean) < mean_error


def test_distributed_dropout_raises_epsilon() -> None:
    def fault(node: int, stage: str, _: Message) -> object:
        return "drop" if node == NODE_IDS[0] and stage == "masked-input" else None

    dp = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=1.0, clipping_norm=1.0)
    full: list[RoundReport] = []
    dropped: list[RoundReport] = []

    run(LoopbackGrid(make_app(), NODE_IDS), dp, reports=full)
    run(LoopbackGrid(make_app(), NODE_IDS, fault=fault), dp, reports=dropped)

    assert full[0].epsilon is not None
    assert dropped[0].epsilon is not None
    assert dropped[0].epsilon > full[0].epsilon


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_integer_arrays_untouched_by_noise(mode: DPMode) -> None:
    dp = DPConfig(mode=mode, noise_multiplier=1.0, clipping_norm=1.0)
    grid = LoopbackGrid(make_app(), NODE_IDS)

    model, _ = run(grid, dp)

    assert model["counter"].dtype == np.int64
    assert model["counter"] == 5
    assert model["w"].dtype == np.float32


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_epsilon_reported_and_non_decreasing(mode: DPMode) -> None:
    dp = DPConfig(mode=mode, noise_multiplier=1.2, clipping_norm=1.0)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, dp, rounds=3, reports=reports)

    epsilons = [r.epsilon for r in reports]
    assert all(e is not None and e > 0 for e in epsilons)
    assert epsilons == sorted(epsilons)  # type: ignore[type-var]
    assert epsilons[0] < epsilons[2]  # type: ignore[operator]


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_target_epsilon_never_exceeded(mode: DPMode) -> None:
    dp = DPConfig(mode=mode, target_epsilon=3.0, clipping_norm=1.0)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    _, strategy = run(grid, dp, rounds=3, reports=reports)

    assert len(reports) == 3
    assert reports[-1].epsilon is not None
    assert reports[-1].epsilon <= 3.0
    assert reports[-1].epsilon > 2.0
    assert strategy.stopped_reason is None


def drop_at_input(nodes: list[int], rounds: set[int]):  # type: ignore[no-untyped-def]
    """Drop ``nodes`` before they send their input in ``rounds``, either key lifetime."""

    def fault(node: int, stage: str, msg: Message) -> object:
        dropping = int(msg.metadata.group_id) in rounds and node in nodes
        return "drop" if dropping and stage in INPUT_STAGES else None

    return fault


INPUT_STAGES = ("masked-input", "keyed-input")
UNMASK_STAGES = ("unmask", "keyed-unmask")


def test_target_absorbs_allowed_dropouts() -> None:
    # With 2 of 7 allowed to drop, 2 dropouts in round 1 leave 5 noised
    # inputs. Later rounds get more noise, so the run stays in budget.
    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(), SEVEN_NODE_IDS, fault=drop_at_input(SEVEN_NODE_IDS[:2], {1})
    )

    _, strategy = run(
        grid,
        dropout_dp(2.0),
        secagg=SEVEN_SECAGG,
        rounds=3,
        reports=reports,
        min_available_nodes=7,
    )

    assert strategy.stopped_reason is None
    assert [r.num_aggregated for r in reports] == [5, 7, 7]
    assert all(r.epsilon is not None and r.epsilon <= 2.0 for r in reports)
    multipliers = [r.noise_multiplier for r in reports]
    assert multipliers[0] < multipliers[1] == multipliers[2]  # type: ignore[operator]


@pytest.mark.parametrize("key_lifetime", ["round", "run"])
def test_target_aborts_too_few_inputs(
    key_lifetime: str,
) -> None:
    # One round at target 2 released 2.26 here when a client dropped, before
    # rounds were aborted; now the sum of 4 inputs is never unmasked.
    dp = DPConfig(mode=DPMode.DISTRIBUTED, target_epsilon=2.0, clipping_norm=1.0)
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=drop_at_input(NODE_IDS[:1], {1}))
    secagg = dataclasses.replace(SECAGG, key_lifetime=key_lifetime)

    with pytest.raises(
        TooFewSurvivorsError,
        match=r"4 masked input\(s\) arrived, fewer than min_inputs 5 \(the noise "
        r"of fewer clients could take epsilon above target_epsilon 2\.0",
    ):
        run(grid, dp, secagg=secagg)

    assert not [m for m in grid.sent if stage_of(m) in UNMASK_STAGES]


def test_run_stops_before_budget_exceeded() -> None:
    # A modulus of 2**22 leaves room for too little noise to absorb dropouts
    # in every round, so the budget check stops the run before round 3.
    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(), SEVEN_NODE_IDS, fault=drop_at_input(SEVEN_NODE_IDS[:2], {1, 2, 3})
    )
    secagg = dataclasses.replace(SEVEN_SECAGG, modulus=2**22)

    _, strategy = run(
        grid,
        dropout_dp(1.6),
        secagg=secagg,
        rounds=3,
        reports=reports,
        min_available_nodes=7,
    )

    assert len(reports) == 2
    assert all(r.epsilon is not None and r.epsilon <= 1.6 for r in reports)
    assert strategy.stopped_reason is not None
    assert "if only 5 of its 7 clients add their noise" in strategy.stopped_reason
    assert "above the target 1.6" in strategy.stopped_reason


def test_flat_clip_of_huge_update_keeps_direction() -> None:
    # The squares of 1e200 overflow float64; the update must still be
    # scaled to norm C, not to zero.
    update = np.array([1e200, -2e200, 2e200])

    bit, scaled = clip_flat_update(update, clipping_norm=3.0)

    assert bit == 0
    assert scaled
    np.testing.assert_allclose(update, [1.0, -2.0, 2.0], rtol=1e-9)
    assert float(np.sqrt(np.dot(update, update))) <= 3.0


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_smallest_clipping_norm_round(mode: DPMode) -> None:
    # One round on ServerPrivacy and the encoding alone: clip, encode, add
    # the clients' noise in distributed mode, sum, decode and release.
    num_clients, dimension = 5, 20_000
    config = DPConfig(mode=mode, clipping_norm=MIN_CLIPPING_NORM, noise_multiplier=1.0)
    server = ServerPrivacy(
        config=config, num_rounds=1, sample_rate=1.0, max_clients=10, modulus=2**32
    )
    plan = server.plan(num_sampled=num_clients, dimension=dimension)
    assert plan.encoding is not None
    rng = np.random.default_rng(0)
    total = np.zeros(dimension + 2, dtype=np.uint64)
    clipped_sum = np.zeros(dimension)
    for _ in range(num_clients):
        update = MIN_CLIPPING_NORM * rng.standard_normal(dimension)
        clip_flat_update(update, clipping_norm=plan.clipping_norm)
        assert np.linalg.norm(update) <= MIN_CLIPPING_NORM
        clipped_sum += update
        encoded, _ = encode_update(update, weight=1, params=plan.encoding, rng=rng)
        if mode is DPMode.DISTRIBUTED:
            add_distributed_noise(
                encoded,
                num_coordinates=dimension,
                sigma_client=plan.sigma_client,
                bit_slot=None,
                bit_sigma_client=0.0,
                rng=SecureRandom(),
            )
        total += encoded
    total %= plan.encoding.modulus

    mean = decode_sum(total.astype(np.uint32), params=plan.encoding).mean
    server.release_mean(mean, plan, num_aggregated=num_clients)

    # Both modes release the mean with noise of standard deviation z * C / m.
    noise = mean - clipped_sum / num_clients
    expected_std = MIN_CLIPPING_NORM / num_clients
    assert np.std(noise) == pytest.approx(expected_std, rel=TOLERANCE)
    assert abs(np.mean(noise)) < 0.05 * expected_std


def test_adaptive_clipping_norm_stops_at_minimum() -> None:
    # Distributed mode, because there the clients add the bit sum's noise and
    # the server passes the sum on unchanged.
    config = DPConfig(
        mode=DPMode.DISTRIBUTED,
        clipping_norm=MIN_CLIPPING_NORM,
        noise_multiplier=1.0,
        adaptive_clipping=True,
        clipping_learning_rate=10.0,
    )
    server = ServerPrivacy(
        config=config, num_rounds=2, sample_rate=1.0, max_clients=10, modulus=2**32
    )
    plan = server.plan(num_sampled=5, dimension=100)

    # Every update unclipped, so C would shrink by exp(-5).
    server.update_clipping_norm(5.0, plan, num_aggregated=5)
    next_plan = server.plan(num_sampled=5, dimension=100)

    assert next_plan.clipping_norm == MIN_CLIPPING_NORM
    assert next_plan.encoding is not None
    assert next_plan.encoding.clip_range == MIN_CLIPPING_NORM


@pytest.mark.parametrize(
    "clipping_norm", [np.nextafter(MIN_CLIPPING_NORM, 0.0), 1e-300, 5e-324]
)
def test_clipping_norm_below_minimum_rejected(clipping_norm: float) -> None:
    with pytest.raises(
        ValueError,
        match=r"clipping_norm must be at least 3\.873e-121 \(2\*\*-400\), .* "
        rf"Found {clipping_norm}\.",
    ):
        DPConfig(mode=DPMode.CENTRAL, clipping_norm=clipping_norm, noise_multiplier=1.0)


def test_client_update_is_clipped_before_encoding() -> None:
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=2**-10, clipping_norm=0.5)
    grid = LoopbackGrid(make_app(scaled_train(10.0)), NODE_IDS)

    model, _ = run(grid, dp)

    # Each update has norm about 10 and is clipped to 0.5; the mean of five
    # independent ones has norm about 0.5 / sqrt(5).
    assert np.linalg.norm(model["w"]) < 0.5
    assert np.linalg.norm(model["w"]) > 0.1


def test_adaptive_clipping_moves_norm_toward_quantile() -> None:
    dp = DPConfig(
        mode=DPMode.CENTRAL,
        noise_multiplier=0.5,
        clipping_norm=0.05,
        adaptive_clipping=True,
        clipped_count_stddev=1.0,
    )
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(scaled_train(1.0)), NODE_IDS)

    run(grid, dp, rounds=3, reports=reports)

    # Every update norm (about 1) is above C, so the unclipped fraction is 0
    # plus noise of std 1 / 5 per round; C shrinks only if the noise over two
    # rounds exceeds the 0.5 target quantile by 3.5 std (rate about 2e-4).
    norms = [r.clipping_norm for r in reports]
    assert norms[0] == pytest.approx(0.05)
    assert norms[2] > norms[0]  # type: ignore[operator]


def test_distributed_adaptive_clipping_runs() -> None:
    dp = DPConfig(
        mode=DPMode.DISTRIBUTED,
        noise_multiplier=0.5,
        clipping_norm=5.0,
        adaptive_clipping=True,
        clipped_count_stddev=0.5,
    )
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(scaled_train(1.0)), NODE_IDS)

    run(grid, dp, rounds=2, reports=reports)

    assert reports[1].clipping_norm < 5.0  # type: ignore[operator]


@pytest.mark.parametrize(
    ("mode", "num_sampled", "noise_multiplier", "expected"),
    [
        (DPMode.CENTRAL, 100, 1.0, 5.0),
        (DPMode.CENTRAL, 10, 1.0, 2.0),
        (DPMode.DISTRIBUTED, 10, 1.0, 4.0),
        (DPMode.DISTRIBUTED, 200, 1.0, 10.0),
    ],
)
def test_default_bit_noise_scales_with_noise_multiplier(
    mode: DPMode, num_sampled: int, noise_multiplier: float, expected: float
) -> None:
    server = ServerPrivacy(
        config=DPConfig(
            mode=mode, noise_multiplier=noise_multiplier, adaptive_clipping=True
        ),
        num_rounds=1,
        sample_rate=1.0,
        max_clients=num_sampled,
        modulus=2**32,
    )

    server.plan(num_sampled=num_sampled, dimension=100)

    assert server.adaptive is not None
    assert server.adaptive.noise_std == pytest.approx(expected)


def test_central_adaptive_clipping_default_fits_few_clients() -> None:
    # With m / 20 = 0.25 as sigma_b, z = 1 would leave no budget for the
    # updates, and the round would fail before it starts.
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=1.0, adaptive_clipping=True)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(scaled_train(1.0)), NODE_IDS)

    run(grid, dp, rounds=2, reports=reports)

    assert [r.epsilon is not None for r in reports] == [True, True]


def test_distributed_adaptive_clipping_meets_small_target() -> None:
    dp = DPConfig(
        mode=DPMode.DISTRIBUTED,
        target_epsilon=1.0,
        clipping_norm=5.0,
        adaptive_clipping=True,
    )
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(scaled_train(1.0)), NODE_IDS)

    run(grid, dp, rounds=2, reports=reports)

    assert len(reports) == 2
    assert 0 < reports[1].epsilon <= 1.0  # type: ignore[operator]


def test_distributed_without_secure_aggregation_rejected() -> None:
    dp = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=1.0)

    with pytest.raises(ValueError, match="Distributed DP needs secure aggregation"):
        SecureFedAvg(secure_aggregation=None, differential_privacy=dp)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "local", "noise_multiplier": 1.0}, "mode must be 'central'"),
        ({"mode": "central"}, "exactly one of noise_multiplier and target_epsilon"),
        (
            {"mode": "central", "noise_multiplier": 1.0, "target_epsilon": 1.0},
            "exactly one",
        ),
        ({"mode": "central", "noise_multiplier": -1.0}, "noise_multiplier must be"),
        ({"mode": "central", "target_epsilon": 0.0}, "target_epsilon must be"),
        ({"mode": "central", "noise_multiplier": 1.0, "delta": 1.0}, "delta must be"),
        (
            {"mode": "central", "noise_multiplier": 1.0, "delta": 1e-300},
            r"delta must be in \[1e-15, 0\.1\): .* Found 1e-300",
        ),
        (
            {"mode": "central", "noise_multiplier": 1.0, "clipping_norm": 0.0},
            "clipping_norm must be",
        ),
        (
            {"mode": "distributed", "noise_multiplier": 1.0, "accountant": "prv"},
            "supports only the central mode",
        ),
        (
            {"mode": "central", "noise_multiplier": 1.0, "target_quantile": 1.5},
            "target_quantile must be",
        ),
        (
            {"mode": "central", "noise_multiplier": 1.0, "quantization_bits": 30},
            "quantization_bits must be",
        ),
        (
            {"mode": "distributed", "target_epsilon": 1.0, "max_dropout_fraction": 1.0},
            "max_dropout_fraction must be at least 0 and below 1. Found 1.0",
        ),
        (
            {
                "mode": "distributed",
                "target_epsilon": 1.0,
                "max_dropout_fraction": -0.1,
            },
            "max_dropout_fraction must be at least 0 and below 1. Found -0.1",
        ),
        (
            {
                "mode": "distributed",
                "target_epsilon": 1.0,
                "max_dropout_fraction": True,
            },
            "max_dropout_fraction must be at least 0 and below 1. Found True",
        ),
        (
            {
                "mode": "central",
                "noise_multiplier": 1.0,
                "adaptive_clipping": True,
                "clipped_count_stddev": 0.4,
            },
            "clipped_count_stddev must be above noise_multiplier / 2",
        ),
    ],
)
def test_invalid_dp_config_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPConfig(**kwargs)  # type: ignore[arg-type]


def test_poisson_sampling_amplifies_central_accounting() -> None:
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=1.0)
    epsilons = {}
    for sampling in ("fixed", "poisson"):
        reports: list[RoundReport] = []
        strategy = SecureFedAvg(
            secure_aggregation=SECAGG,
            differential_privacy=dp,
            fraction_train=0.8,
            client_sampling=sampling,
            rng=random.Random(0),
            on_round_end=reports.append,
        )
        ids = [1000 + i for i in range(10)]
        initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
        strategy.start(
            grid=LoopbackGrid(make_app(), ids), initial_arrays=initial, num_rounds=1
        )
        epsilons[sampling] = reports[0].epsilon

    assert epsilons["poisson"] < epsilons["fixed"]  # type: ignore[operator]


def test_poisson_epsilon_against_server() -> None:
    # The server draws the sample, so against it the round counts in full.
    dp = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=1.0)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), [1000 + i for i in range(10)])

    run(grid, dp, reports=reports, fraction_train=0.8, client_sampling="poisson")

    [report] = reports
    assert report.epsilon is not None
    assert report.epsilon_against_server is not None
    assert report.epsilon < report.epsilon_against_server


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_unsampled_epsilon_against_server(mode: DPMode) -> None:
    dp = DPConfig(mode=mode, noise_multiplier=1.2, clipping_norm=1.0)
    reports: list[RoundReport] = []

    run(LoopbackGrid(make_app(), NODE_IDS), dp, rounds=2, reports=reports)

    for report in reports:
        if mode is DPMode.CENTRAL:
            assert report.epsilon_against_server is None
        else:
            assert report.epsilon_against_server == report.epsilon


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quantization_bits": 2.5}, "quantization_bits must be between"),
        ({"quantization_bits": "16"}, "quantization_bits must be between"),
        ({"adaptive_clipping": "yes"}, "adaptive_clipping must be a bool"),
        ({"adaptive_clipping": None}, "adaptive_clipping must be a bool"),
        ({"noise_multiplier": True}, "noise_multiplier must be a finite number"),
        ({"delta": "1e-5"}, "delta must be in"),
        ({"delta": True}, "delta must be in"),
        ({"target_quantile": "0.5"}, "target_quantile must be in"),
    ],
)
def test_dp_config_wrong_types_rejected(
    changes: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"mode": DPMode.CENTRAL, "noise_multiplier": 1.0}
    arguments.update(changes)

    with pytest.raises(ValueError, match=message):
        DPConfig(**arguments)  # type: ignore[arg-type]


def test_dp_config_target_epsilon_bool_rejected() -> None:
    with pytest.raises(ValueError, match="target_epsilon must be a finite number"):
        DPConfig(mode=DPMode.CENTRAL, target_epsilon=True)  # type: ignore[arg-type]


def test_poisson_short_round_probability_is_binomial_tail() -> None:
    probability = poisson_short_round_probability(
        num_nodes=5, sample_rate=0.3, min_sampled=2
    )

    assert probability == pytest.approx(0.7**5 + 5 * 0.3 * 0.7**4)


def test_poisson_sampling_likely_to_stop_run_rejected() -> None:
    strategy = SecureFedAvg(
        secure_aggregation=SECAGG,
        fraction_train=0.3,
        client_sampling="poisson",
        rng=random.Random(0),
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    grid = LoopbackGrid(make_app(), NODE_IDS)

    with pytest.raises(ValueError, match=r"fraction_train 0\.3 over 5 nodes"):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=3)

    assert grid.sent == []


def test_verified_run_stops_on_commitment_overflow() -> None:
    # After round 1 loses the 2 clients that f allows, round 2 needs a larger
    # z, whose commitment offset no longer fits a modulus of 2**21. Without
    # verification the same run completes both rounds.
    reports: list[RoundReport] = []
    grid = LoopbackGrid(
        make_app(), SEVEN_NODE_IDS, fault=drop_at_input(SEVEN_NODE_IDS[:2], {1})
    )

    _, strategy = run(
        grid,
        dropout_dp(2.0, quantization_bits=14),
        secagg=SecAggConfig(
            modulus=2**21, max_clients=7, num_neighbours=6, stage_timeout=0.3
        ),
        rounds=2,
        reports=reports,
        model={"w": np.zeros(10, dtype=np.float32)},
        verification=True,
        min_train_nodes=7,
        min_available_nodes=7,
    )

    assert [r.num_aggregated for r in reports] == [5]
    assert reports[0].epsilon is not None
    assert reports[0].epsilon <= 2.0
    assert strategy.stopped_reason is not None
    assert strategy.stopped_reason.startswith("Stopped before round 2:")


def test_hostile_weight_slot_still_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A client that inflates its weight slot makes the unmasked sum fail to
    # decode. The server has seen that noised sum, so the round is recorded.
    recorded: list[int] = []
    honest_record = ServerPrivacy.record

    def record(self: ServerPrivacy, plan: object, **kwargs: int) -> float:
        recorded.append(kwargs["num_aggregated"])
        return honest_record(self, plan, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ServerPrivacy, "record", record)

    fault = inflate_weight_slot(NODE_IDS[0])
    dp = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=1.0, clipping_norm=1.0)
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    with pytest.raises(ProtocolError, match="differs from the 5 clients aggregated"):
        run(grid, dp)

    assert recorded == [len(NODE_IDS)]


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DISTRIBUTED])
def test_hostile_weight_below_count_rejected(mode: DPMode) -> None:
    # A client that writes weight 0 (1 - 1 mod 2**32) would make the server
    # divide by 4 clients' weight while the noise is calibrated for 5, so
    # the honest updates would grow against the same noise.
    dp = DPConfig(mode=mode, noise_multiplier=1.0, clipping_norm=1.0)
    fault = inflate_weight_slot(NODE_IDS[0], amount=2**32 - 1)
    grid = LoopbackGrid(make_app(constant_train(0.001)), NODE_IDS, fault=fault)

    with pytest.raises(ProtocolError, match="weight 4 differs from the 5 clients"):
        run(grid, dp)


def test_pipelined_report_survives_abort() -> None:
    # Round 1 is verified during round 2's first exchanges; round 2 then
    # loses a client below min_inputs and aborts, and round 1 is reported.
    dp = DPConfig(mode=DPMode.DISTRIBUTED, target_epsilon=4.0, clipping_norm=1.0)
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=drop_at_input(NODE_IDS[:1], {2}))

    with pytest.raises(TooFewSurvivorsError, match="fewer than min_inputs 5"):
        run(
            grid,
            dp,
            rounds=3,
            reports=reports,
            model={"w": np.zeros(1000, dtype=np.float32)},
            verification=VerificationConfig(pipelined=True),
        )

    assert [r.server_round for r in reports] == [1]
    assert reports[0].verified is True
    assert reports[0].epsilon is not None


def test_poisson_above_max_clients_rejected() -> None:
    strategy = SecureFedAvg(
        secure_aggregation=SECAGG,
        fraction_train=0.8,
        client_sampling="poisson",
        rng=random.Random(0),
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    grid = LoopbackGrid(make_app(), [1000 + i for i in range(12)])

    with pytest.raises(
        ValueError, match=r"over 12 nodes draws more than max_clients 10 in at least"
    ):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=10)

    assert grid.sent == []


def test_poisson_long_round_probability_is_binomial_tail() -> None:
    probability = poisson_long_round_probability(
        num_nodes=5, sample_rate=0.3, max_sampled=3
    )

    assert probability == pytest.approx(5 * 0.3**4 * 0.7 + 0.3**5)


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "plain"])
def test_overflowing_noise_releases_no_model(secure: bool) -> None:
    # Noise of standard deviation 2e36 on float32 values at the type's
    # maximum: about half of the 100,000 coordinates overflow.
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=2**14, clipping_norm=6e32)
    model = initial_model()
    model["w"][:] = np.finfo(np.float32).max
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(secure=secure), NODE_IDS)

    with pytest.raises(ValueError, match="'w' has NaN or infinite values"):
        run(grid, dp, secure=secure, model=model, reports=reports)

    assert reports == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"noise_multiplier": 1e300}, "must be at most 16384"),
        ({"noise_multiplier": 1e4, "clipping_norm": 1e35}, "overflows float32"),
    ],
)
def test_noise_beyond_float_range_rejected(
    changes: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DPConfig(mode=DPMode.CENTRAL, **changes)  # type: ignore[arg-type]


def poisson_strategy_warnings(
    caplog: pytest.LogCaptureFixture, dp: DPConfig, **options: object
) -> list[str]:
    """Build a strategy with Poisson sampling and return the warnings it logs."""
    with caplog.at_level(logging.WARNING, logger="fedsec_flwr"):
        SecureFedAvg(
            differential_privacy=dp,
            client_sampling="poisson",
            fraction_train=0.5,
            **options,  # type: ignore[arg-type]
        )
    return [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize(
    ("rng", "warned"), [(random.Random(3), True), (random.SystemRandom(), False)]
)
def test_seeded_poisson_sample_warned(
    rng: random.Random, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=1.0)

    messages = poisson_strategy_warnings(caplog, dp, rng=rng)

    assert any("predict the Poisson sample" in m for m in messages) is warned


def test_verified_poisson_rounds_warned(caplog: pytest.LogCaptureFixture) -> None:
    dp = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=1.0)

    messages = poisson_strategy_warnings(caplog, dp, verification=True)

    assert any("name their clients in the transcript" in m for m in messages)


@pytest.mark.parametrize(
    ("mode", "adaptive", "amount", "message"),
    [
        # Without adaptive clipping the last slot counts clipped coordinates.
        (DPMode.CENTRAL, False, 10**6, "the sum counts 1000000 clipped coordinates"),
        # With it, the last slot sums the clipping bits: 5 below zero here.
        (
            DPMode.CENTRAL,
            True,
            2**32 - 10,
            r"the clipping bits sum to -\d+, outside 0 to 5",
        ),
        (DPMode.CENTRAL, True, 100, r"the clipping bits sum to \d+, outside 0 to 5"),
        # In distributed mode the bits carry noise, so the sum may leave 0 to
        # m by a few noise widths, but not by a million.
        (DPMode.DISTRIBUTED, True, 2**32 - 10**6, r"the clipping bits sum to -\d+"),
    ],
)
def test_hostile_count_slots_rejected(
    mode: DPMode, adaptive: bool, amount: int, message: str
) -> None:
    # A client that writes into the count slots would forge the clipped
    # count in the report or steer the clipping norm round after round.
    dp = DPConfig(
        mode=mode,
        noise_multiplier=0.5,
        clipping_norm=1.0,
        adaptive_clipping=adaptive,
    )
    fault = add_to_slot(NODE_IDS[0], -1, amount)
    grid = LoopbackGrid(make_app(constant_train(0.001)), NODE_IDS, fault=fault)

    with pytest.raises(ProtocolError, match=message):
        run(grid, dp)


class GrowingNodes:
    """A grid stand-in whose node list grows after the first call."""

    def __init__(self, first: list[int], later: list[int]) -> None:
        self.calls = 0
        self.first = first
        self.later = later

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.first if self.calls == 1 else self.later


def test_poisson_warns_when_nodes_join(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = SecureFedAvg(
        secure_aggregation=SECAGG, fraction_train=0.6, client_sampling="poisson"
    )
    # 10 nodes never give more than max_clients 10; 18 give 10.8 on average.
    grid = GrowingNodes(list(range(10)), list(range(18)))

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr"):
        strategy._sample_nodes(grid, 1, timeout=1.0, num_rounds=3)  # type: ignore[arg-type]
        assert "draws more than max_clients" not in caplog.text
        # The round itself may draw more than 10 and raise.
        with contextlib.suppress(ValueError):
            strategy._sample_nodes(grid, 2, timeout=1.0, num_rounds=3)  # type: ignore[arg-type]

    warnings = [r.getMessage() for r in caplog.records if "18 nodes" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("Round 2: ")
    assert "draws more than max_clients 10 in at least one of 2 rounds" in warnings[0]


def test_waiting_for_nodes_is_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strategy_module, "NODE_WAIT_LOG_INTERVAL", 0.2)
    strategy = SecureFedAvg(
        secure_aggregation=SECAGG, min_train_nodes=3, min_available_nodes=3
    )
    grid = GrowingNodes([1, 2], [1, 2])

    with (
        caplog.at_level(logging.WARNING, logger="fedsec_flwr"),
        pytest.raises(TimeoutError, match="Only 2 node"),
    ):
        strategy._sample_nodes(grid, 1, timeout=1.5, num_rounds=1)  # type: ignore[arg-type]

    assert "Round 1 waits for 3 node(s) with 2 connected" in caplog.text
    assert re.search(r"stops waiting in \d+ s, at the strategy's timeout", caplog.text)


def test_unreachable_central_target_found_before_round_one() -> None:
    unreachable = SecureFedAvg(
        secure_aggregation=SECAGG,
        differential_privacy=DPConfig(
            mode=DPMode.CENTRAL, clipping_norm=1.0, target_epsilon=0.01
        ),
    )
    reachable = SecureFedAvg(
        secure_aggregation=SECAGG,
        differential_privacy=DPConfig(
            mode=DPMode.CENTRAL, clipping_norm=1.0, target_epsilon=3.0
        ),
    )

    with pytest.raises(ValueError, match=r"target_epsilon 0.01 needs a noise"):
        unreachable.check_privacy_target(1)
    reachable.check_privacy_target(5)


def _distributed_strategy(target_epsilon: float, **options: object) -> SecureFedAvg:
    return SecureFedAvg(
        secure_aggregation=SECAGG,
        differential_privacy=DPConfig(
            mode=DPMode.DISTRIBUTED, clipping_norm=1.0, target_epsilon=target_epsilon
        ),
        **options,  # type: ignore[arg-type]
    )


def test_distributed_target_needs_nodes_and_arrays() -> None:
    # Its noise multiplier depends on the round's clients and the model's size.
    strategy = _distributed_strategy(0.01)
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    strategy.check_privacy_target(1)
    strategy.check_privacy_target(1, num_nodes=5)
    strategy.check_privacy_target(1, initial_arrays=initial)

    with pytest.raises(ValueError, match=r"num_rounds must be at least 1\. Found 0\."):
        strategy.check_privacy_target(0)
    with pytest.raises(ValueError, match=r"num_nodes must be at least 1\. Found 0\."):
        strategy.check_privacy_target(1, num_nodes=0, initial_arrays=initial)


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_distributed_target_checked_for_nodes(sampling: str) -> None:
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    options = {"client_sampling": sampling, "fraction_train": 0.5}

    with pytest.raises(
        TargetEpsilonUnreachableError, match=r"target_epsilon 0\.01 over 2 rounds"
    ) as caught:
        _distributed_strategy(0.01, **options).check_privacy_target(
            2, num_nodes=8, initial_arrays=initial
        )
    _distributed_strategy(3.0, **options).check_privacy_target(
        2, num_nodes=8, initial_arrays=initial
    )

    assert caught.value.target_epsilon == 0.01


@pytest.mark.parametrize(
    ("target", "expected"),
    [(3.0, "planned"), (0.05, "planned"), (0.0196, "unreachable")],
)
def test_distributed_target_check_matches_round_one(
    target: float, expected: str
) -> None:
    # The check fails exactly when planning round 1 of the same run does.
    strategy = _distributed_strategy(target, min_train_nodes=4, min_available_nodes=4)
    checked = strategy._privacy(2)
    planned = strategy._privacy(2)
    assert checked is not None
    assert planned is not None

    outcomes = []
    for attempt in (
        lambda: checked.check_target(num_sampled=4, dimension=1000),
        lambda: planned.plan(num_sampled=4, dimension=1000),
    ):
        try:
            attempt()
            outcomes.append("planned")
        except TargetEpsilonUnreachableError:
            outcomes.append("unreachable")

    assert outcomes == [expected, expected]
    assert checked._noise_multiplier is None


@pytest.mark.parametrize(
    ("options", "num_nodes", "message"),
    [
        ({"min_available_nodes": 5}, 3, r"min_available_nodes 5 is above the 3 nodes"),
        ({"fraction_train": 1.0}, 12, r"samples 12 clients per round, more than"),
        (
            {"fraction_train": 0.3, "client_sampling": "poisson"},
            10,
            r"draws fewer than min_train_nodes 2",
        ),
    ],
)
def test_node_count_checked_before_round_one(
    options: dict[str, object], num_nodes: int, message: str
) -> None:
    strategy = SecureFedAvg(
        secure_aggregation=SECAGG,
        **options,  # type: ignore[arg-type]
    )

    with pytest.raises(ValueError, match=message):
        strategy.check_node_count(num_nodes, 5)


@pytest.mark.parametrize("client_sampling", ["fixed", "poisson"])
def test_threshold_above_default_graph_checked_before_round_one(
    client_sampling: str,
) -> None:
    # 10 clients get 5 neighbours by default, so 6 share holders each.
    strategy = SecureFedAvg(
        secure_aggregation=dataclasses.replace(SECAGG, threshold=7),
        fraction_train=1.0 if client_sampling == "fixed" else 0.99,
        client_sampling=client_sampling,
    )

    with pytest.raises(ValueError, match=r"\(neighbours \+ 1 = 6\) for 10 clients"):
        strategy.check_node_count(10, 5)


def test_node_count_that_fits_passes() -> None:
    strategy = SecureFedAvg(
        secure_aggregation=SECAGG,
        min_available_nodes=2,
    )

    strategy.check_node_count(10, 5)
