"""Small torch models, one per dataset."""

import logging

import torch
from torch import nn

from secure_fedavg_app.data import BREAST_CANCER, DIGITS, FASHION_MNIST
from secure_fedavg_app.settings import MAX_HIDDEN_UNITS

# Hidden units of each dataset's model: the multilayer perceptrons' hidden
# layer and the CNN's first fully connected layer.
BREAST_CANCER_HIDDEN = 16
DIGITS_HIDDEN = 64
FASHION_MNIST_HIDDEN = 24
DEFAULT_HIDDEN_UNITS = {
    BREAST_CANCER: BREAST_CANCER_HIDDEN,
    DIGITS: DIGITS_HIDDEN,
    FASHION_MNIST: FASHION_MNIST_HIDDEN,
}

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
    """Two-convolution network for 28x28 grayscale images.

    It has 25,810 parameters with the default 24 hidden units, and
    13,258 + 523 * ``num_hidden`` in general.
    """

    def __init__(
        self, num_classes: int = 10, num_hidden: int = FASHION_MNIST_HIDDEN
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, num_hidden)
        self.fc2 = nn.Linear(num_hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of ``(n, 1, 28, 28)`` images."""
        hidden = self.pool(torch.relu(self.conv1(images)))
        hidden = self.pool(torch.relu(self.conv2(hidden)))
        hidden = torch.relu(self.fc1(torch.flatten(hidden, start_dim=1)))
        return self.fc2(hidden)  # type: ignore[no-any-return]


def build_model(
    dataset: str, *, dp_sgd: bool = False, hidden_units: int = 0
) -> nn.Module:
    """Build the untrained model for ``dataset``.

    With ``dp_sgd`` the model goes through ``make_private_compatible``, which
    replaces layers Opacus cannot train (BatchNorm) and logs each one. The
    server and the clients both build it this way, so their keys match.

    Args:
        dataset: Dataset name, which selects the architecture.
        dp_sgd: Build the variant that Opacus can train.
        hidden_units: Width of the hidden layer (see `DEFAULT_HIDDEN_UNITS`),
            from 1 to `MAX_HIDDEN_UNITS`; 0 for the dataset's default.

    Raises:
        ValueError: If ``dataset`` has no model or ``hidden_units`` is out of
            range.
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(
            f"dataset must be one of {', '.join(NUM_CLASSES)}. Found {dataset!r}."
        )
    if not 0 <= hidden_units <= MAX_HIDDEN_UNITS:
        raise ValueError(
            f"hidden_units must be 0 (the dataset's default) or at most "
            f"{MAX_HIDDEN_UNITS}. Found {hidden_units}."
        )
    width = hidden_units or DEFAULT_HIDDEN_UNITS[dataset]

    model: nn.Module
    if dataset == BREAST_CANCER:
        model = Mlp(BREAST_CANCER_FEATURES, width, NUM_CLASSES[dataset])
    elif dataset == DIGITS:
        model = Mlp(DIGITS_FEATURES, width, NUM_CLASSES[dataset])
    else:
        model = SmallCnn(NUM_CLASSES[dataset], width)
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
