"""Loading of model files: .npz archives of .npy arrays, as numpy.savez writes them.

A model file comes from the party being audited, so `load_model` treats it
as hostile. It checks the zip end records and the member count before
zipfile parses the archive, and each member's zip entry and .npy header
before it reads any values. It never unpickles, and it raises ValueErrors
that name the file.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import math
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .files import open_regular_file, os_reason
from .models import model_digest

Model = dict[str, npt.NDArray[np.generic]]

MAX_MODEL_MEMBERS = 100_000
"""Maximum members, one per array, of a model file. The models of this
project have at most a few dozen arrays. zipfile builds an object of about
0.5 KB for every member when it opens an archive, so the count is checked
before it does. Without the check, an archive of 1,000,000 empty members
took about 600 MB and 7 s to open (Python 3.11, numpy 2.4, on 2 cores)."""

MAX_CENTRAL_DIRECTORY_BYTES = 512 * MAX_MODEL_MEMBERS
"""Maximum size of a model file's zip central directory, 512 bytes per
member on average: a 46-byte entry, a 28-byte ZIP64 field and the name.
zipfile reads the whole directory into memory before it parses it."""


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

_NPY_HEADER_LENGTHS = {(1, 0): struct.Struct("<H"), (2, 0): struct.Struct("<I")}
"""Field that gives the header's length in bytes, per .npy format version."""

MAX_NPY_HEADER_BYTES = 10_000
"""Longest .npy header that the auditor reads: the limit that numpy's header
readers apply by default, above which they raise."""

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
    with open_regular_file(path, description="the model", name=quoted_path) as file:
        model = _read_model_file(file, quoted_path, max_bytes)

    try:
        model_digest(model)
    except ValueError as error:
        raise ValueError(
            f"the model {quoted_path} cannot be audited: {error}"
        ) from None
    return model


def _read_model_file(file: IO[bytes], quoted_path: str, max_bytes: int | None) -> Model:
    try:
        start = file.read(len(np.lib.format.MAGIC_PREFIX))
        if start != np.lib.format.MAGIC_PREFIX:
            _check_central_directory(file, quoted_path)
    except OSError as error:
        raise _read_error(quoted_path, error) from error
    if start == np.lib.format.MAGIC_PREFIX:
        raise ValueError(
            f"the model {quoted_path} must be an .npz file of named arrays "
            "(numpy.savez). Found a single .npy array."
        )
    # zipfile reads the same open file that was checked, so a file replaced
    # after the check is never parsed.
    try:
        archive = zipfile.ZipFile(file)
    except NotImplementedError as error:
        # zipfile raises it for an entry that needs a newer zip version.
        raise ValueError(
            f"the model {quoted_path} cannot be read: it needs a zip feature that "
            f"Python's zipfile module does not support ({error})."
        ) from error
    except UnicodeDecodeError as error:
        raise ValueError(
            f"the model {quoted_path} must name its members in UTF-8, as its zip "
            "entries declare. Found a member name that is not valid UTF-8."
        ) from error
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise _not_zip_error(quoted_path) from error

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
    return model


def _read_error(quoted_path: str, error: OSError) -> ValueError:
    return ValueError(f"cannot read the model {quoted_path}: {os_reason(error)}.")


def _not_zip_error(quoted_path: str) -> ValueError:
    return ValueError(
        f"the model {quoted_path} must be an .npz file of named arrays "
        "(numpy.savez). Found a file that is not a zip archive, or a "
        "truncated one."
    )


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
    except UnicodeDecodeError as error:
        # zipfile decodes the name in a member's local header when it opens it.
        raise ValueError(
            f"the model {quoted_path} is truncated or corrupt: {where} has a local "
            "header whose name is not valid UTF-8."
        ) from error
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
        error text is not passed on, because it can quote the raw header.

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
    # numpy reads the whole declared header in one call, so a 4 GiB length
    # in a 14-byte file would reserve 4 GiB before numpy rejects it.
    length_format = _NPY_HEADER_LENGTHS[version]
    length_bytes = file.read(length_format.size)
    if len(length_bytes) < length_format.size:
        return "whose .npy header is invalid"
    (header_length,) = length_format.unpack(length_bytes)
    if header_length > MAX_NPY_HEADER_BYTES:
        return (
            f"whose .npy header declares {header_length} bytes; numpy reads at "
            f"most {MAX_NPY_HEADER_BYTES}"
        )
    header = file.read(header_length)
    try:
        shape, _, dtype = _NPY_HEADER_READERS[version](
            io.BytesIO(length_bytes + header)
        )
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


_END_RECORD = struct.Struct("<4s4H2LH")
"""End of central directory record: signature, two disk numbers, the entry
counts on this disk and in all, the directory's size and offset, and the
length of the archive comment that follows."""

_ZIP64_LOCATOR = struct.Struct("<4sLQL")
"""ZIP64 end of central directory locator, right before the end record:
signature, the disk and offset of the ZIP64 end record, and the disk count."""

_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
"""ZIP64 end of central directory record: signature, record size, two
versions, two disk numbers, the entry counts on this disk and in all, and
the directory's size and offset, as 64-bit fields."""

_DIRECTORY_ENTRY = struct.Struct("<4s4B4HL2L5H2L")
"""Fixed part of a central directory entry. Fields 12 to 14 are the lengths
of the name, extra field and comment that follow it."""

MAX_EXTRA_FIELD_BYTES = 1024
"""Largest zip extra field of one member. numpy.savez writes at most a ZIP64
field of 28 bytes. Python 3.11's zipfile parses an extra field in time
quadratic in its length, before any member can be checked. A 64 KiB field
took about 16 ms per member here, and a 51 MB file of 779 such members
took about 20 s to open."""

_END_RECORD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_END_RECORD_SIGNATURE = b"PK\x06\x06"
_DIRECTORY_ENTRY_SIGNATURE = b"PK\x01\x02"
_MAX_COMMENT_BYTES = 0xFFFF


@dataclass(frozen=True)
class _CentralDirectory:
    """Central directory of a zip archive, as its end records describe it.

    Attributes:
        entries: Number of entries that the end records list.
        offset: Offset of the directory in the file.
        size: Size of the directory in bytes.
        end: Offset of the record that follows the directory: the ZIP64 end
            record if there is one, otherwise the end record.

    """

    entries: int
    offset: int
    size: int
    end: int


def _check_central_directory(file: IO[bytes], quoted_path: str) -> None:
    """Check a zip archive's member count before zipfile parses its directory.

    zipfile reads the whole central directory into memory and builds an
    object per entry before any member can be checked. It walks the
    directory by its size in bytes and ignores the entry count in the end
    record, so the entries are counted here the same way.

    Raises:
        ValueError: If the archive has more than `MAX_MODEL_MEMBERS`
            members, a directory larger than `MAX_CENTRAL_DIRECTORY_BYTES`,
            or end records that do not match its directory.

    """
    directory = _read_end_records(file, quoted_path)
    if directory.entries > MAX_MODEL_MEMBERS:
        raise ValueError(
            f"the model {quoted_path} must have at most {MAX_MODEL_MEMBERS} "
            f"members, one per array. Its zip end records list {directory.entries}."
        )
    if directory.size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise ValueError(
            f"the model {quoted_path} must have a zip central directory of at "
            f"most {MAX_CENTRAL_DIRECTORY_BYTES} bytes. Its end records give "
            f"{directory.size}."
        )
    # numpy.savez writes the directory right before the end records, and
    # Python 3.11's zipfile reads it from there, whatever offset the end
    # record gives.
    # Requiring the offset to agree makes the entries counted below the ones
    # that zipfile parses.
    if directory.offset + directory.size != directory.end:
        raise ValueError(
            f"the model {quoted_path} is truncated or corrupt: its zip central "
            f"directory must end at byte {directory.end}, where the end records "
            f"start. Found offset {directory.offset} and size {directory.size}."
        )
    file.seek(directory.offset)
    _check_entry_count(file.read(directory.size), directory.entries, quoted_path)


def _read_end_records(file: IO[bytes], quoted_path: str) -> _CentralDirectory:
    file_size = file.seek(0, os.SEEK_END)
    position = _find_end_record(file, file_size)
    if position is None:
        raise _not_zip_error(quoted_path)
    file.seek(position)
    fields = _END_RECORD.unpack(file.read(_END_RECORD.size))
    directory = _CentralDirectory(
        entries=fields[4], offset=fields[6], size=fields[5], end=position
    )

    locator_position = position - _ZIP64_LOCATOR.size
    if locator_position < 0:
        return directory
    file.seek(locator_position)
    signature, disk, record_offset, disks = _ZIP64_LOCATOR.unpack(
        file.read(_ZIP64_LOCATOR.size)
    )
    if signature != _ZIP64_LOCATOR_SIGNATURE:
        return directory

    # numpy.savez writes the ZIP64 end record right before its locator.
    # Python 3.11's zipfile reads the record from there, whatever offset the
    # locator gives, so the offset must agree with that position.
    record_position = locator_position - _ZIP64_END_RECORD.size
    located = disk == 0 and disks <= 1 and record_offset == record_position
    if located and record_position >= 0:
        file.seek(record_position)
        fields = _ZIP64_END_RECORD.unpack(file.read(_ZIP64_END_RECORD.size))
        if fields[0] == _ZIP64_END_RECORD_SIGNATURE:
            return _CentralDirectory(
                entries=fields[7], offset=fields[9], size=fields[8], end=record_position
            )
    raise ValueError(
        f"the model {quoted_path} is truncated or corrupt: its ZIP64 end of "
        "central directory locator must point to a ZIP64 end record right "
        f"before it, on disk 0 of 1. Found offset {record_offset} on disk "
        f"{disk} of {disks}, where the record would be at {record_position}."
    )


def _find_end_record(file: IO[bytes], file_size: int) -> int | None:
    """Return the offset of the end of central directory record, as zipfile finds it.

    zipfile first looks for a record without a comment at the end of the
    file, and then for the last record signature in the final 64 KiB that a
    comment may take.
    """
    if file_size < _END_RECORD.size:
        return None
    file.seek(file_size - _END_RECORD.size)
    record = file.read(_END_RECORD.size)
    if record.startswith(_END_RECORD_SIGNATURE) and record.endswith(b"\0\0"):
        return file_size - _END_RECORD.size
    start = max(file_size - _MAX_COMMENT_BYTES - _END_RECORD.size, 0)
    file.seek(start)
    tail = file.read()
    found = tail.rfind(_END_RECORD_SIGNATURE)
    if found < 0 or found + _END_RECORD.size > len(tail):
        return None
    return start + found


def _check_entry_count(directory: bytes, entries: int, quoted_path: str) -> None:
    # Entries are counted until the count in the end record is passed, so
    # a directory of a million 46-byte entries stops the walk early.
    count = 0
    position = 0
    while position < len(directory) and count <= entries:
        entry = directory[position : position + _DIRECTORY_ENTRY.size]
        if len(entry) < _DIRECTORY_ENTRY.size or not entry.startswith(
            _DIRECTORY_ENTRY_SIGNATURE
        ):
            raise _not_zip_error(quoted_path)
        lengths = _DIRECTORY_ENTRY.unpack(entry)[12:15]
        if lengths[1] > MAX_EXTRA_FIELD_BYTES:
            raise ValueError(
                f"the model {quoted_path} must have zip extra fields of at most "
                f"{MAX_EXTRA_FIELD_BYTES} bytes per member. Found one of "
                f"{lengths[1]} bytes in entry {count + 1}."
            )
        position += _DIRECTORY_ENTRY.size + sum(lengths)
        count += 1
    if count != entries:
        found = f"more than {entries}" if count > entries else str(count)
        raise ValueError(
            f"the model {quoted_path} is truncated or corrupt: its zip central "
            f"directory contains {found} entries, but its end records list "
            f"{entries}."
        )
