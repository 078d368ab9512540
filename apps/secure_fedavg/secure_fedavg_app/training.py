"""Local training and evaluation of the received model on this node's partition.

This module imports torch; the ClientApp imports it only in the stages that
train or evaluate, so the key-exchange and unmask stages of secure
aggregation, each a new process in a deployment, start without it.
"""

import logging

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsec_flwr.core.bounds import lower_bound_text
from fedsec_flwr.dp import TargetEpsilonUnreachableError, rdp_epsilon_floor
from secure_fedavg_app.data import FloatArray, LabelArray, load_partition
from secure_fedavg_app.models import build_model
from secure_fedavg_app.node_policy import NodePolicy
from secure_fedavg_app.settings import AppSettings
from secure_fedavg_app.task import derive_seed, evaluate, train, use_single_thread

logger = logging.getLogger("fedsec_flwr.apps.secure_fedavg")

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
SERVER_ROUND_KEY = "server-round"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DP_SGD_STATE_KEY = "fedsec.dp-sgd"


def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local partition.

    Raises:
        ValueError: In runs with secure aggregation or DP, or when the node
            config requires them. The metrics would reach the server in
            clear, and a server can pick the model to learn statistics of
            the partition. The strategy evaluates centrally and sends no
            evaluate message.
    """
    settings = AppSettings.from_run_config(context.run_config)
    if _private_round(settings, context):
        raise ValueError(
            "This node rejects evaluate messages in runs with secure "
            "aggregation or DP, or when its node config requires them, because "
            "the metrics of its data would reach the server in clear."
        )
    use_single_thread()
    features, labels = _local_partition(settings, context)

    model = _model_from_message(settings, msg)
    result = evaluate(model, features, labels)

    metrics = MetricRecord(
        {
            "num-examples": len(labels),
            "accuracy": result.accuracy,
            "loss": result.loss,
        }
    )
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def plain_train(msg: Message, context: Context) -> Message:
    """Train the received model and reply with its arrays and train metrics.

    The reply contains ArrayRecord ``arrays`` with the same keys, in the same
    order, as the received one, and MetricRecord ``metrics`` with
    ``num-examples`` and, in plain rounds without DP, ``train-loss`` (mean
    cross-entropy, nats).
    """
    settings = AppSettings.from_run_config(context.run_config)
    use_single_thread()
    features, labels = _local_partition(settings, context)

    model = _model_from_message(settings, msg)
    partition_id = int(context.node_config[PARTITION_ID_KEY])
    seed = derive_seed(settings.seed, _server_round(msg), partition_id)
    extra_metrics: dict[str, float] = {}
    if settings.dp_sgd:
        state, train_loss, extra_metrics = _train_dp_sgd(
            settings, model, features, labels, context, seed
        )
    else:
        train_loss = train(
            model,
            features,
            labels,
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=seed,
        )
        state = model.state_dict()

    if extra_metrics and (
        settings.dp_mode != "off"
        or NodePolicy.from_node_config(context.node_config).private
    ):
        # The DP-SGD epsilon depends on this node's number of examples, which
        # client-level DP and a private node's policy keep from the server.
        logger.info("DP-SGD sample-level epsilon: %s", extra_metrics)
        extra_metrics = {}
    received_keys = list(msg.content.array_records[ARRAYS_KEY].keys())
    arrays = ArrayRecord({key: state[key] for key in received_keys})
    metrics = MetricRecord({"num-examples": len(labels), **extra_metrics})
    if not _private_round(settings, context):
        metrics["train-loss"] = train_loss
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


def _train_dp_sgd(
    settings: AppSettings,
    model: nn.Module,
    features: FloatArray,
    labels: LabelArray,
    context: Context,
    seed: int,
) -> tuple[dict[str, torch.Tensor], float, dict[str, float]]:
    """Train with Opacus DP-SGD; the accountant's ledger lives in Context.state."""
    from fedsec_flwr.dp.dpsgd import DPSGDConfig, train_dp_sgd

    config = DPSGDConfig(
        delta=settings.delta,
        noise_multiplier=settings.dp_sgd_noise_multiplier or None,
        target_epsilon=settings.dp_sgd_target_epsilon or None,
        num_rounds=settings.num_server_rounds
        if settings.dp_sgd_target_epsilon
        else None,
        max_grad_norm=settings.dp_sgd_max_grad_norm,
    )
    torch.manual_seed(seed)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(features), torch.from_numpy(labels)),
        batch_size=settings.batch_size,
    )
    record = context.state.config_records.get(DP_SGD_STATE_KEY)
    previous = record.get("ledger") if record is not None else None
    try:
        result = train_dp_sgd(
            model,
            loader,
            epochs=settings.local_epochs,
            learning_rate=settings.learning_rate,
            config=config,
            state=previous if isinstance(previous, bytes) else None,
        )
    except TargetEpsilonUnreachableError as error:
        raise ValueError(_explain_dp_sgd_target(settings, error)) from error
    except RuntimeError as error:
        # Such messages can give epsilon or step counts, which depend on the
        # partition's size, and the error reply travels in clear.
        logger.error("DP-SGD training failed: %s", error, exc_info=True)
        raise RuntimeError(
            f"DP-SGD training failed on this node ({type(error).__name__}); "
            "its log gives the reason."
        ) from None

    context.state[DP_SGD_STATE_KEY] = ConfigRecord({"ledger": result.state})
    metrics = {
        "sample-epsilon": result.cumulative_epsilon,
        "sample-round-epsilon": result.round_epsilon,
    }
    return result.state_dict, result.train_loss, metrics


def _explain_dp_sgd_target(
    settings: AppSettings, error: TargetEpsilonUnreachableError
) -> str:
    """Say in run-config keys why DP-SGD cannot meet its target.

    The text travels to the server in clear, so it gives no value that
    depends on the partition's size.
    """
    target = settings.dp_sgd_target_epsilon
    floor = rdp_epsilon_floor(settings.delta)
    if target < floor:
        return (
            f"dp-sgd-target-epsilon {target} is below {lower_bound_text(floor)}, "
            "the smallest "
            f"epsilon the RDP accountant reports at delta {settings.delta} with "
            "any noise. Raise dp-sgd-target-epsilon or delta."
        )
    return (
        f"dp-sgd-target-epsilon {target} with delta {settings.delta} needs a DP-SGD "
        f"noise multiplier above {error.noise_multiplier_limit:g} on this node's "
        f"partition, over num-server-rounds {settings.num_server_rounds} of "
        f"local-epochs {settings.local_epochs} at batch-size {settings.batch_size}. "
        "Raise dp-sgd-target-epsilon or delta, or lower num-server-rounds, "
        "local-epochs or batch-size."
    )


def _local_partition(
    settings: AppSettings, context: Context
) -> tuple[FloatArray, LabelArray]:
    for key in (PARTITION_ID_KEY, NUM_PARTITIONS_KEY):
        if key not in context.node_config:
            raise ValueError(
                f"node_config must contain {key!r}, which the simulation engine "
                f"sets. Found keys {sorted(context.node_config)}."
            )
    return load_partition(
        settings.dataset,
        settings.seed,
        int(context.node_config[PARTITION_ID_KEY]),
        int(context.node_config[NUM_PARTITIONS_KEY]),
        settings.partitioning,
        settings.dirichlet_alpha,
    )


def _model_from_message(settings: AppSettings, msg: Message) -> nn.Module:
    if ARRAYS_KEY not in msg.content.array_records:
        raise ValueError(
            f"The message must contain an ArrayRecord {ARRAYS_KEY!r}. "
            f"Found {sorted(msg.content.array_records)}."
        )
    model = build_model(
        settings.dataset, dp_sgd=settings.dp_sgd, hidden_units=settings.hidden_units
    )
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    return model


def _private_round(settings: AppSettings, context: Context) -> bool:
    """Return whether the server may learn nothing per client but the update.

    That holds when the run config or this node's policy requires secure
    aggregation or DP. The mods send the handler's metrics in clear, and a
    loss or accuracy is a statistic of this client's data that neither
    secure aggregation nor DP covers, so such rounds leave them out.
    """
    return (
        settings.secure_aggregation
        or settings.dp_mode != "off"
        or settings.dp_sgd
        or NodePolicy.from_node_config(context.node_config).private
    )


def _server_round(msg: Message) -> int:
    if CONFIG_KEY not in msg.content.config_records:
        return 0
    value = msg.content.config_records[CONFIG_KEY].get(SERVER_ROUND_KEY, 0)
    return value if isinstance(value, int) else 0
