"""Small torch models, one per dataset."""

import logging

import torch
from torch import nn

from secure_fedavg_app.data import BREAST_CANCER, DIGITS, FASHION_MNIST

# Hidden units of the multilayer perceptrons.
BREAST_CANCER_HIDDEN = 16
DIGITS_HIDDEN = 64

BREAST_CANCER_FEATURES = 30
DIGITS_FEATURES = 64
NUM_CLASSES = {BREAST_CANCER: 2, DIGITS: 10, FASHION_MNIST: 10}


logger = logging.getLogger("fedsec_flwr.apps.secure_fedavg")


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


def build_model(dataset: str, *, dp_sgd: bool = False) -> nn.Module:
    """Build the untrained model for ``dataset``.

    With ``dp_sgd`` the model goes through ``make_private_compatible``, which
    replaces layers Opacus cannot train (BatchNorm) and logs each one. The
    server and the clients both build it this way, so their keys match.

    Raises:
        ValueError: If ``dataset`` has no model.
    """
    model: nn.Module
    if dataset == BREAST_CANCER:
        model = Mlp(BREAST_CANCER_FEATURES, BREAST_CANCER_HIDDEN, NUM_CLASSES[dataset])
    elif dataset == DIGITS:
        model = Mlp(DIGITS_FEATURES, DIGITS_HIDDEN, NUM_CLASSES[dataset])
    elif dataset == FASHION_MNIST:
        model = SmallCnn(NUM_CLASSES[dataset])
    else:
        raise ValueError(
            f"dataset must be one of {', '.join(NUM_CLASSES)}. Found {dataset!r}."
        )
    if not dp_sgd:
        return model

    from fedsec_flwr.dp.dpsgd import make_private_compatible

    model, replaced = make_private_compatible(model)
    for replacement in replaced:
        logger.info("DP-SGD replaced a layer: %s", replacement)
    return model


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
