"""Atomic replacement of a text file, with the permissions of a new file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

NEW_FILE_MODE = 0o666
"""Mode requested for a new file. The process umask removes bits from it,
as for any file that ``open`` creates."""


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with a file holding `text` in UTF-8, all at once.

    The text goes to a new file in the same folder, which is flushed to
    disk and then renamed over `path`, so a reader sees the old file or
    the new one, never part of one. ``tempfile.mkstemp`` would create the
    file with mode 0600 whatever the umask; this one gets the umask's mode.
    """
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
