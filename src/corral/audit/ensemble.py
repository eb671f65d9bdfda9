"""Several auditors, one verdict: ``max`` (the most suspicious wins), ``mean`` (scores
averaged, verdict from the thresholds) or ``vote`` (the verdict most auditors gave; a tie
goes to the stricter one)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from corral.audit.protocol import Auditor, Thresholds
from corral.audit.trajectory import Step
from corral.errors import AuditorError
from corral.model import Action, AuditVerdict, Verdict

Aggregate = Literal["max", "mean", "vote"]
AGGREGATES: tuple[Aggregate, ...] = ("max", "mean", "vote")


class Ensemble:
    name = "ensemble"

    def __init__(
        self,
        auditors: Sequence[Auditor],
        aggregate: str = "max",
        thresholds: Thresholds | None = None,
    ) -> None:
        if not auditors:
            raise AuditorError("an ensemble needs at least one auditor")
        if aggregate not in AGGREGATES:
            raise AuditorError(
                f"unknown aggregation {aggregate!r} (known: {', '.join(AGGREGATES)})"
            )
        self.auditors = tuple(auditors)
        self.aggregate = aggregate
        self.thresholds = thresholds or Thresholds()
        self.version = " + ".join(str(getattr(a, "version", a.name)) for a in self.auditors)

    def review(self, task: str | None, history: Sequence[Step], action: Action) -> AuditVerdict:
        start = time.perf_counter()
        verdicts = [a.review(task, history, action) for a in self.auditors]
        return self.combine(verdicts, action, time.perf_counter() - start)

    async def areview(
        self, task: str | None, history: Sequence[Step], action: Action
    ) -> AuditVerdict:
        start = time.perf_counter()
        verdicts = await asyncio.gather(*(a.areview(task, history, action) for a in self.auditors))
        return self.combine(list(verdicts), action, time.perf_counter() - start)

    def combine(
        self, verdicts: Sequence[AuditVerdict], action: Action, latency: float
    ) -> AuditVerdict:
        top = max(verdicts, key=lambda v: (v.verdict.rank, v.score))
        if self.aggregate == "max":
            verdict, score, lead = top.verdict, top.score, top
        elif self.aggregate == "mean":
            score = sum(v.score for v in verdicts) / len(verdicts)
            verdict = self.thresholds.verdict(score)
            lead = top
        else:
            counts = Counter(v.verdict for v in verdicts)
            best = max(counts.values())
            verdict = max((v for v, n in counts.items() if n == best), key=lambda v: v.rank)
            agreeing = [v for v in verdicts if v.verdict is verdict]
            score = sum(v.score for v in agreeing) / len(agreeing)
            lead = max(agreeing, key=lambda v: v.score)
        parts = "; ".join(f"{v.auditor}: {v.verdict.value} {v.score:.2f}" for v in verdicts)
        return AuditVerdict(
            verdict=verdict,
            score=score,
            category=lead.category if verdict is not Verdict.ALLOW else None,
            reason=f"{lead.reason} [{self.aggregate} of {parts}]",
            auditor=self.name,
            signals=tuple(s for v in verdicts for s in v.signals),
            step=action.step,
            action_id=action.id,
            latency_s=latency,
            error=any(v.error for v in verdicts),
        )

    def close(self) -> None:
        for a in self.auditors:
            close = getattr(a, "close", None)
            if callable(close):
                close()
