"""SecAggConfig and SecureFedAvg reject bad parameters when constructed."""

from __future__ import annotations

import logging
import math

import pytest

from fedsec_flwr import (
    DPConfig,
    DPMode,
    SecAggConfig,
    SecureFedAvg,
    VerificationConfig,
)


@pytest.mark.parametrize("clip_range", [0.0, -1.0, math.nan, math.inf])
def test_clip_range_rejected(clip_range: float) -> None:
    with pytest.raises(ValueError, match=f"clip_range must be .* Found {clip_range!r}"):
        SecAggConfig(clip_range=clip_range)


@pytest.mark.parametrize("modulus", [3, 1000, 2**32 + 1, 2**40])
def test_modulus_not_power_of_two_rejected(modulus: int) -> None:
    with pytest.raises(ValueError, match=f"modulus must be a power of two.*{modulus}"):
        SecAggConfig(modulus=modulus)


def test_modulus_not_above_levels_rejected() -> None:
    with pytest.raises(ValueError, match="below the modulus 4096"):
        SecAggConfig(modulus=2**12, quantization_bits=12, max_weight=1, max_clients=2)


@pytest.mark.parametrize("threshold", [1, 0, -3])
def test_threshold_below_two_rejected(threshold: int) -> None:
    with pytest.raises(
        ValueError, match=f"threshold must be .* at least 2. Found {threshold}"
    ):
        SecAggConfig(threshold=threshold)


def test_threshold_above_holders_rejected() -> None:
    with pytest.raises(ValueError, match=r"num_neighbours \+ 1 = 4\)\. Found 5"):
        SecAggConfig(num_neighbours=3, threshold=5)


def test_worst_case_wrap_rejected() -> None:
    with pytest.raises(ValueError, match="would wrap the modulus"):
        SecAggConfig(max_clients=50, max_weight=60_000, quantization_bits=16)


def test_no_level_fits_rejected() -> None:
    with pytest.raises(ValueError, match="would wrap the modulus"):
        SecAggConfig(max_clients=100_000, max_weight=100_000)


@pytest.mark.parametrize("timeout", [0.0, -1.0, math.nan, math.inf])
def test_stage_timeout_rejected(timeout: float) -> None:
    with pytest.raises(ValueError, match="stage_timeout must be a finite number"):
        SecAggConfig(stage_timeout=timeout)


@pytest.mark.parametrize("name", ["max_weight", "max_clients", "num_neighbours"])
def test_non_integer_counts_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
        SecAggConfig(**{name: 2.5})  # type: ignore[arg-type]


def test_automatic_bits_fill_the_modulus() -> None:
    config = SecAggConfig(max_clients=10, max_weight=1000)

    levels = config.encoding().quantization_levels

    assert 10 * 1000 * (levels - 1) < 2**32
    assert 10 * 1000 * (2 * levels - 1) >= 2**32


def test_automatic_bits_capped_at_24() -> None:
    config = SecAggConfig(max_clients=2, max_weight=1)

    assert config.encoding().quantization_levels == 2**24


def test_strategy_rejects_bad_fraction() -> None:
    with pytest.raises(
        ValueError, match=r"fraction_train must be in \(0, 1\]\. Found 0\.0"
    ):
        SecureFedAvg(fraction_train=0.0)


def test_strategy_needs_two_clients_for_secure_aggregation() -> None:
    with pytest.raises(ValueError, match="min_train_nodes must be at least 2"):
        SecureFedAvg(min_train_nodes=1, min_available_nodes=1)


def test_plain_mode_is_explicit() -> None:
    assert SecureFedAvg().secure_aggregation is not None
    assert SecureFedAvg(secure_aggregation=None).secure_aggregation is None


def test_threshold_above_max_clients_rejected() -> None:
    with pytest.raises(ValueError, match="threshold must not exceed max_clients 10"):
        SecAggConfig(max_clients=10, threshold=50)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clip_range": True}, "clip_range must be a number. Found True"),
        ({"clip_range": "1.0"}, "clip_range must be a number. Found '1.0'"),
        ({"clip_range": None}, "clip_range must be a number. Found None"),
        ({"stage_timeout": True}, "stage_timeout must be .* Found True"),
        ({"stage_timeout": "5"}, "stage_timeout must be .* Found '5'"),
    ],
)
def test_secagg_config_wrong_types_rejected(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SecAggConfig(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secure_aggregation": True}, "secure_aggregation must be a SecAggConfig"),
        (
            {"differential_privacy": "central"},
            "differential_privacy must be a DPConfig",
        ),
        (
            {"verification": "yes"},
            "verification must be a bool or a VerificationConfig",
        ),
        ({"on_round_end": 5}, "on_round_end must be callable"),
        ({"rng": 7}, "rng must be a random.Random"),
        ({"fraction_train": True}, "fraction_train must be in"),
        ({"min_train_nodes": 2.5}, "min_train_nodes must be an int"),
        ({"min_train_nodes": math.nan}, "min_train_nodes must be an int"),
        ({"min_available_nodes": True}, "min_available_nodes must be an int"),
        ({"plain_timeout": -1}, "plain_timeout must be .* Found -1"),
        ({"plain_timeout": math.nan}, "plain_timeout must be .* Found nan"),
        ({"plain_timeout": math.inf}, "plain_timeout must be .* Found inf"),
        ({"plain_timeout": "5"}, "plain_timeout must be .* Found '5'"),
        (
            {
                "secure_aggregation": SecAggConfig(max_clients=10),
                "min_train_nodes": 11,
                "min_available_nodes": 11,
            },
            "min_train_nodes must not exceed secure_aggregation.max_clients 10",
        ),
    ],
)
def test_strategy_wrong_arguments_rejected(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SecureFedAvg(**changes)  # type: ignore[arg-type]


def test_few_automatic_levels_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedsec_flwr.config"):
        SecureFedAvg(secure_aggregation=SecAggConfig(max_weight=20_000_000))
        SecureFedAvg(secure_aggregation=SecAggConfig())

    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "leaves 2 quantization levels" in warnings[0]
    assert "max_weight 20000000" in warnings[0]


def test_plain_verification_encoding_warns(caplog: pytest.LogCaptureFixture) -> None:
    encoding = SecAggConfig(max_weight=20_000_000)

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr.config"):
        SecureFedAvg(
            secure_aggregation=None,
            verification=VerificationConfig(plain_encoding=encoding),
        )

    assert "leaves 2 quantization levels" in caplog.text


def test_dp_encoding_does_not_warn_about_max_weight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Under DP every update is encoded from the clipping norm with weight 1,
    # so a large max_weight costs no precision.
    secagg = SecAggConfig(max_weight=20_000_000)
    dp = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=1.0, clipping_norm=1.0)

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr.config"):
        SecureFedAvg(secure_aggregation=secagg, differential_privacy=dp)

    assert "quantization levels" not in caplog.text
