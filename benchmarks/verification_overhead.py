"""Per-round cost of aggregate verification in fedsec_flwr's secure rounds.

Run from the repository root::

    python -m benchmarks.verification_overhead --params 2000000 --clients 10 \
        --rounds 4 --json verification.json

For the given model size it runs ``SecureFedAvg`` with secure aggregation,
without and then with ``verification=True``, twice each:

1. through the loopback Grid of ``tests/loopback.py``, which runs the
   clients one after the other in this process and serializes every message
   and Context through protobuf;
2. through ``flwr.simulation.run_simulation``, with the model, clients and
   runner of ``benchmarks.overhead``.

A round lasts from sampling to the new global model (``RoundReport.seconds``);
``*_s_per_round`` is the mean of rounds 2 and later. With ``--pipelined``,
each round carries the previous round's commit and verify stages and the
last round also runs its own, so the mean covers rounds 2 to R - 1 instead.
The script also times each exchange of a round and the server's audit, by
wrapping the round helpers of ``fedsec_flwr.rounds`` in this process, which
is the process that runs the ServerApp in both modes.
"""

from __future__ import annotations

import os

# Flower reads its telemetry switch when first imported, and Ray workers
# inherit the environment, so both are set before anything imports them.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import argparse
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from numpy.typing import NDArray

from benchmarks.common import git_commit, machine_info
from benchmarks.overhead import (
    CLIP_RANGE,
    MAX_WEIGHT,
    SimulationRecord,
    UploadMeter,
    initial_model,
    progress,
    shift_train,
    simulate,
)
from fedsec_flwr import RoundReport, SecAggConfig, SecureFedAvg, rounds
from fedsec_flwr.config import KEY_LIFETIME_ROUND, KEY_LIFETIMES
from fedsec_flwr.mod import secure_aggregation_mod
from fedsec_flwr.verification import ServerVerification, VerificationConfig
from tests.loopback import LoopbackGrid

SERVER_AUDIT = "server-audit"
FIRST_NODE_ID = 1000

Model = dict[str, NDArray[np.float32]]


class StageClock:
    """Seconds of each exchange and of the server's audit, per round."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def install(self) -> None:
        """Wrap ``_Stages.send`` and ``ServerVerification.finish`` with timers."""
        send = rounds._Stages.send
        finish = ServerVerification.finish
        clock = self

        def timed_send(stages: Any, stage: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return send(stages, stage, *args, **kwargs)
            finally:
                clock.seconds[stage.value].append(time.perf_counter() - started)

        def timed_finish(verifier: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return finish(verifier, *args, **kwargs)
            finally:
                clock.seconds[SERVER_AUDIT].append(time.perf_counter() - started)

        rounds._Stages.send = timed_send  # type: ignore[method-assign]
        ServerVerification.finish = timed_finish  # type: ignore[method-assign]

    def means_after_first_round(self, num_rounds: int) -> dict[str, float]:
        """Mean seconds of each part over rounds 2 and later."""
        return {
            name: float(np.mean(values[len(values) // num_rounds :]))
            for name, values in self.seconds.items()
        }


def build_strategy(
    config: SecAggConfig,
    clients: int,
    verification: VerificationConfig | bool,
    on_round_end: Callable[[RoundReport], None],
) -> SecureFedAvg:
    return SecureFedAvg(
        secure_aggregation=config,
        fraction_train=1.0,
        min_train_nodes=clients,
        min_available_nodes=clients,
        on_round_end=on_round_end,
        verification=verification,
    )


def secure_client_app(meter: UploadMeter | None = None) -> ClientApp:
    app = ClientApp(mods=[meter] if meter is not None else [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return secure_aggregation_mod(msg, context, shift_train)

    return app


def run_loopback(
    model: Model,
    config: SecAggConfig,
    *,
    clients: int,
    rounds_: int,
    verify: VerificationConfig | bool,
) -> list[float]:
    grid = LoopbackGrid(
        secure_client_app(), [FIRST_NODE_ID + i for i in range(clients)]
    )
    reports: list[RoundReport] = []
    initial = ArrayRecord({key: Array(value) for key, value in model.items()})
    build_strategy(config, clients, verify, reports.append).start(
        grid=grid, initial_arrays=initial, num_rounds=rounds_
    )
    return [report.seconds for report in reports]


def verified_server_app(
    model: Model,
    config: SecAggConfig,
    *,
    clients: int,
    rounds_: int,
    verify: VerificationConfig | bool,
    record: SimulationRecord,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = build_strategy(config, clients, verify, record.add_report)
        initial = ArrayRecord({key: Array(value) for key, value in model.items()})
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds_)
        record.final_model = np.concatenate(
            [array.numpy().ravel() for array in result.arrays.values()]
        )

    return app


def mean_after_first(values: Sequence[float], *, pipelined: bool = False) -> float:
    """Return the mean of rounds 2 and later, or of rounds 2 to R - 1 if pipelined.

    A pipelined round carries the previous round's verification, and the
    last round also its own, so the steady state leaves out the last round.
    """
    return float(np.mean(values[1:-1] if pipelined else values[1:]))


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Run the four measurements and collect them with the run's settings."""
    clock = StageClock()
    clock.install()
    model = initial_model(args.params)
    config = SecAggConfig(
        clip_range=CLIP_RANGE,
        max_weight=MAX_WEIGHT,
        max_clients=args.clients,
        key_lifetime=args.key_lifetime,
    )
    summary: dict[str, object] = {
        "params": args.params,
        "clients": args.clients,
        "rounds": args.rounds,
        "key_lifetime": args.key_lifetime,
        "pipelined": args.pipelined,
        "machine": machine_info(),
        **git_commit(),
        "load_average_before": os.getloadavg(),
    }
    verified: VerificationConfig | bool = True
    if args.pipelined:
        verified = VerificationConfig(pipelined=True)
    for verify in (False, verified):
        name = "verified" if verify else "secure"
        progress(f"loopback {name}: {args.params:,} parameters")
        clock.seconds.clear()
        seconds = run_loopback(
            model, config, clients=args.clients, rounds_=args.rounds, verify=verify
        )
        summary[f"loopback_{name}_round_seconds"] = seconds
        summary[f"loopback_{name}_s_per_round"] = mean_after_first(
            seconds, pipelined=args.pipelined
        )
        summary[f"loopback_{name}_stage_seconds"] = clock.means_after_first_round(
            args.rounds
        )

    for verify in (False, verified):
        name = "verified" if verify else "secure"
        clock.seconds.clear()
        measurement = simulate(
            f"simulation-{name}",
            clients=args.clients,
            rounds=args.rounds,
            build_server=lambda record, verify=verify: verified_server_app(
                model,
                config,
                clients=args.clients,
                rounds_=args.rounds,
                verify=verify,
                record=record,
            ),
            build_client=secure_client_app,
        )
        summary[f"simulation_{name}_round_seconds"] = measurement.round_seconds
        summary[f"simulation_{name}_s_per_round"] = mean_after_first(
            measurement.round_seconds, pipelined=args.pipelined
        )
        summary[f"simulation_{name}_stage_seconds"] = clock.means_after_first_round(
            args.rounds
        )
        summary[f"simulation_{name}_upload_bytes_per_client"] = (
            measurement.measured_upload_bytes
        )
    summary["load_average_after"] = os.getloadavg()
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.verification_overhead",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--params", type=int, required=True, help="float32 parameters of the model"
    )
    parser.add_argument(
        "--clients", type=int, default=10, help="simulated clients (default 10)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds per run, at least 2 (default 4)"
    )
    parser.add_argument(
        "--key-lifetime",
        choices=KEY_LIFETIMES,
        default=KEY_LIFETIME_ROUND,
        help="SecAggConfig.key_lifetime of both runs (default %(default)s)",
    )
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="verify with VerificationConfig(pipelined=True); needs --rounds >= 3",
    )
    parser.add_argument(
        "--json", type=Path, required=True, help="file to write the results to"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2. Found {args.rounds}.")
    if args.pipelined and args.rounds < 3:
        parser.error(f"--pipelined needs --rounds of at least 3. Found {args.rounds}.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its JSON result."""
    args = parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("fedsec_flwr").setLevel(logging.WARNING)
    try:
        summary = run_benchmark(args)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for key, value in summary.items():
        if key.endswith("_s_per_round"):
            progress(f"{key}: {value:.3f}")
    progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
