"""Ledger records as the live view shows them: one line per event in the stream, and
an incident's timeline. No I/O: records in, frozen dataclasses out, so every shape a
record can take is tested without a server.

Records come from many writers (the gate, the auditor, the watcher, the proxy, the host)
and a body may lack a field or carry one of another type; every reader here takes what
is there and shows an empty text for what is not, never raising.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.host import STARTED, STOPPED, HostEvent
from corral.ledger.chain import LedgerRecord


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
            what=command(action),
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
            what=command(body.get("action")),
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


# Notes after an incident that say what was done about it.
AFTERMATH = frozenset({"sandbox stopped", "sandbox frozen", "response failed", "sandbox closed"})


def incident(
    host: str,
    rec: LedgerRecord,
    of_action: list[LedgerRecord],
    after: list[LedgerRecord],
    limit: int,
) -> Timeline:
    """The timeline of ``rec``: the records of its action (``of_action``, cut at
    ``limit``) and, from the notes written ``after`` it, those about its sandbox's
    response, freeze or stop."""
    sandbox = labels(rec.body).get("sandbox", "")
    records = of_action[:limit]
    if all(r.seq != rec.seq for r in records):
        records.append(rec)
    seen = {r.seq for r in records}
    records += [
        r
        for r in after
        if r.seq not in seen
        and r.body.get("event") in AFTERMATH
        and labels(r.body).get("sandbox") == sandbox
    ]
    records.sort(key=lambda r: r.seq)
    decision = next((r for r in records if r.kind == "decision"), None)
    said = command(decision.body.get("action")) if decision is not None else ""
    return Timeline(
        host=host,
        seq=rec.seq,
        sandbox=sandbox,
        owner=labels(rec.body).get("owner", ""),
        run_id=rec.run_id,
        episode=rec.episode if rec.episode is not None else getattr(decision, "episode", None),
        step=rec.step if rec.step is not None else getattr(decision, "step", None),
        action_id=rec.action_id,
        command=said or None,
        entries=tuple(entry(r) for r in records),
        truncated=len(of_action) > limit,
    )


def entry(r: LedgerRecord) -> TimelineEntry:
    """One ledger record as a timeline line."""
    b = r.body
    label, text, pid = r.kind, "", None
    if r.kind == "decision":
        d = _map(b.get("decision"))
        verdict = _str(d.get("decision"))
        label = f"gate {verdict}"
        text = command(b.get("action"))
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


def labels(body: Mapping[str, Any]) -> Mapping[str, str]:
    """The labels the host put on a record (owner, sandbox, profile, the client's)."""
    labels = body.get("labels")
    return labels if isinstance(labels, Mapping) else {}


def command(action: object) -> str:
    """An action's text: its shell command, argv, tool or path."""
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
