"""The auditor before an action runs, for one sandbox: blocking, cheap by default.

The rule auditor reviews every action the gate lets through or asks about (it costs
about as much as the gate). A model (``llm`` or ``ensemble``) is asked only when the
action is risky: the gate asked about it, or the rule auditor's score is material.
What the auditor flags becomes the policy's ``audit.on_flag`` (deny, or ask: held for a
person, which in an unattended sandbox also means it does not run). A gate ``ask`` the
auditor clears runs: in an unattended rollout the auditor is the one who approves.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from corral.audit.protocol import Auditor
from corral.audit.review import make_auditor
from corral.audit.rules import RuleAuditor
from corral.audit.trajectory import Step
from corral.model import Action, AuditVerdict, Decision, Verdict
from corral.policy import Policy

HISTORY = 32  # steps kept for the auditor's view; the LLM sees the last few of these
OUTPUT_CHARS = 4000


class ActionReview:
    def __init__(self, policy: Policy, auditor: Auditor | None = None) -> None:
        spec = policy.spec.audit
        self.on_flag = spec.on_flag if spec.on_flag is not Verdict.ALLOW else Verdict.ASK
        self.cheap: RuleAuditor | None = None
        self.full: Auditor | None = None
        if auditor is not None:
            self.cheap = auditor if isinstance(auditor, RuleAuditor) else None
            self.full = None if self.cheap is not None else auditor
        elif spec.auditor == "rules":
            self.cheap = RuleAuditor(policy)
        elif spec.auditor in ("llm", "ensemble"):
            self.cheap = RuleAuditor(policy)
            self.full = make_auditor(spec.auditor, policy)
        self.history: collections.deque[Step] = collections.deque(maxlen=HISTORY)
        self._count = 0

    @property
    def active(self) -> bool:
        return self.cheap is not None or self.full is not None

    @property
    def name(self) -> str | None:
        a = self.full or self.cheap
        return a.name if a is not None else None

    def review(
        self, task: str | None, action: Action, gate: Decision | None
    ) -> AuditVerdict | None:
        history: Sequence[Step] = tuple(self.history)
        verdict = self.cheap.review(task, history, action) if self.cheap is not None else None
        if self.full is not None:
            risky = (
                verdict is None
                or (gate is not None and gate.verdict is Verdict.ASK)
                or verdict.score >= self.cheap.data.material  # type: ignore[union-attr]
            )
            if risky:
                verdict = self.full.review(task, history, action)
        return verdict

    def remember(self, action: Action, output: str | None, alerts: Sequence[str] = ()) -> None:
        """Keep a finished (or refused) action for the next reviews, with what it printed
        and what the watcher raised while it ran."""
        self._count += 1
        if output is not None and len(output) > OUTPUT_CHARS:
            output = output[: OUTPUT_CHARS // 2] + "\n[...]\n" + output[-OUTPUT_CHARS // 2 :]
        self.history.append(Step(self._count, action, output, alerts=tuple(alerts)))

    def close(self) -> None:
        close = getattr(self.full, "close", None)
        if callable(close):
            close()
