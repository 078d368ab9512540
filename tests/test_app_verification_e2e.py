"""Verification through the real `flwr run` simulation path and the auditor."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.app_runs import REPO_ROOT, launch_app

pytestmark = pytest.mark.e2e


def _audit(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsec_flwr.audit", str(path), *options],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "mode",
    [
        "secure-aggregation=true",
        'secure-aggregation=true secagg-key-lifetime="run"',
        "secure-aggregation=true verification-pipelined=true",
        "secure-aggregation=false",
    ],
    ids=["secure", "secure-run-keys", "secure-pipelined", "plain"],
)
def test_every_round_verified_and_audited(tmp_path: Path, mode: str) -> None:
    output_dir = tmp_path / "run"
    results = launch_app(
        output_dir,
        f"num-server-rounds=2 {mode} verification=true",
        num_supernodes=4,
    )

    audit = _audit(
        output_dir / "audit.json",
        "--initial-model",
        str(output_dir / "initial_model.npz"),
        "--final-model",
        str(output_dir / "final_model.npz"),
    )

    assert [entry["verified"] for entry in results["rounds"]] == [True, True]
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "2 of 2 entries verified, 0 discarded" in audit.stdout
    assert "round 2 model: follows from the earlier rounds" in audit.stdout
    assert "final model: follows from the last round" in audit.stdout
