"""File checks before reading untrusted files, and atomic replacement of a file."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

NEW_FILE_MODE = 0o666
"""Mode requested for a new file. The process umask removes bits from it,
as for any file that ``open`` creates."""


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with a file holding `text` in UTF-8, all at once."""
    write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with the bytes that `write` writes to a stream, all at once.

    The bytes go to a new file in the same folder, which is flushed to disk
    and then renamed over `path`, so a reader sees the old file or the new
    one, never part of one. A symbolic link at `path` is replaced, not
    followed. ``tempfile.mkstemp`` would create the file with mode 0600
    whatever the umask; this one gets the umask's mode.
    """
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def open_regular_file(path: Path, *, description: str, name: str) -> BinaryIO:
    """Open `path` for reading, after checking on the open file that it is regular.

    The file is opened without blocking, so a FIFO cannot stall the open,
    and it is checked through the open descriptor, so a file swapped in
    after the check is never read.

    Args:
        path: The file to open.
        description: What the file is, such as ``aggregate_path``.
        name: How messages name the file, such as the path as a user gave it.

    Raises:
        ValueError: If `path` cannot be opened or is not a regular file.

    """
    descriptor = None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        regular = stat.S_ISREG(os.fstat(descriptor).st_mode)
    except (OSError, ValueError) as error:
        if descriptor is not None:
            os.close(descriptor)
        raise ValueError(
            f"cannot read {description} {name}: {os_reason(error)}."
        ) from error

    if not regular:
        os.close(descriptor)
        raise ValueError(
            f"{description} must name a regular file. Found {name}, which is not one."
        )
    return os.fdopen(descriptor, "rb")


def os_reason(error: Exception) -> str:
    """Return the OS's text of `error`, without the errno and the path.

    Messages that quote it name the path themselves.
    """
    return getattr(error, "strerror", None) or str(error)
