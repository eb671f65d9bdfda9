"""Verifying a ledger: walk the chain in one read snapshot and compare it with the
stored head. Reads only; a bad or foreign file is reported, never raised."""

from __future__ import annotations

import os
import sqlite3
from contextlib import suppress
from pathlib import Path

from corral.ledger.chain import ChainChecker, VerifyReport

SCHEMA_VERSION = 1
COLUMNS = "seq, ts, kind, run_id, episode, step, action_id, sandbox_id, body, prev_hash, hash"
_READ_CHUNK = 512
_VERIFY_TIMEOUT_S = 10.0


def verify_path(path: str | os.PathLike[str]) -> VerifyReport:
    """Verify the ledger file at ``path`` without writing to it; never raises for a bad file.

    The file is opened read-write when allowed (nothing is written) so that SQLite removes
    the ``-wal``/``-shm`` files it needs when it closes, and read-only otherwise.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        return VerifyReport.unreadable(f"no ledger file at {p}")
    mode = "rw" if os.access(p, os.W_OK) and os.access(p.parent, os.W_OK) else "ro"
    try:
        uri = f"{p.resolve().as_uri()}?mode={mode}"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=_VERIFY_TIMEOUT_S)
    except sqlite3.Error as e:
        return VerifyReport.unreadable(f"cannot open {p}: {e}")
    try:
        return verify_connection(conn)
    finally:
        conn.close()


def verify_connection(conn: sqlite3.Connection) -> VerifyReport:
    # Outside a write transaction, read one snapshot, so that an append landing between
    # reading meta and reading the last row cannot look like tampering.
    own_txn = not conn.in_transaction
    checker: ChainChecker | None = None
    try:
        if own_txn:
            conn.execute("BEGIN")
        try:
            meta = conn.execute(
                "SELECT schema_version, ledger_id, head_seq, head_hash FROM meta WHERE id = 1"
            ).fetchone()
        except sqlite3.OperationalError as e:
            return VerifyReport.unreadable(f"not a corral ledger ({e})")
        if meta is None:
            return VerifyReport.unreadable("not a corral ledger (meta row missing)")
        version, ledger_id, head_seq, head_hash = meta
        if version != SCHEMA_VERSION:
            return VerifyReport.unreadable(f"unsupported ledger schema version {version!r}")
        checker = ChainChecker(str(ledger_id), head_seq, head_hash)
        cur = conn.execute(f"SELECT {COLUMNS} FROM records ORDER BY seq")
        while rows := cur.fetchmany(_READ_CHUNK):
            if (bad := checker.feed(rows)) is not None:
                return bad
        return checker.finish()
    except sqlite3.Error as e:
        if checker is None:
            return VerifyReport.unreadable(f"not a readable SQLite ledger ({e})")
        return checker.interrupted(f"database unreadable: {e}")
    finally:
        if own_txn:
            rollback(conn)


def rollback(conn: sqlite3.Connection) -> None:
    # Any error here is less useful than the one that got us here, and SQLite rolls back an
    # open transaction when the connection closes anyway.
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
