import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
)

from fedsec_flwr.dp.accounting import GaussianEvent, compute_epsilon
from fedsec_flwr.dp.dpsgd import (
    DPSGDConfig,
    PrivacyBudgetExceededError,
    check_private_compatible,
    make_private_compatible,
    train_dp_sgd,
)

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")

DELTA = 1e-5
NUM_FEATURES = 8
NUM_CLASSES = 3
NUM_EXAMPLES = 128
BATCH_SIZE = 32
STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH_SIZE
NOISE_CONFIG = DPSGDConfig(delta=DELTA, noise_multiplier=1.0, max_grad_norm=1.0)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, 4), nn.ReLU(), nn.Linear(4, NUM_CLASSES)
    )


class BatchNormNet(nn.Module):
    """Convolution, BatchNorm and a dense layer for 6x6 images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=3), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.classifier = nn.Linear(4 * 4 * 4, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(images), start_dim=1))


def batch_norm_model() -> BatchNormNet:
    torch.manual_seed(0)
    return BatchNormNet()


def tabular_loader(
    num_examples: int = NUM_EXAMPLES, batch_size: int = BATCH_SIZE
) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(num_examples, NUM_FEATURES, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=generator)
    return DataLoader(TensorDataset(features, labels), batch_size=batch_size)


def image_loader(num_examples: int, *, side: int, batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(num_examples, 1, side, side, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def train_round(
    model: nn.Module,
    *,
    config: DPSGDConfig = NOISE_CONFIG,
    state: bytes | None = None,
    loader: DataLoader | None = None,
    epochs: int = 1,
    learning_rate: float = 0.1,
):
    return train_dp_sgd(
        model,
        loader if loader is not None else tabular_loader(),
        epochs=epochs,
        learning_rate=learning_rate,
        config=config,
        state=state,
    )


def gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int) -> float:
    event = GaussianEvent(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps
    )
    return compute_epsilon([event], delta=DELTA, accountant="rdp")


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def has_hooks(model: nn.Module) -> bool:
    return any(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        for module in model.modules()
    )


# --- repeated rounds in one process ------------------------------------------


@pytest.mark.timeout(20)
def test_three_rounds_in_one_process() -> None:
    model = tiny_model()
    expected_keys = list(model.state_dict())
    state = None
    cumulative = []

    for _ in range(3):
        result = train_round(model, state=state)
        assert list(result.state_dict) == expected_keys
        model.load_state_dict(result.state_dict)
        state = result.state
        cumulative.append(result.cumulative_epsilon)

    assert cumulative[1] > cumulative[0]
    assert cumulative[2] > cumulative[1]


@pytest.mark.timeout(20)
def test_caller_model_not_modified() -> None:
    model = tiny_model()
    before = flat_parameters(model).clone()

    for _ in range(2):
        train_round(model)

    assert torch.equal(flat_parameters(model), before)
    assert not has_hooks(model)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


@pytest.mark.timeout(20)
def test_trained_weights_differ_from_input() -> None:
    model = tiny_model()

    result = train_round(model)

    trained = torch.cat([value.flatten() for value in result.state_dict.values()])
    assert not torch.equal(trained, flat_parameters(model))


@pytest.mark.timeout(20)
def test_round_epsilon_matches_accountant() -> None:
    result = train_round(tiny_model(), epochs=2)

    assert result.num_steps == 2 * STEPS_PER_EPOCH
    assert result.sample_rate == 1 / STEPS_PER_EPOCH
    assert result.round_epsilon == pytest.approx(
        gaussian_epsilon(1.0, 1 / STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH), rel=1e-12
    )
    assert result.cumulative_epsilon == result.round_epsilon


@pytest.mark.timeout(20)
def test_result_reports_loss_and_examples() -> None:
    result = train_round(tiny_model())

    assert math.isfinite(result.train_loss)
    assert result.train_loss > 0
    assert result.num_examples == NUM_EXAMPLES
    assert result.delta == DELTA


@pytest.mark.timeout(20)
def test_torch_threads_restored() -> None:
    torch.set_num_threads(2)
    try:
        train_round(tiny_model())
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)

    assert threads_after == 2


@pytest.mark.timeout(20)
def test_empty_poisson_batches_tolerated() -> None:
    # Sample rate 1/3 over 15 steps draws an empty batch with probability
    # above 0.99.
    loader = tabular_loader(num_examples=3, batch_size=1)

    result = train_round(tiny_model(), loader=loader, epochs=5)

    assert result.num_steps == 15
    assert all(torch.isfinite(value).all() for value in result.state_dict.values())


@pytest.mark.timeout(20)
def test_noise_not_replayed_from_seeds() -> None:
    # With the global seed and the loader's generator set alike, a replay
    # that gave the same weights would let anyone with the seeds
    # subtract the noise.
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        loader = tabular_loader()
        loader.generator = torch.Generator().manual_seed(8)
        results.append(train_round(tiny_model(), loader=loader))

    first, second = (
        torch.cat([value.flatten() for value in result.state_dict.values()])
        for result in results
    )
    assert not torch.equal(first, second)


@pytest.mark.timeout(20)
def test_caller_loader_keeps_its_generator() -> None:
    loader = tabular_loader()
    generator = torch.Generator().manual_seed(9)
    loader.generator = generator

    train_round(tiny_model(), loader=loader)

    assert loader.generator is generator
    assert type(loader) is DataLoader


# --- accountant state --------------------------------------------------------


@pytest.mark.timeout(20)
def test_restored_state_continues_epsilon() -> None:
    first = train_round(tiny_model())

    second = train_round(tiny_model(), state=first.state)

    assert second.cumulative_epsilon == pytest.approx(
        gaussian_epsilon(1.0, 1 / STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH), rel=1e-12
    )
    assert second.round_epsilon == pytest.approx(first.round_epsilon, rel=1e-12)


NEXT_ROUND_SCRIPT = """
import sys
from test_dpsgd import tiny_model, train_round
result = train_round(tiny_model(), state=sys.stdin.buffer.read())
print(repr(result.cumulative_epsilon))
"""


@pytest.mark.timeout(60)
def test_state_continues_in_new_process() -> None:
    first = train_round(tiny_model())

    completed = subprocess.run(
        [sys.executable, "-c", NEXT_ROUND_SCRIPT],
        input=first.state,
        capture_output=True,
        cwd=Path(__file__).parent,
        check=True,
    )

    assert float(completed.stdout) == pytest.approx(
        gaussian_epsilon(1.0, 1 / STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH), rel=1e-12
    )


@pytest.mark.timeout(20)
def test_no_state_starts_new_ledger() -> None:
    first = train_round(tiny_model())
    train_round(tiny_model(), state=first.state)

    fresh = train_round(tiny_model(), state=None)

    assert fresh.cumulative_epsilon == fresh.round_epsilon


@pytest.mark.timeout(20)
def test_state_is_json_history() -> None:
    result = train_round(tiny_model())

    document = json.loads(result.state)

    assert document["history"] == [
        {
            "noise_multiplier": 1.0,
            "sample_rate": 1 / STEPS_PER_EPOCH,
            "num_steps": STEPS_PER_EPOCH,
        }
    ]


@pytest.mark.parametrize(
    "state",
    [
        b"\xff",
        b"not json",
        b"[]",
        json.dumps({"version": 2, "history": [], "calibration": None}).encode(),
        json.dumps(
            {
                "version": 1,
                "history": [
                    {"noise_multiplier": 1.0, "sample_rate": 0.5, "num_steps": 0}
                ],
                "calibration": None,
            }
        ).encode(),
        json.dumps(
            {"version": 1, "history": [{"sample_rate": 0.5}], "calibration": None}
        ).encode(),
    ],
)
@pytest.mark.timeout(20)
def test_malformed_state_rejected(state: bytes) -> None:
    with pytest.raises(ValueError, match="state is not a DP-SGD accountant state"):
        train_round(tiny_model(), state=state)


# --- Opacus compatibility ----------------------------------------------------


def test_batch_norm_replaced_and_reported() -> None:
    model = batch_norm_model()

    fixed, replacements = make_private_compatible(model)

    assert replacements == ["features.1: BatchNorm2d -> GroupNorm"]
    assert isinstance(fixed.features[1], nn.GroupNorm)
    assert isinstance(model.features[1], nn.BatchNorm2d)


def test_compatible_model_returned_as_is() -> None:
    model = tiny_model()

    fixed, replacements = make_private_compatible(model)

    assert fixed is model
    assert replacements == []


@pytest.mark.timeout(20)
def test_fixed_models_share_keys_across_sides() -> None:
    server_model, _ = make_private_compatible(batch_norm_model())
    client_model, _ = make_private_compatible(batch_norm_model())
    loader = image_loader(64, side=6, batch_size=16)

    result = train_round(client_model, loader=loader)

    assert list(server_model.state_dict()) == list(client_model.state_dict())
    assert "features.1.running_mean" not in server_model.state_dict()
    assert list(result.state_dict) == list(server_model.state_dict())
    server_model.load_state_dict(result.state_dict)


def test_check_names_batch_norm_layer() -> None:
    with pytest.raises(
        ValueError, match=r"features\.1 \(BatchNorm2d\): BatchNorm cannot"
    ):
        check_private_compatible(batch_norm_model())


def test_check_lists_every_problem() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))

    with pytest.raises(ValueError) as raised:
        check_private_compatible(model)

    assert "1 (BatchNorm1d)" in str(raised.value)
    assert "2 (BatchNorm1d)" in str(raised.value)


def test_check_accepts_compatible_model() -> None:
    check_private_compatible(tiny_model())


def test_parameter_free_batch_norm_rejected() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))

    with pytest.raises(
        ValueError, match=r"1 \(BatchNorm1d\): BatchNorm without trainable"
    ):
        check_private_compatible(model)


def test_frozen_batch_norm_rejected() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].requires_grad_(False)

    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\): BatchNorm without"):
        check_private_compatible(model)


def test_parameter_free_batch_norm_replaced() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))

    fixed, replacements = make_private_compatible(model)

    assert replacements == ["1: BatchNorm1d -> GroupNorm"]
    assert isinstance(fixed[1], nn.GroupNorm)


def test_unfixable_layer_rejected() -> None:
    # Opacus's fixer turns off running statistics but keeps the buffers,
    # which Opacus's GradSampleModule then rejects.
    model = nn.Sequential(
        nn.Linear(4, 4), nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    )

    with pytest.raises(ValueError, match=r"nor replace: 1 \(InstanceNorm1d\)"):
        make_private_compatible(model)


@pytest.mark.timeout(20)
def test_training_rejects_batch_norm() -> None:
    loader = image_loader(16, side=6, batch_size=8)

    with pytest.raises(ValueError, match=r"features\.1 \(BatchNorm2d\)"):
        train_round(batch_norm_model(), loader=loader)


# --- target epsilon ----------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.timeout(20)
def test_target_epsilon_kept_over_run(accountant: str) -> None:
    config = DPSGDConfig(
        delta=DELTA, target_epsilon=2.0, num_rounds=3, accountant=accountant
    )
    state = None
    noise_multipliers = set()

    for _ in range(3):
        result = train_round(tiny_model(), config=config, state=state)
        state = result.state
        noise_multipliers.add(result.noise_multiplier)

    assert result.cumulative_epsilon <= 2.0
    assert result.cumulative_epsilon > 0.9 * 2.0
    assert len(noise_multipliers) == 1


@pytest.mark.timeout(20)
def test_round_beyond_target_rejected() -> None:
    config = DPSGDConfig(delta=DELTA, target_epsilon=2.0, num_rounds=2)
    state = None
    for _ in range(2):
        state = train_round(tiny_model(), config=config, state=state).state

    with pytest.raises(PrivacyBudgetExceededError, match=r"above target_epsilon 2\.0"):
        train_round(tiny_model(), config=config, state=state)


# --- invalid arguments -------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "exactly one of noise_multiplier and target_epsilon"),
        (
            {"noise_multiplier": 1.0, "target_epsilon": 1.0, "num_rounds": 2},
            "exactly one of noise_multiplier and target_epsilon",
        ),
        ({"noise_multiplier": -0.5}, r"noise_multiplier must be at least 0\. Found"),
        (
            {"noise_multiplier": 1e-300},
            r"noise_multiplier must be finite and at least 0\.0009765625",
        ),
        ({"noise_multiplier": math.nan}, "noise_multiplier must be finite"),
        ({"noise_multiplier": "1"}, "noise_multiplier must be a number"),
        ({"noise_multiplier": 1.0, "num_rounds": 3}, "num_rounds is used only"),
        ({"target_epsilon": 0.0, "num_rounds": 3}, "target_epsilon must be positive"),
        (
            {"target_epsilon": math.inf, "num_rounds": 3},
            "target_epsilon must be finite",
        ),
        ({"target_epsilon": 1.0}, "num_rounds is required with target_epsilon"),
        ({"target_epsilon": 1.0, "num_rounds": 0}, "num_rounds must be at least 1"),
        ({"target_epsilon": 1.0, "num_rounds": 2.0}, "num_rounds must be an int"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, r"delta must be in \[1e-15, 0\.1\)"),
        ({"noise_multiplier": 1.0, "delta": 0.1}, r"delta must be in \[1e-15, 0\.1\)"),
        (
            {"noise_multiplier": 1.0, "delta": 5e-324},
            r"delta must be in \[1e-15, 0\.1\)",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 0.0},
            "max_grad_norm must be positive",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1e300},
            r"max_grad_norm must be at most 3\.402e\+38, the float32 maximum.*"
            r"Found 1e\+300",
        ),
        (
            {"noise_multiplier": 1.0, "max_grad_norm": 1e-40},
            r"max_grad_norm must be at least 8\.674e-19 \(2\*\*-60\).*Found 1e-40",
        ),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, "accountant must be one of"),
        ({"noise_multiplier": 1.0, "secure_rng": "yes"}, "secure_rng must be a bool"),
    ],
)
def test_invalid_config_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPSGDConfig(**({"delta": DELTA} | changes))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"learning_rate": math.nan}, "learning_rate must be finite"),
    ],
)
def test_invalid_training_arguments_rejected(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_round(tiny_model(), **arguments)


def test_restricted_sampler_rejected() -> None:
    # Opacus would sample from all 64 examples, including the 54 that the
    # loader's sampler leaves out.
    dataset = tabular_loader().dataset
    loader = DataLoader(dataset, batch_size=10, sampler=SubsetRandomSampler(range(10)))

    with pytest.raises(ValueError, match=r"must read its whole dataset.*SubsetRandom"):
        train_round(tiny_model(), loader=loader)


def test_custom_batch_sampler_rejected() -> None:
    dataset = tabular_loader().dataset
    batches = [list(range(10)), list(range(10, 20))]
    loader = DataLoader(dataset, batch_sampler=batches)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=r"must read its whole dataset.*and a list"):
        train_round(tiny_model(), loader=loader)


def test_shuffled_loader_accepted() -> None:
    loader = DataLoader(tabular_loader().dataset, batch_size=BATCH_SIZE, shuffle=True)

    result = train_round(tiny_model(), loader=loader)

    assert result.num_steps == STEPS_PER_EPOCH


def test_loader_without_batches_rejected() -> None:
    dataset = tabular_loader(num_examples=5).dataset
    loader = DataLoader(dataset, batch_size=8, drop_last=True)

    with pytest.raises(ValueError, match=r"batch_size 8 above the 5 examples"):
        train_round(tiny_model(), loader=loader)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.Embedding(10, 4, max_norm=1.0), r"0 \(Embedding\): max_norm"),
        (nn.EmbeddingBag(10, 4, max_norm=1.0), r"0 \(EmbeddingBag\): max_norm"),
    ],
)
def test_embedding_with_max_norm_rejected(layer: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_private_compatible(nn.Sequential(layer))


def test_parameter_free_instance_norm_with_running_stats_rejected() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.InstanceNorm1d(4, track_running_stats=True)
    )

    with pytest.raises(ValueError, match=r"1 \(InstanceNorm1d\): track_running"):
        check_private_compatible(model)


class DataSumLayer(nn.Module):
    """A parameter-free layer that adds each batch's features to a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(NUM_FEATURES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.seen += features.sum(dim=0)
        return features


@pytest.mark.timeout(20)
def test_buffer_changed_by_training_releases_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DataSumLayer(), nn.Linear(NUM_FEATURES, NUM_CLASSES))

    with pytest.raises(
        ValueError, match=r"buffers, frozen parameters or extra state .*: 0\.seen"
    ):
        train_round(model)


def test_sampler_over_other_indices_rejected() -> None:
    dataset = tabular_loader().dataset
    loader = DataLoader(dataset, batch_size=4, sampler=SequentialSampler(range(8)))

    with pytest.raises(ValueError, match=r"must read its whole dataset"):
        train_round(tiny_model(), loader=loader)


class PlainBatchNorm(nn.BatchNorm1d):
    """A BatchNorm subclass, which Opacus's validator lookup does not match."""


def test_batch_norm_subclass_rejected() -> None:
    model = nn.Sequential(
        nn.Linear(NUM_FEATURES, 4),
        PlainBatchNorm(4, track_running_stats=False),
        nn.Linear(4, NUM_CLASSES),
    )

    with pytest.raises(ValueError, match=r"1 \(PlainBatchNorm\): a BatchNorm subclass"):
        check_private_compatible(model)


class FrozenMean(nn.Module):
    """A layer that keeps a running mean of its inputs in a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(NUM_FEATURES), requires_grad=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if len(features):
            self.mean.data.mul_(0.9).add_(0.1 * features.mean(dim=0))
        return features


@pytest.mark.timeout(20)
def test_frozen_parameter_changed_by_training_releases_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(FrozenMean(), nn.Linear(NUM_FEATURES, NUM_CLASSES))

    with pytest.raises(
        ValueError, match=r"frozen parameters or extra state .*: 0\.mean"
    ):
        train_round(model)


class ConstantNan(nn.Module):
    """A layer with a constant buffer that contains NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("marker", torch.tensor([float("nan"), 1.0]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@pytest.mark.timeout(20)
def test_constant_nan_buffer_accepted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ConstantNan(), nn.Linear(NUM_FEATURES, NUM_CLASSES))

    result = train_round(model)

    assert torch.isnan(result.state_dict["0.marker"][0])


class InputMeanState(nn.Module):
    """A layer that keeps the mean of its inputs as extra state."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = torch.zeros(NUM_FEATURES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if len(features):
            self.seen = features.mean(dim=0).detach()
        return features

    def get_extra_state(self) -> torch.Tensor:
        return self.seen

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.seen = state


@pytest.mark.timeout(20)
def test_extra_state_changed_by_training_releases_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(InputMeanState(), nn.Linear(NUM_FEATURES, NUM_CLASSES))

    with pytest.raises(ValueError, match=r"extra state .*: 0\._extra_state"):
        train_round(model)


@pytest.mark.parametrize(
    "buffer",
    [
        torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
        torch.tensor([1 + 2j, 3 - 1j]).conj(),
    ],
    ids=["quantized", "conjugate"],
)
@pytest.mark.timeout(20)
def test_unusual_constant_buffer_accepted(buffer: torch.Tensor) -> None:
    torch.manual_seed(0)
    holder = nn.Identity()
    holder.register_buffer("constant", buffer)
    model = nn.Sequential(holder, nn.Linear(NUM_FEATURES, NUM_CLASSES))

    result = train_round(model)

    assert "0.constant" in result.state_dict


class TiedLayers(nn.Module):
    """Two dense layers that share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(NUM_FEATURES, NUM_FEATURES)
        self.second = nn.Linear(NUM_FEATURES, NUM_FEATURES)
        self.second.weight = self.first.weight
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(torch.relu(self.first(features))))


@pytest.mark.timeout(20)
def test_tied_weights_trained() -> None:
    torch.manual_seed(0)
    model = TiedLayers()

    result = train_round(model)

    assert torch.equal(
        result.state_dict["first.weight"], result.state_dict["second.weight"]
    )
    assert not torch.equal(result.state_dict["first.weight"], model.first.weight)


class ConstantExtraState(nn.Identity):
    """A layer whose extra state is a dict of a tensor and an array."""

    def get_extra_state(self) -> dict[str, object]:
        return {"scale": torch.ones(2), "offsets": np.zeros(3)}

    def set_extra_state(self, state: dict[str, object]) -> None:
        del state


@pytest.mark.timeout(20)
def test_constant_container_extra_state_accepted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ConstantExtraState(), nn.Linear(NUM_FEATURES, NUM_CLASSES))

    result = train_round(model)

    assert "0._extra_state" in result.state_dict


def test_empty_dataset_rejected() -> None:
    loader = tabular_loader(num_examples=0)

    with pytest.raises(ValueError, match=r"must have at least 1 example\. Found 0"):
        train_round(tiny_model(), loader=loader)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchcsprng") is not None,
    reason="torchcsprng is installed",
)
def test_secure_rng_needs_torchcsprng() -> None:
    config = DPSGDConfig(delta=DELTA, noise_multiplier=1.0, secure_rng=True)

    with pytest.raises(ImportError, match="secure_rng=True needs the torchcsprng"):
        train_round(tiny_model(), config=config)


# --- clipping ----------------------------------------------------------------


CLIP_NORM = 0.5
HUGE_LEARNING_RATE = 1e4


def clipping_model() -> nn.Module:
    torch.manual_seed(4)
    # Without a bias, the gradient scales with the features.
    return nn.Linear(4, 2, bias=False)


def example_gradient(
    model: nn.Module, features: torch.Tensor, label: int
) -> torch.Tensor:
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(features[None]), torch.tensor([label]))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def one_step_update(model: nn.Module, features: torch.Tensor, labels: torch.Tensor):
    """Run one noiseless DP-SGD step in which every example is sampled."""
    config = DPSGDConfig(delta=DELTA, noise_multiplier=0.0, max_grad_norm=CLIP_NORM)
    # One batch of the whole dataset gives sample rate 1, so every step has every example.
    loader = DataLoader(TensorDataset(features, labels), batch_size=len(labels))

    result = train_dp_sgd(
        model,
        loader,
        epochs=1,
        learning_rate=HUGE_LEARNING_RATE,
        config=config,
        state=None,
    )

    trained = torch.cat([value.flatten() for value in result.state_dict.values()])
    return (trained - flat_parameters(model)).double() / HUGE_LEARNING_RATE


@pytest.mark.timeout(20)
def test_large_gradient_clipped_to_norm() -> None:
    model = clipping_model()
    features = torch.tensor([[300.0, -200.0, 100.0, 400.0]])
    labels = torch.tensor([0])
    gradient = example_gradient(model, features[0], 0).double()

    step = one_step_update(model, features, labels)

    assert gradient.norm() > 100 * CLIP_NORM
    assert step.norm() == pytest.approx(CLIP_NORM, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(-step, gradient, dim=0) > 0.9999


@pytest.mark.timeout(20)
def test_small_gradient_not_clipped() -> None:
    model = clipping_model()
    features = torch.tensor([[0.01, -0.02, 0.03, 0.01]])
    labels = torch.tensor([1])
    gradient = example_gradient(model, features[0], 1).double()

    step = one_step_update(model, features, labels)

    assert gradient.norm() < CLIP_NORM
    assert torch.allclose(-step, gradient, rtol=1e-3, atol=1e-6)


@pytest.mark.timeout(20)
def test_each_example_clipped_before_averaging() -> None:
    model = clipping_model()
    generator = torch.Generator().manual_seed(5)
    scales = torch.tensor([0.01, 0.1, 50.0, 200.0, 1.0, 500.0])[:, None]
    features = torch.randn(6, 4, generator=generator) * scales
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    clipped = []
    for example, label in zip(features, labels.tolist(), strict=True):
        gradient = example_gradient(model, example, label).double()
        clipped.append(gradient * min(1.0, CLIP_NORM / float(gradient.norm())))
    expected = torch.stack(clipped).mean(dim=0)

    step = one_step_update(model, features, labels)

    assert step.norm() <= CLIP_NORM
    assert torch.allclose(-step, expected, rtol=1e-3, atol=1e-6)


# --- cost per step -----------------------------------------------------------


class StepCostCnn(nn.Module):
    """Two convolutions and two dense layers for 28x28 images, 25,810 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.fc1 = nn.Linear(32 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.max_pool2d(torch.relu(self.conv1(images)), 2)
        hidden = nn.functional.max_pool2d(torch.relu(self.conv2(hidden)), 2)
        hidden = torch.relu(self.fc1(torch.flatten(hidden, start_dim=1)))
        return self.fc2(hidden)


STEP_COST_BATCH = 64
STEP_COST_SHORT_STEPS = 2
STEP_COST_LONG_STEPS = 10
STEP_COST_REPEATS = 3


def time_dp_call(model: nn.Module, num_steps: int) -> float:
    loader = image_loader(
        num_steps * STEP_COST_BATCH, side=28, batch_size=STEP_COST_BATCH
    )
    start = time.process_time()
    train_round(model, loader=loader, learning_rate=0.05)
    return time.process_time() - start


def time_plain_steps(model: nn.Module, num_steps: int) -> float:
    loader = image_loader(
        num_steps * STEP_COST_BATCH, side=28, batch_size=STEP_COST_BATCH
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    start = time.process_time()
    for images, labels in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return time.process_time() - start


@pytest.mark.timeout(60)
def test_step_cost_dp_against_plain_sgd() -> None:
    """Measure the CPU time of one DP-SGD and one plain SGD step, one thread, batch 64.

    It measures the process's CPU time, not wall time, so that other
    processes on the machine inflate it less, and takes the minimum of
    repeated runs. The DP-SGD
    cost per step is the slope between calls of 2 and 10 steps, which leaves
    out the cost of each call (copy, wrapping, accounting).
    """
    model = StepCostCnn()
    assert sum(p.numel() for p in model.parameters()) == 25_810
    time_dp_call(model, 1)
    time_plain_steps(model, 1)

    short = min(
        time_dp_call(model, STEP_COST_SHORT_STEPS) for _ in range(STEP_COST_REPEATS)
    )
    long = min(
        time_dp_call(model, STEP_COST_LONG_STEPS) for _ in range(STEP_COST_REPEATS)
    )
    plain = min(
        time_plain_steps(model, STEP_COST_LONG_STEPS) for _ in range(STEP_COST_REPEATS)
    )
    dp_step = (long - short) / (STEP_COST_LONG_STEPS - STEP_COST_SHORT_STEPS)
    plain_step = plain / STEP_COST_LONG_STEPS
    print(
        f"\nCPU time per step: DP-SGD {dp_step * 1e3:.1f} ms, "
        f"plain SGD {plain_step * 1e3:.1f} ms, ratio {dp_step / plain_step:.2f}"
    )

    assert dp_step > plain_step


def test_overflowing_noise_rejected_after_training() -> None:
    # The largest accepted clipping norm gives float32 noise of about 3.4e38,
    # which overflows the weights.
    config = DPSGDConfig(delta=DELTA, noise_multiplier=1.0, max_grad_norm=3.402e38)
    model = tiny_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    with pytest.raises(
        ValueError,
        match=r"DP-SGD left weight '.*' NaN or infinite, with max_grad_norm 3\.402e\+38",
    ):
        train_round(model, config=config)

    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
