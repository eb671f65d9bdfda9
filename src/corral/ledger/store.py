"""The ledger: an append-only, hash-chained record log in SQLite (WAL mode).

Every decision, event, alert and note is one row of ``records``; each row carries the hash
of the row before it, so editing, deleting, inserting or reordering rows breaks the chain
and ``verify()`` names the first bad ``seq``. The ``meta`` row holds the head (last seq and
hash), written in the same transaction as the appends, so that deleting the *last* rows,
which leaves a shorter but internally valid chain, is caught too. ``chain`` documents the
hash construction.

Limits of a self-contained chain
    Someone who can rewrite the whole file, recompute every hash and update the meta head
    produces a ledger that verifies. The chain only makes tampering *evident relative to a
    head hash kept somewhere else*: export the head hash that ``verify()`` reports (print it,
    ship it to another machine, commit it) and compare later.

Durability (``durability=``)
    ``"normal"`` (default): ``synchronous=NORMAL``. A committed append survives a crash of
    the process; on power loss or an OS crash the last transactions may be lost, but the
    database is never corrupted and the chain stays valid (it simply ends earlier).
    ``"full"``: ``synchronous=FULL``. Each commit is fsynced, so it also survives power
    loss, at the cost of one fsync per transaction; ``batch()`` amortises it.

Concurrency
    Appends run in ``BEGIN IMMEDIATE`` transactions that read the head *inside* the
    transaction, so several processes (or ``Ledger`` objects) appending to one file keep a
    single linear chain; the busy timeout makes them wait for each other rather than fail.
    WAL lets readers read while a writer writes. One ``Ledger`` shares one connection
    between threads, guarded by a lock: while one thread is inside ``batch()``, the other
    threads' calls on that ``Ledger`` wait for it to end.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from corral.errors import LedgerError
from corral.ledger.chain import (
    LedgerRecord,
    VerifyReport,
    as_opt_int,
    as_opt_str,
    as_ts,
    canonical_json,
    genesis_hash,
    record_hash,
)
from corral.ledger.verify import COLUMNS as _COLUMNS
from corral.ledger.verify import SCHEMA_VERSION, rollback, verify_connection
from corral.model import Action, Alert, Decision, Event
from corral.paths import default_ledger_path

Durability = Literal["full", "normal"]
_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}

KIND_DECISION, KIND_EVENT, KIND_ALERT, KIND_NOTE = "decision", "event", "alert", "note"

# meta is a single row (id = 1). head_seq/head_hash are not part of the chain; they exist so
# that deleting the last rows is detectable.
_SCHEMA = """
CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), schema_version INTEGER NOT NULL,
    ledger_id TEXT NOT NULL, created REAL NOT NULL, head_seq INTEGER NOT NULL,
    head_hash TEXT NOT NULL);
CREATE TABLE records (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL,
    run_id TEXT, episode INTEGER, step INTEGER, action_id TEXT, sandbox_id TEXT,
    body TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX records_run_id ON records(run_id);
CREATE INDEX records_action_id ON records(action_id);
CREATE INDEX records_kind ON records(kind);
"""
_INSERT = f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SET_HEAD = "UPDATE meta SET head_seq = ?, head_hash = ? WHERE id = 1"
_READ_CHUNK = 512


class Ledger:
    """A hash-chained ledger in one SQLite file. Use ``Ledger.open`` or ``Ledger.memory``."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path | None, durability: Durability, create: bool
    ) -> None:
        # Private: use open() or memory(). Takes ownership of conn, closing it on failure.
        try:
            self._ledger_id = _prepare(conn, path, durability, create)
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn
        self._cur = conn.cursor()  # reused for writes: one object less per append
        self._path, self._durability = path, durability
        self._genesis = genesis_hash(self._ledger_id)
        self._lock = threading.RLock()
        self._batch_depth = 0
        self._head: tuple[int, str] | None = None  # set only inside a write transaction
        self._broken = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        durability: Durability = "normal",
        create: bool = True,
        timeout: float = 10.0,
    ) -> Ledger:
        """Open the ledger at ``path`` (default ``corral.paths.default_ledger_path()``).

        With ``create`` a missing file and its missing parent directories (mode 0700) are
        created; without it a missing file is an error. A file that is not a corral ledger
        is never modified. ``timeout``: seconds to wait for another writer's transaction.
        """
        if durability not in _SYNCHRONOUS:
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        if str(path) == ":memory:":
            return cls.memory()  # SQLite's name, not a file to create
        p = Path(path).expanduser() if path is not None else default_ledger_path()
        if not p.exists():
            if not create:
                raise LedgerError(f"no ledger at {p}")
            _create_private_file(p)
        try:
            conn = sqlite3.connect(
                p, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open ledger {p}: {e}") from e
        return cls(conn, p, durability, create)

    @classmethod
    def memory(cls) -> Ledger:
        """A private in-memory ledger, for tests."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        return cls(conn, None, "normal", True)

    def close(self) -> None:
        """Close the connection; an unfinished batch is rolled back. Safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ledger_id(self) -> str:
        return self._ledger_id

    @property
    def path(self) -> Path | None:
        """The database file, or ``None`` for an in-memory ledger."""
        return self._path

    @property
    def durability(self) -> Durability:
        return self._durability

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError("ledger is closed")
        return self._conn

    # -- writing -------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Make the appends inside the block one transaction: all committed, or none.

        Nested batches join the outer one. The writer lock (and SQLite's write lock) is held
        for the whole block, so keep batches short if other processes append too.
        """
        with self._lock:
            conn = self._db()
            self._batch_depth += 1
            try:
                if self._batch_depth > 1:
                    yield
                else:
                    with self._transaction(conn):
                        yield
            finally:
                self._batch_depth -= 1

    def append(
        self,
        kind: str,
        body: Mapping[str, Any],
        *,
        run_id: str | None = None,
        episode: int | None = None,
        step: int | None = None,
        action_id: str | None = None,
        sandbox_id: str | None = None,
        ts: float | None = None,
    ) -> int:
        """Append one record and return its ``seq``; ``ts`` defaults to now.

        ``body`` must be JSON-able (``chain.canonical_json``). Bad arguments raise
        ``ValueError``/``TypeError`` before anything is written, even inside a batch.
        """
        kind = as_opt_str("kind", kind) or ""
        if not kind:
            raise ValueError("kind must be a non-empty string")
        if type(body) is not dict:  # the common case skips a slow ABC isinstance check
            if not isinstance(body, Mapping):
                raise TypeError(f"body must be a mapping, got {type(body).__name__}")
            body = dict(body)
        # The columns up to body, in order; seq is filled in under the write lock.
        row: list[Any] = [
            0,
            time.time() if ts is None else as_ts(ts),
            kind,
            as_opt_str("run_id", run_id),
            as_opt_int("episode", episode),
            as_opt_int("step", step),
            as_opt_str("action_id", action_id),
            as_opt_str("sandbox_id", sandbox_id),
            canonical_json(body),
        ]
        with self._lock:
            conn = self._db()
            if self._batch_depth:
                return self._write(row)
            with self._transaction(conn):
                return self._write(row)

    def append_decision(self, action: Action, decision: Decision) -> int:
        """Record the gate's ``decision`` about ``action``, attributed to the action."""
        if decision.action_id is not None and decision.action_id != action.id:
            raise ValueError(f"decision is for action {decision.action_id}, not {action.id}")
        body = {"action": action.to_dict(), "decision": decision.to_dict()}
        return self.append(
            KIND_DECISION,
            body,
            run_id=action.run_id,
            episode=action.episode,
            step=action.step,
            action_id=action.id,
        )

    def append_event(self, event: Event, *, run_id: str | None = None) -> int:
        """Record an observed event. An ``Event`` names no run, so pass it if known."""
        return self._append_attributed(KIND_EVENT, event, run_id)

    def append_alert(self, alert: Alert, *, run_id: str | None = None) -> int:
        """Record a detector's alert (its evidence events are part of the body)."""
        return self._append_attributed(KIND_ALERT, alert, run_id)

    def append_note(self, note: str | Mapping[str, Any], *, run_id: str | None = None) -> int:
        """Record a free-form note: a message (stored as ``{"message": note}``) or a mapping."""
        body = {"message": note} if isinstance(note, str) else note
        return self.append(KIND_NOTE, body, run_id=run_id)

    def _append_attributed(self, kind: str, obj: Event | Alert, run_id: str | None) -> int:
        return self.append(
            kind, obj.to_dict(), run_id=run_id, action_id=obj.action_id, sandbox_id=obj.sandbox_id
        )

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction; ``self._head`` tracks the chain head while it is open."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            # The last row, not meta, is what we chain onto; reading it under the write
            # lock means no other writer can slip a row in between.
            self._head = start = self._read_head(conn)
        except sqlite3.Error as e:
            rollback(conn)
            raise LedgerError(f"cannot start a ledger write: {e}") from e
        try:
            yield
            if self._broken:
                # A write failed and the caller swallowed the error; what the transaction
                # holds is no longer known to be consistent.
                raise LedgerError("a write inside this batch failed; batch rolled back")
            if self._head != start:
                # Once per transaction rather than per append: same transaction either way.
                self._cur.execute(_SET_HEAD, self._head)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            rollback(conn)
            raise LedgerError(f"ledger write failed: {e}") from e
        except BaseException:
            rollback(conn)
            raise
        finally:
            self._head, self._broken = None, False

    def _read_head(self, conn: sqlite3.Connection) -> tuple[int, str]:
        row = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, self._genesis)

    def _write(self, row: list[Any]) -> int:
        assert self._head is not None, "writes happen inside _transaction"
        seq, prev = self._head[0] + 1, self._head[1]
        row[0] = seq
        # Hashing can still reject the row (a string with a lone surrogate); that is the
        # caller's error and must happen before the database is touched.
        h = record_hash(prev, *row)
        try:
            self._cur.execute(_INSERT, (*row, prev, h))
        except BaseException as e:
            # Whether the row went in is unknown, so the transaction must not commit even
            # if the caller catches the error inside a batch and carries on.
            self._broken = True
            if isinstance(e, sqlite3.Error):
                raise LedgerError(f"cannot append to ledger: {e}") from e
            raise
        self._head = (seq, h)
        return seq

    # -- reading -------------------------------------------------------------------------

    def records(
        self,
        *,
        run_id: str | None = None,
        kinds: Iterable[str] | str | None = None,
        action_id: str | None = None,
        since_seq: int | None = None,
        limit: int | None = None,
    ) -> Iterator[LedgerRecord]:
        """Records in ``seq`` order, filtered; ``since_seq`` is exclusive (records after it).

        Rows are fetched in chunks, so a large ledger is never loaded whole. Reading does
        not verify; a body that is not JSON raises ``LedgerIntegrityError``.
        """
        given = [("run_id = ?", run_id), ("action_id = ?", action_id), ("seq > ?", since_seq)]
        where = [cond for cond, value in given if value is not None]
        params: list[Any] = [value for _, value in given if value is not None]
        if kinds is not None:
            wanted = [kinds] if isinstance(kinds, str) else list(kinds)
            if not wanted:
                return
            where.append(f"kind IN ({', '.join('?' * len(wanted))})")
            params += wanted
        sql = f"SELECT {_COLUMNS} FROM records"
        sql += f" WHERE {' AND '.join(where)} ORDER BY seq" if where else " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            cur = self._db().execute(sql, params)
        try:
            while True:
                # Hold the lock while fetching, never across a yield: a caller that stops
                # iterating half-way must not leave the writers locked out.
                with self._lock:
                    self._db()
                    rows = cur.fetchmany(_READ_CHUNK)
                if not rows:
                    return
                yield from map(LedgerRecord.from_row, rows)
        finally:
            cur.close()

    def get(self, seq: int) -> LedgerRecord | None:
        """The record with this ``seq``, or ``None``."""
        with self._lock:
            cur = self._db().execute(f"SELECT {_COLUMNS} FROM records WHERE seq = ?", (seq,))
            row = cur.fetchone()
        return LedgerRecord.from_row(row) if row else None

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record; ``(0, genesis hash)`` when empty."""
        with self._lock:
            return self._read_head(self._db())

    def count(self) -> int:
        with self._lock:
            n: int = self._db().execute("SELECT COUNT(*) FROM records").fetchone()[0]
            return n

    def verify(self) -> VerifyReport:
        """Check the whole chain and the meta head; see ``VerifyReport``."""
        with self._lock:
            conn = self._db()
            if self._head is not None:
                # Inside a batch the stored head is written at commit; bring it up to date
                # so that the check compares like with like.
                self._cur.execute(_SET_HEAD, self._head)
            return verify_connection(conn)


def _prepare(conn: sqlite3.Connection, path: Path | None, durability: str, create: bool) -> str:
    """Check the file is (or may become) a ledger, set pragmas, create the schema if needed.

    Returns the ledger id. ``path`` is ``None`` for an in-memory database.
    """
    where = str(path) if path is not None else ":memory:"
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables and (tables or not create):
            # Never add our tables to somebody else's database.
            raise LedgerError(f"{where} is not a corral ledger")
        if path is not None:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"{where}: cannot switch to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[durability]}")
        if "meta" not in tables:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-check under the write lock: another process may have just created it.
                if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(statement)
                    new_id = uuid.uuid4().hex
                    conn.execute(
                        "INSERT INTO meta VALUES (1, ?, ?, ?, 0, ?)",
                        (SCHEMA_VERSION, new_id, time.time(), genesis_hash(new_id)),
                    )
                conn.execute("COMMIT")
            finally:
                rollback(conn)
        row = conn.execute("SELECT schema_version, ledger_id FROM meta WHERE id = 1").fetchone()
    except sqlite3.Error as e:
        raise LedgerError(f"cannot open ledger {where}: {e}") from e
    if row is None or row[0] != SCHEMA_VERSION:
        found = "no meta row" if row is None else f"schema version {row[0]!r}"
        raise LedgerError(f"{where}: unsupported ledger ({found})")
    return str(row[1])


def _create_private_file(p: Path) -> None:
    """Create ``p`` empty (a valid empty database) with mode 0600, and its parents 0700."""
    try:
        # mkdir(parents=True) would give the intermediate directories the default mode.
        for d in reversed([p.parent, *p.parent.parents]):
            if not d.exists():
                d.mkdir(mode=0o700, exist_ok=True)
        # Made here rather than by SQLite so it, and the -wal/-shm files that copy its
        # mode, are private from the start. Losing a creation race to another process is
        # fine: initialisation is race-safe.
        with suppress(FileExistsError):
            os.close(os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise LedgerError(f"cannot create ledger {p}: {e}") from e
