"""Cost of a round: seconds and uploaded bytes of plain FedAvg, fedsec and Flower.

Each measurement point (clients, parameters, rounds) runs
``benchmarks.overhead`` in a child process: three in-process simulations
(plain ``SecureFedAvg``, ``SecureFedAvg`` with secure aggregation, and
Flower's ``SecAggPlusWorkflow``) on a synthetic model whose clients do not
train, plus a timing of mask generation. The child process keeps Ray's state
and memory out of the suite, and lets the suite stop a simulation that
exceeds its timeout. The cost and scaling families share these points.

The split of a round into stages (training, encoding and masking,
unmasking, verification) comes from the accuracy runs of the real app,
whose ``results.json`` rounds carry a ``timings`` mapping when the strategy
reports one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPOSITORY_ROOT
from benchmarks.overhead import FEDSEC, FLOWER, PLAIN
from benchmarks.suite.experiment import COST, STATUS_COMPLETED, Experiment
from benchmarks.suite.plots import FONT_SIZE, new_figure, save_png
from benchmarks.suite.profiles import CostPlan
from fedsec_flwr.launch import list_descendants

PROTOCOLS = (PLAIN, FEDSEC, FLOWER)
PROTOCOL_LABELS = {
    PLAIN: "plain FedAvg",
    FEDSEC: "fedsec SecAgg+",
    FLOWER: "Flower SecAgg+",
}
TIMINGS_KEY = "timings"
TRAIN_METRICS_KEY = "train_metrics"
METRIC_PREFIX = "fedsec."
SECONDS_SUFFIX = "-seconds"
TERMINATE_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.2
# Keys of the overhead summary that the suite records once for the whole run.
DROPPED_KEYS = ("machine", "commit", "tracked_changes")
MILLISECONDS = 1000.0


class PointFailedError(RuntimeError):
    """A measurement point did not finish or wrote no result."""


@dataclass(frozen=True, order=True)
class Point:
    """One measurement: every protocol with ``clients`` clients and ``params``.

    Attributes:
        clients: Simulated clients, all sampled in every round.
        params: float32 parameters of the synthetic model.
        rounds: Rounds per simulation; round 1 only starts the clients.
    """

    clients: int
    params: int
    rounds: int

    @property
    def name(self) -> str:
        """Identifier such as ``10-clients-100000-params``."""
        return f"{self.clients}-clients-{self.params}-params"

    def config(self) -> dict[str, int]:
        """Return the point as a JSON object."""
        return {"clients": self.clients, "params": self.params, "rounds": self.rounds}


def cost_points(plan: CostPlan) -> list[Point]:
    """Return the points of the cost family, in the order to run them."""
    return [Point(plan.clients, params, plan.rounds) for params in plan.params]


def unique_points(
    requests: Iterable[tuple[str, Sequence[Point]]],
) -> list[tuple[str, Point]]:
    """Merge the points that families request, keeping the first requester.

    Args:
        requests: Pairs of a family name and the points it needs.

    Returns:
        Each distinct point once, labeled with the first family that asked
        for it, in request order.
    """
    seen: set[Point] = set()
    merged: list[tuple[str, Point]] = []
    for family, points in requests:
        for point in points:
            if point not in seen:
                seen.add(point)
                merged.append((family, point))
    return merged


def plan_experiments(
    points: Sequence[tuple[str, Point]], *, runs_dir: Path, timeout: float
) -> list[Experiment]:
    """Build one experiment per measurement point."""
    return [
        Experiment(
            family=family,
            name=point.name,
            config=point.config(),
            run=_runner(point, runs_dir / point.name, timeout),
            headline=_headline,
        )
        for family, point in points
    ]


def _runner(
    point: Point, output_dir: Path, timeout: float
) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        return measure_point(point, output_dir=output_dir, timeout=timeout)

    return run


def measure_point(point: Point, *, output_dir: Path, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks.overhead`` for one point and return its measurements.

    Args:
        point: Clients, parameters and rounds.
        output_dir: Folder for the child's JSON result and log.
        timeout: Seconds before the child and everything it started are
            stopped.

    Returns:
        The overhead benchmark's summary, less the machine and commit that
        the suite records once, plus the path of the child's log.

    Raises:
        PointFailedError: If the child fails, times out or writes no result.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "overhead.json"
    log_path = output_dir / "overhead.log"
    json_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.overhead",
        "--params",
        str(point.params),
        "--clients",
        str(point.clients),
        "--rounds",
        str(point.rounds),
        "--json",
        str(json_path),
    ]
    exit_code = run_child(command, log_path=log_path, timeout=timeout)
    if exit_code != 0 or not json_path.is_file():
        raise PointFailedError(
            f"python -m benchmarks.overhead exited with code {exit_code} for "
            f"{point.name}. See {log_path}."
        )

    summary = json.loads(json_path.read_text(encoding="utf-8"))
    for key in DROPPED_KEYS:
        summary.pop(key, None)
    summary["log_file"] = str(log_path)
    return dict(summary)


def run_child(command: Sequence[str], *, log_path: Path, timeout: float) -> int:
    """Run ``command`` from the repository root with output to ``log_path``.

    The child gets its own session, so a Ctrl-C in the terminal reaches only
    the suite, which then stops the child and its descendants (Ray) itself:
    SIGTERM first, SIGKILL after a grace period.

    Returns:
        The child's exit code.

    Raises:
        PointFailedError: If the child runs longer than ``timeout`` seconds.
        KeyboardInterrupt: Re-raised after the child has been stopped.
    """
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            list(command),
            cwd=REPOSITORY_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_tree(process)
            raise PointFailedError(
                f"{' '.join(command[1:4])} did not finish within {timeout:.0f} s "
                f"and was stopped. See {log_path}."
            ) from None
        except BaseException:
            stop_process_tree(process)
            raise


def stop_process_tree(process: subprocess.Popen[Any]) -> None:
    """Stop ``process`` and its descendants: SIGTERM, then SIGKILL if needed."""
    tree = [process.pid, *list_descendants([process.pid])]
    for pid in tree:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(POLL_SECONDS)
    for pid in [process.pid, *list_descendants([process.pid]), *tree]:
        _signal(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=TERMINATE_GRACE_SECONDS)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _headline(entry: dict[str, Any]) -> str:
    parts = [f"{name} {entry[f'{name}_s_per_round']:.3f} s/round" for name in PROTOCOLS]
    return ", ".join(parts)


def measured_points(
    entries: Iterable[Mapping[str, Any]],
) -> dict[Point, dict[str, Any]]:
    """Return the completed measurement entries by their point."""
    found: dict[Point, dict[str, Any]] = {}
    for entry in entries:
        if entry["status"] != STATUS_COMPLETED or entry["family"] not in (
            COST,
            "scaling",
        ):
            continue
        config = entry["config"]
        found[Point(config["clients"], config["params"], config["rounds"])] = dict(
            entry
        )
    return found


def cost_row(point: Point, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Return the cost numbers of one point as a flat table row."""
    row: dict[str, Any] = {"clients": point.clients, "params": point.params}
    for name in PROTOCOLS:
        row[f"{name}_s_per_round"] = entry[f"{name}_s_per_round"]
        row[f"{name}_upload_bytes_per_client"] = entry[
            f"{name}_measured_upload_bytes_per_client"
        ]
        row[f"{name}_upload_bytes_per_coordinate"] = (
            entry[f"{name}_measured_upload_bytes_per_client"] / point.params
        )
    plain = entry[f"{PLAIN}_s_per_round"]
    row["fedsec_overhead_s"] = entry[f"{FEDSEC}_s_per_round"] - plain
    row["flower_overhead_s"] = entry[f"{FLOWER}_s_per_round"] - plain
    row["overhead_ratio"] = entry.get("overhead_ratio")
    masks = entry.get("mask_generation", {})
    row["fedsec_mask_ms"] = _milliseconds(masks.get("fedsec_expand_mask_s"))
    row["flower_mask_ms"] = _milliseconds(masks.get("flower_pseudo_rand_gen_s"))
    return row


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * MILLISECONDS


def round_breakdown(accuracy_runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Split the round time of each completed accuracy run into its stages.

    Server stages are the round entries' ``timings``: wall seconds of each
    protocol stage, measured on the server. Client stages are the training
    metrics whose key ends in ``-seconds``, such as
    ``fedsec.client-train-seconds``, averaged over the clients by the
    strategy. Both are means over rounds 2 and later. Where no round carries
    ``timings``, only the median round time is reported and the section says
    the split is missing.
    """
    rows = []
    for run in accuracy_runs:
        if run.get("status") != STATUS_COMPLETED:
            continue
        rounds = run["rounds"]
        steady = rounds[1:] or rounds
        seconds = [float(r["seconds"]) for r in steady if "seconds" in r]
        rows.append(
            {
                "name": run["name"],
                "security": run["config"]["security"],
                "privacy": run["config"]["privacy"],
                "median_round_seconds": statistics.median(seconds) if seconds else None,
                "stages": mean_stage_seconds(steady),
                "client_stages": mean_client_seconds(steady),
            }
        )
    available = any(row["stages"] for row in rows)
    note = (
        "Server stage seconds are means over rounds 2 and later of the "
        "`timings` that the app records per round; training happens inside "
        "the masked-input stage. Client columns are the mean seconds one "
        "client spends on a step, from its training metrics; clients run in "
        "parallel, so they do not add up to the round time."
        if available
        else "The app's results.json rounds carry no `timings` mapping yet, so "
        "the split of a round into training, encoding and masking, unmasking "
        "and verification is not measured; only whole-round times are shown."
    )
    return {"rows": rows, "stage_timings_available": available, "note": note}


def mean_stage_seconds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Return the mean seconds of each ``timings`` key over ``rounds``."""
    return _mean_by_key(rounds, TIMINGS_KEY, lambda key: key)


def mean_client_seconds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Return the mean of each ``*-seconds`` training metric over ``rounds``.

    Keys lose their ``fedsec.`` prefix and ``-seconds`` suffix, so
    ``fedsec.client-mask-seconds`` becomes ``client-mask``.
    """

    def rename(key: str) -> str | None:
        if not key.endswith(SECONDS_SUFFIX):
            return None
        return key.removeprefix(METRIC_PREFIX).removesuffix(SECONDS_SUFFIX)

    return _mean_by_key(rounds, TRAIN_METRICS_KEY, rename)


def _mean_by_key(
    rounds: Sequence[Mapping[str, Any]],
    field: str,
    rename: Callable[[str], str | None],
) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for entry in rounds:
        mapping = entry.get(field)
        if not isinstance(mapping, Mapping):
            continue
        for key, seconds in mapping.items():
            name = rename(str(key))
            if name is not None and isinstance(seconds, int | float):
                values.setdefault(name, []).append(float(seconds))
    return {key: statistics.fmean(series) for key, series in values.items()}


def summarize(
    entries: Sequence[Mapping[str, Any]],
    accuracy_runs: Sequence[Mapping[str, Any]],
    *,
    plan: CostPlan,
    out_dir: Path,
    environment: Mapping[str, Any],
) -> dict[str, Any]:
    """Build the cost section: one row per cost point, the round split, a plot."""
    measured = measured_points(entries)
    rows = [
        cost_row(point, measured[point])
        for point in cost_points(plan)
        if point in measured
    ]
    missing = [point.name for point in cost_points(plan) if point not in measured]
    plots = []
    if rows:
        plots.append(plot_cost(rows, out_dir / "cost-seconds-per-round.png"))
    return {
        "description": (
            "Seconds per round are the mean of rounds 2 and later of each "
            "simulation, whose clients return a shifted copy of the model "
            "without training; upload is the payload bytes one client sends "
            "in one round, over all protocol stages."
        ),
        "clients": plan.clients,
        "rows": rows,
        "missing_points": missing,
        "round_breakdown": round_breakdown(accuracy_runs),
        "plots": plots,
        **environment,
    }


def plot_cost(rows: Sequence[Mapping[str, Any]], path: Path) -> str:
    """Plot seconds per round of each protocol as bars, one group per size."""
    figure = new_figure(6.5, 3.8)
    axis = figure.add_subplot()
    width = 0.8 / len(PROTOCOLS)
    positions = range(len(rows))
    for index, name in enumerate(PROTOCOLS):
        axis.bar(
            [position + (index - 1) * width for position in positions],
            [row[f"{name}_s_per_round"] for row in rows],
            width=width,
            label=PROTOCOL_LABELS[name],
        )
    axis.set_xticks(list(positions))
    axis.set_xticklabels([f"{row['params']:,}" for row in rows])
    axis.set_xlabel(f"model parameters ({rows[0]['clients']} clients)")
    axis.set_ylabel("seconds per round")
    axis.set_yscale("log")
    axis.set_title("Round time, no local training", fontsize=FONT_SIZE + 1)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=FONT_SIZE)
    return save_png(figure, path)
