"""ClientApp: train the received model on this node's partition."""

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsec_flwr import secure_aggregation_mod
from secure_fedavg_app.data import FloatArray, LabelArray, load_partition
from secure_fedavg_app.models import build_model
from secure_fedavg_app.settings import AppSettings
from secure_fedavg_app.task import derive_seed, evaluate, train, use_single_thread

logger = logging.getLogger("fedsec_flwr.apps.secure_fedavg")

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
SERVER_ROUND_KEY = "server-round"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train on the local partition, through the secure-aggregation mod if enabled."""
    settings = AppSettings.from_run_config(context.run_config)
    if not settings.secure_aggregation:
        return plain_train(msg, context)

    return secure_aggregation_mod(msg, context, plain_train)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local partition."""
    settings = AppSettings.from_run_config(context.run_config)
    use_single_thread()
    features, labels = _local_partition(settings, context)

    model = _model_from_message(settings.dataset, msg)
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
    ``num-examples`` and ``train-loss`` (mean cross-entropy, nats).
    """
    settings = AppSettings.from_run_config(context.run_config)
    use_single_thread()
    features, labels = _local_partition(settings, context)

    model = _model_from_message(settings.dataset, msg)
    partition_id = int(context.node_config[PARTITION_ID_KEY])
    seed = derive_seed(settings.seed, _server_round(msg), partition_id)
    train_loss = train(
        model,
        features,
        labels,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        seed=seed,
    )

    received_keys = list(msg.content.array_records[ARRAYS_KEY].keys())
    state = model.state_dict()
    arrays = ArrayRecord({key: state[key] for key in received_keys})
    metrics = MetricRecord({"num-examples": len(labels), "train-loss": train_loss})
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


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


def _model_from_message(dataset: str, msg: Message) -> nn.Module:
    if ARRAYS_KEY not in msg.content.array_records:
        raise ValueError(
            f"The message must contain an ArrayRecord {ARRAYS_KEY!r}. "
            f"Found {sorted(msg.content.array_records)}."
        )
    model = build_model(dataset)
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    return model


def _server_round(msg: Message) -> int:
    if CONFIG_KEY not in msg.content.config_records:
        return 0
    value = msg.content.config_records[CONFIG_KEY].get(SERVER_ROUND_KEY, 0)
    return value if isinstance(value, int) else 0
