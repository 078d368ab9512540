"""Privacy accounting for client-level DP with Opacus's RDP and PRV accountants.

Neighbouring datasets differ by adding or removing one client, and one step
(one round) releases a noisy sum of clipped client updates. A step with noise
multiplier z = sigma / sensitivity and client sample rate q is a sampled
Gaussian mechanism, which is what Opacus's accountants analyse:

- "rdp": Renyi DP of the Poisson-subsampled Gaussian (Mironov, Talwar and
  Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism"), converted to (epsilon, delta) by Opacus.
- "prv": numerical composition of privacy loss random variables (Gopi, Lee
  and Wutschitz 2021), also for the Poisson-subsampled Gaussian. Opacus
  returns the upper end of its error interval.

Both assume that every client joins a round independently with probability
q (Poisson sampling). Fixed-size sampling, which Flower 1.42's strategies
use, does not get this amplification here (see `client_sample_rate`).

Distributed DP sums discrete Gaussian noise inside secure aggregation.
`distributed_discrete_gaussian_rdp` accounts for it with the RDP bound of
Kairouz, Liu and Steinke (2021) for sums of discrete Gaussians.

Opacus imports torch, so this module imports Opacus only inside the
functions that need it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import threading
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

logger = logging.getLogger("fedsec_flwr.dp")

ACCOUNTANT_RDP = "rdp"
ACCOUNTANT_PRV = "prv"
ACCOUNTANTS = (ACCOUNTANT_RDP, ACCOUNTANT_PRV)

SAMPLING_POISSON = "poisson"
SAMPLING_FIXED_SIZE = "fixed_size"
SAMPLING_ALL = "all"
SAMPLINGS = (SAMPLING_POISSON, SAMPLING_FIXED_SIZE, SAMPLING_ALL)

RDP_ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    *(2.0 + 0.5 * i for i in range(12)),
    *(float(order) for order in range(8, 65)),
    72.0,
    80.0,
    96.0,
    128.0,
    160.0,
    192.0,
    256.0,
)
"""Renyi orders at which RDP is evaluated.

Opacus's default grid has 99 fractional orders below 11, and its series for
fractional orders costs most of the time. This grid keeps 9 of them and adds
orders up to 256 so that small epsilons stay reachable. A coarser grid can
only raise the reported epsilon, never lower it.
"""

PRV_EPSILON_ERROR = 0.01
"""Absolute error allowed in the PRV accountant's epsilon.

Opacus reports the upper end of the error interval, so the error can only
raise epsilon.
"""

MIN_NOISE_MULTIPLIER = 2.0**-10
"""Smallest noise multiplier the accountants take.

Smaller values protect nothing, and at 1e-300 Opacus's RDP formula divides
by the square of the multiplier, which is 0.0 in floating point.
"""

MIN_DELTA = 1e-15
"""Smallest delta the accountants take.

Delta is chosen below 1 / N for N clients or examples, and no data set has
10**15 of them. The RDP accountant handles every delta from this value up.
Opacus 1.6's PRV accountant divides by zero at delta 5e-324, whose
delta / 1000 underflows to 0. From about 1e-12 down, its floating-point
check already rejects most noise multipliers and step counts, and
`compute_epsilon` then bounds epsilon with RDP.
"""

MAX_DELTA = 0.1
"""Exclusive upper bound on delta. A mechanism that publishes each record
with probability delta meets (0, delta)-DP, so at 0.1 the guarantee allows
one record in ten to be published, and the accountants can report
epsilon 0 for large noise."""

MIN_SEARCH_NOISE_MULTIPLIER = MIN_NOISE_MULTIPLIER
"""Smallest noise multiplier that `noise_multiplier_for_target` tries."""

MAX_PRV_GRID_POINTS = 2**24
"""Largest number of grid points, over all distinct events, on which the PRV
accountant may discretize; above, RDP bounds epsilon instead. Opacus 1.6
took about 100 bytes per point here: at q = 1, z = 0.5 and 1000 steps its
grid of 4.9e7 points failed to allocate after 4.8 GB, and at z = 0.1 it
asked for 9 GB at once. The bound keeps the accountant near 1.7 GB."""

MAX_PRV_ENTRIES = 8
"""Most distinct (noise multiplier, sample rate) pairs that the PRV
accountant composes; above, RDP bounds epsilon instead. Sizing and building
each entry's grid costs time: 100 distinct noise multipliers at q = 0.1
took 58 s and 2.1 GB here. A run with fixed settings has one entry."""

MAX_PRV_STEPS = 1000
"""Maximum steps that the PRV accountant composes. Its memory and time grow with
the steps: at q = 1 and epsilon 1, finding z for 1000 steps took 1.3 GB and
11 s on a 2-core VM, and the search for 100,000 steps tried to allocate
84 GiB. The RDP accountant has no such limit."""

PRV_MIN_NOISE_MULTIPLIER = 0.1
"""Smallest noise multiplier that the PRV accountant analyses; RDP takes the rest.

With q = 1 and 3 steps, Opacus 1.6's PRV accountant returned infinity for
0.05, 0.03 and 0.01 (3.4 GB of memory and 25 s for 0.01), and tried to
allocate 13.8 GiB for 0.001. For 0.1 it took 0.4 GB and returned 223.
"""

MAX_SEARCH_NOISE_MULTIPLIER = 2.0**14
"""Largest noise multiplier that `noise_multiplier_for_target` tries."""

SEARCH_RELATIVE_TOLERANCE = 1e-3
"""Default relative width at which the noise multiplier search stops."""

MIN_DISCRETE_SIGMA = 0.5
"""Smallest per-client sigma for which the sum-of-discrete-Gaussians bound holds."""

TAU_FACTOR = 10.0
"""Constant in the tau term of the Kairouz, Liu and Steinke (2021) bound."""

SUBSAMPLING_HIGHER_ORDER_FACTOR = 3.0
"""Factor on the terms l >= 3 of the general Poisson-subsampled RDP bound."""

_RDP_CACHE_SIZE = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussianEvent:
    """Steps of the sampled Gaussian mechanism, with L2 sensitivity 1 after scaling.

    Attributes:
        noise_multiplier: z, the noise standard deviation over the L2
            sensitivity, positive.
        sample_rate: q, the Poisson sampling probability of each client in
            (0, 1]. The value 1.0 means no amplification.
        num_steps: Number of identical steps, at least 1.

    """

    noise_multiplier: float
    sample_rate: float
    num_steps: int = 1

    def __post_init__(self) -> None:
        check_noise_multiplier("noise_multiplier", self.noise_multiplier)
        _check_sample_rate(self.sample_rate)
        _check_positive_int("num_steps", self.num_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedDiscreteGaussianEvent:
    """Steps that release a sum of discrete Gaussian noised integer updates.

    Every surviving client adds N_Z(0, sigma_client**2) noise to each
    coordinate of its quantized update, and the sum over the survivors is
    released. Sensitivities are in integer units, after quantization.

    Attributes:
        sigma_client: Each client's discrete Gaussian sigma, at least 0.5.
        num_survivors: n, the number of clients whose noise is in the sum,
            at least 1.
        l2_sensitivity: Bound on the L2 norm of one client's quantized
            update, for example from `quantized_l2_sensitivity`, positive.
        dimension: d, the number of coordinates, at least 1.
        l1_sensitivity: Bound on the L1 norm of one client's quantized
            update. None uses min(sqrt(d) * l2, l2**2), which holds for any
            integer vector.
        sample_rate: q, the Poisson sampling probability of each client in
            (0, 1].
        num_steps: Number of identical steps, at least 1.

    """

    sigma_client: float
    num_survivors: int
    l2_sensitivity: float
    dimension: int
    l1_sensitivity: float | None = None
    sample_rate: float = 1.0
    num_steps: int = 1

    def __post_init__(self) -> None:
        _check_positive("sigma_client", self.sigma_client)
        if self.sigma_client < MIN_DISCRETE_SIGMA:
            raise ValueError(
                f"sigma_client must be at least {MIN_DISCRETE_SIGMA}. "
                f"Found {self.sigma_client}."
            )
        _check_positive_int("num_survivors", self.num_survivors)
        _check_positive("l2_sensitivity", self.l2_sensitivity)
        _check_positive_int("dimension", self.dimension)
        if self.l1_sensitivity is not None:
            _check_positive("l1_sensitivity", self.l1_sensitivity)
        _check_sample_rate(self.sample_rate)
        _check_positive_int("num_steps", self.num_steps)


PrivacyEvent = GaussianEvent | DistributedDiscreteGaussianEvent


class PrivacyAccountant:
    """Ledger of DP steps that reports the epsilon spent for a fixed delta.

    The accountant composes every recorded event: Gaussian events with
    Opacus's RDP or PRV analysis, distributed discrete Gaussian events with
    RDP only. Record what actually happened in a round (the clients that
    were aggregated, the survivors of distributed noise), not the plan.
    """

    def __init__(self, *, accountant: str = ACCOUNTANT_RDP, delta: float) -> None:
        """Create an empty ledger.

        Args:
            accountant: "rdp" or "prv".
            delta: Target delta in [`MIN_DELTA`, `MAX_DELTA`).

        Raises:
            ValueError: If an argument is invalid.

        """
        _check_accountant(accountant)
        _check_delta(delta)

        self._accountant = accountant
        self._delta = delta
        self._events: list[PrivacyEvent] = []
        self._epsilon: float | None = 0.0

    @property
    def accountant(self) -> str:
        """Name of the analysis: "rdp" or "prv"."""
        return self._accountant

    @property
    def delta(self) -> float:
        """Target delta of the reported epsilon."""
        return self._delta

    @property
    def history(self) -> tuple[PrivacyEvent, ...]:
        """Recorded events, oldest first."""
        return tuple(self._events)

    @property
    def num_steps(self) -> int:
        """Total number of steps recorded."""
        return sum(event.num_steps for event in self._events)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the accountant's delta, 0.0 before any step."""
        if self._epsilon is None:
            self._epsilon = compute_epsilon(
                self._events, delta=self._delta, accountant=self._accountant
            )
        return self._epsilon

    def step(
        self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1
    ) -> None:
        """Record `num_steps` steps of the sampled Gaussian mechanism.

        Raises:
            ValueError: If an argument is out of range (see `GaussianEvent`).

        """
        self.record(
            GaussianEvent(
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                num_steps=num_steps,
            )
        )

    def record(self, event: PrivacyEvent) -> None:
        """Append an event to the ledger.

        Raises:
            ValueError: If the event is not supported by this accountant.

        """
        _check_event(event, accountant=self._accountant)

        self._events.append(event)
        self._epsilon = None
        logger.debug("Recorded privacy event %s", event)

    def projected_epsilon(self, event: PrivacyEvent) -> float:
        """Compute the epsilon that recording `event` would give, without recording it.

        Raises:
            ValueError: If the event is not supported by this accountant.

        """
        _check_event(event, accountant=self._accountant)

        return compute_epsilon(
            [*self._events, event], delta=self._delta, accountant=self._accountant
        )

    def would_exceed(self, event: PrivacyEvent, *, target_epsilon: float) -> bool:
        """Return whether recording `event` would take epsilon above `target_epsilon`.

        Call it before a round with the round's planned parameters and stop
        the run when it returns True. A round that then runs as planned stays
        within the budget, but one with fewer survivors than planned (less
        distributed noise) can exceed it, and the ledger records that.

        Raises:
            ValueError: If `target_epsilon` is not finite and positive or the
                event is not supported by this accountant.

        """
        _check_positive("target_epsilon", target_epsilon)

        return self.projected_epsilon(event) > target_epsilon


def compute_epsilon(
    events: Sequence[PrivacyEvent], *, delta: float, accountant: str
) -> float:
    """Compute the epsilon of the composition of `events` at `delta`.

    Args:
        events: Events to compose, may be empty.
        delta: Target delta in [`MIN_DELTA`, `MAX_DELTA`).
        accountant: "rdp" or "prv". PRV supports only Gaussian events.

    Returns:
        Epsilon, non-negative, and 0.0 for no events.

    Raises:
        ValueError: If an argument is invalid.

    """
    _check_accountant(accountant)
    _check_delta(delta)
    for event in events:
        _check_event(event, accountant=accountant)
    if not events:
        return 0.0

    if accountant == ACCOUNTANT_PRV:
        return _prv_epsilon(events, delta=delta)

    return _rdp_epsilon(events, delta=delta)


def client_sample_rate(*, sampling: str, num_sampled: int, num_clients: int) -> float:
    """Return the sample rate q to give the accountant for client sampling.

    Opacus's RDP and PRV accountants analyse Poisson subsampling: each client
    joins a round independently with probability q, and neighbouring
    datasets differ by adding or removing one client. Only then does
    q = num_sampled / num_clients amplify privacy, with num_sampled the
    expected number of clients per round.

    Sampling a fixed number of clients uniformly without replacement, as
    Flower 1.42's strategies do, has its own amplification result (Wang,
    Balle and Kasiviswanathan 2019) for the replace-one neighbouring
    relation, which these accountants do not implement. Feeding them q would understate
    epsilon, so "fixed_size" and "all" return 1.0: no amplification, which is
    always a valid bound.

    Args:
        sampling: "poisson", "fixed_size" or "all".
        num_sampled: Clients per round (expected number under Poisson
            sampling), from 1 to `num_clients`.
        num_clients: Clients that could be sampled, at least 1.

    Returns:
        The sample rate in (0, 1].

    Raises:
        ValueError: If `sampling` is unknown or the counts are out of range.

    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}. Found {sampling!r}.")
    _check_positive_int("num_sampled", num_sampled)
    _check_positive_int("num_clients", num_clients)
    if num_sampled > num_clients:
        raise ValueError(
            f"num_sampled must be at most num_clients ({num_clients}). "
            f"Found {num_sampled}."
        )

    if sampling == SAMPLING_POISSON:
        return num_sampled / num_clients
    return 1.0


def noise_multiplier_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    num_steps: int,
    accountant: str = ACCOUNTANT_RDP,
    relative_tolerance: float = SEARCH_RELATIVE_TOLERANCE,
) -> float:
    """Find the smallest noise multiplier whose epsilon is at most the target.

    Epsilon decreases as the noise multiplier z grows. The search doubles or
    halves z from 1 until it brackets the target, then bisects. It only ever
    returns a z whose epsilon it computed to be <= `target_epsilon`, and it
    computes that epsilon once more with a fresh ledger before returning.
    The result is within `relative_tolerance` of the smallest such z, or
    `MIN_SEARCH_NOISE_MULTIPLIER` if even that meets the target.

    Args:
        target_epsilon: Epsilon budget for all steps, positive.
        delta: Target delta in [`MIN_DELTA`, `MAX_DELTA`).
        sample_rate: q in (0, 1].
        num_steps: Number of steps, at least 1.
        accountant: "rdp" or "prv".
        relative_tolerance: Bisection stops when (high - low) <= tolerance *
            high, in (0, 1).

    Returns:
        The noise multiplier.

    Raises:
        ValueError: If an argument is invalid.
        TargetEpsilonUnreachableError: If the target needs more noise than
            `MAX_SEARCH_NOISE_MULTIPLIER`.
        RuntimeError: If the final check finds epsilon above the target.

    """
    _check_positive("target_epsilon", target_epsilon)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_positive_int("num_steps", num_steps)
    _check_accountant(accountant)
    if not 0 < relative_tolerance < 1:
        raise ValueError(
            f"relative_tolerance must be in (0, 1). Found {relative_tolerance}."
        )

    def epsilon_of(noise_multiplier: float) -> float:
        event = GaussianEvent(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            num_steps=num_steps,
        )
        return compute_epsilon([event], delta=delta, accountant=accountant)

    def meets_target(noise_multiplier: float) -> bool:
        return epsilon_of(noise_multiplier) <= target_epsilon

    try:
        low, high = _bracket_noise_multiplier(meets_target, target_epsilon)
    except TargetEpsilonUnreachableError as error:
        limit = error.noise_multiplier_limit
        reached = epsilon_of(limit)
        raise TargetEpsilonUnreachableError(
            f"{error} At noise multiplier {limit} epsilon is {reached:.6g}.",
            target_epsilon=target_epsilon,
            noise_multiplier_limit=limit,
            epsilon_at_limit=reached,
        ) from None
    while low > 0 and high - low > relative_tolerance * high:
        middle = 0.5 * (low + high)
        if meets_target(middle):
            high = middle
        else:
            low = middle

    final_epsilon = epsilon_of(high)
    if final_epsilon > target_epsilon:
        raise RuntimeError(
            f"The noise multiplier search returned {high}, whose epsilon "
            f"{final_epsilon} is above target_epsilon {target_epsilon}."
        )

    return high


def rounds_within_budget(
    *,
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = ACCOUNTANT_RDP,
    max_rounds: int = 100_000,
) -> int:
    """Count the steps that fit in an epsilon budget.

    Returns the largest T <= `max_rounds` such that T steps with the given
    noise multiplier and sample rate have epsilon <= `target_epsilon`, or 0
    if even one step exceeds it. Epsilon is non-decreasing in T, so doubling
    followed by bisection finds T.

    Raises:
        ValueError: If an argument is invalid.

    """
    _check_positive("target_epsilon", target_epsilon)
    _check_positive_int("max_rounds", max_rounds)

    def fits(num_steps: int) -> bool:
        event = GaussianEvent(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            num_steps=num_steps,
        )
        return compute_epsilon([event], delta=delta, accountant=accountant) <= (
            target_epsilon
        )

    if not fits(1):
        return 0
    low = 1
    while low < max_rounds and fits(min(2 * low, max_rounds)):
        low = min(2 * low, max_rounds)
    if low == max_rounds:
        return max_rounds

    high = min(2 * low, max_rounds)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle

    return low


def quantized_l2_sensitivity(
    *,
    clipping_norm: float,
    quantization_scale: float,
    dimension: int,
    beta: float = 0.0,
) -> float:
    """Bound the L2 norm of an update after scaling and stochastic rounding.

    An update with L2 norm at most C is multiplied by the scale s and each
    coordinate is rounded up or down at random, to an integer at distance
    less than 1. With c = C * s and d coordinates:

    - Always: ||rounded|| <= c + sqrt(d), by the triangle inequality.
    - With beta > 0: E||rounded||**2 <= c**2 + d / 4, and each squared
      coordinate ranges over an interval of width at most 2 |x_i| + 1, so
      Hoeffding's inequality gives ||rounded||**2 <= c**2 + d / 4 +
      sqrt(2 ln(1 / beta)) * (c + sqrt(d) / 2) with probability at least
      1 - beta. This holds for every update only if the encoder re-draws
      any rounding whose norm is above the bound. Kairouz, Liu and Steinke
      (2021) call this conditional randomized rounding. Each attempt
      succeeds with probability at least 1 - beta.

    Args:
        clipping_norm: C, the L2 clipping norm in model units, positive.
        quantization_scale: s, integers per model unit, positive.
        dimension: d, the number of coordinates, at least 1.
        beta: Probability in [0, 1) allowed for the Hoeffding bound to fail.
            0 returns the deterministic bound.

    Returns:
        The L2 sensitivity in integer units.

    Raises:
        ValueError: If an argument is out of range.

    """
    _check_positive("clipping_norm", clipping_norm)
    _check_positive("quantization_scale", quantization_scale)
    _check_positive_int("dimension", dimension)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1). Found {beta}.")

    scaled_norm = clipping_norm * quantization_scale
    root_dimension = math.sqrt(dimension)
    deterministic_bound = scaled_norm + root_dimension
    if beta == 0:
        return deterministic_bound

    squared_bound = (
        scaled_norm**2
        + dimension / 4
        + math.sqrt(2 * math.log(1 / beta)) * (scaled_norm + root_dimension / 2)
    )

    return min(deterministic_bound, math.sqrt(squared_bound))


def distributed_discrete_gaussian_rdp(
    event: DistributedDiscreteGaussianEvent,
    *,
    orders: Sequence[float] = RDP_ORDERS,
) -> npt.NDArray[np.float64]:
    """Bound the RDP of one step of the distributed discrete Gaussian mechanism.

    Without sampling this is Proposition 14 of Kairouz, Liu and Steinke
    (2021, "The Distributed Discrete Gaussian Mechanism for Federated
    Learning with Secure Aggregation"): for n >= 1 clients that each add
    N_Z(0, sigma**2)^d with sigma >= 1/2, sensitivities Delta_1 and Delta_2,
    a_1 = Delta_1 / (sqrt(n) sigma), a_2 = Delta_2 / (sqrt(n) sigma) and

        tau = 10 * sum_{k=1}^{n-1} exp(-2 pi**2 sigma**2 k / (k + 1)),

    the sum is (alpha, eps(alpha))-RDP for all alpha >= 1 with eps(alpha) the
    minimum of

        alpha a_2**2 / 2 + tau d,
        alpha / 2 * (a_2**2 + 2 a_1 tau + tau**2 d),
        alpha / 2 * (a_2 + tau sqrt(d))**2.

    With tau = 0 (one client) this is the continuous Gaussian's RDP, and tau
    is what the sum of several discrete Gaussians costs on top of it. The
    bound returned is the least of these bounds for 1 to n clients, which
    is valid because the other clients' noise and data are post-processing
    for one client's privacy. It never grows with n, although tau does.

    With sample rate q < 1, the general Poisson-subsampling bound of Zhu and
    Wang (2019, "Poisson Subsampled Renyi Differential Privacy") is applied
    at integer orders alpha >= 2:

        eps_q(alpha) <= log((1-q)**(alpha-1) (1 + (alpha-1) q)
                            + C(alpha, 2) q**2 (1-q)**(alpha-2) e**eps(2)
                            + 3 sum_{l=3}^{alpha} C(alpha, l) q**l
                                (1-q)**(alpha-l) e**((l-1) eps(l)))
                        / (alpha - 1),

    and the smaller of eps_q and eps is kept. A fractional order uses the
    bound of the next integer order, which is valid because RDP is
    non-decreasing in alpha.

    Args:
        event: The step's parameters. Its `num_steps` is ignored here.
        orders: Renyi orders, each > 1.

    Returns:
        eps(alpha) for each order, for one step.

    """
    orders_array = np.asarray(orders, dtype=np.float64)
    base_rdp = _sum_of_discrete_gaussians_rdp(event)
    if event.sample_rate == 1.0:
        return base_rdp(orders_array)

    integer_orders = np.maximum(np.ceil(orders_array), 2.0).astype(np.int64)
    subsampled = _poisson_subsampled_rdp(
        base_rdp, sample_rate=event.sample_rate, orders=integer_orders
    )

    return np.minimum(subsampled, base_rdp(orders_array))


def distributed_discrete_gaussian_epsilon(
    event: DistributedDiscreteGaussianEvent, *, delta: float
) -> float:
    """Compute the epsilon of `event.num_steps` steps of distributed DP noise.

    Args:
        event: The steps' parameters, with the number of clients that really
            survived each step.
        delta: Target delta in [`MIN_DELTA`, `MAX_DELTA`).

    Returns:
        Epsilon at `delta` from the RDP bound of
        `distributed_discrete_gaussian_rdp`.

    Raises:
        ValueError: If `delta` is out of range.

    """
    return compute_epsilon([event], delta=delta, accountant=ACCOUNTANT_RDP)


def _sum_of_discrete_gaussians_rdp(
    event: DistributedDiscreteGaussianEvent,
) -> Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
    """Return the RDP bound of the sum, the least of the bounds for 1 to n clients.

    For one client's privacy, the sum over n clients is the sum over any k of
    them that include it, plus noise and data that do not depend on it. That
    is post-processing, so the bound for k clients holds for n as well. The
    bound of Proposition 14 can grow with k when sigma is small, because tau
    does. Taking the least over k keeps the bound non-increasing in n.
    """
    num_clients = event.num_survivors
    sigma = event.sigma_client
    dimension = event.dimension
    l2 = event.l2_sensitivity
    l1 = event.l1_sensitivity
    if l1 is None:
        l1 = min(math.sqrt(dimension) * l2, l2**2)

    # tau for k clients sums the terms j = 1 .. k - 1, so tau[0] = 0 for k = 1.
    # NOTE: time and memory grow with n: one target-mode plan at 50,000
    # clients per round took 42 s and 0.86 GB here, against 5.7 s at 5,000.
    j = np.arange(1, num_clients, dtype=np.float64)
    terms = np.exp(-2 * math.pi**2 * sigma**2 * j / (j + 1))
    tau = TAU_FACTOR * np.concatenate(([0.0], np.cumsum(terms)))[:, np.newaxis]
    sum_std = np.sqrt(np.arange(1, num_clients + 1, dtype=np.float64)) * sigma
    l2_ratio = (l2 / sum_std)[:, np.newaxis]
    l1_ratio = (l1 / sum_std)[:, np.newaxis]

    def rdp(orders: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        first = orders * l2_ratio**2 / 2 + tau * dimension
        second = orders / 2 * (l2_ratio**2 + 2 * l1_ratio * tau + tau**2 * dimension)
        third = orders / 2 * (l2_ratio + tau * math.sqrt(dimension)) ** 2
        bounds = np.minimum(np.minimum(first, second), third)
        return np.asarray(np.min(bounds, axis=0), dtype=np.float64)

    return rdp


def _poisson_subsampled_rdp(
    base_rdp: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
    *,
    sample_rate: float,
    orders: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    log_q = math.log(sample_rate)
    log_1mq = math.log1p(-sample_rate)
    max_order = int(np.max(orders))
    levels = np.arange(2, max_order + 1, dtype=np.float64)
    base_at_levels = base_rdp(levels)

    result = np.empty(orders.shape, dtype=np.float64)
    for position, alpha in enumerate(orders.tolist()):
        result[position] = _subsampled_rdp_at_order(
            alpha,
            base_at_levels=base_at_levels[: alpha - 1],
            log_q=log_q,
            log_1mq=log_1mq,
        )
    return result


def _subsampled_rdp_at_order(
    alpha: int,
    *,
    base_at_levels: npt.NDArray[np.float64],
    log_q: float,
    log_1mq: float,
) -> float:
    # base_at_levels[i] is eps(l) for l = i + 2, up to l = alpha.
    levels = np.arange(2, alpha + 1, dtype=np.float64)
    log_binomial = np.array(
        [_log_binomial(alpha, level) for level in range(2, alpha + 1)],
        dtype=np.float64,
    )
    log_terms = (
        log_binomial
        + levels * log_q
        + (alpha - levels) * log_1mq
        + (levels - 1) * base_at_levels
    )
    log_terms[1:] += math.log(SUBSAMPLING_HIGHER_ORDER_FACTOR)
    first_term = (alpha - 1) * log_1mq + math.log1p((alpha - 1) * math.exp(log_q))

    total = _log_sum_exp(np.concatenate(([first_term], log_terms)))

    return total / (alpha - 1)


def _log_binomial(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_sum_exp(values: npt.NDArray[np.float64]) -> float:
    largest = float(np.max(values))
    if math.isinf(largest):
        return largest
    return largest + math.log(float(np.sum(np.exp(values - largest))))


def rdp_epsilon_floor(delta: float) -> float:
    """Return the smallest epsilon the RDP accountant reports at ``delta``.

    With RDP orders up to `RDP_ORDERS`' largest, the conversion to
    (epsilon, delta) leaves a positive epsilon even at zero RDP, so a target
    below this value is out of reach whatever the noise.

    Raises:
        ValueError: If ``delta`` is not in [`MIN_DELTA`, `MAX_DELTA`).
    """
    _check_delta(delta)
    return _rdp_epsilon([], delta=delta)


def _rdp_epsilon(events: Sequence[PrivacyEvent], *, delta: float) -> float:
    from ._opacus import opacus_rdp

    total = np.zeros(len(RDP_ORDERS), dtype=np.float64)
    for event in events:
        if isinstance(event, GaussianEvent):
            per_step = _gaussian_rdp(event.sample_rate, event.noise_multiplier)
        else:
            per_step = _distributed_rdp(dataclasses.replace(event, num_steps=1))
        total += event.num_steps * np.asarray(per_step, dtype=np.float64)

    with warnings.catch_warnings():
        # Opacus warns when the best order is at the end of the grid, but the
        # result is still a valid, if looser, bound.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = opacus_rdp.get_privacy_spent(
            orders=list(RDP_ORDERS), rdp=total, delta=delta
        )

    # The conversion can go slightly below 0 for tiny RDP, and 0 is the floor.
    return max(float(epsilon), 0.0)


# A ledger recomputes epsilon from every event after each round, and most
# rounds repeat the same parameters, so the per-step RDP curves are cached.
@functools.lru_cache(maxsize=_RDP_CACHE_SIZE)
def _gaussian_rdp(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    from ._opacus import opacus_rdp

    per_step = opacus_rdp.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=list(RDP_ORDERS),
    )
    return tuple(float(value) for value in per_step)


@functools.lru_cache(maxsize=_RDP_CACHE_SIZE)
def _distributed_rdp(event: DistributedDiscreteGaussianEvent) -> tuple[float, ...]:
    per_step = distributed_discrete_gaussian_rdp(event, orders=RDP_ORDERS)
    return tuple(float(value) for value in per_step)


def _prv_epsilon(events: Sequence[PrivacyEvent], *, delta: float) -> float:
    from ._opacus import PRVAccountant

    # Events with the same parameters become one history entry, wherever
    # they occur, because composition does not depend on the order and
    # Opacus builds a grid for every entry.
    steps_by_parameters: dict[tuple[float, float], int] = {}
    for event in events:
        if not isinstance(event, GaussianEvent):
            continue
        parameters = (event.noise_multiplier, event.sample_rate)
        steps_by_parameters[parameters] = (
            steps_by_parameters.get(parameters, 0) + event.num_steps
        )
    history = [(z, q, steps) for (z, q), steps in steps_by_parameters.items()]

    total_steps = sum(entry[2] for entry in history)
    if total_steps > MAX_PRV_STEPS:
        raise ValueError(
            f"The PRV accountant composes at most {MAX_PRV_STEPS} steps, because "
            f"its memory grows with them. Found {total_steps} steps; use the "
            "'rdp' accountant for more."
        )
    smallest = min((entry[0] for entry in history), default=math.inf)
    if smallest < PRV_MIN_NOISE_MULTIPLIER:
        _warn_prv_fallback()
        return _rdp_epsilon(events, delta=delta)

    # Opacus discretizes every entry on its own grid and keeps them all.
    if len(history) > MAX_PRV_ENTRIES:
        _warn_prv_size_fallback(
            f"The PRV accountant composes at most {MAX_PRV_ENTRIES} distinct "
            f"(noise multiplier, sample rate) pairs. Found {len(history)}"
        )
        return _rdp_epsilon(events, delta=delta)
    points = _prv_grid_points(history, delta=delta) * len(history)
    if points > MAX_PRV_GRID_POINTS:
        _warn_prv_size_fallback(
            f"The PRV accountant would discretize these steps on about "
            f"{points:.3g} points, more than {MAX_PRV_GRID_POINTS}"
        )
        return _rdp_epsilon(events, delta=delta)

    prv = PRVAccountant()
    prv.history = history
    try:
        # Opacus 1.6 takes log(1 - q) = log(0) for q = 1 and handles the -inf.
        with np.errstate(divide="ignore"):
            epsilon = prv.get_epsilon(delta=delta, eps_error=PRV_EPSILON_ERROR)
    except ValueError as error:
        # Opacus rejects a delta below its rounding error, which grows with
        # the size of its discretization, so with more steps and less noise.
        if not str(error).startswith(_PRV_PRECISION_MESSAGE):
            raise
        _warn_prv_precision_fallback()
        return _rdp_epsilon(events, delta=delta)

    return max(float(epsilon), 0.0)


def _prv_grid_points(
    history: Sequence[tuple[float, float, int]], *, delta: float
) -> float:
    """Estimate the points of the grid on which Opacus discretizes the PRVs.

    Opacus 1.6 spans [-L, L], where L - 3 is the larger of the RDP epsilon
    of all steps at delta_error / 4 and of one step at delta_error / (8 T),
    for T steps and delta_error = delta / 1000, its default. Its mesh is
    eps_error / sqrt(T ln(12 / delta_error) / 2). This repeats that sizing
    with this module's RDP orders and cached curves: a noise multiplier
    search at q = 0.1 over 20 steps took 0.74 s with it and 1.09 s with
    Opacus's own sizing. The estimate is within 1% of Opacus's grid for
    moderate noise, and up to 11% above it at q = 1 with z <= 0.5.
    """
    delta_error = delta / 1000
    total_steps = sum(steps for _, _, steps in history)
    composed = _rdp_epsilon(
        [
            GaussianEvent(noise_multiplier=z, sample_rate=q, num_steps=steps)
            for z, q, steps in history
        ],
        delta=delta_error / 4,
    )
    single = max(
        _rdp_epsilon(
            [GaussianEvent(noise_multiplier=z, sample_rate=q)],
            delta=delta_error / (8 * total_steps),
        )
        for z, q, _ in history
    )

    half_width = max(composed, single, PRV_EPSILON_ERROR) + 3
    mesh = PRV_EPSILON_ERROR / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


_PRV_PRECISION_MESSAGE = "Floating point errors will dominate"
"""Start of the error that Opacus 1.6's PRV accountant raises for a small delta."""


@functools.cache
def _warn_prv_precision_fallback() -> None:
    # Once per process, like the warning below.
    logger.warning(
        "The PRV accountant rejects this delta as below its floating-point "
        "error for these steps, so the RDP accountant bounds epsilon instead"
    )


_PRV_GRID_WARNED = threading.Event()
"""Set once a PRV size warning is logged, so a search logs one."""


def _warn_prv_size_fallback(reason: str) -> None:
    if _PRV_GRID_WARNED.is_set():
        return
    _PRV_GRID_WARNED.set()
    logger.warning("%s, so the RDP accountant bounds epsilon instead", reason)


@functools.cache
def _warn_prv_fallback() -> None:
    # Once per process: a noise multiplier search may call this many times.
    logger.warning(
        "The PRV accountant cannot analyse noise multipliers below %g, so the "
        "RDP accountant bounds epsilon for them instead",
        PRV_MIN_NOISE_MULTIPLIER,
    )


class TargetEpsilonUnreachableError(ValueError):
    """No noise multiplier up to a search limit meets a target epsilon.

    Attributes:
        target_epsilon: The target that was requested.
        noise_multiplier_limit: The largest noise multiplier tried that
            misses the target; the target needs more noise than this.
        epsilon_at_limit: Epsilon at ``noise_multiplier_limit``, or None
            where it was not computed. Epsilon stops falling as noise grows
            once the conversion from RDP dominates, so a value close to the
            target shows that more noise cannot help.
        limited_by_modulus: Whether larger noise multipliers were left out
            because their noise would not fit the modulus of a secure sum.
    """

    def __init__(
        self,
        message: str,
        *,
        target_epsilon: float,
        noise_multiplier_limit: float,
        epsilon_at_limit: float | None = None,
        limited_by_modulus: bool = False,
    ) -> None:
        super().__init__(message)
        self.target_epsilon = target_epsilon
        self.noise_multiplier_limit = noise_multiplier_limit
        self.epsilon_at_limit = epsilon_at_limit
        self.limited_by_modulus = limited_by_modulus


def _bracket_noise_multiplier(
    meets_target: Callable[[float], bool], target_epsilon: float
) -> tuple[float, float]:
    """Return (low, high) with meets_target(high) and not meets_target(low).

    low is 0 when even `MIN_SEARCH_NOISE_MULTIPLIER` meets the target.
    """
    high = 1.0
    if meets_target(high):
        low = high / 2
        while meets_target(low):
            high = low
            if high <= MIN_SEARCH_NOISE_MULTIPLIER:
                return 0.0, high
            low = high / 2
        return low, high

    low = high
    while True:
        high = 2 * low
        if high > MAX_SEARCH_NOISE_MULTIPLIER:
            raise TargetEpsilonUnreachableError(
                f"target_epsilon {target_epsilon} needs a noise multiplier above "
                f"{MAX_SEARCH_NOISE_MULTIPLIER}. Raise target_epsilon or delta, "
                "or lower the sample rate or the number of steps.",
                target_epsilon=target_epsilon,
                noise_multiplier_limit=MAX_SEARCH_NOISE_MULTIPLIER,
            )
        if meets_target(high):
            return low, high
        low = high


def _check_event(event: PrivacyEvent, *, accountant: str) -> None:
    if not isinstance(event, GaussianEvent | DistributedDiscreteGaussianEvent):
        raise ValueError(
            "event must be a GaussianEvent or a DistributedDiscreteGaussianEvent. "
            f"Found {type(event).__name__}."
        )
    if isinstance(event, DistributedDiscreteGaussianEvent) and (
        accountant != ACCOUNTANT_RDP
    ):
        raise ValueError(
            "DistributedDiscreteGaussianEvent needs accountant 'rdp', because its "
            f"privacy is known only as an RDP bound. Found {accountant!r}."
        )


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {ACCOUNTANTS}. Found {accountant!r}."
        )


def _check_delta(delta: float) -> None:
    check_delta("delta", delta)


def check_delta(name: str, value: object) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a usable delta.

    It must be a number in [`MIN_DELTA`, `MAX_DELTA`).
    """
    number = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if not number or not MIN_DELTA <= float(value) < MAX_DELTA:  # type: ignore[arg-type]
        raise ValueError(
            f"{name} must be in [{MIN_DELTA:g}, {MAX_DELTA:g}): delta is the "
            f"probability that the guarantee fails outright. Found {value!r}."
        )


def _check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]. Found {sample_rate}.")


def check_noise_multiplier(name: str, value: float) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a usable multiplier.

    It must be finite, at least `MIN_NOISE_MULTIPLIER` and at most
    `MAX_SEARCH_NOISE_MULTIPLIER`.
    """
    if not math.isfinite(value) or value < MIN_NOISE_MULTIPLIER:
        raise ValueError(
            f"{name} must be finite and at least {MIN_NOISE_MULTIPLIER} (2**-10); "
            f"smaller values protect nothing. Found {value}."
        )
    if value > MAX_SEARCH_NOISE_MULTIPLIER:
        raise ValueError(
            f"{name} must be at most {MAX_SEARCH_NOISE_MULTIPLIER} (2**14), the "
            "largest that a target epsilon selects; more noise leaves nothing of "
            f"the updates. Found {value}."
        )


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and positive. Found {value}.")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int. Found {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1. Found {value}.")
