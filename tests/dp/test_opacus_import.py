"""Importing Opacus through this package leaves the root logger as it was."""

import subprocess
import sys

import pytest

REPORT_HANDLERS = "import logging; print(len(logging.getLogger().handlers))"


@pytest.mark.parametrize(
    "use",
    [
        "import fedsec_flwr.dp.dpsgd",
        "from fedsec_flwr.dp.accounting import noise_multiplier_for_target as f; "
        "f(target_epsilon=3.0, delta=1e-5, sample_rate=0.1, num_steps=5)",
    ],
    ids=["dp-sgd", "accounting"],
)
def test_opacus_adds_no_root_handler(use: str) -> None:
    # Opacus's import calls logging.basicConfig, and a root handler prints
    # every DEBUG record that Flower's loggers pass up to it.
    completed = subprocess.run(
        [sys.executable, "-c", f"{use}; {REPORT_HANDLERS}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    assert completed.stdout.strip() == "0"


def test_plain_opacus_import_adds_root_handler() -> None:
    # The check above would pass for nothing if Opacus stopped doing this.
    completed = subprocess.run(
        [sys.executable, "-c", f"import opacus; {REPORT_HANDLERS}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    assert completed.stdout.strip() == "1"
