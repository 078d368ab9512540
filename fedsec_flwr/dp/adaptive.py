"""Adaptive clipping to a target quantile of update norms.

Andrew, Thakkar, McMahan and Ramaswamy (2021, "Differentially Private
Learning with Adaptive Clipping") let the clipping norm C track the
gamma-quantile of the clients' update norms. Each round:

1. Every client sends the bit b_i = 1 if ||update_i|| <= C, else 0, next to
   its clipped update. The bits are summed inside the secure aggregate.
2. The server gets the bit sum with Gaussian noise of standard deviation
   sigma_b and estimates the unclipped fraction b_hat = noisy sum / m.
3. C <- C * exp(-eta * (b_hat - gamma)) (geometric update).

The noisy bit sum costs privacy. Theorem 1 of the paper: releasing the
update sum with noise multiplier z_delta and the bit sum with noise sigma_b
is as private as one Gaussian mechanism with noise multiplier z, where

    z**-2 = z_delta**-2 + (2 sigma_b)**-2.

The factor 2 is there because the paper's clients contribute the centered
bit b_i - 1/2, whose sensitivity is 1/2. The centered sum is the bit sum
minus m / 2 for m contributing clients. So adding sigma_b noise to the sum
of the 0/1 bits is the same release whenever m is public, as it is to a
server that runs the rounds. Record z in the accountant and use z_delta
(`effective_noise_multiplier`) for the update noise.

NOTE: Theorem 1 is about continuous Gaussian noise. When clients add discrete
Gaussian noise to the bits inside secure aggregation, record the bit sum as
its own `DistributedDiscreteGaussianEvent` (L2 sensitivity 1, dimension 1)
instead of folding it into z.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .random import SecureRandom

logger = logging.getLogger("fedsec_flwr.dp")

DEFAULT_TARGET_QUANTILE = 0.5
"""Target quantile gamma. Andrew et al. recommend clipping to the median."""

DEFAULT_LEARNING_RATE = 0.2
"""Learning rate eta of the geometric update, as Andrew et al. recommend."""

MAX_LEARNING_RATE = 10.0
"""Largest eta. The norm then changes by a factor of up to exp(10), about
22,000, per round. From eta = 710 on, exp(eta) overflows the float range."""

BIT_NOISE_FRACTION = 1 / 20
"""Default sigma_b as a fraction of the expected clients per round (m / 20)."""

BIT_SENSITIVITY = 0.5
"""L2 sensitivity of the centered bit sum, because one client changes it by 1/2."""


def client_bit(*, norm: float, clipping_norm: float) -> int:
    """Return 1 if the update norm is at most the clipping norm, else 0.

    Args:
        norm: L2 norm of the client's update before clipping, finite and
            non-negative.
        clipping_norm: The round's clipping norm C, finite and positive.

    Raises:
        ValueError: If an argument is out of range.

    """
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"norm must be finite and non-negative. Found {norm}.")
    _check_positive("clipping_norm", clipping_norm)

    return 1 if norm <= clipping_norm else 0


def effective_noise_multiplier(
    *, noise_multiplier: float, bit_noise_std: float
) -> float:
    """Compute the update noise multiplier z_delta that leaves room for the bit sum.

    By Theorem 1 of Andrew et al. (2021), z_delta = (z**-2 - (2 sigma_b)**-2)
    ** (-1/2), so that the update sum (noise multiplier z_delta) and the
    noisy centered bit sum (sensitivity 1/2, noise sigma_b) together are as
    private as one Gaussian mechanism with noise multiplier z. The formula
    needs z**-2 > (2 sigma_b)**-2, that is 2 sigma_b > z. Otherwise the bit
    sum alone would spend the whole budget. z_delta > z always.

    Args:
        noise_multiplier: z, the noise multiplier that the accountant records,
            positive.
        bit_noise_std: sigma_b, the standard deviation of the noise on the
            bit sum, positive.

    Returns:
        z_delta, the noise multiplier for the clipped update sum.

    Raises:
        ValueError: If an argument is not positive or 2 sigma_b <= z.

    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("bit_noise_std", bit_noise_std)
    bit_noise_multiplier = bit_noise_std / BIT_SENSITIVITY
    if bit_noise_multiplier <= noise_multiplier:
        raise ValueError(
            "bit_noise_std must be above noise_multiplier / 2 "
            f"({noise_multiplier / 2}), or the bit sum spends the whole budget. "
            f"Found {bit_noise_std}."
        )

    return 1.0 / math.sqrt(noise_multiplier**-2 - bit_noise_multiplier**-2)


@dataclass(kw_only=True)
class AdaptiveClipping:
    """Server state of adaptive clipping with a geometric update.

    Attributes:
        clipping_norm: Current clipping norm C, positive.
        num_sampled: m, the expected number of clients per round, at least 1.
        target_quantile: gamma, the fraction of updates to leave unclipped,
            in [0, 1].
        learning_rate: eta, positive. C changes by a factor of at most
            exp(eta) per round.
        bit_noise_std: sigma_b, the noise standard deviation on the bit sum,
            positive. None sets it to m / 20.
        min_clipping_norm: Floor of the clipping norm, non-negative. The
            geometric update never takes C below it.

    """

    clipping_norm: float
    num_sampled: int
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    learning_rate: float = DEFAULT_LEARNING_RATE
    bit_noise_std: float | None = field(default=None)
    min_clipping_norm: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("clipping_norm", self.clipping_norm)
        _check_positive_int("num_sampled", self.num_sampled)
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(
                f"target_quantile must be in [0, 1]. Found {self.target_quantile}."
            )
        check_clipping_learning_rate("learning_rate", self.learning_rate)
        if self.bit_noise_std is None:
            self.bit_noise_std = BIT_NOISE_FRACTION * self.num_sampled
        _check_positive("bit_noise_std", self.bit_noise_std)
        if not 0.0 <= self.min_clipping_norm <= self.clipping_norm:
            raise ValueError(
                "min_clipping_norm must be at least 0 and at most clipping_norm "
                f"{self.clipping_norm}. Found {self.min_clipping_norm}."
            )

    @property
    def noise_std(self) -> float:
        """sigma_b, the noise standard deviation to add to the bit sum."""
        if self.bit_noise_std is None:
            return BIT_NOISE_FRACTION * self.num_sampled
        return self.bit_noise_std

    def noisy_bit_sum(self, bit_sum: int, *, rng: SecureRandom) -> float:
        """Add N(0, sigma_b**2) noise to an exact bit sum (central DP).

        With distributed DP the clients add the noise inside the secure
        aggregate instead, and the server passes the result to `update`.

        Raises:
            ValueError: If `bit_sum` is negative.

        """
        if bit_sum < 0:
            raise ValueError(f"bit_sum must be non-negative. Found {bit_sum}.")

        return float(bit_sum) + float(rng.normal(1, std=self.noise_std)[0])

    def update(self, *, noisy_bit_sum: float, num_aggregated: float) -> float:
        """Move the clipping norm toward the target quantile and return it.

        b_hat = noisy_bit_sum / num_aggregated, clamped to [0, 1], and
        C <- max(C * exp(-eta * (b_hat - gamma)), `min_clipping_norm`). If
        more than a fraction gamma of the updates were unclipped, C shrinks,
        otherwise it grows.

        Args:
            noisy_bit_sum: Sum of the clients' bits plus noise of standard
                deviation sigma_b, finite.
            num_aggregated: Denominator of the estimate, finite and positive:
                the count of updates aggregated, or the expected number of
                clients when the real count must stay private.

        Returns:
            The new clipping norm.

        Raises:
            ValueError: If an argument is out of range.

        """
        if not math.isfinite(noisy_bit_sum):
            raise ValueError(f"noisy_bit_sum must be finite. Found {noisy_bit_sum}.")
        _check_positive("num_aggregated", num_aggregated)

        unclipped_fraction = min(max(noisy_bit_sum / num_aggregated, 0.0), 1.0)
        step = -self.learning_rate * (unclipped_fraction - self.target_quantile)
        # Post-processing of the noisy bit sum, so the floor costs no privacy.
        clipping_norm = max(self.clipping_norm * math.exp(step), self.min_clipping_norm)
        if not math.isfinite(clipping_norm) or clipping_norm <= 0.0:
            raise ValueError(
                f"the adaptive clipping norm left the float range: {self.clipping_norm}"
                f" * exp({step}) is {clipping_norm}. Lower learning_rate (found "
                f"{self.learning_rate}) or start from another clipping_norm."
            )
        self.clipping_norm = clipping_norm
        logger.debug("Adaptive clipping norm is now %.6g", self.clipping_norm)

        return self.clipping_norm


def check_clipping_learning_rate(name: str, value: float) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a usable eta."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise ValueError(f"{name} must be a number. Found {value!r}.")
    if not math.isfinite(value) or not 0.0 < value <= MAX_LEARNING_RATE:
        raise ValueError(
            f"{name} must be in (0, {MAX_LEARNING_RATE:g}]: the clipping norm "
            f"changes by a factor of up to exp({name}) per round. Found {value}."
        )


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and positive. Found {value}.")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int. Found {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1. Found {value}.")
