"""``corral.Sandbox``: the gate, a sandbox backend and the ledger behind one object.

    with corral.Sandbox(policy="swe", workspace="repo/", task="fix the test") as sb:
        r = sb.run("pytest -q")          # Result: exit_code, stdout, stderr, decision, ...
        sb.write_file("a.py", text); sb.read_file("a.py")

Every ``run`` is decided by the gate first (unless ``gate=False``), and both the decision
and the exec are written to the ledger with the action's id. A denied command does not
run; its result has exit code 126 and the decision's reason on stderr.
"""

from __future__ import annotations

import collections
import os
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.ledger import Ledger
from corral.model import Action, Alert, Category, Decision, Event, EventKind, Severity, Verdict
from corral.paths import corral_home, default_ledger_path
from corral.policy import Policy
from corral.sandbox import protected
from corral.sandbox.backend import Backend, ExecResult, SandboxSpec, get_backend

EXIT_DENIED = 126


@dataclass(frozen=True, slots=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str
    decision: Decision | None
    alerts: tuple[Alert, ...] = ()
    duration: float = 0.0
    timed_out: bool = False
    action_id: str | None = None


class Sandbox:
    """One sandbox under one policy. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        policy: str | os.PathLike[str] | Policy = "strict",
        workspace: str | os.PathLike[str] = ".",
        *,
        task: str | None = None,
        run_id: str | None = None,
        gate: bool = True,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        backend: Backend | str = "bwrap",
    ) -> None:
        self.policy = policy if isinstance(policy, Policy) else Policy.load(policy)
        self.task = task
        self.run_id = run_id
        self.gate = gate
        self.spec = SandboxSpec.from_policy(self.policy, workspace)
        self.workspace: Path = self.spec.workspace
        self._own_ledger = not isinstance(ledger, Ledger)
        self.ledger = (
            ledger if isinstance(ledger, Ledger) else Ledger.open(ledger or default_ledger_path())
        )
        self._protected_before = protected.present(self.spec.protected)
        self.id = ""
        # Recent actions by start time, to tie what the proxy reports (it arrives from
        # another thread, sometimes after the command returned) to the action that ran.
        self._recent: collections.deque[tuple[float, Action]] = collections.deque(maxlen=64)
        self._alerts: list[Alert] = []
        self._events_lock = threading.Lock()
        try:
            self.backend = get_backend(backend) if isinstance(backend, str) else backend
            self.id = self.backend.create(self.spec, self._on_backend_event)
        except BaseException:
            if self._own_ledger:
                self.ledger.close()
            raise
        self._step = 0
        self.ledger.append_note(
            {
                "event": "sandbox created",
                "sandbox_id": self.id,
                "backend": self.backend.name,
                "policy": self.policy.name,
                "policy_hash": self.policy.hash,
                "workspace": str(self.workspace),
                "gate": gate,
            },
            run_id=run_id,
        )

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        step: int | None = None,
        episode: int | None = None,
        stream: bool = False,
    ) -> Result:
        """Run a shell command string (through bash) or an argv list."""
        self._step += 1
        text = command if isinstance(command, str) else shlex.join(command)
        action = Action.shell(
            text,
            run_id=self.run_id,
            episode=episode,
            step=step if step is not None else self._step,
            task=self.task,
        )
        decision: Decision | None = None
        if self.gate:
            decision = self.policy.check_action(action)
            self.ledger.append_decision(action, decision)
            if decision.verdict is not Verdict.ALLOW:
                return Result(
                    EXIT_DENIED,
                    "",
                    f"corral: {decision.verdict.value}: {decision.reason}\n",
                    decision,
                    action_id=action.id,
                )
        with self._events_lock:
            self._recent.append((time.time(), action))
            self._alerts = []
        if isinstance(command, str) and not stream:
            r = self.backend.run_shell(self.id, command, timeout=timeout)
            what: dict[str, Any] = {"command": command, "in": "session"}
        else:
            argv = ["/bin/bash", "-c", command] if isinstance(command, str) else list(command)
            r = self.backend.exec(self.id, argv, timeout=timeout, stream=stream)
            what = {"argv": argv, "in": "own bubblewrap"}
        self._record_exec(action, what, r)
        with self._events_lock:
            alerts = tuple(self._alerts)
        return Result(
            r.exit_code, r.stdout, r.stderr, decision, alerts, r.duration_s, r.timed_out, action.id
        )

    def _action_at(self, t: float) -> Action | None:
        with self._events_lock:
            for started, action in reversed(self._recent):
                if started <= t:
                    return action
        return None

    def _on_backend_event(self, event: dict[str, Any]) -> None:
        """What the backend saw the sandbox do (egress attempts, DNS queries) or what
        happened to it; may run on another thread."""
        t = float(event.get("t", time.time()))
        action = self._action_at(t)
        kind = event.get("type")
        where: dict[str, Any] = {
            "run_id": self.run_id,
            "episode": action.episode if action else None,
            "step": action.step if action else None,
            "action_id": action.id if action else None,
            "sandbox_id": self.id,
        }
        fields = {k: v for k, v in event.items() if k not in ("sandbox", "t")}
        if kind == "alert":
            alert = Alert(
                detector=str(event.get("detector")),
                category=Category(str(event.get("category"))),
                severity=Severity.HIGH,
                evidence=(),
                response=f"refused by the egress proxy: {event.get('reason')}",
                action_id=where["action_id"],
                sandbox_id=self.id,
                time=t,
            )
            self.ledger.append("alert", alert.to_dict(), **where)
            with self._events_lock:
                self._alerts.append(alert)
            return
        ev_kind = EventKind.DNS if kind == "dns" else EventKind.NET
        pid = event.get("pid")
        ev = Event(
            kind=ev_kind,
            sandbox_id=self.id,
            fields=fields,
            pid=pid if isinstance(pid, int) else None,
            action_id=where["action_id"],
            time=t,
        )
        self.ledger.append("event", ev.to_dict(), **where)

    def _record_exec(self, action: Action, what: dict[str, Any], r: ExecResult) -> None:
        self.ledger.append(
            "exec",
            {
                **what,
                "exit_code": r.exit_code,
                "duration_s": round(r.duration_s, 6),
                "timed_out": r.timed_out,
                "gate": self.gate,
                "cpu_s": r.cpu_s,
                "peak_memory": r.peak_memory,
                "oom_killed": r.oom_killed,
                "pids_limited": r.pids_limited,
            },
            run_id=action.run_id,
            episode=action.episode,
            step=action.step,
            action_id=action.id,
            sandbox_id=self.id,
        )

    def read_file(self, path: str) -> str:
        return self.backend.read_file(self.id, path).decode("utf-8", "replace")

    def write_file(self, path: str, text: str | bytes) -> None:
        self.backend.write_file(self.id, path, text.encode() if isinstance(text, str) else text)

    def close(self) -> None:
        if self.id:
            self.backend.close(self.id)  # every process of the sandbox is gone after this
            moved = protected.quarantine_new(
                self.spec.protected,
                self._protected_before,
                self.workspace,
                corral_home() / "quarantine" / self.id,
            )
            if moved:
                self.ledger.append_alert(
                    Alert(
                        detector="protected-path-created",
                        category=Category.PERSISTENCE,
                        severity=Severity.HIGH,
                        response=f"quarantined: {', '.join(moved)}",
                        sandbox_id=self.id,
                    ),
                    run_id=self.run_id,
                )
            self.ledger.append_note(
                {"event": "sandbox closed", "sandbox_id": self.id, "quarantined": moved},
                run_id=self.run_id,
            )
            self.id = ""
        if self._own_ledger:
            self.ledger.close()
