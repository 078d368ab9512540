"""Attacks on a client's privacy budget by a dishonest server or hostile input.

The server side is `SecureFedAvg` on the loopback Grid. A dishonest server
is played in two ways: a fault hook that rewrites the fields of the input
request (masked-input or keyed-input) before a client reads it, or a patched
`ServerPrivacy.plan` whose plan the whole server then follows consistently.
Every client runs the real `make_secure_aggregation_mod` with a
`ClientPrivacyBudget`, and every stage goes through Flower serialization.

Most tests pass because the budget holds: they record the attack and the
client's reply.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedsec_flwr import (
    ClientPrivacyBudget,
    PrivacyBudgetError,
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    TooFewSurvivorsError,
    make_secure_aggregation_mod,
)
from fedsec_flwr import privacy as privacy_module
from fedsec_flwr.budget import SpentRound
from fedsec_flwr.core import client as client_protocol
from fedsec_flwr.core import run_keys
from fedsec_flwr.core.bounds import lower_bound_text
from fedsec_flwr.core.encoding import TRAILER_SIZE
from fedsec_flwr.dp.accounting import MIN_DISCRETE_SIGMA, quantized_l2_sensitivity
from fedsec_flwr.dp.noise import MAX_DISCRETE_SIGMA, distributed_noise_headroom
from fedsec_flwr.mod import _load_spent
from fedsec_flwr.privacy import ClientPrivacy, DPConfig, DPMode
from fedsec_flwr.records import ARRAYS_RECORD, PROTOCOL_RECORD
from tests.loopback import LoopbackGrid

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app import client_app  # noqa: E402
from secure_fedavg_app.node_policy import NodePolicy  # noqa: E402

NODE_IDS = [11, 22, 33, 44]
VICTIM = NODE_IDS[0]
DIMENSION = 50
CLIPPING_NORM = 1.0
LEVELS = 1 << 16
SCALE = (LEVELS - 1) / (2 * CLIPPING_NORM)
"""Grid steps per model unit of the honest server's encoding under DP."""

HONEST_SIGMA = 2.0 * CLIPPING_NORM * SCALE / math.sqrt(len(NODE_IDS))
"""The honest server's sigma_client for noise multiplier 2 and four clients."""

DISTRIBUTED = DPConfig(
    mode=DPMode.DISTRIBUTED, noise_multiplier=2.0, clipping_norm=CLIPPING_NORM
)
HONEST = len(NODE_IDS)
ONE_ROUND = 2.7
"""A max_epsilon that admits one honest round with four honest clients (2.17)."""

TWO_ROUNDS = 3.6
"""A max_epsilon that admits two honest rounds (3.19) but not three (4.01)."""

INPUT_STAGES = ("masked-input", "keyed-input")
KEY_LIFETIMES = pytest.mark.parametrize("key_lifetime", ["round", "run"])
REMOVE = object()
"""A marker for `rewrite_inputs`: delete the field."""


# --- Clients ---------------------------------------------------------------------

Step = Callable[[int, dict[str, np.ndarray]], None]
"""A function that changes a node's copy of the model in place, given its id."""


def small_step(node: int, arrays: dict[str, np.ndarray]) -> None:
    for key, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating):
            arrays[key] = np.asarray(array + 0.001, dtype=array.dtype)


class Trainer:
    """A training handler that applies a step and counts calls per node."""

    def __init__(self, step: Step = small_step) -> None:
        self.step = step
        self.calls: collections.Counter[int] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __call__(self, msg: Message, context: Context) -> Message:
        self.calls[context.node_id] += 1
        record = msg.content.array_records[ARRAYS_RECORD]
        arrays = {key: value.numpy().copy() for key, value in record.items()}
        self.step(context.node_id, arrays)
        content = RecordDict(
            {
                ARRAYS_RECORD: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)


BudgetOf = Callable[[int], ClientPrivacyBudget]


def make_app(budget: ClientPrivacyBudget | BudgetOf, trainer: Trainer) -> ClientApp:
    """Build a ClientApp whose mod enforces ``budget``, or ``budget(node_id)``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        node_budget = budget if isinstance(budget, ClientPrivacyBudget) else None
        if node_budget is None:
            assert callable(budget)
            node_budget = budget(context.node_id)
        mod = make_secure_aggregation_mod(privacy_budget=node_budget)
        return mod(msg, context, trainer)

    return app


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros(DIMENSION, dtype=np.float32)}


# --- The server ------------------------------------------------------------------


def run_server(
    grid: LoopbackGrid,
    *,
    rounds: int = 1,
    key_lifetime: str = "round",
    dp: DPConfig | None = DISTRIBUTED,
    initial: dict[str, np.ndarray] | None = None,
    reports: list[RoundReport] | None = None,
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
        rng=random.Random(5),
        on_round_end=None if reports is None else reports.append,
    )
    arrays = ArrayRecord({k: Array(v) for k, v in (initial or model()).items()})
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)


def run_expecting_abort(grid: LoopbackGrid, **kwargs: object) -> str:
    """Run the server, expect it to abort, and return the abort message."""
    with pytest.raises(TooFewSurvivorsError) as caught:
        run_server(grid, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def round_of(message: Message) -> int:
    value = message.content.config_records[PROTOCOL_RECORD]["server-round"]
    assert isinstance(value, int)
    return value


def rewrite_inputs(
    changes: dict[str, object],
    *,
    nodes: tuple[int, ...] | None = None,
    rounds: tuple[int, ...] | None = None,
) -> Callable[[int, str, Message], object]:
    """Build a fault hook that rewrites fields of input requests before delivery.

    A value of ``REMOVE`` deletes the field. A callable maps the old value.
    """

    def fault(node: int, stage: str, message: Message) -> object:
        if stage not in INPUT_STAGES:
            return None
        if nodes is not None and node not in nodes:
            return None
        if rounds is not None and round_of(message) not in rounds:
            return None
        record = message.content.config_records[PROTOCOL_RECORD]
        for key, value in changes.items():
            if value is REMOVE:
                del record[key]
            elif callable(value):
                record[key] = value(record[key])
            else:
                record[key] = value  # type: ignore[assignment]
        return None

    return fault


def error_reasons(grid: LoopbackGrid) -> list[str]:
    return [str(reply.error.reason) for reply in grid.received if reply.has_error()]


def spent(grid: LoopbackGrid, node: int) -> tuple[SpentRound, ...]:
    return _load_spent(grid.context_of(node))


def assert_nothing_spent(grid: LoopbackGrid) -> None:
    for node in NODE_IDS:
        assert spent(grid, node) == ()


def honest_round(*, dimension: int = DIMENSION) -> SpentRound:
    """Return one honest round as a client accounts it."""
    return SpentRound(
        sigma_client=HONEST_SIGMA,
        l2_sensitivity=quantized_l2_sensitivity(
            clipping_norm=CLIPPING_NORM, quantization_scale=SCALE, dimension=dimension
        ),
        dimension=dimension,
    )


@pytest.fixture
def sent_inputs(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[np.ndarray]]:
    """Record every encoded, noised vector a client masks, by node id.

    This is what a server learns about one client once it has that client's
    masks, or once every other client in the sum is its own.
    """
    inputs: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    mask = client_protocol.client_mask
    keyed_input = run_keys.client_keyed_input

    def spy_mask(state, encoded, *, modulus):  # type: ignore[no-untyped-def]
        inputs[state.node_id].append(encoded.copy())
        return mask(state, encoded, modulus=modulus)

    def spy_keyed(state, encoded, *, modulus):  # type: ignore[no-untyped-def]
        inputs[state.node_id].append(encoded.copy())
        return keyed_input(state, encoded, modulus=modulus)

    monkeypatch.setattr(client_protocol, "client_mask", spy_mask)
    monkeypatch.setattr(run_keys, "client_keyed_input", spy_keyed)
    return inputs


def test_constants_match_honest_plan() -> None:
    plan = privacy_module.ServerPrivacy(
        config=DISTRIBUTED,
        num_rounds=1,
        sample_rate=1.0,
        max_clients=10,
        modulus=2**32,
    ).plan(num_sampled=len(NODE_IDS), dimension=DIMENSION)
    assert plan.encoding is not None
    assert plan.sigma_client == pytest.approx(HONEST_SIGMA)
    assert plan.encoding.scale == pytest.approx(SCALE)
    budget = ClientPrivacyBudget(1e6, min_honest_clients=HONEST)
    after_one, after_two, after_three = (
        budget.epsilon((honest_round(),) * n) for n in (1, 2, 3)
    )
    assert after_one <= ONE_ROUND
    assert ONE_ROUND < after_two <= TWO_ROUNDS
    assert after_three > TWO_ROUNDS


# --- Malformed and hostile DP fields ---------------------------------------------

SIGMA_RANGE = (
    f"must be between {MIN_DISCRETE_SIGMA} and 1099511627776 (2**40) in distributed "
    "mode. Found"
)
SIGMA_BELOW_MIN = f"'dp-sigma-client' {SIGMA_RANGE}"

MALFORMED_FIELDS = [
    pytest.param({"dp-sigma-client": math.nan}, "'dp-sigma-client'", id="sigma-nan"),
    pytest.param({"dp-sigma-client": math.inf}, "'dp-sigma-client'", id="sigma-inf"),
    pytest.param({"dp-sigma-client": -1.0}, "'dp-sigma-client'", id="sigma-negative"),
    pytest.param({"dp-sigma-client": "1e9"}, "'dp-sigma-client'", id="sigma-string"),
    pytest.param({"dp-sigma-client": 40000}, "'dp-sigma-client'", id="sigma-int"),
    pytest.param({"dp-sigma-client": 0.0}, f"{SIGMA_BELOW_MIN} 0.0.", id="sigma-zero"),
    pytest.param(
        {"dp-sigma-client": 0.49}, f"{SIGMA_BELOW_MIN} 0.49.", id="sigma-tiny"
    ),
    pytest.param(
        {"dp-sigma-client": -0.0}, f"{SIGMA_BELOW_MIN} -0.0.", id="sigma-neg-0"
    ),
    pytest.param(
        {"dp-sigma-client": 2.0**40 * 1.01},
        f"{SIGMA_BELOW_MIN} {2.0**40 * 1.01}.",
        id="sigma-above-sampler",
    ),
    pytest.param(
        {"dp-sigma-client": 1e300}, f"{SIGMA_BELOW_MIN} 1e+300.", id="sigma-huge"
    ),
    pytest.param({"dp-clipping-norm": math.nan}, "'dp-clipping-norm'", id="c-nan"),
    pytest.param({"dp-clipping-norm": math.inf}, "'dp-clipping-norm'", id="c-inf"),
    pytest.param({"dp-clipping-norm": -1.0}, "'dp-clipping-norm'", id="c-negative"),
    pytest.param({"dp-clipping-norm": 0.0}, "dp-clipping-norm must be", id="c-zero"),
    pytest.param({"dp-clipping-norm": "1.0"}, "'dp-clipping-norm'", id="c-string"),
    pytest.param(
        {"dp-clipping-norm": 1e306},
        "l2_sensitivity must be finite and positive. Found inf",
        id="c-infinite-sensitivity",
    ),
    pytest.param(
        {"dp-adaptive": 1, "dp-bit-sigma-client": math.nan},
        "'dp-bit-sigma-client'",
        id="bit-sigma-nan",
    ),
    pytest.param(
        {"dp-adaptive": 1, "dp-bit-sigma-client": 0.0},
        f"'dp-bit-sigma-client' {SIGMA_RANGE}",
        id="adaptive-without-bit-noise",
    ),
    pytest.param(
        {"dp-adaptive": 1, "dp-bit-sigma-client": 1e18},
        f"'dp-bit-sigma-client' {SIGMA_RANGE}",
        id="bit-sigma-huge",
    ),
    pytest.param(
        {"dp-adaptive": "false", "dp-bit-sigma-client": 0.0},
        "'dp-adaptive' must be 0 or 1. Found 'false'",
        id="adaptive-string",
    ),
    pytest.param(
        {"dp-adaptive": 2}, "'dp-adaptive' must be 0 or 1. Found 2", id="adaptive-two"
    ),
    pytest.param(
        {"dp-mode": "garbage"},
        "mode must be 'central' or 'distributed'. Found 'garbage'",
        id="mode-garbage",
    ),
    pytest.param(
        {"dp-mode": "DISTRIBUTED"}, "Found 'DISTRIBUTED'", id="mode-upper-case"
    ),
    pytest.param({"dp-mode": 2}, "Found 2", id="mode-int"),
    pytest.param(
        {"dp-mode": "central", "dp-sigma-client": 0.0},
        "dp-mode 'central'",
        id="mode-central",
    ),
    pytest.param({"dp-mode": REMOVE}, "a round without DP", id="mode-removed"),
    pytest.param({"dp-sigma-client": REMOVE}, "'dp-sigma-client'", id="sigma-removed"),
]


@KEY_LIFETIMES
@pytest.mark.parametrize(("changes", "reason"), MALFORMED_FIELDS)
def test_malformed_dp_fields_rejected_before_training(
    key_lifetime: str, changes: dict[str, object], reason: str
) -> None:
    trainer = Trainer()
    grid = LoopbackGrid(make_app(ClientPrivacyBudget(1e6), trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs(changes)

    aborted = run_expecting_abort(grid, key_lifetime=key_lifetime)

    assert trainer.total == 0
    assert_nothing_spent(grid)
    reasons = error_reasons(grid)
    assert len(reasons) == len(NODE_IDS)
    assert all(reason in text for text in reasons), reasons
    assert reason in aborted


def test_field_error_names_found_value() -> None:
    with pytest.raises(ValueError, match="'dp-sigma-client'") as caught:
        ClientPrivacy.from_fields(
            {"dp-mode": "distributed", "dp-clipping-norm": 1.0, "dp-sigma-client": "x"}
        )
    assert "Found 'x'." in str(caught.value)


# --- Noise against sensitivity ---------------------------------------------------


def scaled(factor: float) -> Callable[[object], float]:
    return lambda value: float(value) * factor  # type: ignore[arg-type]


@KEY_LIFETIMES
def test_larger_norm_same_noise_rejected(key_lifetime: str) -> None:
    trainer = Trainer()
    budget = ClientPrivacyBudget(ONE_ROUND, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs({"dp-clipping-norm": 10.0})

    aborted = run_expecting_abort(grid, key_lifetime=key_lifetime)

    assert trainer.total == 0
    assert_nothing_spent(grid)
    assert f"above its max_epsilon {ONE_ROUND}" in aborted


@KEY_LIFETIMES
def test_larger_norm_matching_noise_admitted(
    key_lifetime: str,
) -> None:
    """A server that raises C and sigma together gets the honest epsilon."""
    trainer = Trainer()
    budget = ClientPrivacyBudget(ONE_ROUND, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs(
        {"dp-clipping-norm": scaled(1000.0), "dp-sigma-client": scaled(1000.0)}
    )

    run_server(grid, key_lifetime=key_lifetime)

    [cost] = spent(grid, VICTIM)
    assert cost.sigma_client == pytest.approx(1000 * HONEST_SIGMA)
    assert cost.l2_sensitivity == quantized_l2_sensitivity(
        clipping_norm=1000 * CLIPPING_NORM,
        quantization_scale=SCALE,
        dimension=DIMENSION,
    )
    assert budget.epsilon((cost,)) <= ONE_ROUND


@KEY_LIFETIMES
def test_tiny_norm_counts_rounding(key_lifetime: str) -> None:
    """With C near 0 the update vanishes, but stochastic rounding still leaks.

    The client keeps the sqrt(d) rounding term, so a server that sends a tiny
    C with the smallest sigma is rejected.
    """
    trainer = Trainer()
    grid = LoopbackGrid(make_app(ClientPrivacyBudget(8.0), trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs(
        {"dp-clipping-norm": 5e-324, "dp-sigma-client": MIN_DISCRETE_SIGMA}
    )

    aborted = run_expecting_abort(grid, key_lifetime=key_lifetime)

    assert trainer.total == 0
    assert "above its max_epsilon 8.0" in aborted


@KEY_LIFETIMES
@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"clip-range": 0.01}, id="clip-range-shrunk"),
        pytest.param({"quantization-levels": 1 << 20}, id="more-levels"),
    ],
)
def test_finer_encoding_same_noise_rejected(
    key_lifetime: str, changes: dict[str, object]
) -> None:
    """A finer grid scales the update up, and the client accounts for it."""
    trainer = Trainer()
    budget = ClientPrivacyBudget(ONE_ROUND, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs(changes)

    aborted = run_expecting_abort(grid, key_lifetime=key_lifetime)

    assert trainer.total == 0
    assert_nothing_spent(grid)
    assert "above its max_epsilon" in aborted


@KEY_LIFETIMES
def test_coarser_encoding_uses_real_scale(key_lifetime: str) -> None:
    """A wider clip range gives a coarser grid and a smaller sensitivity.

    The client's figure follows the encoding it really uses, whatever the
    server planned.
    """
    trainer = Trainer()
    budget = ClientPrivacyBudget(ONE_ROUND, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs({"clip-range": 4.0})

    # The server decodes with its own clip range, so its mean is wrong. That
    # does not matter here.
    run_server(grid, key_lifetime=key_lifetime)

    [cost] = spent(grid, VICTIM)
    assert cost.l2_sensitivity == quantized_l2_sensitivity(
        clipping_norm=CLIPPING_NORM,
        quantization_scale=(LEVELS - 1) / (2 * 4.0),
        dimension=DIMENSION,
    )


# --- The model's dimension -------------------------------------------------------


def mixed_model() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros((10, 5), dtype=np.float32),
        "b": np.zeros(7, dtype=np.float64),
        "t": np.zeros((), dtype=np.float16),
        "steps": np.zeros(3, dtype=np.int64),
        "mask": np.ones(4, dtype=np.bool_),
    }


MIXED_DIMENSION = 50 + 7 + 1


@KEY_LIFETIMES
def test_dimension_counts_float_coordinates_only(
    key_lifetime: str, sent_inputs: dict[int, list[np.ndarray]]
) -> None:
    trainer = Trainer()
    budget = ClientPrivacyBudget(1e6, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))

    run_server(grid, key_lifetime=key_lifetime, initial=mixed_model())

    for node in NODE_IDS:
        [cost] = spent(grid, node)
        assert cost.dimension == MIXED_DIMENSION
        assert cost.l2_sensitivity == quantized_l2_sensitivity(
            clipping_norm=CLIPPING_NORM,
            quantization_scale=SCALE,
            dimension=MIXED_DIMENSION,
        )
        # The vector carries the float coordinates and the trailer, nothing more.
        [vector] = sent_inputs[node]
        assert vector.size == MIXED_DIMENSION + TRAILER_SIZE


@KEY_LIFETIMES
def test_integer_only_model_rejected(
    key_lifetime: str,
) -> None:
    trainer = Trainer()
    grid = LoopbackGrid(make_app(ClientPrivacyBudget(8.0), trainer), list(NODE_IDS))
    integers_only = ArrayRecord({"steps": Array(np.zeros(3, dtype=np.int64))})

    def fault(node: int, stage: str, message: Message) -> object:
        if stage in INPUT_STAGES:
            message.content[ARRAYS_RECORD] = integers_only
        return None

    grid.fault = fault

    aborted = run_expecting_abort(grid, key_lifetime=key_lifetime)

    assert trainer.total == 0
    assert "dimension" in aborted


# --- Replays, later rounds and exhausted budgets ---------------------------------


def victim_budget(max_epsilon: float) -> BudgetOf:
    """Return per-node budgets in which only the victim's budget can run out.

    The other clients count on the noise of all but the victim, so they still
    unmask the rounds that the victim rejects.
    """

    def budget_of(node: int) -> ClientPrivacyBudget:
        if node == VICTIM:
            return ClientPrivacyBudget(max_epsilon, min_honest_clients=HONEST)
        return ClientPrivacyBudget(1e6, min_honest_clients=HONEST - 1)

    return budget_of


def _copy(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


def replay_first_input(grid: LoopbackGrid, node: int) -> list[Message]:
    """Deliver the node's first input request twice and return the replay's reply."""
    replies: list[Message] = []
    replayed = False

    def fault(target: int, stage: str, message: Message) -> object:
        nonlocal replayed
        if target == node and stage in INPUT_STAGES and not replayed:
            # Set first: the replay passes through this hook too.
            replayed = True
            replies.append(grid.deliver_again(_copy(message)))
        return None

    grid.fault = fault
    return replies


@KEY_LIFETIMES
def test_replayed_input_request_rejected(
    key_lifetime: str, sent_inputs: dict[int, list[np.ndarray]]
) -> None:
    """A second input request of the same round gets no second noised input.

    The victim's input then misses from the sum, so the other clients, whose
    budgets count on the noise of all four, reveal no shares for it.
    """
    trainer = Trainer()
    budget = ClientPrivacyBudget(1e6, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    replies = replay_first_input(grid, VICTIM)

    with pytest.raises(TooFewSurvivorsError):
        run_server(grid, key_lifetime=key_lifetime)

    assert not replies[0].has_error()
    assert trainer.calls[VICTIM] == 1
    assert len(sent_inputs[VICTIM]) == 1
    assert len(spent(grid, VICTIM)) == 1
    reasons = error_reasons(grid)
    unmask_rejections = [r for r in reasons if "min_honest_clients 4" in r]
    assert len(unmask_rejections) == len(NODE_IDS) - 1
    [rejection] = [r for r in reasons if r not in unmask_rejections]
    if key_lifetime == "round":
        assert "must follow stage 'share-keys'" in rejection
    else:
        assert "already sent a masked input" in rejection


@KEY_LIFETIMES
def test_restarted_round_rejected(key_lifetime: str) -> None:
    """A server that runs round 1 again from its start gets no second input.

    Each client records its input round before it trains, under either key
    lifetime, so the restart is rejected before training and the budget.
    """
    trainer = Trainer()
    budget = ClientPrivacyBudget(ONE_ROUND, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    run_server(grid, key_lifetime=key_lifetime)

    aborted = run_expecting_abort(grid, key_lifetime=key_lifetime)

    for node in NODE_IDS:
        assert trainer.calls[node] == 1
        assert spent(grid, node) == (honest_round(),)
    if key_lifetime == "round":
        assert "already trained for its input of round 1" in aborted
    else:
        assert "already sent a masked input" in aborted


@KEY_LIFETIMES
def test_rejected_round_costs_nothing(
    key_lifetime: str,
) -> None:
    trainer = Trainer()
    grid = LoopbackGrid(make_app(victim_budget(ONE_ROUND), trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs(
        {"dp-sigma-client": MIN_DISCRETE_SIGMA}, nodes=(VICTIM,), rounds=(1,)
    )

    run_server(grid, rounds=2, key_lifetime=key_lifetime)

    assert trainer.calls[VICTIM] == 1
    assert spent(grid, VICTIM) == (honest_round(),)
    assert any("above its max_epsilon" in text for text in error_reasons(grid))


@KEY_LIFETIMES
def test_exhausted_budget_rejects_later_rounds(key_lifetime: str) -> None:
    trainer = Trainer()
    grid = LoopbackGrid(make_app(victim_budget(TWO_ROUNDS), trainer), list(NODE_IDS))

    run_server(grid, rounds=5, key_lifetime=key_lifetime)

    assert trainer.calls[VICTIM] == 2
    assert spent(grid, VICTIM) == (honest_round(),) * 2
    rejections = error_reasons(grid)
    assert len(rejections) == 3
    for text in rejections:
        assert "after 3 rounds" in text
        assert f"above its max_epsilon {TWO_ROUNDS} at delta 1e-05" in text
        assert "epsilon to 4.01" in text
    for node in NODE_IDS[1:]:
        assert len(spent(grid, node)) == 5


def test_exhausted_budget_admits_vast_noise() -> None:
    """After the budget is spent, only a round with vast noise still fits.

    Admission depends on epsilon, not on a count of rounds. Sigma 2**40 adds
    almost nothing, and the total stays within max_epsilon.
    """
    budget = ClientPrivacyBudget(TWO_ROUNDS, min_honest_clients=HONEST)
    history = (honest_round(),) * 2
    honest = ClientPrivacy(
        mode=DPMode.DISTRIBUTED,
        clipping_norm=CLIPPING_NORM,
        adaptive=False,
        sigma_client=HONEST_SIGMA,
        bit_sigma_client=0.0,
    )
    with pytest.raises(PrivacyBudgetError, match="after 3 rounds"):
        budget.admit(
            honest, quantization_scale=SCALE, dimension=DIMENSION, spent=history
        )

    vast = dataclasses.replace(honest, sigma_client=MAX_DISCRETE_SIGMA)
    cost = budget.admit(
        vast, quantization_scale=SCALE, dimension=DIMENSION, spent=history
    )

    assert budget.epsilon((*history, cost)) <= TWO_ROUNDS
    with pytest.raises(PrivacyBudgetError, match="after 4 rounds"):
        budget.admit(
            honest,
            quantization_scale=SCALE,
            dimension=DIMENSION,
            spent=(*history, cost),
        )


@KEY_LIFETIMES
def test_rejection_names_epsilon_and_budget(key_lifetime: str) -> None:
    trainer = Trainer()
    budget = ClientPrivacyBudget(1.5, delta=1e-6, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))

    aborted = run_expecting_abort(grid, key_lifetime=key_lifetime)

    projected = dataclasses.replace(budget, max_epsilon=1e6).epsilon((honest_round(),))
    assert f"epsilon to {lower_bound_text(projected)} after 1 rounds" in aborted
    assert "above its max_epsilon 1.5 at delta 1e-06" in aborted
    assert f"noise of {HONEST} honest clients" in aborted
    assert trainer.total == 0


# --- Values the client cannot account, and the clipped count ---------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"dp-sigma-client": 1e200}, id="sigma"),
        pytest.param({"dp-clipping-norm": 1e300}, id="clipping-norm"),
    ],
)
def test_overflowing_fields_get_error_reply(changes: dict[str, object]) -> None:
    trainer = Trainer()
    grid = LoopbackGrid(make_app(ClientPrivacyBudget(8.0), trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs(changes)

    run_expecting_abort(grid)

    assert trainer.total == 0
    assert len(error_reasons(grid)) == len(NODE_IDS)


def test_unsampleable_sigma_rejected_before_training() -> None:
    trainer = Trainer()
    grid = LoopbackGrid(make_app(ClientPrivacyBudget(8.0), trainer), list(NODE_IDS))
    grid.fault = rewrite_inputs({"dp-sigma-client": 1e20})

    aborted = run_expecting_abort(grid)

    assert_nothing_spent(grid)
    assert trainer.total == 0
    assert "'dp-sigma-client' must be between 0.5 and 1099511627776" in aborted
    assert "Found 1e+20." in aborted


def test_admit_rejects_nan_bit_sigma() -> None:
    budget = ClientPrivacyBudget(8.0)
    privacy = ClientPrivacy(
        mode=DPMode.DISTRIBUTED,
        clipping_norm=CLIPPING_NORM,
        adaptive=True,
        sigma_client=1e6,
        bit_sigma_client=math.nan,
    )

    with pytest.raises(ValueError, match="bit"):
        budget.admit(privacy, quantization_scale=SCALE, dimension=DIMENSION, spent=())


SECRET_COUNTS = {11: 3, 22: 5, 33: 7, 44: 11}
"""Number of coordinates that each node's private data moves, by node id."""


def secret_step(node: int, arrays: dict[str, np.ndarray]) -> None:
    arrays["w"][: SECRET_COUNTS[node]] += np.float32(1.5)


def hostile_plan(
    monkeypatch: pytest.MonkeyPatch, *, clip_range: float, clipping_norm: float
) -> None:
    """Make the server plan a clip range and C of its choice, with sigma to match.

    Sigma grows by the same factor as C * scale, so each client's epsilon is
    that of an honest round. The server stays consistent: it decodes with the
    encoding it sent.
    """
    honest_plan = privacy_module.ServerPrivacy.plan

    def plan(
        self: privacy_module.ServerPrivacy,
        *,
        num_sampled: int,
        dimension: int,
        expected_clients: float | None = None,
    ) -> privacy_module.RoundPrivacy:
        planned = honest_plan(
            self,
            num_sampled=num_sampled,
            dimension=dimension,
            expected_clients=expected_clients,
        )
        assert planned.encoding is not None
        factor = (clipping_norm / planned.clipping_norm) * (
            planned.encoding.clip_range / clip_range
        )
        sigma = planned.sigma_client * factor
        encoding = dataclasses.replace(
            planned.encoding,
            clip_range=clip_range,
            noise_headroom=distributed_noise_headroom(
                sigma_client=sigma,
                num_clients=planned.encoding.max_clients,
                num_coordinates=dimension + 1,
            ),
        )
        return dataclasses.replace(
            planned, clipping_norm=clipping_norm, sigma_client=sigma, encoding=encoding
        )

    monkeypatch.setattr(privacy_module.ServerPrivacy, "plan", plan)


@KEY_LIFETIMES
@pytest.mark.parametrize(
    ("clip_range", "clipping_norm"),
    [
        pytest.param(0.01, CLIPPING_NORM, id="clip-range-below-C"),
        pytest.param(CLIPPING_NORM, 100.0, id="C-above-clip-range"),
    ],
)
def test_clipped_count_leaks_no_data(
    monkeypatch: pytest.MonkeyPatch,
    sent_inputs: dict[int, list[np.ndarray]],
    key_lifetime: str,
    clip_range: float,
    clipping_norm: float,
) -> None:
    hostile_plan(monkeypatch, clip_range=clip_range, clipping_norm=clipping_norm)
    trainer = Trainer(secret_step)
    budget = ClientPrivacyBudget(ONE_ROUND, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    reports: list[RoundReport] = []

    run_server(grid, key_lifetime=key_lifetime, reports=reports)

    # The budget admitted the round: the noise matches the sensitivity.
    [cost] = spent(grid, VICTIM)
    assert budget.epsilon((cost,)) <= ONE_ROUND
    counts = {node: int(sent_inputs[node][0][DIMENSION + 1]) for node in NODE_IDS}
    # Under DP the count of clipped coordinates stays on the client.
    assert counts == dict.fromkeys(NODE_IDS, 0), counts
    assert reports[0].clipped_coordinates == 0


EDGE_CLIPPING_NORM = 0.41932550412258496
"""A C for which 2 * C * ((levels - 1) / (2 * C)) rounds above levels - 1."""


def test_clipped_count_zero_honest_server(
    sent_inputs: dict[int, list[np.ndarray]],
) -> None:
    def axis_step(node: int, arrays: dict[str, np.ndarray]) -> None:
        arrays["w"][0] += np.float32(5.0 if node == VICTIM else -5.0)

    trainer = Trainer(axis_step)
    budget = ClientPrivacyBudget(1e6, min_honest_clients=HONEST)
    grid = LoopbackGrid(make_app(budget, trainer), list(NODE_IDS))
    dp = dataclasses.replace(DISTRIBUTED, clipping_norm=EDGE_CLIPPING_NORM)
    reports: list[RoundReport] = []

    run_server(grid, dp=dp, reports=reports)

    counts = {node: int(sent_inputs[node][0][DIMENSION + 1]) for node in NODE_IDS}
    # Only the victim's update reaches the top grid value, and its count stays 0.
    assert counts == dict.fromkeys(NODE_IDS, 0), counts
    assert reports[0].clipped_coordinates == 0


# --- The app's node config -------------------------------------------------------


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"dp-max-epsilon": math.nan}, "Found nan"),
        ({"dp-max-epsilon": math.inf}, "Found inf"),
        ({"dp-max-epsilon": -1.0}, "Found -1.0"),
        ({"dp-max-epsilon": True}, "dp-max-epsilon must be a number. Found True"),
        ({"dp-max-epsilon": 3.0, "dp-delta": math.nan}, "Found nan"),
        ({"dp-max-epsilon": 3.0, "dp-delta": "1e-5"}, "dp-delta must be a number"),
        ({"dp-max-epsilon": 3.0, "dp-min-honest-clients": True}, "Found True"),
        ({"dp-max-epsilon": 3.0, "dp-min-honest-clients": "5"}, "Found '5'"),
        ({"dp-max-epsilon": 3.0, "dp-min-honest-clients": -2}, "Found -2"),
    ],
)
def test_node_policy_rejects_hostile_values(
    node_config: dict[str, bool | int | float | str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NodePolicy.from_node_config(node_config)


def test_budget_implies_secure_aggregation() -> None:
    policy = NodePolicy.from_node_config(
        {"dp-max-epsilon": 2, "require-secure-aggregation": False}
    )

    assert policy.require_secure_aggregation
    assert policy.privacy_budget == ClientPrivacyBudget(2.0)


def test_invalid_budget_raises_before_training() -> None:
    with (APP_DIR / "pyproject.toml").open("rb") as file:
        run_config = dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])
    context = Context(
        run_id=1,
        node_id=7,
        node_config={
            "partition-id": 0,
            "num-partitions": 2,
            "dp-max-epsilon": math.nan,
        },
        state=RecordDict(),
        run_config=run_config,
    )
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    message = Message(
        RecordDict(
            {ARRAYS_RECORD: ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})}
        ),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )

    with pytest.raises(ValueError, match="Invalid dp-\\* node config: max_epsilon"):
        client_app.train_handler(message, context)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"dp-sigma-client": 0.0, "dp-bit-sigma-client": 0.0}, "dp-sigma-client"),
        (
            {"dp-sigma-client": 1.0, "dp-adaptive": 1, "dp-bit-sigma-client": 0.2},
            "dp-bit-sigma-client",
        ),
    ],
)
def test_client_without_budget_rejects_too_little_noise(
    fields: dict[str, object], key: str
) -> None:
    request = {"dp-mode": "distributed", "dp-clipping-norm": 1.0, **fields}

    with pytest.raises(ValueError, match=f"'{key}' must be between 0.5 and"):
        ClientPrivacy.from_fields(request)
