"""`corral audit FILE [--json] [--auditor rules|llm|ensemble]`: the contract scripts use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.audit.chatserver import chat_server
from tests.audit.test_rule_auditor import ROME


def corral(
    home: Path, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={"CORRAL_HOME": str(home), "PATH": "/usr/bin:/bin", **env},
        timeout=120,
    )


@pytest.fixture
def rome(tmp_path: Path) -> Path:
    f = tmp_path / "rome.jsonl"
    f.write_text(ROME)
    return f


def test_one_line_per_step_and_exit_1_when_flagged(tmp_path: Path, rome: Path) -> None:
    r = corral(tmp_path / "h", "audit", str(rome))
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    steps = [ln for ln in lines if ln.startswith("step")]
    assert len(steps) == 7
    assert (
        "deny" in steps[4] and "mining" in steps[4] and "deny" in steps[5] and "tunnel" in steps[5]
    )
    assert all(" allow " in ln for i, ln in enumerate(steps) if i not in (4, 5))
    assert "7 steps, 2 flagged (steps 5, 6)" in lines[-1]


def test_json_fields_and_the_ledger(tmp_path: Path, rome: Path) -> None:
    home = tmp_path / "h"
    r = corral(home, "audit", "--json", "--run-id", "r-7", str(rome))
    assert r.returncode == 1
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert all({"step", "verdict", "score", "category", "reason"} <= set(row) for row in rows)
    assert [row["verdict"] for row in rows].count("allow") == 5
    assert "suspicion" in r.stderr
    log = corral(home, "log", "--json", "--run", "r-7", "--kind", "audit")
    recs = [json.loads(ln) for ln in log.stdout.splitlines()]
    assert len(recs) == 7 and recs[4]["body"]["verdict"] == "deny" and recs[4]["step"] == 5
    assert recs[4]["action_id"] == rows[4]["action_id"]
    assert corral(home, "verify").returncode == 0
    text = corral(home, "log", "--kind", "audit").stdout
    assert "deny" in text and "mining" in text


def test_a_clean_trajectory_exits_0_from_stdin(tmp_path: Path) -> None:
    steps = "\n".join(json.dumps({"task": "fix it", "command": c}) for c in ("ls", "pytest -q"))
    r = corral(tmp_path / "h", "audit", "--no-record", "-", stdin=steps)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 steps, 0 flagged" in r.stdout
    assert not (tmp_path / "h").exists()


def test_a_bad_file_is_exit_2_naming_line_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"command": "ls"}\n{"command": ["ls", 3]}\n')
    r = corral(tmp_path / "h", "audit", str(f))
    assert r.returncode == 2
    assert f"{f}:2: command: expected a string or a list of strings" in r.stderr


def test_llm_auditor_without_an_endpoint_says_how_to_give_one(tmp_path: Path, rome: Path) -> None:
    r = corral(tmp_path / "h", "audit", "--auditor", "llm", str(rome))
    assert r.returncode == 2 and "--llm-url" in r.stderr and "CORRAL_AUDIT_URL" in r.stderr


def test_llm_and_ensemble_auditors_against_a_loopback_endpoint(tmp_path: Path, rome: Path) -> None:
    with chat_server() as srv:
        r = corral(
            tmp_path / "h",
            "audit",
            "--json",
            "--auditor",
            "llm",
            "--llm-url",
            srv.url,
            "--llm-model",
            "judge",
            str(rome),
        )
        assert r.returncode == 1, r.stderr
        rows = [json.loads(ln) for ln in r.stdout.splitlines()]
        assert [row["verdict"] for row in rows] == ["allow"] * 4 + ["deny"] + ["deny"] + ["allow"]
        assert all(row["auditor"] == "llm" for row in rows)
        assert len(srv.requests) == 7
        e = corral(
            tmp_path / "h",
            "audit",
            "--json",
            "--auditor",
            "ensemble",
            "--aggregate",
            "vote",
            str(rome),
            CORRAL_AUDIT_URL=srv.url,
            CORRAL_AUDIT_MODEL="garbled",
        )
    # The model is garbled: every LLM verdict is the failure mode (ask); by vote, the
    # rules' deny and the LLM's ask tie on the flagged steps and the stricter wins.
    rows = [json.loads(ln) for ln in e.stdout.splitlines()]
    assert e.returncode == 1, e.stderr
    assert [row["verdict"] for row in rows][4:6] == ["deny", "deny"]
    assert all(row["error"] for row in rows) and rows[0]["auditor"] == "ensemble"
