"""The accuracy-against-privacy benchmark: its plan, and one tiny run of the command."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from benchmarks.dp_accuracy import (
    CENTRAL_DP_SGD,
    CLIENT_DP_CENTRAL,
    CLIENT_DP_CENTRAL_ALL,
    CLIENT_DP_DISTRIBUTED,
    CLIENT_DP_DISTRIBUTED_ALL,
    CLIENT_DP_DISTRIBUTED_EQUAL_NOISE,
    DELTA,
    DP_BATCH_SIZE,
    DP_SGD_LEARNING_RATE,
    FEDERATED_DP_SGD,
    FEDERATED_DP_SGD_LONG,
    FEDERATED_DP_SGD_MOMENTUM,
    FEDERATED_DP_SGD_THREE_CLIENTS,
    FEDERATED_DP_SGD_TUNED,
    FULL,
    JSON_FILENAME,
    MERGED_JSON_FILENAME,
    MERGED_PLOT_FILENAME,
    MERGED_TABLE_FILENAME,
    METHODS,
    PLOT_FILENAME,
    SMOKE,
    TABLE_FILENAME,
    central_noise_multiplier,
    client_level_overrides,
    dp_sgd_overrides,
    federated_settings,
    mean_of_last_rounds,
    merge_points,
    merged_table,
    parse_args,
    plan_configurations,
    plot_results,
    points_by_method,
    results_table,
)
from benchmarks.dp_accuracy import main as dp_accuracy_main
from fedsec_flwr import SecAggConfig
from fedsec_flwr.dp.accounting import noise_multiplier_for_target
from fedsec_flwr.privacy import DPConfig, DPMode, ServerPrivacy

# benchmarks.dp_accuracy puts the app's folder on sys.path when imported.
app_data = importlib.import_module("secure_fedavg_app.data")
AppSettings = importlib.import_module("secure_fedavg_app.settings").AppSettings

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIPPING_NORM = 0.5
SMOKE_TARGET_EPSILON = 3.0
# The accountants report epsilon to a few digits; a target met within this
# slack is met.
EPSILON_SLACK = 1e-6

FASHION_MNIST_PRESENT = all(
    (app_data.FASHION_MNIST_DIR / name).is_file()
    for name in app_data.FASHION_MNIST_FILES.values()
)
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_PRESENT,
    reason=f"Fashion-MNIST missing: {app_data.FASHION_MNIST_INSTALL_COMMAND}",
)


def completed_entry(
    method: str, target_epsilon: float | None, accuracy: float, **extra: Any
) -> dict[str, Any]:
    return {
        "method": method,
        "name": f"{method}-{target_epsilon}",
        "target_epsilon": target_epsilon,
        "accuracy": accuracy,
        "status": "completed",
        "wall_seconds": 1.0,
        "shared_with": [],
        **extra,
    }


def test_full_plan_has_every_point() -> None:
    configurations = plan_configurations(FULL)
    names = [configuration.name for configuration in configurations]

    # Eleven methods at four epsilons, less the four runs without DP that the
    # three-round DP-SGD pair and the two client-level families share.
    assert len(configurations) == 40
    assert len(set(names)) == len(names)
    assert {c.method for c in configurations} == set(METHODS)


@pytest.mark.parametrize(
    "group",
    [
        (FEDERATED_DP_SGD, FEDERATED_DP_SGD_TUNED),
        (CLIENT_DP_CENTRAL, CLIENT_DP_DISTRIBUTED, CLIENT_DP_DISTRIBUTED_EQUAL_NOISE),
        (CLIENT_DP_CENTRAL_ALL, CLIENT_DP_DISTRIBUTED_ALL),
    ],
)
def test_baseline_is_shared(group: tuple[str, ...]) -> None:
    baselines = [
        c
        for c in plan_configurations(FULL)
        if c.target_epsilon is None and c.method in group
    ]

    assert len(baselines) == 1
    assert baselines[0].method == group[0]
    assert baselines[0].shared_with == group[1:]


def test_smoke_plan_without_central_mode_keeps_baseline() -> None:
    profile = dataclasses.replace(SMOKE, epsilons=(None, 3.0))

    baselines = [
        c
        for c in plan_configurations(profile)
        if c.target_epsilon is None and c.method == CLIENT_DP_DISTRIBUTED
    ]

    assert len(baselines) == 1
    assert baselines[0].shared_with == ()


def test_dp_sgd_overrides() -> None:
    settings = FULL.dp_sgd

    plain = dp_sgd_overrides(settings, None)
    private = dp_sgd_overrides(settings, 3.0)

    assert plain["secure-aggregation"] is True
    assert "dp-sgd" not in plain
    assert private["dp-sgd"] is True
    assert private["dp-sgd-target-epsilon"] == 3.0
    assert private["learning-rate"] == DP_SGD_LEARNING_RATE
    assert private["secagg-max-weight"] >= 60_000 // settings.num_clients
    assert private["secagg-max-clients"] >= settings.num_clients


def test_tuned_method_changes_only_dp_step() -> None:
    reference = federated_settings(FULL, FEDERATED_DP_SGD)
    tuned = federated_settings(FULL, FEDERATED_DP_SGD_TUNED)

    assert tuned.dp_learning_rate == FULL.tuned_dp_learning_rate
    assert tuned.dp_learning_rate != reference.dp_learning_rate
    assert dataclasses.replace(tuned, dp_learning_rate=0.0) == dataclasses.replace(
        reference, dp_learning_rate=0.0
    )


def test_long_method_has_own_baseline_and_batch() -> None:
    settings = federated_settings(FULL, FEDERATED_DP_SGD_LONG)

    plain = dp_sgd_overrides(settings, None)
    private = dp_sgd_overrides(settings, 8.0)
    baselines = [
        c
        for c in plan_configurations(FULL)
        if c.target_epsilon is None and c.method == FEDERATED_DP_SGD_LONG
    ]

    assert plain["num-server-rounds"] == 20
    assert plain["batch-size"] == 64
    assert private["batch-size"] == DP_BATCH_SIZE
    assert len(baselines) == 1
    assert baselines[0].shared_with == ()


def test_momentum_method_differs_only_in_server_momentum() -> None:
    long = federated_settings(FULL, FEDERATED_DP_SGD_LONG)
    momentum = federated_settings(FULL, FEDERATED_DP_SGD_MOMENTUM)

    for epsilon in (None, 1.0):
        with_momentum = dp_sgd_overrides(momentum, epsilon)
        assert with_momentum.pop("server-momentum") == 0.5
        assert with_momentum == dp_sgd_overrides(long, epsilon)
    assert "server-momentum" not in dp_sgd_overrides(long, 1.0)


def test_three_client_method_differs_only_in_clients() -> None:
    long = federated_settings(FULL, FEDERATED_DP_SGD_LONG)
    three = federated_settings(FULL, FEDERATED_DP_SGD_THREE_CLIENTS)

    assert three.num_clients == 3
    assert three.partition_size == 20_000
    assert dataclasses.replace(three, num_clients=10) == long


def test_federated_settings_rejects_central() -> None:
    with pytest.raises(ValueError, match="federated method"):
        federated_settings(FULL, CENTRAL_DP_SGD)


@pytest.mark.parametrize("target_epsilon", [None, 8.0, 1.0])
@pytest.mark.parametrize("profile", [FULL, SMOKE], ids=["full", "smoke"])
def test_every_run_config_accepted_by_app(
    profile: Any, target_epsilon: float | None
) -> None:
    # The app rejects settings that others switch off, so each benchmark
    # run config must parse as the app's run config would.
    defaults_path = REPOSITORY_ROOT / "apps" / "secure_fedavg" / "pyproject.toml"
    defaults = tomllib.loads(defaults_path.read_text(encoding="utf-8"))
    app_config = defaults["tool"]["flwr"]["app"]["config"]
    run_configs = [
        dp_sgd_overrides(federated_settings(profile, method), target_epsilon)
        for method in (
            FEDERATED_DP_SGD,
            FEDERATED_DP_SGD_MOMENTUM,
            FEDERATED_DP_SGD_THREE_CLIENTS,
        )
    ]
    for method in (
        CLIENT_DP_CENTRAL,
        CLIENT_DP_DISTRIBUTED,
        CLIENT_DP_DISTRIBUTED_EQUAL_NOISE,
        CLIENT_DP_CENTRAL_ALL,
        CLIENT_DP_DISTRIBUTED_ALL,
    ):
        settings = federated_settings(profile, method)
        run_configs.append(
            client_level_overrides(settings, method, target_epsilon, CLIPPING_NORM)
        )

    for overrides in run_configs:
        AppSettings.from_run_config({**app_config, **overrides})


def test_client_level_overrides() -> None:
    settings = FULL.client_level

    plain = client_level_overrides(settings, CLIENT_DP_CENTRAL, None, CLIPPING_NORM)
    central = client_level_overrides(settings, CLIENT_DP_CENTRAL, 8.0, CLIPPING_NORM)
    distributed = client_level_overrides(
        settings, CLIENT_DP_DISTRIBUTED, 1.0, CLIPPING_NORM
    )

    assert "dp-mode" not in plain
    assert central["dp-mode"] == "central"
    assert distributed["dp-mode"] == "distributed"
    assert distributed["clipping-norm"] == CLIPPING_NORM
    assert distributed["client-sampling"] == "poisson"
    assert distributed["secure-aggregation"] is True
    assert settings.num_clients >= 100


def test_all_clients_overrides() -> None:
    settings = FULL.all_clients

    plain = client_level_overrides(settings, CLIENT_DP_CENTRAL_ALL, None, 0.5)
    distributed = client_level_overrides(settings, CLIENT_DP_DISTRIBUTED_ALL, 1.0, 0.5)

    assert plain["min-train-clients"] == 400
    assert plain["secagg-timeout"] > 120.0
    assert plain["secagg-max-clients"] == 400
    assert "dp-mode" not in plain
    assert distributed["dp-mode"] == "distributed"
    assert distributed["client-sampling"] == "fixed"
    assert distributed["fraction-train"] == 1.0
    assert distributed["min-train-clients"] == 400
    assert distributed["secagg-max-clients"] == 400


def test_all_clients_modes_need_similar_noise() -> None:
    # Without sampling, distributed mode's bound is close to central's.
    settings = FULL.all_clients
    secagg = SecAggConfig(max_clients=settings.max_clients)
    for target in (8.0, 1.0):
        central_z = central_noise_multiplier(settings, target)
        privacy = ServerPrivacy(
            config=DPConfig(
                mode=DPMode.DISTRIBUTED, clipping_norm=0.5, target_epsilon=target
            ),
            num_rounds=settings.num_rounds,
            sample_rate=1.0,
            max_clients=settings.max_clients,
            modulus=secagg.modulus,
        )
        plan = privacy.plan(num_sampled=settings.num_clients, dimension=25_810)

        assert central_z <= plan.noise_multiplier <= 1.02 * central_z, target


def test_equal_noise_takes_central_multiplier() -> None:
    settings = FULL.client_level
    central_z = noise_multiplier_for_target(
        target_epsilon=1.0,
        delta=DELTA,
        sample_rate=settings.fraction_train,
        num_steps=settings.num_rounds,
    )

    overrides = client_level_overrides(
        settings, CLIENT_DP_DISTRIBUTED_EQUAL_NOISE, 1.0, CLIPPING_NORM
    )

    assert overrides["dp-mode"] == "distributed"
    assert overrides["noise-multiplier"] == central_z
    assert "target-epsilon" not in overrides
    # 20 rounds at q 0.1 need z of about 2.3 for epsilon 1 in central mode.
    assert 2.0 < central_z < 2.6


def test_fixed_sampling_needs_more_noise() -> None:
    poisson = FULL.client_level
    fixed = dataclasses.replace(poisson, client_sampling="fixed")

    # Without Poisson sampling the accountant takes no amplification, so
    # the same target needs more noise.
    assert central_noise_multiplier(fixed, 3.0) > 2 * central_noise_multiplier(
        poisson, 3.0
    )


def test_methods_option_keeps_benchmark_order() -> None:
    options = parse_args(
        ["--out", "x", "--methods", f"{CLIENT_DP_DISTRIBUTED},{CLIENT_DP_CENTRAL}"]
    )

    assert options.methods == (CLIENT_DP_CENTRAL, CLIENT_DP_DISTRIBUTED)


@pytest.mark.parametrize("text", ["client-dp-nowhere", "", ","])
def test_methods_option_rejects_unknown_names(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--methods", text])

    assert f"Found {text!r}" in capsys.readouterr().err


def test_methods_option_not_with_merge() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--merge", "a", "--methods", CLIENT_DP_CENTRAL])


def test_epsilons_option_selects_targets() -> None:
    options = parse_args(["--out", "x", "--epsilons", "3, none,1,3"])
    profile = dataclasses.replace(
        FULL, methods=(CLIENT_DP_DISTRIBUTED_ALL,), epsilons=options.epsilons
    )

    assert options.epsilons == (3.0, None, 1.0)
    assert [c.target_epsilon for c in plan_configurations(profile)] == [3.0, None, 1.0]


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-1",
        "inf",
        "nan",
        "eight",
        "3,,1",
        "0.001",
        "0.019489034092552558",
        "1e309",
        "\uff11",
        "1_0",
    ],
)
def test_epsilons_option_rejects_invalid_targets(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--epsilons", text])

    assert f"in {text!r}" in capsys.readouterr().err


def test_epsilons_option_shortens_long_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--epsilons", "9" * 5000 + "x"])

    assert len(capsys.readouterr().err) < 1000


def test_epsilons_option_not_with_merge() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--merge", "a", "--epsilons", "3"])


def test_max_clients_allows_poisson_spread() -> None:
    settings = FULL.client_level
    expected = settings.fraction_train * settings.num_clients
    spread = math.sqrt(expected * (1 - settings.fraction_train))

    assert settings.max_clients >= expected + 5 * spread
    assert settings.max_clients <= settings.num_clients


def test_points_share_client_level_baseline() -> None:
    results = [
        completed_entry(
            CLIENT_DP_CENTRAL, None, 0.8, shared_with=[CLIENT_DP_DISTRIBUTED]
        ),
        completed_entry(CLIENT_DP_CENTRAL, 3.0, 0.7),
        {**completed_entry(CLIENT_DP_DISTRIBUTED, 3.0, 0.0), "status": "failed"},
    ]

    points = points_by_method(results)

    assert points[CLIENT_DP_CENTRAL] == [(None, 0.8), (3.0, 0.7)]
    assert points[CLIENT_DP_DISTRIBUTED] == [(None, 0.8)]
    assert points[FEDERATED_DP_SGD] == []


def test_mean_of_last_rounds() -> None:
    long_run = completed_entry(
        CLIENT_DP_CENTRAL,
        1.0,
        0.2,
        accuracy_per_round=[0.0, 0.5, 0.6, 0.7, 0.6, 0.5, 0.2],
    )
    short_run = completed_entry(
        FEDERATED_DP_SGD, 1.0, 0.7, accuracy_per_round=[0.5, 0.6, 0.7]
    )

    assert mean_of_last_rounds(long_run) == pytest.approx(0.52)
    assert mean_of_last_rounds(short_run) is None
    assert mean_of_last_rounds(completed_entry(CENTRAL_DP_SGD, 1.0, 0.7)) is None


def test_plot_and_table(tmp_path: Path) -> None:
    results = [
        completed_entry(CENTRAL_DP_SGD, None, 0.87),
        completed_entry(CENTRAL_DP_SGD, 1.0, 0.80, epsilon=0.99),
        completed_entry(FEDERATED_DP_SGD, 1.0, 0.79, sample_epsilon=0.98),
    ]
    path = tmp_path / "plot.png"

    plot_results(results, path)
    table = results_table(results)

    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert "none (no DP)" in table
    assert "| federated-dp-sgd | 1 | 79.0% |  | 0.980 |" in table


def result_document(*results: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": "dp_accuracy", "commit": "abc", "results": list(results)}


def test_merge_groups_runs_by_method_and_target() -> None:
    first = result_document(
        completed_entry(
            CLIENT_DP_CENTRAL, None, 0.70, shared_with=[CLIENT_DP_DISTRIBUTED]
        ),
        completed_entry(CLIENT_DP_CENTRAL, 1.0, 0.66, epsilon=0.99),
        {**completed_entry(CLIENT_DP_DISTRIBUTED, 1.0, 0.0), "status": "failed"},
    )
    second = result_document(
        completed_entry(CLIENT_DP_CENTRAL, 1.0, 0.68, epsilon=0.98),
        completed_entry(CLIENT_DP_DISTRIBUTED, 1.0, 0.44, epsilon=0.997),
    )

    own = merge_points([first, second], expand_shared=False)
    plotted = merge_points([first, second], expand_shared=True)

    assert [(p.method, p.target_epsilon, p.accuracies) for p in own] == [
        (CLIENT_DP_CENTRAL, None, (0.70,)),
        (CLIENT_DP_CENTRAL, 1.0, (0.66, 0.68)),
        (CLIENT_DP_DISTRIBUTED, 1.0, (0.44,)),
    ]
    assert own[1].epsilons == (0.99, 0.98)
    assert (CLIENT_DP_DISTRIBUTED, None) in {
        (p.method, p.target_epsilon) for p in plotted
    }


def test_merged_table_shows_every_run() -> None:
    document = result_document(
        completed_entry(
            CLIENT_DP_CENTRAL, 3.0, 0.70, epsilon=2.99, noise_multiplier=1.2
        ),
        completed_entry(
            CLIENT_DP_CENTRAL, 3.0, 0.72, epsilon=3.0, noise_multiplier=1.3
        ),
    )

    table = merged_table(merge_points([document], expand_shared=False))

    assert "| client-dp-central | 3 | 2 | 70.0%, 72.0% | 71.0% |  | 3.000 |" in table
    assert table.endswith("| 1.200 to 1.300 |")


def test_merge_command_writes_table_plot_and_inputs(tmp_path: Path) -> None:
    folders = []
    for index, accuracy in enumerate((0.70, 0.72)):
        folder = tmp_path / f"run{index}"
        folder.mkdir()
        document = result_document(completed_entry(CLIENT_DP_CENTRAL, 3.0, accuracy))
        (folder / JSON_FILENAME).write_text(json.dumps(document), encoding="utf-8")
        folders.append(str(folder))
    out = tmp_path / "merged"

    status = dp_accuracy_main(["--merge", *folders, "--out", str(out)])

    merged = json.loads((out / MERGED_JSON_FILENAME).read_text(encoding="utf-8"))
    assert status == 0
    assert (out / MERGED_PLOT_FILENAME).read_bytes().startswith(PNG_SIGNATURE)
    assert "70.0%, 72.0%" in (out / MERGED_TABLE_FILENAME).read_text(encoding="utf-8")
    assert [entry["folder"] for entry in merged["inputs"]] == folders
    assert merged["points"][0]["accuracies"] == [0.70, 0.72]


def test_merge_command_rejects_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / JSON_FILENAME).write_text('{"benchmark": "other"}', encoding="utf-8")

    status = dp_accuracy_main(["--merge", str(tmp_path), "--out", str(tmp_path / "m")])

    assert status == 2
    assert "is not a dp_accuracy result file" in capsys.readouterr().err


def write_result(folder: Path, document: object) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JSON_FILENAME).write_text(json.dumps(document), encoding="utf-8")
    return str(folder)


GOOD_ENTRY = completed_entry(CLIENT_DP_CENTRAL, 3.0, 0.7)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"benchmark": "dp_accuracy"}, "results must be a list. Found NoneType"),
        (result_document(7), "result 0 must be an object. Found int"),
        (result_document({**GOOD_ENTRY, "method": "x"}), "unknown method 'x'"),
        (
            result_document({**GOOD_ENTRY, "shared_with": "client-dp-central"}),
            "invalid shared_with",
        ),
        (result_document({**GOOD_ENTRY, "accuracy": 10**400}), "no finite accuracy"),
        (
            result_document({**GOOD_ENTRY, "target_epsilon": "3"}),
            "target_epsilon that is not a finite number",
        ),
        (
            result_document({**GOOD_ENTRY, "accuracy_per_round": [0.1, None]}),
            "accuracy_per_round",
        ),
        ("[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
    ],
    ids=[
        "no-results",
        "entry-not-object",
        "unknown-method",
        "shared-string",
        "huge-accuracy",
        "string-epsilon",
        "null-round",
        "deep",
    ],
)
def test_merge_rejects_malformed_result_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: object, message: str
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    text = document if isinstance(document, str) else json.dumps(document)
    (folder / JSON_FILENAME).write_text(text, encoding="utf-8")

    status = dp_accuracy_main(["--merge", str(folder), "--out", str(tmp_path / "m")])

    assert status == 2
    assert message in capsys.readouterr().err


def test_merge_rejects_mixed_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = write_result(
        tmp_path / "full",
        {
            **result_document(GOOD_ENTRY),
            "profile": {"name": "full"},
            "started_at": "2026-12-05T21:02:23Z",
        },
    )
    quick = write_result(
        tmp_path / "quick",
        {**result_document(GOOD_ENTRY), "profile": {"name": "quick"}},
    )
    out = str(tmp_path / "m")

    twice = dp_accuracy_main(["--merge", full, full, "--out", out])
    twice_error = capsys.readouterr().err
    shutil.copytree(full, tmp_path / "copy")
    copied = dp_accuracy_main(["--merge", full, str(tmp_path / "copy"), "--out", out])
    copied_error = capsys.readouterr().err
    mixed = dp_accuracy_main(["--merge", full, quick, "--out", out])
    mixed_error = capsys.readouterr().err

    assert twice == 2
    assert "names a folder twice" in twice_error
    assert copied == 2
    assert "hold the same invocation" in copied_error
    assert mixed == 2
    assert "differ in profile" in mixed_error


def test_merge_accepts_other_method_subsets(tmp_path: Path) -> None:
    first = write_result(
        tmp_path / "first",
        {
            **result_document(GOOD_ENTRY),
            "profile": {"name": "full", "methods": [CENTRAL_DP_SGD]},
        },
    )
    second = write_result(
        tmp_path / "second",
        {
            **result_document(GOOD_ENTRY),
            "profile": {
                "name": "full",
                "methods": [CLIENT_DP_CENTRAL],
                "epsilons": [3.0, 1.0],
            },
        },
    )

    status = dp_accuracy_main(["--merge", first, second, "--out", str(tmp_path / "m")])

    assert status == 0


def test_merge_accepts_settings_recorded_before_momentum(tmp_path: Path) -> None:
    recorded = {"name": "full", "long_dp_sgd": {"num_clients": 10}}
    current = {
        "name": "full",
        "long_dp_sgd": {"num_clients": 10, "server_momentum": 0.0},
    }
    changed = {
        "name": "full",
        "long_dp_sgd": {"num_clients": 10, "server_momentum": 0.5},
    }
    folders = [
        write_result(
            tmp_path / name, {**result_document(GOOD_ENTRY), "profile": profile}
        )
        for name, profile in (("a", recorded), ("b", current), ("c", changed))
    ]

    same = dp_accuracy_main(["--merge", *folders[:2], "--out", str(tmp_path / "m")])
    other = dp_accuracy_main(
        ["--merge", folders[0], folders[2], "--out", str(tmp_path / "n")]
    )

    assert same == 0
    assert other == 2


def test_merge_without_completed_run_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = {**GOOD_ENTRY, "status": "failed"}
    folder = write_result(tmp_path / "run", result_document(failed))

    status = dp_accuracy_main(["--merge", folder, "--out", str(tmp_path / "m")])

    assert status == 1
    assert "no completed run" in capsys.readouterr().err


@needs_fashion_mnist
@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_smoke_command(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.dp_accuracy",
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr

    document = json.loads((tmp_path / JSON_FILENAME).read_text(encoding="utf-8"))
    results = {entry["method"]: entry for entry in document["results"]}
    assert document["machine"]["cores"] is not None
    assert "commit" in document["commit"]
    assert document["clipping"]["median"] > 0
    assert set(results) == {CENTRAL_DP_SGD, CLIENT_DP_DISTRIBUTED}
    for entry in results.values():
        assert entry["status"] == "completed"
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert 0 < entry["epsilon"] <= SMOKE_TARGET_EPSILON + EPSILON_SLACK
    assert results[CLIENT_DP_DISTRIBUTED]["rounds_completed"] == 1
    assert (tmp_path / PLOT_FILENAME).read_bytes().startswith(PNG_SIGNATURE)
    assert CLIENT_DP_DISTRIBUTED in (tmp_path / TABLE_FILENAME).read_text()
