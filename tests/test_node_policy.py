"""The app's node-config requirements, which the run config cannot lift."""

import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app import client_app  # noqa: E402
from secure_fedavg_app.node_policy import NodePolicy  # noqa: E402

from fedsec_flwr import ClientPrivacyBudget  # noqa: E402


def default_run_config() -> dict[str, object]:
    with (APP_DIR / "pyproject.toml").open("rb") as file:
        return dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])


def test_node_without_policy_keys_follows_the_run_config() -> None:
    policy = NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 3})

    assert policy == NodePolicy()


def test_node_policy_parses_every_key() -> None:
    policy = NodePolicy.from_node_config(
        {
            "require-verification": True,
            "dp-max-epsilon": 3,
            "dp-delta": 1e-6,
            "dp-min-honest-clients": 5,
            "trust-dropout-reports": True,
        }
    )

    assert policy.require_secure_aggregation
    assert policy.require_verification
    assert policy.trust_dropout_reports
    assert policy.privacy_budget == ClientPrivacyBudget(
        max_epsilon=3.0, delta=1e-6, min_honest_clients=5
    )


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"require-secure-aggregation": "yes"}, "must be true or false. Found 'yes'"),
        ({"require-verification": 1}, "require-verification must be true or false"),
        (
            {"trust-dropout-reports": "no"},
            "trust-dropout-reports must be true or false",
        ),
        ({"dp-max-epsilon": "3"}, "dp-max-epsilon must be a number. Found '3'"),
        ({"dp-max-epsilon": 0.0}, "max_epsilon must be a finite number above 0"),
        ({"dp-max-epsilon": 3.0, "dp-delta": 2.0}, "Found 2.0"),
        ({"dp-max-epsilon": 3.0, "dp-min-honest-clients": 2.5}, "Found 2.5"),
        ({"dp-max-epsilon": 3.0, "dp-min-honest-clients": 0}, "Found 0"),
        ({"dp-delta": 1e-6}, "'dp-delta' needs 'dp-max-epsilon'"),
        ({"dp-min-honest-clients": 2}, "'dp-min-honest-clients' needs"),
    ],
)
def test_node_policy_rejects_invalid_values(
    node_config: dict[str, bool | int | float | str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NodePolicy.from_node_config(node_config)


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("require_secure_aggregation", "require-secure-aggregation"),
        ("require-secure-aggregaton", "require-secure-aggregation"),
        ("Require-Secure-Aggregation", "require-secure-aggregation"),
        ("require-verifcation", "require-verification"),
        ("dp_max_epsilon", "dp-max-epsilon"),
        ("dp-max-epsilson", "dp-max-epsilon"),
        ("dp-min-honest-client", "dp-min-honest-clients"),
        ("trust-dropout-report", "trust-dropout-reports"),
        ("trust_dropout_reports", "trust-dropout-reports"),
    ],
)
def test_misspelled_policy_key_rejected(key: str, meant: str) -> None:
    # Ignoring the key would run the node without the requirement it names.
    with pytest.raises(ValueError, match=f"{key!r} is not a policy key") as error:
        NodePolicy.from_node_config({key: True, "partition-id": 0})

    assert f"Did you mean {meant!r}?" in str(error.value)


@pytest.mark.parametrize(
    "key",
    [
        "require-secagg",
        "require-secure-agg",
        "require-verify",
        "dp-epsilon",
        "dp-max-eps",
        "dp-min-honest",
        "DP_Budget",
    ],
)
def test_unknown_policy_like_key_rejected(key: str) -> None:
    with pytest.raises(ValueError, match=f"{key!r} is not a policy key"):
        NodePolicy.from_node_config({key: True})


def test_other_node_keys_accepted() -> None:
    config = {"partition-id": 0, "num-partitions": 3, "data-dir": "/data", "seed": 1}

    assert NodePolicy.from_node_config(config) == NodePolicy()


def plain_train_message() -> Message:
    # Messages take their run and sender from the process's task identity.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    model = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    return Message(
        RecordDict({"arrays": model}), dst_node_id=7, message_type=MessageType.TRAIN
    )


@pytest.mark.parametrize(
    "node_config",
    [{"require-secure-aggregation": True}, {"dp-max-epsilon": 8.0}],
)
def test_required_secure_aggregation_overrides_a_plain_run(
    node_config: dict[str, bool | int | float | str],
) -> None:
    run_config = {**default_run_config(), "secure-aggregation": False}
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2, **node_config},
        state=RecordDict(),
        run_config=run_config,  # type: ignore[arg-type]
    )

    reply = client_app.train_handler(plain_train_message(), context)

    assert reply.has_error()
    assert "has no 'fedsec.secagg' ConfigRecord" in reply.error.reason
    assert not reply.has_content()
