"""Differential privacy through the real `flwr run` simulation path."""

from pathlib import Path

import pytest

from tests.app_runs import launch_app

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(600)
def test_distributed_dp_with_secure_aggregation(tmp_path: Path) -> None:
    results = launch_app(
        tmp_path / "dp",
        "dataset=breast-cancer num-server-rounds=5 seed=42 secure-aggregation=true "
        "dp-mode=distributed target-epsilon=3.0 delta=1e-5 clipping-norm=0.3",
        num_supernodes=10,
    )

    rounds = results["rounds"]
    epsilons = [entry["epsilon"] for entry in rounds]
    assert len(rounds) == 5
    assert all(epsilon is not None and epsilon > 0 for epsilon in epsilons)
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] <= 3.0
    # Without client sampling the server's own figure is the same.
    assert [entry["epsilon_against_server"] for entry in rounds] == epsilons
    assert rounds[-1]["accuracy"] >= 0.85


@pytest.mark.timeout(600)
def test_dp_sgd_on_clients_reports_sample_epsilon(tmp_path: Path) -> None:
    results = launch_app(
        tmp_path / "dpsgd",
        "dataset=breast-cancer num-server-rounds=2 seed=42 secure-aggregation=true "
        "dp-sgd=true dp-sgd-noise-multiplier=1.0 dp-sgd-max-grad-norm=1.0",
        num_supernodes=4,
    )

    rounds = results["rounds"]
    sample_epsilons = [entry["train_metrics"]["sample-epsilon"] for entry in rounds]
    assert len(rounds) == 2
    assert sample_epsilons[0] > 0
    assert sample_epsilons[1] > sample_epsilons[0]
