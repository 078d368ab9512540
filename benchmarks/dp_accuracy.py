"""Accuracy against privacy on Fashion-MNIST, at delta 1e-5.

Run from the repository root::

    python -m benchmarks.dp_accuracy --out outputs/dp-accuracy
    python -m benchmarks.dp_accuracy --quick --out outputs/dp-accuracy-quick
    python -m benchmarks.dp_accuracy --methods client-dp-central,client-dp-distributed \
        --out outputs/dp-accuracy-client-level
    python -m benchmarks.dp_accuracy --merge outputs/run1 outputs/run2 \
        --out outputs/dp-accuracy-merged

Eleven methods train the app's 25,810-parameter CNN, each without DP and at
target epsilons 8, 3 and 1:

- ``central-dp-sgd``: no federation. Opacus DP-SGD on the whole train split
  (Poisson batches of expected size 256, per-example clipping, Gaussian
  noise), calibrated with the RDP accountant of
  ``fedsec_flwr.dp.accounting``. Without DP, plain SGD with batch 64. This
  is the reference.
- ``federated-dp-sgd``: sample-level DP. Every client of the app trains with
  Opacus DP-SGD (``dp-sgd=true``) for 3 rounds of one local epoch with batch
  64, and the server adds the updates up with SecAgg+. The budget covers
  all rounds of one client's local training. ``federated-dp-sgd-tuned`` is
  the same with a larger DP-SGD step size, and both share one run without
  DP.
- ``federated-dp-sgd-20-rounds``: the same with 20 rounds and DP-SGD
  batches of expected size 256, the settings closest to the reference
  found in trials. It has its own run without DP.
  ``federated-dp-sgd-20-rounds-momentum`` is the same with server momentum
  0.5 (``server-momentum``), with and without DP, and its own run without
  DP. ``federated-dp-sgd-20-rounds-3-clients`` is the same federation with
  3 clients of 20,000 examples instead of 10 of 6,000.
- ``client-dp-central`` and ``client-dp-distributed``: client-level DP with
  Poisson client sampling and SecAgg+. The server adds Gaussian noise to the
  mean (central), or each client adds discrete Gaussian noise inside the
  secure sum (distributed). Both share one run without DP as baseline, and
  so does the next method. The
  clipping norm is the median norm of the client updates in the first half
  of the rounds of FedAvg without DP, replayed in this process before the
  runs. Update norms grow over these rounds, from about 0.17 in the first
  two to about 0.5 over ten in the full profile.
- ``client-dp-distributed-equal-noise``: distributed DP with the noise
  multiplier that central mode calibrates for the same target. Its
  accountant reports a higher epsilon than the target, so the point shows
  what distributed noise costs in accuracy apart from its accounting.
- ``client-dp-central-all-clients`` and
  ``client-dp-distributed-all-clients``: the two modes with all 400 clients
  in every round (fixed sampling at fraction 1), 5 rounds of 5 local
  epochs, and their own run without DP and clipping norm. Without client
  sampling the two accountants give about the same epsilon for the same
  noise multiplier. Under Poisson sampling, distributed mode's bound for
  subsampled sums of discrete Gaussians needs more noise than the sampled
  Gaussian's at small epsilons.

The epsilons of the two kinds are not comparable: sample-level epsilon
protects one training example, client-level epsilon one client's whole
partition.

Federated runs go through ``fedsec_flwr.launch``, one after another, and
keep their logs under ``<out>/runs``. The output folder receives
``dp_accuracy.json``, with every result, the machine, the commit, the
settings and the wall time of each configuration. The script rewrites it
after every configuration, so an interrupted run keeps what it measured.
At the end it writes ``dp_accuracy.png`` (accuracy against epsilon) and
``dp_accuracy.md`` (the results table). The exit status is 0 when every
configuration completed, 1 when one failed and 2 for invalid arguments.

Client-level runs draw their noise and their clients from cryptographic
generators, so no two runs are alike. ``--merge`` runs nothing: it reads
the ``dp_accuracy.json`` of several output folders and writes one table
with every run's accuracy and one plot of the mean, with a bar from the
lowest to the highest run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import REPOSITORY_ROOT, git_commit, machine_info
from fedsec_flwr.dp.accounting import noise_multiplier_for_target, rdp_epsilon_floor
from fedsec_flwr.launch import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    RESULTS_FILENAME,
    LaunchOptions,
    launch,
)

APP_DIR = REPOSITORY_ROOT / "apps" / "secure_fedavg"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app.data import (  # noqa: E402
    DatasetSplit,
    load_dataset,
    load_partition,
)
from secure_fedavg_app.models import build_model  # noqa: E402
from secure_fedavg_app.task import (  # noqa: E402
    derive_seed,
    evaluate,
    seed_everything,
    train,
)

DATASET = "fashion-mnist"
DELTA = 1e-5
FASHION_MNIST_TRAIN_EXAMPLES = 60_000
SEED = 42
PARTITIONING = "iid"
DIRICHLET_ALPHA = 0.5
"""Dirichlet concentration, which IID partitioning ignores (the app's default)."""

TORCH_THREADS = 1
"""Torch threads of the in-process training, as each simulated client uses."""

MAX_GRAD_NORM = 1.0
"""Per-example clipping norm C of DP-SGD, centralized and on the clients."""

GRAD_SAMPLE_MODE = "ew"
"""Opacus's per-example gradients through torch's ExpandedWeights.

It computes the same gradients as the hooks that the app's clients use.
One DP-SGD epoch over 6,000 examples (batch 64, one thread, Opacus 1.6)
took 2.7 s with it and 8.6 s with hooks, in one timing on the benchmark
machine.
"""

CLIPPING_NORM_DIGITS = 3
"""Decimal digits kept of the median update norm used as clipping norm."""

CLIENT_SAMPLES_HEADROOM = 6.0
"""Standard deviations above the expected clients per round that
``secagg-max-clients`` allows, because Poisson sampling may draw more."""

JSON_FILENAME = "dp_accuracy.json"
PLOT_FILENAME = "dp_accuracy.png"
TABLE_FILENAME = "dp_accuracy.md"
MERGED_JSON_FILENAME = "dp_accuracy_merged.json"
MERGED_PLOT_FILENAME = "dp_accuracy_merged.png"
MERGED_TABLE_FILENAME = "dp_accuracy_merged.md"
RUNS_DIRNAME = "runs"

EXIT_FAILED = 1
EXIT_USAGE = 2

CENTRAL_DP_SGD = "central-dp-sgd"
FEDERATED_DP_SGD = "federated-dp-sgd"
FEDERATED_DP_SGD_TUNED = "federated-dp-sgd-tuned"
FEDERATED_DP_SGD_LONG = "federated-dp-sgd-20-rounds"
FEDERATED_DP_SGD_MOMENTUM = "federated-dp-sgd-20-rounds-momentum"
FEDERATED_DP_SGD_THREE_CLIENTS = "federated-dp-sgd-20-rounds-3-clients"
CLIENT_DP_CENTRAL = "client-dp-central"
CLIENT_DP_DISTRIBUTED = "client-dp-distributed"
CLIENT_DP_DISTRIBUTED_EQUAL_NOISE = "client-dp-distributed-equal-noise"
CLIENT_DP_CENTRAL_ALL = "client-dp-central-all-clients"
CLIENT_DP_DISTRIBUTED_ALL = "client-dp-distributed-all-clients"
METHODS = (
    CENTRAL_DP_SGD,
    FEDERATED_DP_SGD,
    FEDERATED_DP_SGD_TUNED,
    FEDERATED_DP_SGD_LONG,
    FEDERATED_DP_SGD_MOMENTUM,
    FEDERATED_DP_SGD_THREE_CLIENTS,
    CLIENT_DP_CENTRAL,
    CLIENT_DP_DISTRIBUTED,
    CLIENT_DP_DISTRIBUTED_EQUAL_NOISE,
    CLIENT_DP_CENTRAL_ALL,
    CLIENT_DP_DISTRIBUTED_ALL,
)
DP_SGD_METHODS = (
    FEDERATED_DP_SGD,
    FEDERATED_DP_SGD_TUNED,
    FEDERATED_DP_SGD_LONG,
    FEDERATED_DP_SGD_MOMENTUM,
    FEDERATED_DP_SGD_THREE_CLIENTS,
)
METHOD_LABELS = {
    CENTRAL_DP_SGD: "DP-SGD, centralized (reference)",
    FEDERATED_DP_SGD: "DP-SGD on clients + SecAgg+, 3 rounds, step size 0.5",
    FEDERATED_DP_SGD_TUNED: "DP-SGD on clients + SecAgg+, 3 rounds, step size 2",
    FEDERATED_DP_SGD_LONG: "DP-SGD on clients + SecAgg+, 20 rounds, batch 256",
    FEDERATED_DP_SGD_MOMENTUM: (
        "DP-SGD on clients + SecAgg+, 20 rounds, batch 256, server momentum 0.5"
    ),
    FEDERATED_DP_SGD_THREE_CLIENTS: (
        "DP-SGD on 3 clients + SecAgg+, 20 rounds, batch 256"
    ),
    CLIENT_DP_CENTRAL: "client-level DP, central noise + SecAgg+",
    CLIENT_DP_DISTRIBUTED: "client-level DP, distributed noise + SecAgg+",
    CLIENT_DP_DISTRIBUTED_EQUAL_NOISE: (
        "distributed noise at central's noise multiplier (higher epsilon)"
    ),
    CLIENT_DP_CENTRAL_ALL: "client-level DP, central noise, all clients every round",
    CLIENT_DP_DISTRIBUTED_ALL: (
        "client-level DP, distributed noise, all clients every round"
    ),
}
CLIENT_LEVEL_MODES = {
    CLIENT_DP_CENTRAL: "central",
    CLIENT_DP_DISTRIBUTED: "distributed",
    CLIENT_DP_DISTRIBUTED_EQUAL_NOISE: "distributed",
    CLIENT_DP_CENTRAL_ALL: "central",
    CLIENT_DP_DISTRIBUTED_ALL: "distributed",
}
ALL_CLIENTS_METHODS = (CLIENT_DP_CENTRAL_ALL, CLIENT_DP_DISTRIBUTED_ALL)
"""Client-level methods in which every client takes part in every round."""
SAMPLED_CLIENT_LEVEL_METHODS = tuple(
    method for method in CLIENT_LEVEL_MODES if method not in ALL_CLIENTS_METHODS
)
"""Client-level methods with Poisson client sampling."""
EQUAL_NOISE_METHODS = (CLIENT_DP_DISTRIBUTED_EQUAL_NOISE,)
"""Methods that take central mode's noise multiplier for the target epsilon
instead of calibrating their own, so their epsilon exceeds the target."""
BASELINE_GROUPS = (
    (FEDERATED_DP_SGD, FEDERATED_DP_SGD_TUNED),
    (FEDERATED_DP_SGD_LONG,),
    (FEDERATED_DP_SGD_MOMENTUM,),
    (FEDERATED_DP_SGD_THREE_CLIENTS,),
    SAMPLED_CLIENT_LEVEL_METHODS,
    ALL_CLIENTS_METHODS,
)
"""Methods that differ only under DP, so they share one run without DP."""

STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"

LAST_ROUNDS_FOR_MEAN = 5
"""Rounds at the end of a federated run whose mean accuracy the table shows."""

PLOT_NO_DP_POSITION = 20.0
"""x position of the runs without DP on the log-scaled epsilon axis."""
PLOT_SIZE_INCHES = (7.0, 5.5)
PLOT_DPI = 150
PLOT_MARKERS = {
    CENTRAL_DP_SGD: "o",
    FEDERATED_DP_SGD: "s",
    FEDERATED_DP_SGD_TUNED: "D",
    FEDERATED_DP_SGD_LONG: "P",
    FEDERATED_DP_SGD_MOMENTUM: "*",
    FEDERATED_DP_SGD_THREE_CLIENTS: "h",
    CLIENT_DP_CENTRAL: "^",
    CLIENT_DP_DISTRIBUTED: "v",
    CLIENT_DP_DISTRIBUTED_EQUAL_NOISE: "x",
    CLIENT_DP_CENTRAL_ALL: "<",
    CLIENT_DP_DISTRIBUTED_ALL: ">",
}


@dataclass(frozen=True, kw_only=True)
class CentralSettings:
    """Training without federation.

    Attributes:
        epochs: Passes over the train split.
        batch_size: Examples per batch without DP.
        learning_rate: SGD step size without DP.
        dp_learning_rate: SGD step size of DP-SGD.
        dp_batch_size: Expected examples per Poisson batch of DP-SGD.
        num_examples: Train examples used, from the start of the split;
            None for all 60,000.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    dp_learning_rate: float
    dp_batch_size: int
    num_examples: int | None = None


@dataclass(frozen=True, kw_only=True)
class FederatedSettings:
    """One federated method: clients, rounds and local training.

    Attributes:
        num_clients: Simulated clients (SuperNodes), IID partitions.
        num_rounds: Server rounds.
        fraction_train: Probability (Poisson) or fraction (fixed) of
            clients sampled per round.
        client_sampling: ``fixed`` or ``poisson``.
        local_epochs: Passes over the local partition per round.
        batch_size: Examples per local step.
        learning_rate: Local SGD step size without DP-SGD.
        dp_learning_rate: Local step size of DP-SGD. Client-level DP ignores it.
        launch_timeout_s: Seconds before the launcher stops one run.
        dp_batch_size: Expected examples per local step of DP-SGD; None for
            ``batch_size``. Client-level DP ignores it.
        server_momentum: ``server-momentum`` of every run of the method,
            with and without DP; 0 for FedAvg.
    """

    num_clients: int
    num_rounds: int
    fraction_train: float
    client_sampling: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    dp_learning_rate: float
    launch_timeout_s: float
    dp_batch_size: int | None = None
    server_momentum: float = 0.0

    @property
    def partition_size(self) -> int:
        """Examples of the largest IID partition of the 60,000."""
        return math.ceil(FASHION_MNIST_TRAIN_EXAMPLES / self.num_clients)

    @property
    def max_clients(self) -> int:
        """Bound on the clients of one round, for ``secagg-max-clients``."""
        if self.client_sampling != "poisson":
            return max(2, math.ceil(self.fraction_train * self.num_clients))
        expected = self.fraction_train * self.num_clients
        spread = math.sqrt(expected * (1.0 - self.fraction_train))
        return min(
            self.num_clients, math.ceil(expected + CLIENT_SAMPLES_HEADROOM * spread)
        )


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Sizes of one invocation.

    Attributes:
        name: ``full``, ``quick`` or ``smoke``.
        epsilons: Target epsilons; None stands for no DP.
        methods: The methods to run, a subset of ``METHODS``.
        central: The centralized reference.
        dp_sgd: Federated DP-SGD with the reference's DP-SGD step size.
        tuned_dp_learning_rate: DP-SGD step size of ``federated-dp-sgd-tuned``,
            which otherwise runs as ``dp_sgd``.
        long_dp_sgd: ``federated-dp-sgd-20-rounds``: more rounds and larger
            DP-SGD batches than ``dp_sgd``.
        client_level: Client-level DP with Poisson client sampling, both
            modes and the baseline.
        tuning_rounds: FedAvg rounds replayed to pick the clipping norm,
            about half of ``client_level.num_rounds``.
        all_clients: Client-level DP with every client in every round.
        all_clients_tuning_rounds: ``tuning_rounds`` of ``all_clients``.
    """

    name: str
    epsilons: tuple[float | None, ...]
    methods: tuple[str, ...]
    central: CentralSettings
    dp_sgd: FederatedSettings
    tuned_dp_learning_rate: float
    long_dp_sgd: FederatedSettings
    client_level: FederatedSettings
    tuning_rounds: int
    all_clients: FederatedSettings
    all_clients_tuning_rounds: int


PLAIN_LEARNING_RATE = 0.3
"""SGD step size without DP, centralized and on the DP-SGD method's clients.

After one epoch on 20,000 examples, 0.1 reached 69.8% and 0.3 reached
73.9% test accuracy."""

DP_SGD_LEARNING_RATE = 0.5
"""DP-SGD step size of ``federated-dp-sgd``, with batch 64.

It was the reference's step size while the reference used batch 64:
after three centralized epochs at target epsilon 3, 0.25, 0.5 and 1
reached 73.4%, 77.8% and 71.1% test accuracy."""

FEDERATED_DP_SGD_LEARNING_RATE = 2.0
"""Step size of ``federated-dp-sgd-tuned``.

Averaging the models of K clients divides the variance of their DP-SGD noise
by K, but the federation takes K times fewer sequential steps than one
model trained on all the data, so it gains from larger steps. The value
was picked on one model trained with DP-SGD for three epochs on 6,000
examples, with noise multiplier z / sqrt(10) for a client's multiplier z.
At target epsilon 8, step sizes 0.5, 1, 2 and 4 reached 66.3%, 71.2%, 75.9%
and 79.0%. At target epsilon 1, step sizes 2 and 4 reached 76.1% and 71.1%.

NOTE: in the federated runs at target epsilon 1, step size 2 reached only
55.8% where 0.5 reached 66.5%, so this one-model trial does not predict
the federation there.
"""

DP_BATCH_SIZE = 256
"""Expected Poisson batch of DP-SGD in the reference and in
``federated-dp-sgd-20-rounds``.

At target epsilon 8, three centralized epochs reached 79.2% with batch 64
(step size 0.5) and 83.8% with batch 256 (step size 4): a larger batch
averages more clipped gradients against the same noise. Without DP the
reference keeps batch 64."""

REFERENCE_DP_LEARNING_RATE = 4.0
"""Step size of the reference's DP-SGD with ``DP_BATCH_SIZE``.

After three epochs, step sizes 2 and 4 reached 82.6% and 83.8% at target
epsilon 8, and 80.2% and 78.4% at target epsilon 1; 4 reached 82.9% at 3.
One step size serves every target, as in the federated methods."""

LONG_DP_SGD_LEARNING_RATE = 4.0
"""DP-SGD step size of ``federated-dp-sgd-20-rounds``.

Picked in a replay of the federation in one process (10 IID clients of
6,000 examples, one local epoch per round, DP-SGD batch 256, the models
averaged). After 10 rounds, step sizes 2 and 4 reached 75.9% and 81.4% at
target epsilon 8, 75.9% and 79.0% at 3, and 74.0% and 73.4% at 1. With 20
rounds, 4 reached 84.3% at epsilon 8 and 2 reached 75.0% at 1."""

LONG_DP_SGD_SERVER_MOMENTUM = 0.5
"""``server-momentum`` of ``federated-dp-sgd-20-rounds-momentum``.

In a replay of the federation in one process (10 rounds, DP-SGD batch 64,
step size 2), server momentum 0.5 raised the accuracy at target epsilon 8
from 78.8% to 80.2%. The value was not tuned further."""

THREE_CLIENTS = 3
"""Clients of ``federated-dp-sgd-20-rounds-3-clients``.

With K clients at the same sample-level epsilon the federation carries
about sqrt(K) times the reference's noise per step, so 3 clients carry
about 1.7 times where 10 carry 3.2. Three is the fewest with which secure
aggregation hides each update from the other clients."""

CLIENT_LEVEL_LEARNING_RATE = 0.1
"""Local SGD step size of the client-level DP runs."""

ALL_CLIENTS_SETTINGS = FederatedSettings(
    num_clients=400,
    num_rounds=5,
    fraction_train=1.0,
    client_sampling="fixed",
    local_epochs=5,
    batch_size=16,
    learning_rate=CLIENT_LEVEL_LEARNING_RATE,
    dp_learning_rate=CLIENT_LEVEL_LEARNING_RATE,
    launch_timeout_s=1800.0,
)
"""The client-level methods with all 400 clients in every round.

Without client sampling, distributed mode's bound for sums of discrete
Gaussians needs a noise multiplier within 2% of central mode's for the
same target (1.6% at this size, with the default dropout allowance).
Each round averages 400 updates, which keeps the noise on the mean small
although z is larger than under sampling. Five local epochs of 10 steps
make up for the few rounds."""

ALL_CLIENTS_STAGE_TIMEOUT_S = 600.0
"""``secagg-timeout`` of the all-clients methods, in seconds.

The masked-input stage includes the local training of all 400 clients,
which share the two simulation actors here. Rounds took 47 to 143 s, and
with the app's default of 120 s per stage the clients that trained last
missed the stage. In a second invocation, 41 and 95 clients missed it in
two distributed runs, which were aborted before unmasking, and a central
run was aborted because too few share holders of a dropped client were
left."""

DP_SGD_SETTINGS = FederatedSettings(
    num_clients=10,
    num_rounds=3,
    fraction_train=1.0,
    client_sampling="fixed",
    local_epochs=1,
    batch_size=64,
    learning_rate=PLAIN_LEARNING_RATE,
    dp_learning_rate=DP_SGD_LEARNING_RATE,
    launch_timeout_s=1800.0,
)
"""Federated DP-SGD with 3 rounds, the settings of ``federated-dp-sgd``."""

FULL = Profile(
    name="full",
    epsilons=(None, 8.0, 3.0, 1.0),
    methods=METHODS,
    central=CentralSettings(
        epochs=3,
        batch_size=64,
        learning_rate=PLAIN_LEARNING_RATE,
        dp_learning_rate=REFERENCE_DP_LEARNING_RATE,
        dp_batch_size=DP_BATCH_SIZE,
    ),
    dp_sgd=DP_SGD_SETTINGS,
    tuned_dp_learning_rate=FEDERATED_DP_SGD_LEARNING_RATE,
    long_dp_sgd=dataclasses.replace(
        DP_SGD_SETTINGS,
        num_rounds=20,
        dp_learning_rate=LONG_DP_SGD_LEARNING_RATE,
        launch_timeout_s=3600.0,
        dp_batch_size=DP_BATCH_SIZE,
    ),
    client_level=FederatedSettings(
        num_clients=400,
        num_rounds=20,
        fraction_train=0.1,
        client_sampling="poisson",
        local_epochs=1,
        batch_size=16,
        learning_rate=CLIENT_LEVEL_LEARNING_RATE,
        dp_learning_rate=CLIENT_LEVEL_LEARNING_RATE,
        launch_timeout_s=1200.0,
    ),
    tuning_rounds=10,
    all_clients=ALL_CLIENTS_SETTINGS,
    all_clients_tuning_rounds=2,
)

# NOTE: the quick profile has not been run in full; only its sizes are set.
QUICK = dataclasses.replace(
    FULL,
    name="quick",
    epsilons=(None, 8.0, 1.0),
    central=dataclasses.replace(FULL.central, epochs=1, num_examples=20_000),
    dp_sgd=dataclasses.replace(FULL.dp_sgd, num_rounds=1, launch_timeout_s=900.0),
    long_dp_sgd=dataclasses.replace(
        FULL.long_dp_sgd, num_rounds=3, launch_timeout_s=1800.0
    ),
    client_level=dataclasses.replace(
        FULL.client_level, num_rounds=5, launch_timeout_s=600.0
    ),
    tuning_rounds=2,
    all_clients=dataclasses.replace(
        FULL.all_clients, num_rounds=2, launch_timeout_s=900.0
    ),
    all_clients_tuning_rounds=1,
)

SMOKE = dataclasses.replace(
    FULL,
    name="smoke",
    epsilons=(3.0,),
    methods=(CENTRAL_DP_SGD, CLIENT_DP_DISTRIBUTED),
    central=dataclasses.replace(FULL.central, epochs=1, num_examples=1_000),
    client_level=dataclasses.replace(
        FULL.client_level, num_clients=100, num_rounds=1, launch_timeout_s=240.0
    ),
    tuning_rounds=1,
    all_clients=dataclasses.replace(
        FULL.all_clients,
        num_clients=4,
        num_rounds=1,
        local_epochs=1,
        launch_timeout_s=240.0,
    ),
    all_clients_tuning_rounds=1,
)


class RunFailedError(RuntimeError):
    """A federated run did not complete."""


# --- configurations ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Configuration:
    """One point of the plot: a method at one target epsilon.

    Attributes:
        method: One of ``METHODS``.
        target_epsilon: The target, or None without DP.
        shared_with: For a run without DP, the other methods that use it
            as their own point without DP.
    """

    method: str
    target_epsilon: float | None
    shared_with: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Folder and log name, such as ``client-dp-central-eps3``."""
        if self.target_epsilon is None:
            return f"{self.method}-no-dp"
        return f"{self.method}-eps{self.target_epsilon:g}"


def plan_configurations(profile: Profile) -> list[Configuration]:
    """Return the configurations of a profile in the order they run.

    The methods of one of ``BASELINE_GROUPS`` share one run without DP,
    listed under the first of them in the profile.
    """
    configurations: list[Configuration] = []
    for method in profile.methods:
        group = _baseline_group(profile, method)
        for epsilon in profile.epsilons:
            shared: tuple[str, ...] = ()
            if epsilon is None:
                if method != group[0]:
                    continue
                shared = group[1:]
            configurations.append(
                Configuration(method=method, target_epsilon=epsilon, shared_with=shared)
            )
    return configurations


def _baseline_group(profile: Profile, method: str) -> tuple[str, ...]:
    """Return the methods of ``profile`` that share ``method``'s run without DP."""
    for group in BASELINE_GROUPS:
        if method in group:
            return tuple(m for m in profile.methods if m in group)
    return (method,)


def secagg_overrides(settings: FederatedSettings) -> dict[str, Any]:
    """Return the run config shared by every federated run of one method."""
    return {
        "dataset": DATASET,
        "seed": SEED,
        "partitioning": PARTITIONING,
        "num-server-rounds": settings.num_rounds,
        "local-epochs": settings.local_epochs,
        "batch-size": settings.batch_size,
        "learning-rate": settings.learning_rate,
        "fraction-train": settings.fraction_train,
        "client-sampling": settings.client_sampling,
        "secure-aggregation": True,
        "secagg-max-weight": settings.partition_size,
        "secagg-max-clients": settings.max_clients,
        "delta": DELTA,
    }


def dp_sgd_overrides(
    settings: FederatedSettings, target_epsilon: float | None
) -> dict[str, Any]:
    """Return the run config of federated DP-SGD at one target epsilon."""
    overrides = secagg_overrides(settings)
    if settings.server_momentum:
        overrides["server-momentum"] = settings.server_momentum
    if target_epsilon is None:
        return overrides
    return {
        **overrides,
        "batch-size": settings.dp_batch_size or settings.batch_size,
        "learning-rate": settings.dp_learning_rate,
        "dp-sgd": True,
        "dp-sgd-target-epsilon": target_epsilon,
        "dp-sgd-max-grad-norm": MAX_GRAD_NORM,
    }


def client_level_overrides(
    settings: FederatedSettings,
    method: str,
    target_epsilon: float | None,
    clipping_norm: float,
) -> dict[str, Any]:
    """Return the run config of client-level DP at one target epsilon."""
    overrides = secagg_overrides(settings)
    if method in ALL_CLIENTS_METHODS:
        # Round 1 waits for every node, so each round has all of them.
        overrides["min-train-clients"] = settings.num_clients
        overrides["secagg-timeout"] = ALL_CLIENTS_STAGE_TIMEOUT_S
    if target_epsilon is None:
        return overrides
    # Under DP every client has weight 1, so the app rejects a max weight.
    del overrides["secagg-max-weight"]
    noise: dict[str, float] = {"target-epsilon": target_epsilon}
    if method in EQUAL_NOISE_METHODS:
        noise = {"noise-multiplier": central_noise_multiplier(settings, target_epsilon)}
    return {
        **overrides,
        "dp-mode": CLIENT_LEVEL_MODES[method],
        **noise,
        "clipping-norm": clipping_norm,
    }


def central_noise_multiplier(
    settings: FederatedSettings, target_epsilon: float
) -> float:
    """Return the noise multiplier that central mode calibrates for a target.

    Central mode accounts Poisson-sampled rounds as the sampled Gaussian at
    rate ``fraction_train``, and any other sampling at rate 1.
    """
    sample_rate = 1.0
    if settings.client_sampling == "poisson":
        sample_rate = settings.fraction_train
    return noise_multiplier_for_target(
        target_epsilon=target_epsilon,
        delta=DELTA,
        sample_rate=sample_rate,
        num_steps=settings.num_rounds,
    )


# --- centralized reference ---------------------------------------------------


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the body with ``num_threads`` torch threads, then restore the old value."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_central(
    settings: CentralSettings, split: DatasetSplit, target_epsilon: float | None
) -> dict[str, Any]:
    """Train the CNN without federation and return its test accuracy.

    Without a target it trains with plain SGD. With a target it trains with
    Opacus DP-SGD, whose noise multiplier gives that epsilon after all epochs.
    """
    features = split.x_train[: settings.num_examples]
    labels = split.y_train[: settings.num_examples]
    seed_everything(SEED)
    model = build_model(DATASET)
    with torch_threads(TORCH_THREADS):
        if target_epsilon is None:
            train(
                model,
                features,
                labels,
                epochs=settings.epochs,
                batch_size=settings.batch_size,
                learning_rate=settings.learning_rate,
                seed=SEED,
            )
            privacy: dict[str, Any] = {"epsilon": None, "noise_multiplier": None}
        else:
            model, privacy = train_central_dp_sgd(
                model,
                features,
                labels,
                settings=settings,
                target_epsilon=target_epsilon,
            )
        result = evaluate(model, split.x_test, split.y_test)
    return {
        "accuracy": result.accuracy,
        "loss": result.loss,
        "num_train_examples": len(labels),
        **privacy,
    }


def train_central_dp_sgd(
    model: nn.Module,
    features: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    *,
    settings: CentralSettings,
    target_epsilon: float,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` with Opacus DP-SGD and return it with its privacy record.

    Opacus samples each example with probability 1 / (batches per epoch),
    as the app's clients do, and the noise multiplier is the smallest whose
    RDP epsilon over all steps stays within the target.
    """
    # Through the package, which keeps Opacus from adding a root log handler.
    from fedsec_flwr.dp._opacus import PrivacyEngine

    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(features), torch.from_numpy(labels)),
        batch_size=settings.dp_batch_size,
        generator=generator,
    )
    steps_per_epoch = len(loader)
    sample_rate = 1.0 / steps_per_epoch
    noise_multiplier = noise_multiplier_for_target(
        target_epsilon=target_epsilon,
        delta=DELTA,
        sample_rate=sample_rate,
        num_steps=settings.epochs * steps_per_epoch,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.dp_learning_rate)
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=True,
        grad_sample_mode=GRAD_SAMPLE_MODE,
    )
    criterion = nn.CrossEntropyLoss()
    private_model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
        for _ in range(settings.epochs):
            for batch_features, batch_labels in private_loader:
                private_optimizer.zero_grad(set_to_none=True)
                loss = criterion(private_model(batch_features), batch_labels)
                loss.backward()
                private_optimizer.step()
    return model, {
        "epsilon": engine.get_epsilon(DELTA),
        "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate,
        "num_steps": settings.epochs * steps_per_epoch,
        "max_grad_norm": MAX_GRAD_NORM,
        "grad_sample_mode": GRAD_SAMPLE_MODE,
    }


# --- clipping norm -----------------------------------------------------------


def median_update_norm(settings: FederatedSettings, num_rounds: int) -> dict[str, Any]:
    """Replay FedAvg without DP in this process and return the update norms.

    Each round samples the expected number of clients at random, trains
    them from the global model as the app does, and averages their models
    with weight 1 each. The median L2 norm of all updates is the clipping
    norm of the client-level DP runs.
    """
    rng = np.random.default_rng(SEED)
    num_sampled = max(1, round(settings.fraction_train * settings.num_clients))
    seed_everything(SEED)
    global_model = build_model(DATASET)
    norms: list[float] = []
    with torch_threads(TORCH_THREADS):
        for server_round in range(1, num_rounds + 1):
            clients = rng.choice(settings.num_clients, size=num_sampled, replace=False)
            updates = [
                _client_update(global_model, settings, server_round, int(client))
                for client in clients
            ]
            norms.extend(float(torch.linalg.vector_norm(u)) for u in updates)
            _apply_mean_update(global_model, updates)
    return {
        "median": statistics.median(norms),
        "quartiles": [float(q) for q in np.quantile(norms, [0.25, 0.75])],
        "num_updates": len(norms),
        "rounds": num_rounds,
    }


def _client_update(
    global_model: nn.Module,
    settings: FederatedSettings,
    server_round: int,
    client: int,
) -> torch.Tensor:
    features, labels = load_partition(
        DATASET, SEED, client, settings.num_clients, PARTITIONING, DIRICHLET_ALPHA
    )
    local = copy.deepcopy(global_model)
    train(
        local,
        features,
        labels,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=derive_seed(SEED, server_round, client),
    )
    return _flat(local) - _flat(global_model)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _apply_mean_update(model: nn.Module, updates: Sequence[torch.Tensor]) -> None:
    mean = torch.stack(list(updates)).mean(dim=0)
    offset = 0
    with torch.no_grad():
        for parameter in model.parameters():
            size = parameter.numel()
            parameter.add_(mean[offset : offset + size].view_as(parameter))
            offset += size


# --- federated runs ----------------------------------------------------------


def run_federated(
    overrides: dict[str, Any],
    *,
    num_clients: int,
    output_dir: Path,
    timeout: float,
) -> dict[str, Any]:
    """Launch one run of the app and return its last round and privacy.

    Raises:
        RunFailedError: If the run did not complete.
        KeyboardInterrupt: If the launcher was interrupted.
    """
    options = LaunchOptions(
        app_dir=APP_DIR,
        run_config=overrides,
        output_dir=output_dir.resolve(),
        num_supernodes=num_clients,
        timeout=timeout,
    )
    # The launcher keeps the run's output in logs/run.log.
    with open(os.devnull, "w", encoding="utf-8") as echo:
        outcome = launch(options, echo=echo)
    if outcome.exit_code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt(outcome.message)
    if outcome.exit_code != EXIT_OK:
        raise RunFailedError(f"{outcome.message} (logs in {output_dir / 'logs'})")
    document = json.loads((output_dir / RESULTS_FILENAME).read_text(encoding="utf-8"))
    return summarize_run(document)


def summarize_run(document: dict[str, Any]) -> dict[str, Any]:
    """Return the last round's accuracy and epsilons and every round's accuracy."""
    rounds = document["rounds"]
    if not rounds:
        raise RunFailedError("the run completed no round")
    last = rounds[-1]
    return {
        "accuracy": last["accuracy"],
        "loss": last["loss"],
        "rounds_completed": len(rounds),
        "stopped_reason": document.get("stopped_reason"),
        "epsilon": last.get("epsilon"),
        "sample_epsilon": last.get("train_metrics", {}).get("sample-epsilon"),
        "noise_multiplier": last.get("noise_multiplier"),
        "clipping_norm": last.get("clipping_norm"),
        "clients_per_round": [entry["num_aggregated"] for entry in rounds],
        "accuracy_per_round": [entry["accuracy"] for entry in rounds],
        "seconds_per_round": [round(entry["seconds"], 2) for entry in rounds],
    }


# --- the benchmark -----------------------------------------------------------


@dataclass
class Benchmark:
    """The state of one invocation: profile, output folder and results.

    Attributes:
        profile: Sizes.
        out: Output folder.
        document: What ``dp_accuracy.json`` holds.
    """

    profile: Profile
    out: Path
    document: dict[str, Any]

    @classmethod
    def start(cls, profile: Profile, out: Path, argv: Sequence[str]) -> Benchmark:
        """Create the output folder and the document with machine and commit."""
        out.mkdir(parents=True, exist_ok=True)
        document: dict[str, Any] = {
            "benchmark": "dp_accuracy",
            "command": " ".join(["python -m benchmarks.dp_accuracy", *argv]),
            "profile": asdict(profile),
            "dataset": DATASET,
            "delta": DELTA,
            "seed": SEED,
            "machine": machine_info(),
            "commit": git_commit(),
            "started_at": _utc_now(),
            "load_average_start": _load_average(),
            "clipping": None,
            "clipping_all_clients": None,
            "results": [],
        }
        return cls(profile=profile, out=out, document=document)

    def save(self) -> None:
        """Rewrite ``dp_accuracy.json`` atomically."""
        path = self.out / JSON_FILENAME
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(
            json.dumps(self.document, indent=2, allow_nan=False) + "\n",
            encoding="utf-8",
        )
        os.replace(temporary, path)

    def record(
        self, configuration: Configuration, action: Callable[[], dict[str, Any]]
    ) -> bool:
        """Run one configuration, store its result and return whether it completed."""
        print(f"[dp_accuracy] {configuration.name} ...", flush=True)
        started = time.monotonic()
        entry: dict[str, Any] = {
            "method": configuration.method,
            "name": configuration.name,
            "target_epsilon": configuration.target_epsilon,
            "shared_with": list(configuration.shared_with),
        }
        try:
            entry.update(action())
            entry["status"] = STATUS_COMPLETED
        except (RunFailedError, RuntimeError, ValueError) as error:
            entry["status"] = STATUS_FAILED
            entry["error"] = str(error)
        entry["wall_seconds"] = round(time.monotonic() - started, 1)
        entry["load_average_end"] = _load_average()
        self.document["results"].append(_json_safe(entry))
        self.save()
        print(f"[dp_accuracy] {configuration.name}: {_describe(entry)}", flush=True)
        return bool(entry["status"] == STATUS_COMPLETED)

    def finish(self, wall_seconds: float) -> None:
        """Store the total wall time, then write the JSON, the plot and the table."""
        self.document["finished_at"] = _utc_now()
        self.document["wall_seconds"] = round(wall_seconds, 1)
        self.save()
        plot_results(self.document["results"], self.out / PLOT_FILENAME)
        (self.out / TABLE_FILENAME).write_text(
            results_table(self.document["results"]) + "\n", encoding="utf-8"
        )


def run_benchmark(profile: Profile, out: Path, argv: Sequence[str]) -> int:
    """Run every configuration of ``profile`` and return the exit status."""
    started = time.monotonic()
    benchmark = Benchmark.start(profile, out, argv)
    benchmark.save()
    split = load_dataset(DATASET, SEED)

    clipping_norms = _clipping_norms(profile, benchmark)

    completed = True
    for configuration in plan_configurations(profile):
        clipping_norm = clipping_norms.get(configuration.method, 0.0)
        action = _action(profile, configuration, split, out, clipping_norm)
        completed &= benchmark.record(configuration, action)

    benchmark.finish(time.monotonic() - started)
    print(results_table(benchmark.document["results"]), flush=True)
    return EXIT_OK if completed else EXIT_FAILED


def _clipping_norms(profile: Profile, benchmark: Benchmark) -> dict[str, float]:
    """Replay FedAvg for each client-level family in the profile; return the norms.

    The result maps each client-level method to its clipping norm, and the
    replays are stored under ``clipping`` and ``clipping_all_clients``.
    """
    families = (
        (
            "clipping",
            profile.client_level,
            profile.tuning_rounds,
            SAMPLED_CLIENT_LEVEL_METHODS,
        ),
        (
            "clipping_all_clients",
            profile.all_clients,
            profile.all_clients_tuning_rounds,
            ALL_CLIENTS_METHODS,
        ),
    )
    norms: dict[str, float] = {}
    for field_name, settings, rounds, family in families:
        methods = [m for m in family if m in profile.methods]
        if not methods:
            continue
        print(f"[dp_accuracy] {field_name}: FedAvg without DP ...", flush=True)
        clipping = median_update_norm(settings, rounds)
        benchmark.document[field_name] = clipping
        norm = round(clipping["median"], CLIPPING_NORM_DIGITS)
        print(f"[dp_accuracy] {field_name}: clipping norm {norm}", flush=True)
        norms.update(dict.fromkeys(methods, norm))
    return norms


def federated_settings(profile: Profile, method: str) -> FederatedSettings:
    """Return the clients, rounds and training settings of a federated method."""
    if method == FEDERATED_DP_SGD:
        return profile.dp_sgd
    if method == FEDERATED_DP_SGD_TUNED:
        return dataclasses.replace(
            profile.dp_sgd, dp_learning_rate=profile.tuned_dp_learning_rate
        )
    if method == FEDERATED_DP_SGD_LONG:
        return profile.long_dp_sgd
    if method == FEDERATED_DP_SGD_MOMENTUM:
        return dataclasses.replace(
            profile.long_dp_sgd, server_momentum=LONG_DP_SGD_SERVER_MOMENTUM
        )
    if method == FEDERATED_DP_SGD_THREE_CLIENTS:
        return dataclasses.replace(profile.long_dp_sgd, num_clients=THREE_CLIENTS)
    if method in ALL_CLIENTS_METHODS:
        return profile.all_clients
    if method in CLIENT_LEVEL_MODES:
        return profile.client_level
    raise ValueError(f"method must be a federated method. Found {method!r}.")


def _action(
    profile: Profile,
    configuration: Configuration,
    split: DatasetSplit,
    out: Path,
    clipping_norm: float,
) -> Callable[[], dict[str, Any]]:
    method = configuration.method
    epsilon = configuration.target_epsilon
    run_dir = out / RUNS_DIRNAME / configuration.name
    if method == CENTRAL_DP_SGD:
        return lambda: run_central(profile.central, split, epsilon)

    settings = federated_settings(profile, method)
    if method in DP_SGD_METHODS:
        overrides = dp_sgd_overrides(settings, epsilon)
    else:
        overrides = client_level_overrides(settings, method, epsilon, clipping_norm)

    def run() -> dict[str, Any]:
        summary = run_federated(
            overrides,
            num_clients=settings.num_clients,
            output_dir=run_dir,
            timeout=settings.launch_timeout_s,
        )
        return {
            **summary,
            "num_clients": settings.num_clients,
            "run_config": overrides,
            "run_dir": str(run_dir),
        }

    return run


# --- report ------------------------------------------------------------------


def reached_epsilon(entry: dict[str, Any]) -> float | None:
    """Return a result's epsilon: sample level for DP-SGD, else client level."""
    if entry.get("method") in DP_SGD_METHODS:
        return entry.get("sample_epsilon")
    return entry.get("epsilon")


def points_by_method(
    results: Sequence[dict[str, Any]],
) -> dict[str, list[tuple[float | None, float]]]:
    """Return each method's (target epsilon, accuracy) points, in run order.

    The client-level run without DP counts for both client-level methods.
    """
    points: dict[str, list[tuple[float | None, float]]] = {m: [] for m in METHODS}
    for entry in results:
        if entry.get("status") != STATUS_COMPLETED:
            continue
        for method in (entry["method"], *entry.get("shared_with", ())):
            points[method].append((entry["target_epsilon"], entry["accuracy"]))
    return points


def plot_results(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Plot accuracy against target epsilon, one line per method.

    The runs without DP sit at the right end of the epsilon axis.
    """
    series = {
        method: [
            (epsilon, accuracy, accuracy, accuracy) for epsilon, accuracy in points
        ]
        for method, points in points_by_method(results).items()
    }
    _plot_series(series, path)


def _plot_series(
    series: dict[str, list[tuple[float | None, float, float, float]]], path: Path
) -> None:
    """Plot (epsilon, mean, lowest, highest) accuracies, one line per method.

    A point whose lowest and highest differ gets a bar between them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=PLOT_SIZE_INCHES)
    epsilons: set[float] = set()
    for method, points in series.items():
        if not points:
            continue
        ordered = sorted(points, key=lambda point: _plot_x(point[0]))
        epsilons.update(point[0] for point in ordered if point[0] is not None)
        means = [100.0 * point[1] for point in ordered]
        below = [100.0 * (point[1] - point[2]) for point in ordered]
        above = [100.0 * (point[3] - point[1]) for point in ordered]
        errors = [below, above] if any(below) or any(above) else None
        axes.errorbar(
            [_plot_x(point[0]) for point in ordered],
            means,
            yerr=errors,
            marker=PLOT_MARKERS[method],
            capsize=3,
            label=METHOD_LABELS[method],
        )
    ticks = [*sorted(epsilons), PLOT_NO_DP_POSITION]
    if epsilons:
        # The axis is not continuous between the largest epsilon and no DP.
        separator = math.sqrt(max(epsilons) * PLOT_NO_DP_POSITION)
        axes.axvline(separator, color="grey", linestyle=":", linewidth=1)
    axes.set_xscale("log")
    axes.set_xticks(ticks)
    axes.set_xticklabels([*(f"{e:g}" for e in sorted(epsilons)), "no DP"])
    axes.minorticks_off()
    axes.set_xlabel("target epsilon (delta = 1e-5)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Fashion-MNIST, 25,810-parameter CNN")
    axes.grid(True, alpha=0.3)
    axes.legend(
        fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2
    )
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)


def _plot_x(epsilon: float | None) -> float:
    return PLOT_NO_DP_POSITION if epsilon is None else epsilon


def mean_of_last_rounds(entry: dict[str, Any]) -> float | None:
    """Return the mean test accuracy of a federated run's last rounds.

    Under strong noise the accuracy jumps from round to round, so the last
    round alone can mislead. None for a centralized result and for a run
    of fewer rounds, whose mean would include the first rounds.
    """
    accuracies = entry.get("accuracy_per_round")
    if not accuracies or len(accuracies) < LAST_ROUNDS_FOR_MEAN:
        return None
    return statistics.fmean(accuracies[-LAST_ROUNDS_FOR_MEAN:])


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """Return a Markdown table with one row per result.

    The columns are the method, the target epsilon, the test accuracy after
    training, the mean over the last rounds, the epsilon reached, the noise
    multiplier, the rounds and the wall time.
    """
    lines = [
        "| method | target epsilon | test accuracy "
        f"| mean of last {LAST_ROUNDS_FOR_MEAN} rounds | epsilon reached "
        "| noise multiplier | rounds | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results:
        target = entry["target_epsilon"]
        last_rounds = mean_of_last_rounds(entry)
        cells = [
            entry["method"],
            "none (no DP)" if target is None else f"{target:g}",
            _format_accuracy(entry),
            "" if last_rounds is None else f"{100.0 * last_rounds:.1f}%",
            _format_number(reached_epsilon(entry), "{:.3f}"),
            _format_number(entry.get("noise_multiplier"), "{:.3f}"),
            str(entry.get("rounds_completed", "")),
            f"{entry['wall_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_accuracy(entry: dict[str, Any]) -> str:
    if entry.get("status") != STATUS_COMPLETED:
        return f"failed: {entry.get('error', '')}"
    return f"{100.0 * entry['accuracy']:.1f}%"


def _format_number(value: float | None, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def _describe(entry: dict[str, Any]) -> str:
    if entry["status"] != STATUS_COMPLETED:
        return f"failed after {entry['wall_seconds']} s: {entry.get('error')}"
    epsilon = reached_epsilon(entry)
    epsilon_text = "no DP" if epsilon is None else f"epsilon {epsilon:.3f}"
    return (
        f"accuracy {100.0 * entry['accuracy']:.2f}%, {epsilon_text}, "
        f"{entry['wall_seconds']} s"
    )


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats, which JSON cannot hold, by strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# --- merging repeated invocations --------------------------------------------


@dataclass(frozen=True)
class MergedPoint:
    """Every completed run of one method at one target epsilon.

    Attributes:
        method: One of ``METHODS``.
        target_epsilon: The target, or None without DP.
        accuracies: Final test accuracy of each run, in input order.
        last_rounds: Mean accuracy of each federated run's last rounds.
        epsilons: Epsilon each run reached.
        noise_multipliers: Noise multiplier each run reported.
    """

    method: str
    target_epsilon: float | None
    accuracies: tuple[float, ...]
    last_rounds: tuple[float, ...]
    epsilons: tuple[float, ...]
    noise_multipliers: tuple[float, ...]


def merge_points(
    documents: Sequence[dict[str, Any]], *, expand_shared: bool
) -> list[MergedPoint]:
    """Group the completed runs of several invocations by method and target.

    With ``expand_shared``, a run without DP also counts for the methods
    that share it, as in the plot. The points follow the order of
    ``METHODS``, and within a method the order of first appearance.
    """
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for document in documents:
        for entry in document["results"]:
            if entry.get("status") != STATUS_COMPLETED:
                continue
            methods = [entry["method"]]
            if expand_shared:
                methods.extend(entry.get("shared_with", ()))
            for method in methods:
                groups.setdefault((method, entry["target_epsilon"]), []).append(entry)

    points = []
    for (method, target), entries in groups.items():
        last_rounds = [mean_of_last_rounds(entry) for entry in entries]
        epsilons = [reached_epsilon(entry) for entry in entries]
        multipliers = [entry.get("noise_multiplier") for entry in entries]
        points.append(
            MergedPoint(
                method=method,
                target_epsilon=target,
                accuracies=tuple(entry["accuracy"] for entry in entries),
                last_rounds=tuple(v for v in last_rounds if v is not None),
                epsilons=tuple(v for v in epsilons if v is not None),
                noise_multipliers=tuple(v for v in multipliers if v is not None),
            )
        )
    return sorted(points, key=lambda point: METHODS.index(point.method))


def merged_table(points: Sequence[MergedPoint]) -> str:
    """Return a Markdown table with one row per method and target epsilon."""
    lines = [
        "| method | target epsilon | runs | test accuracy of each run | mean "
        f"| mean of last {LAST_ROUNDS_FOR_MEAN} rounds | largest epsilon reached "
        "| noise multiplier |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for point in points:
        target = point.target_epsilon
        cells = [
            point.method,
            "none (no DP)" if target is None else f"{target:g}",
            str(len(point.accuracies)),
            ", ".join(f"{100.0 * value:.1f}%" for value in point.accuracies),
            f"{100.0 * statistics.fmean(point.accuracies):.1f}%",
            _format_mean_percent(point.last_rounds),
            _format_number(max(point.epsilons, default=None), "{:.3f}"),
            _format_range(point.noise_multipliers),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_range(values: Sequence[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    return f"{low:.3f}" if low == high else f"{low:.3f} to {high:.3f}"


def _format_mean_percent(values: Sequence[float]) -> str:
    return f"{100.0 * statistics.fmean(values):.1f}%" if values else ""


MERGE_MUST_MATCH = ("dataset", "delta", "seed", "profile")
"""Fields of ``dp_accuracy.json`` that every merged invocation must share."""

RUN_SUBSET_FIELDS = ("methods", "epsilons")
SETTINGS_ADDED_WITH_DEFAULTS = {"server_momentum": 0.0}
"""Fields added to `FederatedSettings` after results were recorded, with the
default that the earlier runs used. Merging leaves them out at that value."""
"""Fields of the profile that select runs, which merged invocations may differ in."""


def _read_result_documents(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """Read and check the ``dp_accuracy.json`` of each folder.

    Raises:
        ValueError: If a folder repeats, two folders hold the same
            invocation, a file is not a result file of this benchmark, an
            entry is malformed, or the invocations differ in dataset, delta,
            seed or profile.
        OSError: If a file cannot be read.
    """
    resolved = [folder.resolve() for folder in folders]
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            "--merge names a folder twice, which would count its runs twice"
        )

    documents = []
    started: dict[str, Path] = {}
    for folder in folders:
        path = folder / JSON_FILENAME
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{path} is not JSON: {error}") from None
        _check_result_document(document, path)
        # A copied folder contains the same invocation under another path.
        stamp = document.get("started_at")
        if isinstance(stamp, str) and stamp in started:
            raise ValueError(
                f"{started[stamp]} and {folder} hold the same invocation (started "
                f"at {stamp}), which would count its runs twice"
            )
        if isinstance(stamp, str):
            started[stamp] = folder
        documents.append(document)

    for field in MERGE_MUST_MATCH:
        values = {_comparable(document, field) for document in documents}
        if len(values) > 1:
            raise ValueError(
                f"the invocations differ in {field}, so their runs are not "
                f"comparable. Found {', '.join(sorted(values))[:300]}."
            )
    return documents


def _comparable(document: dict[str, Any], field: str) -> str:
    """Return ``field`` of ``document`` as JSON, without the run subset.

    Invocations that ran different methods (``--methods``) or target
    epsilons (``--epsilons``) merge: the subsets change no run's settings.
    """
    value = document.get(field)
    if field == "profile" and isinstance(value, dict):
        value = {
            key: _without_added_defaults(item)
            for key, item in value.items()
            if key not in RUN_SUBSET_FIELDS
        }
    return json.dumps(value, sort_keys=True)


def _without_added_defaults(settings: object) -> object:
    """Return ``settings`` without the added fields that have their default."""
    if not isinstance(settings, dict):
        return settings
    return {
        key: item
        for key, item in settings.items()
        if key not in SETTINGS_ADDED_WITH_DEFAULTS
        or item != SETTINGS_ADDED_WITH_DEFAULTS[key]
    }


def _check_result_document(document: object, path: Path) -> None:
    """Raise ValueError unless ``document`` has the shape `Benchmark` writes."""
    if not isinstance(document, dict) or document.get("benchmark") != "dp_accuracy":
        raise ValueError(f"{path} is not a dp_accuracy result file")
    results = document.get("results")
    if not isinstance(results, list):
        raise ValueError(
            f"{path}: results must be a list. Found {type(results).__name__}"
        )
    for index, entry in enumerate(results):
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"{path}: result {index} {problem}")


def _entry_problem(entry: object) -> str:
    """Return what is wrong with one result entry, or "" if nothing."""
    if not isinstance(entry, dict):
        return f"must be an object. Found {type(entry).__name__}"
    if entry.get("method") not in METHODS:
        return f"names an unknown method {str(entry.get('method'))[:80]!r}"
    shared = entry.get("shared_with", [])
    if not isinstance(shared, list) or any(m not in METHODS for m in shared):
        return f"has an invalid shared_with {str(shared)[:80]!r}"
    if entry.get("status") not in (STATUS_COMPLETED, STATUS_FAILED):
        return f"has an unknown status {str(entry.get('status'))[:80]!r}"
    numbers = ["target_epsilon", "epsilon", "sample_epsilon", "noise_multiplier"]
    if entry["status"] == STATUS_COMPLETED:
        numbers.append("accuracy")
        if not _is_finite_number(entry.get("accuracy")):
            return "is completed but has no finite accuracy"
    for key in numbers:
        value = entry.get(key)
        if value is not None and not _is_finite_number(value):
            return f"has a {key} that is not a finite number: {str(value)[:80]!r}"
    per_round = entry.get("accuracy_per_round", [])
    if not isinstance(per_round, list) or not all(map(_is_finite_number, per_round)):
        return "has an accuracy_per_round that is not a list of finite numbers"
    return ""


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def merge_benchmarks(folders: Sequence[Path], out: Path) -> int:
    """Merge the results of several invocations and return the exit status.

    Writes ``dp_accuracy_merged.json`` (the inputs' commits and machines and
    every point), ``dp_accuracy_merged.md`` (the table) and
    ``dp_accuracy_merged.png`` (mean accuracy, with a bar from the lowest
    to the highest run) to ``out``.
    """
    try:
        documents = _read_result_documents(folders)
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError, RecursionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not any(
        entry["status"] == STATUS_COMPLETED
        for document in documents
        for entry in document["results"]
    ):
        print("error: no completed run in these folders", file=sys.stderr)
        return EXIT_FAILED

    table = merged_table(merge_points(documents, expand_shared=False))
    plotted = merge_points(documents, expand_shared=True)
    series: dict[str, list[tuple[float | None, float, float, float]]] = {}
    for point in plotted:
        series.setdefault(point.method, []).append(
            (
                point.target_epsilon,
                statistics.fmean(point.accuracies),
                min(point.accuracies),
                max(point.accuracies),
            )
        )
    _plot_series(series, out / MERGED_PLOT_FILENAME)
    (out / MERGED_TABLE_FILENAME).write_text(table + "\n", encoding="utf-8")
    merged = {
        "benchmark": "dp_accuracy_merged",
        "inputs": [
            {
                "folder": str(folder),
                "command": document.get("command"),
                "commit": document.get("commit"),
                "machine": document.get("machine"),
                "started_at": document.get("started_at"),
                "wall_seconds": document.get("wall_seconds"),
            }
            for folder, document in zip(folders, documents, strict=True)
        ],
        "points": [asdict(point) for point in plotted],
    }
    (out / MERGED_JSON_FILENAME).write_text(
        json.dumps(_json_safe(merged), indent=2, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    print(table, flush=True)
    return EXIT_OK


# --- command line ------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dp_accuracy",
        description="Accuracy against privacy on Fashion-MNIST.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs: fewer epochs, rounds and target epsilons",
    )
    sizes.add_argument(
        "--smoke",
        action="store_true",
        help="one tiny centralized and one tiny federated run, as a check",
    )
    sizes.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="FOLDER",
        help="merge the results of earlier invocations in these output folders "
        "into one table and plot with the spread between runs; runs nothing",
    )
    parser.add_argument(
        "--methods",
        type=_parse_methods,
        default=None,
        help="comma-separated methods to run, of: " + ", ".join(METHODS),
    )
    parser.add_argument(
        "--epsilons",
        type=_parse_epsilons,
        default=None,
        help="comma-separated target epsilons to run, 'none' for the runs "
        "without DP; default: those of the profile",
    )
    options = parser.parse_args(argv)
    if options.merge and (options.methods is not None or options.epsilons is not None):
        parser.error("--methods and --epsilons select runs, and --merge runs nothing.")
    return options


def _parse_methods(text: str) -> tuple[str, ...]:
    """Return the named methods in the order of ``METHODS``."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--methods must name one or more of {', '.join(METHODS)}. Found {text!r}."
        )
    return tuple(method for method in METHODS if method in names)


EPSILON_PATTERN = re.compile(
    r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?"
)
"""A decimal number in ASCII digits, as ``--epsilons`` takes it."""


def _parse_epsilons(text: str) -> tuple[float | None, ...]:
    """Return the named target epsilons, ``None`` for no DP, without repeats."""
    epsilons: list[float | None] = []
    for item in (part.strip() for part in text.split(",")):
        epsilon = _parse_epsilon(item, text)
        if epsilon not in epsilons:
            epsilons.append(epsilon)
    return tuple(epsilons)


def _parse_epsilon(item: str, text: str) -> float | None:
    """Return one item of ``--epsilons``: a reachable target or ``none``.

    The RDP accountant reports no epsilon at or below ``rdp_epsilon_floor``
    at the benchmark's delta, so such a target could only fail its run.
    """
    if item.lower() == "none":
        return None
    floor = rdp_epsilon_floor(DELTA)
    epsilon = math.nan
    if EPSILON_PATTERN.fullmatch(item):
        epsilon = float(item)
    if not floor < epsilon < math.inf:
        raise argparse.ArgumentTypeError(
            f"--epsilons must list 'none' or finite decimal numbers above "
            f"{floor:.4g}, the RDP accountant's smallest epsilon at delta "
            f"{DELTA:g}. Found {item[:40]!r} in {text[:80]!r}."
        )
    return epsilon


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line and return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse_args(arguments)
    except SystemExit as error:
        return EXIT_USAGE if error.code else EXIT_OK
    if options.merge:
        return merge_benchmarks(options.merge, options.out)
    profile = FULL
    if options.quick:
        profile = QUICK
    if options.smoke:
        profile = SMOKE
    if options.methods is not None:
        profile = dataclasses.replace(profile, methods=options.methods)
    if options.epsilons is not None:
        profile = dataclasses.replace(profile, epsilons=options.epsilons)
    return run_benchmark(profile, options.out, arguments)


if __name__ == "__main__":
    sys.exit(main())
