"""Gradient inversion attacks and the updates an aggregation server receives.

An honest-but-curious server tries to reconstruct a client's training image from
what it receives in a round of federated learning:

* a single client's plaintext gradient (no protection),
* the average of many clients' gradients (all that secure aggregation reveals),
* a clipped gradient with Gaussian noise added (differential privacy).

Two attacks reconstruct the input by optimizing a dummy input until its gradient
matches the observed one: DLG (Zhu, Liu and Han, "Deep Leakage from Gradients",
NeurIPS 2019) and Inverting Gradients (Geiping, Bauermeister, Droege and Moeller,
"Inverting Gradients - How easy is it to break privacy in federated learning?",
NeurIPS 2020). The label comes from the sign rule of iDLG (Zhao, Mopuri and
Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv:2001.02610, 2020).

Both attacks differentiate the gradient with respect to the input, so models
with piecewise-linear activations (ReLU) give them less to work with than smooth
ones (sigmoid), which is why DLG used sigmoid networks.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional

# Inverting Gradients (Geiping et al. 2020) lowers the Adam step size tenfold at
# 3/8, 5/8 and 7/8 of the iterations.
LEARNING_RATE_MILESTONE_FRACTIONS = (3 / 8, 5 / 8, 7 / 8)
LEARNING_RATE_DECAY = 0.1

LBFGS_MAX_EVALUATIONS_PER_ITERATION = 25
LBFGS_HISTORY_SIZE = 100


@dataclass(frozen=True)
class Reconstruction:
    """The outcome of a gradient inversion attack.

    Attributes:
        inputs: The reconstructed input, shape (1, *input_shape), detached.
        label: The class the attack settled on: the argmax of the optimized soft
            label for DLG, the label recovered from the gradient for Inverting
            Gradients.
        trace: The gradient-matching objective after each iteration, including
            the total-variation term where the attack uses one.

    """

    inputs: Tensor
    label: int
    trace: list[float]


def compute_gradient(model: nn.Module, inputs: Tensor, labels: Tensor) -> list[Tensor]:
    """Compute the gradient of the mean cross-entropy loss on a batch.

    Args:
        model: The classifier whose parameters the gradient is taken for.
        inputs: A batch of inputs, shape (batch, *input_shape).
        labels: Class indices, shape (batch,).

    Returns:
        One detached tensor per trainable parameter, in ``model.parameters()``
        order.

    """
    parameters = _trainable_parameters(model)
    loss = functional.cross_entropy(model(inputs), labels)
    gradients = torch.autograd.grad(loss, parameters)
    return [gradient.detach() for gradient in gradients]


def gradient_from_model_difference(
    model_difference: Sequence[Tensor], *, learning_rate: float
) -> list[Tensor]:
    """Convert the update of one local SGD step back into the gradient.

    One SGD step sets ``new = old - learning_rate * gradient``, so the gradient
    is ``(new - old) / -learning_rate``. Over several local steps the result is
    the average gradient along the local trajectory, which the attacks treat as
    one gradient.

    Args:
        model_difference: ``new - old`` for each trainable parameter.
        learning_rate: The client's SGD step size.

    Returns:
        The gradient, one tensor per parameter.

    Raises:
        ValueError: If ``learning_rate`` is not positive.

    """
    if not learning_rate > 0.0:
        raise ValueError(f"learning_rate must be positive. Found {learning_rate}.")

    return [difference.detach() / -learning_rate for difference in model_difference]


def plaintext_target(model: nn.Module, *, image: Tensor, label: int) -> list[Tensor]:
    """Build the update a server receives from one client without protection.

    Args:
        model: The global model the client trains.
        image: The client's only training example, shape (*input_shape).
        label: Its class index.

    Returns:
        The gradient of the loss on that one example.

    """
    return compute_gradient(model, image.unsqueeze(0), torch.tensor([label]))


def secure_aggregation_target(
    model: nn.Module, *, images: Tensor, labels: Tensor
) -> list[Tensor]:
    """Build what a server learns under secure aggregation: the mean update.

    Each client holds one example and computes its gradient, and the server only
    learns the sum of the clients' gradients, which it divides by the known
    number of clients.

    Args:
        model: The global model the clients train.
        images: One example per client, shape (num_clients, *input_shape).
        labels: Their class indices, shape (num_clients,).

    Returns:
        The average of the clients' gradients.

    Raises:
        ValueError: If there are no clients or the counts of images and labels
            differ.

    """
    if images.shape[0] == 0:
        raise ValueError("images must contain at least one client's example. Found 0.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            "images and labels must have one entry per client. Found "
            f"{images.shape[0]} images and {labels.shape[0]} labels."
        )

    total = [torch.zeros_like(parameter) for parameter in _trainable_parameters(model)]
    for image, label in zip(images, labels, strict=True):
        client_gradient = compute_gradient(model, image.unsqueeze(0), label.view(1))
        total = [
            running + gradient
            for running, gradient in zip(total, client_gradient, strict=True)
        ]
    return [running / images.shape[0] for running in total]


def dp_noised_target(
    model: nn.Module,
    *,
    image: Tensor,
    label: int,
    clipping_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> list[Tensor]:
    """Build a client's update under the Gaussian mechanism.

    The gradient is scaled so its L2 norm over all parameters is at most
    ``clipping_norm``, and Gaussian noise with standard deviation
    ``noise_multiplier * clipping_norm`` is added to every coordinate. This is
    the view of a server that receives one client's noised update, as in local
    DP. Under central DP the server receives only the noised sum, which is
    harder to invert.

    Args:
        model: The global model the client trains.
        image: The client's only training example, shape (*input_shape).
        label: Its class index.
        clipping_norm: The bound C on the L2 norm of the update.
        noise_multiplier: The noise standard deviation divided by C.
        generator: The source of the noise.

    Returns:
        The clipped and noised gradient.

    Raises:
        ValueError: If ``clipping_norm`` is not positive or ``noise_multiplier``
            is negative.

    """
    if not clipping_norm > 0.0:
        raise ValueError(f"clipping_norm must be positive. Found {clipping_norm}.")
    if not noise_multiplier >= 0.0:
        raise ValueError(
            f"noise_multiplier must be non-negative. Found {noise_multiplier}."
        )

    gradient = plaintext_target(model, image=image, label=label)
    norm = torch.linalg.vector_norm(torch.cat([part.reshape(-1) for part in gradient]))
    scale = min(1.0, clipping_norm / max(norm.item(), 1e-12))
    noise_std = noise_multiplier * clipping_norm
    return [
        part * scale
        + noise_std * torch.randn(part.shape, generator=generator, dtype=part.dtype)
        for part in gradient
    ]


def recover_label(target_gradient: Sequence[Tensor], *, num_classes: int) -> int:
    """Recover the label of a single example from its gradient (iDLG).

    For cross-entropy on one example the gradient of the last linear layer's
    weight row i is ``(p_i - y_i) * h``, where p is the softmax output, y the
    one-hot label and h the layer's input. When h is non-negative (after ReLU or
    sigmoid) only the true class has a row with a negative sum, so the label is
    the row with the smallest sum. On the mean gradient of a batch or a noised
    gradient the rule still returns a class, which may be wrong.

    Args:
        target_gradient: The observed gradient, in ``model.parameters()`` order.
        num_classes: The number of classes of the model's output.

    Returns:
        The recovered class index.

    Raises:
        ValueError: If no 2-D tensor has ``num_classes`` rows.

    """
    last_layer_weight = _last_layer_weight_gradient(
        target_gradient, num_classes=num_classes
    )

    return int(torch.argmin(last_layer_weight.sum(dim=1)).item())


def dlg_attack(
    model: nn.Module,
    target_gradient: Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    num_classes: int,
    iterations: int,
    seed: int,
    learning_rate: float = 1.0,
) -> Reconstruction:
    """Reconstruct an input and a soft label with DLG (Zhu et al. 2019).

    A dummy input and dummy label logits start from a standard normal draw.
    L-BFGS minimizes the squared L2 distance between the gradient of the
    cross-entropy of ``softmax(label logits)`` on the dummy input and the target
    gradient, summed over all parameters. Zhu et al. use L-BFGS without a line
    search. This one uses the strong Wolfe line search of ``torch.optim.LBFGS``
    so the objective does not diverge to NaN, and zero tolerances so L-BFGS
    does not stop early on the tiny gradients of an untrained model.
    The returned input is the one with the smallest objective seen.

    Args:
        model: The model the target gradient was computed on.
        target_gradient: The observed gradient, in ``model.parameters()`` order.
        input_shape: The shape of one input, without the batch dimension.
        num_classes: The number of classes of the model's output.
        iterations: The number of L-BFGS iterations.
        seed: The seed of the dummy initialization.
        learning_rate: The L-BFGS step size.

    Returns:
        The reconstruction, the argmax of the soft label and the objective trace.

    Raises:
        ValueError: If ``iterations`` or ``num_classes`` is not positive or the
            target gradient does not match the model's parameters.

    """
    parameters, target = _validate_attack_inputs(
        model, target_gradient, iterations=iterations, num_classes=num_classes
    )
    generator = torch.Generator().manual_seed(seed)
    dummy_input = torch.randn((1, *input_shape), generator=generator)
    dummy_label_logits = torch.randn((1, num_classes), generator=generator)
    dummy_input.requires_grad_(True)
    dummy_label_logits.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [dummy_input, dummy_label_logits],
        lr=learning_rate,
        max_iter=1,
        max_eval=LBFGS_MAX_EVALUATIONS_PER_ITERATION,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=LBFGS_HISTORY_SIZE,
        line_search_fn="strong_wolfe",
    )
    best = _BestIterate(dummy_input, dummy_label_logits)
    # The line search evaluates the objective several times per iteration, and
    # the trace keeps the value at the start of each iteration.
    evaluations: list[float] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        log_probabilities = functional.log_softmax(model(dummy_input), dim=-1)
        soft_label = functional.softmax(dummy_label_logits, dim=-1)
        loss = -(soft_label * log_probabilities).sum(dim=-1).mean()
        dummy_gradient = torch.autograd.grad(loss, parameters, create_graph=True)
        objective = _squared_distance(dummy_gradient, target)
        objective.backward()
        evaluations.append(objective.item())
        best.update(objective.item(), dummy_input, dummy_label_logits)
        return objective

    trace: list[float] = []
    for _ in range(iterations):
        first_evaluation = len(evaluations)
        optimizer.step(closure)
        trace.append(evaluations[first_evaluation])
        if not math.isfinite(trace[-1]):
            break

    best_input, best_logits = best.tensors
    return Reconstruction(
        inputs=best_input, label=int(torch.argmax(best_logits).item()), trace=trace
    )


def inverting_gradients_attack(
    model: nn.Module,
    target_gradient: Sequence[Tensor],
    *,
    input_shape: Sequence[int],
    num_classes: int,
    iterations: int,
    seed: int,
    label: int | None = None,
    learning_rate: float = 0.1,
    total_variation_weight: float = 1e-4,
    input_bounds: tuple[float, float] = (0.0, 1.0),
) -> Reconstruction:
    """Reconstruct an input with Inverting Gradients (Geiping et al. 2020).

    The objective is one minus the cosine similarity between the dummy and the
    target gradient, both flattened over all parameters, plus
    ``total_variation_weight`` times the anisotropic total variation of the
    dummy input. As in the paper, Adam steps on the sign of the input gradient,
    the step size drops tenfold at 3/8, 5/8 and 7/8 of the iterations, and the
    input is projected into ``input_bounds`` after each step. The dummy input
    starts from a standard normal draw clipped into ``input_bounds``. The label
    is recovered with the iDLG rule unless it is given, which assumes a batch of
    one. The returned input is the one with the smallest objective seen.

    Args:
        model: The model the target gradient was computed on.
        target_gradient: The observed gradient, in ``model.parameters()`` order.
        input_shape: The shape of one input, without the batch dimension.
        num_classes: The number of classes of the model's output.
        iterations: The number of Adam steps.
        seed: The seed of the dummy initialization.
        label: The label to use, or None to recover it from the gradient.
        learning_rate: The initial Adam step size.
        total_variation_weight: The weight of the total-variation prior.
        input_bounds: The smallest and largest value an input element can take.

    Returns:
        The reconstruction, the label used and the objective trace.

    Raises:
        ValueError: If ``iterations`` or ``num_classes`` is not positive, the
            target gradient does not match the model's parameters, the label is
            out of range, or the bounds are not increasing.

    """
    parameters, target = _validate_attack_inputs(
        model, target_gradient, iterations=iterations, num_classes=num_classes
    )
    lower, upper = input_bounds
    if not lower < upper:
        raise ValueError(f"input_bounds must be increasing. Found {input_bounds}.")
    if label is None:
        label = recover_label(target, num_classes=num_classes)
    if not 0 <= label < num_classes:
        raise ValueError(f"label must be in [0, {num_classes}). Found {label}.")

    generator = torch.Generator().manual_seed(seed)
    dummy_input = torch.randn((1, *input_shape), generator=generator)
    dummy_input = dummy_input.clamp(lower, upper).requires_grad_(True)
    label_tensor = torch.tensor([label])
    optimizer = torch.optim.Adam([dummy_input], lr=learning_rate)
    milestones = [
        int(fraction * iterations) for fraction in LEARNING_RATE_MILESTONE_FRACTIONS
    ]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=milestones, gamma=LEARNING_RATE_DECAY
    )

    best = _BestIterate(dummy_input)
    trace: list[float] = []
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = functional.cross_entropy(model(dummy_input), label_tensor)
        dummy_gradient = torch.autograd.grad(loss, parameters, create_graph=True)
        objective = _cosine_distance(dummy_gradient, target)
        objective = objective + total_variation_weight * _total_variation(dummy_input)
        objective.backward()
        best.update(objective.item(), dummy_input)
        trace.append(objective.item())
        # Adam steps on the sign of the gradient, as in Inverting Gradients.
        assert dummy_input.grad is not None, "objective.backward() sets it"
        dummy_input.grad.sign_()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            dummy_input.clamp_(lower, upper)

    (best_input,) = best.tensors
    return Reconstruction(inputs=best_input, label=label, trace=trace)


class _BestIterate:
    """The iterate with the smallest finite objective seen so far.

    It starts as the initial iterate, which it keeps if no objective is finite.
    """

    def __init__(self, *initial: Tensor) -> None:
        self.objective = math.inf
        self.tensors = tuple(tensor.detach().clone() for tensor in initial)

    def update(self, objective: float, *tensors: Tensor) -> None:
        if math.isfinite(objective) and objective < self.objective:
            self.objective = objective
            self.tensors = tuple(tensor.detach().clone() for tensor in tensors)


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _validate_attack_inputs(
    model: nn.Module,
    target_gradient: Sequence[Tensor],
    *,
    iterations: int,
    num_classes: int,
) -> tuple[list[nn.Parameter], list[Tensor]]:
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1. Found {iterations}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2. Found {num_classes}.")
    parameters = _trainable_parameters(model)
    if len(target_gradient) != len(parameters):
        raise ValueError(
            "target_gradient must have one tensor per trainable parameter. Found "
            f"{len(target_gradient)} tensors for {len(parameters)} parameters."
        )
    for index, (gradient, parameter) in enumerate(
        zip(target_gradient, parameters, strict=True)
    ):
        if gradient.shape != parameter.shape:
            raise ValueError(
                f"target_gradient[{index}] must have shape {tuple(parameter.shape)}. "
                f"Found {tuple(gradient.shape)}."
            )
    return parameters, [gradient.detach() for gradient in target_gradient]


def _last_layer_weight_gradient(
    target_gradient: Sequence[Tensor], *, num_classes: int
) -> Tensor:
    for gradient in reversed(target_gradient):
        if gradient.dim() == 2 and gradient.shape[0] == num_classes:
            return gradient
    raise ValueError(
        "target_gradient must contain the gradient of a final linear layer, a "
        f"2-D tensor with num_classes={num_classes} rows. Found shapes "
        f"{[tuple(gradient.shape) for gradient in target_gradient]}."
    )


def _squared_distance(
    dummy_gradient: Sequence[Tensor], target_gradient: Sequence[Tensor]
) -> Tensor:
    terms = [
        torch.sum((dummy - target) ** 2)
        for dummy, target in zip(dummy_gradient, target_gradient, strict=True)
    ]
    return torch.stack(terms).sum()


def _cosine_distance(
    dummy_gradient: Sequence[Tensor], target_gradient: Sequence[Tensor]
) -> Tensor:
    dummy_flat = torch.cat([gradient.reshape(-1) for gradient in dummy_gradient])
    target_flat = torch.cat([gradient.reshape(-1) for gradient in target_gradient])
    return 1.0 - functional.cosine_similarity(dummy_flat, target_flat, dim=0)


def _total_variation(images: Tensor) -> Tensor:
    # Anisotropic TV: mean absolute difference of horizontal and vertical
    # neighbors over the last two dimensions.
    horizontal = torch.mean(torch.abs(images[..., :, 1:] - images[..., :, :-1]))
    vertical = torch.mean(torch.abs(images[..., 1:, :] - images[..., :-1, :]))
    return horizontal + vertical
