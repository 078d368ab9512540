"""The overhead benchmark: its helpers, and one tiny run of the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from benchmarks.overhead import (
    FlowerShares,
    flower_shares,
    initial_model,
    payload_bytes,
)
from fedsec_flwr.records import content_bytes

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
PARAMS = 2000
CLIENTS = 3
ROUNDS = 2
# Key material, the two-value trailer, .npy headers and record names of one
# client's four fedsec replies with two neighbours, with room to spare.
FEDSEC_CONSTANT_BYTES = 4096
# Quantization step of either protocol, far above float32 rounding.
MAX_MODEL_DIFFERENCE = 1e-4

REQUIRED_KEYS = (
    "params",
    "clients",
    "rounds",
    "machine",
    "commit",
    "plain_s_per_round",
    "fedsec_s_per_round",
    "flower_secaggplus_s_per_round",
    "plain_first_round_s",
    "fedsec_first_round_s",
    "flower_secaggplus_first_round_s",
    "fedsec_upload_bytes_per_client",
    "flower_upload_bytes_per_client",
    "plain_upload_bytes_per_client",
    "overhead_ratio",
    "mask_generation",
)


def test_initial_model_has_requested_size() -> None:
    model = initial_model(1001)

    assert sum(array.size for array in model.values()) == 1001
    assert all(array.dtype == np.float32 for array in model.values())
    assert len(model) == 4


def test_payload_bytes_matches_content_bytes() -> None:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(10, dtype=np.uint32))}),
            "config": ConfigRecord({"keys": [b"abc", b"de"], "stage": "setup"}),
            "metrics": MetricRecord({"loss": 0.5, "counts": [1, 2, 3]}),
        }
    )

    assert payload_bytes(content) == content_bytes(content)


def test_payload_bytes_counts_each_part() -> None:
    array = Array(np.zeros(10, dtype=np.int64))
    content = RecordDict({"c": ConfigRecord({"k": [b"abc", b"de"], "n": 7})})
    content["a"] = ArrayRecord({"x": array})

    expected = (1 + 1 + 5 + 1 + 8) + (1 + 1 + len(array.data))
    assert payload_bytes(content) == expected


@pytest.mark.parametrize(
    ("clients", "expected"),
    [(3, FlowerShares(3, 2)), (10, FlowerShares(5, 3)), (100, FlowerShares(9, 5))],
)
def test_flower_shares_follow_fedsec_degree(
    clients: int, expected: FlowerShares
) -> None:
    assert flower_shares(clients) == expected


def run_command(json_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.overhead",
            "--params",
            str(PARAMS),
            "--clients",
            str(CLIENTS),
            "--rounds",
            str(ROUNDS),
            "--json",
            str(json_path),
        ],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    json_path = tmp_path_factory.mktemp("overhead") / "overhead.json"
    completed = run_command(json_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    loaded: dict[str, Any] = json.loads(json_path.read_text())
    return loaded


@pytest.mark.timeout(300)
def test_command_writes_every_key(result: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in result]

    assert missing == []
    assert (result["params"], result["clients"], result["rounds"]) == (
        PARAMS,
        CLIENTS,
        ROUNDS,
    )
    assert len(result["commit"]) == 40
    for key in ("cpu_model", "cores", "memory_gib"):
        assert result["machine"][key], key


@pytest.mark.timeout(300)
def test_command_times_are_positive(result: dict[str, Any]) -> None:
    for name in ("plain", "fedsec", "flower_secaggplus"):
        assert result[f"{name}_s_per_round"] > 0, name
        assert result[f"{name}_first_round_s"] > 0, name
        assert len(result[f"{name}_round_seconds"]) == ROUNDS, name
    masks = result["mask_generation"]
    for key in ("fedsec_expand_mask_s", "raw_chacha20_s", "flower_pseudo_rand_gen_s"):
        assert masks[key] > 0, key


@pytest.mark.timeout(300)
def test_command_overhead_ratio_formula(result: dict[str, Any]) -> None:
    plain = result["plain_s_per_round"]
    fedsec = result["fedsec_s_per_round"]
    flower = result["flower_secaggplus_s_per_round"]

    assert flower > plain
    assert result["overhead_ratio"] == pytest.approx(
        (fedsec - plain) / (flower - plain)
    )


@pytest.mark.timeout(300)
def test_command_upload_sizes(result: dict[str, Any]) -> None:
    fedsec = result["fedsec_upload_bytes_per_client"]
    flower = result["flower_upload_bytes_per_client"]
    plain = result["plain_upload_bytes_per_client"]

    assert 4 * PARAMS <= fedsec <= 4 * PARAMS + FEDSEC_CONSTANT_BYTES
    assert flower >= 8 * PARAMS
    assert plain >= 4 * PARAMS


@pytest.mark.timeout(300)
def test_command_mod_matches_round_report(result: dict[str, Any]) -> None:
    for name in ("plain", "fedsec"):
        measured = result[f"{name}_measured_upload_bytes_per_client"]
        assert measured == result[f"{name}_upload_bytes_per_client"], name


@pytest.mark.timeout(300)
def test_command_models_agree_with_plain(result: dict[str, Any]) -> None:
    assert result["fedsec_max_abs_diff_from_plain"] < MAX_MODEL_DIFFERENCE
    assert result["flower_max_abs_diff_from_plain"] < MAX_MODEL_DIFFERENCE
