"""Auditing a whole trajectory, and building an auditor from a name and a policy.

Every verdict is written to the ledger as an ``audit`` record attributed to its step and
action, then one ``note`` with the trajectory's suspicion (the maximum over its steps:
one bad step makes a bad trajectory)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.audit.ensemble import Ensemble
from corral.audit.llm import LLMAuditor, LLMConfig
from corral.audit.protocol import Auditor
from corral.audit.rules import RuleAuditor
from corral.audit.trajectory import Trajectory
from corral.errors import AuditorError
from corral.ledger import Ledger
from corral.model import AuditVerdict, Verdict
from corral.policy import Policy

AUDITORS = ("rules", "llm", "ensemble")
KIND_AUDIT = "audit"


@dataclass(frozen=True, slots=True)
class TrajectoryReport:
    trajectory: Trajectory
    verdicts: tuple[AuditVerdict, ...]
    auditor: str

    @property
    def suspicion(self) -> float:
        return max((v.score for v in self.verdicts), default=0.0)

    @property
    def flagged(self) -> tuple[AuditVerdict, ...]:
        return tuple(v for v in self.verdicts if v.flagged)

    @property
    def verdict(self) -> Verdict:
        return max((v.verdict for v in self.verdicts), key=lambda v: v.rank, default=Verdict.ALLOW)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.trajectory.source,
            "task": self.trajectory.task,
            "auditor": self.auditor,
            "steps": len(self.verdicts),
            "flagged": [v.step for v in self.flagged],
            "suspicion": round(self.suspicion, 4),
            "verdict": self.verdict.value,
        }


def make_auditor(
    name: str,
    policy: Policy | str = "swe",
    *,
    llm_url: str | None = None,
    llm_model: str | None = None,
    aggregate: str | None = None,
) -> Auditor:
    """``rules``, ``llm`` or ``ensemble`` (rules + llm), configured from the policy's
    ``audit`` section, then the environment, then these arguments (strongest)."""
    pol = policy if isinstance(policy, Policy) else Policy.load(policy)
    spec = pol.spec.audit
    if name == "rules":
        return RuleAuditor(pol)
    if name == "llm":
        return LLMAuditor(_llm_config(pol, llm_url, llm_model))
    if name == "ensemble":
        return Ensemble(
            [RuleAuditor(pol), LLMAuditor(_llm_config(pol, llm_url, llm_model))],
            aggregate or spec.aggregate,
        )
    raise AuditorError(f"unknown auditor {name!r} (known: {', '.join(AUDITORS)})")


def _llm_config(pol: Policy, url: str | None, model: str | None) -> LLMConfig:
    s = pol.spec.audit.llm
    key = os.environ.get(s.api_key_env) if s.api_key_env else None
    return LLMConfig.from_env(
        url,
        model,
        default_url=s.url,
        default_model=s.model,
        api_key=key,
        timeout=s.timeout,
        retries=s.retries,
        failure_mode=Verdict(s.failure_mode),
    )


def audit_trajectory(
    auditor: Auditor,
    trajectory: Trajectory,
    *,
    ledger: Ledger | None = None,
    run_id: str | None = None,
    on_step: Callable[[AuditVerdict], None] | None = None,
) -> TrajectoryReport:
    """Review each step with the steps before it as history, in order."""
    verdicts: list[AuditVerdict] = []
    steps = trajectory.steps
    for i, step in enumerate(steps):
        v = auditor.review(trajectory.task, steps[:i], step.action)
        verdicts.append(v)
        if ledger is not None:
            _record(ledger, v, step.action.to_dict(), run_id)
        if on_step is not None:
            on_step(v)
    return _finish(auditor, trajectory, verdicts, ledger, run_id)


async def aaudit_trajectory(
    auditor: Auditor,
    trajectory: Trajectory,
    *,
    ledger: Ledger | None = None,
    run_id: str | None = None,
    concurrency: int = 8,
) -> TrajectoryReport:
    """The same, with up to ``concurrency`` steps in review at once (a finished
    trajectory's history is known up front); verdicts come back in step order."""
    gate = asyncio.Semaphore(max(1, concurrency))
    steps = trajectory.steps

    async def one(i: int) -> AuditVerdict:
        async with gate:
            return await auditor.areview(trajectory.task, steps[:i], steps[i].action)

    verdicts = list(await asyncio.gather(*(one(i) for i in range(len(steps)))))
    if ledger is not None:
        for v, step in zip(verdicts, steps, strict=True):
            _record(ledger, v, step.action.to_dict(), run_id)
    return _finish(auditor, trajectory, verdicts, ledger, run_id)


def _record(ledger: Ledger, v: AuditVerdict, action: dict[str, Any], run_id: str | None) -> None:
    ledger.append(
        KIND_AUDIT,
        {**v.to_dict(), "action": action},
        run_id=run_id,
        episode=action.get("episode"),
        step=v.step,
        action_id=v.action_id,
    )


def _finish(
    auditor: Auditor,
    trajectory: Trajectory,
    verdicts: list[AuditVerdict],
    ledger: Ledger | None,
    run_id: str | None,
) -> TrajectoryReport:
    report = TrajectoryReport(trajectory, tuple(verdicts), auditor.name)
    if ledger is not None:
        ledger.append_note(
            {
                "event": "trajectory audited",
                **report.to_dict(),
                "version": str(getattr(auditor, "version", auditor.name)),
            },
            run_id=run_id,
        )
    return report
