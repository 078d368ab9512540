"""The app's train handler sends no per-client statistic beyond the update,
unless the run config turns on the clients' stage timings."""

import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app.client_app import app as client_app  # noqa: E402
from secure_fedavg_app.client_app import reports_timings  # noqa: E402
from secure_fedavg_app.models import build_model  # noqa: E402
from secure_fedavg_app.node_policy import NodePolicy  # noqa: E402
from secure_fedavg_app.settings import AppSettings  # noqa: E402
from secure_fedavg_app.strategy_factory import build_strategy  # noqa: E402
from secure_fedavg_app.training import evaluate_local, plain_train  # noqa: E402

from fedsec_flwr import RoundReport  # noqa: E402
from tests.loopback import LoopbackGrid  # noqa: E402


def message_and_context(
    node_policy: dict[str, object] | None = None, **changes: object
) -> tuple[Message, Context]:
    with (APP_DIR / "pyproject.toml").open("rb") as file:
        run_config = dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])
    run_config.update({key.replace("_", "-"): value for key, value in changes.items()})
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 4, **(node_policy or {})},  # type: ignore[dict-item]
        state=RecordDict(),
        run_config=run_config,  # type: ignore[arg-type]
    )
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    dp_sgd = bool(changes.get("dp_sgd", False))
    model = build_model(str(run_config["dataset"]), dp_sgd=dp_sgd)
    message = Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict())}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    return message, context


def train_metrics(
    node_policy: dict[str, object] | None = None, **changes: object
) -> dict[str, object]:
    message, context = message_and_context(node_policy, **changes)

    reply = plain_train(message, context)

    return dict(reply.content["metrics"])


def test_plain_round_reports_train_loss() -> None:
    metrics = train_metrics(secure_aggregation=False)

    assert metrics["train-loss"] > 0  # type: ignore[operator]
    assert metrics["num-examples"] > 0  # type: ignore[operator]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"secure_aggregation": False, "dp_mode": "central", "noise_multiplier": 1.0},
        {"secure_aggregation": False, "dp_sgd": True, "dp_sgd_noise_multiplier": 1.0},
    ],
    ids=["secure", "central-dp", "dp-sgd"],
)
def test_private_round_omits_train_loss(changes: dict[str, object]) -> None:
    metrics = train_metrics(**changes)

    assert "train-loss" not in metrics
    assert metrics["num-examples"] > 0  # type: ignore[operator]


@pytest.mark.parametrize(
    "node_policy",
    [{"require-secure-aggregation": True}, {"dp-max-epsilon": 5.0}],
    ids=["secure-aggregation", "dp-budget"],
)
def test_node_policy_omits_train_loss(node_policy: dict[str, object]) -> None:
    # The node's policy runs the secure mod even when the run config turns
    # secure aggregation off, so the loss must stay out here too.
    metrics = train_metrics(node_policy, secure_aggregation=False)

    assert "train-loss" not in metrics


@pytest.mark.parametrize(
    ("node_policy", "changes", "sent"),
    [
        ({}, {}, True),
        ({"require-secure-aggregation": True}, {}, False),
        ({"dp-max-epsilon": 5.0}, {}, False),
        ({}, {"dp_mode": "central", "noise_multiplier": 1.0}, False),
    ],
    ids=["no-policy", "secure-aggregation", "dp-budget", "client-level-dp"],
)
def test_private_node_withholds_dp_sgd_epsilon(
    node_policy: dict[str, object], changes: dict[str, object], sent: bool
) -> None:
    # The sample-level epsilon is a function of the node's number of
    # examples, which client-level DP keeps from the server too.
    metrics = train_metrics(
        node_policy, dp_sgd=True, dp_sgd_noise_multiplier=1.0, **changes
    )

    assert ("sample-epsilon" in metrics) is sent
    assert ("sample-round-epsilon" in metrics) is sent


def test_plain_node_evaluates() -> None:
    message, context = message_and_context(secure_aggregation=False)

    reply = evaluate_local(message, context)

    assert 0.0 <= reply.content["metrics"]["accuracy"] <= 1.0  # type: ignore[operator]


@pytest.mark.parametrize(
    ("node_policy", "changes"),
    [
        (None, {}),
        ({"require-secure-aggregation": True}, {"secure_aggregation": False}),
        ({"dp-max-epsilon": 5.0}, {"secure_aggregation": False}),
    ],
    ids=["secure-run", "secure-policy", "dp-budget"],
)
def test_private_node_refuses_evaluate(
    node_policy: dict[str, object] | None, changes: dict[str, object]
) -> None:
    message, context = message_and_context(node_policy, **changes)

    with pytest.raises(ValueError, match="rejects evaluate messages"):
        evaluate_local(message, context)


CLIENT_TIMING_KEYS = {
    "fedsec.client-train-seconds",
    "fedsec.client-train-encode-seconds",
    "fedsec.client-mask-seconds",
    "fedsec.client-cpu-seconds",
}


def secure_round_metrics(**changes: object) -> dict[str, object]:
    """Run one secure round of the app's own ClientApp and return its metrics."""
    with (APP_DIR / "pyproject.toml").open("rb") as file:
        run_config = dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])
    run_config.update({key.replace("_", "-"): value for key, value in changes.items()})
    settings = AppSettings.from_run_config(run_config)  # type: ignore[arg-type]
    reports: list[RoundReport] = []
    strategy = build_strategy(settings, reports.append, audit_path=Path("unused"))
    model = build_model(settings.dataset)
    grid = LoopbackGrid(client_app, [101, 102, 103], run_config=run_config)

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()))

    return dict(reports[0].train_metrics)


@pytest.mark.parametrize("client_timings", [False, True])
def test_app_sends_timings_only_when_asked(client_timings: bool) -> None:
    metrics = secure_round_metrics(
        num_server_rounds=1, min_train_clients=3, client_timings=client_timings
    )

    expected = CLIENT_TIMING_KEYS if client_timings else set()
    assert CLIENT_TIMING_KEYS & set(metrics) == expected


@pytest.mark.parametrize(
    ("node_policy", "expected"),
    [
        ({}, True),
        ({"require-verification": True}, True),
        ({"require-secure-aggregation": True}, False),
        ({"dp-max-epsilon": 5.0}, False),
    ],
    ids=["none", "verification", "secure-aggregation", "dp-budget"],
)
def test_private_node_policy_withholds_timings(
    node_policy: dict[str, object], expected: bool
) -> None:
    _, context = message_and_context(node_policy, client_timings=True)
    settings = AppSettings.from_run_config(context.run_config)
    policy = NodePolicy.from_node_config(context.node_config)

    assert reports_timings(settings, policy) is expected


def test_dp_sgd_target_below_floor_named() -> None:
    message, context = message_and_context(
        secure_aggregation=False, dp_sgd=True, dp_sgd_target_epsilon=0.001
    )

    with pytest.raises(ValueError) as caught:
        plain_train(message, context)

    assert str(caught.value) == (
        "dp-sgd-target-epsilon 0.001 is below 0.01949, the smallest epsilon the "
        "RDP accountant reports at delta 1e-05 with any noise. Raise "
        "dp-sgd-target-epsilon or delta."
    )


def test_dp_sgd_target_error_names_keys() -> None:
    message, context = message_and_context(
        secure_aggregation=False,
        dp_sgd=True,
        dp_sgd_target_epsilon=0.021,
        num_server_rounds=20_000,
        local_epochs=4,
    )

    with pytest.raises(ValueError) as caught:
        plain_train(message, context)

    text = str(caught.value)
    assert text.startswith(
        "dp-sgd-target-epsilon 0.021 with delta 1e-05 needs a DP-SGD noise "
        "multiplier above 16384 on this node's partition, over num-server-rounds "
        "20000 of local-epochs 4 at batch-size 8."
    )
    # The reply travels in clear: it does not give the partition's size.
    num_examples = train_metrics(secure_aggregation=False)["num-examples"]
    assert str(num_examples) not in text


def test_training_failure_reported_as_such(tmp_path: Path) -> None:
    # Every client's DP-SGD calibration fails; the run ends naming that,
    # not a protocol stage.
    from secure_fedavg_app.results import ResultsFile
    from secure_fedavg_app.server_app import _run

    with (APP_DIR / "pyproject.toml").open("rb") as file:
        config = dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])
    config.update(
        {"dp-sgd": True, "dp-sgd-target-epsilon": 0.001, "num-server-rounds": 1}
    )
    grid = LoopbackGrid(client_app, [1, 2, 3], run_config=config)
    results = ResultsFile(tmp_path, run_config=config, run_info={})

    with pytest.raises(Exception) as caught:
        _run(grid, config, results)

    text = str(caught.value)
    assert "3 x " in text
    assert "ClientApp training failed: ValueError: dp-sgd-target-epsilon" in text
    assert "secure aggregation:" not in text


def test_spent_dp_sgd_budget_reply_gives_no_epsilon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The budget covers one round; a second round on the same node exceeds it.
    message, context = message_and_context(
        secure_aggregation=False,
        dp_sgd=True,
        dp_sgd_target_epsilon=3.0,
        num_server_rounds=1,
        local_epochs=1,
    )
    plain_train(message, context)
    again, _ = message_and_context(
        secure_aggregation=False,
        dp_sgd=True,
        dp_sgd_target_epsilon=3.0,
        num_server_rounds=1,
        local_epochs=1,
    )

    with pytest.raises(RuntimeError) as caught:
        plain_train(again, context)

    assert str(caught.value) == (
        "DP-SGD training failed on this node (PrivacyBudgetExceededError); its "
        "log gives the reason."
    )
    assert "would raise the cumulative epsilon" in caplog.text
