"""Offline audit of verified rounds: ``python -m fedsec_flwr.audit AUDIT.json``.

The audit file is JSON::

    {"format": "fedsec_flwr/audit/v1",
     "rounds": [{"transcript": {...}, "aggregate_path": "run-1-round-1.npy"},
                {"transcript": {...}, "aggregate_hex": "0100000002000000"}]}

Each transcript is `RoundTranscript.to_dict`. Its aggregate is either an
``.npy`` file of uint32 values, at a path relative to the JSON file's
folder, or inline hex of the little-endian uint32 bytes for short vectors.
A round may also have its settings (`RoundSettings`): a "decoding" object
(`ModelDecoding.to_dict`), the public parameters that turn its aggregate
into its mean update, and the hex digests "config_sha256" and
"fields_sha256" of its training configuration and request fields. The
round's clients signed the digest of the three.
`append_round` writes this format.

The command prints one line per round and exits with 0 when every round
verifies or is discarded, and 1 when a round fails, the file is malformed or
it contains no round. A round is discarded when some of its included
clients did not commit: the aggregate cannot be checked, and the model
carries over to the next round unchanged. Run ids and rounds are printed
so that an auditor can match them with the server's records.

With ``--initial-model FILE.npz`` it also follows the models of the run
(`audit_models`): starting from the initial model, each round's model must
be the one its clients signed (the transcript's model digest), and the
model after it is computed from the round's aggregate (`next_model`). With
``--final-model FILE.npz`` the model after the last round must equal that
file. The .npz files list the arrays in the model's order, as the app's
``initial_model.npz`` and ``final_model.npz`` do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import math
import os
import stat
import sys
import tokenize
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .core import commitments
from .core.transcript import (
    AuditResult,
    RoundTranscript,
    audit_round,
    is_lower_hex,
    json_type_name,
    missing_commitments,
    parse_untrusted_json,
)
from .files import write_text_atomically
from .models import (
    DIGEST_SIZE,
    ModelDecoding,
    RoundSettings,
    model_digest,
    next_model,
)

AUDIT_FORMAT = "fedsec_flwr/audit/v1"
"""Value of the "format" field of an audit file."""

INLINE_AGGREGATE_MAX_VALUES = 1024
"""Maximum length of an aggregate that `append_round` stores as inline hex."""

MAX_AUDIT_FILE_BYTES = 2**30
"""Largest audit file read, 1 GiB. A round takes about 0.5 KB per client
plus at most 8 KB of inline aggregate, and parsing takes several times
the file's size in memory."""

MAX_LINE_CHARACTERS = 2000
"""Maximum characters in a line that the command prints. Reasons quote
values from the audit file, and a longer line is cut."""

LINE_CUT_SUFFIX_CHARACTERS = 40
"""Characters kept free at the end of a cut line for the count of the rest."""

MODEL_SLACK_BYTES = 64 * 2**20
"""Bytes that a model file may hold beyond 8 bytes per value of the run's
longest aggregate: headers, and arrays that are not aggregated."""

EXIT_VERIFIED = 0
EXIT_FAILED = 1

_DOCUMENT_KEYS = frozenset({"format", "rounds"})
_ENTRY_KEYS = frozenset(
    {
        "transcript",
        "aggregate_path",
        "aggregate_hex",
        "decoding",
        "config_sha256",
        "fields_sha256",
    }
)
"""Keys that `append_round` writes. Others are rejected, as in transcripts."""


@dataclass(frozen=True)
class RoundAudit:
    """Audit outcome of one entry of an audit file.

    Attributes:
        label: "run R round N", or "entry K" when the transcript is malformed.
        result: Whether the round verified, and why not.
        run_id: The transcript's run, or ``None`` when it is malformed.
        server_round: The transcript's round, or ``None`` when it is malformed.

    """

    label: str
    result: AuditResult
    run_id: int | None = None
    server_round: int | None = None


def append_round(
    audit_path: Path,
    transcript: RoundTranscript,
    aggregate: npt.NDArray[np.uint32],
    *,
    settings: RoundSettings | None = None,
) -> None:
    """Add one round to an audit file, creating the file if it does not exist.

    An aggregate of at most `INLINE_AGGREGATE_MAX_VALUES` values is stored as
    inline hex. A longer one goes to ``<stem>-run-<run>-round-<round>.npy``
    in the JSON file's folder. The JSON file is replaced atomically. With
    ``settings``, the entry also records them, for `audit_models`.

    Raises:
        ValueError: If the existing file is not an audit file, or `aggregate`
            does not match the transcript's length and SHA-256.

    """
    if commitments.aggregate_digest(aggregate) != transcript.aggregate_sha256:
        raise ValueError(
            "aggregate must match the transcript's SHA-256. Found another vector."
        )
    document = _read_document(audit_path) if audit_path.exists() else _new_document()

    entry: dict[str, Any] = {"transcript": transcript.to_dict()}
    if settings is not None:
        entry["decoding"] = settings.decoding.to_dict()
        entry["config_sha256"] = settings.config_sha256.hex()
        entry["fields_sha256"] = settings.fields_sha256.hex()
    if aggregate.size <= INLINE_AGGREGATE_MAX_VALUES:
        entry["aggregate_hex"] = aggregate.astype("<u4").tobytes().hex()
    else:
        name = (
            f"{audit_path.stem}-run-{transcript.run_id}"
            f"-round-{transcript.server_round}.npy"
        )
        np.save(audit_path.parent / name, aggregate, allow_pickle=False)
        entry["aggregate_path"] = name
    document["rounds"].append(entry)

    write_text_atomically(audit_path, json.dumps(document, sort_keys=True, indent=1))


def audit_file(audit_path: Path) -> list[RoundAudit]:
    """Audit every round of an audit file.

    A round fails if its transcript or aggregate is malformed, its audit
    fails, or its run and round appeared earlier in the file.

    Raises:
        ValueError: If the file is not JSON or not an audit file.
        OSError: If the file cannot be read.

    """
    document = _read_document(audit_path)
    audits = []
    seen: set[tuple[int, int]] = set()

    for index, entry in enumerate(document["rounds"]):
        try:
            transcript = RoundTranscript.from_dict(_entry_field(entry, "transcript"))
        except ValueError as error:
            reason = f"the transcript is malformed: {error}"
            audits.append(RoundAudit(f"entry {index}", AuditResult(False, reason)))
            continue
        label = f"run {transcript.run_id} round {transcript.server_round}"
        key = (transcript.run_id, transcript.server_round)
        try:
            _check_keys(f"round {transcript.server_round}", entry, _ENTRY_KEYS)
        except ValueError as error:
            result = AuditResult(False, str(error))
        else:
            if key in seen:
                result = AuditResult(False, "the round appears more than once")
            else:
                result = _audit_entry(audit_path.parent, entry, transcript)
            seen.add(key)
        audits.append(RoundAudit(label, result, *key))

    return audits


def missing_rounds(audits: Sequence[RoundAudit]) -> list[tuple[int, int, int]]:
    """Find the rounds of each run that the file lacks below the run's last round.

    Flower's ``Strategy.start`` numbers rounds from 1, so a file with rounds
    1 and 3 of a run lacks round 2. Entries with a malformed transcript
    count for no round, because their run and round are unknown.

    Returns:
        The run, first and last round of each range of consecutive missing
        rounds, sorted.

    """
    rounds_by_run: dict[int, set[int]] = {}
    for audit in audits:
        if audit.run_id is not None and audit.server_round is not None:
            rounds_by_run.setdefault(audit.run_id, set()).add(audit.server_round)

    missing = []
    for run_id in sorted(rounds_by_run):
        next_round = 1
        for server_round in sorted(rounds_by_run[run_id]):
            if server_round > next_round:
                missing.append((run_id, next_round, server_round - 1))
            next_round = max(next_round, server_round + 1)
    return missing


Model = dict[str, npt.NDArray[np.generic]]


def audit_models(
    audit_path: Path, initial_model: Model
) -> tuple[list[RoundAudit], Model | None]:
    """Follow the models of the run in an audit file, from its initial model.

    Rounds are taken in order. A round passes when the model its clients
    signed (the transcript's ``model_sha256``) is the model that the
    initial model and the earlier rounds give. The model after it is that
    model plus the mean of the round's aggregate, decoded with the entry's
    "decoding" (`next_model`). A round missing from the file released no
    model, and a discarded round released its model unchanged, so in both
    the model carries over. Once a round fails, every later one
    fails too, because the model is unknown.

    Returns:
        One result per round, labelled "run R round N model", and the model
        after the last round, or ``None`` if a round failed.

    Raises:
        ValueError: If the file is not an audit file, a transcript is
            malformed, a round appears twice, or the file contains
            rounds of more than one run.
        OSError: If the file cannot be read.

    """
    document = _read_document(audit_path)
    parsed: list[tuple[RoundTranscript, dict[str, Any]]] = []
    entries: dict[int, tuple[RoundTranscript, dict[str, Any]]] = {}
    for index, entry in enumerate(document["rounds"]):
        try:
            transcript = RoundTranscript.from_dict(_entry_field(entry, "transcript"))
            _check_keys(f"round {transcript.server_round}", entry, _ENTRY_KEYS)
        except ValueError as error:
            raise ValueError(f"entry {index} is malformed: {error}") from None
        parsed.append((transcript, entry))
    runs = sorted({transcript.run_id for transcript, _ in parsed})
    if len(runs) > 1:
        raise ValueError(
            f"following models needs the rounds of one run. Found runs {runs}."
        )
    for transcript, entry in parsed:
        if transcript.server_round in entries:
            raise ValueError(f"round {transcript.server_round} appears more than once.")
        entries[transcript.server_round] = (transcript, entry)

    model: Model | None = dict(initial_model)
    audits = []
    for server_round in sorted(entries):
        transcript, entry = entries[server_round]
        label = f"run {transcript.run_id} round {server_round} model"
        result, model = _follow_model(audit_path.parent, entry, transcript, model)
        audits.append(RoundAudit(label, result))
    return audits, model


def _follow_model(
    folder: Path,
    entry: dict[str, Any],
    transcript: RoundTranscript,
    model: Model | None,
) -> tuple[AuditResult, Model | None]:
    if model is None:
        return AuditResult(False, "the model is unknown after an earlier failure"), None
    if model_digest(model) != transcript.model_sha256:
        return (
            AuditResult(
                False,
                "the clients signed another model than the initial model and the "
                "earlier rounds give",
            ),
            None,
        )

    try:
        settings = _signed_settings(entry, transcript)
    except ValueError as error:
        return AuditResult(False, str(error)), None

    if missing_commitments(transcript):
        # The round's update was discarded, so the model carries over.
        return AuditResult(True, ""), model
    decoding = settings.decoding
    try:
        following = next_model(
            model,
            _load_aggregate(folder, entry),
            params=decoding.params,
            layout=decoding.layout,
            num_included=len(transcript.included_node_ids),
        )
    except (OSError, ValueError) as error:
        return (
            AuditResult(
                False, f"the model after this round cannot be computed: {error}"
            ),
            None,
        )
    return AuditResult(True, ""), following


_SETTINGS_KEYS = ("decoding", "config_sha256", "fields_sha256")


def _signed_settings(
    entry: dict[str, Any], transcript: RoundTranscript
) -> RoundSettings:
    """Return the entry's settings, checked against the digest the clients signed.

    Raises:
        ValueError: If the settings are malformed or have another digest.
    """
    try:
        settings = _entry_settings(entry)
    except ValueError as error:
        raise ValueError(f"the round's settings are malformed: {error}") from None
    if settings.digest() != transcript.settings_sha256:
        raise ValueError(
            "the round's recorded settings are not the ones its clients signed"
        )
    return settings


def _entry_settings(entry: dict[str, Any]) -> RoundSettings:
    digests = {}
    for name in ("config_sha256", "fields_sha256"):
        text = _entry_field(entry, name, str)
        if not is_lower_hex(text) or len(text) != 2 * DIGEST_SIZE:
            raise ValueError(
                f"{name} must be {2 * DIGEST_SIZE} lowercase hex digits. "
                f"Found {text[:80]!r}."
            )
        digests[name] = bytes.fromhex(text)
    return RoundSettings(
        config_sha256=digests["config_sha256"],
        fields_sha256=digests["fields_sha256"],
        decoding=ModelDecoding.from_dict(_entry_field(entry, "decoding")),
    )


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
        ValueError: If the file cannot be read, is not a regular file, is
            larger than `max_bytes` once decompressed, or is not an .npz
            file of .npy arrays with fixed byte representations.

    """
    quoted_path = repr(str(path))
    _check_regular_file(path, description="the model")
    try:
        with path.open("rb") as file:
            start = file.read(len(np.lib.format.MAGIC_PREFIX))
    except OSError as error:
        raise ValueError(
            f"cannot read the model {quoted_path}: {_os_reason(error)}."
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
    if not all(_is_count(dimension) for dimension in shape):
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
        header = _read_npy_header(file)
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


def _read_npy_header(file: IO[bytes]) -> tuple[tuple[Any, ...], np.dtype[Any]] | str:
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


def _check_regular_file(path: Path, *, description: str) -> None:
    # A FIFO would block the read, and a device such as /dev/zero never ends.
    try:
        mode = path.stat().st_mode
    except (OSError, RuntimeError) as error:
        raise ValueError(
            f"cannot read {description} {str(path)!r}: {_os_reason(error)}."
        ) from error
    if not stat.S_ISREG(mode):
        raise ValueError(f"{description} must be a regular file. Found {str(path)!r}.")


def _os_reason(error: Exception) -> str:
    # The OS's text without the errno and the path, which the message names.
    return getattr(error, "strerror", None) or str(error)


def _check_archive_size(
    quoted_path: str, members: list[zipfile.ZipInfo], max_bytes: int
) -> None:
    # The sizes come from the zip directory, so a small archive that would
    # decompress to gigabytes is rejected before it is decompressed. zipfile
    # stops reading a member at its size in the directory, so no member
    # decompresses to more than the total checked here.
    total = sum(member.file_size for member in members)
    if total > max_bytes:
        raise ValueError(
            f"the model {quoted_path} must take at most {max_bytes} bytes "
            "decompressed: 8 bytes per value of the run's longest aggregate and "
            f"{MODEL_SLACK_BYTES} more. Its members take {total}."
        )


def model_byte_limit(audit_path: Path) -> int:
    """Return the maximum bytes a model of the run in `audit_path` may take.

    The bound is 8 bytes per value of the longest aggregate that is stored
    with the file and has the length its transcript states, plus
    `MODEL_SLACK_BYTES`. A length that only a transcript states does not
    count, since the audit file is untrusted.

    Raises:
        ValueError: If the file is not an audit file.
        OSError: If it cannot be read.
    """
    document = _read_document(audit_path)
    longest = 0
    for entry in document["rounds"]:
        try:
            transcript = RoundTranscript.from_dict(_entry_field(entry, "transcript"))
            stored = _load_aggregate(audit_path.parent, entry).size
        except (OSError, ValueError):
            continue
        if stored == transcript.aggregate_length:
            longest = max(longest, stored)
    return 8 * longest + MODEL_SLACK_BYTES


def main(argv: Sequence[str] | None = None) -> int:
    """Run the audit command and return its exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsec_flwr.audit",
        description="Verify every round of a fedsec_flwr audit file.",
    )
    parser.add_argument("audit_file", type=Path, help="path of the audit JSON file")
    parser.add_argument(
        "--initial-model",
        type=Path,
        help=".npz file of the run's initial model: also follow the run's models",
    )
    parser.add_argument(
        "--final-model",
        type=Path,
        help=".npz file that must equal the model after the last round "
        "(needs --initial-model)",
    )
    arguments = parser.parse_args(argv)
    if arguments.final_model is not None and arguments.initial_model is None:
        parser.error("--final-model needs --initial-model.")

    try:
        audits = audit_file(arguments.audit_file)
    except (OSError, ValueError, MemoryError) as error:
        _say(
            f"error: cannot audit {arguments.audit_file}: {_reason(error)}",
            error=True,
        )
        return EXIT_FAILED

    for audit in audits:
        if audit.result.verified:
            _say(f"{audit.label}: verified")
        elif audit.result.discarded:
            _say(f"{audit.label}: discarded: {audit.result.reason}")
        else:
            _say(f"{audit.label}: FAILED: {audit.result.reason}")

    _print_missing_rounds(audits, following_models=arguments.initial_model is not None)

    if not audits:
        _say("error: the audit file contains no round", error=True)
        return EXIT_FAILED
    failed = sum(
        not (audit.result.verified or audit.result.discarded) for audit in audits
    )
    discarded = sum(audit.result.discarded for audit in audits)
    summary = (
        f"{len(audits) - failed - discarded} of {len(audits)} rounds verified, "
        f"{discarded} discarded"
    )
    missing = sum(last - first + 1 for _, first, last in missing_rounds(audits))
    if missing:
        summary += f", {missing} missing from the file"
    _say(summary)
    if discarded and arguments.final_model is None:
        _say(
            "note: a discarded round is the server's account, because a server "
            "that deletes commitments from a transcript makes any round look "
            "discarded. Pass --initial-model and --final-model to check that no "
            "discarded aggregate reached a released model."
        )
    if arguments.initial_model is not None:
        failed_labels = {
            audit.label
            for audit in audits
            if not (audit.result.verified or audit.result.discarded)
        }
        failed += _print_models(
            arguments.audit_file,
            arguments.initial_model,
            arguments.final_model,
            failed_labels=failed_labels,
        )
    return EXIT_FAILED if failed else EXIT_VERIFIED


def _print_missing_rounds(
    audits: Sequence[RoundAudit], *, following_models: bool
) -> None:
    # A round aborted before its commit stage leaves no entry and no model,
    # so a missing round does not fail the audit. Only the model chain shows
    # whether a later round trained on a model from it.
    if following_models:
        check = (
            "The model checks below fail if a later round trained on a model from it."
        )
    else:
        check = (
            "Pass --initial-model to check that no later round trained on a "
            "model from it."
        )
    for run_id, first, last in missing_rounds(audits):
        rounds = f"round {first}" if first == last else f"rounds {first} to {last}"
        _say(
            f"run {run_id} {rounds}: no well-formed transcript in the file, so "
            f"nothing to check. {check}"
        )


def _print_models(
    audit_path: Path,
    initial_path: Path,
    final_path: Path | None,
    *,
    failed_labels: set[str],
) -> int:
    """Print the model audit and return the number of failures.

    ``failed_labels`` names the rounds that failed their own audit. Their
    models are marked, because a model that follows from a failed round is
    no more trustworthy than the round.
    """
    try:
        limit = model_byte_limit(audit_path)
        initial = load_model(initial_path, max_bytes=limit)
        audits, last = audit_models(audit_path, initial)
        final = None
        if final_path is not None:
            final = load_model(final_path, max_bytes=limit)
    except (OSError, ValueError, MemoryError) as error:
        _say(f"error: cannot follow the models: {_reason(error)}", error=True)
        return 1

    for audit in audits:
        round_label = audit.label.removesuffix(" model")
        if audit.result.verified and round_label in failed_labels:
            _say(
                f"{audit.label}: follows from the earlier rounds, but {round_label} "
                "FAILED its audit above"
            )
        elif audit.result.verified:
            _say(f"{audit.label}: follows from the earlier rounds")
        else:
            _say(f"{audit.label}: FAILED: {audit.result.reason}")
    failed = sum(not audit.result.verified for audit in audits)
    if final is None:
        return failed
    if last is not None and model_digest(final) == model_digest(last):
        _say("final model: follows from the last round")
        return failed
    _say("final model: FAILED: it is not the model after the last round")
    return failed + 1


def _reason(error: Exception) -> str:
    # A MemoryError usually has no message of its own.
    if isinstance(error, MemoryError):
        return "not enough memory to parse the audit file or a model"
    return str(error)


def _say(text: str, *, error: bool = False) -> None:
    """Print one line, with every character that could fake a line escaped.

    Reasons quote file names and values from the untrusted audit file, so a
    newline or a terminal control sequence in them must not reach the
    terminal as such. Non-ASCII characters are escaped too, so the line
    prints whatever encoding the output stream has.
    """
    line = _printable(text)
    if len(line) > MAX_LINE_CHARACTERS:
        quoted_path = MAX_LINE_CHARACTERS - LINE_CUT_SUFFIX_CHARACTERS
        line = f"{line[:quoted_path]}... ({len(line) - quoted_path} more characters)"
    print(line, file=sys.stderr if error else sys.stdout)


def _printable(text: str) -> str:
    return "".join(
        character
        if character.isascii() and character.isprintable()
        else character.encode("unicode_escape").decode("ascii")
        for character in text
    )


def _audit_entry(
    folder: Path, entry: dict[str, Any], transcript: RoundTranscript
) -> AuditResult:
    try:
        aggregate = _load_aggregate(folder, entry)
    except (OSError, ValueError) as error:
        return AuditResult(False, f"the aggregate cannot be loaded: {error}")

    result = audit_round(transcript, aggregate)
    if not result.verified or not any(key in entry for key in _SETTINGS_KEYS):
        return result
    # The settings serve only to follow the models, but recorded settings
    # that the clients did not sign are a tampered entry all the same.
    try:
        _signed_settings(entry, transcript)
    except ValueError as error:
        return AuditResult(False, str(error))
    return result


def _load_aggregate(folder: Path, entry: dict[str, Any]) -> npt.NDArray[np.uint32]:
    has_path = "aggregate_path" in entry
    if has_path == ("aggregate_hex" in entry):
        raise ValueError(
            "a round must have exactly one of aggregate_path and aggregate_hex"
        )

    if not has_path:
        return _parse_inline_aggregate(_entry_field(entry, "aggregate_hex", str))

    relative = _entry_field(entry, "aggregate_path", str)
    return _load_uint32_npy(_resolve_inside(folder, relative), relative)


def _parse_inline_aggregate(text: str) -> npt.NDArray[np.uint32]:
    max_digits = 8 * INLINE_AGGREGATE_MAX_VALUES
    if len(text) > max_digits:
        raise ValueError(
            f"aggregate_hex must encode at most {INLINE_AGGREGATE_MAX_VALUES} "
            f"values ({max_digits} hex digits). Found {len(text)} digits; store "
            "a longer aggregate in an .npy file."
        )
    if len(text) % 8 or not is_lower_hex(text):
        raise ValueError(
            "aggregate_hex must be lowercase hex of whole uint32 values, 8 digits "
            f"each. Found {text[:80]!r}."
        )
    return np.frombuffer(bytes.fromhex(text), dtype="<u4").astype(np.uint32)


def _load_uint32_npy(path: Path, relative: str) -> npt.NDArray[np.uint32]:
    """Load the .npy aggregate at `path`, which the entry names `relative`.

    The file is untrusted: its header is checked against its size before
    the values are mapped, so a truncated or hostile file gets a ValueError
    that names it, by `relative` as the audit file spells it, instead of an
    error from deep inside numpy.
    """
    quoted_path = repr(relative[:200])
    if path.exists() and not path.is_file():
        raise ValueError(
            f"aggregate_path must name a regular file. Found {quoted_path}, which "
            "is not one."
        )
    try:
        with path.open("rb") as file:
            header = _read_npy_header(file)
            offset = file.tell()
            file_size = os.fstat(file.fileno()).st_size
    except OSError as error:
        raise ValueError(
            f"cannot read aggregate_path {quoted_path}: {_os_reason(error)}."
        ) from error
    if isinstance(header, str):
        raise ValueError(
            f"aggregate_path must name an .npy file. Found {quoted_path}, {header}."
        )

    shape, dtype = header
    if dtype != np.dtype("<u4") or len(shape) != 1 or not _is_count(shape[0]):
        raise ValueError(
            "aggregate_path must contain a one-dimensional little-endian uint32 "
            f"array. Found dtype {dtype} and shape {shape} in {quoted_path}."
        )
    length = shape[0]
    if file_size != offset + 4 * length:
        raise ValueError(
            f"aggregate_path must contain {length} uint32 values after its header, "
            f"as the header says. Found {file_size - offset} bytes in {quoted_path}."
        )
    if length == 0:
        return np.zeros(0, dtype=np.uint32)

    aggregate: npt.NDArray[np.uint32] = np.memmap(
        path, dtype="<u4", mode="r", offset=offset, shape=(length,)
    )
    return aggregate


def _is_count(value: object) -> bool:
    # numpy's header parser accepts any literal in the shape, True included.
    return type(value) is int and value >= 0


def _resolve_inside(folder: Path, relative: str) -> Path:
    # The audit file is untrusted, so its paths must stay inside its folder.
    candidate = Path(relative)
    try:
        resolved = (folder / candidate).resolve()
    except (OSError, RuntimeError, ValueError) as error:
        # Python 3.11 raises RuntimeError for a symlink loop, and ValueError
        # for a NUL character.
        raise ValueError(
            f"aggregate_path {relative[:200]!r} cannot be resolved: {error}"
        ) from error
    if resolved == folder.resolve():
        raise ValueError(
            f"aggregate_path must name a file in the audit file's folder, not the "
            f"folder itself. Found {relative[:200]!r}."
        )
    if candidate.is_absolute() or not resolved.is_relative_to(folder.resolve()):
        raise ValueError(
            "aggregate_path must be relative and inside the audit file's folder "
            f"{str(folder.resolve())!r}. Found {relative[:200]!r}."
        )
    return resolved


def _read_document(audit_path: Path) -> dict[str, Any]:
    _check_regular_file(audit_path, description="the audit file")
    with audit_path.open("rb") as file:
        # The size comes first: read(n) reserves n bytes before it reads.
        size = os.fstat(file.fileno()).st_size
        if size > MAX_AUDIT_FILE_BYTES:
            raise ValueError(
                f"the audit file must take at most {MAX_AUDIT_FILE_BYTES} bytes. "
                f"Found {size} in {audit_path.name!r}."
            )
        data = file.read(size)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"the audit file must be UTF-8 text: {error}") from None
    document = parse_untrusted_json(text)
    if not isinstance(document, dict) or document.get("format") != AUDIT_FORMAT:
        raise ValueError(
            f"the file must be a JSON object with format {AUDIT_FORMAT!r}."
        )
    if not isinstance(document.get("rounds"), list):
        raise ValueError("rounds must be a JSON list.")
    _check_keys("the file", document, _DOCUMENT_KEYS)
    return document


def _check_keys(where: str, fields: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(
            f"{where} must have only the keys {', '.join(sorted(allowed))}. "
            f"Found {', '.join(repr(key[:80]) for key in unknown[:5])}."
        )


def _new_document() -> dict[str, Any]:
    return {"format": AUDIT_FORMAT, "rounds": []}


def _entry_field(entry: object, key: str, kind: type = dict) -> Any:
    if not isinstance(entry, dict):
        raise ValueError(
            f"a round must be a JSON object. Found {json_type_name(entry)}."
        )
    value = entry.get(key)
    if not isinstance(value, kind):
        raise ValueError(
            f"{key} must be a JSON {kind.__name__}. Found {json_type_name(value)}."
        )
    return value


if __name__ == "__main__":
    sys.exit(main())
