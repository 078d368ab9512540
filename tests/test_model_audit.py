"""The auditor follows a run's models from its initial model.

Each test runs rounds through `SecureFedAvg`, the client mods and the
loopback Grid with an audit file, then audits the file with the initial
model: in every mode, for an honest server and for one that changes the
model or the audit file.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsec_flwr import audit, model_files
from fedsec_flwr.mod import make_secure_aggregation_mod
from fedsec_flwr.models import ModelDecoding, model_digest, next_model
from fedsec_flwr.verification import FailurePolicy
from tests.loopback import LoopbackGrid
from tests.test_model_binding import MODES, Mode, one_ulp_up, run
from tests.test_secure_strategy import NODE_IDS, initial_model
from tests.test_verification_strategy import make_app

SETTINGS_NOT_SIGNED = (
    "the round's recorded settings are not the ones its clients signed"
)
SIGNED_OTHER_MODEL = (
    "the clients signed another model than the initial model and the earlier "
    "rounds give"
)


def honest_audit(tmp_path: Path, mode: Mode, rounds: int = 3) -> tuple[Path, dict]:
    path = tmp_path / "audit.json"
    grid = LoopbackGrid(make_app(secure=mode.secure), NODE_IDS)
    released = run(grid, mode, rounds=rounds, audit_path=path)
    return path, released


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.name)
def test_honest_models_followed(tmp_path: Path, mode: Mode) -> None:
    path, released = honest_audit(tmp_path, mode)

    audits, last = audit.audit_models(path, initial_model())

    assert [a.label for a in audits] == [f"run 42 round {r} model" for r in (1, 2, 3)]
    assert all(a.result.verified for a in audits), audits
    assert last is not None
    assert model_digest(last) == model_digest(released)


def test_tamper_model_after_round_caught(tmp_path: Path) -> None:
    # Clients that only report train on the changed model, so the run goes
    # on. The auditor finds that round 2's clients signed another model.
    path = tmp_path / "audit.json"
    mod = make_secure_aggregation_mod(on_verification_failure="report")
    grid = LoopbackGrid(make_app(mod=mod), NODE_IDS)
    run(
        grid,
        MODES[0],
        rewrite=one_ulp_up,
        on_failure=FailurePolicy.REPORT,
        audit_path=path,
    )

    audits, last = audit.audit_models(path, initial_model())

    assert audits[0].result.verified
    assert audits[1].result.reason == SIGNED_OTHER_MODEL
    assert audits[2].result.reason == "the model is unknown after an earlier failure"
    assert last is None


def edit_entry(path: Path, index: int, edit) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(path.read_text())
    edit(document["rounds"][index])
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("last", [False, True], ids=["first-round", "last-round"])
def test_tamper_decoding_in_file_caught(tmp_path: Path, last: bool) -> None:
    # A server that records another clip range than it used. The clients
    # signed the decoding with their settings, so even the last round, which
    # no later round checks, fails.
    path, _ = honest_audit(tmp_path, MODES[0])
    index = 2 if last else 0
    edit_entry(path, index, lambda entry: entry["decoding"].update(clip_range=1.5))

    audits, _ = audit.audit_models(path, initial_model())

    assert audits[index].result.reason == SETTINGS_NOT_SIGNED


def test_other_initial_model_fails_first_round(tmp_path: Path) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    other = initial_model()
    other["dense.bias"] = other["dense.bias"] + 1.0

    audits, last = audit.audit_models(path, other)

    assert audits[0].result.reason == SIGNED_OTHER_MODEL
    assert last is None


def test_two_runs_named_before_repeated_rounds(tmp_path: Path) -> None:
    # Two runs both have a round 1, and the cause to report is the second
    # run, not a repeated round.
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    document = json.loads(path.read_text())
    other_run = json.loads(json.dumps(document["rounds"][0]))
    other_run["transcript"]["run_id"] = "43"
    document["rounds"].append(other_run)
    path.write_text(json.dumps(document))

    with pytest.raises(ValueError, match=r"one run\. Found runs \[42, 43\]"):
        audit.audit_models(path, initial_model())


def test_non_object_round_type_named(tmp_path: Path) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    path.write_text(
        path.read_text().replace('"rounds": [', '"rounds": [' + "1" * 30 + ", ", 1)
    )

    with pytest.raises(ValueError, match=r"Found an integer of 30 digits"):
        audit.audit_models(path, initial_model())


def test_missing_round_carries_model_over(tmp_path: Path) -> None:
    # Dropping a round from the file is like a round that released no model:
    # the next round's clients then signed a model the auditor cannot reach.
    path, _ = honest_audit(tmp_path, MODES[0])
    document = json.loads(path.read_text())
    del document["rounds"][1]
    path.write_text(json.dumps(document))

    audits, _ = audit.audit_models(path, initial_model())

    assert [a.label for a in audits] == ["run 42 round 1 model", "run 42 round 3 model"]
    assert audits[0].result.verified
    assert audits[1].result.reason == SIGNED_OTHER_MODEL


def test_command_reports_missing_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = honest_audit(tmp_path, MODES[0])
    document = json.loads(path.read_text())
    del document["rounds"][1]
    path.write_text(json.dumps(document))
    initial = save_model(tmp_path / "initial.npz", initial_model())

    code = audit.main([str(path), "--initial-model", str(initial)])

    out = capsys.readouterr().out
    assert code == 1
    assert (
        "run 42 round 2: no well-formed transcript in the file, so nothing to "
        "check. The model checks below fail if a later round trained on a model from it.\n"
    ) in out
    assert f"run 42 round 3 model: FAILED: {SIGNED_OTHER_MODEL}" in out


MALFORMED = "the round's settings are malformed: "


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda e: e["decoding"].pop("offset"), MALFORMED + "decoding must have"),
        (lambda e: e["decoding"].update(extra=1), MALFORMED + "decoding must have"),
        (
            lambda e: e["decoding"].update(modulus="4294967296"),
            MALFORMED + "decoding modulus must be an int",
        ),
        (
            lambda e: e["decoding"].update(max_clients=True),
            MALFORMED + "decoding max_clients must be an int",
        ),
        (
            lambda e: e["decoding"].update(modulus=2**4000),
            MALFORMED + "decoding modulus is an integer of 1205 digits "
            "(1318204093...), above the largest accepted 4294967296.",
        ),
        (
            lambda e: e["decoding"].update(bit_slot=-(10**30)),
            MALFORMED + "decoding bit_slot is an integer of 31 digits "
            "(-1000000000...), below the smallest accepted -1.",
        ),
        (
            lambda e: e["decoding"].update(offset=10**30),
            MALFORMED + "decoding offset is an integer of 31 digits "
            "(1000000000...), longer than the 20 digits that an integer literal "
            "may have.",
        ),
        (
            lambda e: e["decoding"].update(clip_range=10**30),
            MALFORMED + "decoding clip_range is an integer of 31 digits",
        ),
        (
            lambda e: e["decoding"].update(clip_range=None),
            MALFORMED + "decoding clip_range must be a number",
        ),
        (
            lambda e: e["decoding"].update(offset=-1),
            MALFORMED + "decoding offset must be at least 0",
        ),
        (lambda e: e["decoding"].update(modulus=1000), "power of two"),
        (lambda e: e["decoding"].update(clip_range=1e308), "finite, nonzero grid"),
        (lambda e: e["decoding"].update(bit_slot=10**9), SETTINGS_NOT_SIGNED),
        (
            lambda e: e["decoding"].update(bit_slot=-(10**19)),
            MALFORMED + "decoding bit_slot must be -1 (no bit) or at least 0",
        ),
        (lambda e: e.update(config_sha256="AB" * 32), MALFORMED + "config_sha256"),
        (lambda e: e.update(fields_sha256="ab"), MALFORMED + "fields_sha256"),
        (lambda e: e.update(fields_sha256="00" * 32), SETTINGS_NOT_SIGNED),
    ],
)
def test_hostile_settings_fail_cleanly(tmp_path: Path, edit, reason: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = honest_audit(tmp_path, MODES[0], rounds=2)
    edit_entry(path, 0, edit)

    audits, last = audit.audit_models(path, initial_model())
    # Without the models, the round audit checks the recorded settings too.
    round_audit = audit.audit_file(path)[0].result

    assert reason in audits[0].result.reason
    assert last is None
    assert not round_audit.verified
    assert "the round's" in round_audit.reason
    assert "settings are" in round_audit.reason


def decoding_fields(**changes: object) -> dict[str, object]:
    """Return the fields of a plain round's decoding, with ``changes``."""
    fields: dict[str, object] = {
        "clip_range": 2.0,
        "quantization_levels": 2**12,
        "modulus": 2**32,
        "max_weight": 1000,
        "max_clients": 10,
        "noise_headroom": 0,
        "noisy_slots": 0,
        "bit_slot": -1,
        "offset": 0,
    }
    return {**fields, **changes}


def test_next_model_rejects_slots_outside_aggregate() -> None:
    decoding = ModelDecoding.from_dict(decoding_fields(noisy_slots=100))

    with pytest.raises(ValueError, match="must lie inside the aggregate"):
        next_model(
            {"w": np.zeros(4, dtype=np.float32)},
            np.zeros(6, dtype=np.uint32),
            params=decoding.params,
            layout=decoding.layout,
            num_included=1,
        )


def test_entry_without_decoding_fails(tmp_path: Path) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    edit_entry(path, 0, lambda entry: entry.pop("decoding"))

    audits, _ = audit.audit_models(path, initial_model())

    assert "decoding must be a JSON dict" in audits[0].result.reason


def test_decoding_round_trip() -> None:
    decoding = ModelDecoding.from_dict(decoding_fields())

    assert ModelDecoding.from_dict(decoding.to_dict()) == decoding
    assert decoding.layout.bit_slot is None


def save_model(path: Path, model: dict) -> Path:  # type: ignore[type-arg]
    np.savez(path, **model)
    return path


def test_command_follows_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, released = honest_audit(tmp_path, MODES[0], rounds=2)
    initial = save_model(tmp_path / "initial.npz", initial_model())
    final = save_model(tmp_path / "final.npz", released)

    code = audit.main(
        [str(path), "--initial-model", str(initial), "--final-model", str(final)]
    )

    out = capsys.readouterr().out
    assert code == 0, out
    assert "run 42 round 2 model: follows from the earlier rounds" in out
    assert "final model: follows from the last round" in out


def flip_first_signature(entry: dict) -> None:  # type: ignore[type-arg]
    signatures = entry["transcript"]["commitment_signatures"]
    node = next(iter(signatures))
    value = signatures[node]
    signatures[node] = ("0" if value[0] != "0" else "1") + value[1:]


def test_model_of_failed_round_marked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A forged signature fails round 2's audit, but not the model chain,
    # which the model section must not present as a clean pass.
    path, _ = honest_audit(tmp_path, MODES[0], rounds=2)
    edit_entry(path, 1, flip_first_signature)
    initial = save_model(tmp_path / "initial.npz", initial_model())

    code = audit.main([str(path), "--initial-model", str(initial)])

    out = capsys.readouterr().out
    assert code == 1
    assert "run 42 round 2: FAILED" in out
    assert (
        "run 42 round 2 model: follows from the earlier rounds, but run 42 round 2 "
        "FAILED its audit above"
    ) in out
    assert "run 42 round 1 model: follows from the earlier rounds\n" in out


def test_tamper_final_model_exits_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, released = honest_audit(tmp_path, MODES[0], rounds=2)
    initial = save_model(tmp_path / "initial.npz", initial_model())
    changed = {
        k: v.numpy()
        for k, v in one_ulp_up(
            ArrayRecord({k: Array(v) for k, v in released.items()})
        ).items()
    }
    final = save_model(tmp_path / "final.npz", changed)

    code = audit.main(
        [str(path), "--initial-model", str(initial), "--final-model", str(final)]
    )

    out = capsys.readouterr().out
    assert code == 1
    assert "final model: FAILED: it is not the model after the last round" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip", "Found a file that is not a zip archive"),
        (None, "Found a single .npy array"),
    ],
)
def test_hostile_model_file_rejected(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes | None,
    message: str,
) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    model = tmp_path / "model.npz"
    if content is None:
        np.save(model, np.zeros(3))
        model = tmp_path / "model.npz.npy"
    else:
        model.write_bytes(content)

    code = audit.main([str(path), "--initial-model", str(model)])

    assert code == 1
    assert message in capsys.readouterr().err


def test_hostile_model_decompression_bomb_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Zeros compress about a thousandfold, so the archive is small on disk
    # and would take far more than the run's models once loaded.
    monkeypatch.setattr(audit, "MODEL_SLACK_BYTES", 1024)
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    limit = audit.model_byte_limit(path)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, weights=np.zeros(100 * limit, dtype=np.uint8))
    assert bomb.stat().st_size < limit

    code = audit.main([str(path), "--initial-model", str(bomb)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"must take at most {limit} bytes decompressed" in err
    assert (
        "The limit is 8 bytes per value of the run's longest aggregate and 1024 more.\n"
    ) in err


def test_tamper_stated_length_does_not_raise_model_limit(tmp_path: Path) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    honest = audit.model_byte_limit(path)
    document = json.loads(path.read_text())
    document["rounds"].append({"transcript": {"aggregate_length": 300_000_000}})
    document["rounds"][0]["transcript"]["aggregate_length"] = 400_000_000
    path.write_text(json.dumps(document))

    assert audit.model_byte_limit(path) == audit.MODEL_SLACK_BYTES
    assert honest > audit.MODEL_SLACK_BYTES


def test_hostile_model_fifo_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)

    code = audit.main([str(path), "--initial-model", str(fifo)])

    assert code == 1
    assert "the model must name a regular file" in capsys.readouterr().err


def test_final_model_needs_initial_model(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        audit.main([str(tmp_path / "audit.json"), "--final-model", "x.npz"])


def corrupt_member(path: Path) -> None:
    """Flip bytes inside the compressed data of an .npz file's first member."""
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x03\x04") + 30 + 40
    data[start : start + 16] = bytes(16)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["initial", "final"])
def test_hostile_corrupt_model_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    path, released = honest_audit(tmp_path, MODES[0], rounds=1)
    initial = tmp_path / "initial.npz"
    np.savez_compressed(initial, **initial_model())
    final = tmp_path / "final.npz"
    np.savez_compressed(final, **released)
    corrupt_member(initial if which == "initial" else final)

    code = audit.main(
        [str(path), "--initial-model", str(initial), "--final-model", str(final)]
    )

    assert code == 1
    assert "is truncated or corrupt: member" in capsys.readouterr().err


def test_hostile_structured_final_model_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    initial = save_model(tmp_path / "initial.npz", initial_model())
    final = save_model(
        tmp_path / "final.npz", {"w": np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])}
    )

    code = audit.main(
        [str(path), "--initial-model", str(initial), "--final-model", str(final)]
    )

    assert code == 1
    assert "model_digest needs arrays" in capsys.readouterr().err


def test_hostile_raw_member_in_model_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # numpy returns a member that is not an .npy file as raw bytes.
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    initial = save_model(tmp_path / "initial.npz", initial_model())
    with zipfile.ZipFile(initial, "a") as archive:
        archive.writestr("tag", b"raw bytes")

    code = audit.main([str(path), "--initial-model", str(initial)])

    err = capsys.readouterr().err
    assert code == 1
    assert "must contain .npy arrays only. Found member 'tag', whose name" in err


def npy_bytes(array: np.ndarray) -> bytes:  # type: ignore[type-arg]
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def zip_bytes(
    members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED
) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # zipfile warns about a repeated member name, which one case needs.
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
            for name, content in members:
                archive.writestr(name, content)
    return buffer.getvalue()


def huge_header() -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    )
    return header.getvalue() + bytes(64)


def corrupt_deflate() -> bytes:
    data = bytearray(
        zip_bytes([("w.npy", npy_bytes(np.arange(1000.0)))], zipfile.ZIP_DEFLATED)
    )
    start = data.index(b"PK\x03\x04") + 30 + len("w.npy") + 40
    data[start : start + 16] = bytes(16)
    return bytes(data)


def overflowing_shape_header() -> bytes:
    # numpy multiplies the dimensions in int64 even when one is 0.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (0, 2**64)}
    )
    return header.getvalue()


def version_3_npy() -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.arange(3.0), version=(3, 0))
    return buffer.getvalue()


def object_array_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, w=np.array([1, "a", None], dtype=object))
    return buffer.getvalue()


def zip64_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """Build a stored zip archive that ends with ZIP64 end records.

    zipfile writes them only above 65,535 members or 2 GiB, unless its
    member-count threshold is lowered as here.
    """
    with mock.patch.object(zipfile, "ZIP_FILECOUNT_LIMIT", 0):
        data = zip_bytes(members)
    assert b"PK\x06\x06" in data
    return data


def zip64_end_records(entries: int, directory_size: int) -> bytes:
    """Build a file of ZIP64 end records alone, listing `entries` members."""
    record = struct.pack(
        "<4sQ2H2L4Q",
        b"PK\x06\x06",
        44,
        45,
        45,
        0,
        0,
        entries,
        entries,
        directory_size,
        0,
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1)
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 2**32 - 1, 2**32 - 1, 0
    )
    return record + locator + end


def with_listed_members(data: bytes, entries: int) -> bytes:
    """Change the member counts in a zip archive's end record to `entries`."""
    end = data.rindex(b"PK\x05\x06")
    counts = struct.pack("<2H", entries, entries)
    return data[: end + 8] + counts + data[end + 12 :]


def with_zip64_record_offset(data: bytes, offset: int) -> bytes:
    """Change the offset of the ZIP64 end record in its locator to `offset`."""
    locator = data.rindex(b"PK\x06\x07")
    return data[: locator + 8] + struct.pack("<Q", offset) + data[locator + 16 :]


def with_zip64_disks(data: bytes, disks: int) -> bytes:
    """Change the disk count in the ZIP64 locator to `disks`."""
    locator = data.rindex(b"PK\x06\x07")
    return data[: locator + 16] + struct.pack("<L", disks) + data[locator + 20 :]


def with_wide_extra_field(size: int) -> bytes:
    """Build a stored archive whose one member has an extra field of `size` bytes."""
    member = zipfile.ZipInfo("w.npy")
    # Records of an unassigned header ID with no data, as many as fit.
    member.extra = struct.pack("<HH", 0x9999, 0) * (size // 4)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(member, VALUES)
    return buffer.getvalue()


def with_invalid_utf8_name(data: bytes) -> bytes:
    """Set the UTF-8 flag of the first entry and make its name invalid UTF-8."""
    entry = data.index(b"PK\x01\x02")
    flags = struct.unpack_from("<H", data, entry + 8)[0] | 0x800
    name = entry + 46
    return (
        data[: entry + 8]
        + struct.pack("<H", flags)
        + data[entry + 10 : name]
        + b"\xff"
        + data[name + 1 :]
    )


def with_invalid_utf8_local_name(data: bytes) -> bytes:
    """Set the UTF-8 flag of the first local header and make its name invalid."""
    flags = struct.unpack_from("<H", data, 6)[0] | 0x800
    return data[:6] + struct.pack("<H", flags) + data[8:30] + b"\xff" + data[31:]


def with_extract_version(data: bytes, version: int) -> bytes:
    """Change the zip version needed to extract the first member to `version`."""
    entry = data.index(b"PK\x01\x02")
    return data[: entry + 6] + bytes([version]) + data[entry + 7 :]


VALUES = npy_bytes(np.arange(1000.0))
THREE_ARRAYS = [(f"w{i}.npy", npy_bytes(np.arange(3.0))) for i in range(3)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"format": "fedsec_flwr/audit/v1", "rounds": []}',
            "must be an .npz file of named arrays (numpy.savez). Found a file that "
            "is not a zip archive, or a truncated one.",
        ),
        (
            object_array_npz(),
            "must be an .npz file of plain numeric arrays. Found pickled Python "
            "objects in member 'w.npy', which the auditor never loads.",
        ),
        (
            VALUES,
            "must be an .npz file of named arrays (numpy.savez). Found a single "
            ".npy array.",
        ),
        (
            zip_bytes([("w.npy", VALUES)])[:200],
            "must be an .npz file of named arrays (numpy.savez). Found a file that "
            "is not a zip archive, or a truncated one.",
        ),
        (
            zip_bytes([("w.npy", VALUES[:-100])]),
            "is truncated or corrupt: member 'w.npy' must contain 8000 bytes of "
            "values, as its header declares. Found 7900.",
        ),
        (
            zip_bytes([("w.npy", huge_header())]),
            "is truncated or corrupt: member 'w.npy' must contain 8000000000000 "
            "bytes of values, as its header declares. Found 64.",
        ),
        (
            corrupt_deflate(),
            "is truncated or corrupt: member 'w.npy' cannot be decompressed.",
        ),
        (
            zip_bytes([("w.npy", b"not an array")]),
            "must contain .npy arrays only. Found member 'w.npy', which is not an "
            ".npy array.",
        ),
        (
            zip_bytes([("w.npy", VALUES), ("w.npy", VALUES)]),
            "must contain each array once. Found member 'w.npy' twice.",
        ),
        (
            zip_bytes([("w.npy", VALUES)], zipfile.ZIP_BZIP2),
            "must be written by numpy.savez or numpy.savez_compressed. Found member "
            "'w.npy' with zip compression method 12; only stored (0) and deflate "
            "(8) are read.",
        ),
        (
            zip_bytes([("w.npy", overflowing_shape_header())]),
            "must contain arrays whose dimensions multiply to less than 2**63. "
            "Found shape (0, 18446744073709551616) in member 'w.npy'.",
        ),
        (
            zip_bytes([("w.npy", version_3_npy())]),
            "must contain .npy arrays only. Found member 'w.npy', which has .npy "
            "format version 3.0; numpy.save and numpy.savez write 1.0 or 2.0, the "
            "versions that are read.",
        ),
        (
            zip_bytes([]),
            "must contain at least one array. Found a zip archive that contains "
            "no arrays.",
        ),
        (
            zip64_end_records(entries=1_000_000, directory_size=0),
            "must have at most 100000 members, one per array. Its zip end records "
            "list 1000000.",
        ),
        (
            zip64_end_records(entries=1, directory_size=10**9),
            "must have a zip central directory of at most 51200000 bytes. Its end "
            "records give 1000000000.",
        ),
        (
            with_listed_members(zip_bytes(THREE_ARRAYS), 1),
            "is truncated or corrupt: its zip central directory contains more "
            "than 1 entries, but its end records list 1.",
        ),
        (
            with_listed_members(zip_bytes(THREE_ARRAYS), 5),
            "is truncated or corrupt: its zip central directory contains 3 "
            "entries, but its end records list 5.",
        ),
        (
            b"prefix" + zip_bytes(THREE_ARRAYS),
            "is truncated or corrupt: its zip central directory must end at byte "
            "726, where the end records start. Found offset 564 and size 156.",
        ),
        (
            with_zip64_record_offset(zip64_bytes(THREE_ARRAYS), 0),
            "is truncated or corrupt: its ZIP64 end of central directory locator "
            "must point to a ZIP64 end record right before it, on disk 0 of 1. "
            "Found offset 0 on disk 0 of 1, where the record would be at 720.",
        ),
        (
            with_zip64_disks(zip64_bytes(THREE_ARRAYS), 2),
            "is truncated or corrupt: its ZIP64 end of central directory locator "
            "must point to a ZIP64 end record right before it, on disk 0 of 1. "
            "Found offset 720 on disk 0 of 2, where the record would be at 720.",
        ),
        (
            with_wide_extra_field(2048),
            "must have zip extra fields of at most 1024 bytes per member. Found "
            "one of 2048 bytes in entry 1.",
        ),
        (
            with_invalid_utf8_name(zip_bytes([("w.npy", VALUES)])),
            "must name its members in UTF-8, as its zip entries declare. Found a "
            "member name that is not valid UTF-8.",
        ),
        (
            with_invalid_utf8_local_name(zip_bytes([("w.npy", VALUES)])),
            "is truncated or corrupt: member 'w.npy' has a local header whose name "
            "is not valid UTF-8.",
        ),
        (
            with_extract_version(zip_bytes([("w.npy", VALUES)]), 147),
            "cannot be read: it needs a zip feature that Python's zipfile module "
            "does not support (zip file version 14.7).",
        ),
    ],
    ids=[
        "json",
        "object-array",
        "npy",
        "truncated-archive",
        "truncated-member",
        "huge-shape",
        "corrupt-member",
        "not-npy-member",
        "repeated-member",
        "bzip2-member",
        "overflowing-shape",
        "npy-version-3",
        "empty-archive",
        "zip64-million-members",
        "zip64-huge-directory",
        "more-members-than-listed",
        "fewer-members-than-listed",
        "data-before-archive",
        "zip64-record-elsewhere",
        "zip64-two-disks",
        "wide-extra-field",
        "invalid-utf8-name",
        "invalid-utf8-local-name",
        "zip-version-14.7",
    ],
)
def test_hostile_model_file_named_in_message(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "model.npz"
    path.write_bytes(content)

    with pytest.raises(ValueError) as raised:
        audit.load_model(path, max_bytes=2**30)

    assert str(raised.value) == f"the model {str(path)!r} {message}"


@pytest.mark.parametrize("zip64", [False, True], ids=["zip", "zip64"])
def test_model_member_limit_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip64: bool
) -> None:
    path = tmp_path / "model.npz"
    path.write_bytes(zip64_bytes(THREE_ARRAYS) if zip64 else zip_bytes(THREE_ARRAYS))
    monkeypatch.setattr(model_files, "MAX_MODEL_MEMBERS", 3)

    loaded = model_files.load_model(path)
    monkeypatch.setattr(model_files, "MAX_MODEL_MEMBERS", 2)
    with pytest.raises(ValueError) as raised:
        model_files.load_model(path)

    assert list(loaded) == ["w0", "w1", "w2"]
    assert str(raised.value) == (
        f"the model {str(path)!r} must have at most 2 members, one per array. Its "
        "zip end records list 3."
    )


def test_empty_model_file_rejected_when_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    empty = tmp_path / "initial.npz"
    np.savez(empty)

    code = audit.main([str(path), "--initial-model", str(empty)])

    captured = capsys.readouterr()
    assert code == 1
    assert (
        f"error: cannot follow the models: the model {str(empty)!r} must contain "
        "at least one array. Found a zip archive that contains no arrays.\n"
    ) in captured.err
    assert "signed another model" not in captured.out


def test_hostile_audit_file_as_model_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)

    code = audit.main([str(path), "--initial-model", str(path)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"the model {str(path)!r} must be an .npz file" in err
    assert "not a zip archive" in err
    assert "allow_pickle" not in err
    assert "pickle.load" not in err


def test_missing_model_named_by_full_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = honest_audit(tmp_path, MODES[0], rounds=1)
    absent = tmp_path / "absent" / "initial.npz"

    code = audit.main([str(path), "--initial-model", str(absent)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot read the model {str(absent)!r}: No such file or directory." in err
