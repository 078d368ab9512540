"""ClientApp: train the received model on this node's partition.

Training code lives in ``secure_fedavg_app.training``, imported on first use,
so that stages which only exchange keys or shares never import torch.
"""

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsec_flwr import make_plain_verification_mod, make_secure_aggregation_mod
from secure_fedavg_app.node_policy import NodePolicy
from secure_fedavg_app.settings import AppSettings

logger = logging.getLogger("fedsec_flwr.apps.secure_fedavg")

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train on the local partition, through the secure-aggregation mod if enabled.

    The run config enables secure aggregation and verification. The node
    config can require them, and a privacy budget, whatever the run config
    sets (see ``secure_fedavg_app.node_policy``).
    """
    settings = AppSettings.from_run_config(context.run_config)
    policy = NodePolicy.from_node_config(context.node_config)
    report_timings = reports_timings(settings, policy)
    if settings.secure_aggregation or policy.require_secure_aggregation:
        secure_mod = make_secure_aggregation_mod(
            require_verification=policy.require_verification,
            privacy_budget=policy.privacy_budget,
            report_timings=report_timings,
            trust_dropout_reports=policy.trust_dropout_reports,
            # The training code leaves the loss out of secure and DP rounds;
            # the DP-SGD epsilon it may send is documented.
            forward_metrics=True,
        )
        return secure_mod(msg, context, plain_train)
    if settings.verification or policy.require_verification:
        verification_mod = make_plain_verification_mod(
            require_verification=policy.require_verification,
            report_timings=report_timings,
        )
        return verification_mod(msg, context, plain_train)
    return plain_train(msg, context)


def reports_timings(settings: AppSettings, policy: NodePolicy) -> bool:
    """Return whether this node adds its stage timings to its replies.

    The run-config key ``client-timings`` turns them on. A node whose own
    policy requires secure aggregation or sets a DP budget never sends them,
    because they travel in clear.
    """
    return settings.client_timings and not policy.private


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the local partition."""
    from secure_fedavg_app.training import evaluate_local

    return evaluate_local(msg, context)


def plain_train(msg: Message, context: Context) -> Message:
    """Train the received model; see ``secure_fedavg_app.training.plain_train``."""
    from secure_fedavg_app.training import plain_train as train_locally

    return train_locally(msg, context)
