"""What the live view's tests share: a served host with three users, and ROCK calls."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from corral.host import Host, Hosted, HostEvent
from corral.ledger import Ledger
from corral.serve.auth import Tokens
from corral.serve.server import serving

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"
ONCALL = "oncall-token-0123456789abcdef"
ROCK = "/apis/envs/sandbox/v1"
LIVE = "/apis/live/v1"

# A hashing loop under an innocent name, left running after its command returns: the
# watcher's resource-hijack-cpu detector kills it after three busy seconds.
MINER = (
    "import hashlib\n"
    "# warming a cache: really a hashing loop\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    hashlib.sha256(n.to_bytes(8, 'little')).digest()\n"
)


@dataclass
class Live:
    url: str
    host: Host
    ledger: Ledger

    def rock(self, route: str, token: str, body: dict[str, Any]) -> Any:
        r = httpx.post(
            f"{self.url}{ROCK}/{route}",
            json=body,
            headers={"XRL-Authorization": f"Bearer {token}"},
            timeout=60,
        )
        got = r.json()
        assert got["status"] == "Success", got
        return got["result"]

    def start_miner(self, token: str) -> str:
        """A sandbox started through ROCK's routes, with the miner running in it."""
        sid = str(self.rock("start_async", token, {"image": "python:3.11"})["sandbox_id"])
        self.rock(
            "write_file", token, {"sandbox_id": sid, "path": "warm_cache.py", "content": MINER}
        )
        self.rock(
            "execute",
            token,
            {"sandbox_id": sid, "command": "nohup python3 warm_cache.py > /dev/null 2>&1 &"},
        )
        return sid


@contextmanager
def live_server(root: Path) -> Iterator[Live]:
    ledger = Ledger.open(root / "ledger.db")
    host = Host(ledger=ledger, root=root / "host", reap_every=0)
    tokens = Tokens({ALICE: "alice", BOB: "bob", ONCALL: "oncall"}, frozenset({"oncall"}))
    try:
        with serving(host, tokens=tokens) as url:
            yield Live(url, host, ledger)
    finally:
        host.close()
        ledger.close()


class Waiter:
    """The first host event that ``match`` accepts, from a listener on the host."""

    def __init__(self, host: Host, kind: str, sandbox: str | None = None) -> None:
        self.kind, self.sandbox = kind, sandbox
        self.found: HostEvent | None = None
        self._done = threading.Event()
        self._unsubscribe = host.subscribe(self._listen)

    def _listen(self, e: HostEvent) -> None:
        if self.found is None and e.kind == self.kind and self.sandbox in (None, e.sandbox):
            self.found = e
            self._done.set()

    def wait(self, timeout: float) -> HostEvent:
        ok = self._done.wait(timeout)
        self._unsubscribe()
        assert ok and self.found is not None, f"no {self.kind} event within {timeout} s"
        return self.found


def process(hosted: Hosted, cmdline: str, timeout: float = 10.0) -> int:
    """The pid of the sandbox's process running ``cmdline`` (a background job is forked
    a moment after the command that started it returns)."""
    want = cmdline.replace(" ", "\0").encode() + b"\0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in hosted.sandbox.backend.processes(hosted.sandbox.id):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == want:
                    return pid
        time.sleep(0.01)
    raise AssertionError(f"no process {cmdline!r} in sandbox {hosted.id} after {timeout} s")
