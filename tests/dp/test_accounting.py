import itertools
import logging
import math
import threading

import numpy as np
import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from fedsec_flwr.dp import accounting
from fedsec_flwr.dp.accounting import (
    ACCOUNTANT_PRV,
    ACCOUNTANT_RDP,
    MAX_SEARCH_NOISE_MULTIPLIER,
    MIN_DELTA,
    MIN_NOISE_MULTIPLIER,
    PRV_EPSILON_ERROR,
    PRV_MIN_NOISE_MULTIPLIER,
    RDP_ORDERS,
    DistributedDiscreteGaussianEvent,
    GaussianEvent,
    PrivacyAccountant,
    TargetEpsilonUnreachableError,
    _poisson_subsampled_rdp,
    client_sample_rate,
    compute_epsilon,
    distributed_discrete_gaussian_epsilon,
    distributed_discrete_gaussian_rdp,
    noise_multiplier_for_target,
    quantized_l2_sensitivity,
    rdp_epsilon_floor,
    rounds_within_budget,
)

DELTA = 1e-5


def gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    event = GaussianEvent(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps
    )
    return compute_epsilon([event], delta=DELTA, accountant="rdp")


def ddg_event(**changes: object) -> DistributedDiscreteGaussianEvent:
    values: dict = {
        "sigma_client": 20.0,
        "num_survivors": 10,
        "l2_sensitivity": 100.0,
        "dimension": 10_000,
    }
    return DistributedDiscreteGaussianEvent(**(values | changes))


# --- ledger ------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_zero_before_any_step(accountant: str) -> None:
    assert PrivacyAccountant(accountant=accountant, delta=DELTA).epsilon == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_non_negative_and_non_decreasing(accountant: str) -> None:
    ledger = PrivacyAccountant(accountant=accountant, delta=DELTA)
    epsilons = []

    for _ in range(5):
        ledger.step(noise_multiplier=1.0, sample_rate=0.1)
        epsilons.append(ledger.epsilon)

    assert epsilons[0] > 0
    assert all(b >= a for a, b in itertools.pairwise(epsilons))


def test_num_steps_counts_every_step() -> None:
    ledger = PrivacyAccountant(delta=DELTA)
    # Alternating parameters stop Opacus from merging history entries, which
    # is where a count of entries would differ from a count of steps.
    for noise_multiplier in [1.0, 1.0, 2.0, 1.0]:
        ledger.step(noise_multiplier=noise_multiplier, sample_rate=0.5)
    ledger.step(noise_multiplier=1.5, sample_rate=0.5, num_steps=7)

    assert ledger.num_steps == 11
    assert len(ledger.history) == 5


def test_multi_step_event_equals_repeated_steps() -> None:
    repeated = PrivacyAccountant(delta=DELTA)
    batched = PrivacyAccountant(delta=DELTA)

    for _ in range(10):
        repeated.step(noise_multiplier=1.1, sample_rate=0.05)
    batched.step(noise_multiplier=1.1, sample_rate=0.05, num_steps=10)

    assert repeated.epsilon == pytest.approx(batched.epsilon, rel=1e-12)


def test_rdp_matches_opacus_accountant() -> None:
    from opacus.accountants import RDPAccountant

    opacus_accountant = RDPAccountant()
    for _ in range(20):
        opacus_accountant.step(noise_multiplier=1.3, sample_rate=0.02)
    ledger = PrivacyAccountant(delta=DELTA)
    ledger.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=20)

    reference = opacus_accountant.get_epsilon(delta=DELTA)

    # The coarser order grid may only raise epsilon, and only a little.
    assert ledger.epsilon >= reference
    assert ledger.epsilon <= 1.05 * reference


def test_prv_not_above_rdp() -> None:
    rdp = PrivacyAccountant(accountant="rdp", delta=DELTA)
    prv = PrivacyAccountant(accountant="prv", delta=DELTA)

    for ledger in (rdp, prv):
        ledger.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=50)

    assert prv.epsilon <= rdp.epsilon


def test_would_exceed_stops_before_budget() -> None:
    target = 2.0
    ledger = PrivacyAccountant(delta=DELTA)
    event = GaussianEvent(noise_multiplier=1.5, sample_rate=0.1)

    while not ledger.would_exceed(event, target_epsilon=target):
        ledger.record(event)

    assert ledger.epsilon <= target
    assert ledger.projected_epsilon(event) > target
    assert ledger.num_steps > 0


def test_projected_epsilon_does_not_record() -> None:
    ledger = PrivacyAccountant(delta=DELTA)

    ledger.projected_epsilon(GaussianEvent(noise_multiplier=1.0, sample_rate=0.5))

    assert ledger.num_steps == 0
    assert ledger.epsilon == 0.0


def test_history_is_read_only_copy() -> None:
    ledger = PrivacyAccountant(delta=DELTA)
    ledger.step(noise_multiplier=1.0, sample_rate=0.5)

    history = ledger.history

    assert isinstance(history, tuple)
    assert history[0] == GaussianEvent(noise_multiplier=1.0, sample_rate=0.5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"accountant": "gdp"}, r"accountant must be one of \('rdp', 'prv'\)"),
        ({"delta": 0.0}, r"delta must be in \[1e-15, 0\.1\): .* Found 0\.0"),
        ({"delta": 1.0}, r"delta must be in \[1e-15, 0\.1\): .* Found 1\.0"),
        ({"delta": float("nan")}, r"delta must be in \[1e-15, 0\.1\): .* Found nan"),
        ({"delta": 5e-324}, r"delta must be in \[1e-15, 0\.1\): .* Found 5e-324"),
        ({"delta": 1e-300}, r"delta must be in \[1e-15, 0\.1\): .* Found 1e-300"),
    ],
)
def test_accountant_validation(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacyAccountant(**({"accountant": "rdp", "delta": DELTA} | arguments))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"noise_multiplier": 0.0},
            r"noise_multiplier must be finite and at least 0\.0009765625",
        ),
        (
            {"noise_multiplier": 1e-300},
            r"noise_multiplier must be finite and at least 0\.0009765625 \(2\*\*-10\)"
            r"; smaller values protect nothing\. Found 1e-300",
        ),
        ({"noise_multiplier": float("inf")}, r"noise_multiplier must be finite"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]\. Found 0\.0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]\. Found 1\.5"),
        ({"num_steps": 0}, r"num_steps must be at least 1\. Found 0"),
        ({"num_steps": 2.0}, r"num_steps must be an int\. Found 2\.0"),
        ({"num_steps": True}, r"num_steps must be an int\. Found True"),
    ],
)
def test_step_validation(arguments: dict, message: str) -> None:
    ledger = PrivacyAccountant(delta=DELTA)

    with pytest.raises(ValueError, match=message):
        ledger.step(**({"noise_multiplier": 1.0, "sample_rate": 0.1} | arguments))
    assert ledger.num_steps == 0


def test_would_exceed_validation() -> None:
    ledger = PrivacyAccountant(delta=DELTA)
    event = GaussianEvent(noise_multiplier=1.0, sample_rate=0.1)

    with pytest.raises(ValueError, match=r"target_epsilon must be finite and positive"):
        ledger.would_exceed(event, target_epsilon=0.0)


def test_record_rejects_other_objects() -> None:
    ledger = PrivacyAccountant(delta=DELTA)

    with pytest.raises(ValueError, match=r"event must be a GaussianEvent or a Dis"):
        ledger.record((1.0, 0.1, 1))  # type: ignore[arg-type]


def test_prv_rejects_distributed_event() -> None:
    ledger = PrivacyAccountant(accountant="prv", delta=DELTA)

    with pytest.raises(ValueError, match=r"needs accountant 'rdp'.*Found 'prv'"):
        ledger.record(ddg_event())


# --- client sampling ---------------------------------------------------------


def test_poisson_rate_amplifies() -> None:
    rate = client_sample_rate(sampling="poisson", num_sampled=10, num_clients=1000)

    assert rate == 0.01


@pytest.mark.parametrize("sampling", ["fixed_size", "all"])
def test_other_sampling_not_amplified(sampling: str) -> None:
    rate = client_sample_rate(sampling=sampling, num_sampled=10, num_clients=1000)

    assert rate == 1.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sampling": "Poisson"}, r"sampling must be one of .*Found 'Poisson'"),
        ({"num_sampled": 0}, r"num_sampled must be at least 1\. Found 0"),
        ({"num_clients": 0}, r"num_clients must be at least 1\. Found 0"),
        ({"num_sampled": 11}, r"num_sampled must be at most num_clients \(10\)"),
    ],
)
def test_client_sample_rate_validation(arguments: dict, message: str) -> None:
    valid = {"sampling": "poisson", "num_sampled": 5, "num_clients": 10}

    with pytest.raises(ValueError, match=message):
        client_sample_rate(**(valid | arguments))


# --- calibration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("target_epsilon", "delta", "sample_rate", "num_steps"),
    list(
        itertools.product([1.0, 3.0, 8.0], [1e-5, 1e-6], [0.01, 0.1, 1.0], [1, 10, 100])
    ),
)
def test_target_noise_never_overshoots_rdp(
    target_epsilon: float, delta: float, sample_rate: float, num_steps: int
) -> None:
    def epsilon_of(noise_multiplier: float) -> float:
        event = GaussianEvent(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            num_steps=num_steps,
        )
        return compute_epsilon([event], delta=delta, accountant="rdp")

    noise_multiplier = noise_multiplier_for_target(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        num_steps=num_steps,
    )

    assert epsilon_of(noise_multiplier) <= target_epsilon
    # Near-minimal: 0.2% less noise (twice the tolerance) exceeds the target.
    assert epsilon_of(noise_multiplier * 0.998) > target_epsilon


@pytest.mark.parametrize(
    ("target_epsilon", "sample_rate", "num_steps"),
    [(1.0, 0.1, 10), (3.0, 1.0, 10)],
)
def test_target_noise_never_overshoots_prv(
    target_epsilon: float, sample_rate: float, num_steps: int
) -> None:
    noise_multiplier = noise_multiplier_for_target(
        target_epsilon=target_epsilon,
        delta=DELTA,
        sample_rate=sample_rate,
        num_steps=num_steps,
        accountant="prv",
    )
    event = GaussianEvent(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps
    )

    assert compute_epsilon([event], delta=DELTA, accountant="prv") <= target_epsilon


def test_unreachable_target_rejected() -> None:
    with pytest.raises(
        TargetEpsilonUnreachableError, match=r"needs a noise multiplier above"
    ) as caught:
        noise_multiplier_for_target(
            target_epsilon=1e-3, delta=1e-6, sample_rate=1.0, num_steps=100
        )

    assert caught.value.target_epsilon == 1e-3
    assert caught.value.noise_multiplier_limit == MAX_SEARCH_NOISE_MULTIPLIER
    assert caught.value.epsilon_at_limit is not None
    assert caught.value.epsilon_at_limit >= rdp_epsilon_floor(1e-6)
    assert not caught.value.limited_by_modulus


@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_rdp_floor_bounds_every_epsilon(delta: float) -> None:
    floor = rdp_epsilon_floor(delta)
    loud = GaussianEvent(noise_multiplier=2.0**14, sample_rate=1.0, num_steps=1)

    assert 0 < floor < 0.1
    assert compute_epsilon([loud], delta=delta, accountant="rdp") >= floor
    with pytest.raises(TargetEpsilonUnreachableError):
        noise_multiplier_for_target(
            target_epsilon=0.99 * floor, delta=delta, sample_rate=1.0, num_steps=1
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"target_epsilon": -1.0}, r"target_epsilon must be finite and positive"),
        ({"delta": 2.0}, r"delta must be in \[1e-15, 0\.1\)"),
        ({"delta": 1e-300}, r"delta must be in \[1e-15, 0\.1\)"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]"),
        ({"num_steps": 0}, r"num_steps must be at least 1"),
        ({"accountant": "moments"}, r"accountant must be one of"),
        ({"relative_tolerance": 0.0}, r"relative_tolerance must be in \(0, 1\)"),
    ],
)
def test_target_noise_validation(arguments: dict, message: str) -> None:
    valid = {
        "target_epsilon": 1.0,
        "delta": DELTA,
        "sample_rate": 0.1,
        "num_steps": 10,
    }

    with pytest.raises(ValueError, match=message):
        noise_multiplier_for_target(**(valid | arguments))


def test_rounds_within_budget_is_largest_fit() -> None:
    target = 3.0

    rounds = rounds_within_budget(
        target_epsilon=target, delta=DELTA, noise_multiplier=1.0, sample_rate=0.1
    )

    assert gaussian_epsilon(1.0, 0.1, rounds) <= target
    assert gaussian_epsilon(1.0, 0.1, rounds + 1) > target


def test_rounds_within_budget_zero_and_cap() -> None:
    none_fit = rounds_within_budget(
        target_epsilon=0.1, delta=DELTA, noise_multiplier=0.5, sample_rate=1.0
    )
    capped = rounds_within_budget(
        target_epsilon=8.0,
        delta=DELTA,
        noise_multiplier=50.0,
        sample_rate=0.01,
        max_rounds=64,
    )

    assert none_fit == 0
    assert capped == 64


# --- distributed discrete Gaussian ---------------------------------------------


def test_quantized_sensitivity_bounds() -> None:
    deterministic = quantized_l2_sensitivity(
        clipping_norm=1.0, quantization_scale=100.0, dimension=10_000
    )
    conditional = quantized_l2_sensitivity(
        clipping_norm=1.0,
        quantization_scale=100.0,
        dimension=10_000,
        beta=math.exp(-0.5),
    )

    assert deterministic == pytest.approx(100.0 + 100.0)
    # c**2 + d / 4 + sqrt(2 * 0.5) * (c + sqrt(d) / 2) with c = 100, d = 1e4.
    assert conditional == pytest.approx(math.sqrt(10_000 + 2_500 + 150.0))


def test_stochastic_rounding_within_sensitivity() -> None:
    generator = np.random.default_rng()
    clipping_norm, scale, dimension = 1.0, 50.0, 1000
    update = generator.normal(size=dimension)
    update *= clipping_norm * scale / np.linalg.norm(update)
    bound = quantized_l2_sensitivity(
        clipping_norm=clipping_norm, quantization_scale=scale, dimension=dimension
    )

    floor = np.floor(update)
    rounded = floor + (generator.random(dimension) < update - floor)

    assert np.linalg.norm(rounded) <= bound


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"clipping_norm": 0.0}, r"clipping_norm must be finite and positive"),
        ({"quantization_scale": -1.0}, r"quantization_scale must be finite"),
        ({"dimension": 0}, r"dimension must be at least 1"),
        ({"beta": 1.0}, r"beta must be in \[0, 1\)\. Found 1\.0"),
    ],
)
def test_quantized_sensitivity_validation(arguments: dict, message: str) -> None:
    valid = {"clipping_norm": 1.0, "quantization_scale": 10.0, "dimension": 5}

    with pytest.raises(ValueError, match=message):
        quantized_l2_sensitivity(**(valid | arguments))


def test_ddg_matches_gaussian_when_tau_vanishes() -> None:
    # With sigma_client = 20, tau is about 10 * n * exp(-pi**2 * 400), which is 0.
    event = ddg_event(num_steps=50)
    noise_multiplier = math.sqrt(10) * 20.0 / 100.0

    epsilon = distributed_discrete_gaussian_epsilon(event, delta=DELTA)

    assert epsilon == pytest.approx(
        gaussian_epsilon(noise_multiplier, 1.0, 50), rel=1e-9
    )


def test_ddg_small_sigma_costs_more() -> None:
    event = ddg_event(sigma_client=0.6, num_survivors=50, l2_sensitivity=3.0)
    noise_multiplier = math.sqrt(50) * 0.6 / 3.0

    epsilon = distributed_discrete_gaussian_epsilon(event, delta=DELTA)

    assert epsilon > gaussian_epsilon(noise_multiplier, 1.0, 1)


def test_ddg_dropouts_raise_epsilon() -> None:
    planned = distributed_discrete_gaussian_epsilon(
        ddg_event(num_survivors=10), delta=DELTA
    )
    after_dropouts = distributed_discrete_gaussian_epsilon(
        ddg_event(num_survivors=2), delta=DELTA
    )

    assert after_dropouts > planned


def test_ddg_subsampling_amplifies() -> None:
    full = distributed_discrete_gaussian_epsilon(ddg_event(num_steps=100), delta=DELTA)
    sampled = distributed_discrete_gaussian_epsilon(
        ddg_event(num_steps=100, sample_rate=0.01), delta=DELTA
    )

    assert sampled < full


def test_ddg_subsampled_not_below_exact_gaussian() -> None:
    # The general bound must not beat the exact subsampled Gaussian analysis.
    event = ddg_event(sample_rate=0.05, num_steps=100)
    noise_multiplier = math.sqrt(10) * 20.0 / 100.0

    epsilon = distributed_discrete_gaussian_epsilon(event, delta=DELTA)

    assert epsilon >= gaussian_epsilon(noise_multiplier, 0.05, 100)


@pytest.mark.parametrize("noise_multiplier", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("sample_rate", [0.001, 0.01, 0.2])
def test_general_subsampling_bound_upper_bounds_gaussian(
    noise_multiplier: float, sample_rate: float
) -> None:
    orders = np.arange(2, 65)

    def gaussian_rdp(alphas: np.ndarray) -> np.ndarray:
        return alphas / (2 * noise_multiplier**2)

    general = _poisson_subsampled_rdp(
        gaussian_rdp, sample_rate=sample_rate, orders=orders
    )
    exact = opacus_rdp.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=[float(order) for order in orders],
    )

    assert np.all(general >= exact * (1 - 1e-9))


def test_ddg_rdp_uses_next_integer_order() -> None:
    event = ddg_event(sample_rate=0.1)

    fractional = distributed_discrete_gaussian_rdp(event, orders=[2.5])
    integer = distributed_discrete_gaussian_rdp(event, orders=[3.0])

    assert fractional[0] <= integer[0]


def test_ddg_event_in_ledger() -> None:
    ledger = PrivacyAccountant(delta=DELTA)
    ledger.step(noise_multiplier=1.0, sample_rate=1.0)
    only_gaussian = ledger.epsilon

    ledger.record(ddg_event())

    assert ledger.epsilon > only_gaussian
    assert ledger.num_steps == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sigma_client": 0.4}, r"sigma_client must be at least 0\.5\. Found 0\.4"),
        ({"sigma_client": float("nan")}, r"sigma_client must be finite and positive"),
        ({"num_survivors": 0}, r"num_survivors must be at least 1"),
        ({"l2_sensitivity": 0.0}, r"l2_sensitivity must be finite and positive"),
        ({"l1_sensitivity": -1.0}, r"l1_sensitivity must be finite and positive"),
        ({"dimension": 0}, r"dimension must be at least 1"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]"),
        ({"num_steps": 0}, r"num_steps must be at least 1"),
    ],
)
def test_ddg_event_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ddg_event(**changes)


def test_default_orders_sorted_above_one() -> None:
    orders = np.asarray(RDP_ORDERS)

    assert np.all(orders > 1)
    assert np.all(np.diff(orders) > 0)


def test_prv_below_its_range_falls_back_to_rdp() -> None:
    # Opacus's PRV accountant returns infinity or exhausts memory here.
    events = [GaussianEvent(noise_multiplier=0.01, sample_rate=1.0, num_steps=3)]

    prv = compute_epsilon(events, delta=1e-5, accountant=ACCOUNTANT_PRV)
    rdp = compute_epsilon(events, delta=1e-5, accountant=ACCOUNTANT_RDP)

    assert math.isfinite(prv)
    assert prv == rdp


@pytest.mark.parametrize(
    "history",
    [
        [(2.3, 0.1, 20)],
        [(0.74, 0.1, 20)],
        [(1.0, 0.01, 1000)],
        [(1.0, 0.1, 5), (2.0, 1.0, 3)],
    ],
)
def test_prv_grid_estimate_matches_opacus(
    history: list[tuple[float, float, int]],
) -> None:
    prvs = [PoissonSubsampledGaussianPRV(q, z) for z, q, _ in history]
    steps = [entry[2] for entry in history]
    domain = PRVAccountant()._get_domain(
        prvs=prvs,
        num_self_compositions=steps,
        eps_error=PRV_EPSILON_ERROR,
        delta_error=DELTA / 1000,
    )

    estimate = accounting._prv_grid_points(history, delta=DELTA)

    assert estimate == pytest.approx(domain.size, rel=0.01)


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        # One grid of about 4.9e7 points: allocating it failed after 4.8 GB.
        (
            [GaussianEvent(noise_multiplier=0.5, sample_rate=1.0, num_steps=1000)],
            "more than 16777216",
        ),
        # Grids of about 1.4e7 points each, under the limit alone, but Opacus
        # builds one per distinct z: four of them took 54 s and 2.9 GB.
        (
            [
                GaussianEvent(
                    noise_multiplier=1.0 + index * 1e-9, sample_rate=1.0, num_steps=250
                )
                for index in range(4)
            ],
            "more than 16777216",
        ),
        # 100 distinct z at q = 0.1 took 58 s and 2.1 GB.
        (
            [
                GaussianEvent(noise_multiplier=1.0 + index / 100, sample_rate=0.1)
                for index in range(100)
            ],
            "at most 8 distinct (noise multiplier, sample rate) pairs",
        ),
    ],
    ids=["one-large-grid", "distinct-grids-add-up", "many-distinct-events"],
)
def test_prv_too_large_falls_back_to_rdp(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    events: list[GaussianEvent],
    reason: str,
) -> None:
    monkeypatch.setattr(accounting, "_PRV_GRID_WARNED", threading.Event())

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr.dp"):
        prv = compute_epsilon(events, delta=DELTA, accountant=ACCOUNTANT_PRV)

    assert prv == compute_epsilon(events, delta=DELTA, accountant=ACCOUNTANT_RDP)
    assert reason in caplog.text


def test_prv_repeated_settings_form_one_entry() -> None:
    # Alternating settings compose as two entries, not as 20.
    alternating = [
        GaussianEvent(noise_multiplier=z, sample_rate=0.1)
        for _ in range(10)
        for z in (2.0, 3.0)
    ]
    grouped = [
        GaussianEvent(noise_multiplier=2.0, sample_rate=0.1, num_steps=10),
        GaussianEvent(noise_multiplier=3.0, sample_rate=0.1, num_steps=10),
    ]

    epsilon = compute_epsilon(alternating, delta=DELTA, accountant=ACCOUNTANT_PRV)

    assert epsilon == compute_epsilon(grouped, delta=DELTA, accountant=ACCOUNTANT_PRV)
    assert epsilon < compute_epsilon(
        alternating, delta=DELTA, accountant=ACCOUNTANT_RDP
    )


def test_prv_grid_limit_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [GaussianEvent(noise_multiplier=2.3, sample_rate=0.1, num_steps=20)]
    below_limit = compute_epsilon(events, delta=DELTA, accountant=ACCOUNTANT_PRV)
    rdp = compute_epsilon(events, delta=DELTA, accountant=ACCOUNTANT_RDP)
    monkeypatch.setattr(accounting, "MAX_PRV_GRID_POINTS", 1000)

    above_limit = compute_epsilon(events, delta=DELTA, accountant=ACCOUNTANT_PRV)

    assert below_limit < rdp
    assert above_limit == rdp


@pytest.mark.parametrize("accountant", [ACCOUNTANT_RDP, ACCOUNTANT_PRV])
@pytest.mark.parametrize(
    ("noise_multiplier", "sample_rate", "num_steps"),
    [(0.5, 1.0, 10), (1.0, 0.1, 100), (4.0, 0.01, 1000), (100.0, 1.0, 1)],
)
def test_smallest_delta_gives_finite_epsilon(
    accountant: str, noise_multiplier: float, sample_rate: float, num_steps: int
) -> None:
    # At 1e-15 Opacus's PRV accountant rejects the first three for
    # floating-point error, so RDP bounds them.
    event = GaussianEvent(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps
    )

    epsilon = compute_epsilon([event], delta=MIN_DELTA, accountant=accountant)

    assert 0.0 < epsilon < math.inf
    assert epsilon <= compute_epsilon([event], delta=MIN_DELTA, accountant="rdp")


def test_prv_search_at_smallest_delta() -> None:
    noise = noise_multiplier_for_target(
        target_epsilon=3.0,
        delta=MIN_DELTA,
        sample_rate=0.1,
        num_steps=100,
        accountant=ACCOUNTANT_PRV,
    )

    event = GaussianEvent(noise_multiplier=noise, sample_rate=0.1, num_steps=100)
    assert compute_epsilon([event], delta=MIN_DELTA, accountant="prv") <= 3.0


def test_prv_search_for_a_huge_target_stays_finite() -> None:
    noise = noise_multiplier_for_target(
        target_epsilon=1e5,
        delta=1e-5,
        sample_rate=1.0,
        num_steps=3,
        accountant=ACCOUNTANT_PRV,
    )

    assert MIN_NOISE_MULTIPLIER <= noise < PRV_MIN_NOISE_MULTIPLIER


@pytest.mark.parametrize("sigma", [0.5, 0.7, 1.0, 3.0])
def test_ddg_epsilon_never_grows_with_survivors(sigma: float) -> None:
    # Proposition 14's tau grows with the number of clients; the bound takes
    # the least over 1 to n clients, so more noise never costs epsilon.
    def epsilon(survivors: int) -> float:
        event = DistributedDiscreteGaussianEvent(
            sigma_client=sigma,
            num_survivors=survivors,
            l2_sensitivity=2.0,
            dimension=10,
        )
        return compute_epsilon([event], delta=1e-5, accountant=ACCOUNTANT_RDP)

    epsilons = [epsilon(n) for n in (1, 2, 5, 20, 60, 200)]

    assert epsilons == sorted(epsilons, reverse=True)


def test_prv_rejects_too_many_steps() -> None:
    # The PRV composition's memory grows with the steps; the search for
    # 100,000 steps tried to allocate 84 GiB before this limit.
    with pytest.raises(ValueError, match=r"at most 1000 steps, .* Found 100000 steps"):
        noise_multiplier_for_target(
            target_epsilon=1.0,
            delta=1e-5,
            sample_rate=1.0,
            num_steps=100_000,
            accountant="prv",
        )


@pytest.mark.parametrize("delta", [np.float32(1e-5), np.float64(1e-5), 1e-5])
def test_numpy_delta_accepted(delta: float) -> None:
    event = GaussianEvent(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)

    epsilon = compute_epsilon([event], delta=delta, accountant=ACCOUNTANT_RDP)

    expected = compute_epsilon([event], delta=1e-5, accountant=ACCOUNTANT_RDP)
    assert epsilon == pytest.approx(expected, rel=1e-6)
