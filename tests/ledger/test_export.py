"""`corral export`: trajectories out of the ledger, labelled for safety training."""

from __future__ import annotations

import json
from pathlib import Path

from corral.ledger import Ledger
from corral.ledger.export import SCHEMA, trajectories
from corral.model import Action, Alert, Category, Decision, Severity, Verdict
from tests.cli import corral


def _fill(path: Path) -> None:
    with Ledger.open(path) as led:
        led.append_note({"event": "run started", "task": "fix the test"}, run_id="rl-1")
        for episode, commands in ((1, ["pytest -q", "git diff"]), (2, ["ls", "ssh -R 1:x:1 h"])):
            for step, cmd in enumerate(commands, 1):
                a = Action.shell(cmd, run_id="rl-1", episode=episode, step=step)
                bad = cmd.startswith("ssh")
                d = Decision(
                    Verdict.DENY if bad else Verdict.ALLOW,
                    "tunnel-ssh-forward" if bad else "allow",
                    Category.TUNNEL if bad else None,
                    "tunnel" if bad else "fine",
                    action_id=a.id,
                )
                led.append_decision(a, d)
                if not bad:
                    led.append(
                        "exec",
                        {"command": cmd, "exit_code": 0, "duration_s": 0.1},
                        run_id="rl-1",
                        step=step,
                        action_id=a.id,
                    )
        # An alert on episode 1's first step, recorded without its episode.
        first = next(r for r in led.records(kinds="decision") if r.episode == 1)
        alert = Alert(
            "resource-hijack-cpu",
            Category.MINING,
            Severity.HIGH,
            (),
            "killed",
            first.action_id,
            "sb",
        )
        led.append("alert", alert.to_dict(), run_id="rl-1", step=1, action_id=first.action_id)
        led.append_decision(
            Action.shell("ls", run_id="clean", step=1),
            Decision(Verdict.ALLOW, "allow", None, "fine"),
        )


def test_trajectories_group_by_episode_and_are_labelled(tmp_path: Path) -> None:
    _fill(tmp_path / "l.db")
    with Ledger.open(tmp_path / "l.db") as led:
        found = trajectories(r.to_dict() for r in led.records())
    assert [(t["run_id"], t["episode"]) for t in found] == [
        ("rl-1", 1),
        ("rl-1", 2),
        ("clean", None),
    ]
    e1, e2, clean = found
    assert e1["schema"] == SCHEMA and e1["task"] == "fix the test"
    assert e1["flagged"] and e1["categories"] == ["mining"] and e1["flagged_steps"] == [1]
    assert [s["command"] for s in e1["steps"]] == ["pytest -q", "git diff"]
    assert e1["steps"][0]["alerts"][0]["detector"] == "resource-hijack-cpu"
    assert e1["steps"][0]["exec"]["exit_code"] == 0
    assert e2["categories"] == ["tunnel"] and e2["flagged_steps"] == [2]
    assert e2["steps"][1]["decision"] == {
        "verdict": "deny",
        "rule": "tunnel-ssh-forward",
        "category": "tunnel",
        "reason": "tunnel",
    }
    assert not clean["flagged"] and clean["categories"] == []


def test_the_cli_exports_only_flagged_ones(tmp_path: Path) -> None:
    _fill(tmp_path / "home" / "ledger.db")
    home = tmp_path / "home"
    r = corral(home, "export", "--flagged")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(t["episode"], t["categories"]) for t in rows] == [(1, ["mining"]), (2, ["tunnel"])]
    out = tmp_path / "all.json"
    r = corral(home, "export", "--format", "json", "-o", str(out))
    assert r.returncode == 0 and len(json.loads(out.read_text())) == 3
    assert "3 trajectories (2 flagged)" in r.stderr
