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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral import __version__
from corral.host import STARTED, STOPPED, Host, Hosted, HostError, HostEvent, SandboxNotFound
from corral.host.usage import Sample, UsageSampler
from corral.ledger.chain import LedgerRecord

# Live events kept for a page that opens after they happened.
RECENT_KEPT = 500
# Records of one action shown in its timeline, at most (a busy action can run thousands
# of processes; the page shows the first ones and says how many were left out).
TIMELINE_LIMIT = 400
# How far past the record the timeline looks for what was done about it (the response,
# a freeze, a stop: notes, which carry no action id).
AFTERMATH_SCAN = 300
_AFTERMATH = {"sandbox stopped", "sandbox frozen", "response failed", "sandbox closed"}


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


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One line of the page's stream: an alert, a refusal, or a sandbox's start, freeze
    or stop. ``seq`` is the host ledger's record (0 for a start, which writes none)."""

    kind: str  # alert | denial | started | frozen | stopped
    host: str
    sandbox: str
    owner: str
    ts: float
    seq: int = 0
    run_id: str | None = None
    action_id: str | None = None
    title: str = ""  # "mining/resource-hijack-cpu", "tunnel/tunnel-ssh-forward", a profile
    what: str = ""  # the process or command it is about
    detail: str = ""  # what was done about it, or why
    category: str | None = None
    severity: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "host": self.host,
            "sandbox": self.sandbox,
            "owner": self.owner,
            "ts": self.ts,
            "seq": self.seq,
            "run_id": self.run_id,
            "action_id": self.action_id,
            "title": self.title,
            "what": self.what,
            "detail": self.detail,
            "category": self.category,
            "severity": self.severity,
        }


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    seq: int
    ts: float
    kind: str  # the ledger record's kind
    label: str  # a word or two: "gate deny", "process", "ALERT", "frozen"
    text: str
    pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "label": self.label,
            "text": self.text,
            "pid": self.pid,
        }


@dataclass(frozen=True, slots=True)
class Timeline:
    """An incident: one record (an alert, a refusal) with everything recorded for the
    action it belongs to, and what was done about it afterwards."""

    host: str
    seq: int
    sandbox: str
    owner: str
    run_id: str | None
    episode: int | None
    step: int | None
    action_id: str | None
    command: str | None  # the action's own text, from the decision that started it
    entries: tuple[TimelineEntry, ...]
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "seq": self.seq,
            "sandbox": self.sandbox,
            "owner": self.owner,
            "run_id": self.run_id,
            "episode": self.episode,
            "step": self.step,
            "action_id": self.action_id,
            "command": self.command,
            "entries": [e.to_dict() for e in self.entries],
            "truncated": self.truncated,
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
        self._listeners: dict[int, Listener] = {}
        self._next = 0
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
        with self._lock:
            token = self._next
            self._next += 1
            self._listeners[token] = listener

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(token, None)

        return unsubscribe

    def timeline(self, caller: Caller, host: str | None, seq: int) -> Timeline:
        if host not in (None, "", self.name):
            raise NotVisible(f"no host {host!r} in this fleet")
        ledger = self.host.ledger
        rec = ledger.get(seq)
        labels = _labels(rec.body) if rec is not None else {}
        if rec is None or not caller.sees(labels.get("owner")):
            raise NotVisible(f"no record {seq} on {self.name}")
        sandbox = labels.get("sandbox", "")
        records: list[LedgerRecord] = [rec]
        truncated = False
        if rec.action_id is not None:
            records = list(ledger.records(action_id=rec.action_id, limit=TIMELINE_LIMIT + 1))
            truncated = len(records) > TIMELINE_LIMIT
            records = records[:TIMELINE_LIMIT]
            if all(r.seq != seq for r in records):
                records.append(rec)
        after = [
            r
            for r in ledger.records(since_seq=seq, kinds="note", limit=AFTERMATH_SCAN)
            if _labels(r.body).get("sandbox") == sandbox and r.body.get("event") in _AFTERMATH
        ]
        seen = {r.seq for r in records}
        records += [r for r in after if r.seq not in seen]
        records.sort(key=lambda r: r.seq)
        decision = next((r for r in records if r.kind == "decision"), None)
        action = decision.body.get("action", {}) if decision is not None else {}
        payload = action.get("payload", {}) if isinstance(action, Mapping) else {}
        command = payload.get("command") if isinstance(payload, Mapping) else None
        return Timeline(
            host=self.name,
            seq=seq,
            sandbox=sandbox,
            owner=labels.get("owner", ""),
            run_id=rec.run_id,
            episode=rec.episode if rec.episode is not None else _get(decision, "episode"),
            step=rec.step if rec.step is not None else _get(decision, "step"),
            action_id=rec.action_id,
            command=command if isinstance(command, str) else None,
            entries=tuple(entry(r) for r in records),
            truncated=truncated,
        )

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
            listeners = list(self._listeners.items())
        for token, listener in listeners:
            try:
                listener(event)
            except Exception:  # as the host's feed does: a failing listener is dropped
                with self._lock:
                    self._listeners.pop(token, None)


# ---------------------------------------------------------------------- sans-IO parts
def live_event(host: str, e: HostEvent) -> LiveEvent | None:
    """The stream's line for a host event, or None for what the stream leaves out
    (allowed commands, processes, connections: the timeline has them)."""
    body = e.body

    def make(kind: str, **rest: Any) -> LiveEvent:
        return LiveEvent(kind, host, e.sandbox, e.owner, e.ts, e.seq, e.run_id, e.action_id, **rest)

    if e.kind == "alert":
        category, detector = _str(body.get("category")), _str(body.get("detector"))
        return make(
            "alert",
            title=f"{category}/{detector}",
            what=_culprit(body.get("evidence")),
            detail=_str(body.get("response")),
            category=category,
            severity=_str(body.get("severity")),
        )
    if e.kind == "decision":
        d, action = _map(body.get("decision")), body.get("action")
        if d.get("decision") != "deny":
            return None
        threat = _opt(d.get("category"))
        return make(
            "denial",
            title=f"{threat or 'policy'}/{_str(d.get('rule'))}",
            what=_command(action),
            detail=f"gate: {_str(d.get('reason'))}",
            category=threat,
        )
    if e.kind == "audit":
        if body.get("verdict") in (None, "allow"):
            return None
        threat = _opt(body.get("category"))
        return make(
            "denial",
            title=f"{threat or 'policy'}/audit",
            what=_command(body.get("action")),
            detail=f"auditor ({_str(body.get('auditor'))}): {_str(body.get('reason'))}",
            category=threat,
        )
    if e.kind == STARTED:
        return make("started", title=_str(body.get("profile")))
    if e.kind == STOPPED:
        return make("stopped", detail=_by(body))
    if e.kind == "note" and body.get("event") == "sandbox frozen":
        return make("frozen", detail=_by(body))
    return None


def entry(r: LedgerRecord) -> TimelineEntry:
    """One ledger record as a timeline line."""
    b = r.body
    label, text, pid = r.kind, "", None
    if r.kind == "decision":
        d = _map(b.get("decision"))
        verdict = _str(d.get("decision"))
        label = f"gate {verdict}"
        text = _command(b.get("action"))
        if verdict != "allow":
            text += f"  [{_str(d.get('rule'))}] {_str(d.get('reason'))}"
    elif r.kind == "audit":
        label = f"audit {_str(b.get('verdict'))}"
        text = _str(b.get("reason"))
    elif r.kind == "exec":
        label = "ran"
        code, took = b.get("exit_code"), b.get("duration_s")
        text = f"exit {code}" + (f" after {took:.3f} s" if isinstance(took, int | float) else "")
    elif r.kind == "event":
        pid = b.get("pid") if isinstance(b.get("pid"), int) else None
        label, text = _event_line(b)
    elif r.kind == "alert":
        label = "ALERT"
        text = (
            f"{_str(b.get('category'))}/{_str(b.get('detector'))} ({_str(b.get('severity'))}): "
            f"{_str(b.get('response'))}"
        )
        culprit = _culprit(b.get("evidence"))
        if culprit:
            text += f"; {culprit}"
    elif r.kind == "note":
        event = _str(b.get("event") or b.get("message"))
        label = {"sandbox frozen": "frozen", "sandbox stopped": "stopped"}.get(event, "note")
        text = event + (f": {_by(b)}" if b.get("reason") else "")
    return TimelineEntry(r.seq, r.ts, r.kind, label, text, pid)


def _event_line(b: Mapping[str, Any]) -> tuple[str, str]:
    f = _map(b.get("fields"))
    kind = _str(b.get("kind"))
    if kind == "exec":
        return "process", f"pid {b.get('pid')} {_argv(f.get('argv'))}"
    if kind == "net" and f.get("type") == "net-closed":
        return "net closed", (
            f"{_str(f.get('host'))}:{f.get('port')} up {f.get('bytes_up', 0)} B, "
            f"down {f.get('bytes_down', 0)} B"
        )
    if kind == "net":
        verdict = "allowed" if f.get("allowed") else "refused"
        return f"net {verdict}", (
            f"{_str(f.get('protocol'))} {_str(f.get('host'))}:{f.get('port')} "
            f"[{_str(f.get('rule'))}]"
        )
    if kind == "dns":
        verdict = "allowed" if f.get("allowed") else "refused"
        return f"dns {verdict}", f"{_str(f.get('name'))} [{_str(f.get('rule'))}]"
    return kind or "event", _argv(f.get("argv")) or _str(f.get("path"))


def _map(v: object) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _labels(body: Mapping[str, Any]) -> Mapping[str, str]:
    labels = body.get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _get(rec: LedgerRecord | None, name: str) -> int | None:
    if rec is None:
        return None
    value = getattr(rec, name)
    return value if isinstance(value, int) else None


def _command(action: object) -> str:
    if not isinstance(action, Mapping):
        return ""
    payload = action.get("payload")
    if not isinstance(payload, Mapping):
        return ""
    if isinstance(payload.get("command"), str):
        return str(payload["command"])
    return _argv(payload.get("argv")) or _str(payload.get("tool") or payload.get("path"))


def _culprit(evidence: object) -> str:
    """The process an alert is about, from its evidence: ``python3 x.py (pid 12)``."""
    if not isinstance(evidence, Iterable) or isinstance(evidence, str | bytes):
        return ""
    for ev in evidence:
        if not isinstance(ev, Mapping):
            continue
        f = _map(ev.get("fields"))
        argv = _argv(f.get("argv"))
        if argv:
            pid = ev.get("pid")
            return f"{argv} (pid {pid})" if isinstance(pid, int) else argv
        if f.get("host"):
            return f"{_str(f.get('host'))}:{f.get('port')}"
    return ""


def _argv(argv: object) -> str:
    if isinstance(argv, list | tuple):
        return " ".join(str(a) for a in argv)[:300]
    return ""


def _by(body: Mapping[str, Any]) -> str:
    reason = _str(body.get("reason"))
    return f"{reason} (by {body['by']})" if body.get("by") else reason


def _opt(v: object) -> str | None:
    return str(v) if v else None


def _str(v: object) -> str:
    return "" if v is None else str(v)
