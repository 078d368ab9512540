"""Tests of the privacy attacks, their metrics and the Fashion-MNIST loader."""

import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from benchmarks.attacks import experiment, gradient_inversion, membership_inference
from benchmarks.attacks.fashion_mnist import (
    DEFAULT_DATA_DIR,
    INSTALL_COMMAND,
    LabeledImages,
    load_fashion_mnist,
    read_idx,
)
from benchmarks.attacks.image_metrics import (
    SSIM_K1,
    SSIM_K2,
    SSIM_SIGMA,
    SSIM_WINDOW_SIZE,
    psnr,
    ssim,
)

TINY_SIDE = 8
TINY_SHAPE = (1, TINY_SIDE, TINY_SIDE)
TINY_CLASSES = 10
NUM_CLIENTS = 10

# Measured on the 64-32-10 sigmoid MLP below with these seeds (torch 2.13 CPU):
# DLG reaches 109 dB on the plaintext gradient and 6 dB on the mean of 10
# clients' gradients, Inverting Gradients 50 dB and 5 dB. The thresholds leave
# a wide margin on both sides.
PLAINTEXT_MIN_PSNR = 30.0
MIN_PSNR_GAP_TO_AGGREGATE = 20.0

FASHION_MNIST_PRESENT = (DEFAULT_DATA_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_PRESENT, reason=f"Fashion-MNIST missing: {INSTALL_COMMAND}"
)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(TINY_SIDE * TINY_SIDE, 32),
        nn.Sigmoid(),
        nn.Linear(32, TINY_CLASSES),
    )


def tiny_images(count: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count, *TINY_SHAPE), generator=generator)


def tiny_psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    pixels = reconstruction.clamp(0.0, 1.0)
    return psnr(original.numpy(), pixels.numpy(), data_range=1.0)


# Image metrics


def test_psnr_identical_images_is_infinite() -> None:
    image = np.random.default_rng(0).random((28, 28))

    assert psnr(image, image, data_range=1.0) == math.inf


@pytest.mark.parametrize(
    ("offset", "data_range", "expected_db"),
    [(0.1, 1.0, 20.0), (0.01, 1.0, 40.0), (2.55, 255.0, 40.0), (0.5, 2.0, 12.0412)],
)
def test_psnr_constant_offset_matches_formula(
    offset: float, data_range: float, expected_db: float
) -> None:
    image = np.random.default_rng(0).random((28, 28)) * data_range

    result = psnr(image, image + offset, data_range=data_range)

    assert result == pytest.approx(expected_db, abs=1e-3)


def test_ssim_identical_images_is_one() -> None:
    image = np.random.default_rng(0).random((28, 28))

    assert ssim(image, image, data_range=1.0) == pytest.approx(1.0)


def test_ssim_constant_images_match_luminance_term() -> None:
    first, second = 0.3, 0.6
    c1 = (SSIM_K1 * 1.0) ** 2
    expected = (2 * first * second + c1) / (first**2 + second**2 + c1)

    result = ssim(np.full((16, 16), first), np.full((16, 16), second), data_range=1.0)

    assert result == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_direct_window_sum() -> None:
    rng = np.random.default_rng(3)
    reference = rng.random((14, 14))
    reconstruction = np.clip(reference + rng.normal(0.0, 0.2, (14, 14)), 0.0, 1.0)

    expected = _ssim_by_explicit_windows(reference, reconstruction)

    assert ssim(reference, reconstruction, data_range=1.0) == pytest.approx(
        expected, rel=1e-9
    )


def test_ssim_decreases_with_noise() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((28, 28))
    values = [
        ssim(image, image + rng.normal(0.0, noise, image.shape), data_range=1.0)
        for noise in (0.01, 0.1, 0.3)
    ]

    assert values[0] > values[1]
    assert values[1] > values[2]


def test_ssim_averages_channels() -> None:
    rng = np.random.default_rng(0)
    reference = rng.random((2, 16, 16))
    reconstruction = reference.copy()
    reconstruction[1] += rng.normal(0.0, 0.1, (16, 16))
    second_channel = ssim(reference[1], reconstruction[1], data_range=1.0)

    result = ssim(reference, reconstruction, data_range=1.0)

    assert result == pytest.approx((1.0 + second_channel) / 2)


def test_ssim_rejects_image_smaller_than_window() -> None:
    image = np.zeros((8, 8))

    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(image, image, data_range=1.0)


def test_psnr_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="must have the shape of reference"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)), data_range=1.0)


def test_psnr_rejects_non_positive_data_range() -> None:
    with pytest.raises(ValueError, match=r"data_range must be positive\. Found 0"):
        psnr(np.zeros((4, 4)), np.zeros((4, 4)), data_range=0.0)


def _ssim_by_explicit_windows(
    reference: np.ndarray, reconstruction: np.ndarray
) -> float:
    radius = SSIM_WINDOW_SIZE // 2
    offsets = np.arange(-radius, radius + 1)
    kernel_1d = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    window = np.outer(kernel_1d, kernel_1d)
    window /= window.sum()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    values = []
    rows, columns = reference.shape
    for row in range(radius, rows - radius):
        for column in range(radius, columns - radius):
            rows_slice = slice(row - radius, row + radius + 1)
            columns_slice = slice(column - radius, column + radius + 1)
            patch_x = reference[rows_slice, columns_slice]
            patch_y = reconstruction[rows_slice, columns_slice]
            mean_x = np.sum(window * patch_x)
            mean_y = np.sum(window * patch_y)
            var_x = np.sum(window * (patch_x - mean_x) ** 2)
            var_y = np.sum(window * (patch_y - mean_y) ** 2)
            cov = np.sum(window * (patch_x - mean_x) * (patch_y - mean_y))
            values.append(
                (2 * mean_x * mean_y + c1)
                * (2 * cov + c2)
                / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
            )
    return float(np.mean(values))


# Gradient inversion


@pytest.mark.timeout(30)
def test_dlg_plaintext_beats_aggregate() -> None:
    model = tiny_mlp()
    images = tiny_images(NUM_CLIENTS)
    labels = torch.tensor([3, 1, 2, 4, 5, 6, 7, 8, 9, 0])
    plaintext = gradient_inversion.plaintext_target(model, image=images[0], label=3)
    aggregate = gradient_inversion.secure_aggregation_target(
        model, images=images, labels=labels
    )

    from_plaintext = gradient_inversion.dlg_attack(
        model, plaintext, input_shape=TINY_SHAPE, num_classes=10, iterations=50, seed=0
    )
    from_aggregate = gradient_inversion.dlg_attack(
        model, aggregate, input_shape=TINY_SHAPE, num_classes=10, iterations=50, seed=0
    )
    plaintext_psnr = tiny_psnr(images[0], from_plaintext.inputs[0])
    aggregate_psnr = tiny_psnr(images[0], from_aggregate.inputs[0])

    assert plaintext_psnr > PLAINTEXT_MIN_PSNR
    assert plaintext_psnr - aggregate_psnr > MIN_PSNR_GAP_TO_AGGREGATE
    assert from_plaintext.label == 3


@pytest.mark.timeout(30)
def test_inverting_gradients_plaintext_beats_aggregate() -> None:
    model = tiny_mlp()
    images = tiny_images(NUM_CLIENTS)
    labels = torch.tensor([3, 1, 2, 4, 5, 6, 7, 8, 9, 0])
    plaintext = gradient_inversion.plaintext_target(model, image=images[0], label=3)
    aggregate = gradient_inversion.secure_aggregation_target(
        model, images=images, labels=labels
    )

    from_plaintext = gradient_inversion.inverting_gradients_attack(
        model, plaintext, input_shape=TINY_SHAPE, num_classes=10, iterations=200, seed=0
    )
    from_aggregate = gradient_inversion.inverting_gradients_attack(
        model, aggregate, input_shape=TINY_SHAPE, num_classes=10, iterations=200, seed=0
    )
    plaintext_psnr = tiny_psnr(images[0], from_plaintext.inputs[0])
    aggregate_psnr = tiny_psnr(images[0], from_aggregate.inputs[0])

    assert plaintext_psnr > PLAINTEXT_MIN_PSNR
    assert plaintext_psnr - aggregate_psnr > MIN_PSNR_GAP_TO_AGGREGATE
    assert from_plaintext.label == 3


@pytest.mark.timeout(10)
def test_attack_trace_has_one_value_per_iteration() -> None:
    model = tiny_mlp()
    target = gradient_inversion.plaintext_target(
        model, image=tiny_images(1)[0], label=0
    )

    result = gradient_inversion.inverting_gradients_attack(
        model, target, input_shape=TINY_SHAPE, num_classes=10, iterations=7, seed=0
    )

    assert len(result.trace) == 7
    assert result.inputs.shape == (1, *TINY_SHAPE)


@pytest.mark.timeout(10)
def test_recover_label_finds_every_class() -> None:
    model = tiny_mlp()
    image = tiny_images(1)[0]

    recovered = [
        gradient_inversion.recover_label(
            gradient_inversion.plaintext_target(model, image=image, label=label),
            num_classes=TINY_CLASSES,
        )
        for label in range(TINY_CLASSES)
    ]

    assert recovered == list(range(TINY_CLASSES))


def test_recover_label_rejects_gradient_without_output_layer() -> None:
    with pytest.raises(ValueError, match="num_classes=10 rows"):
        gradient_inversion.recover_label([torch.zeros(3, 4)], num_classes=10)


@pytest.mark.timeout(10)
def test_secure_aggregate_equals_batch_gradient() -> None:
    model = tiny_mlp()
    images = tiny_images(NUM_CLIENTS)
    labels = torch.arange(NUM_CLIENTS) % TINY_CLASSES

    aggregate = gradient_inversion.secure_aggregation_target(
        model, images=images, labels=labels
    )
    batch_gradient = gradient_inversion.compute_gradient(model, images, labels)

    for mean_part, batch_part in zip(aggregate, batch_gradient, strict=True):
        torch.testing.assert_close(mean_part, batch_part, rtol=1e-5, atol=1e-7)


def test_secure_aggregate_rejects_label_count_mismatch() -> None:
    with pytest.raises(ValueError, match="Found 2 images and 3 labels"):
        gradient_inversion.secure_aggregation_target(
            tiny_mlp(), images=tiny_images(2), labels=torch.arange(3)
        )


@pytest.mark.timeout(10)
def test_dp_target_without_noise_is_clipped_to_norm() -> None:
    model = tiny_mlp()
    image = tiny_images(1)[0]
    clipping_norm = 1e-3
    generator = torch.Generator().manual_seed(0)
    plain = gradient_inversion.plaintext_target(model, image=image, label=2)

    clipped = gradient_inversion.dp_noised_target(
        model,
        image=image,
        label=2,
        clipping_norm=clipping_norm,
        noise_multiplier=0.0,
        generator=generator,
    )
    norm = torch.sqrt(sum(torch.sum(part**2) for part in clipped))
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([part.flatten() for part in clipped]),
        torch.cat([part.flatten() for part in plain]),
        dim=0,
    )

    assert norm.item() == pytest.approx(clipping_norm, rel=1e-5)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.timeout(10)
def test_dp_target_noise_std() -> None:
    model = tiny_mlp()
    image = tiny_images(1)[0]
    clipping_norm, noise_multiplier = 0.5, 2.0
    generator = torch.Generator().manual_seed(0)
    clipped = gradient_inversion.dp_noised_target(
        model,
        image=image,
        label=2,
        clipping_norm=clipping_norm,
        noise_multiplier=0.0,
        generator=generator,
    )

    noised = gradient_inversion.dp_noised_target(
        model,
        image=image,
        label=2,
        clipping_norm=clipping_norm,
        noise_multiplier=noise_multiplier,
        generator=generator,
    )
    noise = torch.cat([(n - c).flatten() for n, c in zip(noised, clipped, strict=True)])

    # 2,410 parameters: the sample standard deviation is within 5% with
    # probability above 0.999.
    assert noise.std().item() == pytest.approx(
        noise_multiplier * clipping_norm, rel=0.05
    )
    assert abs(noise.mean().item()) < 0.1


def test_dp_target_rejects_negative_noise_multiplier() -> None:
    with pytest.raises(ValueError, match="noise_multiplier must be non-negative"):
        gradient_inversion.dp_noised_target(
            tiny_mlp(),
            image=tiny_images(1)[0],
            label=0,
            clipping_norm=1.0,
            noise_multiplier=-0.5,
            generator=torch.Generator(),
        )


@pytest.mark.timeout(10)
def test_model_difference_gives_gradient() -> None:
    model = tiny_mlp()
    image = tiny_images(1)[0]
    learning_rate = 0.1
    gradient = gradient_inversion.plaintext_target(model, image=image, label=4)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(image.unsqueeze(0)), torch.tensor([4])).backward()
    optimizer.step()
    difference = [
        after.detach() - start
        for after, start in zip(model.parameters(), before, strict=True)
    ]

    recovered = gradient_inversion.gradient_from_model_difference(
        difference, learning_rate=learning_rate
    )

    for recovered_part, gradient_part in zip(recovered, gradient, strict=True):
        torch.testing.assert_close(recovered_part, gradient_part, rtol=1e-4, atol=1e-6)


def test_attack_rejects_gradient_of_wrong_shape() -> None:
    model = tiny_mlp()
    target = [torch.zeros(1) for _ in model.parameters()]

    with pytest.raises(ValueError, match=r"target_gradient\[0\] must have shape"):
        gradient_inversion.dlg_attack(
            model, target, input_shape=TINY_SHAPE, num_classes=10, iterations=1, seed=0
        )


def test_attack_rejects_zero_iterations() -> None:
    model = tiny_mlp()
    target = [torch.zeros_like(parameter) for parameter in model.parameters()]

    with pytest.raises(ValueError, match=r"iterations must be at least 1\. Found 0"):
        gradient_inversion.inverting_gradients_attack(
            model, target, input_shape=TINY_SHAPE, num_classes=10, iterations=0, seed=0
        )


# Membership inference metrics


def test_metrics_of_perfectly_separated_scores() -> None:
    scores = np.concatenate([np.linspace(1.0, 2.0, 50), np.linspace(-2.0, -1.0, 50)])
    is_member = np.arange(100) < 50

    metrics = membership_inference.evaluate_attack(scores, is_member)

    assert metrics.auc == 1.0
    assert metrics.tpr_at_low_fpr == 1.0


def test_metrics_of_identical_distributions_are_chance() -> None:
    rng = np.random.default_rng(0)
    size = 5000
    scores = rng.normal(size=2 * size)
    is_member = np.arange(2 * size) < size

    metrics = membership_inference.evaluate_attack(scores, is_member)

    # The AUC of two samples of 5,000 from one distribution has a standard
    # deviation of about 0.006, and the TPR at 1% FPR one below 0.003.
    assert metrics.auc == pytest.approx(0.5, abs=0.03)
    assert metrics.tpr_at_low_fpr == pytest.approx(0.01, abs=0.01)


def test_metrics_of_shifted_gaussians_match_closed_form() -> None:
    rng = np.random.default_rng(1)
    size, shift = 20000, 2.0
    scores = np.concatenate([rng.normal(shift, 1.0, size), rng.normal(0.0, 1.0, size)])
    is_member = np.arange(2 * size) < size
    expected_auc = stats.norm.cdf(shift / math.sqrt(2.0))
    expected_tpr = stats.norm.sf(stats.norm.ppf(0.99) - shift)

    metrics = membership_inference.evaluate_attack(scores, is_member)

    assert metrics.auc == pytest.approx(expected_auc, abs=0.01)
    assert metrics.tpr_at_low_fpr == pytest.approx(expected_tpr, abs=0.03)


def test_tpr_at_fpr_interpolates_between_thresholds() -> None:
    # Every score is tied, so the ROC curve has only (0, 0) and (1, 1). Picking
    # "member" with probability 0.25 gives TPR 0.25 at FPR 0.25.
    scores = np.zeros(4)
    is_member = np.array([True, True, False, False])

    result = membership_inference.tpr_at_fpr(
        scores, is_member, false_positive_rate=0.25
    )

    assert result == pytest.approx(0.25)


def test_tpr_at_fpr_reads_exact_roc_point() -> None:
    # Thresholds give the ROC points (0, 1/2), (1/2, 1/2), (1/2, 1) and (1, 1).
    scores = np.array([3.0, 1.0, 2.0, 0.0])
    is_member = np.array([True, True, False, False])

    result = membership_inference.tpr_at_fpr(scores, is_member, false_positive_rate=0.5)

    assert result == pytest.approx(1.0)


def test_evaluate_attack_rejects_single_class() -> None:
    with pytest.raises(ValueError, match="Found 3 members among 3 examples"):
        membership_inference.evaluate_attack(np.zeros(3), np.ones(3, dtype=bool))


def test_tpr_at_fpr_rejects_out_of_range_rate() -> None:
    with pytest.raises(ValueError, match=r"false_positive_rate must be in \(0, 1\)"):
        membership_inference.tpr_at_fpr(
            np.zeros(2), np.array([True, False]), false_positive_rate=1.5
        )


# Membership inference attacks


def test_logit_scaled_confidence_matches_definition() -> None:
    model = nn.Identity()
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.1, 3.0]])
    labels = torch.tensor([0, 1])
    probabilities = torch.softmax(logits.double(), dim=1)
    true_probabilities = probabilities[torch.arange(2), labels].numpy()
    expected = np.log(true_probabilities / (1 - true_probabilities))

    result = membership_inference.logit_scaled_confidence(model, logits, labels)

    np.testing.assert_allclose(result, expected, rtol=1e-10)


def test_logit_scaled_confidence_stays_finite_when_certain() -> None:
    logits = torch.tensor([[60.0, 0.0]])

    result = membership_inference.logit_scaled_confidence(
        nn.Identity(), logits, torch.tensor([0])
    )

    assert result[0] == pytest.approx(60.0)


def test_balanced_inclusion_puts_each_example_in_half() -> None:
    inclusion = membership_inference.balanced_inclusion_matrix(
        num_shadows=6, num_examples=40, rng=np.random.default_rng(0)
    )

    np.testing.assert_array_equal(inclusion.sum(axis=0), np.full(40, 3))


def test_balanced_inclusion_rejects_odd_shadow_count() -> None:
    with pytest.raises(ValueError, match="num_shadows must be even and at least 2"):
        membership_inference.balanced_inclusion_matrix(
            num_shadows=3, num_examples=4, rng=np.random.default_rng(0)
        )


def test_lira_calibration_beats_raw_confidence() -> None:
    # Each example has its own difficulty (mean "out" confidence), and training
    # on it raises its confidence by 1. A global threshold mostly measures the
    # difficulty, while LiRA's per-example Gaussians remove it.
    rng = np.random.default_rng(0)
    num_examples, num_shadows = 400, 16
    difficulty = rng.normal(0.0, 3.0, num_examples)
    inclusion = membership_inference.balanced_inclusion_matrix(
        num_shadows=num_shadows, num_examples=num_examples, rng=rng
    )
    noise = rng.normal(0.0, 0.3, (num_shadows, num_examples))
    shadow_confidences = difficulty + inclusion + noise
    is_member = rng.random(num_examples) < 0.5
    target_confidences = difficulty + is_member + rng.normal(0.0, 0.3, num_examples)

    raw = membership_inference.evaluate_attack(target_confidences, is_member)
    online = membership_inference.evaluate_attack(
        membership_inference.lira_scores(
            target_confidences,
            shadow_confidences,
            inclusion,
            online=True,
            global_variance=False,
        ),
        is_member,
    )
    offline = membership_inference.evaluate_attack(
        membership_inference.lira_scores(
            target_confidences,
            shadow_confidences,
            inclusion,
            online=False,
            global_variance=True,
        ),
        is_member,
    )

    assert raw.auc < 0.7
    assert online.auc > 0.9
    assert offline.auc > 0.9


def test_lira_offline_score_is_standardized_confidence() -> None:
    shadow_confidences = np.array([[1.0, 0.0], [3.0, 5.0], [9.0, 2.0], [5.0, 4.0]])
    inclusion = np.array([[True, True], [False, False], [True, True], [False, False]])
    target_confidences = np.array([6.0, 1.0])
    # The out models give means 4 and 4.5 with per-example standard deviations
    # sqrt(2) and 0.5 * sqrt(2).
    expected = np.array([2.0 / math.sqrt(2.0), -3.5 / (0.5 * math.sqrt(2.0))])

    result = membership_inference.lira_scores(
        target_confidences,
        shadow_confidences,
        inclusion,
        online=False,
        global_variance=False,
    )

    np.testing.assert_allclose(result, expected)


def test_lira_rejects_example_without_in_model() -> None:
    inclusion = np.array([[True, False], [False, False]])

    with pytest.raises(ValueError, match="1 without an in model"):
        membership_inference.lira_scores(
            np.zeros(2), np.zeros((2, 2)), inclusion, online=True, global_variance=True
        )


def _memorize(inputs: torch.Tensor, labels: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs.shape[1], 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


def _random_task(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((size, 20), generator=generator)
    labels = torch.randint(0, 4, (size,), generator=generator)
    return inputs, labels


@pytest.mark.timeout(20)
def test_loss_threshold_detects_overfit_members() -> None:
    # Random labels cannot be learned, only memorized, so the loss on members is
    # far below the loss on non-members.
    inputs, labels = _random_task(64, seed=0)
    is_member = np.arange(64) < 32
    model = _memorize(inputs[:32], labels[:32], seed=0)

    scores = membership_inference.loss_threshold_scores(model, inputs, labels)
    metrics = membership_inference.evaluate_attack(scores, is_member)

    assert metrics.auc > 0.8


@pytest.mark.timeout(20)
def test_lira_detects_overfit_members() -> None:
    inputs, labels = _random_task(64, seed=1)
    is_member = np.arange(64) < 32
    target = _memorize(inputs[:32], labels[:32], seed=0)
    inclusion = membership_inference.balanced_inclusion_matrix(
        num_shadows=4, num_examples=64, rng=np.random.default_rng(0)
    )

    shadow_confidences = membership_inference.train_shadow_models(
        _memorize, inputs=inputs, labels=labels, inclusion=inclusion, seed=1
    )
    scores = membership_inference.lira_scores(
        membership_inference.logit_scaled_confidence(target, inputs, labels),
        shadow_confidences,
        inclusion,
        online=True,
        global_variance=True,
    )
    metrics = membership_inference.evaluate_attack(scores, is_member)

    assert shadow_confidences.shape == (4, 64)
    assert metrics.auc > 0.8


# Fashion-MNIST loader


def _write_idx(
    path: Path, array: np.ndarray, *, magic: bytes = b"\x00\x00\x08"
) -> None:
    header = magic + bytes([array.ndim])
    sizes = np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as output:
        output.write(header + sizes + array.astype(np.uint8).tobytes())


def test_read_idx_round_trips_array(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "array-idx3-ubyte.gz"
    _write_idx(path, array)

    result = read_idx(path)

    np.testing.assert_array_equal(result, array)


def test_load_fashion_mnist_scales_written_files(tmp_path: Path) -> None:
    images = np.full((3, 28, 28), 255, dtype=np.uint8)
    images[1] = 0
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 0, 9]))

    data = load_fashion_mnist(split="test", data_dir=tmp_path)

    assert data.images.shape == (3, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert data.images[0].max().item() == 1.0
    assert data.images[1].max().item() == 0.0
    assert data.labels.tolist() == [4, 0, 9]


def test_read_idx_rejects_wrong_type_byte(tmp_path: Path) -> None:
    path = tmp_path / "float-idx1.gz"
    _write_idx(path, np.zeros(4), magic=b"\x00\x00\x0d")

    with pytest.raises(ValueError, match="Found 00 00 0d"):
        read_idx(path)


def test_read_idx_rejects_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "short-idx1.gz"
    with gzip.open(path, "wb") as output:
        output.write(b"\x00\x00\x08\x01" + np.array([5], dtype=">u4").tobytes() + b"ab")

    with pytest.raises(ValueError, match="must contain 5 data bytes"):
        read_idx(path)


def test_missing_file_error_names_install_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion"):
        load_fashion_mnist(split="train", data_dir=tmp_path)


def test_load_fashion_mnist_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist(split="validation", data_dir=tmp_path)  # type: ignore[arg-type]


@needs_fashion_mnist
@pytest.mark.timeout(20)
def test_load_fashion_mnist_reads_real_test_split() -> None:
    data = load_fashion_mnist(split="test")

    assert data.images.shape == (10000, 1, 28, 28)
    assert data.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(data.labels).tolist() == [1000] * 10


# Experiments


@needs_fashion_mnist
@pytest.mark.timeout(30)
def test_inversion_experiment_writes_json_and_figure(tmp_path: Path) -> None:
    results = experiment.run_gradient_inversion(
        num_images=2,
        dlg_iterations=2,
        inverting_gradients_iterations=2,
        num_clients=3,
        noise_multipliers=(0.1,),
    )
    figure_path = tmp_path / "figure.png"

    encoded = json.dumps(results, allow_nan=False)
    experiment.save_reconstruction_figure(results, figure_path)

    assert [view["name"] for view in results["views"]] == [
        "plaintext",
        "secure aggregate",
        "DP z=0.1",
    ]
    assert len(results["views"][0]["attacks"]["dlg"]["ssim"]) == 2
    assert len(encoded) > 0
    assert figure_path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(30)
def test_membership_experiment_reports_each_epsilon() -> None:
    generator = torch.Generator().manual_seed(0)
    train, test = (
        LabeledImages(
            images=torch.rand((40, 1, 28, 28), generator=generator),
            labels=torch.randint(0, 10, (40,), generator=generator),
        )
        for _ in range(2)
    )

    results = experiment.run_membership_inference(
        experiment.membership_mlp,
        train,
        test,
        epsilons=(math.inf, 8.0),
        num_members=16,
        num_shadows=2,
        training=experiment.TrainingConfig(epochs=2, batch_size=8),
    )

    encoded = json.dumps(results, allow_nan=False)
    assert [entry["target_epsilon"] for entry in results["results"]] == [None, 8.0]
    assert results["results"][1]["spent_epsilon"] <= 8.0 + 1e-6
    assert results["results"][1]["noise_multiplier"] > 0.0
    assert set(results["results"][0]["attacks"]) == {
        "loss_threshold",
        "lira_online",
        "lira_offline",
    }
    assert len(encoded) > 0
