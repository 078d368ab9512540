import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "secure_fedavg"

NUM_ROUNDS = 5
NUM_SUPERNODES = 10
SEED = 42
MIN_ACCURACY = 0.93
MAX_ACCURACY_GAP = 0.01

pytestmark = pytest.mark.e2e


def _launch(output_dir: Path, secure_aggregation: bool) -> dict[str, Any]:
    run_config = (
        f"dataset=breast-cancer num-server-rounds={NUM_ROUNDS} seed={SEED} "
        f"secure-aggregation={str(secure_aggregation).lower()}"
    )
    command = [
        sys.executable,
        "-m",
        "fedsec_flwr.launch",
        str(APP_DIR),
        "--output-dir",
        str(output_dir),
        "--num-supernodes",
        str(NUM_SUPERNODES),
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


@pytest.mark.timeout(1200)
def test_secure_matches_plain_fedavg(tmp_path: Path) -> None:
    secure = _launch(tmp_path / "secure", secure_aggregation=True)
    plain = _launch(tmp_path / "plain", secure_aggregation=False)

    secure_accuracy = secure["rounds"][-1]["accuracy"]
    plain_accuracy = plain["rounds"][-1]["accuracy"]
    assert secure["status"] == "completed"
    assert secure["secure_aggregation"] is True
    assert plain["secure_aggregation"] is False
    assert len(secure["rounds"]) == NUM_ROUNDS
    assert secure["rounds"][-1]["num_aggregated"] == NUM_SUPERNODES
    assert secure_accuracy >= MIN_ACCURACY
    assert abs(secure_accuracy - plain_accuracy) <= MAX_ACCURACY_GAP
