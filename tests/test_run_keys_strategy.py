"""SecureFedAvg with keys agreed once per run, through Flower messages.

The loopback Grid serializes every message and Context as a deployment does,
so the run keys survive between rounds only in ``Context.state``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedsec_flwr import (
    DPConfig,
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    TooFewSurvivorsError,
)
from fedsec_flwr.core.errors import ProtocolError
from fedsec_flwr.core.messages import Stage
from fedsec_flwr.records import (
    MASKED_INPUT_RECORD,
    MASKED_VECTOR_KEY,
    PROTOCOL_RECORD,
    RUN_KEYS_RECORD,
)
from tests.loopback import LoopbackGrid, stage_of
from tests.test_secure_strategy import (
    CONFIG,
    NODE_IDS,
    NUM_NODES,
    client_update,
    client_weight,
    initial_model,
    make_app,
)

RUN_CONFIG = dataclasses.replace(CONFIG, key_lifetime="run")


def _round_of(message: Message) -> int:
    return int(message.content.config_records[PROTOCOL_RECORD]["server-round"])  # type: ignore[arg-type]


def _run(
    grid: LoopbackGrid, rounds: int, **kwargs: object
) -> tuple[dict[str, np.ndarray], list[RoundReport]]:
    reports: list[RoundReport] = []
    strategy = SecureFedAvg(
        secure_aggregation=RUN_CONFIG,
        rng=random.Random(5),
        on_round_end=reports.append,
        **kwargs,  # type: ignore[arg-type]
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}, reports


def _expected(included_per_round: list[list[int]]) -> dict[str, np.ndarray]:
    """The model after rounds in which each client adds its fixed update."""
    model = {k: v.astype(np.float64) for k, v in initial_model().items()}
    for included in included_per_round:
        total = sum(client_weight(p) for p in included)
        for key in ("dense.weight", "dense.bias", "bn.scale"):
            model[key] = (
                model[key]
                + sum(
                    client_update(p)[key].astype(np.float64) * client_weight(p)
                    for p in included
                )
                / total
            )
    return model


def _assert_close(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], rounds: int
) -> None:
    tolerance = rounds * (RUN_CONFIG.encoding().step + 1e-6)
    for key in ("dense.weight", "dense.bias", "bn.scale"):
        np.testing.assert_allclose(actual[key], expected[key], atol=tolerance)


def _stages_by_round(grid: LoopbackGrid) -> dict[int, Counter[str]]:
    counts: dict[int, Counter[str]] = {}
    for message in grid.sent:
        counts.setdefault(_round_of(message), Counter())[stage_of(message)] += 1
    return counts


def test_rounds_match_plaintext_with_two_exchanges() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    model, reports = _run(grid, rounds=3)

    everyone = list(range(NUM_NODES))
    _assert_close(model, _expected([everyone] * 3), rounds=3)
    stages = _stages_by_round(grid)
    assert stages[1] == Counter(
        {"register": NUM_NODES, "keyed-input": NUM_NODES, "keyed-unmask": NUM_NODES}
    )
    for rnd in (2, 3):
        assert stages[rnd] == Counter(
            {"keyed-input": NUM_NODES, "keyed-unmask": NUM_NODES}
        )
    assert [r.num_aggregated for r in reports] == [NUM_NODES] * 3
    assert set(reports[1].timings) >= {"keyed-input", "keyed-unmask"}


def test_private_keys_stay_in_context_state() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    _run(grid, rounds=2)

    private = {
        bytes(grid_context.state.config_records[RUN_KEYS_RECORD][name])  # type: ignore[arg-type]
        for grid_context in (grid.context_of(node) for node in NODE_IDS)
        for name in ("encryption-private-key", "mask-private-key")
    }
    assert len(private) == 2 * NUM_NODES
    for message in grid.sent + grid.received:
        if message.has_error():
            continue
        for record in message.content.config_records.values():
            for value in record.values():
                values = value if isinstance(value, list) else [value]
                assert not any(v in private for v in values if isinstance(v, bytes))


def test_dropped_client_rejoins_next_round() -> None:
    late = NODE_IDS[2]

    def fault(node: int, name: str, message: Message) -> object:
        dropping = node == late and name == "keyed-input" and _round_of(message) == 2
        return "drop" if dropping else None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    model, reports = _run(grid, rounds=3)

    everyone = list(range(NUM_NODES))
    without = [p for p in everyone if p != 2]
    _assert_close(model, _expected([everyone, without, everyone]), rounds=3)
    assert [r.num_aggregated for r in reports] == [5, 4, 5]
    assert _stages_by_round(grid)[3]["register"] == 1
    assert reports[1].dropped_by_stage[Stage.KEYED_INPUT.value] == 1


def test_dropout_after_input_keeps_the_input() -> None:
    def fault(node: int, name: str, _: Message) -> object:
        return "drop" if node == NODE_IDS[0] and name == "keyed-unmask" else None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    model, reports = _run(grid, rounds=2)

    everyone = list(range(NUM_NODES))
    _assert_close(model, _expected([everyone, everyone]), rounds=2)
    assert [r.num_aggregated for r in reports] == [5, 5]


def test_too_many_dropouts_release_no_model() -> None:
    def fault(node: int, name: str, _: Message) -> object:
        return "error" if name == "keyed-input" and node in NODE_IDS[:3] else None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    with pytest.raises(TooFewSurvivorsError, match="no model is"):
        _run(grid, rounds=1)


def test_hostile_replayed_input_request_gets_error_reply() -> None:
    replayed: list[Message] = []

    def fault(node: int, name: str, message: Message) -> object:
        if name == "keyed-input" and node == NODE_IDS[1] and not replayed:
            replayed.append(message)
        return None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    _run(grid, rounds=1)

    reply = grid.deliver_again(replayed[0])

    assert reply.has_error()
    assert "already sent a masked input" in reply.error.reason


def test_distributed_dp_works_with_run_keys() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)
    dp = DPConfig(mode="distributed", noise_multiplier=0.5, clipping_norm=1.0)

    _, reports = _run(grid, rounds=2, differential_privacy=dp)

    assert [r.num_aggregated for r in reports] == [5, 5]
    epsilons = [r.epsilon for r in reports]
    assert all(e is not None and e > 0 for e in epsilons)
    assert epsilons[1] > epsilons[0]  # type: ignore[operator]


def test_key_lifetime_is_validated() -> None:
    with pytest.raises(ValueError, match="key_lifetime must be 'round' or 'run'"):
        SecAggConfig(key_lifetime="epoch")


def test_unmask_stops_waiting_once_shares_suffice() -> None:
    slow = NODE_IDS[3]

    def fault(node: int, name: str, _: Message) -> object:
        return "drop" if node == slow and name == "keyed-unmask" else None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    patient = dataclasses.replace(RUN_CONFIG, stage_timeout=30.0)
    strategy = SecureFedAvg(secure_aggregation=patient, rng=random.Random(5))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    reports: list[RoundReport] = []
    strategy.on_round_end = reports.append

    started = time.monotonic()
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    elapsed = time.monotonic() - started

    assert elapsed < patient.stage_timeout / 2
    assert reports[0].num_aggregated == NUM_NODES
    assert reports[0].dropped_by_stage[Stage.KEYED_UNMASK.value] == 0


@pytest.mark.parametrize("key_lifetime", ["round", "run"])
def test_failed_round_names_the_clients_error(key_lifetime: str) -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)
    small = dataclasses.replace(CONFIG, max_weight=5, key_lifetime=key_lifetime)
    strategy = SecureFedAvg(secure_aggregation=small, rng=random.Random(5))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    with pytest.raises(TooFewSurvivorsError) as raised:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)

    message = str(raised.value)
    assert "Error replies from clients" in message
    assert "must not exceed max_weight 5" in message


@pytest.mark.parametrize(
    ("key_lifetime", "stage"), [("round", "masked-input"), ("run", "keyed-input")]
)
def test_hostile_client_shift_outside_clip_range_aborts(
    key_lifetime: str, stage: str
) -> None:
    """A client that adds to its masked vector cannot push the mean off range."""
    shifter = NODE_IDS[1]

    def shift(reply: Message) -> Message:
        record = reply.content[MASKED_INPUT_RECORD]
        vector = record[MASKED_VECTOR_KEY].numpy().copy()
        vector[0] = (int(vector[0]) + 2**31) % 2**32
        record[MASKED_VECTOR_KEY] = Array(vector)
        return reply

    def fault(node: int, name: str, _: Message) -> object:
        return shift if node == shifter and name == stage else None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    config = dataclasses.replace(CONFIG, key_lifetime=key_lifetime)
    strategy = SecureFedAvg(secure_aggregation=config, rng=random.Random(5))
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})

    with pytest.raises(ProtocolError, match="outside the clipping range"):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
