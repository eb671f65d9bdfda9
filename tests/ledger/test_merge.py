"""Several hosts' ledgers read as one timeline, each chain checked on its own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from corral.errors import LedgerError
from corral.ledger import Ledger, MergedLedger
from tests.cli import corral


def _write(path: Path, rows: list[tuple[float, str, str]]) -> None:
    with Ledger.open(path) as led:
        for ts, run, what in rows:
            led.append("note", {"message": what}, run_id=run, ts=ts)


def test_hosts_interleave_by_time_and_keep_their_own_order(tmp_path: Path) -> None:
    _write(tmp_path / "host-0.db", [(10, "r1", "a0"), (30, "r1", "a1"), (25, "r2", "a2")])
    _write(tmp_path / "host-1.db", [(20, "r1", "b0"), (40, "r1", "b1")])
    with MergedLedger([tmp_path]) as merged:
        assert set(merged.hosts) == {"host-0", "host-1"}
        assert all(v.ok for v in merged.verify().values())
        got = [(hr.host, hr.record.body["message"]) for hr in merged.records(run_id="r1")]
        assert got == [("host-0", "a0"), ("host-1", "b0"), ("host-0", "a1"), ("host-1", "b1")]
        # host-0 wrote a2 (time 25) after a1 (time 30): its own order is kept.
        every = [hr.record.body["message"] for hr in merged.records() if hr.host == "host-0"]
        assert every == ["a0", "a1", "a2"]


def test_a_tampered_host_ledger_is_named_and_the_log_fails(tmp_path: Path) -> None:
    _write(tmp_path / "host-0.db", [(10, "r1", "fine")])
    _write(tmp_path / "host-1.db", [(20, "r1", "mined nothing"), (21, "r1", "x")])
    with sqlite3.connect(tmp_path / "host-1.db") as db:
        db.execute("""UPDATE records SET body = '{"message":"all good"}' WHERE seq = 1""")
    with MergedLedger([tmp_path]) as merged:
        report = merged.verify()
        assert report["host-0"].ok and not report["host-1"].ok
        assert report["host-1"].first_bad_seq == 1
    out = corral(tmp_path, "log", "--cluster", str(tmp_path))
    assert out.returncode == 1
    assert "ledger of host-1 fails its check at record 1" in out.stderr
    assert out.stdout.splitlines()[0].startswith("host-0 ")


def test_no_ledgers_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledgers"):
        MergedLedger([tmp_path])
    with pytest.raises(LedgerError, match="no such ledger file or directory"):
        MergedLedger([tmp_path / "missing"])
    out = corral(tmp_path, "log", "--cluster")  # default: $CORRAL_HOME/cluster
    assert out.returncode != 0 and "no such ledger file or directory" in out.stderr
