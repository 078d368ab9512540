"""The app's train handler sends no per-client statistic beyond the update."""

import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app.models import build_model  # noqa: E402
from secure_fedavg_app.training import evaluate_local, plain_train  # noqa: E402


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
