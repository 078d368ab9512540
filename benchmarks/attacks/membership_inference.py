"""Membership inference attacks and their evaluation metrics.

A membership inference attack decides from a trained model's outputs whether an
example was in its training set. Each attack here returns one score per example,
where a higher score means "more likely a member", so the attack can be judged
over all thresholds at once:

* the loss-threshold attack of Yeom, Giacomelli, Fredrikson and Jha, "Privacy
  Risk in Machine Learning: Analyzing the Connection to Overfitting", IEEE CSF
  2018, which predicts "member" when the loss is below a threshold;
* the Likelihood Ratio Attack (LiRA) of Carlini, Chien, Nasr, Song, Terzis and
  Tramer, "Membership Inference Attacks From First Principles", IEEE S&P 2022,
  which compares the target model's confidence on an example with the
  confidences of shadow models trained with and without that example.

Carlini et al. argue that attacks must be judged by their true-positive rate at
a low false-positive rate, not only by the area under the ROC curve. An attack
that identifies a few members with certainty is a real privacy breach even when
its AUC is close to 0.5. ``evaluate_attack`` reports both.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve
from torch import Tensor, nn
from torch.nn import functional

DEFAULT_FALSE_POSITIVE_RATE = 0.01
# A floor on the standard deviations fitted from shadow models, in the units of
# the logit-scaled confidence, so that examples on which every shadow model
# agrees do not produce infinite scores.
MIN_STANDARD_DEVIATION = 1e-6
EVALUATION_BATCH_SIZE = 1024

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

ShadowTrainer = Callable[[Tensor, Tensor, int], nn.Module]
"""Trains a fresh shadow model on (inputs, labels) with the given seed."""


@dataclass(frozen=True)
class AttackMetrics:
    """The separation of members from non-members by membership scores.

    Attributes:
        auc: The area under the ROC curve, 0.5 for guessing and 1.0 for a
            perfect attack.
        tpr_at_low_fpr: The true-positive rate at ``false_positive_rate``,
            linearly interpolated on the ROC curve.
        false_positive_rate: The false-positive rate at which
            ``tpr_at_low_fpr`` was read.
    """

    auc: float
    tpr_at_low_fpr: float
    false_positive_rate: float


def evaluate_attack(
    scores: npt.ArrayLike,
    is_member: npt.ArrayLike,
    *,
    false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
) -> AttackMetrics:
    """Compute the AUC and the TPR at a low FPR of membership scores.

    Args:
        scores: One score per example, higher for "more likely a member".
        is_member: True for the examples that were in the training set.
        false_positive_rate: The FPR at which to read the TPR, in (0, 1).

    Returns:
        The AUC from ``sklearn.metrics.roc_auc_score`` and the interpolated TPR.

    Raises:
        ValueError: If the arrays are not 1-D of one length, a score is not
            finite, or both classes are not present.
    """
    score_array, member_array = _validate_scores(scores, is_member)

    auc = float(roc_auc_score(member_array, score_array))
    tpr = tpr_at_fpr(score_array, member_array, false_positive_rate=false_positive_rate)
    return AttackMetrics(
        auc=auc, tpr_at_low_fpr=tpr, false_positive_rate=false_positive_rate
    )


def tpr_at_fpr(
    scores: npt.ArrayLike,
    is_member: npt.ArrayLike,
    *,
    false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
) -> float:
    """Read the true-positive rate at a given false-positive rate off the ROC.

    ``sklearn.metrics.roc_curve`` gives the ROC points of all thresholds. The
    result is the linear interpolation between the last point with an FPR at or
    below the requested one (taking its highest TPR) and the next point. A
    point on that segment is what an attacker gets by picking between the two
    thresholds at random, so the value is achievable. Where a point lies exactly
    at the requested FPR, its highest TPR is returned.

    Args:
        scores: One score per example, higher for "more likely a member".
        is_member: True for the examples that were in the training set.
        false_positive_rate: The FPR at which to read the TPR, in (0, 1).

    Returns:
        The interpolated TPR.

    Raises:
        ValueError: If ``false_positive_rate`` is not in (0, 1), the arrays are
            not 1-D of one length, a score is not finite, or both classes are
            not present.
    """
    if not 0.0 < false_positive_rate < 1.0:
        raise ValueError(
            f"false_positive_rate must be in (0, 1). Found {false_positive_rate}."
        )
    score_array, member_array = _validate_scores(scores, is_member)

    fpr, tpr, _ = roc_curve(member_array, score_array, drop_intermediate=False)

    below = np.flatnonzero(fpr <= false_positive_rate)
    last_below = below[-1]
    if fpr[last_below] == false_positive_rate or last_below == len(fpr) - 1:
        return float(tpr[last_below])
    next_above = last_below + 1
    fraction = (false_positive_rate - fpr[last_below]) / (
        fpr[next_above] - fpr[last_below]
    )
    return float(tpr[last_below] + fraction * (tpr[next_above] - tpr[last_below]))


def per_example_losses(model: nn.Module, inputs: Tensor, labels: Tensor) -> FloatArray:
    """Compute the cross-entropy loss of each example, in evaluation mode.

    Args:
        model: The classifier under attack.
        inputs: The examples, shape (n, *input_shape).
        labels: Their class indices, shape (n,).

    Returns:
        The n losses in nats.
    """
    logits = _predict_logits(model, inputs)
    losses = functional.cross_entropy(logits, labels, reduction="none")
    return losses.double().numpy()


def loss_threshold_scores(
    model: nn.Module, inputs: Tensor, labels: Tensor
) -> FloatArray:
    """Score membership by the negated loss (Yeom et al. 2018).

    Yeom et al. predict "member" when the loss is below the expected training
    loss. Returning the negated loss lets ``evaluate_attack`` sweep every
    threshold, including that one.

    Args:
        model: The classifier under attack.
        inputs: The examples, shape (n, *input_shape).
        labels: Their class indices, shape (n,).

    Returns:
        One score per example, higher for "more likely a member".
    """
    return -per_example_losses(model, inputs, labels)


def logit_scaled_confidence(
    model: nn.Module, inputs: Tensor, labels: Tensor
) -> FloatArray:
    """Compute log(p / (1 - p)) for the probability p of the true class.

    Carlini et al. (2022) apply this logit scaling because it makes
    the distribution of a model's confidence on an example over training runs
    close to Gaussian. It is computed from the logits z as
    ``z_y - logsumexp(z_j for j != y)``, which does not round p to 1.

    Args:
        model: The classifier.
        inputs: The examples, shape (n, *input_shape).
        labels: Their class indices, shape (n,).

    Returns:
        The n logit-scaled confidences.
    """
    logits = _predict_logits(model, inputs).double()
    true_class = labels.view(-1, 1)
    true_logit = logits.gather(1, true_class).squeeze(1)
    other_logits = logits.scatter(1, true_class, float("-inf"))
    return (true_logit - torch.logsumexp(other_logits, dim=1)).numpy()


def balanced_inclusion_matrix(
    *, num_shadows: int, num_examples: int, rng: np.random.Generator
) -> BoolArray:
    """Assign each example to a random half of the shadow models.

    Each example is in the training set of exactly ``num_shadows // 2`` shadow
    models, chosen at random. So every example has as many "in" as "out" models
    to fit its Gaussians to, and each shadow model trains on about half of the
    examples.

    Args:
        num_shadows: The number of shadow models, even and at least 2.
        num_examples: The number of examples in the attacker's population.
        rng: The source of randomness.

    Returns:
        A boolean matrix of shape (num_shadows, num_examples), True where the
        shadow model trains on the example.

    Raises:
        ValueError: If ``num_shadows`` is odd or below 2, or ``num_examples``
            is below 1.
    """
    if num_shadows < 2 or num_shadows % 2 != 0:
        raise ValueError(
            f"num_shadows must be even and at least 2. Found {num_shadows}."
        )
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1. Found {num_examples}.")

    ranks = np.argsort(rng.random((num_shadows, num_examples)), axis=0)
    return ranks < num_shadows // 2


def train_shadow_models(
    train_shadow: ShadowTrainer,
    *,
    inputs: Tensor,
    labels: Tensor,
    inclusion: BoolArray,
    seed: int,
) -> FloatArray:
    """Train shadow models and record their confidence on every example.

    Args:
        train_shadow: Trains a fresh model on (inputs, labels) with a seed. It
            should mimic how the target model was trained.
        inputs: The attacker's population, shape (n, *input_shape).
        labels: Their class indices, shape (n,).
        inclusion: The (num_shadows, n) matrix from
            ``balanced_inclusion_matrix``.
        seed: The base seed; shadow model k trains with ``seed + k``.

    Returns:
        The logit-scaled confidence of each shadow model on each example, shape
        (num_shadows, n).

    Raises:
        ValueError: If ``inclusion`` does not have one column per example.
    """
    if inclusion.ndim != 2 or inclusion.shape[1] != inputs.shape[0]:
        raise ValueError(
            "inclusion must have shape (num_shadows, n) with n = "
            f"{inputs.shape[0]} examples. Found {inclusion.shape}."
        )

    confidences = np.empty(inclusion.shape, dtype=np.float64)
    for shadow_index, member_mask in enumerate(inclusion):
        indices = torch.from_numpy(np.flatnonzero(member_mask))
        shadow_model = train_shadow(
            inputs[indices], labels[indices], seed + shadow_index
        )
        confidences[shadow_index] = logit_scaled_confidence(
            shadow_model, inputs, labels
        )
    return confidences


def lira_scores(
    target_confidences: npt.ArrayLike,
    shadow_confidences: npt.ArrayLike,
    inclusion: npt.ArrayLike,
    *,
    online: bool,
    global_variance: bool,
) -> FloatArray:
    """Score membership with the Likelihood Ratio Attack (Carlini et al. 2022).

    For each example, Gaussians are fitted to the logit-scaled confidences of
    the shadow models that trained on it ("in") and of those that did not
    ("out").

    Online variant: the score is the log-likelihood ratio
    ``log N(c; mu_in, s_in^2) - log N(c; mu_out, s_out^2)`` of the target
    model's confidence c.

    Offline variant: only "out" models are needed, so shadow models can be
    trained before the target examples are known. The attack runs the
    one-sided test Pr[Z < c] with Z ~ N(mu_out, s_out^2). The score is
    ``(c - mu_out) / s_out``, which orders examples exactly as that
    probability does but does not round to 1.0 for confident members.

    Carlini et al. report that with few shadow models a single variance shared
    by all examples works better than per-example variances. With
    ``global_variance`` the standard deviation of each Gaussian is the
    standard deviation of the confidences around their per-example means,
    pooled over all examples.

    Args:
        target_confidences: The target model's logit-scaled confidence on each
            of the n examples.
        shadow_confidences: The (num_shadows, n) confidences of the shadow
            models.
        inclusion: The (num_shadows, n) boolean matrix, True where the shadow
            model trained on the example.
        online: Use both "in" and "out" models (True) or "out" models only.
        global_variance: Pool the variance over all examples.

    Returns:
        One score per example, higher for "more likely a member".

    Raises:
        ValueError: If the shapes do not match or an example lacks an "in"
            model (online) or an "out" model.
    """
    target, shadows, included = _validate_lira_inputs(
        target_confidences, shadow_confidences, inclusion, online=online
    )

    mean_out, std_out = _fit_gaussians(
        shadows, ~included, global_variance=global_variance
    )
    if not online:
        return (target - mean_out) / std_out

    mean_in, std_in = _fit_gaussians(shadows, included, global_variance=global_variance)
    log_likelihood_in = stats.norm.logpdf(target, loc=mean_in, scale=std_in)
    log_likelihood_out = stats.norm.logpdf(target, loc=mean_out, scale=std_out)
    return np.asarray(log_likelihood_in - log_likelihood_out, dtype=np.float64)


def _predict_logits(model: nn.Module, inputs: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batches = [
            model(inputs[start : start + EVALUATION_BATCH_SIZE])
            for start in range(0, inputs.shape[0], EVALUATION_BATCH_SIZE)
        ]
    model.train(was_training)
    return torch.cat(batches)


def _validate_scores(
    scores: npt.ArrayLike, is_member: npt.ArrayLike
) -> tuple[FloatArray, BoolArray]:
    score_array = np.asarray(scores, dtype=np.float64)
    member_array = np.asarray(is_member, dtype=bool)
    if score_array.ndim != 1 or score_array.shape != member_array.shape:
        raise ValueError(
            "scores and is_member must be 1-D arrays of one length. Found shapes "
            f"{score_array.shape} and {member_array.shape}."
        )
    if not np.all(np.isfinite(score_array)):
        raise ValueError(
            "scores must be finite. Found "
            f"{int(np.sum(~np.isfinite(score_array)))} non-finite values."
        )
    num_members = int(member_array.sum())
    if num_members in (0, member_array.size):
        raise ValueError(
            "is_member must contain both members and non-members. Found "
            f"{num_members} members among {member_array.size} examples."
        )
    return score_array, member_array


def _validate_lira_inputs(
    target_confidences: npt.ArrayLike,
    shadow_confidences: npt.ArrayLike,
    inclusion: npt.ArrayLike,
    *,
    online: bool,
) -> tuple[FloatArray, FloatArray, BoolArray]:
    target = np.asarray(target_confidences, dtype=np.float64)
    shadows = np.asarray(shadow_confidences, dtype=np.float64)
    included = np.asarray(inclusion, dtype=bool)
    if target.ndim != 1 or shadows.ndim != 2 or shadows.shape[1] != target.size:
        raise ValueError(
            "shadow_confidences must have shape (num_shadows, n) for n = "
            f"{target.size} target confidences. Found {shadows.shape}."
        )
    if included.shape != shadows.shape:
        raise ValueError(
            f"inclusion must have the shape of shadow_confidences, {shadows.shape}. "
            f"Found {included.shape}."
        )
    lacking_out = int(np.sum(~np.any(~included, axis=0)))
    lacking_in = int(np.sum(~np.any(included, axis=0))) if online else 0
    if lacking_out or lacking_in:
        raise ValueError(
            "Every example needs at least one shadow model without it"
            + (" and one with it" if online else "")
            + f". Found {lacking_out} examples without an out model and "
            f"{lacking_in} without an in model."
        )
    return target, shadows, included


def _fit_gaussians(
    confidences: FloatArray, mask: BoolArray, *, global_variance: bool
) -> tuple[FloatArray, FloatArray]:
    counts = mask.sum(axis=0)
    masked = np.where(mask, confidences, 0.0)
    means = masked.sum(axis=0) / counts
    squared_deviations = np.where(mask, (confidences - means) ** 2, 0.0)

    if global_variance:
        pooled = squared_deviations.sum() / max(int(counts.sum()) - counts.size, 1)
        stds = np.full(means.shape, np.sqrt(pooled))
    else:
        stds = np.sqrt(squared_deviations.sum(axis=0) / np.maximum(counts - 1, 1))
    return means, np.maximum(stds, MIN_STANDARD_DEVIATION)
