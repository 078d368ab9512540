"""Seconds per round of the app in a local deployment, plain against secure.

Each mode runs ``python -m fedsec_flwr.deploy run-local``: one SuperLink and
N SuperNodes on loopback with TLS and SuperNode authentication, the same app
and run config, one run per mode and repeat. With ``--grid simulation`` each
mode runs ``python -m fedsec_flwr.launch`` instead, with N simulated clients.
The modes alternate within a repeat, so a slow period of the machine touches
each of them. The seconds of a round are the ``seconds`` field of the run's
``results.json``::

    python -m benchmarks.deployment --rounds 5 --repeats 2 --json deployment.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import REPOSITORY_ROOT, git_commit, machine_info

APP_DIR = REPOSITORY_ROOT / "apps" / "secure_fedavg"

DEPLOYMENT_GRID = "deployment"
SIMULATION_GRID = "simulation"

MODE_CONFIGS: dict[str, str] = {
    "plain": "secure-aggregation=false",
    "round-keys": "secure-aggregation=true secagg-key-lifetime=round",
    "run-keys": "secure-aggregation=true secagg-key-lifetime=run",
    "run-keys-verified": (
        "secure-aggregation=true secagg-key-lifetime=run verification=true"
    ),
    "round-keys-verified": (
        "secure-aggregation=true secagg-key-lifetime=round verification=true"
    ),
    "round-keys-pipelined": (
        "secure-aggregation=true secagg-key-lifetime=round verification=true "
        "verification-pipelined=true"
    ),
}
"""Run-config overrides of each mode."""


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool each mode's rounds 2 and later over repeats and compare with plain.

    Round 1 also starts the processes and, with run keys, registers the keys,
    so it is left out of the means.
    """
    pooled: dict[str, list[float]] = {}
    for run in runs:
        pooled.setdefault(run["mode"], []).extend(run["round_seconds"][1:])

    means = {mode: statistics.fmean(values) for mode, values in pooled.items()}
    summary: dict[str, Any] = {"later_round_mean_s": means}
    plain = means.get("plain")
    if plain:
        summary["ratio_to_plain"] = {
            mode: mean / plain for mode, mean in means.items() if mode != "plain"
        }
    return summary


def run_mode(
    mode: str,
    *,
    credentials: Path,
    work_dir: Path,
    rounds: int,
    nodes: int,
    timeout: float,
    extra_config: str = "",
    grid: str = DEPLOYMENT_GRID,
) -> dict[str, Any]:
    """Run the app once in ``mode`` and return its per-round seconds."""
    run_config = (
        f"num-server-rounds={rounds} min-train-clients={nodes} "
        f"{MODE_CONFIGS[mode]} {extra_config}"
    ).strip()
    if grid == SIMULATION_GRID:
        command = launch_command(
            run_config, work_dir=work_dir, nodes=nodes, timeout=timeout
        )
    else:
        command = deployment_command(
            run_config,
            credentials=credentials,
            work_dir=work_dir,
            nodes=nodes,
            timeout=timeout,
        )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completed = subprocess.run(
        command, cwd=REPOSITORY_ROOT, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"Mode {mode!r} failed with exit code {completed.returncode}. Its log "
            f"ends with:\n{(completed.stdout + completed.stderr)[-3000:]}"
        )

    results_path = next(work_dir.glob("**/results.json"))
    results = json.loads(results_path.read_text(encoding="utf-8"))
    return {
        "mode": mode,
        "run_config": run_config,
        "round_seconds": [entry["seconds"] for entry in results["rounds"]],
        "accuracy": [entry["accuracy"] for entry in results["rounds"]],
        "timings": [entry.get("timings", {}) for entry in results["rounds"]],
        "wall_s": wall,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def deployment_command(
    run_config: str, *, credentials: Path, work_dir: Path, nodes: int, timeout: float
) -> list[str]:
    """Return the command that runs the app on a local SuperLink and SuperNodes."""
    return [
        sys.executable,
        "-m",
        "fedsec_flwr.deploy",
        "run-local",
        "--credentials",
        str(credentials),
        "--app",
        str(APP_DIR),
        "--work-dir",
        str(work_dir),
        "--nodes",
        str(nodes),
        "--timeout",
        str(timeout),
        "-c",
        run_config,
    ]


def launch_command(
    run_config: str, *, work_dir: Path, nodes: int, timeout: float
) -> list[str]:
    """Return the command that runs the app on Flower's simulation engine."""
    return [
        sys.executable,
        "-m",
        "fedsec_flwr.launch",
        str(APP_DIR),
        "--run-config",
        run_config,
        "--num-supernodes",
        str(nodes),
        "--output-dir",
        str(work_dir),
        "--timeout",
        str(timeout),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.deployment", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--modes", default=",".join(MODE_CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--grid",
        choices=(DEPLOYMENT_GRID, SIMULATION_GRID),
        default=DEPLOYMENT_GRID,
        help="SuperLink and SuperNode processes, or the simulation engine.",
    )
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--run-config",
        default="",
        help="Extra run-config overrides for every mode, e.g. 'dataset=\"digits\"'.",
    )
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODE_CONFIGS))
    if unknown:
        raise SystemExit(
            f"--modes must name modes among {', '.join(MODE_CONFIGS)}. "
            f"Found {', '.join(unknown)}."
        )
    if args.rounds < 2:
        raise SystemExit(f"--rounds must be at least 2. Found {args.rounds}.")

    runs = []
    with tempfile.TemporaryDirectory(prefix="fedsec-deploy-bench-") as folder:
        base = Path(folder)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fedsec_flwr.deploy",
                "credentials",
                "--out",
                str(base / "credentials"),
                "--nodes",
                str(args.nodes),
                "--host",
                "127.0.0.1",
            ],
            cwd=REPOSITORY_ROOT,
            check=True,
            capture_output=True,
        )
        for repeat in range(args.repeats):
            for mode in modes:
                run = run_mode(
                    mode,
                    credentials=base / "credentials",
                    work_dir=base / f"{mode}-{repeat}",
                    rounds=args.rounds,
                    nodes=args.nodes,
                    timeout=args.timeout,
                    extra_config=args.run_config,
                    grid=args.grid,
                )
                runs.append(run)
                rounded = ", ".join(f"{s:.1f}" for s in run["round_seconds"])
                print(
                    f"[deployment] repeat {repeat + 1} {mode}: rounds {rounded} s, "
                    f"load {run['load_average_before']:.2f}",
                    flush=True,
                )

    summary = summarize(runs)
    for mode, mean in summary["later_round_mean_s"].items():
        ratio = summary.get("ratio_to_plain", {}).get(mode)
        suffix = f" ({ratio:.2f}x plain)" if ratio is not None else ""
        print(f"[deployment] {mode}: {mean:.2f} s per later round{suffix}")

    if args.json is not None:
        document = {
            "machine": machine_info(),
            **git_commit(),
            "grid": args.grid,
            "nodes": args.nodes,
            "run_config": args.run_config,
            "rounds": args.rounds,
            "runs": runs,
            "summary": summary,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
