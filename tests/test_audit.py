import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsec_flwr import audit
from fedsec_flwr.core import signatures as s
from fedsec_flwr.core.transcript import AuditResult
from fedsec_flwr.model_files import read_npy_header
from tests.core.test_transcript import NODE_IDS, RUN_ID, SimulatedRound, build_round

LONG = audit.INLINE_AGGREGATE_MAX_VALUES + 1


@pytest.fixture(scope="module")
def rounds() -> list[SimulatedRound]:
    keys = {node_id: s.generate_identity_key() for node_id in NODE_IDS}
    return [
        build_round(server_round=1, d=40, private_keys=keys, seed=1),
        build_round(server_round=2, d=LONG, private_keys=keys, seed=2),
    ]


@pytest.fixture
def audit_path(tmp_path, rounds) -> Path:
    path = tmp_path / "audit.json"
    for simulated in rounds:
        audit.append_round(path, simulated.transcript, simulated.aggregate)
    return path


def run_main(path: Path, capsys) -> tuple[int, str, str]:
    status = audit.main([str(path)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def rewrite(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def test_append_round_stores_short_aggregate_inline(audit_path):
    entry = json.loads(audit_path.read_text())["rounds"][0]

    assert "aggregate_hex" in entry
    assert "aggregate_path" not in entry


def test_append_round_stores_long_aggregate_beside_file(audit_path, rounds):
    entry = json.loads(audit_path.read_text())["rounds"][1]
    stored = np.load(audit_path.parent / entry["aggregate_path"])

    assert entry["aggregate_path"] == f"audit-run-{rounds[1].run_id}-round-2.npy"
    assert np.array_equal(stored, rounds[1].aggregate)


def test_append_round_rejects_other_aggregate(tmp_path, rounds):
    with pytest.raises(ValueError, match="aggregate must match"):
        audit.append_round(
            tmp_path / "audit.json", rounds[0].transcript, rounds[1].aggregate
        )


def test_append_round_leaves_no_temporary_file(audit_path):
    names = sorted(path.name for path in audit_path.parent.iterdir())

    assert names == ["audit-run-18446744073709551613-round-2.npy", "audit.json"]


@pytest.mark.parametrize(
    "content", [b'{"not": "an audit file"}', b"", b"\xff\xfe", b"[]"]
)
def test_stale_file_named_before_any_round(tmp_path, rounds, content):
    stale = tmp_path / "audit.json"
    stale.write_bytes(content)
    pattern = r"^Rounds cannot be added to the audit file '.*audit\.json': "

    with pytest.raises(ValueError, match=pattern):
        audit.check_appendable(stale)
    with pytest.raises(ValueError, match=pattern):
        audit.append_round(stale, rounds[0].transcript, rounds[0].aggregate)
    assert stale.read_bytes() == content


def test_dangling_link_is_not_appendable(tmp_path):
    link = tmp_path / "audit.json"
    link.symlink_to(tmp_path / "missing.json")

    with pytest.raises(ValueError, match=r"audit file '.*audit\.json'"):
        audit.check_appendable(link)


def test_audit_file_appendable(audit_path, tmp_path):
    audit.check_appendable(audit_path)
    audit.check_appendable(tmp_path / "new.json")


def test_long_aggregate_replaces_link_not_target(tmp_path, rounds):
    # A link planted where the .npy goes must not redirect the write.
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"keep")
    name = f"audit-run-{rounds[1].run_id}-round-2.npy"
    (tmp_path / name).symlink_to(target)

    audit.append_round(
        tmp_path / "audit.json", rounds[1].transcript, rounds[1].aggregate
    )

    assert target.read_bytes() == b"keep"
    assert not (tmp_path / name).is_symlink()
    assert np.array_equal(np.load(tmp_path / name), rounds[1].aggregate)


def test_audit_file_gets_the_umask_mode(tmp_path, rounds):
    # The transcript is public, so an auditor running as another user must
    # be able to read it, as it can read the .npy files beside it.
    previous = os.umask(0o022)
    try:
        path = tmp_path / "audit.json"
        audit.append_round(path, rounds[1].transcript, rounds[1].aggregate)
    finally:
        os.umask(previous)

    npy = next(tmp_path.glob("*.npy"))
    assert path.stat().st_mode & 0o777 == 0o644
    assert npy.stat().st_mode & 0o777 == 0o644


def test_honest_rounds_exit_zero(audit_path, capsys):
    status, out, err = run_main(audit_path, capsys)

    assert status == audit.EXIT_VERIFIED
    assert f"run {RUN_ID} round 1: verified" in out
    assert f"run {RUN_ID} round 2: verified" in out
    assert "2 of 2 entries verified, 0 discarded" in out
    assert err == ""


def test_expected_rounds_all_present(audit_path, capsys):
    assert audit.main([str(audit_path), "--rounds", "2"]) == audit.EXIT_VERIFIED
    assert "FAILED" not in capsys.readouterr().out


def test_tamper_last_round_removed_caught_by_rounds(audit_path, capsys):
    # Without --rounds a file that ends early looks complete.
    rewrite(audit_path, lambda document: document["rounds"].pop())

    assert run_main(audit_path, capsys)[0] == audit.EXIT_VERIFIED
    status = audit.main([str(audit_path), "--rounds", "2"])

    out = capsys.readouterr().out
    assert status == audit.EXIT_FAILED
    assert (
        f"run {RUN_ID}: FAILED: no well-formed entry for round(s) 2 of the 2 "
        "that --rounds expects"
    ) in out


def test_round_beyond_expected_fails(audit_path, capsys):
    status = audit.main([str(audit_path), "--rounds", "1"])

    assert status == audit.EXIT_FAILED
    assert "entries for round(s) 2, after the 1 that --rounds expects" in (
        capsys.readouterr().out
    )


def test_rounds_below_one_is_usage_error(audit_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        audit.main([str(audit_path), "--rounds", "0"])

    assert exit_info.value.code == 2
    assert "--rounds must be at least 1. Found 0." in capsys.readouterr().err


def test_command_runs_as_module(audit_path):
    completed = subprocess.run(
        [sys.executable, "-m", "fedsec_flwr.audit", str(audit_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0
    assert "2 of 2 entries verified, 0 discarded" in completed.stdout


def test_tamper_module_exits_one_on_changed_file(audit_path):
    npy = (
        audit_path.parent
        / json.loads(audit_path.read_text())["rounds"][1]["aggregate_path"]
    )
    aggregate = np.load(npy)
    aggregate[0] += 1
    np.save(npy, aggregate)

    completed = subprocess.run(
        [sys.executable, "-m", "fedsec_flwr.audit", str(audit_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 1
    assert "round 2: FAILED: the aggregate does not match" in completed.stdout


def test_tamper_inline_aggregate_changed(audit_path, capsys):
    def edit(document):
        entry = document["rounds"][0]
        entry["aggregate_hex"] = "ff" + entry["aggregate_hex"][2:]

    rewrite(audit_path, edit)
    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 1: FAILED: the aggregate does not match" in out
    assert "round 2: verified" in out
    assert "1 of 2 entries verified, 0 discarded" in out


def test_tamper_commitment_in_file_changed(audit_path, capsys):
    def edit(document):
        commitments = document["rounds"][1]["transcript"]["commitments"]
        node_id = next(iter(commitments))
        commitments[node_id] = "58" + "66" * 31

    rewrite(audit_path, edit)
    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 2: FAILED: a commitment signature is not valid" in out


def test_tamper_duplicate_round_fails(audit_path, capsys):
    rewrite(
        audit_path, lambda document: document["rounds"].append(document["rounds"][0])
    )

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 1: FAILED: the round appears more than once" in out


def test_tamper_malformed_transcript_reported_by_entry(audit_path, capsys):
    rewrite(
        audit_path,
        lambda document: document["rounds"][0]["transcript"].update(run_id="x"),
    )

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "entry 0: FAILED: the transcript is malformed: run_id" in out
    assert "round 2: verified" in out


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ({"aggregate_path": "../outside.npy"}, "must be relative and inside"),
        ({"aggregate_path": "/etc/passwd"}, "must be relative and inside"),
        ({"aggregate_path": "missing.npy"}, "No such file"),
        ({"aggregate_path": "."}, "not the folder itself. Found '.'"),
        ({"aggregate_path": ""}, "not the folder itself. Found ''"),
        ({"aggregate_path": "a\x00b.npy"}, "aggregate_path 'a\\x00b.npy' cannot be"),
        ({"aggregate_hex": "123"}, "lowercase hex of whole uint32 values"),
        ({"aggregate_hex": "0100000A"}, "lowercase hex of whole uint32 values"),
        ({"aggregate_hex": "01000000 "}, "lowercase hex of whole uint32 values"),
        ({"aggregate_hex": "00" * 4 * 1025}, "at most 1024 values"),
        ({"aggregate_hex": "010203"}, "whole uint32 values"),
        ({}, "exactly one of aggregate_path and aggregate_hex"),
    ],
)
def test_hostile_aggregate_location_rejected(audit_path, capsys, location, reason):
    def edit(document):
        entry = document["rounds"][0]
        entry.pop("aggregate_hex")
        entry.update(location)

    rewrite(audit_path, edit)
    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 1: FAILED: the aggregate cannot be loaded" in out
    assert reason in out


def test_hostile_aggregate_file_of_wrong_dtype(audit_path, capsys):
    entry = json.loads(audit_path.read_text())["rounds"][1]
    npy = audit_path.parent / entry["aggregate_path"]
    np.save(npy, np.load(npy).astype(np.int64))

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "one-dimensional little-endian uint32 array" in out


def npy_header(shape: str, descr: str = "<u4") -> bytes:
    """Build a version 1.0 .npy header for `shape`, padded to 64 bytes if it fits."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text = text.ljust(64 - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "must name an .npy file"),
        (b"\x93NUMPY\x01", "must name an .npy file"),
        (b"\x93NUMPY\x09\x00" + bytes(60), "must name an .npy file"),
        (
            b"\x93NUMPY\x01\x00\x36\x00{'descr': '<u4', 'shape': (2,) " + b" " * 30,
            "must name an .npy file",
        ),
        (npy_header("(1025,)") + bytes(8), "must contain 1025 uint32 values"),
        (npy_header("(-4,)"), "shape (-4,)"),
        (npy_header("(True,)") + bytes(4), "shape (True,)"),
        (npy_header("(2.0,)") + bytes(8), "whose .npy header is invalid"),
        (npy_header(f"({2**40},)"), f"has {2**40} values, not the 1025 of the"),
        (npy_header("(2,)", descr=">u4") + bytes(8), "little-endian uint32"),
        (npy_header("(2, 2)") + bytes(16), "one-dimensional"),
        (npy_header("(1025,)") + bytes(4104), "Found 4104 bytes"),
    ],
    ids=[
        "empty",
        "short-magic",
        "unknown-version",
        "unclosed-header",
        "truncated",
        "negative-length",
        "bool-length",
        "float-length",
        "huge-length",
        "big-endian",
        "two-dimensional",
        "extra-bytes",
    ],
)
def test_hostile_aggregate_file_rejected(audit_path, capsys, content, reason):
    entry = json.loads(audit_path.read_text())["rounds"][1]
    (audit_path.parent / entry["aggregate_path"]).write_bytes(content)

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 2: FAILED: the aggregate cannot be loaded" in out
    assert reason in out


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            npy_header("(2.0,)") + bytes(8),
            "aggregate_path must name an .npy file. Found 'sub/agg.npy', whose "
            ".npy header is invalid.",
        ),
        (
            b"\x93NUMPY\x09\x00" + bytes(60),
            "aggregate_path must name an .npy file. Found 'sub/agg.npy', which "
            "has .npy format version 9.0; numpy.save and numpy.savez write 1.0 "
            "or 2.0, the versions that are read.",
        ),
        (
            npy_header("(2, 2)") + bytes(16),
            "aggregate_path must contain a one-dimensional little-endian uint32 "
            "array. Found dtype uint32 and shape (2, 2) in 'sub/agg.npy'.",
        ),
        (
            npy_header("(1025,)") + bytes(4104),
            "aggregate_path must contain 1025 uint32 values after its header, as "
            "the header says. Found 4104 bytes in 'sub/agg.npy'.",
        ),
        (
            npy_header("(2,)") + bytes(8),
            "the aggregate has 2 values, not the 1025 of the transcript. Found in "
            "'sub/agg.npy'.",
        ),
        (
            None,
            "cannot read aggregate_path 'sub/agg.npy': No such file or directory.",
        ),
        (
            b"\x93NUMPY\x02\x00" + (2**32 - 16).to_bytes(4, "little") + b"{}",
            "aggregate_path must name an .npy file. Found 'sub/agg.npy', whose "
            ".npy header declares 4294967280 bytes; numpy reads at most 10000.",
        ),
    ],
    ids=[
        "invalid-header",
        "unknown-version",
        "two-dimensional",
        "extra-bytes",
        "wrong-length",
        "missing",
        "header-length-4-gib",
    ],
)
def test_hostile_aggregate_file_named_as_given(audit_path, capsys, content, reason):
    # The reason names the file by its aggregate_path, folder included, and
    # not by numpy's wording or the resolved absolute path.
    (audit_path.parent / "sub").mkdir()
    if content is not None:
        (audit_path.parent / "sub" / "agg.npy").write_bytes(content)

    def edit(document):
        document["rounds"][1]["aggregate_path"] = "sub/agg.npy"

    rewrite(audit_path, edit)
    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert f"round 2: FAILED: the aggregate cannot be loaded: {reason}\n" in out


class _ReadSizes(io.BytesIO):
    """BytesIO that records the size of every read request."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.sizes.append(-1 if size is None else size)
        return super().read(size)


def test_hostile_header_length_never_read_whole():
    # A 14-byte file that declares a 4 GiB header must not make the reader
    # request 4 GiB, which a real file allocates before it reads.
    file = _ReadSizes(b"\x93NUMPY\x02\x00" + (2**32 - 16).to_bytes(4, "little"))

    reason = read_npy_header(file)

    assert isinstance(reason, str)
    assert max(file.sizes) <= 10_000


def test_hostile_aggregate_path_too_long_named(audit_path, capsys):
    rewrite(audit_path, lambda d: d["rounds"][1].update(aggregate_path="x" * 300))

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert (
        f"the aggregate cannot be loaded: cannot read aggregate_path '{'x' * 200}': "
        "File name too long.\n"
    ) in out


def test_hostile_sparse_aggregate_not_mapped(audit_path, capsys, monkeypatch):
    # A sparse 4 GiB file that agrees with its own header but not with the
    # transcript is rejected from the header, without mapping 4 GiB.
    entry = json.loads(audit_path.read_text())["rounds"][1]
    npy = audit_path.parent / entry["aggregate_path"]
    header = npy_header(f"({2**30},)")
    with npy.open("wb") as file:
        file.write(header)
        file.truncate(len(header) + 4 * 2**30)

    def no_memmap(*args, **kwargs):
        raise AssertionError("the aggregate was memory-mapped")

    monkeypatch.setattr(audit.np, "memmap", no_memmap)

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert f"the aggregate has {2**30} values, not the 1025 of the transcript" in out


def test_hostile_aggregate_fifo_rejected(audit_path, capsys):
    entry = json.loads(audit_path.read_text())["rounds"][1]
    npy = audit_path.parent / entry["aggregate_path"]
    npy.unlink()
    os.mkfifo(npy)

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "must name a regular file" in out
    assert "round 1: verified" in out


def test_hostile_aggregate_symlink_loop_fails_only_its_round(audit_path, capsys):
    entry = json.loads(audit_path.read_text())["rounds"][1]
    npy = audit_path.parent / entry["aggregate_path"]
    npy.unlink()
    npy.symlink_to(npy.name)

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 2: FAILED: the aggregate cannot be loaded" in out
    assert "cannot be resolved" in out
    assert "round 1: verified" in out


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_hostile_special_audit_file_rejected(tmp_path, capsys, kind):
    path = tmp_path / "audit.json"
    if kind == "fifo":
        # Opening a FIFO for reading would wait for a writer forever.
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()

    status, _, err = run_main(path, capsys)

    assert status == audit.EXIT_FAILED
    assert "the audit file must name a regular file" in err


def test_reading_reserves_only_the_file_size(tmp_path, rounds, monkeypatch):
    # Reading up to the limit would reserve the limit's bytes first, which
    # failed the second verified round of a run under a memory limit.
    monkeypatch.setattr(audit, "MAX_AUDIT_FILE_BYTES", 2**50)
    path = tmp_path / "audit.json"

    for simulated in rounds:
        audit.append_round(path, simulated.transcript, simulated.aggregate)

    assert [a.result.verified for a in audit.audit_file(path)] == [True, True]


def test_hostile_audit_file_out_of_memory_reported(audit_path, capsys, monkeypatch):
    def exhausted(text):
        raise MemoryError

    monkeypatch.setattr(audit, "parse_untrusted_json", exhausted)

    status, _, err = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "not enough memory" in err


def test_hostile_audit_file_above_size_limit_rejected(audit_path, capsys, monkeypatch):
    monkeypatch.setattr(audit, "MAX_AUDIT_FILE_BYTES", audit_path.stat().st_size - 1)

    status, _, err = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert f"must take at most {audit_path.stat().st_size - 1} bytes" in err
    assert f"Found {audit_path.stat().st_size} in" in err


@pytest.mark.parametrize(
    ("text", "values"),
    [("1", 1), ("[]", 1), ('[1,[2,{"a":3}]]', 7), ('"a,b:c[d{"', 1)],
    ids=["number", "empty-list", "nested", "separators-in-string"],
)
def test_json_value_count_bounds_values(text, values):
    assert audit.json_value_count(text) >= values


def test_hostile_many_json_values_rejected(audit_path, capsys, monkeypatch):
    # Parsing a list of empty lists keeps about 21 times the text in memory.
    monkeypatch.setattr(audit, "MAX_AUDIT_JSON_VALUES", 100)

    status, _, err = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "the audit file must hold at most 100 JSON values" in err


def test_hostile_long_value_printed_shortened(audit_path, capsys):
    rewrite(audit_path, lambda d: d["rounds"][1].update(aggregate_path="a" * 10**6))

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 2: FAILED" in out
    assert max(len(line) for line in out.splitlines()) <= 2000
    assert "File name too long." in out
    assert "a" * 200 in out
    assert "a" * 201 not in out


FAKE_LINES = "x\nrun 1 round 2: verified\n2 of 2 entries verified, 0 discarded\n"


def test_hostile_file_name_cannot_fake_output_lines(audit_path, capsys):
    # A server that writes the audit folder chooses the file names that the
    # reasons quote, so a newline in one must not start a line of its own.
    (audit_path.parent / FAKE_LINES).mkdir()
    rewrite(audit_path, lambda d: d["rounds"][1].update(aggregate_path=FAKE_LINES))

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[1].endswith(
        "round 2: FAILED: the aggregate cannot be loaded: aggregate_path must "
        "name a regular file. Found 'x\\nrun 1 round 2: verified\\n2 of 2 "
        "entries verified, 0 discarded\\n', which is not one."
    )
    assert lines[2] == "1 of 2 entries verified, 0 discarded"


def test_hostile_undecodable_name_prints_on_strict_utf8(audit_path):
    # os.fsdecode turns byte 0x80 into a lone surrogate, which a strict UTF-8
    # stream cannot print.
    name = os.fsdecode(b"agg\x80.npy")
    (audit_path.parent / name).mkdir()
    rewrite(audit_path, lambda d: d["rounds"][1].update(aggregate_path=name))

    completed = subprocess.run(
        [sys.executable, "-m", "fedsec_flwr.audit", str(audit_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=120,
        check=False,
    )

    assert completed.returncode == audit.EXIT_FAILED
    assert "Traceback" not in completed.stderr
    assert "agg\\udc80.npy" in completed.stdout


@pytest.mark.parametrize("where", ["file", "round"])
def test_tamper_unknown_key_rejected(audit_path, capsys, where):
    def edit(document):
        target = document if where == "file" else document["rounds"][0]
        target["note\n"] = "added by the server"

    rewrite(audit_path, edit)
    status, out, err = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    if where == "file":
        assert "the file must have only the keys format, rounds" in err
    else:
        assert "round 1: FAILED: round 1 must have only the keys" in out
        assert "Found 'note\\n'." in out
        assert "round 2: verified" in out


def test_hostile_huge_integer_fails_only_its_round(audit_path, capsys):
    text = audit_path.read_text()
    first = text.index('"server_round": 1')
    huge = '"server_round": ' + "9" * 5000
    audit_path.write_text(
        text[:first] + huge + text[first + len('"server_round": 1') :]
    )

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert (
        "entry 0: FAILED: the transcript is malformed: server_round is an integer "
        "of 5000 digits (9999999999...), above the largest accepted "
        "18446744073709551615."
    ) in out
    assert "round 2: verified" in out


def set_transcript_field(key: str, value: object):
    def edit(document):
        document["rounds"][0]["transcript"][key] = value

    return edit


def set_first_blinding_sum(value: int):
    def edit(document):
        document["rounds"][0]["transcript"]["blinding_sums"][0] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            set_first_blinding_sum(10**400),
            "blinding_sums value is an integer of 401 digits (1000000000...), "
            "above the largest accepted 4294967295.",
        ),
        (
            set_first_blinding_sum(-(10**400)),
            "blinding_sums value is an integer of 401 digits (-1000000000...), "
            "below the smallest accepted 0.",
        ),
        (
            set_transcript_field("aggregate_length", 2**100),
            "aggregate_length is an integer of 31 digits (1267650600...), above "
            "the largest accepted 17179869184.",
        ),
        (
            set_transcript_field("run_id", 10**30),
            "run_id must be a JSON str. Found an integer of 31 digits (1000000000...).",
        ),
        (
            # 64 decimal digits are valid hex, but a JSON number is not a string.
            set_transcript_field("model_sha256", int("1" * 64)),
            "model_sha256 must be a JSON str. Found an integer of 64 digits "
            "(1111111111...).",
        ),
        (
            lambda document: document["rounds"][0].update(aggregate_hex=int("1" * 320)),
            "aggregate_hex must be a JSON str. Found an integer of 320 digits "
            "(1111111111...).",
        ),
    ],
    ids=[
        "blinding-sum",
        "negative-blinding-sum",
        "aggregate-length",
        "run-id",
        "model-digest",
        "aggregate-hex",
    ],
)
def test_hostile_long_integer_named_in_one_line(audit_path, capsys, edit, message):
    rewrite(audit_path, edit)

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert message in out
    assert "Found str" not in out
    assert max(len(line) for line in out.splitlines()) < 300
    assert "round 2: verified" in out


def test_missing_round_reported_with_exit_zero(tmp_path, capsys):
    # A round aborted before its commit stage leaves no entry, so the gap
    # alone does not fail the audit, but the output must name it.
    keys = {node_id: s.generate_identity_key() for node_id in NODE_IDS}
    path = tmp_path / "audit.json"
    for server_round in (1, 3):
        simulated = build_round(
            server_round=server_round, d=40, private_keys=keys, seed=server_round
        )
        audit.append_round(path, simulated.transcript, simulated.aggregate)

    status, out, err = run_main(path, capsys)

    assert status == audit.EXIT_VERIFIED
    assert (
        f"run {RUN_ID} round 2: no well-formed transcript in the file, so "
        "nothing to check. Pass --initial-model to check that no later round trained on a "
        "model from it.\n"
    ) in out
    assert "2 of 2 entries verified, 0 discarded" in out
    assert err == ""


def test_summary_counts_missing_rounds(tmp_path, capsys):
    keys = {node_id: s.generate_identity_key() for node_id in NODE_IDS}
    path = tmp_path / "audit.json"
    for server_round in (2, 6):
        simulated = build_round(
            server_round=server_round, d=40, private_keys=keys, seed=server_round
        )
        audit.append_round(path, simulated.transcript, simulated.aggregate)

    status, out, _ = run_main(path, capsys)

    assert status == audit.EXIT_VERIFIED
    assert out.endswith(
        "2 of 2 entries verified, 0 discarded; 4 earlier round(s) with no "
        "well-formed entry\n"
    )


def test_summary_counts_malformed_round_once(audit_path, capsys):
    # Round 1's entry counts among the entries, and its round among those
    # with no well-formed entry, so the two counts name different things.
    rewrite(audit_path, lambda d: d["rounds"][0].update(transcript="broken"))

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert out.endswith(
        "1 of 2 entries verified, 0 discarded; 1 earlier round(s) with no "
        "well-formed entry\n"
    )


def test_missing_rounds_grouped_per_run():
    result = AuditResult(True, "")
    audits = [
        audit.RoundAudit("run 7 round 5", result, 7, 5),
        audit.RoundAudit("run 7 round 1", result, 7, 1),
        audit.RoundAudit("run 7 round 1", result, 7, 1),
        audit.RoundAudit("run 9 round 0", result, 9, 0),
        audit.RoundAudit("run 9 round 2", result, 9, 2),
        audit.RoundAudit("run 11 round 1", result, 11, 1),
        audit.RoundAudit("entry 6", AuditResult(False, "malformed")),
    ]

    assert audit.missing_rounds(audits) == [(7, 2, 4), (9, 1, 1)]


def test_empty_aggregate_file_fails_audit(audit_path, capsys):
    entry = json.loads(audit_path.read_text())["rounds"][1]
    np.save(audit_path.parent / entry["aggregate_path"], np.zeros(0, np.uint32))

    status, out, _ = run_main(audit_path, capsys)

    assert status == audit.EXIT_FAILED
    assert "round 2: FAILED" in out
    assert "round 1: verified" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "Expecting value"),
        ('{"format": "other", "rounds": []}', "format"),
        (
            '{"format": "fedsec_flwr/audit/v1", "rounds": {}}',
            "rounds must be a JSON list",
        ),
        (
            '{"format": "fedsec_flwr/audit/v1", "rounds": [], "rounds": []}',
            "must not repeat a key",
        ),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ],
    ids=["not-json", "other-format", "rounds-object", "repeated-key", "deep"],
)
def test_malformed_file_exits_one(tmp_path, capsys, text, message):
    path = tmp_path / "audit.json"
    path.write_text(text)

    status, out, err = run_main(path, capsys)

    assert status == audit.EXIT_FAILED
    assert out == ""
    assert message in err


def test_missing_file_exits_one(tmp_path, capsys):
    status, _, err = run_main(tmp_path / "absent.json", capsys)

    assert status == audit.EXIT_FAILED
    assert "cannot audit" in err


def test_empty_file_exits_one(tmp_path, capsys):
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"format": audit.AUDIT_FORMAT, "rounds": []}))

    status, _, err = run_main(path, capsys)

    assert status == audit.EXIT_FAILED
    assert "contains no round" in err


def test_closed_output_pipe_ends_without_traceback(audit_path):
    # As `python -m fedsec_flwr.audit FILE | head -1` does: the reader is gone
    # before the audit prints.
    process = subprocess.Popen(
        [sys.executable, "-m", "fedsec_flwr.audit", str(audit_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()

    _, stderr = process.communicate(timeout=120)

    assert process.returncode == audit.EXIT_FAILED
    assert b"Traceback" not in stderr
