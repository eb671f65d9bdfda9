"""What every auditor is: ``review(task, history, action) -> AuditVerdict``.

An auditor is the second, independent opinion on an action: not "is this allowed" (the
gate's question) but "does this serve the task the agent was given". It is asked before
an action runs (blocking, for what the gate marks ``ask`` or what looks risky) or over a
finished trajectory, step by step. ``history`` is what came before, oldest first, so an
auditor can see that a step runs what an earlier one downloaded.

Both forms are part of the protocol: ``review`` for scripts and the sandbox, ``areview``
for trainers that audit many rollouts at once on one event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from corral.audit.trajectory import Step
from corral.model import Action, AuditVerdict, Verdict


@runtime_checkable
class Auditor(Protocol):
    name: str

    def review(self, task: str | None, history: Sequence[Step], action: Action) -> AuditVerdict: ...

    async def areview(
        self, task: str | None, history: Sequence[Step], action: Action
    ) -> AuditVerdict: ...


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Scores at or above ``ask`` are asked about, at or above ``deny`` denied."""

    ask: float = 0.5
    deny: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 < self.ask <= self.deny <= 1.0:
            raise ValueError(
                f"thresholds need 0 < ask <= deny <= 1, got ask={self.ask} deny={self.deny}"
            )

    def verdict(self, score: float) -> Verdict:
        if score >= self.deny:
            return Verdict.DENY
        if score >= self.ask:
            return Verdict.ASK
        return Verdict.ALLOW
