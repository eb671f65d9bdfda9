"""The detector engine: events in, matches out.

Pure and single-threaded: no clocks (every event carries its own ``t``), no I/O, no
threads. The watcher owns one engine per sandbox (or one for many: all state is keyed
by sandbox) and feeds it every event it observes; ``feed`` answers with the rules that
fired, their response after the policy's overrides, and the evidence.

State kept, and when it goes:
- per (sandbox, pid): the rules that already fired for that process (a process is
  reported once per rule, not once per sample) and, for ``sustained`` rules, since when
  the conditions have held. Dropped by ``forget_pid``, by an ``exit`` event, or with the
  sandbox by ``forget``;
- per (sandbox, rule): a ``burst`` rule's sliding window, emptied when it fires.

Rules are indexed by event kind, so an event no rule looks at costs one dict lookup.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.errors import PolicyError
from corral.policy.schema import DetectorOverride
from corral.watch.rules import (
    MAX_EVIDENCE,
    RESPONSES,
    Burst,
    DetectorRule,
    DetectorRules,
    EventView,
    load_detectors,
)

# A burst window holds at most this many events (a flood to one port must not grow it
# without bound); the oldest go first, which can only delay a match, never invent one.
MAX_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class Match:
    rule: DetectorRule
    response: str  # after policy overrides
    reason: str  # the rule's reason with placeholders filled
    sandbox: str
    pid: int | None
    action_id: str | None
    # The triggering event(s): for sustained rules the first and the last, for burst
    # rules one event per distinct value in the window (at most 50).
    evidence: tuple[dict[str, Any], ...]
    t: float

    @property
    def category(self) -> str:
        return self.rule.category.value

    @property
    def severity(self) -> str:
        return self.rule.severity.value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form for the ledger."""
        return {
            "detector": self.rule.id,
            "category": self.rule.category.value,
            "severity": self.rule.severity.value,
            "response": self.response,
            "reason": self.reason,
            "tags": list(self.rule.tags),
            "sandbox": self.sandbox,
            "pid": self.pid,
            "action_id": self.action_id,
            "t": self.t,
            "evidence": [dict(e) for e in self.evidence],
        }


@dataclass(frozen=True, slots=True)
class _Armed:
    """A rule as this engine runs it: enabled, with the response the policy chose."""

    rule: DetectorRule
    response: str
    sustained: float | None
    burst: Burst | None


class _Proc:
    __slots__ = ("fired", "since")

    def __init__(self) -> None:
        self.fired: set[str] = set()
        # (rule id, gpu index or None) -> (t0, first event)
        self.since: dict[tuple[str, Any], tuple[float, dict[str, Any]]] = {}


class _Window:
    __slots__ = ("counts", "events")

    def __init__(self) -> None:
        self.events: deque[tuple[float, Any, dict[str, Any]]] = deque()
        self.counts: dict[Any, int] = {}

    def push(self, t: float, value: Any, event: dict[str, Any], within: float) -> None:
        self.events.append((t, value, event))
        self.counts[value] = self.counts.get(value, 0) + 1
        horizon = t - within
        events, counts = self.events, self.counts
        while events and (events[0][0] < horizon or len(events) > MAX_WINDOW):
            _, old, _ = events.popleft()
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]

    def evidence(self) -> tuple[dict[str, Any], ...]:
        """One event per distinct value (its first in the window), oldest first."""
        seen: set[Any] = set()
        out: list[dict[str, Any]] = []
        for _, value, event in self.events:
            if value not in seen:
                seen.add(value)
                out.append(event)
                if len(out) >= MAX_EVIDENCE:
                    break
        return tuple(out)


def _distinct(event: Mapping[str, Any], key: str) -> Any:
    value = event.get(key)
    if value is None:
        # A refused connection may have no address yet; its host stands in for it.
        fallback = {"ip": "host", "host": "name", "name": "host"}.get(key)
        value = event.get(fallback) if fallback else None
    if isinstance(value, str):
        value = value.lower()
    return value


def _override(rule_id: str, value: Any) -> tuple[bool, str | None]:
    """(enabled, response) from a ``DetectorOverride`` or the same as a mapping."""
    if isinstance(value, Mapping):
        enabled, response = value.get("enabled", True), value.get("response")
    else:
        enabled, response = getattr(value, "enabled", True), getattr(value, "response", None)
    if response is not None and response not in RESPONSES:
        raise PolicyError(
            f"unknown response {response!r} (known: {', '.join(RESPONSES)})",
            key=f"detectors.{rule_id}.response",
        )
    return bool(enabled), response


class Engine:
    """Matches events against detector rules, with a policy's overrides applied."""

    def __init__(
        self,
        rules: DetectorRules | None = None,
        overrides: Mapping[str, DetectorOverride] | None = None,
    ) -> None:
        self.rules = rules if rules is not None else load_detectors()
        overrides = overrides or {}
        known = {r.id for r in self.rules.rules}
        # Override ids that name no rule: a typo in a policy, for the caller to report.
        self.unknown_overrides: tuple[str, ...] = tuple(sorted(set(overrides) - known))
        by_kind: dict[str, list[_Armed]] = {}
        for rule in self.rules.rules:
            enabled, response = (
                _override(rule.id, overrides[rule.id]) if rule.id in overrides else (True, None)
            )
            if not enabled:
                continue
            armed = _Armed(rule, response or rule.response, rule.sustained, rule.burst)
            by_kind.setdefault(rule.on, []).append(armed)
        self._by_kind: dict[str, tuple[_Armed, ...]] = {k: tuple(v) for k, v in by_kind.items()}
        self._procs: dict[str, dict[int | None, _Proc]] = {}
        self._windows: dict[str, dict[str, _Window]] = {}

    @property
    def active(self) -> tuple[DetectorRule, ...]:
        """The rules this engine runs (enabled after overrides)."""
        return tuple(a.rule for armed in self._by_kind.values() for a in armed)

    def response_for(self, rule_id: str) -> str | None:
        """The response this engine gives for ``rule_id``; None when it is off."""
        for armed in self._by_kind.values():
            for a in armed:
                if a.rule.id == rule_id:
                    return a.response
        return None

    def feed(self, event: Mapping[str, Any]) -> list[Match]:
        """Match one event; the rules that fired, in rule-file order."""
        kind = event.get("kind")
        armed = self._by_kind.get(kind)  # type: ignore[arg-type]
        if armed is None:
            if kind == "exit":
                self.forget_pid(event.get("sandbox"), event.get("pid"))  # type: ignore[arg-type]
            return []
        sandbox: str = event.get("sandbox")  # type: ignore[assignment]
        pid: int | None = event.get("pid")
        procs = self._procs.get(sandbox)
        proc = procs.get(pid) if procs else None
        out: list[Match] = []
        view = EventView(event, self.rules.interpreters)
        for a in armed:
            rule = a.rule
            if a.burst is not None:
                if rule.matches(view):
                    match = self._burst(a, a.burst, event, sandbox)
                    if match is not None:
                        out.append(match)
                continue
            if proc is not None and rule.id in proc.fired:
                continue
            holds = rule.matches(view)
            if a.sustained is not None:
                key = (rule.id, event.get("gpu"))
                if not holds:
                    if proc is not None:
                        proc.since.pop(key, None)
                    continue
                if proc is None:
                    proc = self._proc(sandbox, pid)
                t = _time(event)
                start = proc.since.get(key)
                if start is None:
                    proc.since[key] = (t, dict(event))
                    continue
                if t - start[0] < a.sustained:
                    continue
                del proc.since[key]
                evidence: tuple[dict[str, Any], ...] = (start[1], dict(event))
            elif not holds:
                continue
            else:
                evidence = (dict(event),)
            if proc is None:
                proc = self._proc(sandbox, pid)
            proc.fired.add(rule.id)
            out.append(self._match(a, event, sandbox, evidence))
        return out

    def forget(self, sandbox: str) -> None:
        """Drop everything known about a closed sandbox."""
        self._procs.pop(sandbox, None)
        self._windows.pop(sandbox, None)

    def forget_pid(self, sandbox: str, pid: int) -> None:
        """Drop what is known about one process (it exited; its pid may come back)."""
        procs = self._procs.get(sandbox)
        if procs is not None and procs.pop(pid, None) is not None and not procs:
            del self._procs[sandbox]

    # ---- internals ----------------------------------------------------------------

    def _proc(self, sandbox: str, pid: int | None) -> _Proc:
        procs = self._procs.setdefault(sandbox, {})
        proc = procs.get(pid)
        if proc is None:
            proc = procs[pid] = _Proc()
        return proc

    def _burst(
        self, a: _Armed, burst: Burst, event: Mapping[str, Any], sandbox: str
    ) -> Match | None:
        value = _distinct(event, burst.distinct)
        if value is None:
            return None
        windows = self._windows.setdefault(sandbox, {})
        window = windows.get(a.rule.id)
        if window is None:
            window = windows[a.rule.id] = _Window()
        window.push(_time(event), value, dict(event), burst.within)
        if len(window.counts) < burst.count:
            return None
        del windows[a.rule.id]  # once per window: the next burst starts from nothing
        return self._match(a, event, sandbox, window.evidence())

    def _match(
        self,
        a: _Armed,
        event: Mapping[str, Any],
        sandbox: str,
        evidence: tuple[dict[str, Any], ...],
    ) -> Match:
        return Match(
            rule=a.rule,
            response=a.response,
            reason=a.rule.describe(event),
            sandbox=sandbox,
            pid=event.get("pid"),
            action_id=event.get("action_id"),
            evidence=evidence,
            t=_time(event),
        )


def _time(event: Mapping[str, Any]) -> float:
    t = event.get("t")
    return float(t) if isinstance(t, int | float) else 0.0
