"""The smoke, quick and full settings of the evaluation suite.

An accuracy configuration is a dict of run-config overrides for the
``apps/secure_fedavg`` app, on top of the dataset's base overrides. The suite
skips a configuration whose keys the app does not declare, so configurations
for features the app does not expose yet stay in the plan and run once it
does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ConfigValue = bool | int | float | str

SMOKE = "smoke"
QUICK = "quick"
FULL = "full"
PROFILE_NAMES = (SMOKE, QUICK, FULL)

BREAST_CANCER = "breast-cancer"
FASHION_MNIST = "fashion-mnist"

IID = "iid"
DIRICHLET = "dirichlet"
PLAIN = "plain"
SECURE = "secure"
SECURE_VERIFIED = "secure+verification"

# Client-level DP runs add distributed noise: each client adds its share of
# discrete noise inside the secure sum, so the server never learns an
# un-noised aggregate.
DP_MODE = "distributed"


@dataclass(frozen=True, kw_only=True)
class RunConfiguration:
    """One accuracy run of the app, as run-config overrides.

    Attributes:
        name: Short identifier, unique within a dataset, such as
            ``secure-dp-eps8-iid``.
        overrides: Run-config overrides by kebab-case key.
        security: ``plain``, ``secure`` or ``secure+verification``.
        epsilon: Target client-level epsilon, or None without client-level DP.
        sample_epsilon: Target sample-level epsilon of DP-SGD on the clients,
            or None without DP-SGD.
        partitioning: ``iid`` or ``dirichlet``.
        dirichlet_alpha: Concentration of the Dirichlet split, or None for IID.
    """

    name: str
    overrides: dict[str, ConfigValue]
    security: str
    epsilon: float | None = None
    sample_epsilon: float | None = None
    partitioning: str = IID
    dirichlet_alpha: float | None = None

    @property
    def partitioning_label(self) -> str:
        """Partitioning as written in tables: ``IID`` or ``Dirichlet a=0.1``."""
        if self.dirichlet_alpha is None:
            return "IID"
        return f"Dirichlet a={self.dirichlet_alpha:g}"

    @property
    def privacy_label(self) -> str:
        """Privacy setting as written in tables."""
        labels = []
        if self.epsilon is not None:
            labels.append(f"DP eps={self.epsilon:g} ({DP_MODE})")
        if self.sample_epsilon is not None:
            labels.append(f"DP-SGD eps={self.sample_epsilon:g} (per example)")
        return " + ".join(labels) or "none"


@dataclass(frozen=True, kw_only=True)
class DatasetPlan:
    """Accuracy runs on one dataset.

    Attributes:
        dataset: Value of the app's ``dataset`` key.
        num_supernodes: Simulated clients per run.
        target_accuracy: Test accuracy whose first round is reported as the
            rounds to target.
        base_overrides: Overrides shared by every run on this dataset.
        configurations: The runs.
    """

    dataset: str
    num_supernodes: int
    target_accuracy: float
    base_overrides: dict[str, ConfigValue]
    configurations: tuple[RunConfiguration, ...]


@dataclass(frozen=True, kw_only=True)
class CostPlan:
    """Simulations that measure seconds per round and upload bytes.

    Attributes:
        clients: Clients of every cost point.
        params: Model sizes, in float32 parameters.
        rounds: Rounds per simulation; round 1 only starts the clients.
    """

    clients: int
    params: tuple[int, ...]
    rounds: int


@dataclass(frozen=True, kw_only=True)
class ScalingPlan:
    """Two axes of simulations, each varying one size.

    Attributes:
        clients: Client counts of the clients axis.
        clients_axis_params: Model size on the clients axis.
        params: Model sizes of the parameters axis.
        params_axis_clients: Client count on the parameters axis.
        rounds: Rounds per simulation.
    """

    clients: tuple[int, ...]
    clients_axis_params: int
    params: tuple[int, ...]
    params_axis_clients: int
    rounds: int


@dataclass(frozen=True, kw_only=True)
class AttackPlan:
    """Settings of the two privacy attacks.

    Attributes:
        gradient_inversion: Keyword arguments of
            ``benchmarks.attacks.experiment.run_gradient_inversion``.
        membership_inference: Keyword arguments of
            ``run_membership_inference``, except ``training``.
        membership_epochs: Training epochs of target and shadow models.
    """

    gradient_inversion: dict[str, Any]
    membership_inference: dict[str, Any]
    membership_epochs: int


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Everything one invocation of the suite may run.

    Attributes:
        name: ``smoke``, ``quick`` or ``full``.
        accuracy: Accuracy runs per dataset.
        cost: Cost points.
        scaling: Scaling axes.
        attacks: Attack settings.
        launch_timeout_s: Seconds one accuracy run may take.
        point_timeout_s: Seconds one cost or scaling simulation may take.
        notes: Caveats that the report prints for this profile.
    """

    name: str
    accuracy: tuple[DatasetPlan, ...]
    cost: CostPlan
    scaling: ScalingPlan
    attacks: AttackPlan
    launch_timeout_s: float
    point_timeout_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def partition_overrides(alpha: float | None) -> dict[str, ConfigValue]:
    """Return the overrides of an IID split (None) or a Dirichlet split."""
    if alpha is None:
        return {"partitioning": IID}
    return {"partitioning": DIRICHLET, "dirichlet-alpha": alpha}


def _configuration(
    prefix: str,
    *,
    security: str,
    alpha: float | None,
    overrides: dict[str, ConfigValue],
    epsilon: float | None = None,
    sample_epsilon: float | None = None,
) -> RunConfiguration:
    suffix = IID if alpha is None else f"dir{alpha:g}"
    return RunConfiguration(
        name=f"{prefix}-{suffix}",
        overrides={**overrides, **partition_overrides(alpha)},
        security=security,
        epsilon=epsilon,
        sample_epsilon=sample_epsilon,
        partitioning=IID if alpha is None else DIRICHLET,
        dirichlet_alpha=alpha,
    )


def plain(alpha: float | None = None) -> RunConfiguration:
    """Plain FedAvg: the server receives every client update."""
    return _configuration(
        "plain",
        security=PLAIN,
        alpha=alpha,
        overrides={"secure-aggregation": False},
    )


def secure(alpha: float | None = None) -> RunConfiguration:
    """SecAgg+ secure aggregation: the server learns only the sum."""
    return _configuration(
        "secure",
        security=SECURE,
        alpha=alpha,
        overrides={"secure-aggregation": True},
    )


def secure_dp(epsilon: float, alpha: float | None = None) -> RunConfiguration:
    """Secure aggregation with client-level distributed DP at ``epsilon``."""
    return _configuration(
        f"secure-dp-eps{epsilon:g}",
        security=SECURE,
        alpha=alpha,
        overrides={
            "secure-aggregation": True,
            "dp-mode": DP_MODE,
            "target-epsilon": epsilon,
        },
        epsilon=epsilon,
    )


def secure_dpsgd(epsilon: float, alpha: float | None = None) -> RunConfiguration:
    """Secure aggregation with sample-level DP-SGD on every client at ``epsilon``."""
    return _configuration(
        f"secure-dpsgd-eps{epsilon:g}",
        security=SECURE,
        alpha=alpha,
        overrides={
            "secure-aggregation": True,
            "dp-sgd": True,
            "dp-sgd-target-epsilon": epsilon,
        },
        sample_epsilon=epsilon,
    )


def secure_verified(alpha: float | None = None) -> RunConfiguration:
    """Secure aggregation with commitment-based verification of the sum."""
    return _configuration(
        "secure-verified",
        security=SECURE_VERIFIED,
        alpha=alpha,
        overrides={"secure-aggregation": True, "verification": True},
    )


def full_configurations(epsilons: tuple[float, ...]) -> tuple[RunConfiguration, ...]:
    """Return plain and secure runs on three splits, DP and verification runs.

    The DP runs use the IID split: client-level DP at each of ``epsilons``,
    and DP-SGD at the largest of them.
    """
    alphas: tuple[float | None, ...] = (None, 0.5, 0.1)
    return (
        *(plain(alpha) for alpha in alphas),
        *(secure(alpha) for alpha in alphas),
        *(secure_dp(epsilon) for epsilon in epsilons),
        secure_dpsgd(max(epsilons)),
        secure_verified(),
    )


BREAST_CANCER_TARGET = 0.97
FASHION_MNIST_TARGET = 0.80

SMOKE_PROFILE = Profile(
    name=SMOKE,
    accuracy=(
        DatasetPlan(
            dataset=BREAST_CANCER,
            num_supernodes=3,
            target_accuracy=BREAST_CANCER_TARGET,
            base_overrides={"num-server-rounds": 2},
            configurations=(secure(),),
        ),
    ),
    cost=CostPlan(clients=3, params=(2_000,), rounds=2),
    scaling=ScalingPlan(
        clients=(3,),
        clients_axis_params=2_000,
        params=(2_000,),
        params_axis_clients=3,
        rounds=2,
    ),
    attacks=AttackPlan(
        gradient_inversion={
            "num_images": 1,
            "dlg_iterations": 5,
            "inverting_gradients_iterations": 5,
            "noise_multipliers": (1.0,),
        },
        membership_inference={
            "epsilons": (math.inf, 8.0),
            "num_members": 50,
            "num_shadows": 2,
        },
        membership_epochs=2,
    ),
    launch_timeout_s=300.0,
    point_timeout_s=300.0,
    notes=("Smoke settings check that every step runs; the numbers mean little.",),
)

QUICK_PROFILE = Profile(
    name=QUICK,
    accuracy=(
        DatasetPlan(
            dataset=BREAST_CANCER,
            num_supernodes=10,
            target_accuracy=BREAST_CANCER_TARGET,
            base_overrides={"num-server-rounds": 10},
            configurations=(
                plain(),
                secure(),
                secure(0.1),
                secure_dp(8.0),
                secure_dp(1.0),
                secure_verified(),
            ),
        ),
        DatasetPlan(
            dataset=FASHION_MNIST,
            num_supernodes=50,
            target_accuracy=FASHION_MNIST_TARGET,
            base_overrides={
                "num-server-rounds": 6,
                "local-epochs": 1,
                "batch-size": 32,
                "learning-rate": 0.05,
                "fraction-train": 0.2,
                "min-train-clients": 10,
            },
            configurations=(plain(), secure()),
        ),
    ),
    cost=CostPlan(clients=10, params=(10_000, 100_000, 1_000_000), rounds=2),
    scaling=ScalingPlan(
        clients=(10, 50),
        clients_axis_params=10_000,
        params=(10_000, 100_000, 1_000_000),
        params_axis_clients=10,
        rounds=2,
    ),
    attacks=AttackPlan(
        gradient_inversion={"num_images": 2, "quick": True},
        membership_inference={
            "epsilons": (math.inf, 8.0, 1.0),
            "num_members": 300,
            "num_shadows": 4,
        },
        membership_epochs=15,
    ),
    launch_timeout_s=600.0,
    point_timeout_s=600.0,
    notes=(
        "Quick settings: Fashion-MNIST with 50 clients of 1,200 examples, 10 "
        "sampled per round, 6 rounds, plain and secure on the IID split only; "
        "on breast-cancer, plain FedAvg on the IID split only and Dirichlet "
        "alpha 0.1 as the only non-IID split (the full run adds 0.5); two "
        "rounds per simulation, so one timed round per protocol and size; two "
        "client counts, so the clients-axis fit passes exactly through both "
        "points.",
    ),
)

FULL_EPSILONS = (1.0, 3.0, 8.0)

FULL_PROFILE = Profile(
    name=FULL,
    accuracy=(
        DatasetPlan(
            dataset=BREAST_CANCER,
            num_supernodes=10,
            target_accuracy=BREAST_CANCER_TARGET,
            base_overrides={"num-server-rounds": 20},
            configurations=full_configurations(FULL_EPSILONS),
        ),
        DatasetPlan(
            dataset=FASHION_MNIST,
            num_supernodes=20,
            target_accuracy=FASHION_MNIST_TARGET,
            base_overrides={
                "num-server-rounds": 20,
                "local-epochs": 1,
                "batch-size": 32,
                "learning-rate": 0.05,
            },
            configurations=full_configurations(FULL_EPSILONS),
        ),
    ),
    cost=CostPlan(
        clients=10, params=(10_000, 100_000, 1_000_000, 10_000_000), rounds=3
    ),
    scaling=ScalingPlan(
        clients=(10, 30, 100, 300, 1000),
        clients_axis_params=10_000,
        params=(10_000, 100_000, 1_000_000, 10_000_000),
        params_axis_clients=10,
        rounds=3,
    ),
    attacks=AttackPlan(
        gradient_inversion={"num_images": 4, "quick": False},
        membership_inference={"quick": False},
        membership_epochs=30,
    ),
    launch_timeout_s=7200.0,
    point_timeout_s=7200.0,
)

PROFILES = {
    profile.name: profile for profile in (SMOKE_PROFILE, QUICK_PROFILE, FULL_PROFILE)
}
