"""Offline datasets, the held-out test split and the client partitions.

Every dataset loads from local files only: scikit-learn's bundled copies of
the breast-cancer and digits sets, and the IDX files of the Debian package
``dataset-fashion-mnist``. Nothing is downloaded and nothing is synthesized.

Feature scaling never looks at the test split. Pixel datasets are divided by
their fixed maximum value, which needs no statistics at all. The tabular
breast-cancer features are standardized with the mean and standard deviation
of the train split, which is the union of all client partitions. In a real
federation those two statistics would come from one federated (or securely
aggregated) summation round; the simulation computes them directly.
"""

import gzip
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

BREAST_CANCER = "breast-cancer"
DIGITS = "digits"
FASHION_MNIST = "fashion-mnist"
DATASET_NAMES = (BREAST_CANCER, DIGITS, FASHION_MNIST)

IID = "iid"
DIRICHLET = "dirichlet"
PARTITIONING_NAMES = (IID, DIRICHLET)

# Fraction of a scikit-learn dataset held out for central evaluation.
TEST_FRACTION = 0.2

# Smallest partition a client receives, in examples.
MIN_PARTITION_SIZE = 10

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL_COMMAND = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_PIXEL_MAX_UINT8 = 255.0
_PIXEL_MAX_DIGITS = 16.0
_DIGITS_SIDE = 8

FloatArray = NDArray[np.float32]
LabelArray = NDArray[np.int64]
IndexArray = NDArray[np.int64]


@dataclass(frozen=True)
class DatasetSplit:
    """Scaled train and test arrays of one dataset.

    Attributes:
        x_train: Train features, float32; shape ``(n, features)`` or
            ``(n, 1, height, width)`` for images.
        y_train: Train labels, int64 class indices.
        x_test: Held-out test features, scaled like ``x_train``.
        y_test: Held-out test labels.
        num_classes: Number of label classes.
    """

    x_train: FloatArray
    y_train: LabelArray
    x_test: FloatArray
    y_test: LabelArray
    num_classes: int


def load_dataset(
    name: str, seed: int, fashion_mnist_dir: Path = FASHION_MNIST_DIR
) -> DatasetSplit:
    """Load a dataset by name and split it into train and test arrays.

    Args:
        name: One of ``DATASET_NAMES``.
        seed: Seed of the stratified train/test split. Fashion-MNIST keeps its
            published split, so the seed does not change it.
        fashion_mnist_dir: Folder with the Fashion-MNIST IDX ``.gz`` files.

    Returns:
        The scaled train and test arrays.

    Raises:
        ValueError: If ``name`` is not a known dataset.
        FileNotFoundError: If the Fashion-MNIST files are missing.
    """
    if name == BREAST_CANCER:
        return load_breast_cancer_split(seed)
    if name == DIGITS:
        return load_digits_split(seed)
    if name == FASHION_MNIST:
        return load_fashion_mnist_split(fashion_mnist_dir)
    raise ValueError(
        f"dataset must be one of {', '.join(DATASET_NAMES)}. Found {name!r}."
    )


@lru_cache(maxsize=4)
def load_dataset_cached(name: str, seed: int) -> DatasetSplit:
    """Load a dataset once per process; see `load_dataset`."""
    return load_dataset(name, seed)


def load_breast_cancer_split(seed: int) -> DatasetSplit:
    """Load the Wisconsin breast-cancer set, standardized by train statistics."""
    # scikit-learn loads in about 0.7 s; stages that do not train skip it.
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = _stratified_split(features, labels, seed)

    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0.0] = 1.0

    return DatasetSplit(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test.astype(np.int64),
        num_classes=2,
    )


def load_digits_split(seed: int) -> DatasetSplit:
    """Load the 8x8 digits set as ``(n, 64)`` features scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = _stratified_split(features, labels, seed)

    return DatasetSplit(
        x_train=(x_train / _PIXEL_MAX_DIGITS).astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=(x_test / _PIXEL_MAX_DIGITS).astype(np.float32),
        y_test=y_test.astype(np.int64),
        num_classes=10,
    )


def load_fashion_mnist_split(directory: Path = FASHION_MNIST_DIR) -> DatasetSplit:
    """Load Fashion-MNIST from IDX files as ``(n, 1, 28, 28)`` images in [0, 1].

    The published 60,000/10,000 split is kept: its test set is already held out
    and balanced, with 1,000 images per class.

    Raises:
        FileNotFoundError: If any of the four files is missing; the message
            names the Debian package that provides them.
    """
    paths = {key: directory / filename for key, filename in FASHION_MNIST_FILES.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. "
            f"Install them with `{FASHION_MNIST_INSTALL_COMMAND}` (as root)."
        )

    x_train = read_idx_images(paths["train_images"])
    y_train = read_idx_labels(paths["train_labels"])
    x_test = read_idx_images(paths["test_images"])
    y_test = read_idx_labels(paths["test_labels"])

    return DatasetSplit(
        x_train=_scale_uint8_images(x_train),
        y_train=y_train,
        x_test=_scale_uint8_images(x_test),
        y_test=y_test,
        num_classes=10,
    )


def read_idx_images(path: Path) -> NDArray[np.uint8]:
    """Read a gzipped IDX3 image file into a ``(n, rows, cols)`` uint8 array."""
    with gzip.open(path, "rb") as stream:
        magic, count, rows, cols = struct.unpack(">IIII", stream.read(16))
        if magic != _IDX_IMAGES_MAGIC:
            raise ValueError(
                f"IDX image file {path} must start with magic number "
                f"{_IDX_IMAGES_MAGIC}. Found {magic}."
            )
        pixels = np.frombuffer(stream.read(), dtype=np.uint8)

    expected = count * rows * cols
    if pixels.size != expected:
        raise ValueError(
            f"IDX image file {path} must hold {expected} pixels. Found {pixels.size}."
        )
    return pixels.reshape(count, rows, cols)


def read_idx_labels(path: Path) -> LabelArray:
    """Read a gzipped IDX1 label file into an int64 array."""
    with gzip.open(path, "rb") as stream:
        magic, count = struct.unpack(">II", stream.read(8))
        if magic != _IDX_LABELS_MAGIC:
            raise ValueError(
                f"IDX label file {path} must start with magic number "
                f"{_IDX_LABELS_MAGIC}. Found {magic}."
            )
        labels = np.frombuffer(stream.read(), dtype=np.uint8)

    if labels.size != count:
        raise ValueError(
            f"IDX label file {path} must hold {count} labels. Found {labels.size}."
        )
    return labels.astype(np.int64)


def partition_indices(
    labels: LabelArray,
    num_partitions: int,
    partitioning: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
    min_partition_size: int = MIN_PARTITION_SIZE,
) -> list[IndexArray]:
    """Split example indices into disjoint client partitions.

    Args:
        labels: Class labels of the train split.
        num_partitions: Number of clients, at least 1.
        partitioning: ``"iid"`` (uniform shuffle) or ``"dirichlet"``
            (per-class shares drawn from a symmetric Dirichlet distribution).
        seed: Seed that fixes the partitions.
        dirichlet_alpha: Concentration of the Dirichlet distribution; smaller
            values give each client fewer dominant classes.
        min_partition_size: Smallest partition, in examples.

    Returns:
        One sorted index array per partition. Together they cover every index
        of ``labels`` exactly once.

    Raises:
        ValueError: If an argument is out of range or the train split is too
            small for ``num_partitions * min_partition_size`` examples.
    """
    _check_partition_args(
        len(labels), num_partitions, partitioning, dirichlet_alpha, min_partition_size
    )
    rng = np.random.default_rng(seed)

    if partitioning == IID:
        shuffled = rng.permutation(len(labels)).astype(np.int64)
        parts = np.array_split(shuffled, num_partitions)
    else:
        parts = _dirichlet_partition(
            labels, num_partitions, dirichlet_alpha, min_partition_size, rng
        )

    return [np.sort(part).astype(np.int64) for part in parts]


def _check_partition_args(
    num_examples: int,
    num_partitions: int,
    partitioning: str,
    dirichlet_alpha: float,
    min_partition_size: int,
) -> None:
    if partitioning not in PARTITIONING_NAMES:
        raise ValueError(
            f"partitioning must be one of {', '.join(PARTITIONING_NAMES)}. "
            f"Found {partitioning!r}."
        )
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1. Found {num_partitions}.")
    if dirichlet_alpha <= 0.0:
        raise ValueError(f"dirichlet_alpha must be positive. Found {dirichlet_alpha}.")
    if num_examples < num_partitions * min_partition_size:
        raise ValueError(
            f"The train split has {num_examples} examples, fewer than "
            f"num_partitions * min_partition_size = {num_partitions} * "
            f"{min_partition_size}. Use fewer clients."
        )


def _dirichlet_partition(
    labels: LabelArray,
    num_partitions: int,
    alpha: float,
    min_partition_size: int,
    rng: np.random.Generator,
) -> list[IndexArray]:
    # Each client first gets `min_partition_size` random examples, so the minimum
    # is met without rejection sampling. The remaining examples of each class
    # are then split by shares drawn from Dirichlet(alpha, ..., alpha).
    shuffled = rng.permutation(len(labels)).astype(np.int64)
    reserved_count = num_partitions * min_partition_size
    reserved = np.split(shuffled[:reserved_count], num_partitions)
    remaining = shuffled[reserved_count:]

    assigned: list[list[IndexArray]] = [[part] for part in reserved]
    remaining_labels = labels[remaining]
    for label in np.unique(labels):
        class_indices = remaining[remaining_labels == label]
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        cut_points = (np.cumsum(shares)[:-1] * len(class_indices)).astype(np.int64)
        for client, chunk in enumerate(np.split(class_indices, cut_points)):
            assigned[client].append(chunk)

    return [np.concatenate(chunks) for chunks in assigned]


@lru_cache(maxsize=4)
def _partitions_cached(
    name: str,
    seed: int,
    num_partitions: int,
    partitioning: str,
    dirichlet_alpha: float,
) -> tuple[IndexArray, ...]:
    split = load_dataset_cached(name, seed)
    parts = partition_indices(
        split.y_train, num_partitions, partitioning, seed, dirichlet_alpha
    )
    return tuple(parts)


def load_partition(
    name: str,
    seed: int,
    partition_id: int,
    num_partitions: int,
    partitioning: str,
    dirichlet_alpha: float,
) -> tuple[FloatArray, LabelArray]:
    """Return the train features and labels of one client partition.

    Raises:
        ValueError: If ``partition_id`` is not in ``[0, num_partitions)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, {num_partitions}). Found {partition_id}."
        )

    split = load_dataset_cached(name, seed)
    parts = _partitions_cached(
        name, seed, num_partitions, partitioning, dirichlet_alpha
    )
    indices = parts[partition_id]
    return split.x_train[indices], split.y_train[indices]


def _stratified_split(
    features: NDArray[np.float64], labels: NDArray[np.int64], seed: int
) -> tuple[
    NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]
]:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        features,
        labels,
        test_size=TEST_FRACTION,
        random_state=seed,
        stratify=labels,
    )
    return x_train, x_test, y_train, y_test


def _scale_uint8_images(images: NDArray[np.uint8]) -> FloatArray:
    scaled = images.astype(np.float32) / np.float32(_PIXEL_MAX_UINT8)
    return scaled[:, np.newaxis, :, :]
