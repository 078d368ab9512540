import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "secure_fedavg"
sys.path.insert(0, str(APP_DIR))

from secure_fedavg_app import data  # noqa: E402
from secure_fedavg_app.models import build_model, count_parameters  # noqa: E402

FASHION_MNIST_PRESENT = all(
    (data.FASHION_MNIST_DIR / name).is_file()
    for name in data.FASHION_MNIST_FILES.values()
)


def _labels(num_examples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, num_examples)


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_disjoint_and_cover(partitioning: str) -> None:
    labels = _labels(500, 5)

    parts = data.partition_indices(labels, 7, partitioning, seed=3)
    joined = np.concatenate(parts)

    assert len(parts) == 7
    assert len(joined) == len(labels)
    assert len(np.unique(joined)) == len(labels)
    assert set(joined.tolist()) == set(range(len(labels)))


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_deterministic_by_seed(partitioning: str) -> None:
    labels = _labels(400, 4)

    first = data.partition_indices(labels, 5, partitioning, seed=11)
    again = data.partition_indices(labels, 5, partitioning, seed=11)
    other = data.partition_indices(labels, 5, partitioning, seed=12)

    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_respects_min_partition_size() -> None:
    labels = _labels(300, 10)

    parts = data.partition_indices(
        labels, 20, "dirichlet", seed=0, dirichlet_alpha=0.01, min_partition_size=10
    )

    assert min(len(part) for part in parts) >= 10


def _mean_top_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    shares = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=10)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_skewed() -> None:
    labels = data.load_digits_split(seed=0).y_train

    iid = data.partition_indices(labels, 10, "iid", seed=0)
    skewed = data.partition_indices(
        labels, 10, "dirichlet", seed=0, dirichlet_alpha=0.1
    )

    iid_share = _mean_top_class_share(labels, iid)
    skewed_share = _mean_top_class_share(labels, skewed)
    assert iid_share < 0.25
    assert skewed_share > 0.4


def test_partition_rejects_too_many_clients() -> None:
    labels = _labels(50, 2)

    with pytest.raises(ValueError, match="fewer than num_partitions"):
        data.partition_indices(labels, 10, "iid", seed=0)


def test_partition_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="partitioning must be one of"):
        data.partition_indices(_labels(100, 2), 2, "shards", seed=0)


def test_partition_rejects_nonpositive_alpha() -> None:
    with pytest.raises(ValueError, match="dirichlet_alpha must be positive"):
        data.partition_indices(
            _labels(100, 2), 2, "dirichlet", seed=0, dirichlet_alpha=0.0
        )


def test_load_partition_rejects_bad_partition_id() -> None:
    with pytest.raises(ValueError, match=r"partition-id must be in \[0, 4\)"):
        data.load_partition("breast-cancer", 0, 4, 4, "iid", 0.5)


def test_breast_cancer_shapes() -> None:
    split = data.load_breast_cancer_split(seed=42)

    assert split.x_train.shape == (455, 30)
    assert split.x_test.shape == (114, 30)
    assert split.y_train.shape == (455,)
    assert split.y_test.shape == (114,)
    assert split.num_classes == 2
    assert split.x_train.dtype == np.float32
    assert split.y_train.dtype == np.int64


def test_breast_cancer_split_is_stratified() -> None:
    split = data.load_breast_cancer_split(seed=42)

    train_share = split.y_train.mean()
    test_share = split.y_test.mean()
    assert abs(train_share - test_share) < 0.01


def test_breast_cancer_scaled_by_train_statistics() -> None:
    split = data.load_breast_cancer_split(seed=42)

    np.testing.assert_allclose(split.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(split.x_train.std(axis=0), 1.0, atol=1e-4)
    assert np.abs(split.x_test.mean(axis=0)).max() > 1e-3


def test_split_deterministic_by_seed() -> None:
    first = data.load_breast_cancer_split(seed=5)
    again = data.load_breast_cancer_split(seed=5)
    other = data.load_breast_cancer_split(seed=6)

    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert not np.array_equal(first.x_test, other.x_test)


def test_digits_shapes() -> None:
    split = data.load_digits_split(seed=42)

    assert split.x_train.shape == (1437, 64)
    assert split.x_test.shape == (360, 64)
    assert split.num_classes == 10
    assert split.x_train.min() >= 0.0
    assert split.x_train.max() <= 1.0


def test_load_dataset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"dataset must be one of .* Found 'mnist'"):
        data.load_dataset("mnist", seed=0)


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not FASHION_MNIST_PRESENT,
    reason="Fashion-MNIST files missing: apt-get install -y dataset-fashion-mnist",
)
def test_fashion_mnist_reads_real_files() -> None:
    split = data.load_fashion_mnist_split()

    assert split.x_train.shape == (60000, 1, 28, 28)
    assert split.x_test.shape == (10000, 1, 28, 28)
    assert split.y_train.shape == (60000,)
    assert split.x_train.dtype == np.float32
    assert split.x_train.min() == 0.0
    assert split.x_train.max() == 1.0
    assert np.bincount(split.y_test).tolist() == [1000] * 10


def test_fashion_mnist_missing_files_names_install_command(tmp_path: Path) -> None:
    bogus = tmp_path / "no-such-dir"

    with pytest.raises(
        FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"
    ):
        data.load_fashion_mnist_split(bogus)


def test_idx_reader_rejects_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(struct.pack(">II", 1234, 1) + b"\x00")

    with pytest.raises(ValueError, match=r"magic number 2049\. Found 1234"):
        data.read_idx_labels(path)


def test_idx_reader_rejects_truncated_images(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(struct.pack(">IIII", 2051, 2, 2, 2) + b"\x00" * 5)

    with pytest.raises(ValueError, match=r"must hold 8 pixels\. Found 5"):
        data.read_idx_images(path)


def test_fashion_mnist_cnn_size() -> None:
    model = build_model("fashion-mnist")

    assert count_parameters(model) == 25_810


@pytest.mark.parametrize(
    ("dataset", "hidden_units", "parameters"),
    [
        ("fashion-mnist", 166, 13_258 + 523 * 166),
        ("fashion-mnist", 1, 13_258 + 523),
        ("breast-cancer", 40, 30 * 40 + 40 + 40 * 2 + 2),
        ("digits", 0, 4_810),
        ("digits", 3, 75 * 3 + 10),
        ("breast-cancer", 0, 530),
    ],
)
def test_hidden_units_set_the_width(
    dataset: str, hidden_units: int, parameters: int
) -> None:
    model = build_model(dataset, hidden_units=hidden_units)

    assert count_parameters(model) == parameters


@pytest.mark.parametrize("hidden_units", [-1, 65_537])
def test_hidden_units_out_of_range_rejected(hidden_units: int) -> None:
    with pytest.raises(ValueError, match=f"hidden_units must be 0 .*{hidden_units}"):
        build_model("digits", hidden_units=hidden_units)


def test_hidden_units_reach_the_private_model() -> None:
    model = build_model("fashion-mnist", dp_sgd=True, hidden_units=7)

    assert count_parameters(model) == 13_258 + 523 * 7
