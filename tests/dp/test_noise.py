import math

import numpy as np
import pytest
from scipy import stats

from fedsec_flwr.dp.clipping import clip_update_l2
from fedsec_flwr.dp.noise import (
    MAX_DISCRETE_SIGMA,
    add_gaussian_noise,
    central_noise_std,
    discrete_gaussian_pmf,
    discrete_gaussian_variance,
    distributed_noise_headroom,
    distributed_noise_scale,
    effective_distributed_sigma,
    sample_discrete_gaussian,
)
from fedsec_flwr.dp.random import SecureRandom

# Every statistical check below fails a correct implementation with
# probability 1e-6 (two-sided checks split it between both tails).
FALSE_FAILURE_RATE = 1e-6
Z_LIMIT = stats.norm.isf(FALSE_FAILURE_RATE / 2)
NUM_COORDINATES = 100_000


def assert_variance_matches(values: np.ndarray, variance: float) -> None:
    """Chi-square test of sum(x**2) / variance for zero-mean Gaussian values."""
    count = values.size
    statistic = float(np.sum(values.astype(np.float64) ** 2)) / variance
    low = stats.chi2.ppf(FALSE_FAILURE_RATE / 2, df=count)
    high = stats.chi2.isf(FALSE_FAILURE_RATE / 2, df=count)

    assert low < statistic < high


# --- central noise -----------------------------------------------------------


def test_central_noise_std_formula() -> None:
    std = central_noise_std(noise_multiplier=1.1, clipping_norm=2.0, num_aggregated=10)

    assert std == pytest.approx(0.22)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"noise_multiplier": 0.0}, r"noise_multiplier must be finite and positive"),
        ({"noise_multiplier": -1.0}, r"noise_multiplier must be finite and positive"),
        ({"clipping_norm": 0.0}, r"clipping_norm must be finite and positive"),
        ({"num_aggregated": 0}, r"num_aggregated must be at least 1\. Found 0"),
        ({"num_aggregated": 2.0}, r"num_aggregated must be an int\. Found 2\.0"),
        ({"num_aggregated": True}, r"num_aggregated must be an int\. Found True"),
    ],
)
def test_central_noise_std_validation(arguments: dict, message: str) -> None:
    valid = {"noise_multiplier": 1.0, "clipping_norm": 1.0, "num_aggregated": 3}

    with pytest.raises(ValueError, match=message):
        central_noise_std(**(valid | arguments))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_update_noise_std(dtype: type) -> None:
    std = 0.7
    update = [np.zeros(NUM_COORDINATES, dtype=dtype)]

    noisy = add_gaussian_noise(update, std=std, rng=SecureRandom())

    assert noisy[0].dtype == dtype
    assert not np.array_equal(noisy[0], update[0])
    assert_variance_matches(noisy[0], std**2)


def test_noise_mean_is_zero() -> None:
    std = 2.0
    noisy = add_gaussian_noise(
        [np.zeros(NUM_COORDINATES)], std=std, rng=SecureRandom()
    )[0]

    z_score = noisy.mean() / (std / math.sqrt(NUM_COORDINATES))

    assert abs(z_score) < Z_LIMIT


def test_noise_leaves_integer_arrays_untouched() -> None:
    counter = np.array(42, dtype=np.int64)
    flags = np.array([True, False])
    weights = np.zeros((3, 4), dtype=np.float16)

    noisy = add_gaussian_noise([weights, counter, flags], std=1.0, rng=SecureRandom())

    assert noisy[1] is counter
    assert noisy[2] is flags
    assert noisy[0].dtype == np.float16
    assert noisy[0].shape == (3, 4)
    assert np.any(noisy[0] != 0)


def test_noise_keeps_zero_dimensional_arrays() -> None:
    noisy = add_gaussian_noise([np.array(1.0)], std=1.0, rng=SecureRandom())

    assert isinstance(noisy[0], np.ndarray)
    assert noisy[0].shape == ()


def test_central_noise_added_once_to_average() -> None:
    noise_multiplier, clipping_norm, num_clients = 1.2, 0.5, 8
    updates = [
        clip_update_l2([np.zeros(NUM_COORDINATES, dtype=np.float32)], clipping_norm=1.0)
        for _ in range(num_clients)
    ]
    average = np.mean([result.arrays[0] for result in updates], axis=0)
    std = central_noise_std(
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        num_aggregated=num_clients,
    )

    noisy = add_gaussian_noise([average], std=std, rng=SecureRandom())[0]

    assert_variance_matches(
        noisy, (noise_multiplier * clipping_norm / num_clients) ** 2
    )


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan")])
def test_noise_invalid_std(std: float) -> None:
    with pytest.raises(ValueError, match=r"std must be finite and positive"):
        add_gaussian_noise([np.zeros(3)], std=std, rng=SecureRandom())


def test_noise_rejects_nan_input() -> None:
    with pytest.raises(ValueError, match=r"update\[0\] must contain only finite"):
        add_gaussian_noise([np.array([np.nan])], std=1.0, rng=SecureRandom())


# --- discrete Gaussian -------------------------------------------------------


def exact_moments(sigma: float) -> tuple[float, float]:
    support = np.arange(-int(15 * sigma) - 3, int(15 * sigma) + 4)
    pmf = discrete_gaussian_pmf(sigma, support)
    second = float(np.sum(pmf * support**2.0))
    fourth = float(np.sum(pmf * support**4.0))
    return second, fourth


def test_discrete_gaussian_dtype_and_shape() -> None:
    samples = sample_discrete_gaussian((4, 5), sigma=3.0, rng=SecureRandom())

    assert samples.dtype == np.int64
    assert samples.shape == (4, 5)


@pytest.mark.parametrize("sigma", [0.8, 2.0, 7.5])
def test_discrete_gaussian_matches_pmf(sigma: float) -> None:
    samples = sample_discrete_gaussian(200_000, sigma=sigma, rng=SecureRandom())
    wide = np.arange(-int(15 * sigma) - 3, int(15 * sigma) + 4)
    wide_pmf = discrete_gaussian_pmf(sigma, wide)
    # One bin per value with an expected count of at least 20. The two
    # outermost bins also take the tails beyond them.
    frequent = wide[samples.size * wide_pmf >= 20]
    low, high = int(frequent[0]), int(frequent[-1])
    observed = [np.sum(samples <= low)]
    observed += [np.sum(samples == k) for k in range(low + 1, high)]
    observed += [np.sum(samples >= high)]
    probabilities = [wide_pmf[wide <= low].sum()]
    probabilities += [wide_pmf[wide == k].sum() for k in range(low + 1, high)]
    probabilities += [wide_pmf[wide >= high].sum()]
    expected = samples.size * np.array(probabilities)

    statistic = float(np.sum((np.array(observed) - expected) ** 2 / expected))

    assert statistic < stats.chi2.isf(FALSE_FAILURE_RATE, df=len(observed) - 1)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 40.0])
def test_discrete_gaussian_variance_and_mean(sigma: float) -> None:
    count = 200_000
    samples = sample_discrete_gaussian(count, sigma=sigma, rng=SecureRandom())
    second, fourth = exact_moments(sigma)
    squares = samples.astype(np.float64) ** 2

    variance_z = (squares.mean() - second) / math.sqrt((fourth - second**2) / count)
    mean_z = samples.mean() / math.sqrt(second / count)

    assert abs(variance_z) < Z_LIMIT
    assert abs(mean_z) < Z_LIMIT


def test_discrete_gaussian_symmetric() -> None:
    samples = sample_discrete_gaussian(200_000, sigma=5.0, rng=SecureRandom())
    positive = int(np.sum(samples > 0))
    negative = int(np.sum(samples < 0))

    result = stats.binomtest(positive, positive + negative, p=0.5)

    assert result.pvalue > FALSE_FAILURE_RATE


def test_discrete_gaussian_large_sigma() -> None:
    sigma = 1e6
    samples = sample_discrete_gaussian(NUM_COORDINATES, sigma=sigma, rng=SecureRandom())

    # The discrete Gaussian with sigma 1e6 has the normal's variance and
    # kurtosis to float64 precision, so the chi-square test applies.
    assert_variance_matches(samples, sigma**2)


def test_discrete_gaussian_variance_limits() -> None:
    assert discrete_gaussian_variance(3.0) == pytest.approx(9.0, rel=1e-12)
    assert discrete_gaussian_variance(50.0) == pytest.approx(2500.0, rel=1e-12)
    assert discrete_gaussian_variance(1e5) == 1e10
    assert discrete_gaussian_variance(0.5) < 0.25


def test_discrete_gaussian_variance_small_sigma() -> None:
    # Only 0 and +-1 carry mass: Var = 2 w / (1 + 2 w) with w = exp(-1 / (2 sigma**2)).
    sigma = 0.2
    weight = math.exp(-1 / (2 * sigma**2))

    assert discrete_gaussian_variance(sigma) == pytest.approx(
        2 * weight / (1 + 2 * weight), rel=1e-9
    )


@pytest.mark.parametrize("sigma", [0.0, -2.0, float("nan"), float("inf")])
def test_discrete_gaussian_invalid_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match=r"sigma must be finite and positive"):
        sample_discrete_gaussian(3, sigma=sigma, rng=SecureRandom())


def test_discrete_gaussian_sigma_too_large() -> None:
    with pytest.raises(ValueError, match=r"sigma must be at most"):
        sample_discrete_gaussian(3, sigma=2 * MAX_DISCRETE_SIGMA, rng=SecureRandom())


# --- distributed noise -------------------------------------------------------


def test_distributed_noise_scale_formula() -> None:
    sigma_client = distributed_noise_scale(
        noise_multiplier=1.0,
        clipping_norm=0.5,
        quantization_scale=1000.0,
        num_clients=25,
    )

    assert sigma_client == pytest.approx(100.0)


def test_client_noise_sum_std() -> None:
    num_clients, noise_multiplier, clipping_norm, scale = 10, 1.0, 0.2, 1000.0
    sigma_client = distributed_noise_scale(
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        quantization_scale=scale,
        num_clients=num_clients,
    )
    rng = SecureRandom()

    total = sum(
        sample_discrete_gaussian(NUM_COORDINATES, sigma=sigma_client, rng=rng)
        for _ in range(num_clients)
    )

    assert_variance_matches(total, (noise_multiplier * clipping_norm * scale) ** 2)


def test_dropouts_reduce_effective_sigma() -> None:
    planned = effective_distributed_sigma(sigma_client=10.0, num_survivors=10)
    after_dropouts = effective_distributed_sigma(sigma_client=10.0, num_survivors=2)

    assert planned == pytest.approx(10.0 * math.sqrt(10))
    assert after_dropouts == pytest.approx(10.0 * math.sqrt(2))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sigma_client": 0.0}, r"sigma_client must be finite and positive"),
        ({"num_survivors": 0}, r"num_survivors must be at least 1\. Found 0"),
    ],
)
def test_effective_sigma_validation(arguments: dict, message: str) -> None:
    valid = {"sigma_client": 1.0, "num_survivors": 3}

    with pytest.raises(ValueError, match=message):
        effective_distributed_sigma(**(valid | arguments))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"noise_multiplier": 0.0}, r"noise_multiplier must be finite and positive"),
        ({"clipping_norm": -1.0}, r"clipping_norm must be finite and positive"),
        ({"quantization_scale": 0.0}, r"quantization_scale must be finite and pos"),
        ({"num_clients": 0}, r"num_clients must be at least 1\. Found 0"),
    ],
)
def test_distributed_noise_scale_validation(arguments: dict, message: str) -> None:
    valid = {
        "noise_multiplier": 1.0,
        "clipping_norm": 1.0,
        "quantization_scale": 10.0,
        "num_clients": 3,
    }

    with pytest.raises(ValueError, match=message):
        distributed_noise_scale(**(valid | arguments))


def test_headroom_formula() -> None:
    bound = distributed_noise_headroom(
        sigma_client=10.0, num_clients=4, num_coordinates=1000
    )
    expected = 10.0 * math.sqrt(2 * 4 * (math.log(2 * 1000) + 40 * math.log(2)))

    assert bound == math.ceil(expected)


def test_headroom_grows_with_clients_and_coordinates() -> None:
    base = {"sigma_client": 5.0, "num_clients": 4, "num_coordinates": 100}

    bound = distributed_noise_headroom(**base)

    assert distributed_noise_headroom(**(base | {"num_clients": 8})) > bound
    assert distributed_noise_headroom(**(base | {"num_coordinates": 10**6})) > bound
    assert distributed_noise_headroom(**(base | {"failure_probability": 1e-3})) < bound


def test_headroom_holds_empirically() -> None:
    # With failure probability 0.01 per coordinate, the exceedance count is at
    # most Binomial(n, 0.01), and the check allows its 1 - 1e-6 quantile.
    num_clients, sigma_client, probability = 4, 3.0, 0.01
    bound = distributed_noise_headroom(
        sigma_client=sigma_client,
        num_clients=num_clients,
        num_coordinates=1,
        failure_probability=probability,
    )
    rng = SecureRandom()
    total = sum(
        sample_discrete_gaussian(NUM_COORDINATES, sigma=sigma_client, rng=rng)
        for _ in range(num_clients)
    )

    exceed = int(np.sum(np.abs(total) >= bound))

    assert exceed <= stats.binom.isf(FALSE_FAILURE_RATE, NUM_COORDINATES, probability)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sigma_client": -1.0}, r"sigma_client must be finite and positive"),
        ({"num_clients": 0}, r"num_clients must be at least 1"),
        ({"num_coordinates": 0}, r"num_coordinates must be at least 1"),
        ({"failure_probability": 0.0}, r"failure_probability must be in \(0, 1\)"),
        ({"failure_probability": 1.0}, r"failure_probability must be in \(0, 1\)"),
    ],
)
def test_headroom_validation(arguments: dict, message: str) -> None:
    valid = {"sigma_client": 1.0, "num_clients": 3, "num_coordinates": 10}

    with pytest.raises(ValueError, match=message):
        distributed_noise_headroom(**(valid | arguments))
