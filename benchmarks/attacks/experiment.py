"""Privacy attack experiments on Fashion-MNIST.

``run_gradient_inversion`` measures how well a server reconstructs a client's
image from the three views it may have: a plaintext single-client gradient, the
mean gradient of many clients under secure aggregation, and a clipped and
noised gradient under differential privacy. ``run_membership_inference``
measures how well membership of training examples can be inferred from models
trained without and with DP-SGD. Both return JSON-serializable dictionaries.

Run both and save the results and the figure with::

    python -m benchmarks.attacks.experiment --quick --output-dir outputs/attacks
"""

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.attacks import gradient_inversion, membership_inference
from benchmarks.attacks.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_DATA_DIR,
    IMAGE_SIDE,
    NUM_CLASSES,
    LabeledImages,
    load_fashion_mnist,
)
from benchmarks.attacks.image_metrics import psnr, ssim

# Through the package, which keeps Opacus from adding a root log handler.
from fedsec_flwr.dp._opacus import PrivacyEngine

logger = logging.getLogger(__name__)

INPUT_SHAPE = (1, IMAGE_SIDE, IMAGE_SIDE)
PIXEL_RANGE = 1.0
ATTACK_NAMES = ("dlg", "inverting_gradients")
ATTACK_LABELS = {"dlg": "DLG", "inverting_gradients": "IG"}

# Gradient inversion settings. A noise multiplier of 0 clips without noise.
DEFAULT_NUM_CLIENTS = 10
DEFAULT_CLIPPING_NORM = 1.0
QUICK_NOISE_MULTIPLIERS = (0.0, 0.01, 1.0)
FULL_NOISE_MULTIPLIERS = (0.0, 0.001, 0.01, 0.1, 1.0)
QUICK_DLG_ITERATIONS = 100
FULL_DLG_ITERATIONS = 300
QUICK_INVERTING_GRADIENTS_ITERATIONS = 200
FULL_INVERTING_GRADIENTS_ITERATIONS = 1000

# Membership inference settings.
DEFAULT_EPSILONS = (math.inf, 8.0, 3.0, 1.0)
DEFAULT_DELTA = 1e-5
ACCOUNTANT = "rdp"
QUICK_NUM_MEMBERS = 500
FULL_NUM_MEMBERS = 1000
QUICK_NUM_SHADOWS = 8
FULL_NUM_SHADOWS = 16

ModelFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of target and shadow model training.

    Attributes:
        epochs: Passes over the training set.
        batch_size: The batch size, or the expected batch size of Poisson
            sampling under DP-SGD.
        learning_rate: The SGD step size.
        momentum: The SGD momentum.
        max_grad_norm: The per-example clipping norm of DP-SGD.
        delta: The delta of the (epsilon, delta)-DP guarantee.
    """

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    delta: float = DEFAULT_DELTA


QUICK_TRAINING = TrainingConfig(epochs=20)


@dataclass(frozen=True)
class TrainedModel:
    """A trained classifier and the privacy of its training.

    Attributes:
        model: The trained classifier.
        noise_multiplier: The DP-SGD noise standard deviation divided by the
            clipping norm, 0.0 for non-private training.
        epsilon: The epsilon the Opacus accountant reports at the configured
            delta, ``math.inf`` for non-private training.
    """

    model: nn.Module
    noise_multiplier: float
    epsilon: float


def inversion_cnn() -> nn.Module:
    """Build the sigmoid CNN that the gradient inversion experiment attacks.

    It follows the LeNet variant of Zhu et al. (2019): three 5 x 5 convolutions
    of 12 channels with sigmoid activations and one linear layer, 13,426
    parameters for 28 x 28 inputs. Sigmoid keeps the second derivatives the
    attacks rely on.

    Returns:
        An untrained model with PyTorch's default initialization.
    """
    channels = 12
    kernel = 5
    padding = kernel // 2
    flattened = channels * (IMAGE_SIDE // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel, padding=padding, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(channels, channels, kernel, padding=padding, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(channels, channels, kernel, padding=padding, stride=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(flattened, NUM_CLASSES),
    )


def membership_mlp() -> nn.Module:
    """Build the MLP that the membership inference experiment trains.

    One hidden layer of 64 ReLU units fits a few hundred training examples
    almost perfectly. The layer is kept small because DP-SGD in Opacus stores a
    gradient per example, and its cost grows with the layer size.

    Returns:
        An untrained model with PyTorch's default initialization.
    """
    hidden_units = 64
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(IMAGE_SIDE * IMAGE_SIDE, hidden_units),
        nn.ReLU(),
        nn.Linear(hidden_units, NUM_CLASSES),
    )


def run_gradient_inversion(
    *,
    num_images: int = 4,
    dlg_iterations: int | None = None,
    inverting_gradients_iterations: int | None = None,
    seed: int = 0,
    num_clients: int = DEFAULT_NUM_CLIENTS,
    clipping_norm: float = DEFAULT_CLIPPING_NORM,
    noise_multipliers: Sequence[float] | None = None,
    quick: bool = False,
    data_dir: Path = DEFAULT_DATA_DIR,
    num_threads: int = 1,
) -> dict[str, Any]:
    """Reconstruct Fashion-MNIST test images from the updates a server receives.

    One image of each of the first ``num_images`` classes is drawn from the test
    split. For each image the server receives, in turn: the plaintext gradient of
    one client holding that image; the mean gradient of ``num_clients`` clients
    (the target client and others holding one random test image each), as under
    secure aggregation; and the target client's gradient clipped to
    ``clipping_norm`` with Gaussian noise of standard deviation
    ``noise_multiplier * clipping_norm`` added, for each noise multiplier. DLG
    and Inverting Gradients attack every view of the untrained
    ``inversion_cnn``, and the reconstruction, clipped to [0, 1], is scored
    against the image with PSNR and SSIM.

    Args:
        num_images: The number of target images, 1 to 10.
        dlg_iterations: L-BFGS iterations of DLG. None picks 100 when ``quick``
            and 300 otherwise.
        inverting_gradients_iterations: Adam steps of Inverting Gradients. None
            picks 200 when ``quick`` and 1000 otherwise.
        seed: Seeds the choice of images, the model and the attacks.
        num_clients: The number of clients behind the secure aggregate.
        clipping_norm: The L2 clipping norm of the DP view.
        noise_multipliers: The noise multipliers of the DP views, 0 for
            clipping alone. None picks (0, 0.01, 1) when ``quick`` and
            (0, 0.001, 0.01, 0.1, 1) otherwise.
        quick: Use the short iteration counts.
        data_dir: The folder with the Fashion-MNIST files.
        num_threads: The number of threads torch may use, set globally.

    Returns:
        A JSON-serializable dictionary with the configuration, the images, and
        for each view and attack the per-image PSNR (null where infinite), SSIM,
        whether the label was right, and the reconstructions.

    Raises:
        ValueError: If ``num_images`` is not in [1, 10] or ``num_clients`` is
            below 2.
        FileNotFoundError: If the Fashion-MNIST files are missing.
    """
    if not 1 <= num_images <= NUM_CLASSES:
        raise ValueError(
            f"num_images must be in [1, {NUM_CLASSES}]. Found {num_images}."
        )
    if num_clients < 2:
        raise ValueError(f"num_clients must be at least 2. Found {num_clients}.")
    torch.set_num_threads(num_threads)
    if dlg_iterations is None:
        dlg_iterations = QUICK_DLG_ITERATIONS if quick else FULL_DLG_ITERATIONS
    if inverting_gradients_iterations is None:
        inverting_gradients_iterations = (
            QUICK_INVERTING_GRADIENTS_ITERATIONS
            if quick
            else FULL_INVERTING_GRADIENTS_ITERATIONS
        )
    if noise_multipliers is None:
        noise_multipliers = QUICK_NOISE_MULTIPLIERS if quick else FULL_NOISE_MULTIPLIERS
    iterations = {
        "dlg": dlg_iterations,
        "inverting_gradients": inverting_gradients_iterations,
    }
    started = time.perf_counter()

    test = load_fashion_mnist(split="test", data_dir=data_dir)
    rng = np.random.default_rng(seed)
    image_indices = _one_image_per_class(test.labels, num_images=num_images, rng=rng)
    torch.manual_seed(seed)
    model = inversion_cnn()

    views = _target_views(noise_multipliers)
    results_by_view = {view: _empty_view_result() for view in views}
    for position, image_index in enumerate(image_indices):
        logger.info("Attacking image %d of %d", position + 1, num_images)
        other_indices = _other_clients(
            image_index,
            num_others=num_clients - 1,
            num_examples=len(test.labels),
            rng=rng,
        )
        targets = _build_targets(
            model,
            test,
            image_index=image_index,
            other_indices=other_indices,
            clipping_norm=clipping_norm,
            noise_multipliers=noise_multipliers,
            seed=seed + position,
        )
        for view, target in targets.items():
            _attack_view(
                model,
                target,
                image=test.images[image_index],
                label=int(test.labels[image_index]),
                iterations=iterations,
                seed=seed + position,
                result=results_by_view[view],
            )

    return {
        "config": {
            "num_images": num_images,
            "iterations": iterations,
            "seed": seed,
            "num_clients": num_clients,
            "clipping_norm": clipping_norm,
            "noise_multipliers": list(noise_multipliers),
            "model": "inversion_cnn, untrained",
        },
        "labels": [int(test.labels[index]) for index in image_indices],
        "originals": [test.images[index, 0].tolist() for index in image_indices],
        "views": [
            {"name": view, **_summarize_view(result)}
            for view, result in results_by_view.items()
        ],
        "wall_time_s": time.perf_counter() - started,
    }


def save_reconstruction_figure(results: dict[str, Any], path: Path) -> None:
    """Save a grid of original and reconstructed images as an image file.

    The first row contains the originals. Each further row shows one attack on one
    view, labeled on the left, with the PSNR of each reconstruction above it.

    Args:
        results: The output of ``run_gradient_inversion``.
        path: Where to write the figure. The suffix picks the format.
    """
    originals = results["originals"]
    rows: list[tuple[str, list[Any], list[float | None]]] = [
        ("original", originals, [None] * len(originals))
    ]
    for view in results["views"]:
        for attack in ATTACK_NAMES:
            attack_result = view["attacks"][attack]
            label = f"{ATTACK_LABELS[attack]}\n{view['name']}"
            rows.append(
                (label, attack_result["reconstructions"], attack_result["psnr"])
            )

    figure = Figure(figsize=(1.3 * len(originals) + 1.2, 1.3 * len(rows)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), len(originals), squeeze=False)
    for row_index, (row_label, images, psnrs) in enumerate(rows):
        for column, image in enumerate(images):
            axis = axes[row_index][column]
            axis.imshow(np.asarray(image), cmap="gray", vmin=0.0, vmax=PIXEL_RANGE)
            axis.set_xticks([])
            axis.set_yticks([])
            if row_index == 0:
                axis.set_title(CLASS_NAMES[results["labels"][column]], fontsize=8)
            else:
                axis.set_title(_format_psnr(psnrs[column]), fontsize=7)
        axes[row_index][0].set_ylabel(row_label, fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def train_classifier(
    model_factory: ModelFactory,
    inputs: Tensor,
    labels: Tensor,
    *,
    config: TrainingConfig,
    target_epsilon: float,
    seed: int,
) -> TrainedModel:
    """Train a classifier with SGD, or with DP-SGD when epsilon is finite.

    For a finite ``target_epsilon``, Opacus's
    ``PrivacyEngine.make_private_with_epsilon`` picks the noise multiplier that
    reaches it, by the RDP accountant, after ``config.epochs`` epochs with
    Poisson sampling and per-example clipping to ``config.max_grad_norm``. The
    model is built and initialized from torch's global generator, which this
    function seeds.

    Args:
        model_factory: Builds a fresh model.
        inputs: The training examples.
        labels: Their class indices.
        config: The training hyperparameters.
        target_epsilon: The epsilon to reach, or ``math.inf`` for plain SGD.
        seed: Seeds the initialization, the batches and the DP noise.

    Returns:
        The trained model with its noise multiplier and spent epsilon.

    Raises:
        ValueError: If ``target_epsilon`` is not positive.
    """
    if not target_epsilon > 0.0:
        raise ValueError(f"target_epsilon must be positive. Found {target_epsilon}.")
    model, optimizer, loader, generator = _prepare_training(
        model_factory, inputs, labels, config=config, seed=seed
    )
    if math.isinf(target_epsilon):
        _run_epochs(model, optimizer, loader, epochs=config.epochs)
        return TrainedModel(model=model, noise_multiplier=0.0, epsilon=math.inf)

    engine = PrivacyEngine(accountant=ACCOUNTANT)
    private_model, private_optimizer, private_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=target_epsilon,
        target_delta=config.delta,
        epochs=config.epochs,
        max_grad_norm=config.max_grad_norm,
        noise_generator=generator,
    )
    _run_epochs(private_model, private_optimizer, private_loader, epochs=config.epochs)
    private_model.remove_hooks()

    return TrainedModel(
        model=model,
        noise_multiplier=float(private_optimizer.noise_multiplier),
        epsilon=float(engine.get_epsilon(config.delta)),
    )


def train_shadow_classifier(
    model_factory: ModelFactory,
    inputs: Tensor,
    labels: Tensor,
    *,
    config: TrainingConfig,
    noise_multiplier: float | None,
    seed: int,
) -> nn.Module:
    """Train a shadow model the way a target model was trained.

    The shadow model reuses the target's noise multiplier instead of searching
    for it again. The attacker is assumed to know the training algorithm, and
    the search takes seconds per model.

    Args:
        model_factory: Builds a fresh model.
        inputs: The training examples.
        labels: Their class indices.
        config: The training hyperparameters of the target.
        noise_multiplier: The target's DP-SGD noise multiplier, or None for
            plain SGD.
        seed: Seeds the initialization, the batches and the DP noise.

    Returns:
        The trained model.
    """
    model, optimizer, loader, generator = _prepare_training(
        model_factory, inputs, labels, config=config, seed=seed
    )
    if noise_multiplier is None:
        _run_epochs(model, optimizer, loader, epochs=config.epochs)
        return model

    engine = PrivacyEngine(accountant=ACCOUNTANT)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        noise_generator=generator,
    )
    _run_epochs(private_model, private_optimizer, private_loader, epochs=config.epochs)
    private_model.remove_hooks()
    return model


def run_membership_inference(
    model_factory: ModelFactory,
    train: LabeledImages,
    test: LabeledImages,
    *,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    num_members: int | None = None,
    num_shadows: int | None = None,
    training: TrainingConfig | None = None,
    seed: int = 0,
    quick: bool = False,
    num_threads: int = 1,
) -> dict[str, Any]:
    """Attack models trained with and without DP-SGD with membership inference.

    ``num_members`` random training examples form the members and as many random
    test examples the non-members. For each epsilon a target model trains on
    the members, and the loss-threshold attack and LiRA (online and offline,
    with a global variance) score every member and non-member. The shadow
    models of LiRA train the same way as the target, each on a random half of
    the members and non-members together, so every example is in the training
    set of exactly half of them.

    Args:
        model_factory: Builds a fresh model that Opacus supports.
        train: The pool of members.
        test: The pool of non-members.
        epsilons: The target epsilons, ``math.inf`` for non-private training.
        num_members: The number of members. None picks 500 when ``quick`` and
            1000 otherwise.
        num_shadows: The number of shadow models per epsilon, even. None picks
            8 when ``quick`` and 16 otherwise.
        training: The training hyperparameters. None picks 20 epochs when
            ``quick`` and 30 otherwise, with the other ``TrainingConfig``
            defaults.
        seed: Seeds the choice of examples and all training.
        quick: Use the small settings.
        num_threads: The number of threads torch may use, set globally.

    Returns:
        A JSON-serializable dictionary with the configuration and, for each
        epsilon (null for non-private training), the spent epsilon, the noise
        multiplier, the train and test accuracy of the target model, and the
        AUC and TPR at 1% FPR of each attack.

    Raises:
        ValueError: If a pool has fewer than ``num_members`` examples.
    """
    if num_members is None:
        num_members = QUICK_NUM_MEMBERS if quick else FULL_NUM_MEMBERS
    if num_shadows is None:
        num_shadows = QUICK_NUM_SHADOWS if quick else FULL_NUM_SHADOWS
    if training is None:
        training = QUICK_TRAINING if quick else TrainingConfig()
    for name, pool in (("train", train), ("test", test)):
        if len(pool.labels) < num_members:
            raise ValueError(
                f"{name} must contain at least num_members={num_members} examples. "
                f"Found {len(pool.labels)}."
            )
    torch.set_num_threads(num_threads)
    started = time.perf_counter()

    rng = np.random.default_rng(seed)
    member_indices = torch.from_numpy(
        rng.choice(len(train.labels), num_members, replace=False)
    )
    nonmember_indices = torch.from_numpy(
        rng.choice(len(test.labels), num_members, replace=False)
    )
    population_inputs = torch.cat(
        [train.images[member_indices], test.images[nonmember_indices]]
    )
    population_labels = torch.cat(
        [train.labels[member_indices], test.labels[nonmember_indices]]
    )
    is_member = np.arange(2 * num_members) < num_members
    inclusion = membership_inference.balanced_inclusion_matrix(
        num_shadows=num_shadows, num_examples=2 * num_members, rng=rng
    )

    per_epsilon = []
    for epsilon in epsilons:
        logger.info("Membership inference at target epsilon %s", epsilon)
        per_epsilon.append(
            _attack_at_epsilon(
                model_factory,
                population_inputs,
                population_labels,
                is_member=is_member,
                inclusion=inclusion,
                epsilon=epsilon,
                training=training,
                seed=seed,
            )
        )

    return {
        "config": {
            "num_members": num_members,
            "num_non_members": num_members,
            "num_shadows": num_shadows,
            "training": asdict(training),
            "seed": seed,
            "lira_variance": "global",
            "false_positive_rate": membership_inference.DEFAULT_FALSE_POSITIVE_RATE,
        },
        "results": per_epsilon,
        "wall_time_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run both experiments and write results.json and reconstructions.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="use the short settings")
    parser.add_argument("--seed", type=int, default=0, help="the random seed")
    parser.add_argument(
        "--num-images", type=int, default=4, help="target images, 1 to 10"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/attacks"),
        help="the folder for results.json and reconstructions.png",
    )
    arguments = parser.parse_args(argv)
    # force=True because importing opacus 1.6 already adds a root handler.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", force=True
    )
    # Opacus warns on every PrivacyEngine that secure_mode is off, which a
    # benchmark does not need, and torch warns that the inputs need no gradient.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    inversion = run_gradient_inversion(
        num_images=arguments.num_images, seed=arguments.seed, quick=arguments.quick
    )
    membership = run_membership_inference(
        membership_mlp,
        load_fashion_mnist(split="train"),
        load_fashion_mnist(split="test"),
        seed=arguments.seed,
        quick=arguments.quick,
    )

    arguments.output_dir.mkdir(parents=True, exist_ok=True)
    save_reconstruction_figure(inversion, arguments.output_dir / "reconstructions.png")
    results = {"gradient_inversion": inversion, "membership_inference": membership}
    with (arguments.output_dir / "results.json").open("w") as output:
        json.dump(results, output, allow_nan=False)
    print(json.dumps(_headline(results), indent=2))


def _one_image_per_class(
    labels: Tensor, *, num_images: int, rng: np.random.Generator
) -> list[int]:
    return [
        int(rng.choice(np.flatnonzero(labels.numpy() == class_index)))
        for class_index in range(num_images)
    ]


def _other_clients(
    image_index: int, *, num_others: int, num_examples: int, rng: np.random.Generator
) -> list[int]:
    candidates = np.delete(np.arange(num_examples), image_index)
    return [int(index) for index in rng.choice(candidates, num_others, replace=False)]


def _target_views(noise_multipliers: Sequence[float]) -> list[str]:
    return [
        "plaintext",
        "secure aggregate",
        *(f"DP z={multiplier:g}" for multiplier in noise_multipliers),
    ]


def _build_targets(
    model: nn.Module,
    data: LabeledImages,
    *,
    image_index: int,
    other_indices: list[int],
    clipping_norm: float,
    noise_multipliers: Sequence[float],
    seed: int,
) -> dict[str, list[Tensor]]:
    image = data.images[image_index]
    label = int(data.labels[image_index])
    client_indices = [image_index, *other_indices]
    views = _target_views(noise_multipliers)
    targets = {
        views[0]: gradient_inversion.plaintext_target(model, image=image, label=label),
        views[1]: gradient_inversion.secure_aggregation_target(
            model,
            images=data.images[client_indices],
            labels=data.labels[client_indices],
        ),
    }
    generator = torch.Generator().manual_seed(seed)
    for view, multiplier in zip(views[2:], noise_multipliers, strict=True):
        targets[view] = gradient_inversion.dp_noised_target(
            model,
            image=image,
            label=label,
            clipping_norm=clipping_norm,
            noise_multiplier=multiplier,
            generator=generator,
        )
    return targets


def _empty_view_result() -> dict[str, dict[str, list[Any]]]:
    return {
        attack: {"psnr": [], "ssim": [], "label_correct": [], "reconstructions": []}
        for attack in ATTACK_NAMES
    }


def _attack_view(
    model: nn.Module,
    target: list[Tensor],
    *,
    image: Tensor,
    label: int,
    iterations: dict[str, int],
    seed: int,
    result: dict[str, dict[str, list[Any]]],
) -> None:
    reconstructions = {
        "dlg": gradient_inversion.dlg_attack(
            model,
            target,
            input_shape=INPUT_SHAPE,
            num_classes=NUM_CLASSES,
            iterations=iterations["dlg"],
            seed=seed,
        ),
        "inverting_gradients": gradient_inversion.inverting_gradients_attack(
            model,
            target,
            input_shape=INPUT_SHAPE,
            num_classes=NUM_CLASSES,
            iterations=iterations["inverting_gradients"],
            seed=seed,
        ),
    }
    original = image[0].numpy()
    for attack, reconstruction in reconstructions.items():
        pixels = reconstruction.inputs[0, 0].clamp(0.0, PIXEL_RANGE).numpy()
        result[attack]["psnr"].append(psnr(original, pixels, data_range=PIXEL_RANGE))
        result[attack]["ssim"].append(ssim(original, pixels, data_range=PIXEL_RANGE))
        result[attack]["label_correct"].append(reconstruction.label == label)
        result[attack]["reconstructions"].append(pixels.tolist())


def _summarize_view(result: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    attacks = {}
    for attack, values in result.items():
        attacks[attack] = {
            **values,
            "psnr": [_finite_or_none(value) for value in values["psnr"]],
            "mean_psnr": _finite_or_none(float(np.mean(values["psnr"]))),
            "mean_ssim": float(np.mean(values["ssim"])),
        }
    return {"attacks": attacks}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _format_psnr(value: float | None) -> str:
    return "inf dB" if value is None else f"{value:.1f} dB"


def _prepare_training(
    model_factory: ModelFactory,
    inputs: Tensor,
    labels: Tensor,
    *,
    config: TrainingConfig,
    seed: int,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any], torch.Generator]:
    torch.manual_seed(seed)
    model = model_factory()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(inputs, labels),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.learning_rate, momentum=config.momentum
    )
    return model, optimizer, loader, generator


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    *,
    epochs: int,
) -> None:
    model.train()
    loss_function = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for inputs, labels in loader:
            if len(labels) == 0:
                continue
            optimizer.zero_grad()
            loss_function(model(inputs), labels).backward()
            optimizer.step()


def _accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(inputs).argmax(dim=1)
    return float((predictions == labels).double().mean())


def _attack_at_epsilon(
    model_factory: ModelFactory,
    inputs: Tensor,
    labels: Tensor,
    *,
    is_member: np.ndarray[Any, np.dtype[np.bool_]],
    inclusion: np.ndarray[Any, np.dtype[np.bool_]],
    epsilon: float,
    training: TrainingConfig,
    seed: int,
) -> dict[str, Any]:
    members = torch.from_numpy(np.flatnonzero(is_member))
    non_members = torch.from_numpy(np.flatnonzero(~is_member))
    target = train_classifier(
        model_factory,
        inputs[members],
        labels[members],
        config=training,
        target_epsilon=epsilon,
        seed=seed,
    )

    shadow_noise = None if math.isinf(epsilon) else target.noise_multiplier

    def train_shadow(
        shadow_inputs: Tensor, shadow_labels: Tensor, shadow_seed: int
    ) -> nn.Module:
        return train_shadow_classifier(
            model_factory,
            shadow_inputs,
            shadow_labels,
            config=training,
            noise_multiplier=shadow_noise,
            seed=shadow_seed,
        )

    shadow_confidences = membership_inference.train_shadow_models(
        train_shadow, inputs=inputs, labels=labels, inclusion=inclusion, seed=seed + 1
    )
    target_confidences = membership_inference.logit_scaled_confidence(
        target.model, inputs, labels
    )
    scores = {
        "loss_threshold": membership_inference.loss_threshold_scores(
            target.model, inputs, labels
        ),
        "lira_online": membership_inference.lira_scores(
            target_confidences,
            shadow_confidences,
            inclusion,
            online=True,
            global_variance=True,
        ),
        "lira_offline": membership_inference.lira_scores(
            target_confidences,
            shadow_confidences,
            inclusion,
            online=False,
            global_variance=True,
        ),
    }
    attacks = {}
    for name, attack_scores in scores.items():
        metrics = membership_inference.evaluate_attack(attack_scores, is_member)
        attacks[name] = {"auc": metrics.auc, "tpr_at_1pct_fpr": metrics.tpr_at_low_fpr}
    return {
        "target_epsilon": _finite_or_none(epsilon),
        "spent_epsilon": _finite_or_none(target.epsilon),
        "noise_multiplier": target.noise_multiplier,
        "train_accuracy": _accuracy(target.model, inputs[members], labels[members]),
        "test_accuracy": _accuracy(
            target.model, inputs[non_members], labels[non_members]
        ),
        "attacks": attacks,
    }


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    inversion = results["gradient_inversion"]
    membership = results["membership_inference"]
    return {
        "gradient_inversion": {
            view["name"]: {
                attack: {
                    "mean_psnr": values["mean_psnr"],
                    "mean_ssim": values["mean_ssim"],
                }
                for attack, values in view["attacks"].items()
            }
            for view in inversion["views"]
        },
        "gradient_inversion_wall_time_s": inversion["wall_time_s"],
        "membership_inference": membership["results"],
        "membership_inference_wall_time_s": membership["wall_time_s"],
    }


if __name__ == "__main__":
    main()
