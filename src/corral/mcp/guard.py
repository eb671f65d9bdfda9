"""One tool call through gate, auditor and ledger: what ``Sandbox.run`` does for a shell
command, for an ``Action`` of kind ``tool``.

The decision and the auditor's verdict are written to the ledger with the action's id
before anything runs, in the same records a shell command gets (``decision``, ``audit``);
the result follows as a ``tool`` record. A call the gate denies, or asks about with
nobody to answer, or the auditor flags, does not run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from corral.audit.preaction import ActionReview
from corral.ledger import Ledger
from corral.model import Action, ActionKind, AuditVerdict, Decision, Verdict
from corral.policy import Policy
from corral.policy.matching import Finding

# What a ``tool`` record keeps of a result: enough to see what came back, not a copy of
# every file an agent read.
RESULT_CHARS = 4000


@dataclass(frozen=True, slots=True)
class Outcome:
    """Whether a call may run. ``refused`` is "gate" or "audit" when it may not, and
    ``reason`` then says why, for the agent."""

    decision: Decision | None
    audit: AuditVerdict | None = None
    refused: str | None = None
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.refused is None


class ToolGuard:
    """Decides and records the tool calls of one agent (one MCP session, one gateway).

    ``gate=False`` skips the gate (containment alone, as ``corral exec --no-gate``);
    ``review`` shares an auditor's history with a sandbox, so that it sees the agent's
    commands and tool calls as one trajectory."""

    def __init__(
        self,
        policy: Policy,
        ledger: Ledger,
        *,
        workspace: str | os.PathLike[str],
        gate: bool = True,
        review: ActionReview | None = None,
        task: str | None = None,
        sandbox_id: str | None = None,
    ) -> None:
        self.policy = policy
        self.ledger = ledger
        self.workspace = os.fspath(workspace)
        self.gate = gate
        self.review = review
        self.task = task
        self.sandbox_id = sandbox_id
        self._tools = policy.tool_gate(self.workspace) if gate else None

    def listed(self, server: str, tool: str) -> Finding | None:
        """What the policy's lists say about a tool, before any call (None: allowed)."""
        return self._tools.listed(server, tool) if self._tools is not None else None

    def check(self, action: Action, *, audit: bool = True) -> Outcome:
        """Gate, then auditor (``audit=False``: the call is a command that the sandbox
        will show the auditor itself), each recorded before the call runs."""
        assert action.kind is ActionKind.TOOL
        decision: Decision | None = None
        if self.gate:
            decision = self.policy.check_action(action, workspace=self.workspace)
            self.ledger.append_decision(action, decision)
            if decision.verdict is Verdict.DENY:
                return Outcome(decision, refused="gate", reason=refusal(decision))
        verdict: AuditVerdict | None = None
        if audit and self.review is not None:
            verdict = self.review.review(self.task, action, decision)
            if verdict is not None:
                self.ledger.append(
                    "audit",
                    {**verdict.to_dict(), "action": action.to_dict()},
                    **self._where(action),
                )
                if verdict.flagged:
                    self.review.remember(action, None)
                    return Outcome(
                        decision, verdict, "audit", refusal(decision, verdict, self.review.on_flag)
                    )
        if decision is not None and decision.verdict is Verdict.ASK and verdict is None:
            # Nobody to ask: without an auditor to approve it, a question is a refusal.
            return Outcome(decision, refused="gate", reason=refusal(decision))
        return Outcome(decision, verdict)

    def record(
        self,
        action: Action,
        *,
        is_error: bool,
        text: str,
        duration_s: float,
        **fields: Any,
    ) -> None:
        """The result of a call that ran: a ``tool`` record, and the auditor's memory."""
        p = action.payload
        body = {
            "server": p.get("server"),
            "tool": p.get("tool"),
            "args": p.get("args"),
            "is_error": is_error,
            "duration_s": round(duration_s, 6),
            "chars": len(text),
            "result": text if len(text) <= RESULT_CHARS else text[:RESULT_CHARS] + "\n[...]",
            **fields,
        }
        self.ledger.append("tool", body, **self._where(action))
        if self.review is not None:
            self.review.remember(action, text)

    def _where(self, action: Action) -> dict[str, Any]:
        return {
            "run_id": action.run_id,
            "episode": action.episode,
            "step": action.step,
            "action_id": action.id,
            "sandbox_id": self.sandbox_id,
        }


def refusal(
    decision: Decision | None, audit: AuditVerdict | None = None, on_flag: Verdict = Verdict.DENY
) -> str:
    """Why a call did not run, for the agent: the verdict, who refused it (rule and
    category, or the auditor) and the reason."""
    if audit is not None:
        cat = f", {audit.category.value}" if audit.category else ""
        return f"corral: {on_flag.value} (auditor {audit.auditor}{cat}): the auditor flagged it: {audit.reason}"
    assert decision is not None
    cat = f", {decision.category.value}" if decision.category else ""
    return f"corral: {decision.verdict.value} ({decision.rule}{cat}): {decision.reason}"
