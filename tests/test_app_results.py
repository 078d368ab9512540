"""The app's results.json stays valid JSON whatever numbers a run produces."""

import json
import math
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app.results import ResultsFile  # noqa: E402


def test_non_finite_numbers_written_as_null(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path, run_config={"seed": 1}, run_info={})
    results.start()

    results.add_round({"round": 1, "loss": math.nan, "metrics": {"a": [math.inf]}})

    text = (tmp_path / "results.json").read_text(encoding="utf-8")
    document = json.loads(text, parse_constant=lambda name: name)
    assert "NaN" not in text
    assert "Infinity" not in text
    assert document["rounds"][0]["loss"] is None
    assert document["rounds"][0]["metrics"] == {"a": [None]}
