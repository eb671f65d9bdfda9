"""Tampering with the database file behind the ledger's back must be caught and located.

Each test builds a 10-record ledger, closes it, edits the file with plain ``sqlite3`` and
checks that verification fails and names the first bad seq.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from corral.errors import LedgerError, LedgerIntegrityError
from corral.ledger import Ledger, VerifyReport, genesis_hash, record_hash, verify_path
from corral.model import Action, Alert, Category, Decision, Event, EventKind, Severity, Verdict

N = 10


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        for i in range(1, N + 1):
            if i % 3 == 0:
                ledger.append_event(Event(EventKind.EXEC, "sb", {"argv": ["ls", str(i)]}))
            elif i % 4 == 0:
                ledger.append_alert(Alert("d", Category.RECON, Severity.LOW, sandbox_id="sb"))
            else:
                action = Action.shell(f"echo {i}", run_id="r", episode=1, step=i)
                decision = Decision(Verdict.ALLOW, "ok", None, "fine", action_id=action.id)
                ledger.append_decision(action, decision)
        assert ledger.verify().ok
    return path


def tamper(path: Path, *statements: str, params: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    try:
        for sql in statements:
            conn.execute(sql, params if "?" in sql else ())
        conn.commit()
    finally:
        conn.close()


def row(path: Path, seq: int) -> tuple[Any, ...]:
    conn = sqlite3.connect(path)
    try:
        found: tuple[Any, ...] = conn.execute(
            "SELECT seq, ts, kind, run_id, episode, step, action_id, sandbox_id, body,"
            " prev_hash, hash FROM records WHERE seq = ?",
            (seq,),
        ).fetchone()
        return found
    finally:
        conn.close()


def check(path: Path, bad_seq: int | None, *words: str) -> VerifyReport:
    """Both entry points must agree, report the right seq and explain it."""
    report = verify_path(path)
    with Ledger.open(path, create=False) as ledger:
        assert ledger.verify() == report
    assert not report.ok
    assert report.first_bad_seq == bad_seq, report
    assert report.problem is not None
    for word in words:
        assert word in report.problem, report.problem
    with pytest.raises(LedgerIntegrityError) as exc:
        report.raise_for_problem()
    assert exc.value.seq == bad_seq
    return report


def test_untouched_file_verifies(ledger_file: Path) -> None:
    report = verify_path(ledger_file)
    assert report.ok and report.records == N and report.first_bad_seq is None
    assert report.head_hash == row(ledger_file, N)[-1]


def test_edited_body(ledger_file: Path) -> None:
    tamper(ledger_file, "UPDATE records SET body = replace(body, 'echo 5', 'rm -rf') WHERE seq = 5")
    assert "rm -rf" in row(ledger_file, 5)[8]
    report = check(ledger_file, 5, "hash mismatch")
    assert report.records == 4 and report.head_hash == row(ledger_file, 4)[-1]


def test_body_rewritten_as_equivalent_json(ledger_file: Path) -> None:
    # Same parsed object, different bytes: still an edit of what was recorded.
    tamper(ledger_file, "UPDATE records SET body = ' ' || body WHERE seq = 2")
    check(ledger_file, 2, "hash mismatch")


def test_edited_kind(ledger_file: Path) -> None:
    tamper(ledger_file, "UPDATE records SET kind = 'note' WHERE seq = 6")
    check(ledger_file, 6, "hash mismatch")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("ts", 0.5),
        ("run_id", "'other'"),
        ("episode", 9),
        ("step", "NULL"),
        ("action_id", "'x'"),
        ("sandbox_id", "'sb2'"),
        ("hash", "'sha256:' || hex(randomblob(32))"),
    ],
)
def test_edited_attribution_or_hash(ledger_file: Path, column: str, value: object) -> None:
    tamper(ledger_file, f"UPDATE records SET {column} = {value} WHERE seq = 5")
    check(ledger_file, 5, "hash mismatch")


def test_edited_prev_hash(ledger_file: Path) -> None:
    tamper(ledger_file, "UPDATE records SET prev_hash = 'sha256:00' WHERE seq = 7")
    check(ledger_file, 7, "prev_hash")


def test_wrongly_typed_field(ledger_file: Path) -> None:
    tamper(ledger_file, "UPDATE records SET ts = 'yesterday' WHERE seq = 8")
    check(ledger_file, 8, "cannot be hashed")


def test_body_that_is_not_json(ledger_file: Path) -> None:
    tamper(ledger_file, "UPDATE records SET body = '{broken' WHERE seq = 3")
    check(ledger_file, 3, "hash mismatch")
    with Ledger.open(ledger_file) as ledger, pytest.raises(LedgerIntegrityError) as exc:
        list(ledger.records())
    assert exc.value.seq == 3


def test_deleted_middle_row(ledger_file: Path) -> None:
    tamper(ledger_file, "DELETE FROM records WHERE seq = 5")
    check(ledger_file, 6, "record 5 missing")


def test_deleted_rows_in_a_run(ledger_file: Path) -> None:
    tamper(ledger_file, "DELETE FROM records WHERE seq BETWEEN 3 AND 6")
    check(ledger_file, 7, "record 3 missing", "3 more")


def test_deleted_first_row(ledger_file: Path) -> None:
    tamper(ledger_file, "DELETE FROM records WHERE seq = 1")
    check(ledger_file, 2, "record 1 missing")


def test_deleted_last_row(ledger_file: Path) -> None:
    tamper(ledger_file, f"DELETE FROM records WHERE seq = {N}")
    report = check(ledger_file, N, f"ledger truncated after seq {N - 1}")
    assert report.records == N - 1


def test_deleted_last_rows(ledger_file: Path) -> None:
    tamper(ledger_file, "DELETE FROM records WHERE seq > 7")
    check(ledger_file, 8, "ledger truncated after seq 7")


def test_deleted_everything(ledger_file: Path) -> None:
    tamper(ledger_file, "DELETE FROM records")
    report = check(ledger_file, 1, "ledger truncated after seq 0")
    assert report.records == 0


def test_inserted_row_with_a_made_up_hash(ledger_file: Path) -> None:
    last = row(ledger_file, N)
    forged = (N + 1, *last[1:9], last[-1], "sha256:" + "0" * 64)
    tamper(ledger_file, "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", params=forged)
    check(ledger_file, N + 1, "beyond the recorded head")


def test_appended_row_with_a_correct_hash_but_stale_head(ledger_file: Path) -> None:
    # The forger knows the algorithm but did not update meta: the head catches it.
    prev = row(ledger_file, N)[-1]
    fields = (N + 1, 5.0, "note", None, None, None, None, None, '{"message":"forged"}')
    forged = (*fields, prev, record_hash(prev, *fields))
    tamper(ledger_file, "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", params=forged)
    check(ledger_file, N + 1, "beyond the recorded head")


def test_row_replaced_by_a_forgery_that_links_backwards(ledger_file: Path) -> None:
    prev = row(ledger_file, 4)[-1]
    fields = (5, 5.0, "note", None, None, None, None, None, '{"message":"all fine"}')
    forged = (*fields, prev, record_hash(prev, *fields))
    tamper(
        ledger_file,
        "DELETE FROM records WHERE seq = 5",
        "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        params=forged,
    )
    check(ledger_file, 6, "prev_hash")  # the forged row is self-consistent; the next one isn't


def test_swapped_bodies(ledger_file: Path) -> None:
    tamper(
        ledger_file,
        "UPDATE records SET body = CASE seq WHEN 3 THEN (SELECT body FROM records WHERE seq = 7)"
        " ELSE (SELECT body FROM records WHERE seq = 3) END WHERE seq IN (3, 7)",
    )
    check(ledger_file, 3, "hash mismatch")


def test_swapped_seqs(ledger_file: Path) -> None:
    tamper(
        ledger_file,
        "UPDATE records SET seq = -1 WHERE seq = 3",
        "UPDATE records SET seq = 3 WHERE seq = 8",
        "UPDATE records SET seq = 8 WHERE seq = -1",
    )
    check(ledger_file, 3, "prev_hash")


def test_record_moved_in_from_another_ledger(ledger_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with Ledger.open(other) as ledger:
        ledger.append("note", {"message": "hello"})
    stolen = row(other, 1)
    tamper(ledger_file, "DELETE FROM records WHERE seq = 1")
    tamper(ledger_file, "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", params=stolen)
    check(ledger_file, 1, "prev_hash")  # the genesis differs per ledger


def test_edited_meta_head_hash(ledger_file: Path) -> None:
    tamper(ledger_file, "UPDATE meta SET head_hash = 'sha256:feed'")
    check(ledger_file, N, "head hash")


def test_edited_meta_ledger_id(ledger_file: Path) -> None:
    tamper(ledger_file, "UPDATE meta SET ledger_id = 'someone-else'")
    check(ledger_file, 1, "prev_hash")


def test_full_rewrite_verifies_but_changes_the_head(ledger_file: Path) -> None:
    """The documented limit: recomputing everything defeats the chain, not an exported head."""
    exported = verify_path(ledger_file).head_hash
    conn = sqlite3.connect(ledger_file)
    (ledger_id,) = conn.execute("SELECT ledger_id FROM meta").fetchone()
    prev = genesis_hash(ledger_id)
    rows = conn.execute("SELECT * FROM records ORDER BY seq").fetchall()
    for r in rows:
        body = r[8].replace("echo", "curl evil")
        h = record_hash(prev, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], body)
        conn.execute(
            "UPDATE records SET body=?, prev_hash=?, hash=? WHERE seq=?", (body, prev, h, r[0])
        )
        prev = h
    conn.execute("UPDATE meta SET head_hash = ?", (prev,))
    conn.commit()
    conn.close()
    report = verify_path(ledger_file)
    assert report.ok and report.head_hash != exported


# -- files that are not ledgers ----------------------------------------------------------


def unreadable(path: Path, *words: str) -> None:
    report = verify_path(path)
    assert not report.ok and report.first_bad_seq is None and report.head_hash is None
    assert report.problem is not None
    for word in words:
        assert word in report.problem, report.problem


def test_garbage_file(tmp_path: Path) -> None:
    p = tmp_path / "garbage.db"
    p.write_bytes(b"\x00\x01 definitely not sqlite " * 200)
    unreadable(p, "not a readable SQLite ledger")
    with pytest.raises(LedgerError):
        Ledger.open(p)


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    unreadable(empty, "not a corral ledger")
    unreadable(tmp_path / "nope.db", "no ledger file")
    assert not (tmp_path / "nope.db").exists()


def test_other_sqlite_database(tmp_path: Path) -> None:
    p = tmp_path / "other.db"
    conn = sqlite3.connect(p)
    conn.execute("CREATE TABLE meta (k TEXT, v TEXT)")
    conn.commit()
    conn.close()
    unreadable(p, "not a corral ledger")


def test_meta_row_missing(ledger_file: Path) -> None:
    tamper(ledger_file, "DELETE FROM meta")
    unreadable(ledger_file, "meta row missing")


def test_truncated_file(ledger_file: Path) -> None:
    with Ledger.open(ledger_file) as ledger, ledger.batch():
        for i in range(2000):  # enough pages that cutting the file loses records
            ledger.append("note", {"i": i, "pad": "x" * 100})
    data = ledger_file.read_bytes()
    ledger_file.write_bytes(data[: len(data) // 2])
    report = verify_path(ledger_file)  # must report, not raise
    assert not report.ok and report.problem
