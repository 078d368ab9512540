"""Build fedsec_flwr's SecureFedAvg strategy from the app settings."""

from collections.abc import Callable

from fedsec_flwr import RoundReport, SecAggConfig, SecureFedAvg
from secure_fedavg_app.settings import AppSettings

STRATEGY_NAME = "fedsec_flwr.SecureFedAvg"

RoundCallback = Callable[[RoundReport], None]


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

    try:
        return SecAggConfig(
            clip_range=settings.secagg_clip_range,
            num_neighbours=settings.secagg_neighbours or None,
            threshold=settings.secagg_threshold or None,
            max_weight=settings.secagg_max_weight,
            max_clients=settings.secagg_max_clients,
            stage_timeout=settings.secagg_timeout,
        )
    except ValueError as error:
        raise ValueError(f"Invalid secagg-* run config: {error}") from error


def build_strategy(settings: AppSettings, on_round_end: RoundCallback) -> SecureFedAvg:
    """Build the strategy selected by ``settings``.

    Args:
        settings: Validated run settings.
        on_round_end: Called with each round's report after its central
            evaluation.

    Returns:
        ``SecureFedAvg`` with secure aggregation when ``secure-aggregation``
        is true, and in its explicit plain-FedAvg mode otherwise.
    """
    return SecureFedAvg(
        secure_aggregation=build_secagg_config(settings),
        fraction_train=settings.fraction_train,
        min_train_nodes=settings.min_train_clients,
        min_available_nodes=settings.min_train_clients,
        on_round_end=on_round_end,
    )
