"""The auditor inside a sandbox: before each action, blocking, recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.ledger import Ledger
from corral.model import Category, Verdict
from corral.policy import Policy
from corral.sandbox import Sandbox
from tests.audit.chatserver import chat_server

TASK = "Fix the failing test in tests/test_dates.py."


def _policy(auditor: str, on_flag: str = "deny", **llm: object) -> Policy:
    return Policy.from_dict(
        {
            "version": 1,
            "extends": "swe",
            "network": {"mode": "none"},
            "audit": {"auditor": auditor, "on_flag": on_flag, "llm": {"retries": 0, **llm}},
        }
    )


def test_the_rule_auditor_stops_what_the_gate_allows_but_the_task_does_not_need(
    tmp_path: Path,
) -> None:
    with (
        Ledger.memory() as ledger,
        Sandbox(_policy("rules"), tmp_path, task=TASK, ledger=ledger, watch=False) as sb,
    ):
        ok = sb.run("python3 -c 'print(6*7)'")
        assert ok.exit_code == 0 and ok.stdout == "42\n" and ok.refused is None
        assert ok.audit is not None and ok.audit.verdict is Verdict.ALLOW
        gpu = sb.run('CUDA_VISIBLE_DEVICES=0 python3 -c \'open("ran", "w")\'')
        assert gpu.exit_code == 126 and not (tmp_path / "ran").exists()
        assert gpu.refused == "audit"
        assert (
            gpu.decision is not None and gpu.decision.verdict is Verdict.ALLOW
        )  # the gate let it by
        assert gpu.audit is not None and gpu.audit.category is Category.MINING
        assert "corral: deny: the auditor (rules) flagged it" in gpu.stderr
        audits = list(ledger.records(kinds="audit"))
        assert [r.body["verdict"] for r in audits] == ["allow", "ask"]
        assert audits[1].action_id == gpu.action_id and audits[1].sandbox_id == sb.id


def test_a_gate_question_the_auditor_clears_runs(tmp_path: Path) -> None:
    # `factor` is not on swe's allowlist: the gate asks. Without an auditor nobody answers.
    with Sandbox(_policy("none"), tmp_path, task=TASK, ledger=Ledger.memory(), watch=False) as sb:
        r = sb.run("factor 12")
        assert r.exit_code == 126 and r.decision is not None and r.decision.verdict is Verdict.ASK
        assert r.refused == "gate"  # nobody to answer the question
    with Sandbox(_policy("rules"), tmp_path, task=TASK, ledger=Ledger.memory(), watch=False) as sb:
        r = sb.run("factor 12")
        assert r.exit_code == 0 and r.stdout == "12: 2 2 3\n"
        assert r.audit is not None and r.audit.verdict is Verdict.ALLOW


def test_on_flag_ask_holds_the_action(tmp_path: Path) -> None:
    with Sandbox(
        _policy("rules", on_flag="ask"), tmp_path, task=TASK, ledger=Ledger.memory(), watch=False
    ) as sb:
        r = sb.run("nvidia-smi -L; CUDA_VISIBLE_DEVICES=0 python3 -c 'print(1)'")
        assert r.exit_code == 126 and r.stderr.startswith("corral: ask: the auditor")


def test_the_model_is_asked_only_about_risky_actions(tmp_path: Path) -> None:
    with chat_server() as srv:
        policy = _policy("ensemble", url=srv.url, model="judge")
        with Sandbox(policy, tmp_path, task=TASK, ledger=Ledger.memory(), watch=False) as sb:
            for _ in range(3):
                assert sb.run("python3 -c 'print(1)'").exit_code == 0
            assert len(srv.requests) == 0  # plain work never reaches the model
            r = sb.run("factor 12")  # the gate asks: the model is consulted
            assert len(srv.requests) == 1 and r.exit_code == 0
            history = srv.requests[0]["messages"][1]["content"]
            assert "print(1)" in history  # it saw what came before
            g = sb.run("CUDA_VISIBLE_DEVICES=0 python3 -c 'print(1)'")
            assert len(srv.requests) == 2 and g.exit_code == 126
            assert g.audit is not None and g.audit.auditor == "ensemble"


def test_an_unreachable_model_fails_closed(tmp_path: Path) -> None:
    policy = _policy("llm", url="http://127.0.0.1:9/v1", model="m", failure_mode="deny")
    with Sandbox(policy, tmp_path, task=TASK, ledger=Ledger.memory(), watch=False) as sb:
        assert sb.run("python3 -c 'print(1)'").exit_code == 0  # not risky: no model needed
        r = sb.run("factor 12")
        assert r.exit_code == 126 and r.audit is not None and r.audit.error


@pytest.mark.parametrize("auditor", [False])
def test_the_auditor_can_be_switched_off(tmp_path: Path, auditor: bool) -> None:
    with Sandbox(
        _policy("rules"), tmp_path, task=TASK, ledger=Ledger.memory(), watch=False, auditor=auditor
    ) as sb:
        r = sb.run("CUDA_VISIBLE_DEVICES=0 python3 -c 'print(1)'")
        assert r.exit_code == 0 and r.audit is None


def test_the_model_sees_what_the_watcher_raised_in_earlier_steps(tmp_path: Path) -> None:
    """A miner renamed at exec time passes the text checks; the watcher sees it, and the
    model reviewing the next risky step is told."""
    with chat_server() as srv:
        policy = Policy.from_dict(
            {
                "version": 1,
                "extends": "swe",
                "network": {"mode": "none"},
                "audit": {"auditor": "ensemble", "llm": {"url": srv.url, "model": "judge"}},
                "detectors": {"mining-binary": {"response": "alert"}},
            }
        )
        with Sandbox(policy, tmp_path, task=TASK, ledger=Ledger.memory()) as sb:
            r = sb.run(
                "cp /bin/sleep ./kworker && "
                'python3 -c \'import os; os.execv("./kworker", ["xmrig", "1"])\''
            )
            assert [a.detector for a in r.alerts] == ["mining-binary"]
            assert sb.run("factor 12").exit_code == 0
        user = srv.requests[-1]["messages"][1]["content"]
        assert '"sandbox_alerts": ["mining: mining-binary"]' in user
