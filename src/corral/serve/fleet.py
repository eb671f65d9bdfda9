"""What the live view reads and acts on: a fleet of hosts, behind one small protocol.

``corral serve`` runs one host, so ``HostFleet`` is a fleet of one over ``Host``; a
cluster (the Ray pool) can back the same page with a fleet that asks each node's host
and merges the answers. The page and its routes know only ``Fleet``.

Who sees what: a ``Caller`` sees the sandboxes it owns, and an operator sees every one.
That rule is applied here, once, for every method, so a route cannot forget it. A
sandbox or record the caller may not see is answered as not found, as the ROCK routes
answer, so ids cannot be probed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral import __version__
from corral.host import EventFeed, Host, Hosted, HostError, HostEvent, SandboxNotFound
from corral.host.usage import Sample, UsageSampler
from corral.ledger.chain import LedgerRecord
from corral.serve.timeline import LiveEvent, Timeline, incident, labels, live_event

# Live events kept for a page that opens after they happened.
RECENT_KEPT = 500
# Records of one action shown in its timeline, at most (a busy action can run thousands
# of processes; the page shows the first ones and says that more were left out).
TIMELINE_LIMIT = 400
# How far past the record the timeline looks for what was done about it.
AFTERMATH_SCAN = 300


class NotVisible(LookupError):
    """No such sandbox or record, or not the caller's (the two are not told apart)."""


class NotRunning(HostError):
    """The sandbox exists but can no longer be acted on in that way."""


@dataclass(frozen=True, slots=True)
class Caller:
    user: str
    operator: bool = False

    def sees(self, owner: str | None) -> bool:
        return self.operator or (owner is not None and owner == self.user)

    @property
    def owner(self) -> str | None:
        """The owner to ask the host for: None (anyone's) for an operator."""
        return None if self.operator else self.user


@dataclass(frozen=True, slots=True)
class HostInfo:
    name: str
    version: str
    started: float
    uptime_s: float
    running: int  # of the caller's sandboxes (every one, for an operator)
    frozen: int
    stopped: int


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    id: str
    host: str
    owner: str
    profile: str
    policy: str
    state: str  # running | frozen | stopped
    reason: str | None  # why it is frozen or stopped
    created: float
    run_id: str | None
    labels: Mapping[str, str]
    alerts: int
    cpus: float
    memory: int
    samples: tuple[Sample, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "owner": self.owner,
            "profile": self.profile,
            "policy": self.policy,
            "state": self.state,
            "reason": self.reason,
            "created": self.created,
            "run_id": self.run_id,
            "labels": dict(self.labels),
            "alerts": self.alerts,
            "cpus": self.cpus,
            "memory": self.memory,
            # [t, cpu cores, memory bytes, gpu percent] each, oldest first
            "samples": [s.to_list() for s in self.samples],
        }


Listener = Callable[[LiveEvent], None]


class Fleet(Protocol):
    """Hosts and their sandboxes as the live view sees them."""

    def hosts(self, caller: Caller) -> list[HostInfo]: ...

    def sandboxes(self, caller: Caller) -> list[SandboxInfo]: ...

    def recent(self, caller: Caller, limit: int) -> list[LiveEvent]:
        """The last ``limit`` live events the caller may see, oldest first."""
        ...

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Every live event from now on, whoever may see it (the caller filters: one
        subscription serves every open page); returns the unsubscribe."""
        ...

    def freeze(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo: ...

    def kill(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo: ...

    def timeline(self, caller: Caller, host: str | None, seq: int) -> Timeline: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class HostFleet:
    """A fleet of one: this process's ``Host``."""

    host: Host
    sampler: UsageSampler | None = None
    name: str = field(default_factory=socket.gethostname)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._recent: deque[LiveEvent] = deque(maxlen=RECENT_KEPT)
        self._feed: EventFeed[LiveEvent] = EventFeed()
        self._lock = threading.Lock()
        self._unsubscribe: Callable[[], None] | None = self.host.subscribe(self._on_event)

    # ------------------------------------------------------------------ reading
    def hosts(self, caller: Caller) -> list[HostInfo]:
        states = [h.state for h in self.host.sandboxes(caller.owner)]
        now = time.time()
        return [
            HostInfo(
                self.name,
                __version__,
                self.started,
                now - self.started,
                states.count("running"),
                states.count("frozen"),
                states.count("stopped"),
            )
        ]

    def sandboxes(self, caller: Caller) -> list[SandboxInfo]:
        order = {"running": 0, "frozen": 1, "stopped": 2}
        found = sorted(
            self.host.sandboxes(caller.owner), key=lambda h: (order[h.state], -h.created)
        )
        return [self._info(h) for h in found]

    def recent(self, caller: Caller, limit: int) -> list[LiveEvent]:
        with self._lock:
            events = [e for e in self._recent if caller.sees(e.owner)]
        return events[-limit:] if limit > 0 else []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._feed.subscribe(listener)

    def timeline(self, caller: Caller, host: str | None, seq: int) -> Timeline:
        if host not in (None, "", self.name):
            raise NotVisible(f"no host {host!r} in this fleet")
        ledger = self.host.ledger
        rec = ledger.get(seq)
        if rec is None or not caller.sees(labels(rec.body).get("owner")):
            raise NotVisible(f"no record {seq} on {self.name}")
        records: list[LedgerRecord] = [rec]
        if rec.action_id is not None:
            records = list(ledger.records(action_id=rec.action_id, limit=TIMELINE_LIMIT + 1))
        # What was done about it afterwards: notes, which carry no action id.
        after = list(ledger.records(since_seq=seq, kinds="note", limit=AFTERMATH_SCAN))
        return incident(self.name, rec, records, after, TIMELINE_LIMIT)

    # ------------------------------------------------------------------ acting
    def freeze(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo:
        try:
            h = self.host.freeze(sandbox_id, caller.owner, reason, by=caller.user)
        except SandboxNotFound as e:
            raise NotVisible(str(e)) from None
        except HostError as e:
            raise NotRunning(str(e)) from None
        return self._info(h)

    def kill(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo:
        try:
            h = self.host.stop(sandbox_id, caller.owner, reason, by=caller.user)
        except SandboxNotFound as e:
            raise NotVisible(str(e)) from None
        return self._info(h)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # ------------------------------------------------------------------ internals
    def _info(self, h: Hosted) -> SandboxInfo:
        sb = h.sandbox
        return SandboxInfo(
            id=h.id,
            host=self.name,
            owner=h.owner,
            profile=h.profile.name,
            policy=sb.policy.name,
            state=h.state,
            reason=h.stopped or sb.stopped,
            created=h.created,
            run_id=sb.run_id,
            labels={k: v for k, v in h.labels.items() if k not in ("owner", "sandbox")},
            alerts=len(sb.alerts),
            cpus=sb.spec.cpus,
            memory=sb.spec.memory,
            samples=self.sampler.samples(h.id) if self.sampler is not None else (),
        )

    def _on_event(self, e: HostEvent) -> None:
        event = live_event(self.name, e)
        if event is None:
            return
        with self._lock:
            self._recent.append(event)
        self._feed.publish(event)  # a failing listener is dropped, as the host's feed does
