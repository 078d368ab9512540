"""Sample-level DP-SGD for client training, with Opacus.

Neighbouring datasets are one client's local training set with one example
added or removed. Each DP-SGD step Poisson-samples a batch, in which every
example joins with probability q. It clips each example's gradient to L2
norm at most C (`max_grad_norm`), adds Gaussian noise with standard
deviation z * C to the sum, divides by the expected batch size and takes an
SGD step (Abadi et al. 2016, "Deep Learning with Differential Privacy").
z is the noise multiplier. Every step is one sampled Gaussian mechanism, so
the accountant composes epochs * steps per epoch steps per round, over all
rounds of a run.

`train_dp_sgd` trains a private copy of a model for one round and returns
its weights, the epsilon of the round and the epsilon of all rounds so far.
It keeps no state between calls: the caller stores the returned accountant
state, as bytes, and passes it back next round, so the cumulative epsilon
survives a process that serves only one round.

The guarantee covers the examples of one client. It says nothing about
which clients took part, and its epsilon cannot be compared with the
client-level epsilon of central or distributed DP.

This module imports torch and Opacus and no Flower code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import math
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from .._scalars import plain_fields
from ..core.bounds import lower_bound_text, upper_bound_text
from ._opacus import (
    AbstractGradSampleModule,
    ModuleValidator,
    PrivacyEngine,
    trainable_modules,
)
from .accounting import (
    ACCOUNTANT_RDP,
    ACCOUNTANTS,
    GaussianEvent,
    check_delta,
    check_noise_multiplier,
    compute_epsilon,
    noise_multiplier_for_target,
)
from .clipping import MIN_MAX_GRAD_NORM

logger = logging.getLogger("fedsec_flwr.dp")

TRAINING_NUM_THREADS = 1
"""Torch intra-op threads while `train_dp_sgd` runs.

Simulated clients share the machine's cores, so one thread per client
avoids oversubscribing them. The caller's setting is restored afterwards.
"""

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest float32, the dtype in which Opacus clips and noises gradients."""

DEFAULT_MAX_GRAD_NORM = 1.0
"""Default per-example gradient clipping norm C."""

STATE_VERSION = 1
"""Version of the serialized accountant state that `train_dp_sgd` returns."""

WRAPPED_MODULE_PREFIX = "_module."
"""Prefix that Opacus's GradSampleModule puts before the wrapped model's keys."""

SECURE_RNG_PACKAGE = "torchcsprng"
"""Package that Opacus 1.6 needs for `secure_mode=True`."""

BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
"""Layers that normalize each example with statistics of its whole batch."""

UNTRAINED_BATCH_NORM_PROBLEM = (
    "BatchNorm without trainable parameters normalizes each example with the "
    "statistics of its batch and stores running statistics of the private "
    "data, and Opacus's validator skips layers without trainable parameters."
)

BATCH_NORM_SUBCLASS_PROBLEM = (
    "a BatchNorm subclass normalizes each example with the statistics of its "
    "batch, so one example changes the others' gradients"
)

EMBEDDING_MAX_NORM_PROBLEM = (
    "max_norm renormalizes the looked-up rows in the forward pass, so the "
    "weights change with the data outside clipping and noise"
)

INSTANCE_NORM_RUNNING_STATS_PROBLEM = (
    "track_running_stats stores running statistics of the private data without noise"
)

TRAINABLE_WITH_BUFFERS_PROBLEM = (
    "Opacus's GradSampleModule rejects layers that have both trainable "
    "parameters and buffers, because the buffers are not private"
)

FULL_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed"
"""Start of a torch warning that Opacus's per-example gradient hooks trigger."""

ROOT_MODULE_NAME = "<root>"
"""Name that problems and replacements give the model itself."""

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PrivacyBudgetExceededError(RuntimeError):
    """A DP-SGD round would take the cumulative epsilon above its target."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """Privacy settings of sample-level DP-SGD on one client.

    Set exactly one of `noise_multiplier` and `target_epsilon`. With
    `target_epsilon`, the noise multiplier is calibrated once for the whole
    run, `num_rounds` rounds of the client's local training, and a round that
    would take the cumulative epsilon above the target raises
    `PrivacyBudgetExceededError` before it trains.

    Attributes:
        delta: Target delta in [1e-15, 0.1) of every reported epsilon. It should be
            well below 1 / (number of local training examples).
        noise_multiplier: z, the noise standard deviation over the clipping
            norm, finite and at least 0. The value 0 adds no noise, and its
            epsilon is infinite.
        target_epsilon: Epsilon budget for all `num_rounds` rounds, positive.
        num_rounds: Rounds that this client trains in the run, at least 1.
            Required with `target_epsilon`, rejected without it.
        max_grad_norm: C, the L2 bound on each example's gradient, from
            `fedsec_flwr.dp.clipping.MIN_MAX_GRAD_NORM` to `FLOAT32_MAX`.
        accountant: "rdp" (Renyi DP) or "prv" (privacy loss random
            variables), as in `fedsec_flwr.dp.accounting`.
        secure_rng: Whether Opacus draws noise and batches from a
            cryptographically secure generator (its `secure_mode`), which
            needs the torchcsprng package. With False, the default, each
            call draws noise and batches from two new torch generators
            (Mersenne Twisters) seeded with 63 bits from the operating
            system's random source. So neither torch's global seed nor the
            train loader's generator can replay the noise, and training
            with DP-SGD does not repeat from run to run. Opacus's secure mode
            also sums four Gaussian draws per coordinate against attacks on
            the low bits of floating-point noise, as Opacus 1.6's
            `_generate_noise` documents.

    """

    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    num_rounds: int | None = None
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    accountant: str = ACCOUNTANT_RDP
    secure_rng: bool = False

    def __post_init__(self) -> None:
        plain_fields(
            self,
            "delta",
            "noise_multiplier",
            "target_epsilon",
            "num_rounds",
            "max_grad_norm",
        )
        check_delta("delta", self.delta)
        self._check_noise_mode()
        _check_number("max_grad_norm", self.max_grad_norm)
        if self.max_grad_norm <= 0:
            raise ValueError(
                f"max_grad_norm must be positive. Found {self.max_grad_norm}."
            )
        if self.max_grad_norm > FLOAT32_MAX:
            raise ValueError(
                "max_grad_norm must be at most "
                f"{upper_bound_text(FLOAT32_MAX)}, the float32 maximum, because "
                f"Opacus clips in float32. Found {self.max_grad_norm}."
            )
        if self.max_grad_norm < MIN_MAX_GRAD_NORM:
            raise ValueError(
                "max_grad_norm must be at least "
                f"{lower_bound_text(MIN_MAX_GRAD_NORM)} (2**-60), "
                "or the float32 noise loses its precision. "
                f"Found {self.max_grad_norm}."
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"accountant must be one of {ACCOUNTANTS}. Found {self.accountant!r}."
            )
        if not isinstance(self.secure_rng, bool):
            raise ValueError(f"secure_rng must be a bool. Found {self.secure_rng!r}.")

    def _check_noise_mode(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "Set exactly one of noise_multiplier and target_epsilon. Found "
                f"noise_multiplier={self.noise_multiplier}, "
                f"target_epsilon={self.target_epsilon}."
            )

        if self.noise_multiplier is not None:
            _check_number("noise_multiplier", self.noise_multiplier)
            if self.noise_multiplier < 0:
                raise ValueError(
                    "noise_multiplier must be at least 0. "
                    f"Found {self.noise_multiplier}."
                )
            if self.noise_multiplier > 0:
                check_noise_multiplier("noise_multiplier", self.noise_multiplier)
            if self.num_rounds is not None:
                raise ValueError(
                    "num_rounds is used only to calibrate noise for "
                    "target_epsilon, so leave it None with noise_multiplier. "
                    f"Found num_rounds={self.num_rounds}."
                )
            return

        _check_number("target_epsilon", self.target_epsilon)
        if self.target_epsilon is None or self.target_epsilon <= 0:
            raise ValueError(
                f"target_epsilon must be positive. Found {self.target_epsilon}."
            )
        if self.num_rounds is None:
            raise ValueError(
                "num_rounds is required with target_epsilon, because the "
                "noise is calibrated for all rounds of the run. Found None."
            )
        _check_positive_int("num_rounds", self.num_rounds)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSGDResult:
    """Outcome of one round of DP-SGD on a client.

    Attributes:
        state_dict: Trained weights, with the keys of the input model in the
            same order.
        train_loss: Mean loss over the examples sampled in the last epoch,
            NaN if Poisson sampling drew none.
        num_examples: Size of the local training set, for weighted averaging.
        noise_multiplier: z used in this round.
        sample_rate: q that the accountant recorded, 1 / steps per epoch.
        num_steps: DP-SGD steps in this round.
        round_epsilon: Epsilon of this round alone, at `delta`.
        cumulative_epsilon: Epsilon of all rounds recorded in the state,
            this one included, at `delta`.
        delta: Target delta of both epsilons.
        state: Serialized accountant state to pass to the next call.

    """

    state_dict: dict[str, torch.Tensor]
    train_loss: float
    num_examples: int
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    round_epsilon: float
    cumulative_epsilon: float
    delta: float
    state: bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Steps:
    """DP-SGD steps with the same noise multiplier and sample rate."""

    noise_multiplier: float
    sample_rate: float
    num_steps: int

    def __post_init__(self) -> None:
        _check_number("noise_multiplier", self.noise_multiplier)
        if self.noise_multiplier < 0:
            raise ValueError(
                f"noise_multiplier must be at least 0. Found {self.noise_multiplier}."
            )
        if self.noise_multiplier > 0:
            check_noise_multiplier("noise_multiplier", self.noise_multiplier)
        _check_number("sample_rate", self.sample_rate)
        if not 0 < self.sample_rate <= 1:
            raise ValueError(
                f"sample_rate must be in (0, 1]. Found {self.sample_rate}."
            )
        _check_positive_int("num_steps", self.num_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Calibration:
    """Noise multiplier found for a target epsilon, and the plan it was found for."""

    target_epsilon: float
    delta: float
    accountant: str
    sample_rate: float
    num_steps: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_number("target_epsilon", self.target_epsilon)
        check_delta("delta", self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"accountant must be one of {ACCOUNTANTS}. Found {self.accountant!r}."
            )
        _Steps(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            num_steps=self.num_steps,
        )

    def plan(self) -> tuple[float, float, str, float, int]:
        """Return every field that the noise multiplier depends on."""
        return (
            self.target_epsilon,
            self.delta,
            self.accountant,
            self.sample_rate,
            self.num_steps,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _AccountantState:
    """Rounds recorded so far, one `_Steps` per round, and the calibration."""

    history: tuple[_Steps, ...] = ()
    calibration: _Calibration | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TrainingOutput:
    state_dict: dict[str, torch.Tensor]
    train_loss: float
    recorded_history: list[tuple[float, float, int]]


def check_private_compatible(model: nn.Module) -> None:
    """Raise ValueError unless Opacus can train every layer of `model` with DP-SGD.

    Runs Opacus's per-layer validators, as `ModuleValidator.validate` does,
    but names each layer and ignores whether the model is in training mode.
    It also rejects trainable layers with buffers, as Opacus's
    `GradSampleModule` does, BatchNorm layers and InstanceNorm layers with
    running statistics that have no trainable parameters, and subclasses of
    BatchNorm, which Opacus's validator skips, and embeddings with
    ``max_norm``, which change their weights from the data in the forward
    pass. `train_dp_sgd` also refuses to return a model whose buffers or
    frozen parameters or extra state changed during training.

    Raises:
        ValueError: Listing every problem, one per layer.

    """
    problems = _find_problems(model)
    if problems:
        raise ValueError(
            "model cannot be trained with DP-SGD: "
            + "; ".join(problems)
            + ". make_private_compatible replaces the layers that Opacus can "
            "fix, such as BatchNorm."
        )


def make_private_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace the layers of `model` that Opacus cannot train with DP-SGD.

    BatchNorm becomes GroupNorm with gcd(32, channels) groups, and
    `ModuleValidator.fix` replaces the other layers for which Opacus has a
    fixer. Replaced layers get torch's default initial weights, and their
    state_dict keys differ (GroupNorm has no running statistics), so call
    this on the initial model before training starts. When DP-SGD is on,
    the server must call it on its global model and every client on its
    local model, so that both have the same keys.

    Args:
        model: The model. It is never modified.

    Returns:
        `model` itself and an empty list if it needs no change. Otherwise a
        fixed copy and one line per replaced layer, such as
        "features.1: BatchNorm2d -> GroupNorm".

    Raises:
        ValueError: If the fixed copy still has layers that Opacus cannot
            train, listing each of them.

    """
    if not _find_problems(model):
        return model, []

    fixed = ModuleValidator.fix(model)
    fixed = _replace_untrained_batch_norms(fixed)
    remaining = _find_problems(fixed)
    if remaining:
        raise ValueError(
            "model has layers that Opacus can neither train with DP-SGD nor "
            f"replace: {'; '.join(remaining)}. Replace them in the model's code."
        )
    replacements = _describe_replacements(original=model, fixed=fixed)

    logger.info("Replaced layers for DP-SGD: %s", ", ".join(replacements))
    return fixed, replacements


def _check_finite_weights(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    noise_multiplier: float,
    learning_rate: float,
    config: DPSGDConfig,
) -> None:
    """Raise ValueError if training left a trained weight NaN or infinite.

    The noise, of standard deviation z * C, and the sum of clipped gradients
    are float32, so a large clipping norm C overflows them. The weights are
    then discarded, so the round releases nothing and spends no budget.
    Buffers and extra state are not trained, so a constant NaN in them is
    left to the caller.
    """
    trained = [name for name, value in model.named_parameters() if value.requires_grad]
    for key in trained:
        tensor = state_dict.get(key)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"DP-SGD left weight {key!r} NaN or infinite, with max_grad_norm "
                f"{config.max_grad_norm}, noise multiplier {noise_multiplier:.4g} "
                f"and learning rate {learning_rate}. The noise and gradient sums "
                "are float32, so lower max_grad_norm or the learning rate."
            )


def train_dp_sgd(
    model: nn.Module,
    train_loader: DataLoader[Any],
    *,
    epochs: int,
    learning_rate: float,
    config: DPSGDConfig,
    state: bytes | None,
    loss_fn: LossFunction | None = None,
) -> DPSGDResult:
    """Train a private copy of `model` with DP-SGD for one round.

    Each call deep-copies `model`, wraps the copy in a new Opacus
    `PrivacyEngine` and `GradSampleModule`, and trains it with SGD, so
    repeated calls in one process never wrap a model twice or stack hooks.
    Opacus replaces `train_loader`'s sampler with Poisson sampling at rate
    1 / len(train_loader), which is batch_size / dataset size when the batch
    size divides the dataset size. Torch uses `TRAINING_NUM_THREADS` threads
    during the call.

    Args:
        model: Model to start from, compatible with Opacus (see
            `make_private_compatible`). It is never modified.
        train_loader: Map-style loader of (features, labels) batches.
            Opacus keeps its dataset, collate function and workers, and
            replaces its sampler. Its generator is not used (see
            `DPSGDConfig.secure_rng`).
        epochs: Passes over the data, at least 1.
        learning_rate: SGD step size, positive.
        config: Privacy settings. Keep them the same in every round.
        state: The `state` of the previous round's result, or None in the
            client's first round.
        loss_fn: Loss that averages over the batch. Defaults to
            cross-entropy.

    Returns:
        The trained weights, the loss and the epsilon spent.

    Raises:
        ValueError: If an argument is invalid, `state` is malformed, the
            model has layers that Opacus cannot train, or training left a
            weight NaN or infinite.
        PrivacyBudgetExceededError: If `config.target_epsilon` is set and this
            round would take the cumulative epsilon above it.
        ImportError: If `config.secure_rng` is True and torchcsprng is not
            installed.

    """
    _check_training_arguments(
        model, train_loader, epochs=epochs, learning_rate=learning_rate, config=config
    )
    accountant_state = _parse_state(state)

    sample_rate, steps_per_epoch = _poisson_schedule(train_loader)
    num_steps = epochs * steps_per_epoch
    noise_multiplier, calibration = _resolve_noise_multiplier(
        config,
        sample_rate=sample_rate,
        num_steps=num_steps,
        stored=accountant_state.calibration,
    )
    planned = _Steps(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps
    )
    history = (*accountant_state.history, planned)
    cumulative_epsilon = _check_budget(config, history=history)

    with _torch_threads(TRAINING_NUM_THREADS):
        output = _train_private_copy(
            model,
            train_loader,
            epochs=epochs,
            learning_rate=learning_rate,
            noise_multiplier=noise_multiplier,
            config=config,
            loss_fn=loss_fn if loss_fn is not None else nn.CrossEntropyLoss(),
        )
    _check_recorded_steps(output.recorded_history, planned=planned)
    _check_untrained_state_unchanged(model, output.state_dict)
    _check_finite_weights(
        model,
        output.state_dict,
        noise_multiplier=noise_multiplier,
        learning_rate=learning_rate,
        config=config,
    )

    round_epsilon = _epsilon(
        [planned], delta=config.delta, accountant=config.accountant
    )
    new_state = _AccountantState(history=history, calibration=calibration)
    logger.info(
        "DP-SGD round %d: %d steps, noise multiplier %.4g, sample rate %.4g, "
        "epsilon %.4g this round and %.4g in total at delta %.3g",
        len(history),
        num_steps,
        noise_multiplier,
        sample_rate,
        round_epsilon,
        cumulative_epsilon,
        config.delta,
    )
    return DPSGDResult(
        state_dict=output.state_dict,
        train_loss=output.train_loss,
        num_examples=_dataset_size(train_loader),
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        num_steps=num_steps,
        round_epsilon=round_epsilon,
        cumulative_epsilon=cumulative_epsilon,
        delta=config.delta,
        state=_serialize_state(new_state),
    )


# --- compatibility -----------------------------------------------------------


def _find_problems(model: nn.Module) -> list[str]:
    problems = []
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        messages = [str(error) for error in validator(module)] if validator else []
        if not messages and any(True for _ in module.buffers()):
            messages = [TRAINABLE_WITH_BUFFERS_PROBLEM]
        for message in messages:
            problems.append(_describe_problem(name, module, message))

    for name, module in model.named_modules():
        if _is_untrained_batch_norm(module):
            problems.append(
                _describe_problem(name, module, UNTRAINED_BATCH_NORM_PROBLEM)
            )
        elif _is_batch_norm_subclass(module):
            problems.append(
                _describe_problem(name, module, BATCH_NORM_SUBCLASS_PROBLEM)
            )
        embedding = isinstance(module, nn.Embedding | nn.EmbeddingBag)
        if embedding and module.max_norm is not None:
            problems.append(_describe_problem(name, module, EMBEDDING_MAX_NORM_PROBLEM))
        # Opacus's validator reports the InstanceNorm layers it visits, those
        # with trainable parameters.
        instance_norm = isinstance(module, nn.modules.instancenorm._InstanceNorm)
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if instance_norm and module.track_running_stats and not trainable:
            problems.append(
                _describe_problem(name, module, INSTANCE_NORM_RUNNING_STATS_PROBLEM)
            )

    return problems


def _describe_problem(name: str, module: nn.Module, message: str) -> str:
    # Opacus's messages are paragraphs, and their first sentence names the
    # problem.
    first_sentence = message.split(". ", maxsplit=1)[0].rstrip(".")
    return f"{_display_name(name)} ({type(module).__name__}): {first_sentence}"


def _is_untrained_batch_norm(module: nn.Module) -> bool:
    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
    return isinstance(module, BATCH_NORM_TYPES) and not trainable


def _is_batch_norm_subclass(module: nn.Module) -> bool:
    # Opacus looks its validators up by exact type, so it never checks these.
    batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
    return batch_norm and type(module) not in BATCH_NORM_TYPES


def _replace_untrained_batch_norms(model: nn.Module) -> nn.Module:
    """Replace, in place, the BatchNorm layers that `ModuleValidator.fix` skips.

    `ModuleValidator.fix` visits only layers with trainable parameters, so
    this applies Opacus's registered BatchNorm fixer to the others.
    """
    names = [
        name
        for name, module in model.named_modules()
        if _is_untrained_batch_norm(module)
    ]
    for name in names:
        module = model.get_submodule(name)
        replacement = ModuleValidator.FIXERS[type(module)](module)
        if not name:
            return replacement  # type: ignore[no-any-return]
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)

    return model


def _describe_replacements(*, original: nn.Module, fixed: nn.Module) -> list[str]:
    original_types = {name: type(module) for name, module in original.named_modules()}
    replacements = []
    for name, module in fixed.named_modules():
        original_type = original_types.get(name)
        if original_type is not None and original_type is not type(module):
            replacements.append(
                f"{_display_name(name)}: {original_type.__name__} -> "
                f"{type(module).__name__}"
            )
    return replacements


def _check_untrained_state_unchanged(
    model: nn.Module, state_dict: dict[str, Any]
) -> None:
    """Raise unless the trained copy's state, trainable weights aside, is the model's.

    DP-SGD clips and noises the gradients of trainable parameters only. A
    buffer, frozen parameter or extra state that a layer updates in its
    forward pass, such as a running statistic, would carry the private data
    out without noise, so such a round releases nothing. NaN equals NaN here,
    so a constant NaN counts as unchanged. A layer without state that mixes
    the examples of a batch cannot be detected this way.
    """
    # A tied parameter appears under each of its names in the state dict.
    trainable = {
        name
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if parameter.requires_grad
    }
    changed = [
        name
        for name, value in model.state_dict().items()
        if name not in trainable
        and name in state_dict
        and not _same_entry(state_dict[name], value)
    ]
    if changed:
        raise ValueError(
            "model has buffers, frozen parameters or extra state that changed "
            "during DP-SGD training, so they would carry the training data "
            f"without noise: {', '.join(changed)}. Remove the layers that update "
            "them in the forward pass."
        )


def _same_entry(first: object, second: object) -> bool:
    """Compare state dict entries: tensors, arrays, and containers of them."""
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(
            _same_entry(first[key], second[key]) for key in first
        )
    if isinstance(first, list | tuple) and isinstance(second, list | tuple):
        return len(first) == len(second) and all(
            _same_entry(a, b) for a, b in zip(first, second, strict=True)
        )
    if isinstance(first, np.ndarray) and isinstance(second, np.ndarray):
        try:
            return _same_entry(torch.from_numpy(first), torch.from_numpy(second))
        except TypeError:
            # Object and string arrays have no tensor form.
            return bool(np.array_equal(first, second))
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        try:
            return bool(first == second)
        except (TypeError, ValueError, RuntimeError):
            return False
    if first.dtype != second.dtype or first.shape != second.shape:
        return False
    if torch.equal(first, second):
        return True
    if not (first.is_floating_point() or first.is_complex()):
        return False
    first_nan, second_nan = torch.isnan(first), torch.isnan(second)
    return torch.equal(first_nan, second_nan) and torch.equal(
        first[~first_nan], second[~second_nan]
    )


def _display_name(name: str) -> str:
    return name if name else ROOT_MODULE_NAME


# --- accounting --------------------------------------------------------------


def _poisson_schedule(train_loader: DataLoader[Any]) -> tuple[float, int]:
    """Return the sample rate and steps per epoch that Opacus will record.

    Opacus 1.6's `make_private` samples each example with probability
    1 / len(train_loader), runs int(1 / that) steps per epoch, and gives its
    accountant 1 / steps as the sample rate. Rounding can make the steps one
    fewer than len(train_loader) (93 batches give 92 steps), and then the
    recorded rate is above the true one, which only raises epsilon.
    """
    sampler_rate = 1 / len(train_loader)
    steps_per_epoch = int(1 / sampler_rate)
    return 1 / steps_per_epoch, steps_per_epoch


def _resolve_noise_multiplier(
    config: DPSGDConfig,
    *,
    sample_rate: float,
    num_steps: int,
    stored: _Calibration | None,
) -> tuple[float, _Calibration | None]:
    """Return the round's noise multiplier and the calibration to store."""
    if config.noise_multiplier is not None:
        return config.noise_multiplier, stored

    assert config.target_epsilon is not None
    assert config.num_rounds is not None
    run_steps = num_steps * config.num_rounds
    plan = (
        config.target_epsilon,
        config.delta,
        config.accountant,
        sample_rate,
        run_steps,
    )
    if stored is not None and stored.plan() == plan:
        logger.debug("Reusing noise multiplier %.6g", stored.noise_multiplier)
        return stored.noise_multiplier, stored

    noise_multiplier = noise_multiplier_for_target(
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        sample_rate=sample_rate,
        num_steps=run_steps,
        accountant=config.accountant,
    )
    logger.info(
        "Calibrated noise multiplier %.6g for epsilon %.4g over %d rounds "
        "of %d steps at sample rate %.4g",
        noise_multiplier,
        config.target_epsilon,
        config.num_rounds,
        num_steps,
        sample_rate,
    )
    calibration = _Calibration(
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        accountant=config.accountant,
        sample_rate=sample_rate,
        num_steps=run_steps,
        noise_multiplier=noise_multiplier,
    )
    return noise_multiplier, calibration


def _check_budget(config: DPSGDConfig, *, history: Sequence[_Steps]) -> float:
    """Return the epsilon of `history`, raising if it exceeds the target."""
    epsilon = _epsilon(history, delta=config.delta, accountant=config.accountant)
    if config.target_epsilon is not None and epsilon > config.target_epsilon:
        raise PrivacyBudgetExceededError(
            f"DP-SGD round {len(history)} would raise the cumulative epsilon to "
            f"{epsilon:.6g}, above target_epsilon {config.target_epsilon} "
            f"(num_rounds {config.num_rounds}). Stop training on this client."
        )
    if math.isinf(epsilon):
        logger.warning(
            "DP-SGD with noise multiplier 0 gives no privacy: epsilon is infinite"
        )
    return epsilon


def _epsilon(history: Sequence[_Steps], *, delta: float, accountant: str) -> float:
    if any(steps.noise_multiplier == 0 for steps in history):
        return math.inf

    events = [
        GaussianEvent(
            noise_multiplier=steps.noise_multiplier,
            sample_rate=steps.sample_rate,
            num_steps=steps.num_steps,
        )
        for steps in history
    ]
    return compute_epsilon(events, delta=delta, accountant=accountant)


def _check_recorded_steps(
    recorded: list[tuple[float, float, int]], *, planned: _Steps
) -> None:
    """Raise RuntimeError unless Opacus recorded exactly the planned steps."""
    expected = [(planned.noise_multiplier, planned.sample_rate, planned.num_steps)]
    if [tuple(entry) for entry in recorded] != expected:
        raise RuntimeError(
            f"Opacus recorded the DP-SGD steps {recorded}, but the accounting "
            f"planned {expected}. The trained model is discarded."
        )


# --- accountant state --------------------------------------------------------


def _serialize_state(state: _AccountantState) -> bytes:
    calibration = (
        dataclasses.asdict(state.calibration) if state.calibration is not None else None
    )
    document = {
        "version": STATE_VERSION,
        "history": [dataclasses.asdict(steps) for steps in state.history],
        "calibration": calibration,
    }
    return json.dumps(document, allow_nan=False).encode("utf-8")


def _parse_state(state: bytes | None) -> _AccountantState:
    """Parse a serialized accountant state, or return an empty one for None.

    Raises:
        ValueError: If `state` is not a state that `_serialize_state` wrote.

    """
    if state is None:
        return _AccountantState()
    if not isinstance(state, bytes):
        raise ValueError(f"state must be bytes or None. Found {type(state).__name__}.")

    try:
        document = json.loads(state.decode("utf-8"))
        return _state_from_document(document)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(
            "state is not a DP-SGD accountant state that train_dp_sgd returned: "
            f"{error}"
        ) from error


def _state_from_document(document: Any) -> _AccountantState:
    if not isinstance(document, dict) or set(document) != {
        "version",
        "history",
        "calibration",
    }:
        raise ValueError("expected an object with version, history and calibration")
    if document["version"] != STATE_VERSION:
        raise ValueError(
            f"version must be {STATE_VERSION}. Found {document['version']!r}."
        )
    if not isinstance(document["history"], list):
        raise ValueError("history must be a list")

    history = tuple(_Steps(**entry) for entry in document["history"])
    calibration = None
    if document["calibration"] is not None:
        calibration = _Calibration(**document["calibration"])

    return _AccountantState(history=history, calibration=calibration)


# --- training ----------------------------------------------------------------


def _train_private_copy(
    model: nn.Module,
    train_loader: DataLoader[Any],
    *,
    epochs: int,
    learning_rate: float,
    noise_multiplier: float,
    config: DPSGDConfig,
    loss_fn: LossFunction,
) -> _TrainingOutput:
    private_model = copy.deepcopy(model)
    private_model.train()
    trainable = [p for p in private_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=learning_rate)
    device = trainable[0].device
    noise_generator = None
    if not config.secure_rng:
        # Opacus would otherwise draw from torch's global generator, which
        # callers often seed from a public value, so the noise could be
        # replayed and subtracted.
        noise_generator = _unpredictable_generator(device)
        train_loader = _with_generator(
            train_loader, _unpredictable_generator(torch.device("cpu"))
        )

    engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_rng)
    wrapped, dp_optimizer, dp_loader = engine.make_private(
        module=private_model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
    )

    try:
        train_loss = math.nan
        with warnings.catch_warnings():
            # Opacus puts full backward hooks on every layer, and torch warns
            # each time such a hook fires on a layer whose inputs need no
            # gradient, such as the first layer. The gradients are still right.
            warnings.filterwarnings("ignore", message=FULL_BACKWARD_HOOK_WARNING)
            for _ in range(epochs):
                train_loss = _train_epoch(
                    wrapped, dp_loader, dp_optimizer, loss_fn=loss_fn, device=device
                )
        state_dict = _unwrap_state_dict(
            wrapped.state_dict(), expected_keys=list(model.state_dict())
        )
    finally:
        wrapped.remove_hooks()

    return _TrainingOutput(
        state_dict=state_dict,
        train_loss=train_loss,
        recorded_history=list(engine.accountant.history),
    )


def _unpredictable_generator(device: torch.device) -> torch.Generator:
    """Return a torch generator on ``device`` seeded from the OS random source."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def _with_generator(
    train_loader: DataLoader[Any], generator: torch.Generator
) -> DataLoader[Any]:
    """Return a shallow copy of ``train_loader`` that samples with ``generator``.

    Opacus's Poisson sampler takes the loader's generator, and the caller's
    loader stays as it was.
    """
    copied = copy.copy(train_loader)
    copied.generator = generator
    return copied


def _train_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFunction,
    device: torch.device,
) -> float:
    """Run one epoch and return the mean loss of the sampled examples."""
    loss_sum = 0.0
    num_examples = 0
    for batch in loader:
        features, labels = _split_batch(batch)
        features, labels = features.to(device), labels.to(device)

        # Poisson sampling can draw an empty batch. Opacus still takes the
        # step, which adds only noise, and the accountant counts it.
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(features), labels)
        torch.autograd.backward(loss)
        optimizer.step()

        if len(labels) > 0:
            loss_sum += float(loss.item()) * len(labels)
            num_examples += len(labels)

    return loss_sum / num_examples if num_examples else math.nan


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise ValueError(
            "train_loader must yield (features, labels) batches. "
            f"Found {type(batch).__name__}."
        )
    features, labels = batch
    return features, labels


def _unwrap_state_dict(
    wrapped_state: dict[str, torch.Tensor], *, expected_keys: list[str]
) -> dict[str, torch.Tensor]:
    """Strip Opacus's wrapper prefix and check the keys against the input model."""
    state_dict: dict[str, torch.Tensor] = OrderedDict()
    for key, value in wrapped_state.items():
        if not key.startswith(WRAPPED_MODULE_PREFIX):
            raise RuntimeError(
                f"state_dict key {key!r} of the Opacus-wrapped model does not "
                f"start with {WRAPPED_MODULE_PREFIX!r}."
            )
        state_dict[key.removeprefix(WRAPPED_MODULE_PREFIX)] = value

    if list(state_dict) != expected_keys:
        raise RuntimeError(
            "The trained state_dict keys differ from the input model's: "
            f"{list(state_dict)} != {expected_keys}."
        )
    return state_dict


@contextlib.contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- argument checks ---------------------------------------------------------


def _check_training_arguments(
    model: nn.Module,
    train_loader: DataLoader[Any],
    *,
    epochs: int,
    learning_rate: float,
    config: DPSGDConfig,
) -> None:
    if not isinstance(config, DPSGDConfig):
        raise ValueError(
            f"config must be a DPSGDConfig. Found {type(config).__name__}."
        )
    _check_positive_int("epochs", epochs)
    _check_number("learning_rate", learning_rate)
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive. Found {learning_rate}.")
    _check_model(model)
    _check_loader(train_loader)
    if config.secure_rng and importlib.util.find_spec(SECURE_RNG_PACKAGE) is None:
        raise ImportError(
            f"secure_rng=True needs the {SECURE_RNG_PACKAGE} package, which is "
            "not installed. Install it or set secure_rng=False."
        )


def _check_model(model: nn.Module) -> None:
    if isinstance(model, AbstractGradSampleModule):
        raise ValueError(
            "model must be a plain torch module, not an Opacus GradSampleModule, "
            "because train_dp_sgd wraps its own copy."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model must have at least one parameter that requires grad. Found none."
        )
    check_private_compatible(model)


def _check_loader(train_loader: DataLoader[Any]) -> None:
    if not isinstance(train_loader, DataLoader):
        raise ValueError(
            f"train_loader must be a DataLoader. Found {type(train_loader).__name__}."
        )
    if isinstance(train_loader.dataset, IterableDataset):
        raise ValueError(
            "train_loader must load a map-style dataset, because Poisson sampling "
            "draws examples by index. Found an IterableDataset."
        )
    num_examples = _dataset_size(train_loader)
    if num_examples < 1:
        raise ValueError(
            "train_loader's dataset must have at least 1 example. "
            f"Found {num_examples}."
        )
    sampler = train_loader.sampler
    # Either sampler draws indices 0 to n - 1 once each when its length is n.
    in_order = isinstance(sampler, SequentialSampler) and len(sampler) == num_examples
    shuffled = (
        isinstance(sampler, RandomSampler)
        and not sampler.replacement
        and sampler.num_samples == num_examples
    )
    whole = in_order or shuffled
    if not whole or type(train_loader.batch_sampler) is not BatchSampler:
        raise ValueError(
            "train_loader must read its whole dataset in batches of batch_size, "
            "because Opacus replaces its sampler with Poisson sampling over every "
            f"example. Found a {type(sampler).__name__} and a "
            f"{type(train_loader.batch_sampler).__name__}; pass a Subset of the "
            "data to train on instead."
        )
    if len(train_loader) == 0:
        raise ValueError(
            "train_loader must yield at least one batch. Found none: drop_last "
            f"with batch_size {train_loader.batch_size} above the "
            f"{num_examples} examples."
        )


def _dataset_size(train_loader: DataLoader[Any]) -> int:
    return len(train_loader.dataset)  # type: ignore[arg-type]


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number. Found {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite. Found {value}.")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int. Found {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1. Found {value}.")
