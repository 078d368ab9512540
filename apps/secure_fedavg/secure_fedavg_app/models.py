"""Small torch models, one per dataset."""

import torch
from torch import nn

from secure_fedavg_app.data import BREAST_CANCER, DIGITS, FASHION_MNIST

# Hidden units of the multilayer perceptrons.
BREAST_CANCER_HIDDEN = 16
DIGITS_HIDDEN = 64

BREAST_CANCER_FEATURES = 30
DIGITS_FEATURES = 64
NUM_CLASSES = {BREAST_CANCER: 2, DIGITS: 10, FASHION_MNIST: 10}


class Mlp(nn.Module):
    """Multilayer perceptron with one hidden ReLU layer."""

    def __init__(self, num_features: int, num_hidden: int, num_classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(num_features, num_hidden)
        self.output = nn.Linear(num_hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of feature vectors."""
        return self.output(torch.relu(self.hidden(features)))  # type: ignore[no-any-return]


class SmallCnn(nn.Module):
    """Two-convolution network for 28x28 grayscale images (25,810 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of ``(n, 1, 28, 28)`` images."""
        hidden = self.pool(torch.relu(self.conv1(images)))
        hidden = self.pool(torch.relu(self.conv2(hidden)))
        hidden = torch.relu(self.fc1(torch.flatten(hidden, start_dim=1)))
        return self.fc2(hidden)  # type: ignore[no-any-return]


def build_model(dataset: str) -> nn.Module:
    """Build the untrained model for ``dataset``.

    Raises:
        ValueError: If ``dataset`` has no model.
    """
    if dataset == BREAST_CANCER:
        return Mlp(BREAST_CANCER_FEATURES, BREAST_CANCER_HIDDEN, NUM_CLASSES[dataset])
    if dataset == DIGITS:
        return Mlp(DIGITS_FEATURES, DIGITS_HIDDEN, NUM_CLASSES[dataset])
    if dataset == FASHION_MNIST:
        return SmallCnn(NUM_CLASSES[dataset])
    raise ValueError(
        f"dataset must be one of {', '.join(NUM_CLASSES)}. Found {dataset!r}."
    )


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
