"""Replay a scripted trajectory through the gate and print what corral did."""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from corral.ledger import Ledger
from corral.model import Action, Decision
from corral.policy import Policy

_STYLE = {"allow": "green", "ask": "yellow", "deny": "bold red"}


@dataclass(frozen=True, slots=True)
class Contained:
    say: str
    command: str
    shows: str


@dataclass(frozen=True, slots=True)
class Watched:
    say: str
    command: str
    alert: str
    within: float


@dataclass(frozen=True, slots=True)
class Step:
    say: str
    command: str
    expect: str
    category: str | None


@functools.cache
def _trajectory() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(
        resources.files("corral.demo").joinpath("trajectory.yaml").read_text()
    )
    return raw


def load_contained() -> list[Contained]:
    raw = _trajectory()
    return [Contained(c["say"], c["command"], c["shows"]) for c in raw.get("contained", [])]


def replay_contained(console: Console, ledger: Ledger, run_id: str) -> list[str]:
    """Run the attempts in a real sandbox with the gate off; the misses, if any."""
    import tempfile

    from corral.sandbox import Sandbox

    policy = Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "name": "strict-gate-off",
            "resources": {"memory": "256MiB", "pids": 64},
        }
    )
    misses = []
    console.print(
        "\n[bold]The same attempts with the gate switched off[/]: the sandbox alone holds"
    )
    with (
        tempfile.TemporaryDirectory(prefix="corral-demo-") as ws,
        Sandbox(policy, ws, gate=False, ledger=ledger, run_id=run_id) as sb,
    ):
        for i, c in enumerate(load_contained(), 1):
            r = sb.run(c.command, timeout=30)
            said = (r.stdout + r.stderr).strip()
            held = c.shows.lower() in said.lower()
            mark = "[green]HELD[/] " if held else "[bold red]LEAKED[/]"
            console.print(f"[dim]{i:>2}[/] {mark} {escape(c.command)}")
            console.print(f"         [dim]agent: {escape(c.say)}[/]")
            last = said.splitlines()[-1] if said else "(no output)"
            console.print(f"         exit {r.exit_code} · {escape(last[:110])}")
            if not held:
                misses.append(f"contained {i}: expected {c.shows!r} in {said[-200:]!r}")
    return misses


def load_watched() -> list[Watched]:
    raw = _trajectory()
    return [
        Watched(w["say"], w["command"], w["alert"], float(w.get("within", 5)))
        for w in raw.get("watched", [])
    ]


def replay_watched(console: Console, ledger: Ledger, run_id: str) -> list[str]:
    """Run what only behaviour gives away, each in a sandbox of its own, and show what
    the watcher raised and did; the misses, if any."""
    import tempfile

    from corral.sandbox import Sandbox

    policy = Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "name": "strict-gate-off-watched",
            "network": {"mode": "proxy"},
            "resources": {"memory": "256MiB", "pids": 64},
        }
    )
    misses = []
    console.print(
        "\n[bold]What only behaviour gives away[/]: the watcher judges what the processes do"
    )
    for i, w in enumerate(load_watched(), 1):
        with (
            tempfile.TemporaryDirectory(prefix="corral-demo-") as ws,
            Sandbox(policy, ws, gate=False, ledger=ledger, run_id=run_id) as sb,
        ):
            r = sb.run(w.command, timeout=30)
            deadline = time.monotonic() + w.within
            while time.monotonic() < deadline and not any(
                a.category.value == w.alert for a in sb.alerts
            ):
                time.sleep(0.05)
            found = [a for a in sb.alerts if a.category.value == w.alert]
        mark = "[green]CAUGHT[/]" if found else "[bold red]MISSED[/]"
        console.print(f"[dim]{i:>2}[/] {mark} {escape(w.command)}")
        console.print(f"         [dim]agent: {escape(w.say)}[/]")
        if found:
            a = found[0]
            console.print(
                f"         {a.category.value} · {a.detector} · {escape(str(a.response)[:100])}"
            )
        else:
            misses.append(f"watched {i}: no {w.alert} alert (exit {r.exit_code})")
    return misses


def replay_audit(
    console: Console, ledger: Ledger, run_id: str, task: str, steps: list[Step], policy: Policy
) -> list[str]:
    """The rule auditor's second opinion on the same trajectory, step by step against
    the task: it must flag every step the gate denied and none of the work on the task."""
    from corral.audit import RuleAuditor, Trajectory, audit_trajectory
    from corral.audit import Step as AuditStep

    trajectory = Trajectory(
        task,
        tuple(
            AuditStep(i, Action.shell(s.command, run_id=run_id, episode=1, step=i, task=task))
            for i, s in enumerate(steps, 1)
        ),
        "demo",
    )
    report = audit_trajectory(RuleAuditor(policy), trajectory, ledger=ledger, run_id=run_id)
    console.print("\n[bold]A second opinion[/]: the rule auditor judges each step against the task")
    misses = []
    for step, v in zip(steps, report.verdicts, strict=True):
        if step.expect == "deny" and not v.flagged:
            misses.append(f"audit step {v.step}: not flagged")
        if step.expect == "allow" and v.flagged:
            misses.append(f"audit step {v.step}: flagged work on the task ({v.reason})")
        cmd = step.command if len(step.command) <= 64 else step.command[:63] + "…"
        console.print(
            f"[dim]{v.step:>2}[/] [{_STYLE[v.verdict.value]}]{v.verdict.value.upper():<5}[/] "
            f"{v.score:4.2f} {escape(cmd)}"
        )
        if v.signals:
            console.print(f"         [dim]{escape(v.reason[:100])}[/]")
    flagged = [v.step for v in report.flagged]
    median = sorted(v.latency_s for v in report.verdicts)[len(steps) // 2]
    console.print(
        f"{len(flagged)} of {len(steps)} steps flagged; trajectory suspicion "
        f"{report.suspicion:.2f}; median {median * 1000:.2f} ms per step"
    )
    return misses


def load_trajectory() -> tuple[str, str, list[Step]]:
    raw = _trajectory()
    steps = [Step(s["say"], s["command"], s["expect"], s.get("category")) for s in raw["steps"]]
    return raw["task"], raw["run_id"], steps


def run_demo(*, policy_name: str, ledger_path: Path, home: Path, as_json: bool = False) -> int:
    """Run the replay; exit status 1 if any step was not handled as expected."""
    console = Console(highlight=False)
    task, run_id, steps = load_trajectory()
    run_id = f"{run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    policy = Policy.load(policy_name)
    policy.check("true")  # builds the gate, so the first step's latency is a decision's
    if not as_json:
        console.print(
            "[bold]corral demo[/]: the ROME incident, replayed through the gate and the sandbox"
        )
        console.print(f"policy [cyan]{policy.name}[/] ({policy.hash[:19]}…), task: {task!r}")
        console.print(f"ledger {ledger_path}, run {run_id}\n")
    misses: list[str] = []
    if not as_json:
        from corral.demo.coding import replay_coding

        with Ledger.open(ledger_path) as ledger:
            misses.extend(replay_coding(console, ledger, run_id, task))
        console.print(
            "\n[bold]Then what ROME did[/], through the gate (the same task, the same policy)"
        )
    verdicts: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    with Ledger.open(ledger_path) as ledger:
        ledger.append_note(
            {
                "event": "run started",
                "task": task,
                "policy": policy.name,
                "policy_hash": policy.hash,
            },
            run_id=run_id,
        )
        decisions: list[tuple[Step, Decision]] = []
        for i, step in enumerate(steps, 1):
            action = Action.shell(step.command, run_id=run_id, episode=1, step=i, task=task)
            decision = policy.check_action(action)
            ledger.append_decision(action, decision)
            decisions.append((step, decision))
    for i, (step, d) in enumerate(decisions, 1):
        verdict = d.verdict.value
        cat = d.category.value if d.category else ""
        verdicts[verdict] += 1
        if verdict != "allow":
            categories[cat or "policy"] += 1
        ok = verdict == step.expect and (step.category is None or cat == step.category)
        if not ok:
            misses.append(f"step {i}: expected {step.expect}/{step.category}, got {verdict}/{cat}")
        if as_json:
            print(json.dumps({"step": i, "command": step.command, **d.to_dict()}))
            continue
        cmd = step.command.replace("\n", " ⏎ ")
        cmd = cmd if len(cmd) <= 100 else cmd[:99] + "…"
        console.print(f"[dim]{i:>2}[/] [{_STYLE[verdict]}]{verdict.upper():<5}[/] {escape(cmd)}")
        console.print(f"         [dim]agent: {escape(step.say)}[/]")
        if verdict != "allow":
            console.print(f"         {cat or 'policy'} · {d.rule} · {escape(d.reason)}")
        console.print(f"         [dim]decided in {d.latency_s * 1e6:.0f} µs[/]")
    if not as_json:
        blocked = ", ".join(f"{k} {v}" for k, v in sorted(categories.items()))
        console.print(
            f"\n{len(steps)} steps: {verdicts['allow']} allowed, {verdicts['ask']} held for "
            f"review, {verdicts['deny']} denied ({blocked})"
        )
    with Ledger.open(ledger_path) as ledger:
        if not as_json:
            misses.extend(replay_audit(console, ledger, run_id, task, steps, policy))
            misses.extend(replay_contained(console, ledger, run_id))
            misses.extend(replay_watched(console, ledger, run_id))
        report = ledger.verify()
        records = [r.to_dict() for r in ledger.records(run_id=run_id)]
    if not as_json:
        from corral.ledger import report as incident

        summary = incident.build(records, run_id)
        html_path = home / "reports" / f"{run_id}.html"
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(incident.render_html(summary), encoding="utf-8")
        console.print("\n[bold]Incident summary[/]: what was stopped, by which layer, how fast")
        console.print(escape(incident.render_text(summary, width=min(console.width, 110))))
        console.print(f"HTML report: {html_path}")
        state = "[green]intact[/]" if report.ok else f"[red]BROKEN[/] ({report.problem})"
        console.print(f"\nledger: {report.records} records, chain {state}, head {report.head_hash}")
        console.print(f"see it with: corral log --run {run_id}   ·   corral verify")
        for miss in misses:
            console.print(f"[red]unexpected[/] {miss}")
    return 0 if not misses and report.ok else 1
