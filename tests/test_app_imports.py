"""The ClientApp module loads without the libraries that only training needs.

In a deployment every message starts a new ClientApp process, so each
unmasking or registration stage pays the import time of the app module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
TRAINING_ONLY = ("torch", "sklearn", "opacus", "scipy")


def test_client_app_module_skips_training_libraries() -> None:
    probe = (
        "import sys, secure_fedavg_app.client_app\n"
        f"print(','.join(m for m in {TRAINING_ONLY!r} if m in sys.modules))"
    )

    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()

    assert loaded == ""
