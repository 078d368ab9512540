"""Server learning rate and momentum (FedAvgM) in SecureFedAvg.

The loopback clients of ``test_secure_strategy`` add the same update in
every round, so the mean update M is known, and after R rounds with
learning rate eta and momentum beta the model is the initial one plus
eta * M * sum_{r=1}^{R} sum_{k<r} beta**k.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsec_flwr import DPConfig, SecAggConfig, SecureFedAvg, ServerMomentum
from fedsec_flwr.privacy import DPMode
from fedsec_flwr.server_momentum import MomentumState
from tests.loopback import LoopbackGrid
from tests.test_secure_strategy import (
    CONFIG,
    NODE_IDS,
    NUM_NODES,
    client_update,
    expected_model,
    initial_model,
    make_app,
)

FLOAT_KEYS = ("dense.weight", "dense.bias", "bn.scale")


def run_with(
    grid: LoopbackGrid,
    *,
    momentum: ServerMomentum | None,
    rounds: int,
    config: SecAggConfig | None = CONFIG,
    strategy: SecureFedAvg | None = None,
) -> dict[str, np.ndarray]:
    strategy = strategy or SecureFedAvg(
        secure_aggregation=config, rng=random.Random(3), server_momentum=momentum
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}


def momentum_model(
    *, learning_rate: float, momentum: float, rounds: int
) -> dict[str, np.ndarray]:
    """The model after ``rounds`` rounds of the same mean update, in float64."""
    mean_model = expected_model(list(range(NUM_NODES)))
    initial = initial_model()
    factor = learning_rate * sum(
        sum(momentum**k for k in range(r)) for r in range(1, rounds + 1)
    )
    model = dict(initial)
    for key in FLOAT_KEYS:
        mean = mean_model[key].astype(np.float64) - initial[key]
        model[key] = (initial[key] + factor * mean).astype(initial[key].dtype)
    return model


def test_step_folds_each_mean_into_the_velocity() -> None:
    state = MomentumState(ServerMomentum(learning_rate=0.5, momentum=0.8))
    first = np.array([1.0, -2.0])
    second = np.array([0.5, 0.25])

    step_one = state.step(first)
    step_two = state.step(second)

    np.testing.assert_array_equal(step_one, [0.5, -1.0])
    np.testing.assert_allclose(step_two, 0.5 * (0.8 * first + second))
    np.testing.assert_array_equal(first, [1.0, -2.0])


def test_defaults_are_fedavgm() -> None:
    config = ServerMomentum()

    assert (config.learning_rate, config.momentum) == (1.0, 0.9)


def test_numpy_scalars_become_python_numbers() -> None:
    config = ServerMomentum(learning_rate=np.float32(0.5), momentum=np.float64(0.25))

    assert type(config.learning_rate) is float
    assert type(config.momentum) is float


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", 0.0),
        ("learning_rate", -1.0),
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("learning_rate", True),
        ("learning_rate", "1"),
        ("momentum", -0.1),
        ("momentum", 1.0),
        ("momentum", float("nan")),
        ("momentum", False),
        ("momentum", None),
    ],
)
def test_invalid_values_rejected_with_name_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must .* Found {value!r}\.$"):
        ServerMomentum(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (np.zeros(3, dtype=np.float32), "dtype float32"),
        (np.zeros((2, 2)), r"shape \(2, 2\)"),
        (np.zeros(4), "must have 3 values.*Found 4"),
    ],
)
def test_step_rejects_other_updates(update: np.ndarray, message: str) -> None:
    state = MomentumState(ServerMomentum())
    state.step(np.zeros(3))

    with pytest.raises(ValueError, match=message):
        state.step(update)


@pytest.mark.parametrize("secure", [True, False])
def test_rounds_follow_the_momentum_formula(secure: bool) -> None:
    grid = LoopbackGrid(make_app(secure=secure), NODE_IDS)
    config = CONFIG if secure else None

    model = run_with(
        grid,
        momentum=ServerMomentum(learning_rate=0.5, momentum=0.5),
        rounds=3,
        config=config,
    )

    expected = momentum_model(learning_rate=0.5, momentum=0.5, rounds=3)
    # Each round's mean is within one quantization step of the exact mean,
    # and the three steps add up at most 0.5 * (1 + 1.5 + 1.75) of them.
    tolerance = 2.5 * CONFIG.encoding().step + 1e-6
    for key, value in expected.items():
        assert model[key].dtype == value.dtype, key
        np.testing.assert_allclose(model[key], value, atol=tolerance, err_msg=key)
    without = momentum_model(learning_rate=1.0, momentum=0.0, rounds=3)
    assert not np.allclose(model["dense.weight"], without["dense.weight"], atol=0.01)


# Plain mode, because secure rounds round stochastically and differ by a
# quantization step from one run to the next.
def test_unit_rate_without_momentum_is_fedavg() -> None:
    plain = run_with(
        LoopbackGrid(make_app(secure=False), NODE_IDS),
        momentum=None,
        rounds=2,
        config=None,
    )

    same = run_with(
        LoopbackGrid(make_app(secure=False), NODE_IDS),
        momentum=ServerMomentum(learning_rate=1.0, momentum=0.0),
        rounds=2,
        config=None,
    )

    for key, value in plain.items():
        np.testing.assert_array_equal(same[key], value, err_msg=key)


def test_velocity_starts_again_with_each_run() -> None:
    momentum = ServerMomentum(learning_rate=1.0, momentum=0.9)
    strategy = SecureFedAvg(
        secure_aggregation=None, rng=random.Random(3), server_momentum=momentum
    )
    grid = LoopbackGrid(make_app(secure=False), NODE_IDS)
    first = run_with(grid, momentum=None, rounds=2, strategy=strategy)

    second = run_with(grid, momentum=None, rounds=2, strategy=strategy)

    # The sample's order, and so the order of the sum, may differ.
    for key, value in first.items():
        np.testing.assert_allclose(second[key], value, rtol=1e-12, err_msg=key)


def test_central_dp_noise_passes_through_momentum() -> None:
    dp = DPConfig(mode=DPMode.CENTRAL, clipping_norm=10.0, noise_multiplier=1e-3)
    strategy = SecureFedAvg(
        secure_aggregation=CONFIG,
        rng=random.Random(3),
        differential_privacy=dp,
        server_momentum=ServerMomentum(learning_rate=1.0, momentum=0.5),
        min_train_nodes=NUM_NODES,
        min_available_nodes=NUM_NODES,
    )

    model = run_with(
        LoopbackGrid(make_app(), NODE_IDS), momentum=None, rounds=2, strategy=strategy
    )

    # Under DP every client weighs the same: the mean is the plain mean.
    initial = initial_model()
    for key in FLOAT_KEYS:
        updates = [
            np.asarray(client_update(partition)[key], dtype=np.float64)
            for partition in range(NUM_NODES)
        ]
        mean = np.mean(updates, axis=0)
        expected = initial[key] + (1.0 + 1.5) * mean
        np.testing.assert_allclose(model[key], expected, atol=0.02, err_msg=key)


def test_verification_rejected() -> None:
    with pytest.raises(ValueError, match="server_momentum cannot be combined") as info:
        SecureFedAvg(
            secure_aggregation=CONFIG,
            verification=True,
            server_momentum=ServerMomentum(momentum=0.5),
        )

    assert "momentum=0.5" in str(info.value)


def test_other_type_rejected() -> None:
    with pytest.raises(ValueError, match=r"server_momentum must be a ServerMomentum"):
        SecureFedAvg(server_momentum=0.9)  # type: ignore[arg-type]
