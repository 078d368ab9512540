"""Typed, validated view of the app's run config.

The keys and their defaults live in ``[tool.flwr.app.config]`` of the app's
``pyproject.toml``; ``flwr run --run-config`` overrides them. Every key is
checked here once, with errors that name the key, the constraint and the value.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TypeVar

from fedsec_flwr.config import KEY_LIFETIMES
from fedsec_flwr.core.bounds import lower_bound_text, upper_bound_text
from fedsec_flwr.dp.accounting import (
    MAX_PRV_STEPS,
    MAX_SEARCH_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    check_delta,
)
from fedsec_flwr.dp.adaptive import MAX_LEARNING_RATE as MAX_CLIPPING_LEARNING_RATE
from fedsec_flwr.dp.clipping import MIN_MAX_GRAD_NORM
from fedsec_flwr.privacy import DEFAULT_MAX_DROPOUT_FRACTION
from secure_fedavg_app.data import DATASET_NAMES, PARTITIONING_NAMES

ConfigValue = bool | int | float | str

DP_MODES = ("off", "central", "distributed")
SAMPLINGS = ("fixed", "poisson")
ACCOUNTANTS = ("rdp", "prv")
POLICIES = ("refuse", "report")

MAX_CONFIG_INT = 2**31 - 1
"""Largest magnitude of an integer setting; no setting of the app needs more."""

MAX_HIDDEN_UNITS = 65_536
"""Widest hidden layer: the Fashion-MNIST CNN then has 34 million parameters.

It is defined here, not with the models, so that reading the run config
does not import torch.
"""

_Value = TypeVar("_Value", str, bool, int, float)

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32, the dtype of the models' weights."""

SECAGG_FIELDS = (
    "secagg_clip_range",
    "secagg_neighbours",
    "secagg_threshold",
    "secagg_max_weight",
    "secagg_max_clients",
    "secagg_timeout",
    "secagg_key_lifetime",
)
"""Settings of secure aggregation. Plain verified rounds also read the encoding ones."""

PROTOCOL_ONLY_SECAGG_FIELDS = (
    "secagg_neighbours",
    "secagg_threshold",
    "secagg_timeout",
    "secagg_key_lifetime",
)
"""Settings that only the secure-aggregation protocol reads, not the encoding."""


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    """Run settings of the secure FedAvg app; units are given per field.

    Attributes:
        dataset: Dataset name.
        hidden_units: Width of the model's hidden layer; 0 for the
            dataset's default.
        num_server_rounds: Number of federated rounds.
        seed: Seed of the data split, the partitions, model initialization
            and local training.
        secure_aggregation: Whether the server learns only the sum of updates.
        local_epochs: Passes over the local partition per round.
        batch_size: Examples per SGD step.
        learning_rate: SGD step size.
        fraction_train: Fraction of connected clients sampled per round.
        min_train_clients: Smallest number of clients sampled per round.
        partitioning: ``iid`` or ``dirichlet``.
        dirichlet_alpha: Dirichlet concentration; smaller is more skewed.
        output_dir: Folder that receives ``results.json``.
        secagg_clip_range: Largest absolute value of one model-update
            coordinate before quantization; larger values are clipped.
        secagg_neighbours: SecAgg+ neighbours per client, 0 for automatic.
        secagg_threshold: Shares needed to unmask, 0 for automatic.
        secagg_max_weight: Largest ``num-examples`` a client may report.
        secagg_max_clients: Largest number of clients in one round.
        secagg_timeout: Seconds allowed for each protocol stage.
        secagg_key_lifetime: ``round`` for new keys every round (four
            exchanges), ``run`` for keys agreed once per run (two exchanges
            per round).
        dp_mode: Client-level DP: ``off``, ``central`` or ``distributed``.
        noise_multiplier: Client-level DP noise over the clipping norm; 0
            means calibrate from ``target_epsilon``.
        target_epsilon: Client-level epsilon budget of the run; 0 means use
            ``noise_multiplier``.
        delta: Delta of the DP guarantees (client level and DP-SGD).
        clipping_norm: L2 bound of each client's model update.
        adaptive_clipping: Track a quantile of update norms instead.
        clipping_quantile: Target quantile of adaptive clipping.
        clipping_learning_rate: Step size of adaptive clipping.
        client_sampling: ``fixed`` or ``poisson`` (needed for amplification).
        dp_accountant: ``rdp`` or ``prv``.
        dp_max_dropout_fraction: Share of a round's sampled clients that may
            drop out without passing ``target_epsilon`` in distributed mode.
        dp_sgd: Train on clients with Opacus DP-SGD (sample-level DP).
        dp_sgd_noise_multiplier: DP-SGD noise multiplier; 0 means calibrate
            from ``dp_sgd_target_epsilon``.
        dp_sgd_target_epsilon: Sample-level epsilon budget over the run.
        dp_sgd_max_grad_norm: Per-example gradient clipping norm.
        verification: Check every round's aggregate against the clients'
            commitments.
        verification_policy: ``refuse`` (fail the run and stop clients from
            training on a model that failed) or ``report``.
        verification_pipelined: Send each round's commit and verify requests
            with the next round's first two exchanges.
        client_timings: Clients add the seconds they spent training, encoding
            and masking to their replies, in clear.
        server_learning_rate: Server step size on the velocity of the mean
            updates; with ``server_momentum`` 0, 1 is plain FedAvg.
        server_momentum: Share of the previous rounds' velocity kept in
            each round (FedAvgM); 0 for none.
    """

    dataset: str
    hidden_units: int = 0
    num_server_rounds: int
    seed: int
    secure_aggregation: bool
    local_epochs: int
    batch_size: int
    learning_rate: float
    fraction_train: float
    min_train_clients: int
    partitioning: str
    dirichlet_alpha: float = 0.5
    output_dir: str
    secagg_clip_range: float = 1.0
    secagg_neighbours: int = 0
    secagg_threshold: int = 0
    secagg_max_weight: int = 10_000
    secagg_max_clients: int = 100
    secagg_timeout: float = 120.0
    secagg_key_lifetime: str = "round"
    dp_mode: str = "off"
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    clipping_norm: float = 1.0
    adaptive_clipping: bool = False
    clipping_quantile: float = 0.5
    clipping_learning_rate: float = 0.2
    client_sampling: str = "fixed"
    dp_accountant: str = "rdp"
    dp_max_dropout_fraction: float = DEFAULT_MAX_DROPOUT_FRACTION
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = 0.0
    dp_sgd_target_epsilon: float = 0.0
    dp_sgd_max_grad_norm: float = 1.0
    verification: bool = False
    verification_policy: str = "refuse"
    verification_pipelined: bool = False
    client_timings: bool = False
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, ConfigValue]) -> "AppSettings":
        """Parse and validate a Flower run config.

        Raises:
            ValueError: If a key is missing, has the wrong type or is out of range.
        """
        reader = _Reader(run_config)
        read = reader.read
        settings = cls(
            dataset=read(_get_str, "dataset"),
            hidden_units=read(_get_int, "hidden-units"),
            num_server_rounds=read(_get_int, "num-server-rounds"),
            seed=read(_get_int, "seed"),
            secure_aggregation=read(_get_bool, "secure-aggregation"),
            local_epochs=read(_get_int, "local-epochs"),
            batch_size=read(_get_int, "batch-size"),
            learning_rate=read(_get_float, "learning-rate"),
            fraction_train=read(_get_float, "fraction-train"),
            min_train_clients=read(_get_int, "min-train-clients"),
            partitioning=read(_get_str, "partitioning"),
            dirichlet_alpha=read(_get_float, "dirichlet-alpha"),
            output_dir=read(_get_str, "output-dir"),
            secagg_clip_range=read(_get_float, "secagg-clip-range"),
            secagg_neighbours=read(_get_int, "secagg-neighbours"),
            secagg_threshold=read(_get_int, "secagg-threshold"),
            secagg_max_weight=read(_get_int, "secagg-max-weight"),
            secagg_max_clients=read(_get_int, "secagg-max-clients"),
            secagg_timeout=read(_get_float, "secagg-timeout"),
            secagg_key_lifetime=read(_get_str, "secagg-key-lifetime"),
            dp_mode=read(_get_str, "dp-mode"),
            noise_multiplier=read(_get_float, "noise-multiplier"),
            target_epsilon=read(_get_float, "target-epsilon"),
            delta=read(_get_float, "delta"),
            clipping_norm=read(_get_float, "clipping-norm"),
            adaptive_clipping=read(_get_bool, "adaptive-clipping"),
            clipping_quantile=read(_get_float, "clipping-quantile"),
            clipping_learning_rate=read(_get_float, "clipping-learning-rate"),
            client_sampling=read(_get_str, "client-sampling"),
            dp_accountant=read(_get_str, "dp-accountant"),
            dp_max_dropout_fraction=read(_get_float, "dp-max-dropout-fraction"),
            dp_sgd=read(_get_bool, "dp-sgd"),
            dp_sgd_noise_multiplier=read(_get_float, "dp-sgd-noise-multiplier"),
            dp_sgd_target_epsilon=read(_get_float, "dp-sgd-target-epsilon"),
            dp_sgd_max_grad_norm=read(_get_float, "dp-sgd-max-grad-norm"),
            verification=read(_get_bool, "verification"),
            verification_policy=read(_get_str, "verification-policy"),
            verification_pipelined=read(_get_bool, "verification-pipelined"),
            client_timings=read(_get_bool, "client-timings"),
            server_learning_rate=read(_get_float, "server-learning-rate"),
            server_momentum=read(_get_float, "server-momentum"),
        )
        if reader.problems:
            raise ValueError("Invalid run config: " + " ".join(reader.problems))
        settings.validate()
        return settings

    @property
    def uses_server_momentum(self) -> bool:
        """Whether the server steps differ from adding the mean update."""
        return self.server_learning_rate != 1.0 or self.server_momentum != 0.0

    def validate(self) -> None:
        """Check every range at once and raise one error that lists each problem.

        Raises:
            ValueError: If any value is out of range.
        """
        problems = [problem for problem in self._find_problems() if problem]
        if problems:
            raise ValueError("Invalid run config: " + " ".join(problems))

    def _find_problems(self) -> list[str]:
        return [
            _check_choice("dataset", self.dataset, DATASET_NAMES),
            _check_hidden_units(self.hidden_units),
            _check_choice("partitioning", self.partitioning, PARTITIONING_NAMES),
            _check_min("num-server-rounds", self.num_server_rounds, 1),
            _check_min("seed", self.seed, 0),
            _check_min("local-epochs", self.local_epochs, 1),
            _check_min("batch-size", self.batch_size, 1),
            _check_positive("learning-rate", self.learning_rate),
            _check_float32("learning-rate", self.learning_rate),
            _check_fraction("fraction-train", self.fraction_train),
            _check_min("min-train-clients", self.min_train_clients, 1),
            _check_positive("dirichlet-alpha", self.dirichlet_alpha),
            _check_nonempty("output-dir", self.output_dir),
            _check_positive("secagg-clip-range", self.secagg_clip_range),
            _check_clip_range(self.secagg_clip_range),
            _check_neighbours(self.secagg_neighbours),
            _check_min("secagg-threshold", self.secagg_threshold, 0),
            _check_min("secagg-max-weight", self.secagg_max_weight, 1),
            _check_min("secagg-max-clients", self.secagg_max_clients, 2),
            _check_positive("secagg-timeout", self.secagg_timeout),
            _check_choice(
                "secagg-key-lifetime", self.secagg_key_lifetime, KEY_LIFETIMES
            ),
            _check_choice("dp-mode", self.dp_mode, DP_MODES),
            _check_choice("client-sampling", self.client_sampling, SAMPLINGS),
            _check_choice("dp-accountant", self.dp_accountant, ACCOUNTANTS),
            _check_min_float("noise-multiplier", self.noise_multiplier),
            _check_noise_floor("noise-multiplier", self.noise_multiplier),
            _check_min_float("target-epsilon", self.target_epsilon),
            _check_delta(self.delta),
            _check_dropout_fraction(
                "dp-max-dropout-fraction", self.dp_max_dropout_fraction
            ),
            _check_positive("clipping-norm", self.clipping_norm),
            _check_open_fraction("clipping-quantile", self.clipping_quantile),
            _check_clipping_learning_rate(self.clipping_learning_rate),
            _check_min_float("dp-sgd-noise-multiplier", self.dp_sgd_noise_multiplier),
            _check_noise_floor("dp-sgd-noise-multiplier", self.dp_sgd_noise_multiplier),
            _check_min_float("dp-sgd-target-epsilon", self.dp_sgd_target_epsilon),
            _check_grad_norm_floor(self.dp_sgd_max_grad_norm),
            _check_float32("dp-sgd-max-grad-norm", self.dp_sgd_max_grad_norm),
            _check_choice("verification-policy", self.verification_policy, POLICIES),
            _check_positive("server-learning-rate", self.server_learning_rate),
            _check_float32("server-learning-rate", self.server_learning_rate),
            _check_dropout_fraction("server-momentum", self.server_momentum),
            self._check_noise_choice(),
            self._check_accountant_steps(),
            *self._check_unused_settings(),
            *self._check_protocol_combinations(),
        ]

    def _check_protocol_combinations(self) -> list[str]:
        # The strategy rejects these too, but its messages name its own
        # parameters, and these name the run-config keys.
        problems = []
        if self.dp_mode == "distributed" and not self.secure_aggregation:
            problems.append(
                "dp-mode=distributed needs secure-aggregation=true, because the "
                "clients add their noise inside the secure sum; found "
                "secure-aggregation=false."
            )
        if self.verification and self.dp_mode == "central":
            problems.append(
                "verification=true cannot be combined with dp-mode=central: the "
                "clients would check the sum before the server adds noise, so "
                "each of them would see the sum without noise. Use "
                "dp-mode=distributed."
            )
        if self.verification and self.uses_server_momentum:
            problems.append(
                "server-learning-rate and server-momentum cannot be changed with "
                "verification=true: each client checks that the next model is the "
                "previous one plus the verified mean update. Found "
                f"server-learning-rate={self.server_learning_rate} and "
                f"server-momentum={self.server_momentum}."
            )
        round_keys = self.secagg_key_lifetime == "round"
        if self.verification_pipelined and not (self.secure_aggregation and round_keys):
            secure = str(self.secure_aggregation).lower()
            problems.append(
                "verification-pipelined=true needs secure-aggregation=true and "
                f'secagg-key-lifetime="round"; found secure-aggregation={secure} '
                f'and secagg-key-lifetime="{self.secagg_key_lifetime}".'
            )
        encodes = self.secure_aggregation or self.verification
        if encodes and self.min_train_clients > self.secagg_max_clients:
            problems.append(
                f"min-train-clients={self.min_train_clients} is above "
                f"secagg-max-clients={self.secagg_max_clients}, so no round can "
                "start. Raise secagg-max-clients or lower min-train-clients."
            )
        return problems

    def _check_unused_settings(self) -> list[str]:
        # A setting that the other settings switch off is most likely a
        # mistake, for example noise asked for with dp-mode still off.
        problems = []
        if self.dp_mode == "off":
            settings = (
                ("noise-multiplier", self.noise_multiplier, self.noise_multiplier > 0),
                ("target-epsilon", self.target_epsilon, self.target_epsilon > 0),
                ("adaptive-clipping", "true", self.adaptive_clipping),
            )
            unused = [f"{key}={value}" for key, value, used in settings if used]
            if unused:
                problems.append(
                    f"dp-mode is off, so {', '.join(unused)} would have no effect; "
                    "set dp-mode to central or distributed, or remove them."
                )
        distributed_target = self.dp_mode == "distributed" and self.target_epsilon > 0
        if (
            self.dp_max_dropout_fraction != DEFAULT_MAX_DROPOUT_FRACTION
            and not distributed_target
        ):
            problems.append(
                f"dp-max-dropout-fraction={self.dp_max_dropout_fraction} applies only "
                "to dp-mode=distributed with target-epsilon above 0; found "
                f"dp-mode={self.dp_mode} and target-epsilon={self.target_epsilon}."
            )
        unused_by_mode = (
            (
                self.partitioning != "dirichlet",
                f"partitioning is {self.partitioning}",
                ("dirichlet_alpha",),
            ),
            (
                not (self.secure_aggregation or self.verification),
                "secure-aggregation and verification are false",
                SECAGG_FIELDS,
            ),
            (
                self.verification and not self.secure_aggregation,
                "secure-aggregation is false",
                PROTOCOL_ONLY_SECAGG_FIELDS,
            ),
            (
                self.dp_mode == "off",
                "dp-mode is off",
                ("clipping_norm", "dp_accountant"),
            ),
            (
                self.dp_mode != "off",
                f"dp-mode is {self.dp_mode}, whose encoding takes its range from "
                "clipping-norm and gives every client weight 1",
                ("secagg_clip_range", "secagg_max_weight"),
            ),
            (
                self.dp_mode == "off" and not self.dp_sgd,
                "dp-mode is off and dp-sgd is false",
                ("delta",),
            ),
            (
                not self.adaptive_clipping,
                "adaptive-clipping is false",
                ("clipping_quantile", "clipping_learning_rate"),
            ),
            (
                not (self.secure_aggregation or self.verification),
                "secure-aggregation and verification are false, and only their "
                "protocols report client timings",
                ("client_timings",),
            ),
            (not self.dp_sgd, "dp-sgd is false", ("dp_sgd_max_grad_norm",)),
            (not self.verification, "verification is false", ("verification_policy",)),
        )
        for switched_off, reason, names in unused_by_mode:
            changed = self._changed_from_default(names) if switched_off else []
            if changed:
                problems.append(
                    f"{reason}, so {', '.join(changed)} would have no effect; "
                    "remove them, or change the setting that switches them off."
                )
        if self.client_timings and (self.dp_mode != "off" or self.dp_sgd):
            problems.append(
                "client-timings=true is not allowed while DP is on (dp-mode "
                f"{self.dp_mode}, dp-sgd {_config_text(self.dp_sgd)}): the timings "
                "travel in clear and reveal how much data each client has, "
                "outside the DP guarantee. Set client-timings=false."
            )
        if not self.dp_sgd and (
            self.dp_sgd_noise_multiplier > 0 or self.dp_sgd_target_epsilon > 0
        ):
            problems.append(
                "dp-sgd is false, so dp-sgd-noise-multiplier="
                f"{self.dp_sgd_noise_multiplier} and dp-sgd-target-epsilon="
                f"{self.dp_sgd_target_epsilon} would have no effect; set dp-sgd=true "
                "or set them to 0."
            )
        if self.verification_pipelined and not self.verification:
            problems.append(
                "verification-pipelined=true needs verification=true; found "
                "verification=false."
            )
        return problems

    def _check_accountant_steps(self) -> str:
        if self.dp_accountant == "prv" and self.num_server_rounds > MAX_PRV_STEPS:
            return (
                f"dp-accountant=prv composes at most {MAX_PRV_STEPS} rounds, because "
                f"its memory grows with them; found num-server-rounds="
                f"{self.num_server_rounds}. Use dp-accountant=rdp."
            )
        return ""

    def _changed_from_default(self, names: tuple[str, ...]) -> list[str]:
        """Return ``key=value`` for each named field that differs from its default."""
        defaults = {item.name: item.default for item in fields(self)}
        return [
            f"{name.replace('_', '-')}={_config_text(getattr(self, name))}"
            for name in names
            if getattr(self, name) != defaults[name]
        ]

    def _check_noise_choice(self) -> str:
        # An unknown dp-mode is reported by its own check, not as DP on.
        dp_on = self.dp_mode in DP_MODES and self.dp_mode != "off"
        if dp_on and (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            return (
                "With dp-mode on, set exactly one of noise-multiplier and "
                f"target-epsilon above 0; found {self.noise_multiplier} and "
                f"{self.target_epsilon}."
            )
        if self.dp_sgd and (self.dp_sgd_noise_multiplier > 0) == (
            self.dp_sgd_target_epsilon > 0
        ):
            return (
                "With dp-sgd on, set exactly one of dp-sgd-noise-multiplier and "
                f"dp-sgd-target-epsilon above 0; found {self.dp_sgd_noise_multiplier}"
                f" and {self.dp_sgd_target_epsilon}."
            )
        return ""

    def to_run_config(self) -> dict[str, ConfigValue]:
        """Return the settings with their kebab-case run-config keys."""
        return {key.replace("_", "-"): value for key, value in asdict(self).items()}


def _config_text(value: ConfigValue) -> str:
    """Write a value as the run config does: bools as true and false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _require(run_config: Mapping[str, ConfigValue], key: str) -> ConfigValue:
    if key not in run_config:
        raise ValueError(
            f"Run config key {key!r} is missing. Add it to [tool.flwr.app.config]."
        )
    return run_config[key]


class _Reader:
    """Read run-config values, collecting type errors instead of raising.

    A value of the wrong type reads as its type's zero, so that every type
    error of the run config is found before one error lists them all.
    """

    def __init__(self, run_config: Mapping[str, ConfigValue]) -> None:
        self.run_config = run_config
        self.problems: list[str] = []

    def read(
        self, getter: Callable[[Mapping[str, ConfigValue], str], _Value], key: str
    ) -> _Value:
        try:
            return getter(self.run_config, key)
        except ValueError as error:
            self.problems.append(str(error))
            return _ZEROS[getter]  # type: ignore[return-value]


def _get_str(run_config: Mapping[str, ConfigValue], key: str) -> str:
    value = _require(run_config, key)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string. Found {value!r}.")
    return value


def _get_bool(run_config: Mapping[str, ConfigValue], key: str) -> bool:
    value = _require(run_config, key)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false. Found {value!r}.")
    return value


def _get_int(run_config: Mapping[str, ConfigValue], key: str) -> int:
    value = _require(run_config, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer. Found {value!r}.")
    if abs(value) > MAX_CONFIG_INT:
        raise ValueError(
            f"{key} must be at most {MAX_CONFIG_INT} in magnitude. Found {value}."
        )
    return value


def _get_float(run_config: Mapping[str, ConfigValue], key: str) -> float:
    # TOML overrides such as `learning-rate=1` arrive as int, so ints are accepted.
    value = _require(run_config, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number. Found {value!r}.")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{key} must be a finite number. Found {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number. Found {value!r}.")
    return number


_ZEROS: dict[Callable[[Mapping[str, ConfigValue], str], object], object] = {
    _get_str: "",
    _get_bool: False,
    _get_int: 0,
    _get_float: 0.0,
}


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value in choices:
        return ""
    return f"{key} must be one of {', '.join(choices)}; found {value!r}."


def _check_min(key: str, value: int, minimum: int) -> str:
    if value >= minimum:
        return ""
    return f"{key} must be at least {minimum}; found {value}."


def _check_hidden_units(value: int) -> str:
    if 0 <= value <= MAX_HIDDEN_UNITS:
        return ""
    return (
        f"hidden-units must be 0 (the dataset's default) or from 1 to "
        f"{MAX_HIDDEN_UNITS}; found {value}."
    )


def _check_neighbours(value: int) -> str:
    if value == 0 or value >= 2:
        return ""
    return (
        f"secagg-neighbours must be 0 (automatic) or at least 2, because a degree "
        f"of 1 pairs the clients up and the server would learn each pair's sum; "
        f"found {value}."
    )


def _check_min_float(key: str, value: float) -> str:
    if value >= 0.0:
        return ""
    return f"{key} must be at least 0; found {value}."


def _check_clipping_learning_rate(value: float) -> str:
    if 0.0 < value <= MAX_CLIPPING_LEARNING_RATE:
        return ""
    return (
        f"clipping-learning-rate must be in (0, {MAX_CLIPPING_LEARNING_RATE:g}]: "
        "the clipping norm changes by a factor of up to exp(clipping-learning-rate) "
        f"per round; found {value}."
    )


def _check_delta(value: float) -> str:
    # The library's check, so that the app and DPConfig accept the same range.
    try:
        check_delta("delta", value)
    except ValueError as error:
        return str(error)
    return ""


def _check_noise_floor(key: str, value: float) -> str:
    # 0 means "calibrate from the target", so only other values are bounded.
    # A negative value is reported by _check_min_float alone.
    if value < 0.0 or value == 0.0:
        return ""
    if MIN_NOISE_MULTIPLIER <= value <= MAX_SEARCH_NOISE_MULTIPLIER:
        return ""
    return (
        f"{key} must be 0 or in [{MIN_NOISE_MULTIPLIER}, "
        f"{MAX_SEARCH_NOISE_MULTIPLIER:g}] (2**-10 to 2**14); found {value}."
    )


def _check_clip_range(value: float) -> str:
    # The decoded mean update is added to float32 weights, so an update
    # coordinate of up to the clip range must leave room for the weight.
    if value <= FLOAT32_MAX / 2:
        return ""
    return (
        f"secagg-clip-range must be at most {upper_bound_text(FLOAT32_MAX / 2)}, "
        "half the float32 "
        "maximum, so that a weight plus a decoded update coordinate stays finite; "
        f"found {value}."
    )


def _check_grad_norm_floor(value: float) -> str:
    if value >= MIN_MAX_GRAD_NORM:
        return ""
    return (
        "dp-sgd-max-grad-norm must be at least "
        f"{lower_bound_text(MIN_MAX_GRAD_NORM)} (2**-60); "
        f"found {value}."
    )


def _check_float32(key: str, value: float) -> str:
    # torch converts the value to the model's float32, where it must fit.
    if abs(value) <= FLOAT32_MAX:
        return ""
    return (
        f"{key} must be at most {upper_bound_text(FLOAT32_MAX)}, the float32 "
        f"maximum; found {value}."
    )


def _check_positive(key: str, value: float) -> str:
    if value > 0.0:
        return ""
    return f"{key} must be positive; found {value}."


def _check_fraction(key: str, value: float) -> str:
    if 0.0 < value <= 1.0:
        return ""
    return f"{key} must be in (0, 1]; found {value}."


def _check_open_fraction(key: str, value: float) -> str:
    if 0.0 < value < 1.0:
        return ""
    return f"{key} must be in (0, 1); found {value}."


def _check_dropout_fraction(key: str, value: float) -> str:
    if 0.0 <= value < 1.0:
        return ""
    return f"{key} must be in [0, 1); found {value}."


def _check_nonempty(key: str, value: str) -> str:
    if value.strip():
        return ""
    return f"{key} must not be empty or blank; found {value!r}."
