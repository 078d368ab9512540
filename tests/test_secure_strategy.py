"""SecureFedAvg and secure_aggregation_mod through Flower messages.

The loopback Grid serializes every message and Context as a deployment does.
Each client's update is fixed by its partition id, so the expected result is
the plaintext weighted mean of known updates.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedsec_flwr import (
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    TooFewSurvivorsError,
    make_secure_aggregation_mod,
    secure_aggregation_mod,
)
from fedsec_flwr.mod import CLIENT_TIMING_METRICS
from fedsec_flwr.records import MASKED_INPUT_RECORD
from tests.loopback import LoopbackGrid, stage_of

NUM_NODES = 5
NODE_IDS = [2**63 + 11 * i for i in range(NUM_NODES)]
CONFIG = SecAggConfig(
    clip_range=2.0, max_weight=1000, max_clients=10, stage_timeout=0.3
)


def initial_model() -> dict[str, np.ndarray]:
    return {
        "dense.weight": np.zeros((3, 4), dtype=np.float32),
        "dense.bias": np.zeros(3, dtype=np.float64),
        "bn.scale": np.array(0.5, dtype=np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def client_update(partition: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(partition)
    return {
        "dense.weight": rng.uniform(-1, 1, (3, 4)).astype(np.float32),
        "dense.bias": rng.uniform(-1, 1, 3),
        "bn.scale": np.array(rng.uniform(-1, 1), dtype=np.float32),
    }


def client_weight(partition: int) -> int:
    return [1, 10, 100, 1000, 7][partition % 5]


TrainFn = Callable[[Message, Context], Message]


def honest_train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    for key, delta in client_update(partition).items():
        arrays[key] = (arrays[key] + delta).astype(arrays[key].dtype)
    arrays["bn.num_batches_tracked"] = arrays["bn.num_batches_tracked"] + 3
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(
                {"num-examples": client_weight(partition), "train-loss": 0.5}
            ),
        }
    )
    return Message(content, reply_to=msg)


def make_app(
    train: TrainFn = honest_train,
    secure: bool = True,
    mod: Mod = secure_aggregation_mod,
) -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if secure:
            return mod(msg, context, train)
        return train(msg, context)

    return app


def run(
    grid: LoopbackGrid,
    *,
    config: SecAggConfig | None = CONFIG,
    rounds: int = 1,
    reports: list[RoundReport] | None = None,
) -> dict[str, np.ndarray]:
    strategy = SecureFedAvg(
        secure_aggregation=config,
        rng=random.Random(3),
        on_round_end=reports.append if reports is not None else None,
    )
    initial = ArrayRecord({k: Array(v) for k, v in initial_model().items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return {k: v.numpy() for k, v in result.arrays.items()}


def expected_model(included: list[int]) -> dict[str, np.ndarray]:
    total = sum(client_weight(p) for p in included)
    model = initial_model()
    for key in ("dense.weight", "dense.bias", "bn.scale"):
        mean = (
            sum(
                client_update(p)[key].astype(np.float64) * client_weight(p)
                for p in included
            )
            / total
        )
        model[key] = (model[key] + mean).astype(model[key].dtype)
    return model


def assert_close(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> None:
    step = CONFIG.encoding().step
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        np.testing.assert_allclose(actual[key], value, atol=step + 1e-6, err_msg=key)


def test_secure_round_equals_plaintext_mean() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    model = run(grid)

    assert_close(model, expected_model(list(range(NUM_NODES))))


def test_plain_mode_equals_plaintext_mean() -> None:
    grid = LoopbackGrid(make_app(secure=False), NODE_IDS)

    model = run(grid, config=None)

    assert_close(model, expected_model(list(range(NUM_NODES))))


def test_int_and_scalar_arrays_keep_shape_and_dtype() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    model = run(grid)

    assert model["bn.scale"].shape == ()
    assert model["bn.scale"].dtype == np.float32
    assert model["bn.num_batches_tracked"].dtype == np.int64
    assert model["bn.num_batches_tracked"] == 7


def test_no_plaintext_array_leaves_client() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid)

    masked_replies = [r for r in grid.received if MASKED_INPUT_RECORD in r.content]
    assert len(masked_replies) == NUM_NODES
    for reply in grid.received:
        assert list(reply.content.array_records) in ([], [MASKED_INPUT_RECORD])
    for reply in masked_replies:
        assert reply.content[MASKED_INPUT_RECORD]["vector"].dtype == "uint32"
        # The wrapped app's metrics travel in clear, so none leave by default.
        assert dict(reply.content["metrics"]) == {}


def test_upload_is_four_bytes_per_coordinate() -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)

    run(grid, reports=reports)

    vector_bytes = [
        r.content[MASKED_INPUT_RECORD]["vector"].numpy().nbytes
        for r in grid.received
        if MASKED_INPUT_RECORD in r.content
    ]
    num_coordinates = 3 * 4 + 3 + 1
    assert vector_bytes == [4 * (num_coordinates + 2)] * NUM_NODES
    assert set(reports[0].upload_bytes) == set(NODE_IDS)


@pytest.mark.parametrize("stage", ["setup", "share-keys", "masked-input", "unmask"])
@pytest.mark.parametrize("action", ["drop", "error"])
def test_one_client_lost_at_each_stage(stage: str, action: str) -> None:
    lost = NODE_IDS[1]

    def fault(node: int, name: str, _: Message) -> object:
        return action if node == lost and name == stage else None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    model = run(grid, reports=reports)

    included = [p for p in range(NUM_NODES) if stage == "unmask" or p != 1]
    assert_close(model, expected_model(included))
    assert reports[0].num_aggregated == len(included)
    assert reports[0].dropped_by_stage[stage] == 1


def test_too_many_dropouts_fail_without_model() -> None:
    def fault(node: int, name: str, _: Message) -> object:
        return "drop" if name == "masked-input" and node in NODE_IDS[:3] else None

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    with pytest.raises(TooFewSurvivorsError, match="no model is released"):
        run(grid, reports=reports)
    assert reports == []


def test_dropout_after_key_sharing_over_two_rounds() -> None:
    def fault(node: int, name: str, msg: Message) -> object:
        late_round = msg.metadata.group_id == "2"
        return (
            "drop"
            if late_round and node == NODE_IDS[4] and name == "masked-input"
            else None
        )

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)

    run(grid, rounds=2, reports=reports)

    assert [r.num_aggregated for r in reports] == [5, 4]


def test_clipped_coordinates_reported(caplog: pytest.LogCaptureFixture) -> None:
    def big_update(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if int(context.node_config["partition-id"]) == 0:
            arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            weight = arrays["dense.weight"]
            weight[0, :4] = np.array([1.9, 2.5, 100.0, -1000.0], dtype=np.float32)
            reply.content["arrays"] = ArrayRecord(
                {k: Array(np.asarray(v)) for k, v in arrays.items()}
            )
        return reply

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(big_update), NODE_IDS)

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr"):
        run(grid, reports=reports)

    assert reports[0].clipped_coordinates == 3
    assert "clipped" in caplog.text


def _reply_transform(
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> TrainFn:
    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if int(context.node_config["partition-id"]) != 2:
            return reply
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        reply.content["arrays"] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in transform(arrays).items()}
        )
        return reply

    return train


HOSTILE_REPLIES = {
    "renamed key": lambda a: {
        ("x" if k == "dense.bias" else k): v for k, v in a.items()
    },
    "missing key": lambda a: {k: v for k, v in a.items() if k != "dense.bias"},
    "extra key": lambda a: {**a, "extra": np.zeros(2, dtype=np.float32)},
    "changed shape": lambda a: {**a, "dense.bias": np.zeros(4)},
    "changed dtype": lambda a: {**a, "dense.bias": a["dense.bias"].astype(np.float32)},
    "nan": lambda a: {**a, "dense.bias": np.array([np.nan, 0.0, 0.0])},
    "inf": lambda a: {**a, "bn.scale": np.array(np.inf, dtype=np.float32)},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_REPLIES))
def test_invalid_client_reply_counts_as_dropped(name: str) -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(_reply_transform(HOSTILE_REPLIES[name])), NODE_IDS)

    model = run(grid, reports=reports)

    assert_close(model, expected_model([0, 1, 3, 4]))
    assert reports[0].dropped_by_stage["masked-input"] == 1
    for reply in grid.received:
        if reply.metadata.src_node_id == NODE_IDS[2]:
            assert not reply.content.array_records if reply.has_content() else True


@pytest.mark.parametrize("records", [0, 2])
def test_reply_without_single_array_record_rejected(records: int) -> None:
    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if int(context.node_config["partition-id"]) == 2:
            arrays = reply.content["arrays"]
            del reply.content["arrays"]
            for i in range(records):
                reply.content[f"arrays{i}"] = arrays
        return reply

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(train), NODE_IDS)

    model = run(grid, reports=reports)

    assert_close(model, expected_model([0, 1, 3, 4]))


def test_zero_examples_everywhere_fails_naming_total() -> None:
    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        reply.content["metrics"]["num-examples"] = 0
        return reply

    grid = LoopbackGrid(make_app(train), NODE_IDS)

    with pytest.raises(ValueError, match="total weight of the aggregated clients is 0"):
        run(grid)


def test_weight_above_max_weight_rejected() -> None:
    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if int(context.node_config["partition-id"]) == 0:
            reply.content["metrics"]["num-examples"] = 5000
        return reply

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(train), NODE_IDS)

    run(grid, reports=reports)

    assert reports[0].num_aggregated == NUM_NODES - 1


def test_plain_round_of_invalid_replies_names_their_reasons() -> None:
    def nan_train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        reply.content["arrays"] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in HOSTILE_REPLIES["nan"](arrays).items()}
        )
        return reply

    grid = LoopbackGrid(make_app(nan_train, secure=False), NODE_IDS)

    with pytest.raises(
        ValueError, match="total weight of the 0 valid replies"
    ) as error:
        run(grid, config=None)
    assert f"Invalid replies: {NUM_NODES} x " in str(error.value)
    assert "dense.bias" in str(error.value)


def test_plain_train_message_rejected_by_mod() -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    with pytest.raises(
        ValueError, match="total weight of the 0 valid replies"
    ) as error:
        run(grid, config=None)
    assert f"Error replies from clients: {NUM_NODES} x " in str(error.value)
    assert "has no 'fedsec.secagg' ConfigRecord" in str(error.value)
    for reply in grid.received:
        assert reply.has_error()
        assert "secure aggregation" in (reply.error.reason or "")


def test_stage_replayed_from_other_round_rejected() -> None:
    replayed: dict[str, Message] = {}

    def fault(node: int, name: str, msg: Message) -> object:
        if node == NODE_IDS[0] and name == "unmask":
            if msg.metadata.group_id == "1":
                replayed["unmask"] = msg
            elif "unmask" in replayed:
                return "drop"
        return None

    grid = LoopbackGrid(make_app(), NODE_IDS, fault=fault)
    run(grid, rounds=2)
    old = replayed["unmask"]
    context_replay = grid._deliver(old)

    assert context_replay is not None
    assert context_replay.has_error()
    assert stage_of(old) == "unmask"


TIMED_MOD = make_secure_aggregation_mod(report_timings=True)


def test_round_reports_stage_and_client_timings() -> None:
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(mod=TIMED_MOD), NODE_IDS)

    run(grid, reports=reports)

    timings = reports[0].timings
    for stage in ("setup", "share-keys", "masked-input", "unmask", "decode"):
        assert timings[stage] >= 0.0, stage
    assert sum(timings.values()) <= reports[0].seconds
    for key in CLIENT_TIMING_METRICS:
        assert reports[0].train_metrics[key] >= 0.0, key


FORWARDING_MOD = make_secure_aggregation_mod(forward_metrics=True)


@pytest.mark.parametrize("key_lifetime", ["round", "run"])
def test_client_timings_stay_on_the_client_by_default(key_lifetime: str) -> None:
    # They travel in clear, and training time hints at the dataset's size.
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(mod=FORWARDING_MOD), NODE_IDS)
    config = dataclasses.replace(CONFIG, key_lifetime=key_lifetime)

    run(grid, config=config, rounds=2, reports=reports)

    for report in reports:
        assert report.train_metrics["train-loss"] == 0.5
        assert not set(CLIENT_TIMING_METRICS) & set(report.train_metrics)


@pytest.mark.parametrize("key_lifetime", ["round", "run"])
def test_app_metrics_stay_on_the_client_by_default(key_lifetime: str) -> None:
    # A training loss is a statistic of one client's data, outside the
    # secure sum and any DP noise.
    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(), NODE_IDS)
    config = dataclasses.replace(CONFIG, key_lifetime=key_lifetime)

    run(grid, config=config, rounds=2, reports=reports)

    sent = [
        dict(reply.content["metrics"])
        for reply in grid.received
        if "metrics" in reply.content
    ]
    assert sent
    assert all(metrics == {} for metrics in sent)
    for report in reports:
        assert "train-loss" not in report.train_metrics


def test_client_cpu_seconds_count_cpu_not_waiting() -> None:
    def sleepy_train(msg: Message, context: Context) -> Message:
        # Waiting uses wall time but almost no CPU time.
        time.sleep(0.2)
        return honest_train(msg, context)

    reports: list[RoundReport] = []
    grid = LoopbackGrid(make_app(sleepy_train, mod=TIMED_MOD), NODE_IDS)

    run(grid, reports=reports)

    metrics = reports[0].train_metrics
    assert metrics["fedsec.client-train-seconds"] >= 0.2
    assert 0.0 < metrics["fedsec.client-cpu-seconds"] < 0.1


def test_integer_arrays_left_out_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)

    with caplog.at_level(logging.INFO, logger="fedsec_flwr"):
        run(grid)

    assert "not aggregated" in caplog.text
    assert "bn.num_batches_tracked" in caplog.text


def test_two_client_round_warns(caplog: pytest.LogCaptureFixture) -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS[:2])

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr"):
        run(grid)

    assert "only 2 clients" in caplog.text


@pytest.mark.parametrize("clip_range", [2.0, 1e30])
def test_clip_range_far_above_updates_warns(
    clip_range: float, caplog: pytest.LogCaptureFixture
) -> None:
    grid = LoopbackGrid(make_app(), NODE_IDS)
    config = dataclasses.replace(CONFIG, clip_range=clip_range)

    with caplog.at_level(logging.WARNING, logger="fedsec_flwr.mod"):
        run(grid, config=config)

    warned = "every update coordinate is smaller than one quantization step"
    assert (warned in caplog.text) is (clip_range > 1e20)


class _UnprintableError(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("no text")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TypeError("bad operand"), "ClientApp training failed: TypeError: bad operand"),
        (
            _UnprintableError(),
            "ClientApp training failed: _UnprintableError: (its message could not be "
            "formatted)",
        ),
    ],
)
def test_training_exception_reported_as_such(
    error: Exception, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_train(msg: Message, context: Context) -> Message:
        raise error

    grid = LoopbackGrid(make_app(failing_train), NODE_IDS)

    with (
        caplog.at_level(logging.ERROR, logger="fedsec_flwr"),
        pytest.raises(TooFewSurvivorsError) as caught,
    ):
        run(grid)

    assert reason in str(caught.value)
    assert "secure aggregation:" not in str(caught.value)
    logged = [record for record in caplog.records if reason in record.getMessage()]
    assert logged
    assert logged[0].exc_info is not None
