"""Per-round cost of fedsec_flwr's secure aggregation next to plain FedAvg and Flower.

Run from the repository root::

    python -m benchmarks.overhead --params 2000000 --clients 10 --rounds 3 \
        --json overhead.json

One invocation runs up to three simulations in this process with
``flwr.simulation.run_simulation``, each with the same model and clients
(``--protocols`` picks a subset, all three by default):

1. ``plain``: ``SecureFedAvg(secure_aggregation=None)``, a Message-API
   ServerApp and ClientApp.
2. ``fedsec``: ``SecureFedAvg`` with a ``SecAggConfig`` and the ClientApp
   wrapped in ``secure_aggregation_mod``.
3. ``flower_secaggplus``: Flower's ``SecAggPlusWorkflow`` inside
   ``DefaultWorkflow`` with the legacy ``FedAvg`` strategy, and a
   ``NumPyClient`` wrapped in Flower's ``secaggplus_mod``.

No client trains. Each returns the model it received shifted by a constant
that depends on its partition id, so the measured time is that of the
exchanges, the masking and the aggregation.

Timing: the first round of each simulation also waits for Ray to start its
actors, so it is reported on its own (``*_first_round_s``), and
``*_s_per_round`` is the mean of rounds 2 and later. A round lasts from
sampling the clients to the new global model: ``RoundReport.seconds`` for
fedsec and plain, and from ``configure_fit`` to the end of ``aggregate_fit``
for Flower.

Upload: a ClientApp mod of this module, outermost on every client, logs the
payload bytes of each train reply (see ``payload_bytes``). For fedsec and
plain this cross-checks the ``upload_bytes`` of ``RoundReport``, which counts
the same way.

Memory: while each simulation runs, ``benchmarks.memory.MemorySampler``
records the peak resident memory of this process (server, SuperLink state)
and the peak summed over its descendants (Ray's processes, which run the
clients), every 0.2 s. ``*_memory`` in the JSON contains those peaks in bytes,
and ``*_load_average`` the load average before and after the simulation.
``fedsec_stage_seconds`` lists the ``RoundReport.timings`` of each round:
the seconds of each protocol stage (plain rounds report none).

The script also times mask generation on one core: ``expand_mask`` for
``--params`` values against one raw ChaCha20 call over 4 bytes per value, and
Flower's ``pseudo_rand_gen``, which fills an int64 array from NumPy's
Mersenne Twister.
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
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.app.typing import ConfigRecordValues
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation
from numpy.typing import NDArray

from benchmarks.common import git_commit, machine_info
from benchmarks.memory import MemorySampler
from fedsec_flwr import (
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    secure_aggregation_mod,
)
from fedsec_flwr.core.graph import (
    default_num_neighbours,
    default_threshold,
    neighbour_graph,
)
from fedsec_flwr.core.masks import expand_mask

PLAIN = "plain"
FEDSEC = "fedsec"
FLOWER = "flower_secaggplus"
# Names that --protocols accepts, in the order the simulations run.
PROTOCOL_OPTIONS = {"plain": PLAIN, "fedsec": FEDSEC, "flower": FLOWER}
KEY_LIFETIMES = ("round", "run")

MIN_PARAMS = 16
MIN_CLIENTS = 3
MIN_ROUNDS = 2

# The model is four float32 arrays: these fractions of the parameters, then
# the rest.
ARRAY_FRACTIONS = (0.5, 0.25, 0.125)
MODEL_SEED = 20250101
INITIAL_VALUE_RANGE = 0.5

# Client i returns the received model plus SHIFT_PER_PARTITION * (i + 1).
SHIFT_PER_PARTITION = 1e-3
NUM_EXAMPLES = 100

# Encoding settings shared by fedsec and Flower. fedsec clips updates, which
# are at most 0.01. Flower clips the parameters times num_examples / max_weight
# (0.1), which stay far below 1. So neither protocol clips anything.
CLIP_RANGE = 1.0
MAX_WEIGHT = 1000

# Each client runs in a Ray actor with one CPU, so on a 2-core machine two
# clients run at a time.
BACKEND_CONFIG: dict[str, dict[str, ConfigRecordValues]] = {
    "client_resources": {"num_cpus": 1}
}

MASK_REPEATS = 5
MASK_SEED = bytes(range(32))
MASK_CONTEXT = b"benchmarks.overhead"
CHACHA20_NONCE = bytes(16)
UINT32_BYTES = 4
INT64_BYTES = 8
MASK_MODULUS = 2**32

SCALAR_VALUE_BYTES = 8
MIB = 1024**2
PARTITION_ID_KEY = "partition-id"
UPLOAD_LOG_SUFFIX = ".jsonl"

_started = time.perf_counter()


def progress(text: str) -> None:
    """Print a progress line with the seconds since the script started."""
    print(f"[overhead {time.perf_counter() - _started:7.1f} s] {text}", flush=True)


# --- Model and client update ---------------------------------------------------


def initial_model(params: int) -> dict[str, NDArray[np.float32]]:
    """Build the deterministic float32 model of ``params`` parameters."""
    sizes = [int(params * fraction) for fraction in ARRAY_FRACTIONS]
    sizes.append(params - sum(sizes))
    rng = np.random.default_rng(MODEL_SEED)
    return {
        f"layer{index}": rng.uniform(
            -INITIAL_VALUE_RANGE, INITIAL_VALUE_RANGE, size
        ).astype(np.float32)
        for index, size in enumerate(sizes)
    }


def client_shift(partition_id: int) -> np.float32:
    """Return the constant that client ``partition_id`` adds to every parameter."""
    return np.float32(SHIFT_PER_PARTITION * (partition_id + 1))


def shift_train(msg: Message, context: Context) -> Message:
    """Reply with the received arrays shifted by this client's constant."""
    shift = client_shift(int(context.node_config[PARTITION_ID_KEY]))
    received = msg.content.array_records["arrays"]
    arrays = ArrayRecord(
        {key: Array(array.numpy() + shift) for key, array in received.items()}
    )
    metrics = MetricRecord({"num-examples": NUM_EXAMPLES})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class ShiftClient(NumPyClient):
    """Legacy client that returns the received parameters shifted by a constant."""

    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id

    def fit(
        self, parameters: list[NDArray[np.float32]], config: dict[str, Scalar]
    ) -> tuple[list[NDArray[np.float32]], int, dict[str, Scalar]]:
        """Return the shifted parameters and the fixed number of examples."""
        shift = client_shift(self.partition_id)
        return [array + shift for array in parameters], NUM_EXAMPLES, {}


def shift_client_fn(context: Context) -> Client:
    """Build the legacy client of this node's partition."""
    return ShiftClient(int(context.node_config[PARTITION_ID_KEY])).to_client()


# --- Upload measurement --------------------------------------------------------


def payload_bytes(content: RecordDict) -> int:
    """Count the payload bytes of a message's records.

    Record names and keys count their UTF-8 length, array data the serialized
    bytes of each ``Array``, string and bytes values their length, and any
    other value 8 bytes. Protobuf framing is not counted.
    """
    total = 0
    for name, record in content.items():
        total += len(name.encode())
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                total += len(key.encode()) + len(array.data)
            continue
        for key, value in record.items():
            total += len(key.encode())
            items = value if isinstance(value, list) else [value]
            total += sum(_value_bytes(item) for item in items)
    return total


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return SCALAR_VALUE_BYTES


@dataclass(frozen=True)
class UploadMeter:
    """ClientApp mod that logs the payload bytes of every train reply.

    Clients run in Ray worker processes, so each process appends one JSON
    line per reply to its own file in ``directory``.
    """

    directory: str

    def __call__(
        self, msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Pass the message on and log the size of the reply."""
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and reply.has_content():
            entry = {
                "node": msg.metadata.dst_node_id,
                "round": msg.metadata.group_id,
                "bytes": payload_bytes(reply.content),
            }
            path = Path(self.directory) / f"{os.getpid()}{UPLOAD_LOG_SUFFIX}"
            with path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")
        return reply


def read_upload_log(directory: Path) -> dict[tuple[int, str], int]:
    """Sum the logged reply bytes per (node id, round)."""
    totals: dict[tuple[int, str], int] = defaultdict(int)
    for path in sorted(directory.glob(f"*{UPLOAD_LOG_SUFFIX}")):
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            totals[(int(entry["node"]), str(entry["round"]))] += int(entry["bytes"])
    return dict(totals)


# --- Server apps ---------------------------------------------------------------


@dataclass
class SimulationRecord:
    """Measurements that the ServerApp of one simulation stores for the caller."""

    round_seconds: list[float] = field(default_factory=list)
    reported_upload_bytes: list[dict[int, int]] = field(default_factory=list)
    stage_seconds: list[dict[str, float]] = field(default_factory=list)
    final_model: NDArray[np.float32] | None = None

    def add_report(self, report: RoundReport) -> None:
        """Store the time, stage times and upload of a ``SecureFedAvg`` round."""
        self.round_seconds.append(report.seconds)
        self.reported_upload_bytes.append(dict(report.upload_bytes))
        self.stage_seconds.append(dict(report.timings))


def flatten(arrays: Sequence[NDArray[np.float32]]) -> NDArray[np.float32]:
    """Concatenate arrays into one float32 vector, in order."""
    return np.concatenate([np.ravel(a) for a in arrays]).astype(np.float32)


def fedsec_server_app(
    model: dict[str, NDArray[np.float32]],
    *,
    clients: int,
    rounds: int,
    config: SecAggConfig | None,
    record: SimulationRecord,
) -> ServerApp:
    """Build the ServerApp that runs ``SecureFedAvg`` over all clients."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = SecureFedAvg(
            secure_aggregation=config,
            fraction_train=1.0,
            min_train_nodes=clients,
            min_available_nodes=clients,
            on_round_end=record.add_report,
        )
        initial = ArrayRecord({key: Array(value) for key, value in model.items()})
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
        record.final_model = flatten(
            [array.numpy() for array in result.arrays.values()]
        )

    return app


def fedsec_client_app(meter: UploadMeter, *, secure: bool) -> ClientApp:
    """Build the Message-API ClientApp, with ``secure_aggregation_mod`` if secure."""
    app = ClientApp(mods=[meter])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if secure:
            return secure_aggregation_mod(msg, context, shift_train)
        return shift_train(msg, context)

    return app


class TimedFedAvg(FedAvg):
    """Legacy FedAvg that records the time of each fit round and the last model.

    Flower's SecAgg+ workflow calls ``configure_fit`` at the start of its setup
    stage and ``aggregate_fit`` at the end of its unmask stage.
    """

    def __init__(
        self,
        record: SimulationRecord,
        *,
        clients: int,
        initial_parameters: Parameters,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
            initial_parameters=initial_parameters,
        )
        self.record = record
        self._round_started = 0.0

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Start the round's clock and sample the clients."""
        self._round_started = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate, then stop the round's clock and keep the model."""
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.record.round_seconds.append(time.perf_counter() - self._round_started)
        if parameters is not None:
            self.record.final_model = flatten(parameters_to_ndarrays(parameters))
        return parameters, metrics


@dataclass(frozen=True)
class FlowerShares:
    """Neighbourhood settings of Flower's workflow, chosen to match fedsec's."""

    num_shares: int
    reconstruction_threshold: int


def flower_shares(clients: int) -> FlowerShares:
    """Choose Flower's ``num_shares`` and threshold next to fedsec's defaults.

    fedsec gives each client ``ceil(log2 n) + 1`` neighbours by default.
    Flower's ring gives each client ``num_shares - 1`` neighbours, an even
    number, and counts the client itself among the ``num_shares`` holders.
    This takes the largest even neighbour count not above fedsec's (at least
    2), so Flower never masks with more neighbours than fedsec, and a strict
    majority of the holders as threshold, as fedsec does.
    """
    degree = default_num_neighbours(clients)
    num_shares = max(2, degree - degree % 2) + 1
    return FlowerShares(
        num_shares=num_shares, reconstruction_threshold=num_shares // 2 + 1
    )


def flower_server_app(
    model: dict[str, NDArray[np.float32]],
    *,
    clients: int,
    rounds: int,
    shares: FlowerShares,
    record: SimulationRecord,
) -> ServerApp:
    """Build the legacy ServerApp that runs Flower's SecAgg+ workflow."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            record,
            clients=clients,
            initial_parameters=ndarrays_to_parameters(list(model.values())),
        )
        legacy_context = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=rounds),
            strategy=strategy,
        )
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=shares.num_shares,
                reconstruction_threshold=shares.reconstruction_threshold,
                max_weight=MAX_WEIGHT,
                clipping_range=CLIP_RANGE,
            )
        )
        workflow(grid, legacy_context)

    return app


def flower_client_app(meter: UploadMeter) -> ClientApp:
    """Build the legacy ClientApp wrapped in Flower's ``secaggplus_mod``."""
    return ClientApp(client_fn=shift_client_fn, mods=[meter, secaggplus_mod])


# --- Running and summarizing ---------------------------------------------------


@dataclass
class Measurement:
    """Times and uploads of one simulation."""

    round_seconds: list[float]
    wall_seconds: float
    measured_upload_bytes: float
    reported_upload_bytes: float | None
    final_model: NDArray[np.float32]
    stage_seconds: list[dict[str, float]]
    memory: dict[str, object]
    load_average: dict[str, list[float]]

    @property
    def first_round_seconds(self) -> float:
        """Duration of round 1, which includes the start of the Ray actors."""
        return self.round_seconds[0]

    @property
    def seconds_per_round(self) -> float:
        """Mean duration of rounds 2 and later."""
        return float(np.mean(self.round_seconds[1:]))


def simulate(
    name: str,
    *,
    clients: int,
    rounds: int,
    build_server: Callable[[SimulationRecord], ServerApp],
    build_client: Callable[[UploadMeter], ClientApp],
) -> Measurement:
    """Run one simulation and collect its times and uploads."""
    record = SimulationRecord()
    with tempfile.TemporaryDirectory(prefix=f"overhead-{name}-") as directory:
        meter = UploadMeter(directory)
        progress(f"{name}: starting {clients} clients, {rounds} rounds")
        load_before = list(os.getloadavg())
        started = time.perf_counter()
        with MemorySampler() as sampler:
            run_simulation(
                server_app=build_server(record),
                client_app=build_client(meter),
                num_supernodes=clients,
                backend_config=BACKEND_CONFIG,
            )
        wall_seconds = time.perf_counter() - started
        load_after = list(os.getloadavg())
        uploads = read_upload_log(Path(directory))

    if len(record.round_seconds) != rounds or record.final_model is None:
        raise RuntimeError(
            f"The {name} simulation completed {len(record.round_seconds)} of "
            f"{rounds} rounds. Check the Flower errors logged above."
        )
    if len(uploads) != clients * rounds:
        raise RuntimeError(
            f"The {name} simulation logged uploads for {len(uploads)} "
            f"(client, round) pairs. Expected {clients * rounds}."
        )
    reported = None
    if record.reported_upload_bytes:
        reported = float(
            np.mean([n for r in record.reported_upload_bytes for n in r.values()])
        )
    measurement = Measurement(
        round_seconds=record.round_seconds,
        wall_seconds=wall_seconds,
        measured_upload_bytes=float(np.mean(list(uploads.values()))),
        reported_upload_bytes=reported,
        final_model=record.final_model,
        stage_seconds=record.stage_seconds,
        memory=sampler.peaks.as_dict(),
        load_average={"start": load_before, "end": load_after},
    )
    progress(
        f"{name}: rounds {_format_seconds(record.round_seconds)} s, "
        f"{measurement.measured_upload_bytes:,.0f} upload bytes per client "
        f"per round, {wall_seconds:.1f} s in all, peak RSS "
        f"{sampler.peaks.main_peak_rss_bytes / MIB:,.0f} MiB here and "
        f"{sampler.peaks.descendants_peak_rss_bytes / MIB:,.0f} MiB summed over "
        f"{sampler.peaks.descendants_max_processes} child processes"
    )
    return measurement


def _format_seconds(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _best_seconds(function: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def measure_mask_generation(num_values: int) -> dict[str, float]:
    """Time mask generation for ``num_values`` values, best of several runs.

    ``expand_mask`` (HKDF, then ChaCha20 keystream as uint32) is compared with
    one raw ChaCha20 ``update_into`` call over ``4 * num_values`` zero bytes
    into a buffer allocated beforehand, and with Flower's ``pseudo_rand_gen``.
    """
    num_bytes = UINT32_BYTES * num_values
    zeros = bytes(num_bytes)
    output = bytearray(num_bytes)

    def raw_chacha20() -> None:
        cipher = Cipher(algorithms.ChaCha20(MASK_SEED, CHACHA20_NONCE), mode=None)
        cipher.encryptor().update_into(zeros, output)

    fedsec_seconds = _best_seconds(
        lambda: expand_mask(MASK_SEED, context=MASK_CONTEXT, length=num_values),
        MASK_REPEATS,
    )
    raw_seconds = _best_seconds(raw_chacha20, MASK_REPEATS)
    flower_seconds = _best_seconds(
        lambda: pseudo_rand_gen(MASK_SEED, MASK_MODULUS, [(num_values,)]),
        MASK_REPEATS,
    )
    return {
        "fedsec_expand_mask_s": fedsec_seconds,
        "raw_chacha20_s": raw_seconds,
        "flower_pseudo_rand_gen_s": flower_seconds,
        "fedsec_expand_mask_mb_per_s": num_bytes / fedsec_seconds / 1e6,
        "raw_chacha20_mb_per_s": num_bytes / raw_seconds / 1e6,
        "flower_pseudo_rand_gen_mb_per_s": (
            INT64_BYTES * num_values / flower_seconds / 1e6
        ),
        "expand_mask_time_over_raw_chacha20": fedsec_seconds / raw_seconds,
    }


def fedsec_protocol_settings(clients: int) -> dict[str, int]:
    """Return the neighbour count and threshold fedsec's defaults give ``clients``."""
    node_ids = list(range(clients))
    graph = neighbour_graph(
        node_ids,
        num_neighbours=default_num_neighbours(clients),
        rng=random.Random(0),
    )
    degree = min(len(neighbours) for neighbours in graph.values())
    return {"num_neighbours": degree, "threshold": default_threshold(degree)}


def _overhead_ratio(plain: float, fedsec: float, flower: float) -> float | None:
    flower_overhead = flower - plain
    if flower_overhead <= 0:
        return None
    return (fedsec - plain) / flower_overhead


def _max_abs_difference(
    model: NDArray[np.float32], reference: NDArray[np.float32]
) -> float:
    return float(
        np.max(np.abs(model.astype(np.float64) - reference.astype(np.float64)))
    )


def summarize(
    args: argparse.Namespace,
    *,
    results: dict[str, Measurement],
    config: SecAggConfig,
    shares: FlowerShares,
    masks: dict[str, float],
) -> dict[str, object]:
    """Collect the measurements and the run's settings into one JSON object.

    Keys of a protocol that did not run are left out. ``overhead_ratio`` is
    None unless all three ran, and the model differences need ``plain``.
    """
    summary: dict[str, object] = {
        "params": args.params,
        "clients": args.clients,
        "rounds": args.rounds,
        "protocols": list(results),
        "machine": machine_info(),
        **git_commit(),
        "timing": (
            "s_per_round is the mean of rounds 2 and later; first_round_s "
            "includes the start of the Ray actors"
        ),
        "memory": (
            "bytes; main is this process (ServerApp, SuperLink state), "
            "descendants the sum over Ray's processes, which run the clients; "
            "see benchmarks/memory.py"
        ),
    }
    for name, measurement in results.items():
        summary[f"{name}_s_per_round"] = measurement.seconds_per_round
        summary[f"{name}_first_round_s"] = measurement.first_round_seconds
        summary[f"{name}_round_seconds"] = measurement.round_seconds
        summary[f"{name}_simulation_wall_s"] = measurement.wall_seconds
        summary[f"{name}_measured_upload_bytes_per_client"] = (
            measurement.measured_upload_bytes
        )
        if any(measurement.stage_seconds):
            summary[f"{name}_stage_seconds"] = measurement.stage_seconds
        summary[f"{name}_memory"] = measurement.memory
        summary[f"{name}_load_average"] = measurement.load_average

    # RoundReport counts the upload of plain and fedsec, the mod that of Flower.
    for name, prefix in ((PLAIN, "plain"), (FEDSEC, "fedsec"), (FLOWER, "flower")):
        if name not in results:
            continue
        measurement = results[name]
        upload = (
            measurement.measured_upload_bytes
            if name == FLOWER
            else measurement.reported_upload_bytes
        )
        summary[f"{prefix}_upload_bytes_per_client"] = upload
        summary[f"{prefix}_upload_bytes_per_coordinate"] = _per_coordinate(
            upload, args.params
        )

    summary["overhead_ratio"] = None
    if all(name in results for name in (PLAIN, FEDSEC, FLOWER)):
        summary["overhead_ratio"] = _overhead_ratio(
            results[PLAIN].seconds_per_round,
            results[FEDSEC].seconds_per_round,
            results[FLOWER].seconds_per_round,
        )
    if PLAIN in results:
        for name, prefix in ((FEDSEC, "fedsec"), (FLOWER, "flower")):
            if name in results:
                summary[f"{prefix}_max_abs_diff_from_plain"] = _max_abs_difference(
                    results[name].final_model, results[PLAIN].final_model
                )

    if FEDSEC in results:
        summary["fedsec_settings"] = {
            "clip_range": config.clip_range,
            "max_weight": config.max_weight,
            "max_clients": config.max_clients,
            "quantization_levels": config.encoding().quantization_levels,
            # None where this fedsec_flwr's SecAggConfig has no such field.
            "key_lifetime": getattr(config, "key_lifetime", None),
            **fedsec_protocol_settings(args.clients),
        }
    if FLOWER in results:
        summary["flower_settings"] = {
            "num_shares": shares.num_shares,
            "reconstruction_threshold": shares.reconstruction_threshold,
            "clipping_range": CLIP_RANGE,
            "max_weight": MAX_WEIGHT,
        }
    summary["mask_generation"] = {"values": args.params, **masks}
    return summary


def _per_coordinate(upload_bytes: float | None, params: int) -> float | None:
    return None if upload_bytes is None else upload_bytes / params


def fedsec_config(clients: int, *, key_lifetime: str | None) -> SecAggConfig:
    """Build fedsec's config for ``clients`` clients.

    ``key_lifetime`` is passed to ``SecAggConfig`` only when it is not None,
    so without ``--key-lifetime`` the config takes the package's default.

    Raises:
        RuntimeError: If ``key_lifetime`` is given but ``SecAggConfig`` has no
            such field in this version of fedsec_flwr.
    """
    options: dict[str, Any] = {}
    if key_lifetime is not None:
        options["key_lifetime"] = key_lifetime
    try:
        return SecAggConfig(
            clip_range=CLIP_RANGE,
            max_weight=MAX_WEIGHT,
            max_clients=clients,
            **options,
        )
    except TypeError as error:
        if "key_lifetime" not in str(error):
            raise
        raise RuntimeError(
            "--key-lifetime needs a SecAggConfig with a key_lifetime field, "
            f"which this fedsec_flwr lacks ({error}). Run without the option."
        ) from error


ServerBuilder = Callable[[SimulationRecord], ServerApp]
ClientBuilder = Callable[[UploadMeter], ClientApp]


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Run the chosen simulations and the mask timing, and summarize them."""
    load_start = list(os.getloadavg())
    model = initial_model(args.params)
    config = fedsec_config(args.clients, key_lifetime=args.key_lifetime)
    shares = flower_shares(args.clients)
    common = {"clients": args.clients, "rounds": args.rounds}
    builders: dict[str, tuple[ServerBuilder, ClientBuilder]] = {
        PLAIN: (
            lambda record: fedsec_server_app(
                model, **common, config=None, record=record
            ),
            lambda meter: fedsec_client_app(meter, secure=False),
        ),
        FEDSEC: (
            lambda record: fedsec_server_app(
                model, **common, config=config, record=record
            ),
            lambda meter: fedsec_client_app(meter, secure=True),
        ),
        FLOWER: (
            lambda record: flower_server_app(
                model, **common, shares=shares, record=record
            ),
            flower_client_app,
        ),
    }

    progress(
        f"{args.params:,} parameters, {args.clients} clients, {args.rounds} "
        f"rounds, protocols {', '.join(args.protocols)}"
    )
    results: dict[str, Measurement] = {}
    for name in args.protocols:
        build_server, build_client = builders[name]
        results[name] = simulate(
            name, **common, build_server=build_server, build_client=build_client
        )

    progress(f"timing mask generation for {args.params:,} values")
    masks = measure_mask_generation(args.params)
    summary = summarize(
        args, results=results, config=config, shares=shares, masks=masks
    )
    summary["load_average_start"] = load_start
    summary["load_average_end"] = list(os.getloadavg())
    _print_summary(results, summary)
    return summary


def _print_summary(results: dict[str, Measurement], summary: dict[str, object]) -> None:
    for name, measurement in results.items():
        progress(
            f"{name}: {measurement.seconds_per_round:.3f} s per round (first round "
            f"{measurement.first_round_seconds:.3f} s), "
            f"{measurement.measured_upload_bytes:,.0f} upload bytes per client "
            "per round"
        )
    if summary["overhead_ratio"] is not None:
        progress(
            "overhead ratio (fedsec - plain) / (flower - plain): "
            f"{summary['overhead_ratio']}"
        )
    progress(f"mask generation: {summary['mask_generation']}")


def parse_protocols(text: str) -> list[str]:
    """Parse a comma list such as ``plain,fedsec`` into protocol names.

    Returns:
        The chosen protocols' result names, in the order of
        ``PROTOCOL_OPTIONS`` whatever the order given.

    Raises:
        argparse.ArgumentTypeError: If the list is empty or names an unknown
            protocol.
    """
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - PROTOCOL_OPTIONS.keys())
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown protocol(s) {', '.join(unknown)}. "
            f"Choose from {','.join(PROTOCOL_OPTIONS)}."
        )
    if not chosen:
        raise argparse.ArgumentTypeError(
            f"no protocol given. Choose from {','.join(PROTOCOL_OPTIONS)}."
        )
    return [name for option, name in PROTOCOL_OPTIONS.items() if option in chosen]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--params", type=int, required=True, help="float32 parameters of the model"
    )
    parser.add_argument(
        "--clients", type=int, required=True, help="simulated clients, all sampled"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per simulation (default 3)"
    )
    parser.add_argument(
        "--json", type=Path, required=True, help="file to write the results to"
    )
    parser.add_argument(
        "--protocols",
        type=parse_protocols,
        default=list(PROTOCOL_OPTIONS.values()),
        help=(
            "comma-separated simulations to run, from "
            f"{','.join(PROTOCOL_OPTIONS)} (default all); they run in that order"
        ),
    )
    parser.add_argument(
        "--key-lifetime",
        choices=KEY_LIFETIMES,
        default=None,
        help=(
            "pass key_lifetime to fedsec's SecAggConfig "
            "(default: pass nothing, so the package default applies)"
        ),
    )
    args = parser.parse_args(argv)
    for name, minimum in (
        ("params", MIN_PARAMS),
        ("clients", MIN_CLIENTS),
        ("rounds", MIN_ROUNDS),
    ):
        value = getattr(args, name)
        if value < minimum:
            parser.error(f"--{name} must be at least {minimum}. Found {value}.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its JSON result."""
    args = parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        summary = run_benchmark(args)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
