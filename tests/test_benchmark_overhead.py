"""The overhead benchmark: its helpers, and one tiny run of the command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import benchmarks.overhead
from benchmarks.overhead import (
    FEDSEC,
    FLOWER,
    PLAIN,
    FlowerShares,
    fedsec_config,
    flower_shares,
    initial_model,
    parse_args,
    parse_protocols,
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
    "protocols",
    "load_average_start",
    "load_average_end",
    "plain_memory",
    "fedsec_memory",
    "flower_secaggplus_memory",
)
MEMORY_KEYS = (
    "main_peak_rss_bytes",
    "main_hwm_bytes",
    "descendants_peak_rss_bytes",
    "descendants_peak_anon_bytes",
    "ray_workers_peak_rss_bytes",
    "system_used_peak_bytes",
)
# Python with NumPy, Flower and Ray loaded already takes more than this.
MIN_MAIN_RSS_BYTES = 50 * 1024**2


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


def test_parse_protocols_keeps_run_order() -> None:
    assert parse_protocols("fedsec,plain") == [PLAIN, FEDSEC]
    assert parse_protocols("flower") == [FLOWER]
    assert parse_protocols(" plain , flower,plain") == [PLAIN, FLOWER]


@pytest.mark.parametrize("text", ["", ",", "plain,secagg", "flower_secaggplus"])
def test_parse_protocols_rejects_invalid(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_protocols(text)


def test_parse_args_defaults() -> None:
    args = parse_args(["--params", "100", "--clients", "3", "--json", "out.json"])

    assert args.protocols == [PLAIN, FEDSEC, FLOWER]
    assert args.key_lifetime is None


def test_parse_args_rejects_unknown_key_lifetime() -> None:
    with pytest.raises(SystemExit):
        parse_args(
            ["--params", "100", "--clients", "3", "--json", "x", "--key-lifetime", "x"]
        )


def test_fedsec_config_passes_key_lifetime_only_when_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []

    def record_call(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return kwargs

    monkeypatch.setattr(benchmarks.overhead, "SecAggConfig", record_call)
    fedsec_config(5, key_lifetime=None)
    fedsec_config(5, key_lifetime="run")

    assert "key_lifetime" not in calls[0]
    assert calls[0]["max_clients"] == 5
    assert calls[1]["key_lifetime"] == "run"


def test_fedsec_config_sets_key_lifetime() -> None:
    config = fedsec_config(5, key_lifetime="run")

    assert config.key_lifetime == "run"
    assert config.max_clients == 5


def run_command(json_path: Path, *extra_args: str) -> subprocess.CompletedProcess[str]:
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
            *extra_args,
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


@pytest.fixture(scope="module")
def subset_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    json_path = tmp_path_factory.mktemp("overhead-subset") / "overhead.json"
    completed = run_command(json_path, "--protocols", "fedsec,plain")
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


@pytest.mark.timeout(300)
def test_command_records_memory_peaks(result: dict[str, Any]) -> None:
    for name in ("plain", "fedsec", "flower_secaggplus"):
        memory = result[f"{name}_memory"]
        for key in MEMORY_KEYS:
            assert memory[key] > 0, (name, key)
        assert memory["main_peak_rss_bytes"] >= MIN_MAIN_RSS_BYTES, name
        # Ray's GCS server, raylet and at least one worker per simulation.
        assert memory["descendants_max_processes"] >= 3, name
        assert (
            memory["ray_workers_peak_rss_bytes"]
            <= (memory["descendants_peak_rss_bytes"])
        ), name
        assert memory["samples"] >= 2, name


@pytest.mark.timeout(300)
def test_command_records_load_average(result: dict[str, Any]) -> None:
    for key in ("load_average_start", "load_average_end"):
        assert len(result[key]) == 3, key
        assert all(value >= 0 for value in result[key]), key
    for name in ("plain", "fedsec", "flower_secaggplus"):
        load = result[f"{name}_load_average"]
        assert len(load["start"]) == 3, name
        assert len(load["end"]) == 3, name


@pytest.mark.timeout(300)
def test_command_records_stage_seconds(result: dict[str, Any]) -> None:
    stages = result["fedsec_stage_seconds"]

    assert len(stages) == ROUNDS
    for timings, round_seconds in zip(
        stages, result["fedsec_round_seconds"], strict=True
    ):
        assert timings, "a secure round reported no stage timings"
        assert all(seconds >= 0 for seconds in timings.values())
        # The stages run one after another inside the round.
        assert sum(timings.values()) <= round_seconds
    assert "flower_secaggplus_stage_seconds" not in result


@pytest.mark.timeout(300)
def test_command_default_runs_all_protocols(result: dict[str, Any]) -> None:
    assert result["protocols"] == ["plain", "fedsec", "flower_secaggplus"]


@pytest.mark.timeout(300)
def test_protocols_option_runs_subset(subset_result: dict[str, Any]) -> None:
    assert subset_result["protocols"] == ["plain", "fedsec"]
    assert subset_result["fedsec_s_per_round"] > 0
    assert subset_result["plain_s_per_round"] > 0
    assert subset_result["fedsec_memory"]["descendants_peak_rss_bytes"] > 0
    assert subset_result["overhead_ratio"] is None
    assert subset_result["fedsec_max_abs_diff_from_plain"] < MAX_MODEL_DIFFERENCE


@pytest.mark.timeout(300)
def test_protocols_option_leaves_out_flower(subset_result: dict[str, Any]) -> None:
    flower_keys = [key for key in subset_result if key.startswith("flower")]

    assert flower_keys == []
