"""Run the app through the launcher, the path users run, for end-to-end tests."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "secure_fedavg"
LAUNCH_TIMEOUT = 500


def launch_app(
    output_dir: Path, run_config: str, num_supernodes: int
) -> dict[str, Any]:
    """Run the app to completion and return its results.json.

    The launcher exits non-zero when the run fails; the assertion shows the end
    of its output.
    """
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
        str(LAUNCH_TIMEOUT),
    ]
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT + 60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results: dict[str, Any] = json.loads((output_dir / "results.json").read_text())
    return results
