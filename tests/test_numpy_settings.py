"""Public settings accept numpy scalars as the Python numbers they equal.

Settings often come out of numpy arithmetic. Each one below is built twice,
from Python numbers and from numpy scalars of several widths, and the two
must be equal, with Python types in the fields. The floats are small
integers over powers of two, so float32 represents them exactly. numpy
bools stay rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedsec_flwr import SecAggConfig, SecureFedAvg
from fedsec_flwr.budget import ClientPrivacyBudget
from fedsec_flwr.dp.dpsgd import DPSGDConfig
from fedsec_flwr.privacy import DPConfig, DPMode, ServerPrivacy


def as_numpy(value: object) -> object:
    """Return ``value`` as a numpy scalar: int64 or uint16 for ints, float32 for floats."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return np.uint16(value) if 0 <= value < 2**16 else np.int64(value)
    if isinstance(value, float):
        return np.float32(value)
    return value


SETTINGS: list[tuple[Callable[..., Any], dict[str, object]]] = [
    (
        SecAggConfig,
        {
            "clip_range": 0.5,
            "quantization_bits": 12,
            "max_weight": 100,
            "max_clients": 20,
            "num_neighbours": 9,
            "threshold": 5,
            "stage_timeout": 30.0,
        },
    ),
    (
        DPConfig,
        {
            "mode": DPMode.DISTRIBUTED,
            "clipping_norm": 0.75,
            "target_epsilon": 3.0,
            "delta": 2.0**-14,
            "adaptive_clipping": True,
            "target_quantile": 0.25,
            "clipping_learning_rate": 0.5,
            "quantization_bits": 14,
            "max_dropout_fraction": 0.5,
        },
    ),
    (
        DPSGDConfig,
        {
            "delta": 2.0**-14,
            "target_epsilon": 2.0,
            "num_rounds": 5,
            "max_grad_norm": 1.5,
        },
    ),
    (
        ClientPrivacyBudget,
        {"max_epsilon": 4.0, "delta": 2.0**-14, "min_honest_clients": 3},
    ),
]


@pytest.mark.parametrize(
    ("build", "arguments"), SETTINGS, ids=[build.__name__ for build, _ in SETTINGS]
)
def test_numpy_scalars_equal_python_numbers(
    build: Callable[..., Any], arguments: dict[str, object]
) -> None:
    python = build(**arguments)
    converted = build(**{k: as_numpy(v) for k, v in arguments.items()})

    assert converted == python
    for field in dataclasses.fields(converted):
        value = getattr(converted, field.name)
        assert not isinstance(value, np.generic), field.name


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (SecAggConfig, "max_clients"),
        (lambda **kw: DPConfig(mode="central", noise_multiplier=1.0, **kw), "delta"),
        (lambda **kw: ClientPrivacyBudget(max_epsilon=1.0, **kw), "min_honest_clients"),
    ],
)
def test_numpy_bool_rejected(build: Callable[..., Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be"):
        build(**{name: np.bool_(True)})


def test_strategy_accepts_numpy_scalars() -> None:
    strategy = SecureFedAvg(
        fraction_train=np.float32(0.5),
        min_train_nodes=np.int64(3),
        min_available_nodes=np.int32(4),
        plain_timeout=np.float64(10.0),
    )

    assert (strategy.fraction_train, strategy.min_train_nodes) == (0.5, 3)
    assert type(strategy.min_available_nodes) is int
    assert type(strategy.fraction_train) is float


def test_plan_accepts_numpy_counts() -> None:
    config = DPConfig(mode="distributed", noise_multiplier=2.0)
    privacy = ServerPrivacy(
        config=config, num_rounds=2, sample_rate=1.0, max_clients=10, modulus=2**32
    )

    plan = privacy.plan(num_sampled=np.int64(5), dimension=np.uint32(100))

    assert plan.num_sampled == 5
    assert type(plan.num_sampled) is int


HUGE = 10**400


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: SecAggConfig(stage_timeout=HUGE), "stage_timeout"),
        (
            lambda: DPConfig(mode=DPMode.CENTRAL, noise_multiplier=HUGE),
            "noise_multiplier",
        ),
        (lambda: DPConfig(mode=DPMode.CENTRAL, target_epsilon=HUGE), "target_epsilon"),
        (
            lambda: DPConfig(
                mode=DPMode.CENTRAL, noise_multiplier=1, clipping_norm=HUGE
            ),
            "clipping_norm",
        ),
        (lambda: ClientPrivacyBudget(max_epsilon=HUGE), "max_epsilon"),
        (lambda: DPSGDConfig(noise_multiplier=HUGE, delta=1e-5), "noise_multiplier"),
    ],
)
def test_integer_beyond_float_range_rejected(
    build: Callable[[], object], name: str
) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number within the range"):
        build()


def test_non_bool_policies_rejected() -> None:
    from fedsec_flwr import VerificationConfig
    from fedsec_flwr.mod import make_plain_verification_mod, make_secure_aggregation_mod

    with pytest.raises(ValueError, match="require_verification must be True or"):
        make_secure_aggregation_mod(require_verification="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="require_verification must be True or"):
        make_plain_verification_mod(require_verification="false")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plain_encoding must be a SecAggConfig"):
        VerificationConfig(plain_encoding=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Found numpy\.bool"):
        SecureFedAvg(verification=np.bool_(True))  # type: ignore[arg-type]
