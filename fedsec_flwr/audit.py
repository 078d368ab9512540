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
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from .files import (
    open_regular_file,
    os_reason,
    write_atomically,
    write_text_atomically,
)
from .model_files import (
    Model,
    ModelTooLargeError,
    is_count,
    load_model,
    read_npy_header,
)
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

MAX_AUDIT_JSON_VALUES = 2**26
"""Largest count of JSON values that the auditor parses, as counted by
`json_value_count`. Parsing keeps up to about 64 bytes per counted value in
memory: 21 times the text for a list of empty lists. So this bound keeps a
hostile file near 4.3 GB, where the size bound alone allowed about 20 GB.
An audit file written by `append_round` had about 30 bytes per counted
value, so a 1 GiB one has about 36 million."""

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
    document = _appendable_document(audit_path)

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
        write_atomically(
            audit_path.parent / name,
            lambda stream: np.save(stream, aggregate, allow_pickle=False),
        )
        entry["aggregate_path"] = name
    document["rounds"].append(entry)

    write_text_atomically(audit_path, json.dumps(document, sort_keys=True, indent=1))


def check_appendable(audit_path: Path) -> None:
    """Check that rounds can be appended to `audit_path`.

    Raises:
        ValueError: If a file is there that is not an audit file, or cannot be
            read. The message names the path.

    """
    _appendable_document(audit_path)


def _appendable_document(audit_path: Path) -> dict[str, Any]:
    if not os.path.lexists(audit_path):
        return _new_document()
    try:
        return _read_document(audit_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Rounds cannot be added to the audit file {str(audit_path)!r}: "
            f"{error} Move the file away or write the audit elsewhere."
        ) from error


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
            _load_aggregate(folder, entry, length=transcript.aggregate_length),
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
            stored = _load_aggregate(
                audit_path.parent, entry, length=transcript.aggregate_length
            ).size
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
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds the run completed (the rounds listed in its results.json): each "
        "of rounds 1 to N must have a well-formed entry, and no entry may "
        "come later",
    )
    arguments = parser.parse_args(argv)
    if arguments.final_model is not None and arguments.initial_model is None:
        parser.error("--final-model needs --initial-model.")
    if arguments.rounds is not None and arguments.rounds < 1:
        parser.error(f"--rounds must be at least 1. Found {arguments.rounds}.")

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
    if arguments.rounds is not None:
        failed += _print_unexpected_rounds(audits, arguments.rounds)
    discarded = sum(audit.result.discarded for audit in audits)
    # The counts are of entries, one per line above. A round without a
    # well-formed entry is counted apart, so no round is counted twice.
    summary = (
        f"{len(audits) - failed - discarded} of {len(audits)} entries verified, "
        f"{discarded} discarded"
    )
    missing = sum(last - first + 1 for _, first, last in missing_rounds(audits))
    if missing:
        summary += f"; {missing} earlier round(s) with no well-formed entry"
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


def _print_unexpected_rounds(audits: Sequence[RoundAudit], num_rounds: int) -> int:
    """Report rounds that a run of ``num_rounds`` rounds cannot lack or have.

    A completed run has one entry for each of its rounds, so a file that ends
    early, or a round with no well-formed entry, fails. Returns the number of
    failures.
    """
    rounds_by_run: dict[int, set[int]] = {}
    for audit in audits:
        if audit.run_id is not None and audit.server_round is not None:
            rounds_by_run.setdefault(audit.run_id, set()).add(audit.server_round)
    if not rounds_by_run:
        _say(
            "FAILED: no well-formed entry, and --rounds "
            f"{num_rounds} expects one per round"
        )
        return 1

    failures = 0
    for run_id in sorted(rounds_by_run):
        present = rounds_by_run[run_id]
        lacking = sorted(set(range(1, num_rounds + 1)) - present)
        beyond = sorted(
            server_round for server_round in present if server_round > num_rounds
        )
        if lacking:
            failures += 1
            _say(
                f"run {run_id}: FAILED: no well-formed entry for round(s) "
                f"{_round_list(lacking)} of the {num_rounds} that --rounds expects"
            )
        if beyond:
            failures += 1
            _say(
                f"run {run_id}: FAILED: entries for round(s) {_round_list(beyond)}, "
                f"after the {num_rounds} that --rounds expects"
            )
    return failures


def _round_list(rounds: Sequence[int]) -> str:
    listed = ", ".join(str(server_round) for server_round in rounds[:10])
    return listed if len(rounds) <= 10 else f"{listed} and {len(rounds) - 10} more"


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
        initial = _load_run_model(initial_path, limit)
        audits, last = audit_models(audit_path, initial)
        final = None
        if final_path is not None:
            final = _load_run_model(final_path, limit)
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


def _load_run_model(path: Path, max_bytes: int) -> Model:
    try:
        return load_model(path, max_bytes=max_bytes)
    except ModelTooLargeError as error:
        raise ValueError(
            f"{error} The limit is 8 bytes per value of the run's longest "
            f"aggregate and {MODEL_SLACK_BYTES} more."
        ) from None


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
        aggregate = _load_aggregate(folder, entry, length=transcript.aggregate_length)
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


def _load_aggregate(
    folder: Path, entry: dict[str, Any], *, length: int
) -> npt.NDArray[np.uint32]:
    """Load a round's aggregate, whose length in the transcript is `length`.

    An inline aggregate of another length is returned, and the audit fails
    it. A file's length is checked from its header, before it is mapped.
    """
    has_path = "aggregate_path" in entry
    if has_path == ("aggregate_hex" in entry):
        raise ValueError(
            "a round must have exactly one of aggregate_path and aggregate_hex"
        )

    if not has_path:
        return _parse_inline_aggregate(_entry_field(entry, "aggregate_hex", str))

    relative = _entry_field(entry, "aggregate_path", str)
    return _load_uint32_npy(_resolve_inside(folder, relative), relative, length=length)


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


def _load_uint32_npy(
    path: Path, relative: str, *, length: int
) -> npt.NDArray[np.uint32]:
    """Load the .npy aggregate at `path`, which the entry names `relative`.

    The file is untrusted, so its header is checked against its size before
    the values are mapped. A truncated or hostile file gets a ValueError
    instead of an error from deep inside numpy. Messages name the file by
    `relative`, as the audit file gives it.
    """
    quoted_path = repr(relative[:200])
    with open_regular_file(
        path, description="aggregate_path", name=quoted_path
    ) as file:
        try:
            header = read_npy_header(file)
            offset = file.tell()
            file_size = os.fstat(file.fileno()).st_size
        except OSError as error:
            raise ValueError(
                f"cannot read aggregate_path {quoted_path}: {os_reason(error)}."
            ) from error
        if isinstance(header, str):
            raise ValueError(
                f"aggregate_path must name an .npy file. Found {quoted_path}, {header}."
            )

        shape, dtype = header
        if dtype != np.dtype("<u4") or len(shape) != 1 or not is_count(shape[0]):
            raise ValueError(
                "aggregate_path must contain a one-dimensional little-endian uint32 "
                f"array. Found dtype {dtype} and shape {shape} in {quoted_path}."
            )
        if shape[0] != length:
            # Mapping a large sparse file costs address space, so a file of the
            # wrong length is rejected from its header alone.
            raise ValueError(
                f"the aggregate has {shape[0]} values, not the {length} of the "
                f"transcript. Found in {quoted_path}."
            )
        if file_size != offset + 4 * length:
            raise ValueError(
                f"aggregate_path must contain {length} uint32 values after its "
                f"header, as the header says. Found {file_size - offset} bytes in "
                f"{quoted_path}."
            )
        if length == 0:
            return np.zeros(0, dtype=np.uint32)

        # Mapping the open file maps the file that was checked, and the
        # mapping outlives the file object.
        aggregate: npt.NDArray[np.uint32] = np.memmap(
            file, dtype="<u4", mode="r", offset=offset, shape=(length,)
        )
    return aggregate


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
    with open_regular_file(
        audit_path, description="the audit file", name=repr(str(audit_path))
    ) as file:
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
    del data
    values = json_value_count(text)
    if values > MAX_AUDIT_JSON_VALUES:
        raise ValueError(
            f"the audit file must hold at most {MAX_AUDIT_JSON_VALUES} JSON values, "
            "because parsing keeps up to 64 bytes per value in memory. Found "
            f"{values} in {audit_path.name!r}, counted as its commas, colons and "
            "opening brackets."
        )
    document = parse_untrusted_json(text)
    if not isinstance(document, dict) or document.get("format") != AUDIT_FORMAT:
        raise ValueError(
            f"the file must be a JSON object with format {AUDIT_FORMAT!r}."
        )
    if not isinstance(document.get("rounds"), list):
        raise ValueError("rounds must be a JSON list.")
    _check_keys("the file", document, _DOCUMENT_KEYS)
    return document


def json_value_count(text: str) -> int:
    """Return an upper bound on the number of values in the JSON `text`.

    Every value but the outermost follows a comma, a colon or an opening
    bracket, so their count plus one bounds the values. Those characters
    inside strings are counted too, which only raises the bound.
    """
    separators = sum(text.count(character) for character in ",:[{")
    return separators + 1


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


def run_command() -> int:
    """Run `main`, ending quietly when the reader of the output goes away.

    ``python -m fedsec_flwr.audit FILE | head -1`` closes the pipe before
    the last lines are written. The verdict is then not fully delivered, so
    the status is `EXIT_FAILED`, without a traceback.
    """
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so that the flush at exit fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(run_command())
