"""Local training and evaluation with torch."""

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from secure_fedavg_app.data import FloatArray, LabelArray

# Batch size of evaluation passes; it does not change the result.
EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class EvalResult:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy loss (nats)."""

    accuracy: float
    loss: float


def use_single_thread() -> None:
    """Limit torch to one intra-op and one inter-op thread in this process.

    Simulated clients share the machine's cores, so more than one thread per
    client oversubscribes them.
    """
    torch.set_num_threads(1)
    if torch.get_num_interop_threads() != 1:
        # Torch allows this only before the first parallel operation ran.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def train(
    model: nn.Module,
    features: FloatArray,
    labels: LabelArray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> float:
    """Train ``model`` in place with plain SGD and return the mean train loss.

    Args:
        model: Model to update.
        features: Local train features.
        labels: Local train labels.
        epochs: Passes over the data.
        batch_size: Examples per step.
        learning_rate: SGD step size.
        seed: Seed of the batch shuffling.

    Returns:
        Mean cross-entropy loss over all steps of the last epoch, in nats.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    criterion = nn.CrossEntropyLoss()

    model.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        loss_sum = 0.0
        for batch_features, batch_labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(batch_features), batch_labels)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.item()) * len(batch_labels)
        epoch_loss = loss_sum / len(dataset)

    return epoch_loss


def evaluate(model: nn.Module, features: FloatArray, labels: LabelArray) -> EvalResult:
    """Return the accuracy and mean cross-entropy loss of ``model`` on a split."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    correct = 0
    loss_sum = 0.0

    model.eval()
    with torch.no_grad():
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            batch_features = torch.from_numpy(features[start : start + EVAL_BATCH_SIZE])
            batch_labels = torch.from_numpy(labels[start : start + EVAL_BATCH_SIZE])
            logits = model(batch_features)
            loss_sum += float(criterion(logits, batch_labels).item())
            correct += int((logits.argmax(dim=1) == batch_labels).sum().item())

    return EvalResult(accuracy=correct / len(labels), loss=loss_sum / len(labels))


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's legacy global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def derive_seed(base_seed: int, *parts: int) -> int:
    """Derive an independent 63-bit seed from a base seed and integers.

    Used for per-client, per-round training seeds so that runs with the same
    base seed repeat exactly.
    """
    sequence = np.random.SeedSequence([base_seed, *parts])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
