"""One node's corral host, as the Ray pool drives it: ``corral.host.Host`` itself (not a
copy) behind methods that take and return plain values, plus a buffer of what the
driver streams back (alerts, starts and stops).

Nothing here imports Ray: the pool makes this class a Ray actor, and tests can drive it
directly.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from corral.host import STARTED, STOPPED, Host, HostEvent, ProfileRegistry
from corral.host.metrics import HostMetrics
from corral.host.usage import UsageSampler
from corral.ledger import Ledger
from corral.sandbox import Result
from corral.serve.fleet import Caller, HostFleet, HostInfo, SandboxInfo
from corral.serve.sandboxes import LocalSandboxes
from corral.serve.timeline import LiveEvent, Timeline

# What the driver is told about as it happens; decisions and raw events stay in the
# node's ledger, where `corral log --cluster` finds them.
_STREAMED = frozenset({"alert", STARTED, STOPPED})
_ROCK_OPS = frozenset(
    {"status", "stop", "delete", "run", "open_session", "close_session", "read_file"}
    | {"write_file", "alerts"}
)


class HostService:
    """A ``Host`` for one node of a pool, with a cursor-based feed of its events."""

    def __init__(
        self,
        *,
        name: str,
        root: str,
        ledger: str,
        profiles: str | None = None,
        gate: bool = True,
        watch: bool = True,
        backlog: int = 100_000,
    ) -> None:
        """``name``: the host's name in the pool (and in its ledger's records).
        ``root``: where its workspaces go; a host killed earlier there is cleaned up.
        ``ledger``: this host's own ledger file."""
        self.name = name
        Path(ledger).parent.mkdir(parents=True, exist_ok=True)
        registry = ProfileRegistry.load(profiles) if profiles else None
        self.host = Host(
            profiles=registry,
            ledger=Ledger.open(ledger),
            root=root,
            gate=gate,
            watch=watch,
        )
        self.host.ledger.append_note(
            {"event": "pool host started", "host": name, "pid": os.getpid(), "node": _node()}
        )
        self._feed: deque[tuple[int, dict[str, Any]]] = deque(maxlen=backlog)
        self._seq = 0
        self._cond = threading.Condition()
        self.host.subscribe(self._on_event)
        self._metrics = HostMetrics(self.host)
        # The live view's side of this host: the same fleet of one `corral serve` runs,
        # named as the pool names the host; its lines join the stream to the driver.
        self._sampler = UsageSampler(self.host).start()
        self.fleet = HostFleet(self.host, self._sampler, name=name)
        self.fleet.subscribe(self._on_live)
        # ROCK's routes, served by the driver (`corral serve --ray`), asked of this host.
        self.sandboxes = LocalSandboxes(self.host)

    def _on_event(self, event: HostEvent) -> None:
        if event.kind not in _STREAMED:
            return
        with self._cond:
            self._seq += 1
            self._feed.append((self._seq, {**event.to_dict(), "host": self.name}))
            self._cond.notify_all()

    def _on_live(self, event: LiveEvent) -> None:
        with self._cond:
            self._seq += 1
            self._feed.append((self._seq, {"kind": "live", "host": self.name, "event": event}))
            self._cond.notify_all()

    # ------------------------------------------------------------------ live view
    def live_hosts(self, caller: Caller) -> list[HostInfo]:
        return self.fleet.hosts(caller)

    def live_sandboxes(self, caller: Caller) -> list[SandboxInfo]:
        return self.fleet.sandboxes(caller)

    def live_recent(self, caller: Caller, limit: int) -> list[LiveEvent]:
        return self.fleet.recent(caller, limit)

    def live_freeze(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo:
        return self.fleet.freeze(caller, sandbox_id, reason)

    def live_kill(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo:
        return self.fleet.kill(caller, sandbox_id, reason)

    def live_timeline(self, caller: Caller, seq: int) -> Timeline:
        return self.fleet.timeline(caller, self.name, seq)

    # ------------------------------------------------------------------ queries
    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "node": _node(),
            "ledger": str(self.host.ledger.path),
            "reaped": list(self.host.reaped),
            "running": sum(1 for h in self.host.sandboxes() if h.alive),
        }

    def events(self, cursor: int, timeout: float = 1.0) -> tuple[int, list[dict[str, Any]]]:
        """Events after ``cursor``, waiting up to ``timeout`` s for one; the new cursor.
        If the backlog overflowed since, the oldest kept come first (the ledger has all)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._seq <= cursor:
                left = deadline - time.monotonic()
                if left <= 0:
                    return cursor, []
                self._cond.wait(left)
            return self._seq, [e for seq, e in self._feed if seq > cursor]

    # ------------------------------------------------------------------ sandboxes
    def start(self, profile: str, **kwargs: Any) -> dict[str, Any]:
        hosted = self.host.start(profile, **kwargs)
        return {"id": hosted.id, "sandbox_id": hosted.sandbox.id, "host": self.name}

    def run(self, sandbox_id: str, command: str | list[str], **kwargs: Any) -> Result:
        with self.host.using(sandbox_id) as hosted:
            return hosted.sandbox.run(command, **kwargs)

    def read_file(self, sandbox_id: str, path: str) -> str:
        with self.host.using(sandbox_id) as hosted:
            return hosted.sandbox.read_file(path)

    def write_file(self, sandbox_id: str, path: str, data: str | bytes) -> None:
        with self.host.using(sandbox_id) as hosted:
            hosted.sandbox.write_file(path, data)

    def open_session(
        self, sandbox_id: str, name: str, env: Mapping[str, str] | None = None
    ) -> None:
        with self.host.using(sandbox_id) as hosted:
            hosted.sandbox.open_session(name, env)

    def close_session(self, sandbox_id: str, name: str) -> None:
        with self.host.using(sandbox_id) as hosted:
            hosted.sandbox.close_session(name)

    def status(self, sandbox_id: str) -> dict[str, Any]:
        hosted = self.host.get(sandbox_id)
        return {
            "alive": hosted.alive,
            "stopped": hosted.stopped or hosted.sandbox.stopped,
            "episode_ended": hosted.episode_ended,
            "alerts": [a.to_dict() for a in hosted.sandbox.alerts],
        }

    def stop(self, sandbox_id: str, reason: str = "stopped") -> None:
        self.host.stop(sandbox_id, reason=reason)

    def delete(self, sandbox_id: str) -> None:
        self.host.delete(sandbox_id)

    def rock(self, sandbox_id: str, op: str, owner: str, *args: Any, **kwargs: Any) -> Any:
        """One of ``corral.serve.sandboxes.Sandboxes``'s calls, owner checked here."""
        if op not in _ROCK_OPS:
            raise ValueError(f"{op!r} is not a sandbox operation")
        return getattr(self.sandboxes, op)(sandbox_id, owner, *args, **kwargs)

    def metrics(self) -> bytes:
        """This host's Prometheus exposition (``corral.host.metrics``)."""
        return self._metrics.text()

    def close(self) -> None:
        self.fleet.close()
        self._sampler.close()
        self._metrics.close()
        self.host.close()
        self.host.ledger.close()


def _node() -> str:
    return socket.gethostname()
