"""Loading of model files: .npz archives of .npy arrays, as numpy.savez writes them.

A model file comes from the party being audited, so `load_model` treats it
as hostile: it checks each member's zip entry and .npy header before it
reads any values, never unpickles, and raises ValueErrors that name the
file.
"""

from __future__ import annotations

import contextlib
import lzma
import math
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .files import check_regular_file, os_reason
from .models import model_digest

Model = dict[str, npt.NDArray[np.generic]]


class ModelTooLargeError(ValueError):
    """Error for a model file whose members take more than `max_bytes` decompressed."""


_MEMBER_UNREADABLE_ERRORS = (RuntimeError, NotImplementedError)
"""Exceptions of zipfile for an encrypted member, or one compressed with a
method that it does not implement."""

_MEMBER_CORRUPT_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
)
"""Exceptions of zipfile, its decompressors and numpy for a truncated or
corrupt member. bz2 raises OSError and EOFError, and numpy raises
ValueError for array data shorter than its header declares."""

_MODEL_COMPRESSION_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
"""Zip methods of the members that the auditor reads: numpy.savez stores them,
numpy.savez_compressed deflates them."""

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
"""numpy's header reader for each .npy format version that numpy.savez writes."""

_NPY_HEADER_ERRORS = (ValueError, EOFError, SyntaxError, tokenize.TokenError)
"""Exceptions of numpy for a member that does not start with an .npy header.
numpy parses the header's text with tokenize and ast, whose errors are not
ValueErrors."""


def load_model(path: Path, *, max_bytes: int | None = None) -> Model:
    """Load a model saved with ``numpy.savez``, keeping the order of its arrays.

    Each member's .npy header is checked before its values are read, so
    pickled objects are never loaded. With `max_bytes`, an archive whose
    members would take more bytes once decompressed is rejected before any
    is read. Every error names `path` as given.

    Raises:
        ModelTooLargeError: If the members take more than `max_bytes` once
            decompressed.
        ValueError: If the file cannot be read, is not a regular file, or
            is not an .npz file of .npy arrays with fixed byte
            representations.

    """
    quoted_path = repr(str(path))
    check_regular_file(path, description="the model")
    try:
        with path.open("rb") as file:
            start = file.read(len(np.lib.format.MAGIC_PREFIX))
    except OSError as error:
        raise ValueError(
            f"cannot read the model {quoted_path}: {os_reason(error)}."
        ) from error
    if start == np.lib.format.MAGIC_PREFIX:
        raise ValueError(
            f"the model {quoted_path} must be an .npz file of named arrays "
            "(numpy.savez). Found a single .npy array."
        )
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ValueError(
            f"the model {quoted_path} must be an .npz file of named arrays "
            "(numpy.savez). Found a file that is not a zip archive, or a "
            "truncated one."
        ) from error

    with archive:
        members = archive.infolist()
        # An empty model would load, and the audit would then fail at round 1
        # with a digest mismatch that points away from the file.
        if not members:
            raise ValueError(
                f"the model {quoted_path} must contain at least one array. Found "
                "a zip archive that contains no arrays."
            )
        if max_bytes is not None:
            _check_archive_size(quoted_path, members, max_bytes)
        model: Model = {}
        for member in members:
            name = member.filename.removesuffix(".npy")
            if name == member.filename:
                raise ValueError(
                    f"the model {quoted_path} must contain .npy arrays only. Found "
                    f"member {member.filename!r}, whose name lacks .npy."
                )
            if name in model:
                raise ValueError(
                    f"the model {quoted_path} must contain each array once. Found "
                    f"member {member.filename!r} twice."
                )
            model[name] = _read_member(archive, member, quoted_path)

    try:
        model_digest(model)
    except ValueError as error:
        raise ValueError(
            f"the model {quoted_path} cannot be audited: {error}"
        ) from None
    return model


def _read_member(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, quoted_path: str
) -> npt.NDArray[np.generic]:
    where = f"member {member.filename!r}"
    # zipfile bounds the output of deflate but not of bzip2 or lzma, so a
    # small member of those could decompress to gigabytes before any check.
    if member.compress_type not in _MODEL_COMPRESSION_METHODS:
        raise ValueError(
            f"the model {quoted_path} must be written by numpy.savez or "
            f"numpy.savez_compressed. Found {where} with zip compression method "
            f"{member.compress_type}; only stored (0) and deflate (8) are read."
        )
    with _member_errors(quoted_path, where):
        header = _read_member_header(archive, member)
    if isinstance(header, str):
        raise ValueError(
            f"the model {quoted_path} must contain .npy arrays only. Found {where}, "
            f"{header}."
        )
    shape, dtype, offset = header
    if dtype.hasobject:
        raise ValueError(
            f"the model {quoted_path} must be an .npz file of plain numeric arrays. "
            f"Found pickled Python objects in {where}, which the auditor never "
            "loads."
        )
    if not all(is_count(dimension) for dimension in shape):
        raise ValueError(
            f"the model {quoted_path} must contain .npy arrays only. Found shape "
            f"{shape} in {where}."
        )
    # numpy multiplies the dimensions in int64, even when one of them is 0.
    if math.prod(dimension for dimension in shape if dimension) >= 2**63:
        raise ValueError(
            f"the model {quoted_path} must contain arrays whose dimensions "
            f"multiply to less than 2**63. Found shape {shape} in {where}."
        )
    # Comparing with the size in the zip directory keeps a header that
    # declares 2**40 values from reserving their memory.
    declared = math.prod(shape) * dtype.itemsize
    if declared != member.file_size - offset:
        raise ValueError(
            f"the model {quoted_path} is truncated or corrupt: {where} must contain "
            f"{declared} bytes of values, as its header declares. Found "
            f"{member.file_size - offset}."
        )

    with _member_errors(quoted_path, where), archive.open(member) as file:
        array: npt.NDArray[np.generic] = np.lib.format.read_array(
            file, allow_pickle=False
        )
    return array


def _read_member_header(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo
) -> tuple[tuple[Any, ...], np.dtype[Any], int] | str:
    """Return the shape, dtype and data offset of an .npy member.

    A member that cannot be read as one gives the reason instead.
    """
    with archive.open(member) as file:
        header = read_npy_header(file)
        if isinstance(header, str):
            return header
        shape, dtype = header
        return shape, dtype, file.tell()


@contextlib.contextmanager
def _member_errors(quoted_path: str, where: str) -> Iterator[None]:
    """Turn the errors of reading an archive member into one-line ValueErrors."""
    try:
        yield
    except _MEMBER_UNREADABLE_ERRORS:
        raise ValueError(
            f"the model {quoted_path} cannot be read: {where} is encrypted or "
            "compressed with a method that Python's zipfile module does not "
            "support."
        ) from None
    except _MEMBER_CORRUPT_ERRORS as error:
        raise ValueError(
            f"the model {quoted_path} is truncated or corrupt: {where} cannot be "
            "decompressed."
        ) from error


def read_npy_header(file: IO[bytes]) -> tuple[tuple[Any, ...], np.dtype[Any]] | str:
    """Read the magic string and header of an .npy file of version 1.0 or 2.0.

    Returns:
        The shape and the dtype, as numpy's header readers return them, or
        the reason that the file is not such an .npy file, as a clause to
        follow its name, such as "which is not an .npy array". numpy's own
        error text is not passed on, because it quotes the raw header.

    """
    try:
        version = np.lib.format.read_magic(file)
    except _NPY_HEADER_ERRORS:
        return "which is not an .npy array"
    if version not in _NPY_HEADER_READERS:
        return (
            f"which has .npy format version {version[0]}.{version[1]}; "
            "numpy.save and numpy.savez write 1.0 or 2.0, the versions that "
            "are read"
        )
    try:
        shape, _, dtype = _NPY_HEADER_READERS[version](file)
    except _NPY_HEADER_ERRORS:
        return "whose .npy header is invalid"
    return shape, dtype


def _check_archive_size(
    quoted_path: str, members: list[zipfile.ZipInfo], max_bytes: int
) -> None:
    # The sizes come from the zip directory, so a small archive that would
    # decompress to gigabytes is rejected before it is decompressed. zipfile
    # stops reading a member at its size in the directory, so no member
    # decompresses to more than the total checked here.
    total = sum(member.file_size for member in members)
    if total > max_bytes:
        raise ModelTooLargeError(
            f"the model {quoted_path} must take at most {max_bytes} bytes "
            f"decompressed. Its members take {total}."
        )


def is_count(value: object) -> bool:
    """Return whether `value` is a valid .npy dimension: an int of at least 0.

    numpy's header parser accepts any literal in the shape, True included.
    """
    return type(value) is int and value >= 0
