"""A real ``corral serve`` on loopback, on a host with its own ledger and workspaces."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.host import Host
from corral.ledger import Ledger
from corral.serve.auth import Tokens
from corral.serve.server import serving

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"


@dataclass
class Served:
    url: str
    host: Host
    ledger: Ledger


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    ledger = Ledger.open(tmp_path / "ledger.db")
    host = Host(ledger=ledger, root=tmp_path / "host", reap_every=0)
    try:
        with serving(host, tokens=Tokens({ALICE: "alice", BOB: "bob"})) as url:
            yield Served(url, host, ledger)
    finally:
        host.close()
        ledger.close()
