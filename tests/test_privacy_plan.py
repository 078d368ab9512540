"""Target mode of distributed DP when clients drop out, on ServerPrivacy alone.

Each simulated round records what the secure sum would release: the noise
of every client that sent its input. The server aborts a round with fewer
inputs than the plan's ``min_inputs`` before unmasking, so the simulation
draws survivors between that minimum and all sampled clients.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from fedsec_flwr.dp import TargetEpsilonUnreachableError
from fedsec_flwr.dp.accounting import MIN_NOISE_MULTIPLIER
from fedsec_flwr.privacy import (
    DPConfig,
    DPMode,
    NoiseHeadroomError,
    RoundNotPlannedError,
    ServerPrivacy,
    min_noised_inputs,
)

DIMENSION = 25_810
MODULUS = 2**32


def server(
    *,
    target: float,
    rounds: int,
    fraction: float,
    sample_rate: float = 1.0,
    max_clients: int = 60,
    adaptive: bool = False,
) -> ServerPrivacy:
    config = DPConfig(
        mode=DPMode.DISTRIBUTED,
        target_epsilon=target,
        max_dropout_fraction=fraction,
        adaptive_clipping=adaptive,
    )
    return ServerPrivacy(
        config=config,
        num_rounds=rounds,
        sample_rate=sample_rate,
        max_clients=max_clients,
        modulus=MODULUS,
    )


@pytest.mark.parametrize(
    ("num_sampled", "fraction", "expected"),
    [(5, 0.1, 5), (10, 0.1, 9), (40, 0.1, 36), (5, 0.4, 3), (7, 0.0, 7), (3, 0.9, 1)],
)
def test_min_noised_inputs(num_sampled: int, fraction: float, expected: int) -> None:
    assert min_noised_inputs(num_sampled, fraction) == expected


GRID = list(
    itertools.product(
        [1.0, 8.0],  # target epsilon
        [1, 4, 10],  # rounds
        [(5, 0.4), (40, 0.1), (40, 0.3)],  # sampled clients, dropout fraction
        [1.0, 0.1],  # sample rate
    )
)


@pytest.mark.parametrize(("target", "rounds", "clients", "sample_rate"), GRID)
def test_dropouts_keep_epsilon_within_target(
    target: float, rounds: int, clients: tuple[int, float], sample_rate: float
) -> None:
    num_sampled, fraction = clients
    privacy = server(
        target=target, rounds=rounds, fraction=fraction, sample_rate=sample_rate
    )
    rng = random.Random(f"{target}-{rounds}-{clients}-{sample_rate}")

    epsilons = []
    for server_round in range(rounds):
        plan = privacy.plan(num_sampled=num_sampled, dimension=DIMENSION)
        assert privacy.budget_exceeded(plan, dimension=DIMENSION) is None
        assert plan.min_inputs == min_noised_inputs(num_sampled, fraction)
        # Every other round loses as many clients as allowed, the rest some.
        survivors = (
            plan.min_inputs
            if server_round % 2 == 0
            else rng.randint(plan.min_inputs, num_sampled)
        )
        epsilons.append(
            privacy.record(plan, num_aggregated=survivors, dimension=DIMENSION)
        )

    assert epsilons == sorted(epsilons)
    assert epsilons[-1] <= target


def test_noise_constant_without_dropouts() -> None:
    privacy = server(target=3.0, rounds=10, fraction=0.1)
    plans = []
    for _ in range(10):
        plan = privacy.plan(num_sampled=40, dimension=DIMENSION)
        plans.append(plan)
        privacy.record(plan, num_aggregated=40, dimension=DIMENSION)

    assert {plan.noise_multiplier for plan in plans} == {plans[0].noise_multiplier}
    # Only the next round is planned for its fewest inputs, so a run without
    # dropouts ends close to the target.
    assert 0.97 * 3.0 < privacy.epsilon <= 3.0


def test_dropouts_raise_later_noise() -> None:
    privacy = server(target=3.0, rounds=5, fraction=0.3)
    first = privacy.plan(num_sampled=40, dimension=DIMENSION)
    privacy.record(first, num_aggregated=first.min_inputs, dimension=DIMENSION)

    second = privacy.plan(num_sampled=40, dimension=DIMENSION)

    assert first.min_inputs == 28
    assert second.noise_multiplier > first.noise_multiplier
    assert second.sigma_client > first.sigma_client


def test_adaptive_bit_noise_under_dropouts() -> None:
    privacy = server(target=2.0, rounds=4, fraction=0.3, adaptive=True)
    for _ in range(4):
        plan = privacy.plan(num_sampled=20, dimension=DIMENSION)
        assert plan.bit_sigma_client > 0
        assert privacy.budget_exceeded(plan, dimension=DIMENSION) is None
        privacy.record(plan, num_aggregated=plan.min_inputs, dimension=DIMENSION)

    assert privacy.epsilon <= 2.0


def test_full_modulus_stops_run_before_round() -> None:
    privacy = server(target=2.0, rounds=3, fraction=0.4, max_clients=10)
    privacy.modulus = 2**22
    reasons = []
    for _ in range(3):
        plan = privacy.plan(num_sampled=5, dimension=100_000)
        reason = privacy.budget_exceeded(plan, dimension=100_000)
        if reason is not None:
            reasons.append(reason)
            break
        privacy.record(plan, num_aggregated=plan.min_inputs, dimension=100_000)

    assert privacy.epsilon <= 2.0
    assert len(reasons) == 1
    assert "if only 3 of its 5 clients add their noise" in reasons[0]


def test_unreachable_target_names_the_limit() -> None:
    privacy = server(target=2.0, rounds=3, fraction=0.4, max_clients=10)
    privacy.modulus = 2**21

    with pytest.raises(
        TargetEpsilonUnreachableError,
        match=r"target_epsilon 2\.0 over 3 rounds cannot be met: every noise "
        r"multiplier whose noise fits the modulus gives a larger epsilon \(the "
        r"largest tried that fits is 2\.4\d*\)\. Raise the modulus",
    ) as caught:
        privacy.plan(num_sampled=5, dimension=100_000)

    assert caught.value.limited_by_modulus
    assert 2.4 < caught.value.noise_multiplier_limit < 2.5


def test_target_beyond_search_limit_gives_epsilon_there() -> None:
    privacy = server(target=0.01, rounds=2, fraction=0.1, max_clients=10)

    with pytest.raises(
        TargetEpsilonUnreachableError,
        match=r"needs a noise multiplier above 1000\.0, the largest",
    ) as caught:
        privacy.plan(num_sampled=5, dimension=1000)

    assert not caught.value.limited_by_modulus
    assert caught.value.epsilon_at_limit is not None
    assert caught.value.epsilon_at_limit > 0.01


def test_check_target_plans_on_a_copy() -> None:
    config = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=1.0, clipping_norm=1.0)
    privacy = ServerPrivacy(
        config=config, num_rounds=2, sample_rate=1.0, max_clients=10, modulus=2**32
    )

    privacy.check_target(num_sampled=5, dimension=1000)

    assert privacy._noise_multiplier is None
    assert privacy.accountant.epsilon == 0.0


def test_check_target_rejects_noise_beyond_the_modulus() -> None:
    # A fixed noise multiplier is not calibrated, but its noise must still fit.
    config = DPConfig(
        mode=DPMode.DISTRIBUTED, noise_multiplier=800.0, clipping_norm=1.0
    )
    privacy = ServerPrivacy(
        config=config,
        num_rounds=1,
        sample_rate=1.0,
        max_clients=100,
        modulus=2**32,
        verified=True,
    )

    with pytest.raises(NoiseHeadroomError, match=r"noise_multiplier 800\.0") as caught:
        privacy.check_target(num_sampled=4, dimension=25_810)
    privacy.check_target()

    assert caught.value.noise_multiplier == 800.0
    assert caught.value.verified is True
    assert caught.value.max_noise_multiplier == 147.0
    assert str(caught.value).endswith("The largest noise_multiplier that fits is 147.")


@pytest.mark.parametrize("verified", [False, True])
def test_largest_fitting_noise_multiplier_fits(verified: bool) -> None:
    def privacy(noise_multiplier: float) -> ServerPrivacy:
        config = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=noise_multiplier)
        return ServerPrivacy(
            config=config,
            num_rounds=1,
            sample_rate=1.0,
            max_clients=100,
            modulus=MODULUS,
            verified=verified,
        )

    with pytest.raises(NoiseHeadroomError) as caught:
        privacy(16_384.0).plan(num_sampled=4, dimension=DIMENSION)
    largest = caught.value.max_noise_multiplier
    assert largest is not None

    privacy(largest).plan(num_sampled=4, dimension=DIMENSION)
    with pytest.raises(NoiseHeadroomError):
        privacy(largest * 1.01).plan(num_sampled=4, dimension=DIMENSION)


def test_small_sigma_stays_within_target() -> None:
    # With 2 quantization bits each client's sigma is below 1, where the
    # bound's tau term grows with the number of clients.
    config = DPConfig(mode=DPMode.DISTRIBUTED, target_epsilon=8.0, quantization_bits=2)
    privacy = ServerPrivacy(
        config=config, num_rounds=1, sample_rate=1.0, max_clients=250, modulus=MODULUS
    )
    plan = privacy.plan(num_sampled=200, dimension=10)

    epsilon = privacy.record(plan, num_aggregated=200, dimension=10)

    assert plan.sigma_client < 1.0
    assert epsilon <= 8.0


def test_search_below_overflowing_noise() -> None:
    # Doubling z after the dropouts of round 1 overflows a modulus of 2**23,
    # but a z in between fits both the modulus and the budget.
    privacy = server(target=2.0, rounds=3, fraction=0.4, max_clients=10)
    privacy.modulus = 2**23
    epsilons = []
    for _ in range(3):
        plan = privacy.plan(num_sampled=5, dimension=100_000)
        assert privacy.budget_exceeded(plan, dimension=100_000) is None
        epsilons.append(
            privacy.record(plan, num_aggregated=plan.min_inputs, dimension=100_000)
        )

    assert epsilons[-1] <= 2.0


def test_small_modulus_later_round_not_planned() -> None:
    privacy = server(target=2.0, rounds=3, fraction=0.4, max_clients=10)
    plan = privacy.plan(num_sampled=5, dimension=100_000)
    privacy.record(plan, num_aggregated=plan.min_inputs, dimension=100_000)
    privacy.modulus = 2**20

    with pytest.raises(RoundNotPlannedError, match="needs more noise headroom"):
        privacy.plan(num_sampled=5, dimension=100_000)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"num_sampled": 0},
            r"num_sampled must be an integer of at least 1 and at "
            r"most 60\. Found 0",
        ),
        ({"num_sampled": True}, r"num_sampled must be an integer .* Found True"),
        ({"num_sampled": 61}, r"num_sampled must be .* at most 60\. Found 61"),
        ({"dimension": 0}, r"dimension must be an integer of at least 1\. Found 0"),
        (
            {"expected_clients": float("nan")},
            r"expected_clients must be a finite number above 0\. Found nan",
        ),
        ({"expected_clients": 0.0}, r"expected_clients must be .* Found 0\.0"),
    ],
)
def test_invalid_plan_arguments_rejected(
    arguments: dict[str, object], message: str
) -> None:
    privacy = server(target=2.0, rounds=3, fraction=0.1)

    with pytest.raises(ValueError, match=message):
        privacy.plan(**{"num_sampled": 5, "dimension": 100, **arguments})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("aggregated", "message"),
    [
        (35, "num_aggregated 35 is below the round's min_inputs 36"),
        (1000, "num_aggregated 1000 is above the round's 40 sampled clients"),
    ],
)
def test_recording_impossible_input_count_rejected(
    aggregated: int, message: str
) -> None:
    privacy = server(target=2.0, rounds=3, fraction=0.1)
    plan = privacy.plan(num_sampled=40, dimension=DIMENSION)

    with pytest.raises(ValueError, match=message):
        privacy.record(plan, num_aggregated=aggregated, dimension=DIMENSION)

    assert privacy.epsilon == 0.0


def test_fixed_noise_later_round_not_planned() -> None:
    config = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=2.0)
    privacy = ServerPrivacy(
        config=config, num_rounds=3, sample_rate=1.0, max_clients=10, modulus=MODULUS
    )
    plan = privacy.plan(num_sampled=5, dimension=100_000)
    privacy.record(plan, num_aggregated=5, dimension=100_000)
    privacy.modulus = 2**20

    with pytest.raises(RoundNotPlannedError, match=r"noise_multiplier 2\.0 needs more"):
        privacy.plan(num_sampled=5, dimension=100_000)


def test_verified_plan_fits_commitment_offset() -> None:
    # The encoding alone fits a modulus of 2**20 here; the commitment offset
    # that verification adds for each of 5 clients does not.
    config = DPConfig(
        mode=DPMode.DISTRIBUTED, noise_multiplier=4.0, quantization_bits=14
    )
    plain = ServerPrivacy(
        config=config, num_rounds=1, sample_rate=1.0, max_clients=5, modulus=2**20
    )
    verified = dataclasses.replace(plain, verified=True)

    plain.plan(num_sampled=5, dimension=10)
    with pytest.raises(ValueError, match="Verification with distributed DP needs"):
        verified.plan(num_sampled=5, dimension=10)


def test_epsilon_against_server_unamplified() -> None:
    privacy = server(target=3.0, rounds=4, fraction=0.1, sample_rate=0.1)
    unamplified = server(target=3.0, rounds=4, fraction=0.1, sample_rate=1.0)
    for _ in range(4):
        plan = privacy.plan(num_sampled=40, dimension=DIMENSION)
        privacy.record(plan, num_aggregated=40, dimension=DIMENSION)
        unamplified.accountant.record(
            dataclasses.replace(privacy.accountant.history[-1], sample_rate=1.0)
        )

    assert privacy.epsilon <= 3.0
    assert privacy.epsilon_against_server == unamplified.epsilon
    assert privacy.epsilon_against_server > 3.0


def test_prv_over_step_limit_rejected() -> None:
    # The PRV accountant's memory grows with its steps, so a run that would
    # pass the limit must fail at its start, not after 1000 rounds.
    dp = DPConfig(mode=DPMode.CENTRAL, accountant="prv", noise_multiplier=1.0)

    with pytest.raises(ValueError, match="composes at most 1000 rounds"):
        ServerPrivacy(
            config=dp, num_rounds=1001, sample_rate=1.0, max_clients=10, modulus=None
        )


def test_central_bit_noise_follows_expected_clients() -> None:
    # Under Poisson sampling the first round's sample size must not set the
    # adaptive clipping's default bit noise, which shapes every later norm.
    config = DPConfig(
        mode=DPMode.CENTRAL,
        noise_multiplier=0.5,
        adaptive_clipping=True,
    )
    privacy = ServerPrivacy(
        config=config, num_rounds=3, sample_rate=0.1, max_clients=60, modulus=None
    )

    plan = privacy.plan(num_sampled=13, dimension=DIMENSION, expected_clients=40.0)

    assert plan.expected_clients == 40.0
    assert privacy.adaptive is not None
    assert privacy.adaptive.num_sampled == 40
    assert privacy.adaptive.noise_std == 2.0


@pytest.mark.parametrize("target", [1e8, 1e300])
def test_loose_target_keeps_the_smallest_noise_multiplier(target: float) -> None:
    privacy = server(target=target, rounds=2, fraction=0.1)

    plan = privacy.plan(num_sampled=40, dimension=DIMENSION)

    assert plan.noise_multiplier == MIN_NOISE_MULTIPLIER
