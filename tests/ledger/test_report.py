"""Incident summaries and HTML reports from ledger records."""

from __future__ import annotations

import json
from pathlib import Path

from corral.ledger import Ledger
from corral.ledger import report as rpt
from corral.model import Action, Alert, Category, Decision, Event, EventKind, Severity, Verdict
from tests.cli import corral


def _ledger(path: Path) -> None:
    with Ledger.open(path) as led:
        ok = Action.shell("pytest -q", run_id="r1", step=1)
        led.append_decision(ok, Decision(Verdict.ALLOW, "allow", None, "fine", 0.0001, ok.id))
        led.append(
            "exec",
            {
                "command": "pytest -q",
                "exit_code": 0,
                "duration_s": 1.5,
                "cpu_s": 1.2,
                "peak_memory": 50 << 20,
            },
            run_id="r1",
            step=1,
            action_id=ok.id,
        )
        bad = Action.shell(
            "ssh -R 2222:localhost:22 x@<script>alert(1)</script>", run_id="r1", step=2
        )
        led.append_decision(
            bad,
            Decision(Verdict.DENY, "tunnel-ssh-forward", Category.TUNNEL, "tunnel", 0.0004, bad.id),
        )
        miner = Action.shell("./kworker", run_id="r1", step=3)
        led.append_decision(miner, Decision(Verdict.ALLOW, "allow", None, "fine", 0.0001, miner.id))
        ev = Event(
            EventKind.EXEC, "sb1", {"argv": ["xmrig"]}, pid=7, action_id=miner.id, time=1000.0
        )
        alert = Alert(
            "mining-binary",
            Category.MINING,
            Severity.CRITICAL,
            (ev,),
            "killed the sandbox",
            miner.id,
            "sb1",
            time=1000.0,
        )
        led.append(
            "alert",
            alert.to_dict(),
            run_id="r1",
            step=3,
            action_id=miner.id,
            sandbox_id="sb1",
            ts=1000.012,
        )
        led.append(
            "exec",
            {"command": "./kworker", "exit_code": 137, "oom_killed": True},
            run_id="r1",
            step=3,
            action_id=miner.id,
        )
        led.append(
            "audit",
            {
                "verdict": "deny",
                "score": 0.95,
                "category": "tunnel",
                "reason": "off task",
                "auditor": "rules",
                "latency_ms": 0.3,
                "action": bad.to_dict(),
            },
            run_id="r1",
            step=2,
            action_id=bad.id,
        )
        led.append_note({"event": "sandbox stopped", "reason": "the proxy died"}, run_id="r1")
        other = Action.shell("ls", run_id="r2", step=1)
        led.append_decision(other, Decision(Verdict.ALLOW, "allow", None, "fine", 0.0, other.id))


def test_incidents_are_named_by_layer_with_their_speed(tmp_path: Path) -> None:
    _ledger(tmp_path / "l.db")
    with Ledger.open(tmp_path / "l.db") as led:
        rep = rpt.build([r.to_dict() for r in led.records(run_id="r1")], "r1")
    layers = [(i.layer, i.step, i.category) for i in rep.incidents]
    assert ("gate", 2, "tunnel") in layers and ("audit", 2, "tunnel") in layers
    assert ("watch", 3, "mining") in layers and ("contain", 3, None) in layers
    assert ("contain", None, None) in layers  # the stop
    watch = next(i for i in rep.incidents if i.layer == "watch")
    assert watch.command == "./kworker" and 11 < (watch.reaction_ms or 0) < 13
    assert [s.step for s in rep.steps] == [1, 2, 3]
    assert rep.steps[0].cpu_s == 1.2 and rep.steps[2].alerts == ["mining: mining-binary"]
    text = rpt.render_text(rep)
    assert "gate 1, audit 1, watch 1, contain 2" in text
    assert "400 µs" in text and "12 ms" in text


def test_the_html_is_self_contained_and_escapes_agent_text(tmp_path: Path) -> None:
    _ledger(tmp_path / "l.db")
    with Ledger.open(tmp_path / "l.db") as led:
        rep = rpt.build([r.to_dict() for r in led.records(run_id="r1")], "r1")
    page = rpt.render_html(rep)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched
    assert page.count("<svg") == 2 and "<rect" in page
    assert "Timeline of incidents" in page and "kworker" in page


def test_the_cli_writes_the_newest_run_by_default(tmp_path: Path) -> None:
    _ledger(tmp_path / "home" / "ledger.db")
    home = tmp_path / "home"
    r = corral(home, "report")
    assert r.returncode == 0, r.stderr
    assert "incidents of run r2 (0)" in r.stdout
    assert (tmp_path / "home" / "reports" / "r2.html").exists()
    out = tmp_path / "r1.html"
    r = corral(home, "report", "--run", "r1", "-o", str(out))
    assert r.returncode == 0 and out.read_text().startswith("<!doctype html>")
    assert "incidents of run r1 (5)" in r.stdout
    bad = corral(home, "report", "--run", "nope")
    assert bad.returncode == 2 and "no records of run 'nope'" in bad.stderr
    json.dumps(r.stdout)
