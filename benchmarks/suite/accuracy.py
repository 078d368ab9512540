"""Accuracy and convergence: runs of the real ``flwr run`` path, round by round.

Every run goes through ``fedsec_flwr.launch``, which starts a private
SuperLink, runs the app on Flower's simulation engine, checks that the run
completed and stops every process it started. The app writes one entry per
round to its ``results.json``, and this module reads the test accuracy, the
loss, the round time, the uploaded bytes and, under DP, the epsilon spent.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from benchmarks.suite.experiment import (
    ACCURACY,
    STATUS_COMPLETED,
    STATUS_SKIPPED,
    Experiment,
)
from benchmarks.suite.plots import FONT_SIZE, new_figure, save_png
from benchmarks.suite.profiles import (
    PLAIN,
    ConfigValue,
    DatasetPlan,
    Profile,
    RunConfiguration,
)
from fedsec_flwr.launch import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    RESULTS_FILENAME,
    LaunchOptions,
    launch,
    read_app_config_keys,
)

PER_CLIENT_KEYS = ("upload_bytes_per_client", "download_bytes_per_client")
# Under DP the accuracy moves from round to round with the noise, so the mean
# of the last rounds is reported next to the final value.
LAST_ROUNDS = 3

SAMPLE_EPSILON_METRIC = "sample-epsilon"
"""Training metric of DP-SGD runs: the clients' mean per-example epsilon so far."""

CLIENT_TIMINGS_KEY = "client-timings"
"""Run-config key that makes the app's clients send their stage timings,
which ``cost.round_breakdown`` splits rounds by. Set where the app declares it."""

AUDIT_FILENAME = "audit.json"
AUDIT_TIMEOUT_SECONDS = 600.0
AUDIT_OUTPUT_LINES = 20
SECURITY_LINE_STYLES = {"plain": "--", "secure": "-", "secure+verification": ":"}
SECURITY_LAYERS = {"plain": 3, "secure": 2, "secure+verification": 4}


class RunFailedError(RuntimeError):
    """An accuracy run did not complete."""


def run_overrides(
    plan: DatasetPlan, configuration: RunConfiguration
) -> dict[str, ConfigValue]:
    """Return the run-config overrides of one run: dataset, base, configuration."""
    return {
        "dataset": plan.dataset,
        **plan.base_overrides,
        **configuration.overrides,
    }


def missing_keys(overrides: Mapping[str, object], declared: set[str]) -> list[str]:
    """Return the override keys, sorted, that the app does not declare."""
    return sorted(set(overrides) - declared)


def experiment_name(plan: DatasetPlan, configuration: RunConfiguration) -> str:
    """Return the suite-wide name of a run, such as ``breast-cancer/secure-iid``."""
    return f"{plan.dataset}/{configuration.name}"


def plan_experiments(
    profile: Profile, *, app_dir: Path, runs_dir: Path
) -> tuple[list[Experiment], list[dict[str, Any]]]:
    """Build one experiment per accuracy run and list the runs to skip.

    A run is skipped when one of its override keys is not declared in the
    ``[tool.flwr.app.config]`` table of the app's ``pyproject.toml``. Where
    the app declares ``client-timings``, every run that the app accepts it
    in (with a protocol and without DP) sets it to true.

    Returns:
        The experiments, and one skipped entry (name, configuration, reason)
        per skipped run.
    """
    declared = read_app_config_keys(app_dir)
    experiments: list[Experiment] = []
    skipped: list[dict[str, Any]] = []
    for plan in profile.accuracy:
        for configuration in plan.configurations:
            config = _recorded_config(plan, configuration)
            if CLIENT_TIMINGS_KEY in declared and _timings_allowed(configuration):
                config["overrides"][CLIENT_TIMINGS_KEY] = True
            unknown = missing_keys(config["overrides"], declared)
            name = experiment_name(plan, configuration)
            if unknown:
                reason = (
                    f"the app in {app_dir} does not declare the run-config "
                    f"key(s) {', '.join(unknown)}"
                )
                skipped.append(
                    {
                        "family": ACCURACY,
                        "name": name,
                        "status": STATUS_SKIPPED,
                        "config": config,
                        "reason": reason,
                    }
                )
                continue
            experiments.append(
                Experiment(
                    family=ACCURACY,
                    name=name,
                    config=config,
                    run=_runner(
                        app_dir,
                        config,
                        runs_dir / plan.dataset / configuration.name,
                        profile.launch_timeout_s,
                    ),
                    headline=_headline,
                )
            )
    return experiments, skipped


def _timings_allowed(configuration: RunConfiguration) -> bool:
    """Return whether the app accepts client timings in this configuration.

    It rejects them in plain runs, which have no protocol to report them,
    and under DP, whose guarantee does not cover them.
    """
    private = (
        configuration.epsilon is not None or configuration.sample_epsilon is not None
    )
    return configuration.security != PLAIN and not private


def _recorded_config(
    plan: DatasetPlan, configuration: RunConfiguration
) -> dict[str, Any]:
    return {
        "dataset": plan.dataset,
        "configuration": configuration.name,
        "security": configuration.security,
        "epsilon": configuration.epsilon,
        "sample_epsilon": configuration.sample_epsilon,
        "partitioning": configuration.partitioning_label,
        "privacy": configuration.privacy_label,
        "num_supernodes": plan.num_supernodes,
        "target_accuracy": plan.target_accuracy,
        "overrides": run_overrides(plan, configuration),
    }


def _runner(
    app_dir: Path, config: dict[str, Any], output_dir: Path, timeout: float
) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        return run_configuration(
            app_dir,
            overrides=config["overrides"],
            num_supernodes=config["num_supernodes"],
            output_dir=output_dir,
            timeout=timeout,
        )

    return run


def run_configuration(
    app_dir: Path,
    *,
    overrides: Mapping[str, ConfigValue],
    num_supernodes: int,
    output_dir: Path,
    timeout: float,
) -> dict[str, Any]:
    """Launch one run of the app and return its rounds and resolved settings.

    Args:
        app_dir: Folder of the Flower app.
        overrides: Run-config overrides.
        num_supernodes: Simulated clients.
        output_dir: Folder of this run; removed first if it exists, so an
            old ``results.json`` is never read as the new one.
        timeout: Seconds before the launcher stops the run.

    Returns:
        The rounds (per-client byte counts reduced to their mean), the full
        run config that the app resolved, and the paths of its files.

    Raises:
        RunFailedError: If the run did not complete.
        KeyboardInterrupt: If the launcher was interrupted.
    """
    shutil.rmtree(output_dir, ignore_errors=True)
    options = LaunchOptions(
        app_dir=app_dir.resolve(),
        run_config=dict(overrides),
        output_dir=output_dir.resolve(),
        num_supernodes=num_supernodes,
        timeout=timeout,
    )
    # The launcher copies the run's output to logs/run.log, so the live echo
    # is dropped to keep the suite's progress lines readable.
    with open(os.devnull, "w", encoding="utf-8") as echo:
        result = launch(options, echo=echo)
    if result.exit_code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt(result.message)
    if result.exit_code != EXIT_OK:
        raise RunFailedError(result.message)

    document = json.loads((output_dir / RESULTS_FILENAME).read_text(encoding="utf-8"))
    record = {
        "run_id": result.run_id,
        "rounds": [compact_round(entry) for entry in document["rounds"]],
        "resolved_run_config": document.get("run_config"),
        "model_parameters": document.get("model_parameters"),
        "results_file": str(output_dir / RESULTS_FILENAME),
        "logs_dir": str(output_dir / "logs"),
    }
    audit_file = output_dir / AUDIT_FILENAME
    if audit_file.is_file():
        record["offline_audit"] = run_offline_audit(audit_file)
    return record


def run_offline_audit(audit_file: Path) -> dict[str, Any]:
    """Check a run's saved transcripts with ``python -m fedsec_flwr.audit``.

    The auditor recomputes every round's checks from the transcript and the
    released aggregate alone, as a third party without the server's state
    would.

    Returns:
        The auditor's exit code, whether it passed (exit code 0), and the
        last lines of its output.
    """
    completed = subprocess.run(
        [sys.executable, "-m", "fedsec_flwr.audit", str(audit_file)],
        capture_output=True,
        text=True,
        timeout=AUDIT_TIMEOUT_SECONDS,
        check=False,
    )
    output = (completed.stdout + completed.stderr).splitlines()
    return {
        "command": f"python -m fedsec_flwr.audit {audit_file}",
        "exit_code": completed.returncode,
        "passed": completed.returncode == 0,
        "output": output[-AUDIT_OUTPUT_LINES:],
    }


def compact_round(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a round entry of the app, with per-client byte counts as means.

    Every other field is kept as it is, so fields that the app adds later,
    such as per-stage timings, reach the suite's results unchanged.
    """
    compact = dict(entry)
    for key in PER_CLIENT_KEYS:
        per_client = compact.pop(key, None)
        if isinstance(per_client, Mapping) and per_client:
            compact[f"{key}_mean"] = statistics.fmean(per_client.values())
    return compact


def rounds_to_target(rounds: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """Return the first round whose accuracy is at least ``target``, else None.

    Args:
        rounds: Round entries with ``round`` and ``accuracy`` (None when the
            round was not evaluated).
        target: Accuracy to reach, as a fraction.
    """
    for entry in rounds:
        accuracy = entry.get("accuracy")
        if accuracy is not None and accuracy >= target:
            return int(entry["round"])
    return None


def steady_round_seconds(rounds: Sequence[Mapping[str, Any]]) -> float | None:
    """Return the median round time from round 2 on.

    Round 1 also waits for the simulation engine to start the clients, so
    it is left out unless it is the only round.
    """
    seconds = [float(entry["seconds"]) for entry in rounds if "seconds" in entry]
    steady = seconds[1:] or seconds
    return statistics.median(steady) if steady else None


def summarize_run(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Return the headline numbers of one completed run."""
    rounds = entry["rounds"]
    accuracies = [r["accuracy"] for r in rounds if r.get("accuracy") is not None]
    uploads = [
        r["upload_bytes_per_client_mean"]
        for r in rounds
        if r.get("upload_bytes_per_client_mean") is not None
    ]
    downloads = [
        r["download_bytes_per_client_mean"]
        for r in rounds
        if r.get("download_bytes_per_client_mean") is not None
    ]
    return {
        "num_rounds": len(rounds),
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "last_rounds_mean_accuracy": (
            statistics.fmean(accuracies[-LAST_ROUNDS:]) if accuracies else None
        ),
        "rounds_to_target": rounds_to_target(
            rounds, entry["config"]["target_accuracy"]
        ),
        "final_epsilon": rounds[-1].get("epsilon") if rounds else None,
        "final_sample_epsilon": (
            rounds[-1].get("train_metrics", {}).get(SAMPLE_EPSILON_METRIC)
            if rounds
            else None
        ),
        "verified_rounds": sum(r.get("verified") is True for r in rounds),
        "checked_rounds": sum(r.get("verified") is not None for r in rounds),
        "offline_audit_passed": entry.get("offline_audit", {}).get("passed"),
        "median_round_seconds": steady_round_seconds(rounds),
        "upload_bytes_per_client": statistics.fmean(uploads) if uploads else None,
        "download_bytes_per_client": (
            statistics.fmean(downloads) if downloads else None
        ),
    }


def _headline(entry: dict[str, Any]) -> str:
    summary = summarize_run(entry)
    target = entry["config"]["target_accuracy"]
    reached = summary["rounds_to_target"]
    reached_text = "not reached" if reached is None else f"round {reached}"
    final = summary["final_accuracy"]
    final_text = "n/a" if final is None else f"{final:.3f}"
    return f"final accuracy {final_text}, target {target:g} {reached_text}"


def summarize(
    entries: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    *,
    profile: Profile,
    out_dir: Path,
    environment: Mapping[str, Any],
) -> dict[str, Any]:
    """Build the accuracy section of the results: runs, summaries and plots."""
    runs = []
    for entry in entries:
        run = dict(entry)
        if entry["status"] == STATUS_COMPLETED:
            run["summary"] = summarize_run(entry)
        runs.append(run)

    plots = []
    for plan in profile.accuracy:
        completed = [
            run
            for run in runs
            if run["config"]["dataset"] == plan.dataset
            and run["status"] == STATUS_COMPLETED
        ]
        if not completed:
            continue
        plots.append(
            plot_accuracy(completed, plan, out_dir / f"accuracy-{plan.dataset}.png")
        )
        if any(run["config"]["epsilon"] is not None for run in completed):
            plots.append(
                plot_privacy_accuracy(
                    completed, plan, out_dir / f"privacy-accuracy-{plan.dataset}.png"
                )
            )

    return {
        "description": (
            "Test accuracy of the global model after each round, from the "
            "app's results.json; rounds_to_target is the first round whose "
            "accuracy reaches the dataset's target."
        ),
        "targets": {plan.dataset: plan.target_accuracy for plan in profile.accuracy},
        "runs": runs,
        "skipped": list(skipped),
        "plots": plots,
        **environment,
    }


def plot_accuracy(
    runs: Sequence[Mapping[str, Any]], plan: DatasetPlan, path: Path
) -> str:
    """Plot test accuracy against the round, one line per configuration."""
    figure = new_figure(7.0, 4.2)
    axis = figure.add_subplot()
    for run in runs:
        rounds = [r for r in run["rounds"] if r.get("accuracy") is not None]
        config = run["config"]
        axis.plot(
            [r["round"] for r in rounds],
            [r["accuracy"] for r in rounds],
            linestyle=SECURITY_LINE_STYLES.get(config["security"], "-"),
            marker=None if config["privacy"] == "none" else "o",
            markersize=3,
            # Dashed and dotted lines are drawn over solid ones, so a run with
            # the same curve as a secure run stays visible.
            zorder=SECURITY_LAYERS.get(config["security"], 2),
            label=config["configuration"],
        )
    axis.axhline(plan.target_accuracy, color="grey", linewidth=0.8, linestyle="-.")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("round")
    axis.set_ylabel("test accuracy")
    axis.set_title(
        f"{plan.dataset}, {plan.num_supernodes} clients "
        f"(target {plan.target_accuracy:g}, dash-dot line)",
        fontsize=FONT_SIZE + 1,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=FONT_SIZE - 1, loc="lower right")
    return save_png(figure, path)


def plot_privacy_accuracy(
    runs: Sequence[Mapping[str, Any]], plan: DatasetPlan, path: Path
) -> str:
    """Plot final accuracy, and its mean over the last rounds, against epsilon.

    The epsilon is client-level. Runs without any DP on the IID split are
    horizontal lines; DP-SGD runs are left out, because their epsilon is per
    example, not per client.
    """
    figure = new_figure(5.0, 3.6)
    axis = figure.add_subplot()
    dp_runs = sorted(
        (
            run
            for run in runs
            if run["config"]["epsilon"] is not None
            and run["config"].get("sample_epsilon") is None
        ),
        key=lambda run: run["config"]["epsilon"],
    )
    epsilons = [run["config"]["epsilon"] for run in dp_runs]
    summaries = [summarize_run(run) for run in dp_runs]
    axis.plot(
        epsilons,
        [summary["final_accuracy"] for summary in summaries],
        marker="o",
        label="secure + DP, final round",
    )
    axis.plot(
        epsilons,
        [summary["last_rounds_mean_accuracy"] for summary in summaries],
        marker="s",
        linestyle=":",
        label=f"secure + DP, mean of last {LAST_ROUNDS} rounds",
    )
    for run in runs:
        config = run["config"]
        if config["privacy"] == "none" and config["partitioning"] == "IID":
            axis.axhline(
                summarize_run(run)["final_accuracy"],
                linestyle=SECURITY_LINE_STYLES.get(config["security"], "-"),
                linewidth=0.9,
                color="grey",
                label=f"{config['configuration']} (no DP)",
            )
    axis.set_xscale("log")
    axis.set_xticks(epsilons, [f"{epsilon:g}" for epsilon in epsilons])
    axis.minorticks_off()
    axis.set_xlabel("client-level epsilon (target)")
    axis.set_ylabel("final test accuracy")
    axis.set_title(f"{plan.dataset}: privacy against accuracy", fontsize=FONT_SIZE + 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=FONT_SIZE - 1)
    return save_png(figure, path)
