"""A client's own privacy budget, alone and against a server that cheats on DP.

Under distributed DP the server sends each client how much noise to add. The
hostile tests run servers that ask for no DP, for central DP, for less noise
than planned and for more rounds than a client's budget allows; a client
with a budget rejects each such round before its training handler runs.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsec_flwr import (
    ClientPrivacyBudget,
    PrivacyBudgetError,
    SecAggConfig,
    SecureFedAvg,
    TooFewSurvivorsError,
    make_secure_aggregation_mod,
)
from fedsec_flwr import privacy as privacy_module
from fedsec_flwr.budget import SpentRound
from fedsec_flwr.dp.accounting import (
    MIN_DISCRETE_SIGMA,
    DistributedDiscreteGaussianEvent,
    compute_epsilon,
    quantized_l2_sensitivity,
)
from fedsec_flwr.mod import _load_spent
from fedsec_flwr.privacy import ClientPrivacy, DPConfig, DPMode
from tests.loopback import LoopbackGrid, stage_of

NODE_IDS = [11, 22, 33, 44]
NUM_COORDINATES = 500
SCALE = 1000.0
DELTA = 1e-5
SIGMA = 1500.0
"""About 2 sensitivities of noise from two clients."""


def distributed(sigma: float = SIGMA, *, adaptive: bool = False) -> ClientPrivacy:
    return ClientPrivacy(
        mode=DPMode.DISTRIBUTED,
        clipping_norm=1.0,
        adaptive=adaptive,
        sigma_client=sigma,
        bit_sigma_client=2.0 if adaptive else 0.0,
    )


def admit_all(
    budget: ClientPrivacyBudget, privacy: ClientPrivacy, rounds: int
) -> tuple[SpentRound, ...]:
    spent: tuple[SpentRound, ...] = ()
    for _ in range(rounds):
        cost = budget.admit(
            privacy, quantization_scale=SCALE, dimension=NUM_COORDINATES, spent=spent
        )
        spent = (*spent, cost)
    return spent


# --- The budget on its own -----------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"max_epsilon": 0.0},
            "max_epsilon must be a finite number above 0. Found 0.0",
        ),
        ({"max_epsilon": -1}, "Found -1"),
        ({"max_epsilon": math.inf}, "Found inf"),
        ({"max_epsilon": math.nan}, "Found nan"),
        ({"max_epsilon": "3"}, "Found '3'"),
        ({"max_epsilon": True}, "Found True"),
        (
            {"max_epsilon": 1.0, "delta": 0.0},
            r"delta must be in \[1e-15, 0.1\): .* Found 0.0",
        ),
        ({"max_epsilon": 1.0, "delta": 1.0}, "Found 1.0"),
        ({"max_epsilon": 1.0, "min_honest_clients": 0}, "at least 1. Found 0"),
        ({"max_epsilon": 1.0, "min_honest_clients": 2.0}, "Found 2.0"),
        ({"max_epsilon": 1.0, "min_honest_clients": True}, "Found True"),
    ],
)
def test_budget_rejects_invalid_values(
    arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ClientPrivacyBudget(**arguments)  # type: ignore[arg-type]


def test_budget_rejects_rounds_without_distributed_noise() -> None:
    budget = ClientPrivacyBudget(max_epsilon=100.0)
    central = dataclasses.replace(distributed(), mode=DPMode.CENTRAL, sigma_client=0.0)
    cases = [
        (None, "without DP"),
        (central, "dp-mode 'central'"),
        (distributed(sigma=0.0), "dp-sigma-client 0.0"),
        (distributed(sigma=0.49), "dp-sigma-client 0.49"),
        (
            dataclasses.replace(distributed(adaptive=True), bit_sigma_client=0.0),
            "dp-bit-sigma-client 0.0",
        ),
    ]

    for privacy, message in cases:
        with pytest.raises(PrivacyBudgetError, match=message):
            budget.admit(
                privacy, quantization_scale=SCALE, dimension=NUM_COORDINATES, spent=()
            )


def repeated_epsilon(*, num_survivors: int, num_steps: int) -> float:
    """Epsilon of ``num_steps`` rounds of SIGMA noise, from the accountant itself."""
    event = DistributedDiscreteGaussianEvent(
        sigma_client=SIGMA,
        num_survivors=num_survivors,
        l2_sensitivity=quantized_l2_sensitivity(
            clipping_norm=1.0, quantization_scale=SCALE, dimension=NUM_COORDINATES
        ),
        dimension=NUM_COORDINATES,
        num_steps=num_steps,
    )
    return compute_epsilon([event], delta=DELTA, accountant="rdp")


def test_budget_epsilon_matches_the_accountant() -> None:
    budget = ClientPrivacyBudget(max_epsilon=1e6, min_honest_clients=3)

    spent = admit_all(budget, distributed(), rounds=4)

    assert spent[0].l2_sensitivity == quantized_l2_sensitivity(
        clipping_norm=1.0, quantization_scale=SCALE, dimension=NUM_COORDINATES
    )
    expected = repeated_epsilon(num_survivors=3, num_steps=4)
    assert budget.epsilon(spent) == pytest.approx(expected, rel=1e-12)


def test_budget_admits_rounds_until_epsilon_would_exceed_it() -> None:
    budget = ClientPrivacyBudget(max_epsilon=5.0, min_honest_clients=2)
    epsilons = [
        repeated_epsilon(num_survivors=2, num_steps=steps) for steps in range(1, 40)
    ]
    allowed = sum(1 for epsilon in epsilons if epsilon <= 5.0)
    assert 1 < allowed < 39

    spent = admit_all(budget, distributed(), rounds=allowed)

    assert budget.epsilon(spent) <= 5.0
    with pytest.raises(PrivacyBudgetError, match=f"after {allowed + 1} rounds"):
        admit_all(budget, distributed(), rounds=allowed + 1)


def test_budget_counts_only_the_honest_clients_noise() -> None:
    spent_rounds = admit_all(ClientPrivacyBudget(1e6), distributed(), rounds=3)

    alone = ClientPrivacyBudget(1e6, min_honest_clients=1).epsilon(spent_rounds)
    with_others = ClientPrivacyBudget(1e6, min_honest_clients=4).epsilon(spent_rounds)

    assert with_others < alone


def test_budget_counts_the_clipping_bit() -> None:
    budget = ClientPrivacyBudget(max_epsilon=1e6)

    without_bit = budget.epsilon(admit_all(budget, distributed(), rounds=2))
    with_bit = budget.epsilon(admit_all(budget, distributed(adaptive=True), rounds=2))

    assert with_bit > without_bit


# --- Through SecureFedAvg, the mod and the loopback Grid -----------------------


class CountingTrain:
    """A training handler that adds a small step and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message, context: Context) -> Message:
        self.calls += 1
        record = msg.content.array_records["arrays"]
        arrays = {key: value.numpy() for key, value in record.items()}
        arrays["w"] = (arrays["w"] + 0.001).astype(np.float32)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)


def make_app(budget: ClientPrivacyBudget, train: CountingTrain) -> ClientApp:
    mod = make_secure_aggregation_mod(privacy_budget=budget)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return mod(msg, context, train)

    return app


def start(
    grid: LoopbackGrid, dp: DPConfig | None, *, rounds: int, key_lifetime: str
) -> None:
    strategy = SecureFedAvg(
        secure_aggregation=SecAggConfig(
            clip_range=1.0,
            max_weight=1000,
            max_clients=10,
            stage_timeout=0.3,
            key_lifetime=key_lifetime,
        ),
        differential_privacy=dp,
        rng=random.Random(3),
    )
    initial = ArrayRecord({"w": Array(np.zeros(NUM_COORDINATES, dtype=np.float32))})
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)


def spent_rounds(grid: LoopbackGrid, node_id: int) -> int:
    return len(_load_spent(grid.context_of(node_id)))


KEY_LIFETIMES = pytest.mark.parametrize("key_lifetime", ["round", "run"])

DISTRIBUTED = DPConfig(mode=DPMode.DISTRIBUTED, noise_multiplier=2.0, clipping_norm=1.0)


@KEY_LIFETIMES
def test_honest_server_within_budget_completes(key_lifetime: str) -> None:
    budget = ClientPrivacyBudget(max_epsilon=50.0, min_honest_clients=len(NODE_IDS))
    train = CountingTrain()
    grid = LoopbackGrid(make_app(budget, train), list(NODE_IDS))

    start(grid, DISTRIBUTED, rounds=2, key_lifetime=key_lifetime)

    assert train.calls == 2 * len(NODE_IDS)
    for node_id in NODE_IDS:
        assert spent_rounds(grid, node_id) == 2


@KEY_LIFETIMES
def test_hostile_server_without_dp_gets_no_update(key_lifetime: str) -> None:
    train = CountingTrain()
    grid = LoopbackGrid(make_app(ClientPrivacyBudget(8.0), train), list(NODE_IDS))

    with pytest.raises(
        TooFewSurvivorsError, match="server requested a round without DP"
    ):
        start(grid, None, rounds=1, key_lifetime=key_lifetime)

    assert train.calls == 0


@KEY_LIFETIMES
def test_hostile_server_asking_central_dp_gets_no_update(key_lifetime: str) -> None:
    train = CountingTrain()
    grid = LoopbackGrid(make_app(ClientPrivacyBudget(8.0), train), list(NODE_IDS))
    central = DPConfig(mode=DPMode.CENTRAL, noise_multiplier=2.0, clipping_norm=1.0)

    with pytest.raises(TooFewSurvivorsError, match="dp-mode 'central'"):
        start(grid, central, rounds=1, key_lifetime=key_lifetime)

    assert train.calls == 0


@pytest.fixture
def lowered_noise(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the server send the smallest sigma while it accounts the planned one."""
    honest_plan = privacy_module.ServerPrivacy.plan

    def plan(self: privacy_module.ServerPrivacy, **kwargs: int) -> object:
        planned = honest_plan(self, **kwargs)
        return dataclasses.replace(planned, sigma_client=MIN_DISCRETE_SIGMA)

    monkeypatch.setattr(privacy_module.ServerPrivacy, "plan", plan)
    yield


@KEY_LIFETIMES
@pytest.mark.usefixtures("lowered_noise")
def test_hostile_server_lowering_noise_gets_no_update(key_lifetime: str) -> None:
    budget = ClientPrivacyBudget(max_epsilon=50.0, min_honest_clients=len(NODE_IDS))
    train = CountingTrain()
    grid = LoopbackGrid(make_app(budget, train), list(NODE_IDS))

    with pytest.raises(TooFewSurvivorsError, match=r"above its max_epsilon 50\.0"):
        start(grid, DISTRIBUTED, rounds=1, key_lifetime=key_lifetime)

    assert train.calls == 0
    assert all(spent_rounds(grid, node_id) == 0 for node_id in NODE_IDS)


@KEY_LIFETIMES
def test_hostile_server_running_past_the_budget_is_stopped(key_lifetime: str) -> None:
    honest = ClientPrivacyBudget(max_epsilon=1e6, min_honest_clients=len(NODE_IDS))
    probe = CountingTrain()
    probe_grid = LoopbackGrid(make_app(honest, probe), list(NODE_IDS))
    start(probe_grid, DISTRIBUTED, rounds=1, key_lifetime=key_lifetime)
    one_round = _spent(probe_grid, NODE_IDS[0])
    two_rounds = honest.epsilon(one_round * 2)
    three_rounds = honest.epsilon(one_round * 3)
    assert two_rounds < three_rounds
    budget = dataclasses.replace(honest, max_epsilon=(two_rounds + three_rounds) / 2)
    train = CountingTrain()
    grid = LoopbackGrid(make_app(budget, train), list(NODE_IDS))

    with pytest.raises(TooFewSurvivorsError, match="after 3 rounds"):
        start(grid, DISTRIBUTED, rounds=3, key_lifetime=key_lifetime)

    assert train.calls == 2 * len(NODE_IDS)
    for node_id in NODE_IDS:
        assert spent_rounds(grid, node_id) == 2
        assert budget.epsilon(_spent(grid, node_id)) <= budget.max_epsilon


@KEY_LIFETIMES
def test_hostile_unmask_of_too_few_inputs_rejected(
    key_lifetime: str,
) -> None:
    # The budget counts the noise of all 4 clients. After one drops, the
    # server requests the unmasking of a sum of 3 inputs, and no client
    # reveals a share.
    budget = ClientPrivacyBudget(max_epsilon=50.0, min_honest_clients=len(NODE_IDS))
    input_stage = "masked-input" if key_lifetime == "round" else "keyed-input"

    def fault(node: int, stage: str, _: Message) -> object:
        return "drop" if node == NODE_IDS[0] and stage == input_stage else None

    train = CountingTrain()
    grid = LoopbackGrid(make_app(budget, train), list(NODE_IDS), fault=fault)

    with pytest.raises(
        TooFewSurvivorsError,
        match=r"lists 3 masked input\(s\), fewer than min_honest_clients 4",
    ):
        start(grid, DISTRIBUTED, rounds=1, key_lifetime=key_lifetime)

    unmask_ids = {
        request.metadata.message_id
        for request in grid.sent
        if stage_of(request) in ("unmask", "keyed-unmask")
    }
    replies = [
        reply
        for reply in grid.received
        if reply.metadata.reply_to_message_id in unmask_ids
    ]
    assert len(replies) == len(NODE_IDS) - 1
    assert all(reply.has_error() for reply in replies)


def _spent(grid: LoopbackGrid, node_id: int) -> tuple[SpentRound, ...]:
    return _load_spent(grid.context_of(node_id))


def test_mod_rejects_a_budget_of_the_wrong_type() -> None:
    with pytest.raises(
        ValueError, match="privacy_budget must be a ClientPrivacyBudget"
    ):
        make_secure_aggregation_mod(privacy_budget=8.0)  # type: ignore[arg-type]
