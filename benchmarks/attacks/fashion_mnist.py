"""Loader for the Fashion-MNIST IDX files shipped by Debian.

Fashion-MNIST (Xiao, Rasul and Vollgraf, arXiv:1708.07747, 2017) has 60,000
training and 10,000 test images of 28 x 28 grayscale pixels in 10 classes. The
Debian package ``dataset-fashion-mnist`` installs the gzip-compressed IDX files
under /usr/share/datasets/fashion-mnist/.

IDX format: a big-endian header of two zero bytes, a type byte (0x08 for
unsigned bytes), the number of dimensions, then one 32-bit size per dimension,
followed by the data in row-major order.
"""

import gzip
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"
IMAGE_SIDE = 28
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILE_PREFIXES = {"train": "train", "test": "t10k"}
_IDX_UNSIGNED_BYTE = 0x08
_IDX_HEADER_BYTES = 4
_IDX_SIZE_BYTES = 4
_MAX_PIXEL_VALUE = 255.0

Split = Literal["train", "test"]


class LabeledImages(NamedTuple):
    """Images with their class labels as tensors.

    Attributes:
        images: Float32 pixels scaled to [0, 1], shape (n, 1, 28, 28).
        labels: Class indices as int64, shape (n,).

    """

    images: Tensor
    labels: Tensor


def load_fashion_mnist(
    *, split: Split, data_dir: Path = DEFAULT_DATA_DIR
) -> LabeledImages:
    """Load one split of Fashion-MNIST as tensors.

    Args:
        split: "train" for the 60,000 training images or "test" for the 10,000
            test images.
        data_dir: The folder with the four ``*-ubyte.gz`` files.

    Returns:
        The images scaled to [0, 1] and their labels.

    Raises:
        FileNotFoundError: If a file is missing. The message names the Debian
            package that installs them.
        ValueError: If ``split`` is unknown or a file is not a valid IDX file,
            or the counts of images and labels differ.

    """
    if split not in _FILE_PREFIXES:
        raise ValueError(
            f"split must be one of {sorted(_FILE_PREFIXES)}. Found {split!r}."
        )
    prefix = _FILE_PREFIXES[split]
    image_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
    label_path = data_dir / f"{prefix}-labels-idx1-ubyte.gz"

    images = read_idx(image_path)
    labels = read_idx(label_path)

    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{image_path} must contain 3-D images and {label_path} 1-D labels. "
            f"Found shapes {images.shape} and {labels.shape}."
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} and {label_path} must contain the same number of "
            f"examples. Found {images.shape[0]} images and {labels.shape[0]} "
            "labels."
        )
    image_tensor = torch.from_numpy(images.astype(np.float32) / _MAX_PIXEL_VALUE)
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return LabeledImages(images=image_tensor.unsqueeze(1), labels=label_tensor)


def read_idx(path: Path) -> npt.NDArray[np.uint8]:
    """Read a gzip-compressed IDX file of unsigned bytes.

    Args:
        path: The ``.gz`` file.

    Returns:
        The array with the shape given in the file header.

    Raises:
        FileNotFoundError: If the file does not exist. The message gives the
            command that installs the Debian package.
        ValueError: If the header is not that of an unsigned-byte IDX file or
            the data size does not match the header.

    """
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found. Install the Debian package "
            f"with: {INSTALL_COMMAND}"
        )
    with gzip.open(path, "rb") as compressed:
        content = compressed.read()

    shape = _parse_idx_header(content, path=path)
    data_offset = _IDX_HEADER_BYTES + _IDX_SIZE_BYTES * len(shape)
    expected_size = int(np.prod(shape))
    data = np.frombuffer(content, dtype=np.uint8, offset=data_offset)
    if data.size != expected_size:
        raise ValueError(
            f"{path} must contain {expected_size} data bytes for shape {shape}. "
            f"Found {data.size}."
        )
    return data.reshape(shape)


def _parse_idx_header(content: bytes, *, path: Path) -> tuple[int, ...]:
    if len(content) < _IDX_HEADER_BYTES:
        raise ValueError(
            f"{path} must start with a {_IDX_HEADER_BYTES}-byte IDX header. "
            f"Found {len(content)} bytes."
        )
    zero_bytes, data_type, num_dimensions = content[0:2], content[2], content[3]
    if zero_bytes != b"\x00\x00" or data_type != _IDX_UNSIGNED_BYTE:
        raise ValueError(
            f"{path} must be an unsigned-byte IDX file with magic bytes "
            f"00 00 08. Found {content[:3].hex(' ')}."
        )
    header_end = _IDX_HEADER_BYTES + _IDX_SIZE_BYTES * num_dimensions
    if len(content) < header_end:
        raise ValueError(
            f"{path} must have a header of {header_end} bytes for "
            f"{num_dimensions} dimensions. Found {len(content)} bytes."
        )
    sizes = np.frombuffer(
        content, dtype=">u4", count=num_dimensions, offset=_IDX_HEADER_BYTES
    )
    return tuple(int(size) for size in sizes)
