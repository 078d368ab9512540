"""Verification through the real `flwr run` simulation path and the auditor."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "secure_fedavg"

pytestmark = pytest.mark.e2e


def _launch(output_dir: Path, run_config: str) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "fedsec_flwr.launch",
        str(APP_DIR),
        "--output-dir",
        str(output_dir),
        "--num-supernodes",
        "4",
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


def _audit(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsec_flwr.audit", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("secure", [True, False])
def test_every_round_verified_and_audited(tmp_path: Path, secure: bool) -> None:
    output_dir = tmp_path / "run"
    results = _launch(
        output_dir,
        f"num-server-rounds=2 secure-aggregation={str(secure).lower()} "
        "verification=true",
    )

    audit = _audit(output_dir / "audit.json")

    assert [entry["verified"] for entry in results["rounds"]] == [True, True]
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "2 of 2 rounds verified" in audit.stdout
