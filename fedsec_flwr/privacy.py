"""Client-level differential privacy for SecureFedAvg: configuration and rounds.

Two modes, both with client-side L2 clipping of the update before encoding:

- ``central``: the server adds Gaussian noise of standard deviation
  ``z * C / m`` to the unmasked mean of the ``m`` aggregated updates.
- ``distributed``: every client adds discrete Gaussian noise to its integer
  encoded update before masking (Kairouz, Liu and Steinke 2021), so nobody,
  the server included, sees an un-noised sum. Each client's share is
  calibrated for the clients sampled in the round; when some drop out the
  sum carries less noise, and the accountant records the survivors. In
  target mode the noise also covers up to ``max_dropout_fraction`` of the
  round's clients dropping out, and a round with more dropouts is aborted
  before its sum is unmasked, so the reported epsilon never passes the target.

Under DP every client has weight 1, because the sensitivity argument bounds
one client's contribution to an unweighted sum. The clipping norm doubles as
the per-coordinate encoding range, since no coordinate of a clipped update
can exceed it.

This module imports no Flower code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from ._scalars import plain_fields, plain_number
from .core.bounds import lower_bound_text, upper_bound_text
from .core.encoding import TRAILER_SIZE, EncodingParams
from .dp.accounting import (
    ACCOUNTANT_PRV,
    ACCOUNTANT_RDP,
    MAX_PRV_STEPS,
    MAX_SEARCH_NOISE_MULTIPLIER,
    MIN_DISCRETE_SIGMA,
    MIN_NOISE_MULTIPLIER,
    DistributedDiscreteGaussianEvent,
    GaussianEvent,
    PrivacyAccountant,
    TargetEpsilonUnreachableError,
    check_delta,
    check_noise_multiplier,
    compute_epsilon,
    noise_multiplier_for_target,
    quantized_l2_sensitivity,
)
from .dp.adaptive import (
    BIT_NOISE_FRACTION,
    BIT_SENSITIVITY,
    AdaptiveClipping,
    check_clipping_learning_rate,
    client_bit,
    effective_noise_multiplier,
)
from .dp.clipping import l2_norm
from .dp.noise import (
    MAX_DISCRETE_SIGMA,
    distributed_noise_headroom,
    distributed_noise_scale,
    sample_discrete_gaussian,
)
from .dp.random import SecureRandom
from .models import CommitmentLayout

logger = logging.getLogger("fedsec_flwr.privacy")

MAX_NOISE_MULTIPLIER = 1000.0
"""Upper end of the noise multiplier search for distributed DP."""

MAX_NOISE_STD = float(np.finfo(np.float32).max) / 32
"""Largest noise multiplier times clipping norm. Gaussian draws stay within
8.57 standard deviations (`SecureRandom.normal`), so noise up to this bound
leaves a float32 model finite."""

SEARCH_STEPS = 40

BRACKET_STEPS = 60
"""Steps to find a passing z: doubling to `MAX_NOISE_MULTIPLIER`, then bisection."""

BIT_NOISE_PER_MULTIPLIER = 4.0
"""Default sigma_b is at least this times z times the bit sum's sensitivity.

A bit sum with noise multiplier 4 z costs 1/16 of what the updates cost in
Renyi DP, so in central mode z_delta = z / sqrt(1 - 1/16), 3.3% above z.
"""

DISTRIBUTED_BIT_SENSITIVITY = 1.0
"""L2 sensitivity of the bit sum in distributed mode, where bits are not centered."""

DEFAULT_MAX_DROPOUT_FRACTION = 0.1
"""Share of a distributed round's clients that may drop out in target mode."""

MIN_CLIPPING_NORM = 2.0**-400
"""Smallest clipping norm C, about 3.9e-121.

Clipping computes the update's norm from squared coordinates, and float64
squares below 2**-1022 lose precision or become 0. From 2**-400 on, a
coordinate whose square is not normal changes a squared norm near C**2 by
at most 2**-275 of it. The encoding, whose range is C, works down to the
smaller `fedsec_flwr.core.encoding.MIN_CLIP_RANGE`.
"""


class RoundNotPlannedError(ValueError):
    """No noise multiplier keeps the next round within the budget and the modulus."""


class NoiseHeadroomError(ValueError):
    """A fixed noise multiplier's distributed noise does not fit the secure sum.

    Attributes:
        noise_multiplier: The configured noise multiplier z.
        max_noise_multiplier: The largest z whose noise fits the round,
            rounded down to three significant digits, or None if not even
            `MIN_NOISE_MULTIPLIER` fits.
        verified: Whether verification's commitment offset shares the room.
    """

    def __init__(
        self,
        message: str,
        *,
        noise_multiplier: float,
        max_noise_multiplier: float | None,
        verified: bool,
    ) -> None:
        super().__init__(message)
        self.noise_multiplier = noise_multiplier
        self.max_noise_multiplier = max_noise_multiplier
        self.verified = verified


class DPMode(StrEnum):
    """Placement of the noise: on the server or on every client."""

    CENTRAL = "central"
    DISTRIBUTED = "distributed"


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """Client-level differential privacy, checked when constructed.

    Attributes:
        mode: ``central`` or ``distributed``.
        clipping_norm: C, the L2 bound of each client's update (the initial
            value under adaptive clipping), at least `MIN_CLIPPING_NORM`.
        noise_multiplier: z, the noise standard deviation over C; give this
            or ``target_epsilon``.
        target_epsilon: The run's epsilon budget; the noise multiplier is then
            the smallest whose epsilon over all rounds stays within it.
        delta: The delta of the (epsilon, delta) guarantee.
        accountant: ``rdp`` or ``prv`` (``prv`` for central mode only).
        adaptive_clipping: Track a quantile of update norms (Andrew et al.
            2021) instead of a fixed C.
        target_quantile: gamma, the fraction of updates left unclipped.
        clipping_learning_rate: eta of the geometric clipping-norm update.
        clipped_count_stddev: sigma_b, the noise on the count of unclipped
            updates. ``None`` means the larger of the expected clients per
            round over 20 and `BIT_NOISE_PER_MULTIPLIER` times the noise
            multiplier times the bit sum's sensitivity.
        quantization_bits: Grid bits of the distributed mode's encoding.
        max_dropout_fraction: In distributed mode with ``target_epsilon``,
            the largest fraction of a round's sampled clients that may fail
            to add their noise. Each round's noise is chosen so that even
            the fewest clients this allows keep the run within the target,
            and a round with fewer noised inputs is aborted before its sum
            is unmasked. Ignored in the other modes.

    """

    mode: DPMode
    clipping_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = ACCOUNTANT_RDP
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clipping_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    quantization_bits: int = 16
    max_dropout_fraction: float = DEFAULT_MAX_DROPOUT_FRACTION

    def __post_init__(self) -> None:
        plain_fields(
            self,
            "clipping_norm",
            "noise_multiplier",
            "target_epsilon",
            "delta",
            "target_quantile",
            "clipping_learning_rate",
            "clipped_count_stddev",
            "quantization_bits",
            "max_dropout_fraction",
        )
        object.__setattr__(self, "mode", _parse_mode(self.mode))
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "Give exactly one of noise_multiplier and target_epsilon. "
                f"Found noise_multiplier={self.noise_multiplier!r} and "
                f"target_epsilon={self.target_epsilon!r}."
            )
        _check_positive("clipping_norm", self.clipping_norm)
        if self.clipping_norm < MIN_CLIPPING_NORM:
            raise ValueError(
                "clipping_norm must be at least "
                f"{lower_bound_text(MIN_CLIPPING_NORM)} (2**-400), because "
                "clipping squares values that scale with it, and smaller squares "
                f"underflow float64. Found {self.clipping_norm}."
            )
        if self.noise_multiplier is not None:
            _check_positive("noise_multiplier", self.noise_multiplier)
            check_noise_multiplier("noise_multiplier", self.noise_multiplier)
            if self.noise_multiplier * self.clipping_norm > MAX_NOISE_STD:
                raise ValueError(
                    "noise_multiplier * clipping_norm, the noise standard deviation "
                    "for one update, must be at most "
                    f"{upper_bound_text(MAX_NOISE_STD)}, or the noisy model "
                    f"overflows float32. Found {self.noise_multiplier} * "
                    f"{self.clipping_norm} = "
                    f"{self.noise_multiplier * self.clipping_norm:.3g}."
                )
        if self.target_epsilon is not None:
            _check_positive("target_epsilon", self.target_epsilon)
            # The calibrated multiplier may reach the search's upper end.
            largest_std = MAX_SEARCH_NOISE_MULTIPLIER * self.clipping_norm
            if largest_std > MAX_NOISE_STD:
                raise ValueError(
                    "clipping_norm must be at most "
                    f"{upper_bound_text(MAX_NOISE_STD / MAX_SEARCH_NOISE_MULTIPLIER)} "
                    "with target_epsilon, "
                    "because the calibrated noise multiplier may reach "
                    f"{MAX_SEARCH_NOISE_MULTIPLIER:g} and the noise must not "
                    f"overflow float32. Found {self.clipping_norm}."
                )
        check_delta("delta", self.delta)
        if not isinstance(self.adaptive_clipping, bool):
            raise ValueError(
                f"adaptive_clipping must be a bool. Found {self.adaptive_clipping!r}."
            )
        if self.accountant not in (ACCOUNTANT_RDP, ACCOUNTANT_PRV):
            raise ValueError(
                f"accountant must be 'rdp' or 'prv'. Found {self.accountant!r}."
            )
        if self.accountant == ACCOUNTANT_PRV and self.mode is DPMode.DISTRIBUTED:
            raise ValueError(
                "accountant 'prv' supports only the central mode; the distributed "
                "mode needs 'rdp'. Found accountant='prv' with mode='distributed'."
            )
        if (
            isinstance(self.target_quantile, bool)
            or not isinstance(self.target_quantile, int | float)
            or not 0.0 < self.target_quantile < 1.0
        ):
            raise ValueError(
                f"target_quantile must be in (0, 1). Found {self.target_quantile!r}."
            )
        check_clipping_learning_rate(
            "clipping_learning_rate", self.clipping_learning_rate
        )
        if self.clipped_count_stddev is not None:
            _check_positive("clipped_count_stddev", self.clipped_count_stddev)
        if (
            self.mode is DPMode.CENTRAL
            and self.adaptive_clipping
            and self.noise_multiplier is not None
            and self.clipped_count_stddev is not None
            and 2 * self.clipped_count_stddev <= self.noise_multiplier
        ):
            raise ValueError(
                "clipped_count_stddev must be above noise_multiplier / 2 "
                f"({self.noise_multiplier / 2}), or the clipped count spends the "
                f"whole budget. Found {self.clipped_count_stddev}."
            )
        if (
            isinstance(self.quantization_bits, bool)
            or not isinstance(self.quantization_bits, int)
            or not 2 <= self.quantization_bits <= 24
        ):
            raise ValueError(
                "quantization_bits must be between 2 and 24. "
                f"Found {self.quantization_bits!r}."
            )
        if (
            isinstance(self.max_dropout_fraction, bool)
            or not isinstance(self.max_dropout_fraction, int | float)
            or not 0.0 <= self.max_dropout_fraction < 1.0
        ):
            raise ValueError(
                "max_dropout_fraction must be at least 0 and below 1. "
                f"Found {self.max_dropout_fraction!r}."
            )


def min_noised_inputs(num_sampled: int, max_dropout_fraction: float) -> int:
    """Return the fewest of ``num_sampled`` clients a round may release the sum of.

    That is ``num_sampled`` minus the whole number of clients that
    ``max_dropout_fraction`` allows to drop, and at least 1.
    """
    return max(1, num_sampled - math.floor(max_dropout_fraction * num_sampled))


def _parse_mode(mode: object) -> DPMode:
    try:
        return DPMode(str(mode))
    except ValueError:
        raise ValueError(
            f"mode must be 'central' or 'distributed'. Found {mode!r}."
        ) from None


def _check_count(name: str, value: object, *, maximum: int | None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (maximum is not None and value > maximum)
    ):
        limit = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(
            f"{name} must be an integer of at least 1{limit}. Found {value!r}."
        )


def release_denominator(plan: RoundPrivacy, *, num_aggregated: int) -> float:
    """Return m, what the noisy sum of a DP round is divided by."""
    if plan.expected_clients is not None:
        return plan.expected_clients
    return float(num_aggregated)


def _check_positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite number above 0. Found {value!r}.")


@dataclass(frozen=True)
class RoundPrivacy:
    """The DP parameters of one round, as planned before it starts.

    Attributes:
        clipping_norm: C for this round.
        noise_multiplier: z, what the accountant records for the update.
        update_noise_multiplier: The update's own noise multiplier; above z
            under central adaptive clipping, where part of the budget goes
            to the clipped count.
        num_sampled: Clients sampled, m.
        sample_rate: q for the accountant.
        sigma_client: Each client's discrete Gaussian sigma in grid units
            (distributed mode), else 0.
        bit_sigma_client: Each client's sigma on its clipping bit
            (distributed adaptive mode), else 0.
        encoding: The round's fixed-point encoding under DP.
        min_inputs: The fewest noised inputs whose sum the round may release
            (distributed target mode), else 0 for no limit.
        expected_clients: Under Poisson sampling, the expected number of
            sampled clients, q * N, which divides the noisy sum in place of
            the count aggregated; else ``None``.

    """

    clipping_norm: float
    noise_multiplier: float
    update_noise_multiplier: float
    num_sampled: int
    sample_rate: float
    sigma_client: float
    bit_sigma_client: float
    encoding: EncodingParams | None
    min_inputs: int = 0
    expected_clients: float | None = None


@dataclass
class ServerPrivacy:
    """The server's DP state over a run: clipping norm, noise and ledger.

    Args:
        config: The DP configuration.
        num_rounds: Rounds the run is planned for (calibrates target mode).
        sample_rate: q; 1.0 when client sampling gives no amplification.
        max_clients: Maximum clients in a round (sizes the noise headroom).
        modulus: Modulus of the secure sum; ``None`` without secure
            aggregation.
        rng: Cryptographically secure source of the server's noise.
        verified: Whether rounds are verified, whose commitment offset needs
            room in the modulus too (distributed mode).

    """

    config: DPConfig
    num_rounds: int
    sample_rate: float
    max_clients: int
    modulus: int | None
    rng: SecureRandom = field(default_factory=SecureRandom)
    verified: bool = False
    accountant: PrivacyAccountant = field(init=False)
    adaptive: AdaptiveClipping | None = field(init=False, default=None)
    _noise_multiplier: float | None = field(init=False, default=None)
    _rounds_done: int = field(init=False, default=0)
    _unamplified: PrivacyAccountant | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.mode is DPMode.DISTRIBUTED and self.modulus is None:
            raise ValueError(
                "Distributed DP needs secure aggregation: clients add noise "
                "inside the secure sum. Found secure_aggregation=None."
            )
        if self.config.accountant == ACCOUNTANT_PRV and self.num_rounds > MAX_PRV_STEPS:
            raise ValueError(
                f"accountant 'prv' composes at most {MAX_PRV_STEPS} rounds, "
                f"because its memory grows with them. Found {self.num_rounds} "
                "rounds; use the 'rdp' accountant."
            )
        self.accountant = PrivacyAccountant(
            accountant=self.config.accountant, delta=self.config.delta
        )
        if self.config.mode is DPMode.DISTRIBUTED:
            self._unamplified = PrivacyAccountant(
                accountant=ACCOUNTANT_RDP, delta=self.config.delta
            )

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far, at the configured delta."""
        return self.accountant.epsilon

    @property
    def epsilon_against_server(self) -> float | None:
        """Epsilon without amplification by sampling, in distributed mode.

        The server draws the sample, so against the server a client that
        took part in every round so far has this epsilon, not `epsilon`.
        ``None`` in central mode, where the server is trusted with the sum.
        """
        if self._unamplified is None:
            return None
        return self._unamplified.epsilon

    def check_target(
        self, *, num_sampled: int | None = None, dimension: int | None = None
    ) -> None:
        """Plan a first round now, so that a target or noise that cannot work fails.

        Central mode's noise multiplier depends only on the target, delta,
        the sample rate and the rounds, so an unreachable target can be
        reported before round 1. Distributed mode's noise also depends on
        the round's clients and the model's size: with ``num_sampled`` and
        ``dimension`` a round of that many clients is planned on a fresh
        copy of this object, which calibrates a target and checks that the
        noise fits the modulus. Without them it is checked only when round
        1 is planned.

        Raises:
            TargetEpsilonUnreachableError: If the target needs a noise
                multiplier above the search limit, or more noise than the
                modulus leaves room for.
            NoiseHeadroomError: If a fixed noise multiplier does not fit the
                modulus.
            ValueError: If ``num_sampled`` or ``dimension`` is out of range.
        """
        if self.config.mode is DPMode.CENTRAL:
            self._calibrated(num_sampled=0, dimension=0)
            return
        if num_sampled is None or dimension is None:
            return
        # A copy, because planning sets up the adaptive clipping and the
        # noise multiplier for the run.
        trial = dataclasses.replace(self)
        trial.plan(num_sampled=num_sampled, dimension=dimension)

    def plan(
        self,
        *,
        num_sampled: int,
        dimension: int,
        expected_clients: float | None = None,
    ) -> RoundPrivacy:
        """Plan the next round for ``num_sampled`` clients and ``dimension`` values.

        Under Poisson sampling the number of clients in a round depends on
        who was sampled, and a mean over that count would release it. So the
        noisy sum is divided by ``expected_clients``, q times the nodes
        sampled from, when given. The noise of the sum does not depend on
        the count: the server adds it in central mode, and in distributed
        mode each sampled client adds its share of it.

        Raises:
            RoundNotPlannedError: A distributed round after the first cannot
                be planned, so the run should stop. Either its noise does not
                fit the modulus, or in target mode no noise multiplier keeps
                it within both the budget and the modulus.
            NoiseHeadroomError: The first round's fixed noise multiplier does
                not fit the modulus.
            ValueError: An argument is out of range, or the first round
                cannot be planned.

        """
        num_sampled, dimension = plain_number(num_sampled), plain_number(dimension)
        if expected_clients is not None:
            _check_positive("expected_clients", expected_clients)
        # max_clients bounds a round only under secure aggregation.
        secure_maximum = self.max_clients if self.modulus is not None else None
        _check_count("num_sampled", num_sampled, maximum=secure_maximum)
        _check_count("dimension", dimension, maximum=None)
        z = self._calibrated(num_sampled=num_sampled, dimension=dimension)
        if self.config.adaptive_clipping and self.adaptive is None:
            # The default bit noise scales with the clients of a round, which
            # under Poisson sampling is the expected number, so that it does
            # not depend on who the first round sampled.
            typical = num_sampled
            if expected_clients is not None:
                typical = max(1, round(expected_clients))
            self.adaptive = AdaptiveClipping(
                clipping_norm=self.config.clipping_norm,
                num_sampled=typical,
                target_quantile=self.config.target_quantile,
                learning_rate=self.config.clipping_learning_rate,
                bit_noise_std=self._bit_noise_std(z, num_sampled=typical),
                min_clipping_norm=MIN_CLIPPING_NORM,
            )
        clipping_norm = (
            self.adaptive.clipping_norm if self.adaptive else self.config.clipping_norm
        )

        if self.config.mode is DPMode.CENTRAL:
            update_z = z
            if self.adaptive is not None:
                update_z = effective_noise_multiplier(
                    noise_multiplier=z, bit_noise_std=self.adaptive.noise_std
                )
            encoding = None
            if self.modulus is not None:
                encoding = self._encoding(clipping_norm, headroom=0)
            return RoundPrivacy(
                clipping_norm=clipping_norm,
                noise_multiplier=z,
                update_noise_multiplier=update_z,
                num_sampled=num_sampled,
                sample_rate=self.sample_rate,
                sigma_client=0.0,
                bit_sigma_client=0.0,
                encoding=encoding,
                expected_clients=expected_clients,
            )

        try:
            planned = self._distributed_plan(
                z,
                clipping_norm=clipping_norm,
                num_sampled=num_sampled,
                dimension=dimension,
                bit_noise_std=self.adaptive.noise_std if self.adaptive else None,
            )
        except ValueError as error:
            message = (
                f"noise_multiplier {z} needs more noise headroom than the "
                f"encoding leaves: {error}"
            )
            if self._rounds_done:
                raise RoundNotPlannedError(message) from error
            if self.config.noise_multiplier is None:
                raise ValueError(message) from error
            largest = self._max_fitting_noise_multiplier(num_sampled, dimension)
            if largest is not None:
                message += (
                    " The largest noise_multiplier that fits is "
                    f"{upper_bound_text(largest)}."
                )
            raise NoiseHeadroomError(
                message,
                noise_multiplier=z,
                max_noise_multiplier=largest,
                verified=self.verified,
            ) from error
        return dataclasses.replace(planned, expected_clients=expected_clients)

    def _max_fitting_noise_multiplier(
        self, num_sampled: int, dimension: int
    ) -> float | None:
        """Return the largest z below the configured one whose noise fits the round.

        The result is rounded down to three significant digits, or None if
        not even `MIN_NOISE_MULTIPLIER` fits. Under adaptive clipping the
        bit noise stays that of the configured z, which only leaves less
        room, so the result also fits with the bit noise of its own z, which
        is never larger.
        """

        def fits(noise_multiplier: float) -> bool:
            try:
                self._round_plan(noise_multiplier, num_sampled, dimension)
            except ValueError:
                return False
            return True

        low = MIN_NOISE_MULTIPLIER
        high = self.config.noise_multiplier
        assert high is not None
        if not fits(low):
            return None
        for _ in range(SEARCH_STEPS):
            middle = 0.5 * (low + high)
            if fits(middle):
                low = middle
            else:
                high = middle
        exponent = math.floor(math.log10(low)) - 2
        rounded = math.floor(low / 10.0**exponent) * 10.0**exponent
        return rounded if rounded >= MIN_NOISE_MULTIPLIER else low

    def _distributed_plan(
        self,
        noise_multiplier: float,
        *,
        clipping_norm: float,
        num_sampled: int,
        dimension: int,
        bit_noise_std: float | None,
    ) -> RoundPrivacy:
        """Plan a distributed round with noise multiplier z for all sampled clients.

        ``bit_noise_std`` is sigma_b of adaptive clipping, ``None`` without it.
        """
        scale = self._scale(clipping_norm)
        sigma_client = max(
            MIN_DISCRETE_SIGMA,
            distributed_noise_scale(
                noise_multiplier=noise_multiplier,
                clipping_norm=clipping_norm,
                quantization_scale=scale,
                num_clients=num_sampled,
            ),
        )
        # Only the sampled clients add noise, and their summed noise has the
        # same spread whatever their number, so the headroom does not grow
        # in rounds that sample fewer clients.
        headroom = distributed_noise_headroom(
            sigma_client=sigma_client,
            num_clients=num_sampled,
            num_coordinates=dimension + 1,
        )
        bit_sigma = 0.0
        if bit_noise_std is not None:
            bit_sigma = max(MIN_DISCRETE_SIGMA, bit_noise_std / math.sqrt(num_sampled))
        encoding = self._encoding(clipping_norm, headroom=headroom)
        if self.verified:
            # Raises like the encoding when the commitment offset does not fit.
            CommitmentLayout.distributed(
                encoding,
                num_coordinates=dimension,
                bit_slot=dimension + TRAILER_SIZE
                if bit_noise_std is not None
                else None,
                bit_sigma_client=bit_sigma,
            )
        min_inputs = 0
        if self.config.target_epsilon is not None:
            min_inputs = min_noised_inputs(
                num_sampled, self.config.max_dropout_fraction
            )
        return RoundPrivacy(
            clipping_norm=clipping_norm,
            noise_multiplier=noise_multiplier,
            update_noise_multiplier=noise_multiplier,
            num_sampled=num_sampled,
            sample_rate=self.sample_rate,
            sigma_client=sigma_client,
            bit_sigma_client=bit_sigma,
            encoding=encoding,
            min_inputs=min_inputs,
        )

    def _bit_noise_std(self, noise_multiplier: float, *, num_sampled: int) -> float:
        """Return sigma_b, the configured one or the default for this round.

        The default is the larger of m / 20, as Andrew et al. recommend, and
        `BIT_NOISE_PER_MULTIPLIER` times z times the bit sum's sensitivity.
        The second term matters when z is large for the number of clients.
        There, m / 20 alone would leave no budget for the updates in central
        mode, and would need far more noise on them in distributed mode.
        """
        if self.config.clipped_count_stddev is not None:
            return self.config.clipped_count_stddev
        sensitivity = (
            BIT_SENSITIVITY
            if self.config.mode is DPMode.CENTRAL
            else DISTRIBUTED_BIT_SENSITIVITY
        )
        return max(
            BIT_NOISE_FRACTION * num_sampled,
            BIT_NOISE_PER_MULTIPLIER * noise_multiplier * sensitivity,
        )

    def budget_exceeded(self, plan: RoundPrivacy, *, dimension: int) -> str | None:
        """Return why the planned round would exceed the budget, or ``None``."""
        target = self.config.target_epsilon
        if target is None:
            return None
        # In distributed mode the round may release the sum of as few as
        # min_inputs noised inputs, so that is the case to project.
        projected = compute_epsilon(
            [
                *self.accountant.history,
                *self._events(plan, plan.min_inputs or plan.num_sampled, dimension),
            ],
            delta=self.config.delta,
            accountant=self.config.accountant,
        )
        if projected <= target:
            return None
        inputs = ""
        if plan.min_inputs:
            inputs = (
                f" if only {plan.min_inputs} of its {plan.num_sampled} clients "
                "add their noise"
            )
        return (
            "the next round would raise epsilon to "
            f"{lower_bound_text(projected)}{inputs}, above the target {target} at "
            f"delta {self.config.delta}"
        )

    def record(
        self, plan: RoundPrivacy, *, num_aggregated: int, dimension: int
    ) -> float:
        """Record what the round really released and return the new epsilon.

        Raises:
            ValueError: ``num_aggregated`` is above the sampled clients, or
                below the plan's ``min_inputs``, a sum that the round should
                have aborted before unmasking.
        """
        if num_aggregated > plan.num_sampled:
            raise ValueError(
                f"num_aggregated {num_aggregated} is above the round's "
                f"{plan.num_sampled} sampled clients."
            )
        if num_aggregated < plan.min_inputs:
            raise ValueError(
                f"num_aggregated {num_aggregated} is below the round's min_inputs "
                f"{plan.min_inputs}; such a sum must not be released."
            )
        for event in self._events(plan, num_aggregated, dimension):
            self.accountant.record(event)
            if self._unamplified is not None:
                self._unamplified.record(dataclasses.replace(event, sample_rate=1.0))
        self._rounds_done += 1
        if self.config.mode is DPMode.DISTRIBUTED and num_aggregated < plan.num_sampled:
            logger.warning(
                "Only %d of %d planned clients added noise; the accountant records "
                "the smaller noise",
                num_aggregated,
                plan.num_sampled,
            )
        return self.accountant.epsilon

    def release_mean(
        self, mean: NDArray[np.float64], plan: RoundPrivacy, *, num_aggregated: int
    ) -> None:
        """Turn the mean over ``num_aggregated`` updates into the released one.

        Works in place. With the plan's ``expected_clients`` m, the mean is
        rescaled to the sum over m. Central mode then adds N(0, (z * C / m)**2)
        to every coordinate, with m the count aggregated otherwise.
        """
        denominator = release_denominator(plan, num_aggregated=num_aggregated)
        if plan.expected_clients is not None:
            mean *= num_aggregated / denominator
        if self.config.mode is DPMode.CENTRAL:
            std = plan.update_noise_multiplier * plan.clipping_norm / denominator
            mean += self.rng.normal(mean.shape, std=std)

    def update_clipping_norm(
        self, bit_sum: float, plan: RoundPrivacy, *, num_aggregated: int
    ) -> None:
        """Feed the round's count of unclipped updates to adaptive clipping.

        In central mode the server adds the count's noise here; in distributed
        mode the clients already did.
        """
        if self.adaptive is None:
            return
        noisy = bit_sum
        if self.config.mode is DPMode.CENTRAL:
            noisy = self.adaptive.noisy_bit_sum(int(bit_sum), rng=self.rng)
        denominator = release_denominator(plan, num_aggregated=num_aggregated)
        self.adaptive.update(noisy_bit_sum=noisy, num_aggregated=denominator)

    def _scale(self, clipping_norm: float) -> float:
        levels = 1 << self.config.quantization_bits
        return (levels - 1) / (2.0 * clipping_norm)

    def _encoding(self, clipping_norm: float, *, headroom: int) -> EncodingParams:
        assert self.modulus is not None
        return EncodingParams(
            clip_range=clipping_norm,
            quantization_levels=1 << self.config.quantization_bits,
            modulus=self.modulus,
            max_weight=1,
            max_clients=self.max_clients,
            noise_headroom=headroom,
        )

    def _events(
        self, plan: RoundPrivacy, num_clients: int, dimension: int
    ) -> list[GaussianEvent | DistributedDiscreteGaussianEvent]:
        if self.config.mode is DPMode.CENTRAL:
            return [
                GaussianEvent(
                    noise_multiplier=plan.noise_multiplier,
                    sample_rate=plan.sample_rate,
                )
            ]
        return _distributed_events(plan, num_clients=num_clients, dimension=dimension)

    def _calibrated(self, *, num_sampled: int, dimension: int) -> float:
        if self.config.noise_multiplier is not None:
            return self.config.noise_multiplier
        if self.config.mode is DPMode.DISTRIBUTED:
            return self._distributed_calibration(
                num_sampled=num_sampled, dimension=dimension
            )
        if self._noise_multiplier is None:
            assert self.config.target_epsilon is not None
            self._noise_multiplier = noise_multiplier_for_target(
                target_epsilon=self.config.target_epsilon,
                delta=self.config.delta,
                sample_rate=self.sample_rate,
                num_steps=self.num_rounds,
                accountant=self.config.accountant,
            )
            self._log_calibration()
        return self._noise_multiplier

    def _log_calibration(self) -> None:
        logger.info(
            "Noise multiplier %.4f meets target epsilon %s over %d rounds",
            self._noise_multiplier,
            self.config.target_epsilon,
            self.num_rounds,
        )

    def _distributed_calibration(self, *, num_sampled: int, dimension: int) -> float:
        """Return z for the next distributed round in target mode.

        z must keep epsilon within the target if this round releases the sum
        of only its fewest allowed noised inputs and every later round has
        all its clients. Without dropouts the z of the first round passes
        this check in every round. After a round with dropouts, z is raised
        for the rounds left.
        """
        # NOTE: z depends on the round's number of sampled clients, so under
        # Poisson sampling the released noise level varies slightly with it.
        previous = self._noise_multiplier
        if previous is not None and self._fits(previous, num_sampled, dimension):
            return previous
        found, limit = _distributed_search(
            self, num_sampled=num_sampled, dimension=dimension, low=previous or 0.0
        )
        if found is None:
            if previous is None:
                raise _unreachable(
                    self, limit, num_sampled=num_sampled, dimension=dimension
                )
            # The budget check before the round then decides whether it runs.
            return previous
        self._noise_multiplier = found
        if previous is None:
            self._log_calibration()
        else:
            logger.info(
                "Noise multiplier raised from %.4f to %.4f for the %d rounds left, "
                "after dropouts",
                previous,
                found,
                self.num_rounds - self._rounds_done,
            )
        return found

    def _fits(self, noise_multiplier: float, num_sampled: int, dimension: int) -> bool:
        """Return whether z keeps the run in budget and its noise in the modulus."""
        try:
            projected = self._projected_epsilon(
                noise_multiplier, num_sampled, dimension
            )
        except ValueError:
            return False
        return projected <= self._target()

    def _target(self) -> float:
        assert self.config.target_epsilon is not None
        return self.config.target_epsilon

    def _round_plan(
        self, noise_multiplier: float, num_sampled: int, dimension: int
    ) -> RoundPrivacy:
        """Plan the next distributed round with noise multiplier z, changing nothing.

        Raises:
            ValueError: If the noise does not fit the modulus.
        """
        clipping_norm = self.config.clipping_norm
        bit_noise_std = None
        if self.adaptive is not None:
            clipping_norm = self.adaptive.clipping_norm
            bit_noise_std = self.adaptive.noise_std
        elif self.config.adaptive_clipping:
            bit_noise_std = self._bit_noise_std(
                noise_multiplier, num_sampled=num_sampled
            )
        return self._distributed_plan(
            noise_multiplier,
            clipping_norm=clipping_norm,
            num_sampled=num_sampled,
            dimension=dimension,
            bit_noise_std=bit_noise_std,
        )

    def _projected_epsilon(
        self, noise_multiplier: float, num_sampled: int, dimension: int
    ) -> float:
        """Epsilon after this round at its fewest inputs and the rest at all clients."""
        plan = self._round_plan(noise_multiplier, num_sampled, dimension)
        events = [
            *self.accountant.history,
            *_distributed_events(
                plan, num_clients=plan.min_inputs, dimension=dimension
            ),
        ]
        later = self.num_rounds - self._rounds_done - 1
        if later > 0:
            events += [
                _repeat(event, later)
                for event in _distributed_events(
                    plan, num_clients=num_sampled, dimension=dimension
                )
            ]
        return compute_epsilon(
            events, delta=self.config.delta, accountant=ACCOUNTANT_RDP
        )


def _distributed_events(
    plan: RoundPrivacy, *, num_clients: int, dimension: int
) -> list[GaussianEvent | DistributedDiscreteGaussianEvent]:
    assert plan.encoding is not None
    sensitivity = quantized_l2_sensitivity(
        clipping_norm=plan.clipping_norm,
        quantization_scale=plan.encoding.scale,
        dimension=dimension,
    )
    events: list[GaussianEvent | DistributedDiscreteGaussianEvent] = [
        DistributedDiscreteGaussianEvent(
            sigma_client=plan.sigma_client,
            num_survivors=num_clients,
            l2_sensitivity=sensitivity,
            dimension=dimension,
            sample_rate=plan.sample_rate,
        )
    ]
    if plan.bit_sigma_client:
        events.append(
            DistributedDiscreteGaussianEvent(
                sigma_client=plan.bit_sigma_client,
                num_survivors=num_clients,
                l2_sensitivity=DISTRIBUTED_BIT_SENSITIVITY,
                dimension=1,
                sample_rate=plan.sample_rate,
            )
        )
    return events


def _unreachable(
    server: ServerPrivacy, limit: float, *, num_sampled: int, dimension: int
) -> TargetEpsilonUnreachableError:
    """Return the error for a distributed target that no z up to ``limit`` meets.

    ``limit`` is the search's limit, or below it the largest z found to fit
    the modulus and miss the target.
    """
    target = server._target()
    reach = f"target_epsilon {target} over {server.num_rounds} rounds"
    largest = f" (the largest tried that fits is {limit:.6g})" if limit > 0 else ""
    if limit >= MAX_NOISE_MULTIPLIER:
        return TargetEpsilonUnreachableError(
            f"{reach} needs a noise multiplier above {MAX_NOISE_MULTIPLIER}, the "
            "largest that distributed mode tries.",
            target_epsilon=target,
            noise_multiplier_limit=limit,
            epsilon_at_limit=server._projected_epsilon(limit, num_sampled, dimension),
        )
    return TargetEpsilonUnreachableError(
        f"{reach} cannot be met: every noise multiplier whose noise fits the "
        f"modulus gives a larger epsilon{largest}. Raise the modulus, or lower "
        "max_clients or the quantization bits, for more room.",
        target_epsilon=target,
        noise_multiplier_limit=limit,
        limited_by_modulus=True,
    )


def _distributed_search(
    server: ServerPrivacy, *, num_sampled: int, dimension: int, low: float
) -> tuple[float | None, float]:
    """Bisect for the smallest z above ``low`` that passes the server's projection.

    Returns z twice, or ``None`` and a z that is too small when no z passes
    whose noise headroom fits the modulus, up to `MAX_NOISE_MULTIPLIER`. z
    is never below `MIN_NOISE_MULTIPLIER`, which a loose target may allow.
    """
    target = server.config.target_epsilon
    assert target is not None

    def fits(z: float) -> bool | None:
        try:
            return server._projected_epsilon(z, num_sampled, dimension) <= target
        except ValueError:
            # The noise headroom of z no longer fits the modulus.
            return None

    # Double z until it passes. Once some z overflows the modulus, bisect
    # between the largest z known to miss the target and that one instead.
    high = min(max(1.0, 2 * low), MAX_NOISE_MULTIPLIER)
    overflows = math.inf
    for _ in range(BRACKET_STEPS):
        fitted = fits(high)
        if fitted:
            break
        if fitted is None:
            overflows = high
        elif high >= MAX_NOISE_MULTIPLIER:
            return None, high
        else:
            low = high
        if math.isinf(overflows):
            high = min(2 * high, MAX_NOISE_MULTIPLIER)
        else:
            high = 0.5 * (low + overflows)
    else:
        return None, low

    low = max(low, MIN_NOISE_MULTIPLIER)
    if low >= high:
        return high, high
    if fits(low):
        return low, low
    for _ in range(SEARCH_STEPS):
        middle = 0.5 * (low + high)
        if fits(middle):
            high = middle
        else:
            low = middle
    return high, high


def _repeat(
    event: GaussianEvent | DistributedDiscreteGaussianEvent, num_steps: int
) -> GaussianEvent | DistributedDiscreteGaussianEvent:
    values = {**event.__dict__, "num_steps": num_steps}
    return type(event)(**values)


@dataclass(frozen=True)
class ClientPrivacy:
    """A client's DP instructions for one round.

    Attributes:
        mode: ``central`` or ``distributed``.
        clipping_norm: C, the L2 bound of the update.
        adaptive: Whether to report the clipping bit.
        sigma_client: Discrete Gaussian sigma on each coordinate, in grid
            units (distributed mode), else 0.
        bit_sigma_client: Discrete Gaussian sigma on the clipping bit.

    """

    mode: DPMode
    clipping_norm: float
    adaptive: bool
    sigma_client: float
    bit_sigma_client: float

    def to_fields(self) -> dict[str, int | float | str]:
        """Convert to record fields."""
        return {
            "dp-mode": self.mode.value,
            "dp-clipping-norm": self.clipping_norm,
            "dp-adaptive": int(self.adaptive),
            "dp-sigma-client": self.sigma_client,
            "dp-bit-sigma-client": self.bit_sigma_client,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> ClientPrivacy | None:
        """Parse untrusted record fields; ``None`` when the round has no DP."""
        if "dp-mode" not in fields:
            return None
        clipping_norm = _float_field(fields, "dp-clipping-norm")
        _check_positive("dp-clipping-norm", clipping_norm)
        privacy = cls(
            mode=_parse_mode(fields["dp-mode"]),
            clipping_norm=clipping_norm,
            adaptive=_flag_field(fields, "dp-adaptive"),
            sigma_client=_float_field(fields, "dp-sigma-client"),
            bit_sigma_client=_float_field(fields, "dp-bit-sigma-client"),
        )
        if privacy.mode is DPMode.DISTRIBUTED:
            # The server never plans less noise than this, so less means a
            # server that tries to collect updates with too little noise.
            # More than the sampler draws is rejected here, before training.
            _check_sigma("dp-sigma-client", privacy.sigma_client)
            if privacy.adaptive:
                _check_sigma("dp-bit-sigma-client", privacy.bit_sigma_client)
        return privacy

    @classmethod
    def of(cls, plan: RoundPrivacy, config: DPConfig) -> ClientPrivacy:
        """Return the client's part of a round plan."""
        return cls(
            mode=config.mode,
            clipping_norm=plan.clipping_norm,
            adaptive=config.adaptive_clipping,
            sigma_client=plan.sigma_client,
            bit_sigma_client=plan.bit_sigma_client,
        )


def _check_sigma(key: str, sigma: float) -> None:
    if not MIN_DISCRETE_SIGMA <= sigma <= MAX_DISCRETE_SIGMA:
        raise ValueError(
            f"Field {key!r} must be between {MIN_DISCRETE_SIGMA} and "
            f"{MAX_DISCRETE_SIGMA:.0f} (2**40) in distributed mode. Found {sigma!r}."
        )


def _flag_field(fields: dict[str, object], key: str) -> bool:
    """Parse a 0 or 1 flag; a missing flag is 0."""
    value = fields.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"Field {key!r} must be 0 or 1. Found {value!r}.")
    return value == 1


def _float_field(fields: dict[str, object], key: str) -> float:
    value = fields.get(key)
    if not isinstance(value, float) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"Field {key!r} must be a finite non-negative float. Found {value!r}."
        )
    return value


def clip_flat_update(
    update: NDArray[np.float64], *, clipping_norm: float
) -> tuple[int, bool]:
    """Scale a flat update in place to L2 norm at most C.

    Returns the clipping bit (1 if the norm was at most C) and whether it was
    scaled. A zero update stays zero and counts as not clipped.
    """
    norm = l2_norm([update])
    bit = client_bit(norm=norm, clipping_norm=clipping_norm)
    if norm > clipping_norm:
        update *= clipping_norm / norm
        # Rounding can leave the norm a hair above C; shrink by one ulp-scale step.
        if l2_norm([update]) > clipping_norm:
            update *= 1.0 - 1e-12
        return bit, True
    return bit, False


def add_distributed_noise(
    encoded: NDArray[np.uint32],
    *,
    num_coordinates: int,
    sigma_client: float,
    bit_slot: int | None,
    bit_sigma_client: float,
    rng: SecureRandom,
) -> None:
    """Add discrete Gaussian noise to encoded coordinates (and bit), modulo 2^32.

    The noise is added modulo 2^32 and reduced by the masking step to the
    protocol's modulus; ``decode_sum`` reads it back as signed.
    """
    if sigma_client > 0:
        noise = sample_discrete_gaussian(num_coordinates, sigma=sigma_client, rng=rng)
        encoded[:num_coordinates] += noise.astype(np.uint32)
    if bit_slot is not None and bit_sigma_client > 0:
        bit_noise = sample_discrete_gaussian(1, sigma=bit_sigma_client, rng=rng)
        # A slice keeps this an array operation, which wraps modulo 2^32
        # without the overflow warning of numpy scalar arithmetic.
        encoded[bit_slot : bit_slot + 1] += bit_noise.astype(np.uint32)


def signed(value: int, modulus: int) -> int:
    """Read a sum modulo ``modulus`` as a signed integer in its centred window."""
    value %= modulus
    return value - modulus if value >= modulus // 2 else value
