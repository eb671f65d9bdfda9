"""The data model shared by every stage of the pipeline.

One module, imported everywhere: the gate produces ``Decision``s about ``Action``s, the
sandbox and watcher produce ``Event``s, detectors produce ``Alert``s, and the ledger
records all four. Records are frozen so that what was decided cannot be changed after the
fact; ``to_dict`` gives the canonical JSON-able form the ledger hashes.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class Category(enum.StrEnum):
    """What a risky action or event is, shared by gate, detectors, auditor and evaluation."""

    MINING = "mining"
    TUNNEL = "tunnel"
    EXFILTRATION = "exfiltration"
    INGRESS = "ingress"
    CREDENTIAL_ACCESS = "credential-access"
    PERSISTENCE = "persistence"
    PRIVILEGE_ESCALATION = "privilege-escalation"
    ESCAPE = "escape"
    DEFENSE_EVASION = "defense-evasion"
    RECON = "recon"
    DESTRUCTION = "destruction"
    # Not a threat: a decision the policy made for a reason of its own (program not on the
    # allowlist, network mode none, a parse failure that is not evasion).
    POLICY = "policy"


class Verdict(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"

    @property
    def rank(self) -> int:
        """Strictness order used to combine verdicts: deny > ask > allow."""
        return _VERDICT_RANK[self]


_VERDICT_RANK = {Verdict.ALLOW: 0, Verdict.ASK: 1, Verdict.DENY: 2}


class ActionKind(enum.StrEnum):
    SHELL = "shell"
    EXEC = "exec"
    FILE_READ = "file_read"
    FILE_WRITE = "file_write"
    HTTP = "http"
    TOOL = "tool"


class EventKind(enum.StrEnum):
    EXEC = "exec"
    EXIT = "exit"
    NET = "net"
    DNS = "dns"
    RESOURCE = "resource"
    GPU = "gpu"
    FILE = "file"


class Severity(enum.StrEnum):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


def new_id() -> str:
    """A random 128-bit id as 32 hex digits (the shape of ``uuid4().hex``, five times
    cheaper to make: one is made per action, event and alert)."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class Action:
    """Something an agent asked to do, before it runs.

    ``payload`` holds the kind-specific part: ``{"command": str}`` for shell,
    ``{"argv": [...]}`` for exec, ``{"path": str}`` for file ops, ``{"url": str,
    "method": str}`` for http, ``{"tool": str, "server": str, "args": {...}}`` for tools.
    """

    kind: ActionKind
    payload: dict[str, Any]
    id: str = field(default_factory=new_id)
    run_id: str | None = None
    episode: int | None = None
    step: int | None = None
    task: str | None = None
    time: float = field(default_factory=time.time)

    @classmethod
    def shell(cls, command: str, **kw: Any) -> Action:
        return cls(kind=ActionKind.SHELL, payload={"command": command}, **kw)

    def to_dict(self) -> dict[str, Any]:
        # Written out rather than dataclasses.asdict: this runs once per recorded action
        # and asdict's deep copy was a third of the ledger's append cost.
        return {
            "kind": self.kind.value,
            "payload": dict(self.payload),
            "id": self.id,
            "run_id": self.run_id,
            "episode": self.episode,
            "step": self.step,
            "task": self.task,
            "time": self.time,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer about one action. ``reason`` is written for the agent to read."""

    verdict: Verdict
    rule: str
    category: Category | None
    reason: str
    latency_s: float = 0.0
    action_id: str | None = None
    policy_hash: str | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    def to_dict(self) -> dict[str, Any]:
        """The public JSON shape (``corral check --json``)."""
        return {
            "decision": self.verdict.value,
            "rule": self.rule,
            "category": self.category.value if self.category else None,
            "reason": self.reason,
            "latency_ms": round(self.latency_s * 1000, 4),
            "action_id": self.action_id,
            "policy_hash": self.policy_hash,
        }


@dataclass(frozen=True, slots=True)
class Event:
    """Something observed while an action ran (exec, exit, connection, resource sample)."""

    kind: EventKind
    sandbox_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    ppid: int | None = None
    action_id: str | None = None
    time: float = field(default_factory=time.time)
    id: str = field(default_factory=new_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        """The inverse of ``to_dict`` (a record read back from the ledger or the wire)."""
        return cls(
            EventKind(d["kind"]),
            d["sandbox_id"],
            dict(d.get("fields") or {}),
            d.get("pid"),
            d.get("ppid"),
            d.get("action_id"),
            d["time"],
            d["id"],
        )


@dataclass(frozen=True, slots=True)
class Alert:
    """A detector's finding, with the events that triggered it and what was done about it."""

    detector: str
    category: Category
    severity: Severity
    evidence: tuple[Event, ...] = ()
    response: str | None = None
    action_id: str | None = None
    sandbox_id: str | None = None
    time: float = field(default_factory=time.time)
    id: str = field(default_factory=new_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        """The inverse of ``to_dict``."""
        return cls(
            d["detector"],
            Category(d["category"]),
            Severity(d["severity"]),
            tuple(Event.from_dict(e) for e in d.get("evidence") or ()),
            d.get("response"),
            d.get("action_id"),
            d.get("sandbox_id"),
            d["time"],
            d["id"],
        )


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    """An auditor's judgement of one action against the agent's task.

    ``score`` is the suspicion, 0 (plainly serves the task) to 1 (plainly does not);
    ``verdict`` follows from it by the auditor's thresholds. ``signals`` names what the
    judgement rests on (gate and detector rule ids, audit check ids). ``error`` is set
    when the auditor could not judge (an endpoint timed out, a reply was malformed) and
    the verdict is its configured failure mode, not an opinion.
    """

    verdict: Verdict
    score: float
    category: Category | None
    reason: str
    auditor: str
    signals: tuple[str, ...] = ()
    step: int | None = None
    action_id: str | None = None
    latency_s: float = 0.0
    error: bool = False

    @property
    def flagged(self) -> bool:
        return self.verdict is not Verdict.ALLOW

    def to_dict(self) -> dict[str, Any]:
        """The public JSON shape (``corral audit --json``)."""
        return {
            "step": self.step,
            "verdict": self.verdict.value,
            "score": round(self.score, 4),
            "category": self.category.value if self.category else None,
            "reason": self.reason,
            "auditor": self.auditor,
            "signals": list(self.signals),
            "action_id": self.action_id,
            "latency_ms": round(self.latency_s * 1000, 4),
            "error": self.error,
        }
