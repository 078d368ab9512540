import math
import re

import numpy as np
import pytest
from scipy import stats

from fedsec_flwr.dp.accounting import GaussianEvent, compute_epsilon
from fedsec_flwr.dp.adaptive import (
    AdaptiveClipping,
    client_bit,
    effective_noise_multiplier,
)
from fedsec_flwr.dp.clipping import clip_update_l2
from fedsec_flwr.dp.random import SecureRandom

LOG_NORM_STD = 0.5


def test_client_bit_threshold() -> None:
    assert client_bit(norm=0.5, clipping_norm=1.0) == 1
    assert client_bit(norm=1.0, clipping_norm=1.0) == 1
    assert client_bit(norm=1.5, clipping_norm=1.0) == 0
    assert client_bit(norm=0.0, clipping_norm=1.0) == 1


def test_zero_update_counts_as_unclipped() -> None:
    update = [np.zeros(10, dtype=np.float32), np.zeros(2, dtype=np.int64)]

    result = clip_update_l2(update, clipping_norm=1.0)

    assert client_bit(norm=result.norm, clipping_norm=1.0) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"norm": -1.0}, r"norm must be finite and non-negative\. Found -1\.0"),
        ({"norm": float("nan")}, r"norm must be finite and non-negative\. Found nan"),
        ({"clipping_norm": 0.0}, r"clipping_norm must be finite and positive"),
    ],
)
def test_client_bit_validation(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        client_bit(**({"norm": 1.0, "clipping_norm": 1.0} | arguments))


def test_geometric_update_formula() -> None:
    state = AdaptiveClipping(clipping_norm=2.0, num_sampled=100)

    new_norm = state.update(noisy_bit_sum=80.0, num_aggregated=100)

    assert new_norm == pytest.approx(2.0 * math.exp(-0.2 * (0.8 - 0.5)))
    assert state.clipping_norm == new_norm


def test_update_grows_norm_when_most_clipped() -> None:
    state = AdaptiveClipping(clipping_norm=1.0, num_sampled=10)

    state.update(noisy_bit_sum=1.0, num_aggregated=10)

    assert state.clipping_norm > 1.0


def test_update_clamps_fraction() -> None:
    high = AdaptiveClipping(clipping_norm=1.0, num_sampled=10)
    low = AdaptiveClipping(clipping_norm=1.0, num_sampled=10)

    high.update(noisy_bit_sum=25.0, num_aggregated=10)
    low.update(noisy_bit_sum=-7.0, num_aggregated=10)

    assert high.clipping_norm == pytest.approx(math.exp(-0.2 * 0.5))
    assert low.clipping_norm == pytest.approx(math.exp(0.2 * 0.5))


def test_defaults() -> None:
    state = AdaptiveClipping(clipping_norm=1.0, num_sampled=40)

    assert state.target_quantile == 0.5
    assert state.learning_rate == 0.2
    assert state.noise_std == pytest.approx(2.0)


def test_noisy_bit_sum_has_configured_std() -> None:
    # Chi-square test of the noise. It fails a correct implementation with
    # probability 1e-6.
    state = AdaptiveClipping(clipping_norm=1.0, num_sampled=60)
    rng = SecureRandom()
    count = 2000

    noise = np.array([state.noisy_bit_sum(30, rng=rng) - 30 for _ in range(count)])
    statistic = float(np.sum(noise**2)) / state.noise_std**2

    assert stats.chi2.ppf(5e-7, df=count) < statistic < stats.chi2.isf(5e-7, df=count)


@pytest.mark.parametrize(
    ("target_quantile", "initial_norm"), [(0.5, 0.1), (0.5, 10.0), (0.8, 0.1)]
)
def test_converges_to_target_quantile(
    target_quantile: float, initial_norm: float
) -> None:
    # Update norms are lognormal, exp(0.5 * N(0, 1)), so the true quantile is
    # exp(0.5 * Phi^-1(gamma)). In 600 simulated runs, the mean log clipping
    # norm of the last 100 rounds had a standard deviation of at most 0.011
    # around the true log quantile. The tolerance of 0.07 is over 6 standard
    # deviations: a false-failure rate near 1e-9 under a normal approximation.
    num_clients, num_rounds = 100, 300
    rng = SecureRandom()
    state = AdaptiveClipping(
        clipping_norm=initial_norm,
        num_sampled=num_clients,
        target_quantile=target_quantile,
    )
    log_norms = []

    for _ in range(num_rounds):
        norms = np.exp(LOG_NORM_STD * rng.normal(num_clients))
        bits = sum(
            client_bit(norm=float(norm), clipping_norm=state.clipping_norm)
            for norm in norms
        )
        state.update(
            noisy_bit_sum=state.noisy_bit_sum(bits, rng=rng),
            num_aggregated=num_clients,
        )
        log_norms.append(math.log(state.clipping_norm))

    true_log_quantile = LOG_NORM_STD * stats.norm.ppf(target_quantile)

    assert abs(np.mean(log_norms[-100:]) - true_log_quantile) < 0.07


def test_effective_noise_multiplier_formula() -> None:
    update_noise = effective_noise_multiplier(noise_multiplier=1.0, bit_noise_std=5.0)

    assert update_noise == pytest.approx(1.0 / math.sqrt(1.0 - 0.01))


def test_effective_noise_multiplier_composes_to_target() -> None:
    # The update sum (z_delta) and the centered bit sum (noise sigma_b,
    # sensitivity 1/2) compose, by their RDP curves alpha / (2 z**2), to one
    # Gaussian with noise multiplier z.
    noise_multiplier, bit_noise_std = 1.3, 2.5
    update_noise = effective_noise_multiplier(
        noise_multiplier=noise_multiplier, bit_noise_std=bit_noise_std
    )
    combined = GaussianEvent(noise_multiplier=noise_multiplier, sample_rate=1.0)
    parts = [
        GaussianEvent(noise_multiplier=update_noise, sample_rate=1.0),
        GaussianEvent(noise_multiplier=2 * bit_noise_std, sample_rate=1.0),
    ]

    assert compute_epsilon(parts, delta=1e-5, accountant="rdp") == pytest.approx(
        compute_epsilon([combined], delta=1e-5, accountant="rdp"), rel=1e-9
    )


@pytest.mark.parametrize("bit_noise_std", [0.5, 0.4])
def test_effective_multiplier_needs_bit_noise(
    bit_noise_std: float,
) -> None:
    with pytest.raises(ValueError, match=r"bit_noise_std must be above noise_mul"):
        effective_noise_multiplier(noise_multiplier=1.0, bit_noise_std=bit_noise_std)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"noise_multiplier": 0.0}, r"noise_multiplier must be finite and positive"),
        ({"bit_noise_std": -1.0}, r"bit_noise_std must be finite and positive"),
    ],
)
def test_effective_noise_multiplier_validation(arguments: dict, message: str) -> None:
    valid = {"noise_multiplier": 1.0, "bit_noise_std": 5.0}

    with pytest.raises(ValueError, match=message):
        effective_noise_multiplier(**(valid | arguments))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"clipping_norm": 0.0}, r"clipping_norm must be finite and positive"),
        ({"num_sampled": 0}, r"num_sampled must be at least 1\. Found 0"),
        ({"num_sampled": 2.5}, r"num_sampled must be an int\. Found 2\.5"),
        ({"target_quantile": 1.5}, r"target_quantile must be in \[0, 1\]"),
        ({"learning_rate": 0.0}, r"learning_rate must be in \(0, 10\]"),
        ({"bit_noise_std": 0.0}, r"bit_noise_std must be finite and positive"),
        (
            {"min_clipping_norm": -1.0},
            r"min_clipping_norm must be at least 0 and at most clipping_norm 1\.0",
        ),
        ({"min_clipping_norm": 2.0}, r"min_clipping_norm must be .* Found 2\.0"),
        ({"min_clipping_norm": math.nan}, r"min_clipping_norm must be .* Found nan"),
    ],
)
def test_state_validation(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveClipping(**({"clipping_norm": 1.0, "num_sampled": 10} | arguments))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"noisy_bit_sum": float("nan")}, r"noisy_bit_sum must be finite\. Found nan"),
        (
            {"num_aggregated": 0},
            r"num_aggregated must be finite and positive\. Found 0",
        ),
        ({"num_aggregated": math.inf}, r"num_aggregated must be finite and positive"),
    ],
)
def test_update_validation(arguments: dict, message: str) -> None:
    state = AdaptiveClipping(clipping_norm=1.0, num_sampled=10)

    with pytest.raises(ValueError, match=message):
        state.update(**({"noisy_bit_sum": 5.0, "num_aggregated": 10} | arguments))
    assert state.clipping_norm == 1.0


def test_clipping_norm_stops_at_floor() -> None:
    state = AdaptiveClipping(
        clipping_norm=1.0, num_sampled=10, learning_rate=10.0, min_clipping_norm=1e-3
    )

    # With every update unclipped, C shrinks by exp(-5), about 0.0067, per round.
    norms = [state.update(noisy_bit_sum=10.0, num_aggregated=10) for _ in range(3)]

    assert norms[0] == pytest.approx(math.exp(-5.0), rel=1e-12, abs=0.0)
    assert norms[1:] == [1e-3, 1e-3]


def test_noisy_bit_sum_rejects_negative() -> None:
    state = AdaptiveClipping(clipping_norm=1.0, num_sampled=10)

    with pytest.raises(ValueError, match=r"bit_sum must be non-negative\. Found -1"):
        state.noisy_bit_sum(-1, rng=SecureRandom())


@pytest.mark.parametrize("learning_rate", [10.5, 1e300, math.inf, math.nan, 0.0])
def test_learning_rate_out_of_range_rejected(learning_rate: float) -> None:
    with pytest.raises(ValueError, match=r"learning_rate must be in \(0, 10\]"):
        AdaptiveClipping(clipping_norm=1.0, num_sampled=10, learning_rate=learning_rate)


def test_dp_config_bounds_clipping_learning_rate() -> None:
    from fedsec_flwr.privacy import DPConfig, DPMode

    with pytest.raises(
        ValueError, match=r"clipping_learning_rate must be in \(0, 10\].*Found 1e\+300"
    ):
        DPConfig(
            mode=DPMode.CENTRAL,
            noise_multiplier=1.0,
            adaptive_clipping=True,
            clipping_learning_rate=1e300,
        )


@pytest.mark.parametrize("value", ["1", None, [1], True])
def test_dp_config_clipping_learning_rate_of_wrong_type(value: object) -> None:
    from fedsec_flwr.privacy import DPConfig, DPMode

    with pytest.raises(
        ValueError,
        match=r"clipping_learning_rate must be a number\. Found "
        + re.escape(repr(value)),
    ):
        DPConfig(
            mode=DPMode.CENTRAL,
            noise_multiplier=1.0,
            adaptive_clipping=True,
            clipping_learning_rate=value,  # type: ignore[arg-type]
        )


def test_norm_leaving_float_range_raises_instead_of_overflowing() -> None:
    clipping = AdaptiveClipping(
        clipping_norm=1e306, num_sampled=10, target_quantile=1.0, learning_rate=10.0
    )

    # Every update clipped: the norm grows by exp(10) and passes 1.8e308.
    with pytest.raises(ValueError, match=r"left the float range.*Lower learning_rate"):
        clipping.update(noisy_bit_sum=0.0, num_aggregated=10)

    assert clipping.clipping_norm == 1e306
