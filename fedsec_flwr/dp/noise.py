"""Gaussian noise for central DP and discrete Gaussian noise for distributed DP.

Central DP: the server adds continuous Gaussian noise once, to the unmasked
average of clipped updates (`central_noise_std`, `add_gaussian_noise`).

Distributed DP: each client adds discrete Gaussian noise to its quantized
update before secure aggregation, so the server receives only the noisy sum
(`sample_discrete_gaussian`, `distributed_noise_scale`). The noise of the
clients that survive a round adds up to the central noise
(`effective_distributed_sigma`), and `distributed_noise_headroom` bounds the
summed noise so the modular encoding can reserve room for it.

All noise comes from a `SecureRandom`, and this module never uses NumPy's
global generator. Noise values are never logged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .clipping import is_float_array, validate_update
from .random import SecureRandom, Size, as_shape

MAX_DISCRETE_SIGMA = 2.0**40
"""Largest sigma accepted by `sample_discrete_gaussian`.

Candidates stay below 37 * (sigma + 1), under 2**46, and float64 represents
every integer up to 2**53 exactly. So the sampler's float64 steps never round
a candidate.
"""

HEADROOM_FAILURE_PROBABILITY = 2.0**-40
"""Default probability that summed noise exceeds `distributed_noise_headroom`."""

_EXACT_VARIANCE_MAX_SIGMA = 100.0
_VARIANCE_TAIL_WIDTH = 12.0
# Fraction of candidates that survive both rejection steps, rounded down. It
# only sizes the batches. Measured with 2e5 candidates: 0.31 at sigma 0.1,
# 0.35 at sigma 1 and 0.48 for sigma from 10 to 10**6.
_MIN_ACCEPTANCE = 0.3
_EXTRA_CANDIDATES = 16


def central_noise_std(
    *, noise_multiplier: float, clipping_norm: float, num_aggregated: int
) -> float:
    """Compute the noise standard deviation for the average of clipped updates.

    Adding or removing one client changes the sum of updates clipped to L2
    norm C by at most C, so the sum needs noise with standard deviation
    z * C for noise multiplier z. The average divides the noisy sum by m,
    which gives std = z * C / m, added once.

    NOTE: The division by m is post-processing only if m is not private. m
    must be the denominator that the average uses: the number of updates
    averaged, or a fixed public one such as the expected number of clients,
    which reveals nothing.

    Args:
        noise_multiplier: z, the noise standard deviation over the L2
            sensitivity of the sum, positive.
        clipping_norm: C, the L2 norm bound of each update, positive.
        num_aggregated: m, the denominator of the average, at least 1.

    Returns:
        The standard deviation z * C / m.

    Raises:
        ValueError: If an argument is out of range.

    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("clipping_norm", clipping_norm)
    _check_positive_int("num_aggregated", num_aggregated)

    return noise_multiplier * clipping_norm / num_aggregated


def add_gaussian_noise(
    arrays: Sequence[npt.NDArray[np.generic]], *, std: float, rng: SecureRandom
) -> list[npt.NDArray[np.generic]]:
    """Add independent N(0, std**2) noise to every floating-point array.

    Noise is drawn and added in float64 and the sum is cast back to each
    array's dtype. Integer and bool arrays are returned unchanged, because
    they are neither clipped nor protected (see `fedsec_flwr.dp.clipping`).

    Args:
        arrays: The arrays of a model or an aggregate.
        std: Standard deviation of the noise, finite and positive.
        rng: Source of the noise.

    Returns:
        New arrays for the floating-point inputs, the input objects for the
        others, in the input order.

    Raises:
        ValueError: If `std` is not finite and positive or an array is
            invalid (see `fedsec_flwr.dp.clipping.validate_update`).

    """
    _check_positive("std", std)
    inputs = [np.asarray(array) for array in arrays]
    validate_update(inputs)

    noisy: list[npt.NDArray[np.generic]] = []
    for array in inputs:
        if not is_float_array(array):
            noisy.append(array)
            continue
        values = np.asarray(array, dtype=np.float64) + rng.normal(array.shape, std=std)
        noisy.append(np.asarray(values.astype(array.dtype)))

    return noisy


def sample_discrete_gaussian(
    size: Size, *, sigma: float, rng: SecureRandom
) -> npt.NDArray[np.int64]:
    """Draw from the discrete Gaussian N_Z(0, sigma**2).

    N_Z(0, sigma**2) gives each integer x the probability
    exp(-x**2 / (2 sigma**2)) / sum_y exp(-y**2 / (2 sigma**2)). Its variance
    is at most sigma**2 and equals sigma**2 to float64 precision for
    sigma >= 3 (see `discrete_gaussian_variance`).

    The sampler follows Canonne, Kamath and Steinke (2020, "The Discrete
    Gaussian for Differential Privacy"), vectorized with batch rejection.
    With t = floor(sigma) + 1:

    1. Draw a discrete Laplace candidate Y with P(Y = y) proportional to
       exp(-|y| / t): U uniform in {0, ..., t - 1}, kept with probability
       exp(-U / t), V geometric with P(V >= v) = exp(-v), X = U + t * V,
       and a random sign, rejecting the negative zero.
    2. Keep Y with probability exp(-(|Y| - sigma**2 / t)**2 / (2 sigma**2)).

    Rejected candidates are replaced by a new batch until every output is
    filled.

    Floating-point parts: U and the sign are exact integers from
    `SecureRandom.integers` and `bits`. The two acceptance probabilities are
    computed with float64 `exp` and compared with 53-bit uniforms, and V is
    floor(-log(1 - W)) for a 53-bit uniform W. Each of these probabilities
    is off by a few units of 2**-53, so the output distribution differs from
    N_Z(0, sigma**2) by a total variation distance of the same order per
    draw (an estimate, not a proven bound). The paper's sampler is exact
    because it uses rational arithmetic, which NumPy cannot vectorize.

    Args:
        size: Output shape, an int or a tuple of ints.
        sigma: Scale parameter, positive and at most `MAX_DISCRETE_SIGMA`.
        rng: Source of randomness.

    Returns:
        Array of dtype int64 and shape `size`.

    Raises:
        ValueError: If `sigma` is out of range.

    """
    _check_positive("sigma", sigma)
    if sigma > MAX_DISCRETE_SIGMA:
        raise ValueError(
            f"sigma must be at most {MAX_DISCRETE_SIGMA:.0f}. Found {sigma}."
        )
    shape = as_shape(size)
    count = math.prod(shape)

    laplace_scale = math.floor(sigma) + 1
    output = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        missing = count - filled
        num_candidates = math.ceil(missing / _MIN_ACCEPTANCE) + _EXTRA_CANDIDATES
        candidates = _sample_discrete_laplace(
            num_candidates, scale=laplace_scale, rng=rng
        )
        accepted = _gaussian_rejection(
            candidates, sigma=sigma, scale=laplace_scale, rng=rng
        )
        new_samples = accepted[:missing]
        output[filled : filled + new_samples.size] = new_samples
        filled += new_samples.size

    return output.reshape(shape)


def discrete_gaussian_variance(sigma: float) -> float:
    """Compute the variance of N_Z(0, sigma**2) from its probability mass function.

    For sigma <= 100 the pmf is summed over |x| <= 12 sigma + 2, which leaves
    out a relative mass below exp(-72). For larger sigma the function
    returns sigma**2: by the Poisson summation formula the relative
    difference is of order sigma**2 * exp(-2 pi**2 sigma**2), below 1e-300.

    Args:
        sigma: Scale parameter, positive.

    Returns:
        The variance, at most sigma**2.

    Raises:
        ValueError: If `sigma` is not finite and positive.

    """
    _check_positive("sigma", sigma)
    if sigma > _EXACT_VARIANCE_MAX_SIGMA:
        return sigma**2

    support, weights = _discrete_gaussian_weights(sigma)

    return float(np.sum(weights * support.astype(np.float64) ** 2) / np.sum(weights))


def discrete_gaussian_pmf(
    sigma: float, support: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """Compute P(X = x) for X ~ N_Z(0, sigma**2) at each x of `support`.

    The normalizing constant is summed over |x| <= 12 sigma + 2, which leaves
    out a relative mass below exp(-72).

    Args:
        sigma: Scale parameter, positive and at most 100.
        support: Integers at which to evaluate the pmf.

    Returns:
        Array of probabilities with the shape of `support`.

    Raises:
        ValueError: If `sigma` is out of range.

    """
    _check_positive("sigma", sigma)
    if sigma > _EXACT_VARIANCE_MAX_SIGMA:
        raise ValueError(
            f"sigma must be at most {_EXACT_VARIANCE_MAX_SIGMA}. Found {sigma}."
        )

    _, weights = _discrete_gaussian_weights(sigma)
    values = np.asarray(support, dtype=np.float64)

    return np.exp(-(values**2) / (2.0 * sigma**2)) / np.sum(weights)


def distributed_noise_scale(
    *,
    noise_multiplier: float,
    clipping_norm: float,
    quantization_scale: float,
    num_clients: int,
) -> float:
    """Compute each client's discrete Gaussian sigma for distributed DP.

    The target is central noise on the sum of updates with standard deviation
    z * C in model units, which is sigma_total = z * C * s in the integer
    domain for quantization scale s (integers per model unit). Independent
    noise adds in variance, so m clients each adding sigma_client =
    sigma_total / sqrt(m) give the sum a variance of sigma_total**2 when
    sigma_client >= 3 (see `discrete_gaussian_variance` below that).

    The quantized update's L2 norm can exceed C * s because of rounding, so
    the privacy of the result must be computed with
    `fedsec_flwr.dp.accounting.distributed_discrete_gaussian_epsilon`, not
    read off z.

    Args:
        noise_multiplier: z, the target central noise multiplier, positive.
        clipping_norm: C, the L2 norm bound of each update in model units,
            positive.
        quantization_scale: s, the factor that maps model units to integers
            before rounding, positive.
        num_clients: m, the number of clients expected to add noise, at
            least 1.

    Returns:
        sigma_client in integer units.

    Raises:
        ValueError: If an argument is out of range.

    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("clipping_norm", clipping_norm)
    _check_positive("quantization_scale", quantization_scale)
    _check_positive_int("num_clients", num_clients)

    sigma_total = noise_multiplier * clipping_norm * quantization_scale

    return sigma_total / math.sqrt(num_clients)


def effective_distributed_sigma(*, sigma_client: float, num_survivors: int) -> float:
    """Compute the standard deviation of the noise summed over surviving clients.

    Only clients whose masked input enters the sum contribute noise. With m'
    survivors each adding N_Z(0, sigma_client**2), the sum has standard
    deviation sigma_client * sqrt(m') (exactly, for sigma_client >= 3). When
    clients drop out, m' is below the number planned and the noise is
    smaller, so the guarantee of the round follows from m', not from the plan.

    Args:
        sigma_client: Each client's sigma in integer units, positive.
        num_survivors: m', the number of clients whose noise is in the sum,
            at least 1.

    Returns:
        sigma_client * sqrt(m').

    Raises:
        ValueError: If an argument is out of range.

    """
    _check_positive("sigma_client", sigma_client)
    _check_positive_int("num_survivors", num_survivors)

    return sigma_client * math.sqrt(num_survivors)


def distributed_noise_headroom(
    *,
    sigma_client: float,
    num_clients: int,
    num_coordinates: int,
    failure_probability: float = HEADROOM_FAILURE_PROBABILITY,
) -> int:
    """Bound the summed noise of every coordinate with high probability.

    Each N_Z(0, sigma**2) variable X satisfies E[exp(lambda X)] <=
    exp(lambda**2 sigma**2 / 2) for all real lambda (Canonne, Kamath and
    Steinke 2020), so the sum S of m independent ones is
    (m sigma**2)-sub-Gaussian: P(|S| >= B) <= 2 exp(-B**2 / (2 m sigma**2)).
    A union bound over d coordinates gives the returned

        B = ceil(sigma * sqrt(2 m ln(2 d / p)))

    with P(some |S_i| >= B) <= p. The encoder must reserve B on each side of
    the signal in the modular range so the noise cannot wrap around.

    Args:
        sigma_client: Each client's sigma in integer units, positive.
        num_clients: m, the largest number of clients whose noise can be in
            the sum, at least 1.
        num_coordinates: d, the number of coordinates, at least 1.
        failure_probability: p, in (0, 1).

    Returns:
        The bound B in integer units.

    Raises:
        ValueError: If an argument is out of range.

    """
    _check_positive("sigma_client", sigma_client)
    _check_positive_int("num_clients", num_clients)
    _check_positive_int("num_coordinates", num_coordinates)
    if not 0 < failure_probability < 1:
        raise ValueError(
            f"failure_probability must be in (0, 1). Found {failure_probability}."
        )

    log_term = math.log(2 * num_coordinates) - math.log(failure_probability)

    return math.ceil(sigma_client * math.sqrt(2 * num_clients * log_term))


def _sample_discrete_laplace(
    count: int, *, scale: int, rng: SecureRandom
) -> npt.NDArray[np.int64]:
    """Draw up to `count` values with P(Y = y) proportional to exp(-|y| / scale).

    Rejections make the output shorter than `count`.
    """
    remainder = rng.integers(count, high=scale)
    keep = rng.uniform(count) < np.exp(-remainder / scale)
    remainder = remainder[keep]

    # P(V >= v) = exp(-v), so U + scale * V is geometric with
    # P(X >= x) = exp(-x / scale).
    num_kept = remainder.size
    quotient = np.floor(-np.log1p(-rng.uniform(num_kept))).astype(np.int64)
    magnitude = remainder + scale * quotient
    negative = (rng.bits(num_kept) & np.uint64(1)).astype(bool)

    # A negative zero would count 0 twice.
    valid = ~(negative & (magnitude == 0))

    signed: npt.NDArray[np.int64] = np.where(negative, -magnitude, magnitude)
    laplace_samples: npt.NDArray[np.int64] = signed[valid]
    return laplace_samples


def _gaussian_rejection(
    candidates: npt.NDArray[np.int64],
    *,
    sigma: float,
    scale: int,
    rng: SecureRandom,
) -> npt.NDArray[np.int64]:
    variance = sigma**2
    distance = np.abs(candidates).astype(np.float64) - variance / scale
    acceptance = np.exp(-(distance**2) / (2.0 * variance))
    return candidates[rng.uniform(candidates.size) < acceptance]


def _discrete_gaussian_weights(
    sigma: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    half_width = math.ceil(_VARIANCE_TAIL_WIDTH * sigma) + 2
    support = np.arange(-half_width, half_width + 1, dtype=np.int64)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2.0 * sigma**2))
    return support, weights


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and positive. Found {value}.")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int. Found {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1. Found {value}.")
