"""Many hosts' ledgers read as one: what ``corral log --cluster`` prints.

Each host of a cluster keeps its own ledger (one writer per file, no shared database to
lose). Merging does not copy anything: every ledger's chain is checked on its own, and
the records are interleaved by time, each tagged with the host (the file's name) it came
from, so one run's timeline across many machines reads as one. The files are streamed,
never loaded whole.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import LedgerError
from corral.ledger.chain import LedgerRecord, VerifyReport
from corral.ledger.store import Ledger


@dataclass(frozen=True, slots=True)
class HostRecord:
    """One record and the host whose ledger holds it."""

    host: str
    record: LedgerRecord


def find_ledgers(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Ledger files: files as given, directories searched (recursively) for ``*.db``."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.db") if q.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise LedgerError(f"{p}: no such ledger file or directory")
    if not found:
        raise LedgerError(
            f"no ledgers (*.db) under {', '.join(map(str, paths))}: a pool keeps one per host "
            "in its state directory, $CORRAL_HOME/cluster/NAME by default"
        )
    return found


class MergedLedger:
    """Read-only view of several ledgers, named by host."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        files = find_ledgers(paths)
        self.hosts: dict[str, Ledger] = {}
        try:
            for f in files:
                self.hosts[_host_name(f, files)] = Ledger.open(f, create=False)
        except BaseException:
            self.close()
            raise

    def verify(self) -> dict[str, VerifyReport]:
        """Each host's chain, checked on its own."""
        return {name: led.verify() for name, led in self.hosts.items()}

    def records(
        self, *, run_id: str | None = None, kinds: Iterable[str] | str | None = None
    ) -> Iterator[HostRecord]:
        """Every host's records, optionally one run's: each host's in its own order
        (its chain's), the hosts interleaved by time. A record's time is when its event
        happened, which can be a moment before an earlier-written record's, so a host's
        order is kept rather than re-sorted."""
        kinds = list(kinds) if kinds is not None and not isinstance(kinds, str) else kinds

        def stream(name: str, led: Ledger) -> Iterator[tuple[float, str, int, HostRecord]]:
            for r in led.records(run_id=run_id, kinds=kinds):
                yield r.ts, name, r.seq, HostRecord(name, r)

        streams = [stream(name, led) for name, led in self.hosts.items()]
        for *_, rec in heapq.merge(*streams, key=lambda t: t[:3]):
            yield rec

    def close(self) -> None:
        for led in self.hosts.values():
            led.close()

    def __enter__(self) -> MergedLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host_name(f: Path, files: list[Path]) -> str:
    """The file's stem (a pool names its ledgers ``host-N.db``), with its directory
    when two files share a stem."""
    same = [g for g in files if g.stem == f.stem]
    return f.stem if len(same) == 1 else f"{f.parent.name}/{f.stem}"
