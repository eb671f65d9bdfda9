"""The SQLite ledger: appends, reads, batches, reopening, concurrency."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corral
from corral.errors import LedgerError
from corral.ledger import Ledger, LedgerRecord, canonical_json, genesis_hash, verify_path
from corral.model import (
    Action,
    Alert,
    Category,
    Decision,
    Event,
    EventKind,
    Severity,
    Verdict,
)


@pytest.fixture
def mem() -> Iterator[Ledger]:
    with Ledger.memory() as ledger:
        yield ledger


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


def as_json(value: Any) -> Any:
    """What a value looks like after a trip through the ledger's JSON."""
    return json.loads(canonical_json(value))


def decision_pair(step: int = 1, command: str = "ls -la") -> tuple[Action, Decision]:
    action = Action.shell(command, run_id="run-1", episode=3, step=step, task="t")
    decision = Decision(Verdict.DENY, "no-miners", Category.MINING, "mining", 0.001, action.id)
    return action, decision


def chain_is_linear(records: list[LedgerRecord], ledger_id: str) -> bool:
    prev = genesis_hash(ledger_id)
    for i, rec in enumerate(records, 1):
        if rec.seq != i or rec.prev_hash != prev:
            return False
        prev = rec.hash
    return True


# -- round trips and attribution ---------------------------------------------------------


def test_decision_round_trip_and_attribution(mem: Ledger) -> None:
    action, decision = decision_pair()
    seq = mem.append_decision(action, decision)
    (rec,) = mem.records()
    assert seq == rec.seq == 1 and rec.kind == "decision"
    assert rec.body == as_json({"action": action.to_dict(), "decision": decision.to_dict()})
    assert (rec.run_id, rec.episode, rec.step, rec.action_id) == ("run-1", 3, 1, action.id)
    assert rec.sandbox_id is None
    assert mem.verify().ok


def test_event_round_trip_and_attribution(mem: Ledger) -> None:
    event = Event(EventKind.NET, "sb-9", {"dst": "1.2.3.4", "port": 3333}, pid=7, action_id="a1")
    mem.append_event(event, run_id="run-2")
    (rec,) = mem.records()
    assert rec.kind == "event" and rec.body == as_json(event.to_dict())
    assert (rec.action_id, rec.sandbox_id) == ("a1", "sb-9")
    assert (rec.run_id, rec.episode, rec.step) == ("run-2", None, None)


def test_alert_round_trip_and_attribution(mem: Ledger) -> None:
    ev = Event(EventKind.EXEC, "sb-1", {"argv": ["xmrig"]})
    alert = Alert("miner", Category.MINING, Severity.HIGH, (ev,), "killed", "a2", "sb-1")
    mem.append_alert(alert)
    (rec,) = mem.records()
    assert rec.kind == "alert" and rec.body == as_json(alert.to_dict())
    assert rec.body["evidence"][0]["fields"] == {"argv": ["xmrig"]}
    assert (rec.action_id, rec.sandbox_id, rec.run_id) == ("a2", "sb-1", None)


def test_notes_take_a_message_or_a_mapping(mem: Ledger) -> None:
    mem.append_note("run started", run_id="r")
    mem.append_note({"event": "ruleset", "version": "1.2"})
    first, second = mem.records(kinds="note")
    assert first.body == {"message": "run started"} and first.run_id == "r"
    assert second.body == {"event": "ruleset", "version": "1.2"}


def test_generic_append_stores_every_field(mem: Ledger) -> None:
    seq = mem.append(
        "custom",
        {"x": [1, 2.5, None, "é"]},
        run_id="r",
        episode=1,
        step=2,
        action_id="a",
        sandbox_id="s",
        ts=1234,
    )
    rec = mem.get(seq)
    assert rec is not None
    assert rec.to_dict() | {"prev_hash": None, "hash": None} == {
        "seq": 1, "ts": 1234.0, "kind": "custom", "run_id": "r", "episode": 1, "step": 2,
        "action_id": "a", "sandbox_id": "s", "body": {"x": [1, 2.5, None, "é"]},
        "prev_hash": None, "hash": None,
    }  # fmt: skip
    assert isinstance(rec.ts, float) and mem.get(99) is None
    json.dumps(rec.to_dict())  # the CLI prints it as JSON


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kind": ""}, ValueError),
        ({"body": ["not", "a", "mapping"]}, TypeError),
        ({"body": {"x": float("nan")}}, ValueError),
        ({"body": {"x": object()}}, TypeError),
        ({"episode": True}, TypeError),
        ({"step": "3"}, TypeError),
        ({"run_id": 5}, TypeError),
        ({"ts": float("inf")}, ValueError),
        ({"body": {"x": "\ud800"}}, ValueError),  # lone surrogate: not valid UTF-8
    ],
)
def test_bad_appends_raise_and_write_nothing(
    mem: Ledger, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    def bad_append() -> None:
        args: dict[str, Any] = {"kind": "note", "body": {}} | kwargs
        mem.append(args.pop("kind"), args.pop("body"), **args)

    mem.append("note", {"ok": 1})
    with pytest.raises(error):
        bad_append()
    with mem.batch():  # inside a batch too, and the batch still commits
        with pytest.raises(error):
            bad_append()
        mem.append("note", {"ok": 2})
    assert mem.count() == 2 and mem.verify().ok


def test_mismatched_decision_is_refused(mem: Ledger) -> None:
    action, _ = decision_pair()
    decision = Decision(Verdict.ALLOW, "r", None, "ok", action_id="someone-else")
    with pytest.raises(ValueError, match="someone-else"):
        mem.append_decision(action, decision)
    assert mem.count() == 0


# -- reading -----------------------------------------------------------------------------


def test_record_filters(mem: Ledger) -> None:
    a1, d1 = decision_pair(1)
    mem.append_decision(a1, d1)  # 1
    mem.append_note("hello", run_id="other")  # 2
    mem.append_event(Event(EventKind.EXIT, "sb", action_id=a1.id), run_id="run-1")  # 3
    a2, d2 = decision_pair(2)
    mem.append_decision(a2, d2)  # 4

    def seqs(**kw: Any) -> list[int]:
        return [r.seq for r in mem.records(**kw)]

    assert seqs() == [1, 2, 3, 4]
    assert seqs(run_id="run-1") == [1, 3, 4]
    assert seqs(kinds=["decision", "event"]) == [1, 3, 4]
    assert seqs(kinds="note") == [2]
    assert seqs(kinds=[]) == []
    assert seqs(action_id=a1.id) == [1, 3]
    assert seqs(since_seq=2) == [3, 4]
    assert seqs(limit=2) == [1, 2]
    assert seqs(run_id="run-1", kinds=["decision"], since_seq=1, limit=5) == [4]


def test_head_and_count(mem: Ledger) -> None:
    assert mem.head() == (0, genesis_hash(mem.ledger_id)) and mem.count() == 0
    for i in range(5):
        mem.append("note", {"i": i})
    last = list(mem.records())[-1]
    assert mem.head() == (5, last.hash) and mem.count() == 5
    assert mem.verify().head_hash == last.hash


def test_reading_streams_and_does_not_block_writers(mem: Ledger) -> None:
    for i in range(1200):  # more than one fetch chunk
        mem.append("note", {"i": i})
    it = mem.records()
    assert next(it).seq == 1
    mem.append("note", {"i": "late"})  # an abandoned half-read iterator holds no lock
    assert sum(1 for _ in it) == 1200
    assert mem.count() == 1201


# -- batches -----------------------------------------------------------------------------


def test_batch_is_one_transaction(path: Path) -> None:
    with Ledger.open(path) as ledger:
        ledger.append("note", {"before": True})
        spy = sqlite3.connect(path)
        try:
            with ledger.batch():
                for i in range(50):
                    ledger.append("note", {"i": i})
                # Another connection sees none of the batch until it commits.
                assert spy.execute("SELECT COUNT(*) FROM records").fetchone() == (1,)
                assert ledger.count() == 51  # our own connection sees it
            assert spy.execute("SELECT COUNT(*) FROM records").fetchone() == (51,)
            assert spy.execute("SELECT head_seq FROM meta").fetchone() == (51,)
        finally:
            spy.close()
        assert ledger.verify().ok


def test_failing_batch_rolls_back_and_leaves_chain_intact(mem: Ledger) -> None:
    mem.append("note", {"i": 0})
    head = mem.head()
    with pytest.raises(RuntimeError), mem.batch():
        for i in range(10):
            mem.append("note", {"i": i})
        raise RuntimeError("boom")
    assert mem.head() == head and mem.count() == 1
    assert mem.append("note", {"i": "next"}) == 2
    assert mem.verify().ok


def test_nested_batches_join_the_outer_one(mem: Ledger) -> None:
    with pytest.raises(KeyError), mem.batch():
        mem.append("note", {})
        with mem.batch():
            mem.append("note", {})
        assert mem.verify().ok  # verify inside a batch sees a consistent head
        raise KeyError("outer fails: inner is rolled back too")
    assert mem.count() == 0 and mem.verify().ok


def test_a_failed_write_poisons_the_batch(mem: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    real = mem._cur

    class Flaky:
        def execute(self, sql: str, params: Any = ()) -> Any:
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, params)

    with pytest.raises(LedgerError, match="batch rolled back"), mem.batch():
        mem.append("note", {"i": 1})
        monkeypatch.setattr(mem, "_cur", Flaky())
        with pytest.raises(LedgerError, match="disk I/O"):
            mem.append("note", {"i": 2})
        monkeypatch.setattr(mem, "_cur", real)
    assert mem.count() == 0 and mem.verify().ok


# -- files, reopening, several writers ---------------------------------------------------


def test_open_creates_private_dirs_and_file(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / "ledger.db"
    with Ledger.open(p, durability="full") as ledger:
        assert ledger.path == p and ledger.durability == "full"
        assert ledger._db().execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert ledger._db().execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    with Ledger.open(p) as ledger:
        assert ledger._db().execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL


def test_open_default_path_uses_corral_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    with Ledger.open() as ledger:
        assert ledger.path == tmp_path / "home" / "ledger.db"
    assert (tmp_path / "home" / "ledger.db").is_file()


def test_open_refusals(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open(tmp_path / "missing.db", create=False)
    with pytest.raises(ValueError, match="durability"):
        Ledger.open(tmp_path / "x.db", durability="fast")  # type: ignore[arg-type]
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(LedgerError):
        Ledger.open(garbage)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE people (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="not a corral ledger"):
        Ledger.open(other)
    conn = sqlite3.connect(other)
    tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
    conn.close()
    assert tables == [("people",)]  # left untouched


def test_memory_name_gives_an_in_memory_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with Ledger.open(":memory:") as ledger:
        assert ledger.path is None and ledger.append("note", {}) == 1
    assert list(tmp_path.iterdir()) == []


def test_closed_ledger_refuses_work(path: Path) -> None:
    ledger = Ledger.open(path)
    ledger.close()
    ledger.close()
    assert ledger.closed
    with pytest.raises(LedgerError, match="closed"):
        ledger.append("note", {})
    with pytest.raises(LedgerError, match="closed"):
        ledger.head()


def test_reopen_keeps_the_chain(path: Path) -> None:
    with Ledger.open(path) as ledger:
        ledger_id = ledger.ledger_id
        for i in range(3):
            ledger.append("note", {"i": i})
    with Ledger.open(path, create=False) as ledger:
        assert ledger.ledger_id == ledger_id
        assert ledger.append("note", {"i": 3}) == 4
        assert ledger.verify().ok
        assert chain_is_linear(list(ledger.records()), ledger_id)
    assert verify_path(path).ok


def test_two_ledgers_have_different_chains(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "a.db") as a, Ledger.open(tmp_path / "b.db") as b:
        a.append("note", {"same": 1}, ts=1.0)
        b.append("note", {"same": 1}, ts=1.0)
        assert a.ledger_id != b.ledger_id and a.head()[1] != b.head()[1]


def test_two_objects_on_one_file_keep_one_chain(path: Path) -> None:
    with Ledger.open(path) as a, Ledger.open(path) as b:
        for i in range(20):
            (a if i % 2 else b).append("note", {"i": i})
        with a.batch():
            a.append("note", {"batch": 1})
        b.append("note", {"after": 1})
        records = list(a.records())
        assert [r.body.get("i") for r in records[:20]] == list(range(20))
        assert chain_is_linear(records, a.ledger_id) and len(records) == 22
        assert a.verify().ok and b.verify().ok


def test_threads_sharing_one_ledger(path: Path) -> None:
    with Ledger.open(path) as ledger:

        def work(n: int) -> None:
            for i in range(100):
                if i % 10 == 0:
                    with ledger.batch():
                        ledger.append("note", {"t": n, "i": i})
                        ledger.append("note", {"t": n, "i": i, "b": 1})
                else:
                    ledger.append("note", {"t": n, "i": i})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ledger.count() == 440 and ledger.verify().ok


_WRITER = textwrap.dedent(
    """
    import sys
    from corral.ledger import Ledger
    with Ledger.open(sys.argv[1], timeout=30) as ledger:
        for i in range(150):
            if i % 50 == 0:
                with ledger.batch():
                    for j in range(5):
                        ledger.append("note", {"w": sys.argv[2], "i": i, "j": j})
            else:
                ledger.append("note", {"w": sys.argv[2], "i": i})
    """
)


def test_processes_appending_concurrently_keep_one_chain(path: Path) -> None:
    Ledger.open(path).close()
    src = str(Path(corral.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)], env=env)
        for n in range(3)
    ]
    # Verifying while they write must see a consistent snapshot every time.
    while any(p.poll() is None for p in procs):
        report = verify_path(path)
        assert report.ok, report
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    report = verify_path(path)
    assert report.ok, report
    assert report.records == 3 * (147 + 15)


# -- any sequence of appends verifies ----------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_append = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["decision", "event", "alert", "note", "x"]),
        "body": st.dictionaries(st.text(max_size=8), _json, max_size=4),
        "run_id": st.none() | st.text(max_size=8),
        "episode": st.none() | st.integers(-(2**63), 2**63 - 1),
        "step": st.none() | st.integers(0, 10**6),
        "action_id": st.none() | st.text(max_size=8),
        "sandbox_id": st.none() | st.text(max_size=8),
        "ts": st.none() | st.floats(0, 2e9),
        "batched": st.booleans(),
    }
)


@given(st.lists(_append, max_size=12))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_sequence_of_appends_verifies(appends: list[dict[str, Any]]) -> None:
    with Ledger.memory() as ledger:
        for spec in appends:
            kw = dict(spec)
            kind, body, batched = kw.pop("kind"), kw.pop("body"), kw.pop("batched")
            if batched:
                with ledger.batch():
                    ledger.append(kind, body, **kw)
            else:
                ledger.append(kind, body, **kw)
        report = ledger.verify()
        assert report.ok, report
        assert report.records == len(appends) == ledger.count()
        for spec, rec in zip(appends, ledger.records(), strict=True):
            assert rec.body == as_json(spec["body"]) and rec.run_id == spec["run_id"]
            assert rec.episode == spec["episode"] and rec.action_id == spec["action_id"]
