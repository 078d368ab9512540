from pathlib import Path

import pytest

from tests.app_runs import launch_app

NUM_ROUNDS = 5
NUM_SUPERNODES = 10
SEED = 42
MIN_ACCURACY = 0.93
MAX_ACCURACY_GAP = 0.01

pytestmark = pytest.mark.e2e


def _run_config(secure_aggregation: bool) -> str:
    return (
        f"dataset=breast-cancer num-server-rounds={NUM_ROUNDS} seed={SEED} "
        f"secure-aggregation={str(secure_aggregation).lower()}"
    )


@pytest.mark.timeout(1200)
def test_secure_matches_plain_fedavg(tmp_path: Path) -> None:
    secure = launch_app(tmp_path / "secure", _run_config(True), NUM_SUPERNODES)
    plain = launch_app(tmp_path / "plain", _run_config(False), NUM_SUPERNODES)

    secure_accuracy = secure["rounds"][-1]["accuracy"]
    plain_accuracy = plain["rounds"][-1]["accuracy"]
    assert secure["status"] == "completed"
    assert secure["secure_aggregation"] is True
    assert plain["secure_aggregation"] is False
    assert len(secure["rounds"]) == NUM_ROUNDS
    assert secure["rounds"][-1]["num_aggregated"] == NUM_SUPERNODES
    assert secure_accuracy >= MIN_ACCURACY
    assert abs(secure_accuracy - plain_accuracy) <= MAX_ACCURACY_GAP


@pytest.mark.timeout(600)
def test_server_learning_rate_reaches_the_model(tmp_path: Path) -> None:
    # A server step of 1e-6 times the velocity leaves the model where it
    # started, so every round evaluates about the same model. With the
    # default server step the loss falls by several hundredths from round
    # 1 to 3 (0.155 to 0.097 with 3 clients).
    results = launch_app(
        tmp_path / "momentum",
        _run_config(True).replace(f"num-server-rounds={NUM_ROUNDS}", "")
        + " num-server-rounds=3 server-learning-rate=1e-6 server-momentum=0.5",
        4,
    )

    losses = [entry["loss"] for entry in results["rounds"]]
    assert results["status"] == "completed"
    assert results["run_config"]["server-momentum"] == 0.5
    assert len(losses) == 3
    assert max(losses) - min(losses) < 1e-3


@pytest.mark.timeout(600)
def test_hidden_units_set_the_model_size(tmp_path: Path) -> None:
    # Breast-cancer's MLP has 30 inputs, 2 classes and 33 * h + 2
    # parameters; the default h = 16 gives 530. The server builds the
    # initial model and each client its own copy, so a width that reached
    # only one of them would fail the first round on mismatched shapes.
    hidden_units = 40
    results = launch_app(
        tmp_path / "wide",
        _run_config(True).replace(f"num-server-rounds={NUM_ROUNDS}", "")
        + f" num-server-rounds=2 hidden-units={hidden_units}",
        3,
    )

    assert results["status"] == "completed"
    assert results["model_parameters"] == 33 * hidden_units + 2
    assert len(results["rounds"]) == 2
    assert results["rounds"][-1]["num_aggregated"] == 3
