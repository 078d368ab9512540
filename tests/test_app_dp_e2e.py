"""Differential privacy through the real `flwr run` simulation path."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "secure_fedavg"

pytestmark = pytest.mark.e2e


def _launch(output_dir: Path, run_config: str, num_supernodes: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "fedsec_flwr.launch",
        str(APP_DIR),
        "--output-dir",
        str(output_dir),
        "--num-supernodes",
        str(num_supernodes),
        "--run-config",
        run_config,
        "--timeout",
        "500",
    ]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=560, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results: dict[str, Any] = json.loads((output_dir / "results.json").read_text())
    return results


@pytest.mark.timeout(600)
def test_distributed_dp_with_secure_aggregation(tmp_path: Path) -> None:
    results = _launch(
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
    assert rounds[-1]["accuracy"] >= 0.85


@pytest.mark.timeout(600)
def test_dp_sgd_on_clients_reports_sample_epsilon(tmp_path: Path) -> None:
    results = _launch(
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
