"""Importing Opacus through this package leaves the root logger as it was."""

import subprocess
import sys

import pytest


def root_handlers_after(statement: str) -> int:
    """Run ``statement`` in a new interpreter and count the root log handlers."""
    report = "import logging; print(len(logging.getLogger().handlers))"
    completed = subprocess.run(
        [sys.executable, "-c", f"{statement}; {report}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(completed.stdout.strip())


@pytest.mark.parametrize(
    "statement",
    [
        "import fedsec_flwr.dp.dpsgd",
        "from fedsec_flwr.dp.accounting import noise_multiplier_for_target as f; "
        "f(target_epsilon=3.0, delta=1e-5, sample_rate=0.1, num_steps=5)",
    ],
    ids=["dp-sgd", "accounting"],
)
def test_opacus_adds_no_root_handler(statement: str) -> None:
    # Opacus's import calls logging.basicConfig, and a root handler prints
    # every DEBUG record that Flower's loggers pass up to it.
    assert root_handlers_after(statement) == 0


def test_plain_opacus_import_adds_handler() -> None:
    # Without this behaviour of Opacus, the test above could not fail.
    assert root_handlers_after("import opacus") == 1
