"""Build fedsec_flwr's SecureFedAvg strategy from the app settings."""

import re
from collections.abc import Callable
from pathlib import Path

from fedsec_flwr import (
    FailurePolicy,
    RoundReport,
    SecAggConfig,
    SecureFedAvg,
    ServerMomentum,
    VerificationConfig,
)
from fedsec_flwr.core.bounds import lower_bound_text, upper_bound_text
from fedsec_flwr.dp import TargetEpsilonUnreachableError, rdp_epsilon_floor
from fedsec_flwr.dp.accounting import MAX_PRV_STEPS
from fedsec_flwr.privacy import DPConfig, DPMode, NoiseHeadroomError
from secure_fedavg_app.settings import AppSettings

STRATEGY_NAME = "fedsec_flwr.SecureFedAvg"

RoundCallback = Callable[[RoundReport], None]

RUN_CONFIG_KEYS = {
    "clip_range": "secagg-clip-range",
    "num_neighbours": "secagg-neighbours",
    "threshold": "secagg-threshold",
    "max_weight": "secagg-max-weight",
    "max_clients": "secagg-max-clients",
    "stage_timeout": "secagg-timeout",
    "key_lifetime": "secagg-key-lifetime",
    "clipping_norm": "clipping-norm",
    "noise_multiplier": "noise-multiplier",
    "target_epsilon": "target-epsilon",
    "accountant": "dp-accountant",
    "target_quantile": "clipping-quantile",
    "clipping_learning_rate": "clipping-learning-rate",
    "max_dropout_fraction": "dp-max-dropout-fraction",
    "min_train_nodes": "min-train-clients",
    "min_available_nodes": "min-train-clients",
    "fraction_train": "fraction-train",
    "secure_aggregation": "secure-aggregation",
    "differential_privacy": "dp-mode",
    "client_sampling": "client-sampling",
    "secure_aggregation.max_clients": "secagg-max-clients",
    "server_momentum": "server-momentum",
}
"""Run-config key of each library parameter that the app sets from one."""

_LONGEST_FIRST = sorted(RUN_CONFIG_KEYS, key=len, reverse=True)

_PARAMETER_PATTERN = re.compile(
    r"\b(?:("
    + "|".join(re.escape(key) for key in _LONGEST_FIRST if "_" in key)
    + r")|("
    + "|".join(re.escape(key) for key in _LONGEST_FIRST if "_" not in key)
    + r")(?= must|=))\b"
)
"""Parameter names in messages. A name without an underscore is also a
common word, so it counts only before " must" or "="."""


def name_run_config_keys(message: str) -> str:
    """Name the run-config key of each library parameter in ``message``.

    A parameter that is its key spelt with underscores, such as
    ``target_epsilon``, is replaced by the key. Any other keeps its name
    after the key, as in ``secagg-max-clients (max_clients)``.
    """

    def name(match: re.Match[str]) -> str:
        parameter = match.group(1) or match.group(2)
        key = RUN_CONFIG_KEYS[parameter]
        if key == parameter.replace("_", "-"):
            return key
        return f"{key} ({parameter})"

    return _PARAMETER_PATTERN.sub(name, message)


def explain_unreachable_target(
    error: TargetEpsilonUnreachableError, settings: AppSettings
) -> str:
    """Say in run-config keys why client-level DP cannot meet its target.

    Only the keys that can lower epsilon in this configuration are named.
    """
    # The PRV accountant reaches lower epsilons, in central mode only.
    prv_possible = (
        settings.dp_mode == DPMode.CENTRAL.value
        and settings.dp_accountant == "rdp"
        and settings.num_server_rounds <= MAX_PRV_STEPS
    )
    floor = rdp_epsilon_floor(settings.delta)
    if settings.dp_accountant == "rdp" and settings.target_epsilon < floor:
        prv = ', or set dp-accountant="prv"' if prv_possible else ""
        return (
            f"target-epsilon {settings.target_epsilon} is below "
            f"{lower_bound_text(floor)}, the "
            f"smallest epsilon the RDP accountant reports at delta {settings.delta} "
            f"with any noise. Raise target-epsilon or delta{prv}."
        )

    reach = (
        f"target-epsilon {settings.target_epsilon} with delta {settings.delta} over "
        f"num-server-rounds {settings.num_server_rounds}"
    )
    changes = ["raise target-epsilon or delta"]
    if settings.num_server_rounds > 1:
        changes.append("lower num-server-rounds")
    if settings.client_sampling == "poisson":
        changes.append("lower fraction-train")

    if error.limited_by_modulus:
        problem = (
            f"{reach} cannot be met in distributed mode: every noise multiplier "
            "whose noise fits the secure sum gives a larger epsilon"
        )
        changes.append("lower secagg-max-clients")
        if settings.verification:
            changes.append("set verification=false")
        return f"{problem}. {_sentence(changes)} to leave the noise more room."

    problem = f"{reach} needs a noise multiplier above {error.noise_multiplier_limit:g}"
    if error.epsilon_at_limit is not None:
        problem += f", which still gives epsilon {error.epsilon_at_limit:.4g}"
    if prv_possible:
        changes.append('set dp-accountant="prv"')
    return f"{problem}. {_sentence(changes)}."


def explain_noise_headroom(error: NoiseHeadroomError, settings: AppSettings) -> str:
    """Say in run-config keys why a fixed distributed noise multiplier cannot run.

    The library's message names its own parameters, such as max_weight and
    the quantization bits, which a DP run of the app cannot set.
    """
    problem = (
        f"noise-multiplier {settings.noise_multiplier} adds more noise than the "
        "secure sum of dp-mode=distributed leaves room for"
    )
    changes = []
    if error.max_noise_multiplier is not None:
        largest = upper_bound_text(error.max_noise_multiplier)
        changes.append(f"lower noise-multiplier to at most {largest}")
    # Each client that secagg-max-clients allows takes room for its encoded
    # update and, with verification, for its commitment offset.
    changes.append("lower secagg-max-clients")
    if error.verified:
        changes.append("set verification=false")
    return f"{problem}. {_sentence(changes)} to leave the noise more room."


def _sentence(changes: list[str]) -> str:
    """Join ``changes`` as one capitalized clause: "A, b or c"."""
    text = (
        changes[0]
        if len(changes) == 1
        else (", ".join(changes[:-1]) + ", or " + changes[-1])
    )
    return text[0].upper() + text[1:]


def build_secagg_config(settings: AppSettings) -> SecAggConfig | None:
    """Return the secure-aggregation parameters, or None for plain FedAvg.

    A ``secagg-neighbours`` or ``secagg-threshold`` of 0 selects the automatic
    value of ``SecAggConfig``.

    Raises:
        ValueError: If ``SecAggConfig`` rejects a value; the message is
            prefixed with the run-config keys it comes from.
    """
    if not settings.secure_aggregation:
        return None
    return _secagg_parameters(settings)


def _secagg_parameters(settings: AppSettings) -> SecAggConfig:
    try:
        return SecAggConfig(
            clip_range=settings.secagg_clip_range,
            num_neighbours=settings.secagg_neighbours or None,
            threshold=settings.secagg_threshold or None,
            max_weight=settings.secagg_max_weight,
            max_clients=settings.secagg_max_clients,
            stage_timeout=settings.secagg_timeout,
            key_lifetime=settings.secagg_key_lifetime,
        )
    except ValueError as error:
        raise ValueError(
            f"Invalid secagg-* run config: {name_run_config_keys(str(error))}"
        ) from error


def build_dp_config(settings: AppSettings) -> DPConfig | None:
    """Return the client-level DP parameters, or None when ``dp-mode`` is off.

    Raises:
        ValueError: If ``DPConfig`` rejects a value.
    """
    if settings.dp_mode == "off":
        return None

    try:
        return DPConfig(
            mode=DPMode(settings.dp_mode),
            clipping_norm=settings.clipping_norm,
            noise_multiplier=settings.noise_multiplier or None,
            target_epsilon=settings.target_epsilon or None,
            delta=settings.delta,
            accountant=settings.dp_accountant,
            adaptive_clipping=settings.adaptive_clipping,
            target_quantile=settings.clipping_quantile,
            clipping_learning_rate=settings.clipping_learning_rate,
            max_dropout_fraction=settings.dp_max_dropout_fraction,
        )
    except ValueError as error:
        raise ValueError(
            f"Invalid DP run config: {name_run_config_keys(str(error))}"
        ) from error


def build_verification_config(
    settings: AppSettings, audit_path: Path
) -> VerificationConfig | None:
    """Return the verification settings, or None when ``verification`` is off."""
    if not settings.verification:
        return None
    return VerificationConfig(
        audit_path=audit_path,
        on_failure=FailurePolicy(settings.verification_policy),
        pipelined=settings.verification_pipelined,
        plain_encoding=_secagg_parameters(settings),
    )


def build_server_momentum(settings: AppSettings) -> ServerMomentum | None:
    """Return the server's learning rate and momentum, or None for plain FedAvg.

    ``AppSettings.validate`` checks both ranges, so ``ServerMomentum``
    accepts validated settings.
    """
    if not settings.uses_server_momentum:
        return None
    return ServerMomentum(
        learning_rate=settings.server_learning_rate,
        momentum=settings.server_momentum,
    )


def build_strategy(
    settings: AppSettings, on_round_end: RoundCallback, *, audit_path: Path
) -> SecureFedAvg:
    """Build the strategy selected by ``settings``.

    Args:
        settings: Validated run settings.
        on_round_end: Called with each round's report after its central
            evaluation.
        audit_path: File that receives each verified round's transcript.

    Returns:
        ``SecureFedAvg`` with secure aggregation when ``secure-aggregation``
        is true, and in its explicit plain-FedAvg mode otherwise.

    Raises:
        ValueError: If the settings do not combine; the message names the
            run-config keys.
    """
    secure_aggregation = build_secagg_config(settings)
    differential_privacy = build_dp_config(settings)
    verification = build_verification_config(settings, audit_path) or False
    try:
        return SecureFedAvg(
            secure_aggregation=secure_aggregation,
            fraction_train=settings.fraction_train,
            min_train_nodes=settings.min_train_clients,
            min_available_nodes=settings.min_train_clients,
            differential_privacy=differential_privacy,
            verification=verification,
            client_sampling=settings.client_sampling,
            on_round_end=on_round_end,
            server_momentum=build_server_momentum(settings),
        )
    except ValueError as error:
        raise ValueError(
            f"Invalid run config: {name_run_config_keys(str(error))}"
        ) from error
