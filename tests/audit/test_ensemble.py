"""Ensembles combine auditors by max, mean or vote."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from corral.audit import Auditor, Ensemble, Step, Thresholds
from corral.errors import AuditorError
from corral.model import Action, AuditVerdict, Category, Verdict


class Fixed:
    """An auditor that always gives the same verdict (to test the combining alone)."""

    def __init__(
        self, name: str, verdict: Verdict, score: float, category: Category | None = None
    ) -> None:
        self.name = name
        self.v = (verdict, score, category)

    def review(self, task: str | None, history: Sequence[Step], action: Action) -> AuditVerdict:
        verdict, score, category = self.v
        return AuditVerdict(
            verdict,
            score,
            category,
            f"{self.name} says {verdict.value}",
            self.name,
            (f"{self.name}:x",),
            action.step,
            action.id,
        )

    async def areview(
        self, task: str | None, history: Sequence[Step], action: Action
    ) -> AuditVerdict:
        return self.review(task, history, action)


A = Fixed("a", Verdict.ALLOW, 0.1)
B = Fixed("b", Verdict.DENY, 0.9, Category.TUNNEL)
C = Fixed("c", Verdict.ALLOW, 0.2)
ACT = Action.shell("ssh -R 1:x:1 h", step=7)


def test_fixed_is_an_auditor() -> None:
    assert isinstance(A, Auditor)


def test_max_takes_the_most_suspicious() -> None:
    v = Ensemble([A, B, C], "max").review("t", (), ACT)
    assert (v.verdict, v.score, v.category, v.step) == (Verdict.DENY, 0.9, Category.TUNNEL, 7)
    assert "b says deny" in v.reason and "a: allow 0.10" in v.reason
    assert v.signals == ("a:x", "b:x", "c:x")


def test_mean_averages_then_applies_thresholds() -> None:
    v = Ensemble([A, B, C], "mean").review("t", (), ACT)
    assert v.score == pytest.approx(0.4) and v.verdict is Verdict.ALLOW and v.category is None
    w = Ensemble([A, B], "mean", Thresholds(ask=0.5, deny=0.8)).review("t", (), ACT)
    assert w.verdict is Verdict.ASK and w.category is Category.TUNNEL


def test_vote_takes_the_majority_and_ties_go_to_the_stricter() -> None:
    assert Ensemble([A, B, C], "vote").review("t", (), ACT).verdict is Verdict.ALLOW
    tie = Ensemble([A, B], "vote").review("t", (), ACT)
    assert tie.verdict is Verdict.DENY and tie.score == pytest.approx(0.9)


def test_async_gathers_all() -> None:
    v = asyncio.run(Ensemble([A, B], "max").areview("t", (), ACT))
    assert v.verdict is Verdict.DENY


def test_bad_ensembles_are_refused() -> None:
    with pytest.raises(AuditorError, match="known: max, mean, vote"):
        Ensemble([A], "median")
    with pytest.raises(AuditorError, match="at least one"):
        Ensemble([], "max")


def test_the_policy_audit_section_is_validated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from corral.errors import PolicyError
    from corral.policy import Policy

    f = tmp_path / "p.yaml"
    f.write_text(
        "version: 1\nextends: swe\naudit:\n  auditor: llm\n  llm: {url: http://h/v1, failure_mode: allow}\n"
    )
    with pytest.raises(
        PolicyError, match=r"p\.yaml:5: audit\.llm\.failure_mode: must be 'deny' or 'ask'"
    ):
        Policy.load(f)
    f.write_text("version: 1\naudit:\n  aggregate: median\n")
    with pytest.raises(PolicyError, match=r"audit\.aggregate: .*did you mean 'mean'"):
        Policy.load(f)
    ok = Policy.from_dict(
        {"version": 1, "audit": {"auditor": "ensemble", "llm": {"timeout": "3s"}}}
    )
    assert ok.spec.audit.llm.timeout == 3.0 and ok.spec.audit.aggregate == "max"
