"""The evaluation suite: its pure pieces, its report, and one smoke run."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from benchmarks import run
from benchmarks.attacks.fashion_mnist import DEFAULT_DATA_DIR, INSTALL_COMMAND
from benchmarks.suite import accuracy, cost, report, scaling
from benchmarks.suite.experiment import (
    ACCURACY,
    ATTACKS,
    COST,
    FAMILIES,
    SCALING,
    Experiment,
    Progress,
    format_duration,
    json_safe,
    run_experiments,
)
from benchmarks.suite.profiles import (
    FASHION_MNIST,
    FULL,
    PROFILES,
    SMOKE_PROFILE,
    CostPlan,
    DatasetPlan,
    Profile,
    ScalingPlan,
    plain,
    secure,
    secure_dp,
    secure_verified,
)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
APP_DIR = REPOSITORY_ROOT / "apps" / "secure_fedavg"
FASHION_MNIST_PRESENT = (DEFAULT_DATA_DIR / "t10k-images-idx3-ubyte.gz").is_file()
SMOKE_TIMEOUT_SECONDS = 420

MACHINE = {"cpu_model": "test CPU", "cores": 2, "memory_gib": 4.0, "packages": {}}
COMMIT = {"commit": "0" * 40, "tracked_changes": False, "untracked_files": False}
ENVIRONMENT = {
    "machine": MACHINE,
    "commit": COMMIT,
    "load_average": [1.0, 1.0, 1.0],
    "recorded_at": "2026-01-01T00:00:00Z",
}


# --- Growth fit ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("coefficient", "exponent"), [(3.0, 2.0), (5.0, 0.5), (0.01, 1.0), (7.0, -1.0)]
)
def test_power_law_fit_recovers_exponent(coefficient: float, exponent: float) -> None:
    xs = [10.0, 100.0, 1_000.0, 10_000.0]
    ys = [coefficient * x**exponent for x in xs]

    fit = scaling.fit_power_law(xs, ys)

    assert fit.exponent == pytest.approx(exponent, abs=1e-9)
    assert fit.coefficient == pytest.approx(coefficient, rel=1e-9)
    assert fit.r_squared == pytest.approx(1.0)
    assert fit.num_points == len(xs)


def test_power_law_fit_of_noisy_points() -> None:
    xs = [1.0, 2.0, 4.0, 8.0]
    ys = [1.0, 2.2, 3.9, 8.4]

    fit = scaling.fit_power_law(xs, ys)

    assert 0.95 < fit.exponent < 1.1
    assert fit.r_squared is not None
    assert 0.98 < fit.r_squared < 1.0


def test_power_law_fit_of_constant_cost() -> None:
    fit = scaling.fit_power_law([10.0, 100.0, 1000.0], [4.0, 4.0, 4.0])

    assert fit.exponent == pytest.approx(0.0, abs=1e-12)
    assert fit.coefficient == pytest.approx(4.0)
    assert fit.r_squared is None


def test_power_law_fit_predicts_on_line() -> None:
    fit = scaling.fit_power_law([1.0, 10.0], [2.0, 200.0])

    assert fit.predict(100.0) == pytest.approx(20_000.0)


@pytest.mark.parametrize(
    ("xs", "ys", "message"),
    [
        ([1.0], [1.0], "at least 2 points. Found 1"),
        ([1.0, 2.0], [1.0], "same length. Found 2 and 1"),
        ([1.0, 2.0], [1.0, 0.0], "ys must be positive and finite. Found 0.0"),
        ([-1.0, 2.0], [1.0, 2.0], "xs must be positive and finite. Found -1.0"),
        ([1.0, 2.0], [1.0, math.inf], "ys must be positive and finite. Found inf"),
        ([5.0, 5.0], [1.0, 2.0], "two distinct values"),
    ],
)
def test_power_law_fit_rejects_bad_input(
    xs: list[float], ys: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        scaling.fit_power_law(xs, ys)


def _cost_row(size: int, seconds: float, overhead: float) -> dict[str, Any]:
    row: dict[str, Any] = {"clients": size, "params": 1000}
    for name in cost.PROTOCOLS:
        row[f"{name}_s_per_round"] = seconds
        row[f"{name}_upload_bytes_per_client"] = 4000.0
    row["fedsec_overhead_s"] = overhead
    row["flower_overhead_s"] = overhead
    return row


def test_fit_axis_leaves_out_nonpositive_overhead() -> None:
    rows = [_cost_row(10, 1.0, -0.1), _cost_row(100, 10.0, 0.5)]

    fits = {fit["metric"]: fit for fit in scaling.fit_axis(rows, scaling.CLIENTS_AXIS)}

    assert fits["fedsec_s_per_round"]["exponent"] == pytest.approx(1.0)
    assert fits["fedsec_upload_bytes_per_client"]["exponent"] == pytest.approx(0.0)
    assert fits["fedsec_overhead_s"]["num_points"] == 1
    assert "at least 2 points" in fits["fedsec_overhead_s"]["reason"]


def test_metric_label_names_protocol() -> None:
    assert scaling.metric_label("flower_secaggplus_s_per_round") == (
        "Flower SecAgg+ s/round"
    )
    assert scaling.metric_label("fedsec_mask_ms") == "fedsec mask generation ms"


# --- Rounds to target and round summaries ------------------------------------------


def _rounds(accuracies: list[float | None]) -> list[dict[str, Any]]:
    return [
        {"round": index, "accuracy": value, "seconds": 1.0}
        for index, value in enumerate(accuracies, start=1)
    ]


@pytest.mark.parametrize(
    ("accuracies", "target", "expected"),
    [
        ([0.50, 0.80, 0.96, 0.94, 0.97], 0.95, 3),
        ([0.96, 0.97], 0.95, 1),
        ([0.50, 0.95], 0.95, 2),
        ([0.50, 0.60, 0.70], 0.95, None),
        ([None, 0.99], 0.95, 2),
        ([], 0.95, None),
    ],
)
def test_rounds_to_target_on_known_curves(
    accuracies: list[float | None], target: float, expected: int | None
) -> None:
    assert accuracy.rounds_to_target(_rounds(accuracies), target) == expected


def test_steady_round_seconds_skips_first_round() -> None:
    rounds = [{"seconds": 30.0}, {"seconds": 1.0}, {"seconds": 3.0}, {"seconds": 2.0}]

    assert accuracy.steady_round_seconds(rounds) == 2.0
    assert accuracy.steady_round_seconds(rounds[:1]) == 30.0
    assert accuracy.steady_round_seconds([]) is None


def test_compact_round_averages_per_client_bytes() -> None:
    entry = {
        "round": 1,
        "upload_bytes_per_client": {"1": 100, "2": 300},
        "download_bytes_per_client": {"1": 50, "2": 50},
        "timings": {"client-train": 0.5},
    }

    compact = accuracy.compact_round(entry)

    assert compact["upload_bytes_per_client_mean"] == 200.0
    assert compact["download_bytes_per_client_mean"] == 50.0
    assert "upload_bytes_per_client" not in compact
    assert compact["timings"] == {"client-train": 0.5}


# --- Configurations and planning ---------------------------------------------------


def test_configurations_are_override_dicts() -> None:
    assert plain().overrides == {"secure-aggregation": False, "partitioning": "iid"}
    assert secure(0.1).overrides == {
        "secure-aggregation": True,
        "partitioning": "dirichlet",
        "dirichlet-alpha": 0.1,
    }
    assert secure_dp(8.0).overrides["target-epsilon"] == 8.0
    assert secure_verified().overrides["verification"] is True
    assert secure_dp(8.0, 0.5).name == "secure-dp-eps8-dir0.5"


def test_profile_names_are_unique() -> None:
    for profile in PROFILES.values():
        for plan in profile.accuracy:
            names = [configuration.name for configuration in plan.configurations]
            assert len(names) == len(set(names)), profile.name


def _write_app(directory: Path, keys: list[str]) -> Path:
    lines = ["[tool.flwr.app]", 'publisher = "test"', "", "[tool.flwr.app.config]"]
    lines.extend(f'{key} = "x"' for key in keys)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return directory


def _accuracy_profile() -> Profile:
    plan = DatasetPlan(
        dataset="breast-cancer",
        num_supernodes=3,
        target_accuracy=0.9,
        base_overrides={"num-server-rounds": 2},
        configurations=(secure(), secure_dp(1.0), secure_verified()),
    )
    return Profile(
        name="test",
        accuracy=(plan,),
        cost=SMOKE_PROFILE.cost,
        scaling=SMOKE_PROFILE.scaling,
        attacks=SMOKE_PROFILE.attacks,
        launch_timeout_s=1.0,
        point_timeout_s=1.0,
    )


def test_plan_skips_undeclared_keys(tmp_path: Path) -> None:
    keys = ["dataset", "num-server-rounds", "secure-aggregation", "partitioning"]
    app_dir = _write_app(tmp_path / "app", keys)

    experiments, skipped = accuracy.plan_experiments(
        _accuracy_profile(), app_dir=app_dir, runs_dir=tmp_path / "runs"
    )

    assert [e.name for e in experiments] == ["breast-cancer/secure-iid"]
    assert [s["name"] for s in skipped] == [
        "breast-cancer/secure-dp-eps1-iid",
        "breast-cancer/secure-verified-iid",
    ]
    assert "dp-mode, target-epsilon" in skipped[0]["reason"]
    assert "verification" in skipped[1]["reason"]


def test_plan_runs_declared_keys(tmp_path: Path) -> None:
    keys = [
        "dataset",
        "num-server-rounds",
        "secure-aggregation",
        "partitioning",
        "dp-mode",
        "target-epsilon",
        "verification",
    ]
    app_dir = _write_app(tmp_path / "app", keys)

    experiments, skipped = accuracy.plan_experiments(
        _accuracy_profile(), app_dir=app_dir, runs_dir=tmp_path / "runs"
    )

    assert len(experiments) == 3
    assert skipped == []
    assert experiments[1].config["overrides"]["dataset"] == "breast-cancer"
    assert experiments[1].config["overrides"]["num-server-rounds"] == 2
    assert all("client-timings" not in e.config["overrides"] for e in experiments)


def test_plan_asks_for_client_timings_where_declared(tmp_path: Path) -> None:
    keys = ["dataset", "num-server-rounds", "secure-aggregation", "partitioning"]
    dp_keys = ["dp-mode", "target-epsilon"]
    app_dir = _write_app(tmp_path / "app", [*keys, *dp_keys, "client-timings"])
    profile = _accuracy_profile()
    configurations = (plain(), secure(), secure_dp(1.0))
    plan = dataclasses.replace(profile.accuracy[0], configurations=configurations)
    profile = dataclasses.replace(profile, accuracy=(plan,))

    experiments, _ = accuracy.plan_experiments(
        profile, app_dir=app_dir, runs_dir=tmp_path / "runs"
    )

    # The app rejects client timings in plain runs, which have no protocol,
    # and under DP.
    timings = {e.name: e.config["overrides"].get("client-timings") for e in experiments}
    assert timings == {
        "breast-cancer/plain-iid": None,
        "breast-cancer/secure-iid": True,
        "breast-cancer/secure-dp-eps1-iid": None,
    }


def test_unique_points_keep_first_family() -> None:
    shared = cost.Point(10, 1000, 2)
    other = cost.Point(50, 1000, 2)

    merged = cost.unique_points([(COST, [shared]), (SCALING, [shared, other])])

    assert merged == [(COST, shared), (SCALING, other)]


def test_parse_families() -> None:
    assert run.parse_families(None) == FAMILIES
    assert run.parse_families("cost, accuracy") == (ACCURACY, COST)
    with pytest.raises(ValueError, match="--only must be a comma-separated list"):
        run.parse_families("accuracy,speed")
    with pytest.raises(ValueError, match="Found ','"):
        run.parse_families(",")


def test_select_datasets_keeps_named_plans_only() -> None:
    full = PROFILES[FULL]

    assert run.select_datasets(full, None) is full
    kept = run.select_datasets(full, " fashion-mnist ")
    assert [plan.dataset for plan in kept.accuracy] == [FASHION_MNIST]
    assert kept.cost == full.cost
    with pytest.raises(ValueError, match="Found 'mnist'"):
        run.select_datasets(full, "mnist")
    with pytest.raises(ValueError, match="breast-cancer, fashion-mnist"):
        run.select_datasets(full, ",")


# --- Runner and helpers ------------------------------------------------------------


def test_runner_records_failure_and_continues() -> None:
    def fail() -> dict[str, Any]:
        raise RuntimeError("broken on purpose")

    experiments = [
        Experiment(family=COST, name="bad", config={"a": 1}, run=fail),
        Experiment(family=COST, name="good", config={}, run=lambda: {"value": 2}),
    ]
    output = io.StringIO()

    entries = list(run_experiments(experiments, Progress(stream=output)))

    assert entries[0]["status"] == "failed"
    assert entries[0]["error"] == "RuntimeError: broken on purpose"
    assert entries[0]["config"] == {"a": 1}
    assert entries[1]["status"] == "completed"
    assert entries[1]["value"] == 2
    assert "experiment 2/2 cost/good: done" in output.getvalue()


def test_runner_result_cannot_replace_suite_fields() -> None:
    experiment = Experiment(
        family=COST, name="x", config={"mine": True}, run=lambda: {"config": "theirs"}
    )

    (entry,) = run_experiments([experiment], Progress(stream=io.StringIO()))

    assert entry["config"] == {"mine": True}


def test_json_safe_replaces_infinity() -> None:
    value = {"epsilons": (math.inf, 8.0), "nested": [{"x": math.nan}]}

    assert json_safe(value) == {"epsilons": [None, 8.0], "nested": [{"x": None}]}


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0:00"), (75.9, "1:15"), (3725.0, "1:02:05")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_round_breakdown_with_and_without_timings() -> None:
    run_with = {
        "name": "breast-cancer/secure-iid",
        "status": "completed",
        "config": {"security": "secure", "privacy": "none"},
        "rounds": [
            {"seconds": 30.0, "timings": {"client-train": 9.0}},
            {
                "seconds": 2.0,
                "timings": {"client-train": 1.0, "unmask": 0.2},
                "train_metrics": {"fedsec.client-mask-seconds": 0.1, "loss": 1.0},
            },
            {
                "seconds": 4.0,
                "timings": {"client-train": 3.0, "unmask": 0.4},
                "train_metrics": {"fedsec.client-mask-seconds": 0.3},
            },
        ],
    }
    run_without = {**run_with, "rounds": [{"seconds": 30.0}, {"seconds": 2.0}]}

    with_timings = cost.round_breakdown([run_with])
    without_timings = cost.round_breakdown([run_without])

    assert with_timings["stage_timings_available"] is True
    assert with_timings["rows"][0]["stages"] == pytest.approx(
        {"client-train": 2.0, "unmask": 0.3}
    )
    assert with_timings["rows"][0]["median_round_seconds"] == 3.0
    assert with_timings["rows"][0]["client_stages"] == pytest.approx(
        {"client-mask": 0.2}
    )
    assert without_timings["stage_timings_available"] is False
    assert "no `timings`" in without_timings["note"]


# --- Report rendering on a fake result ---------------------------------------------


def _fake_accuracy_entry() -> dict[str, Any]:
    config = {
        "dataset": "breast-cancer",
        "configuration": "secure-iid",
        "security": "secure",
        "epsilon": None,
        "partitioning": "IID",
        "privacy": "none",
        "num_supernodes": 3,
        "target_accuracy": 0.9,
        "overrides": {"dataset": "breast-cancer"},
    }
    rounds = _rounds([0.8, 0.92, 0.95])
    for entry in rounds:
        entry["upload_bytes_per_client_mean"] = 3000.0
        entry["download_bytes_per_client_mean"] = 3100.0
        entry["verified"] = entry["round"] != 2
    return {
        "family": ACCURACY,
        "name": "breast-cancer/secure-iid",
        "status": "completed",
        "config": config,
        "rounds": rounds,
        "offline_audit": {"exit_code": 1, "passed": False},
    }


def _fake_point(clients: int, params: int, seconds: float) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "family": COST,
        "name": cost.Point(clients, params, 2).name,
        "status": "completed",
        "config": {"clients": clients, "params": params, "rounds": 2},
        "overhead_ratio": 0.5,
        "mask_generation": {
            "fedsec_expand_mask_s": 1e-4 * params / 1000,
            "flower_pseudo_rand_gen_s": 4e-4 * params / 1000,
        },
    }
    factors = {"plain": 1.0, "fedsec": 2.0, "flower_secaggplus": 3.0}
    for name, factor in factors.items():
        entry[f"{name}_s_per_round"] = seconds * factor
        entry[f"{name}_measured_upload_bytes_per_client"] = 4.0 * params * factor
    return entry


def _fake_document(out_dir: Path) -> dict[str, Any]:
    profile = Profile(
        name="test",
        accuracy=(
            DatasetPlan(
                dataset="breast-cancer",
                num_supernodes=3,
                target_accuracy=0.9,
                base_overrides={},
                configurations=(secure(),),
            ),
        ),
        cost=CostPlan(clients=3, params=(1000, 10_000), rounds=2),
        scaling=ScalingPlan(
            clients=(3, 30),
            clients_axis_params=1000,
            params=(1000, 10_000),
            params_axis_clients=3,
            rounds=2,
        ),
        attacks=SMOKE_PROFILE.attacks,
        launch_timeout_s=1.0,
        point_timeout_s=1.0,
    )
    entries = [
        _fake_accuracy_entry(),
        _fake_point(3, 1000, 0.1),
        _fake_point(3, 10_000, 1.0),
        _fake_point(30, 1000, 1.0),
    ]
    skipped = [
        {
            "family": ACCURACY,
            "name": "breast-cancer/secure-dp-eps1-iid",
            "status": "skipped",
            "reason": "the app does not declare the run-config key(s) dp-mode",
        }
    ]
    failed = {
        "family": ATTACKS,
        "name": "gradient-inversion",
        "status": "failed",
        "error": "RuntimeError: broken on purpose",
    }
    sections = run.summarize_families(
        entries,
        skipped,
        profile=profile,
        families=(ACCURACY, COST, SCALING),
        out_dir=out_dir,
        environment=ENVIRONMENT,
    )
    suite = {
        "profile": "test",
        "command": "python -m benchmarks.run --smoke --out x",
        "started_at": "2026-01-01T00:00:00Z",
        "wall_time_s": 65.0,
        "status": "failed",
        "notes": ["A note."],
    }
    return {
        "suite": suite,
        "environment": ENVIRONMENT,
        "failures": [failed],
        **sections,
    }


@pytest.fixture
def fake_report(tmp_path: Path) -> tuple[str, dict[str, Any], Path]:
    document = _fake_document(tmp_path)
    return report.render_report(json_safe(document)), document, tmp_path


def test_report_has_every_section(
    fake_report: tuple[str, dict[str, Any], Path],
) -> None:
    text, _, _ = fake_report

    for heading in (
        "# Evaluation report (test)",
        "## Accuracy and convergence",
        "## Cost per round",
        "## Scaling",
        "### Growth with clients (params 1,000)",
    ):
        assert heading in text


def test_report_records_machine_and_commit(
    fake_report: tuple[str, dict[str, Any], Path],
) -> None:
    text, _, _ = fake_report

    assert "test CPU, 2 logical cores" in text
    assert "0" * 40 in text
    assert "wall time 1:05" in text


def test_report_accuracy_row(fake_report: tuple[str, dict[str, Any], Path]) -> None:
    text, _, _ = fake_report

    row = (
        "| secure-iid | secure | none | IID | 0.950 | 0.950 | 0.890 | 2 | n/a "
        "| 1.00 | 3,000 | 3,100 |"
    )
    assert row in text


def test_report_shows_per_example_epsilon_of_dp_sgd() -> None:
    entry = _fake_accuracy_entry()
    entry["rounds"][-1]["train_metrics"] = {"sample-epsilon": 7.9937}

    summary = accuracy.summarize_run(entry)

    assert summary["final_epsilon"] is None
    assert summary["final_sample_epsilon"] == 7.9937
    assert report._epsilon_cell(summary) == "7.99 (per example)"
    assert report._epsilon_cell({**summary, "final_epsilon": 2.5}) == "2.50"


def test_report_states_verification(
    fake_report: tuple[str, dict[str, Any], Path],
) -> None:
    text, _, _ = fake_report

    assert "- secure-iid: the clients verified 2 of 3 checked rounds" in text
    assert "offline audit (`python -m fedsec_flwr.audit`) failed." in text


def test_report_lists_skipped_and_failed(
    fake_report: tuple[str, dict[str, Any], Path],
) -> None:
    text, _, _ = fake_report

    assert "- breast-cancer/secure-dp-eps1-iid: the app does not declare" in text
    assert "- attacks/gradient-inversion: RuntimeError: broken on purpose" in text


def test_report_growth_exponents(fake_report: tuple[str, dict[str, Any], Path]) -> None:
    text, document, _ = fake_report
    fits = {fit["metric"]: fit for fit in document[SCALING]["params_axis"]["fits"]}

    assert fits["fedsec_upload_bytes_per_client"]["exponent"] == pytest.approx(1.0)
    assert fits["plain_s_per_round"]["exponent"] == pytest.approx(1.0)
    assert "| fedsec SecAgg+ upload bytes per client | 1.00 |" in text


def test_report_links_existing_plots(
    fake_report: tuple[str, dict[str, Any], Path],
) -> None:
    text, document, out_dir = fake_report
    plots = [
        name
        for family in (ACCURACY, COST, SCALING)
        for name in document[family]["plots"]
    ]

    assert len(plots) == 4
    for name in plots:
        assert (out_dir / name).is_file()
        assert f"]({name})" in text


def test_report_states_missing_stage_timings(
    fake_report: tuple[str, dict[str, Any], Path],
) -> None:
    text, _, _ = fake_report

    assert "carry no `timings` mapping" in text


# --- The whole command on tiny settings --------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out_dir = tmp_path_factory.mktemp("suite-smoke")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out_dir)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_SECONDS,
        check=False,
    )
    return out_dir, completed


needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_PRESENT, reason=f"Fashion-MNIST missing: {INSTALL_COMMAND}"
)


@needs_fashion_mnist
@pytest.mark.e2e
@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 60)
def test_smoke_run_succeeds(smoke_run: tuple[Path, Any]) -> None:
    _, completed = smoke_run

    assert completed.returncode == 0, (
        completed.stdout[-3000:] + completed.stderr[-3000:]
    )
    assert "experiment 1/" in completed.stdout


@needs_fashion_mnist
@pytest.mark.e2e
@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 60)
def test_smoke_run_writes_results(smoke_run: tuple[Path, Any]) -> None:
    out_dir, _ = smoke_run
    document = json.loads((out_dir / "results.json").read_text())

    assert document["suite"]["status"] == "completed"
    assert document["environment"]["machine"]["cores"] >= 1
    assert len(document["environment"]["commit"]["commit"]) == 40
    for family in FAMILIES:
        assert document[family]["machine"] == document["environment"]["machine"]
        assert document[family]["commit"] == document["environment"]["commit"]
    for entry in document["experiments"]:
        assert entry["status"] == "completed", entry
        assert entry["config"], entry["name"]


@needs_fashion_mnist
@pytest.mark.e2e
@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 60)
def test_smoke_run_measures_each_family(smoke_run: tuple[Path, Any]) -> None:
    out_dir, _ = smoke_run
    document = json.loads((out_dir / "results.json").read_text())

    (run_entry,) = document[ACCURACY]["runs"]
    assert len(run_entry["rounds"]) == 2
    assert run_entry["summary"]["final_accuracy"] > 0.5
    (row,) = document[COST]["rows"]
    assert row["params"] == 2000
    assert row["fedsec_upload_bytes_per_coordinate"] < 5.0
    assert row["flower_secaggplus_upload_bytes_per_coordinate"] > 8.0
    assert document[ATTACKS]["membership_inference"]["status"] == "completed"


@needs_fashion_mnist
@pytest.mark.e2e
@pytest.mark.timeout(SMOKE_TIMEOUT_SECONDS + 60)
def test_smoke_run_writes_report_and_plots(smoke_run: tuple[Path, Any]) -> None:
    out_dir, _ = smoke_run
    text = (out_dir / "report.md").read_text()

    assert list(out_dir.glob("*.png"))
    assert "Commit: " in text
    assert "logical cores" in text
    for png in out_dir.glob("*.png"):
        assert f"]({png.name})" in text


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_accuracy_run_config_accepted_by_app(name: str) -> None:
    # The app rejects settings that others switch off, so every run config
    # that a profile plans must parse as the app's run config would.
    sys.path.insert(0, str(APP_DIR))
    from secure_fedavg_app.settings import AppSettings

    with (APP_DIR / "pyproject.toml").open("rb") as file:
        defaults = tomllib.load(file)["tool"]["flwr"]["app"]["config"]

    for plan in PROFILES[name].accuracy:
        for configuration in plan.configurations:
            overrides = accuracy.run_overrides(plan, configuration)
            AppSettings.from_run_config({**defaults, **overrides})
