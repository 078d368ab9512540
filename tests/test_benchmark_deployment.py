"""The summary of the deployment benchmark, on made-up round times."""

from __future__ import annotations

import pytest

from benchmarks.deployment import main, summarize


def test_summary_pools_later_rounds_of_repeats() -> None:
    runs = [
        {"mode": "plain", "round_seconds": [30.0, 10.0, 12.0]},
        {"mode": "run-keys", "round_seconds": [40.0, 13.0, 14.0]},
        {"mode": "plain", "round_seconds": [31.0, 11.0, 11.0]},
        {"mode": "run-keys", "round_seconds": [41.0, 12.0, 15.0]},
    ]

    summary = summarize(runs)

    assert summary["later_round_mean_s"] == {"plain": 11.0, "run-keys": 13.5}
    assert summary["ratio_to_plain"] == {"run-keys": pytest.approx(13.5 / 11.0)}


def test_summary_without_plain_has_no_ratio() -> None:
    summary = summarize([{"mode": "run-keys", "round_seconds": [5.0, 2.0]}])

    assert summary["later_round_mean_s"] == {"run-keys": 2.0}
    assert "ratio_to_plain" not in summary


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--modes", "plain,fast"], "Found fast"),
        (["--rounds", "1"], "Found 1"),
    ],
)
def test_invalid_arguments_name_the_value(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(argv)
