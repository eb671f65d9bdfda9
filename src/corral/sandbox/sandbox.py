"""``corral.Sandbox``: the gate, a sandbox backend and the ledger behind one object.

    with corral.Sandbox(policy="swe", workspace="repo/", task="fix the test") as sb:
        r = sb.run("pytest -q")          # Result: exit_code, stdout, stderr, decision, ...
        sb.write_file("a.py", text); sb.read_file("a.py")

Every ``run`` is decided by the gate first (unless ``gate=False``), then reviewed by the
policy's auditor when it has one (``audit.auditor``), and the decision, the verdict and
the exec are written to the ledger with the action's id. A denied command does not run;
its result has exit code 126 and the reason on stderr.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.audit.preaction import ActionReview
from corral.audit.protocol import Auditor
from corral.ledger import Ledger
from corral.model import (
    Action,
    Alert,
    AuditVerdict,
    Category,
    Decision,
    Event,
    EventKind,
    Severity,
    Verdict,
    new_id,
)
from corral.paths import corral_home, default_ledger_path
from corral.policy import Policy
from corral.sandbox import files, protected
from corral.sandbox.backend import (
    SANDBOX_HOME,
    Backend,
    ExecResult,
    SandboxError,
    SandboxSpec,
    get_backend,
)
from corral.sandbox.budget import EpisodeBudget
from corral.watch.engine import Match
from corral.watch.watcher import Watcher

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
    # A detector ended the episode (policy response `end-episode`): a trainer should
    # penalise or drop the trajectory; the sandbox takes no more commands.
    episode_ended: bool = False
    audit: AuditVerdict | None = None  # the auditor's verdict, when the policy has one
    # "gate" or "audit" when the command did not run because that layer refused it (the
    # reason is on stderr); None when it ran.
    refused: str | None = None


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
        watch: bool | Watcher = True,
        auditor: Auditor | bool = True,
        env: Mapping[str, str] | None = None,
        gpu_ids: Sequence[int] | None = None,
    ) -> None:
        """``watch``: the host's watcher follows what the sandbox's processes do and
        answers detector matches (True: this process's shared watcher; a ``Watcher`` to
        use that one; False to turn watching off, for testing containment alone).
        ``env``: variables set for everything the sandbox runs, over the policy's.
        ``auditor``: True for the policy's (``audit.auditor``), an ``Auditor`` to review
        every action with that one, False for none."""
        self.policy = policy if isinstance(policy, Policy) else Policy.load(policy)
        self.task = task
        self.review: ActionReview | None = None
        if auditor is not False:
            review = ActionReview(self.policy, auditor if not isinstance(auditor, bool) else None)
            self.review = review if review.active else None
        self.run_id = run_id
        self.gate = gate
        self.spec = SandboxSpec.from_policy(self.policy, workspace)
        if env:
            self.spec = dataclasses.replace(self.spec, env={**self.spec.env, **env})
        if gpu_ids is not None:
            # Which of the machine's GPUs the policy's grant is (a host's allocation).
            self.spec = dataclasses.replace(self.spec, gpu_ids=tuple(gpu_ids))
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
        self.alerts: list[Alert] = []  # every alert of this sandbox so far
        self._events_lock = threading.Lock()
        # The action running now: one at a time per sandbox, so every other has returned.
        self._running: str | None = None
        self.episode_ended: str | None = None
        self.stopped: str | None = None
        self.budget = EpisodeBudget(cpu_seconds=self.policy.spec.resources.episode.cpu_seconds)
        try:
            self.backend = get_backend(backend) if isinstance(backend, str) else backend
            self.id = self.backend.create(self.spec, self._on_backend_event)
        except BaseException:
            if self._own_ledger:
                self.ledger.close()
            raise
        self._step = 0
        self.watcher = (
            (watch if isinstance(watch, Watcher) else Watcher.shared()) if watch else None
        )
        self.ledger.append_note(
            {
                "event": "sandbox created",
                "sandbox_id": self.id,
                "backend": self.backend.name,
                "policy": self.policy.name,
                "policy_hash": self.policy.hash,
                "workspace": str(self.workspace),
                "gate": gate,
                "auditor": self.review.name if self.review else None,
                "watch": self.watcher.sources if self.watcher else None,
                "detectors": self.watcher.rules.version if self.watcher else None,
            },
            run_id=run_id,
        )
        self._target = _Target(self)
        if self.watcher is not None:
            self.watcher.watch(self._target, self.policy.spec.detectors)

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
        session: str | None = None,
    ) -> Result:
        """Run a shell command string (through bash) or an argv list. A string runs in
        the sandbox's persistent shell, or in the named ``session`` (see
        ``open_session``); an argv runs in that shell too, quoted."""
        if self.episode_ended:
            raise EpisodeEnded(f"the episode was ended: {self.episode_ended}")
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
            if decision.verdict is Verdict.DENY:
                return self._refused(action, decision, decision.verdict, decision.reason)
        verdict: AuditVerdict | None = None
        if self.review is not None:
            verdict = self.review.review(self.task, action, decision)
            if verdict is not None:
                self.ledger.append(
                    "audit",
                    {**verdict.to_dict(), "action": action.to_dict()},
                    run_id=action.run_id,
                    episode=action.episode,
                    step=action.step,
                    action_id=action.id,
                    sandbox_id=self.id,
                )
                if verdict.flagged:
                    self.review.remember(action, None)
                    why = f"the auditor ({verdict.auditor}) flagged it: {verdict.reason}"
                    return self._refused(action, decision, self.review.on_flag, why, verdict)
        if decision is not None and decision.verdict is Verdict.ASK and verdict is None:
            # Nobody to ask: without an auditor to approve it, a question is a refusal.
            return self._refused(action, decision, decision.verdict, decision.reason)
        with self._events_lock:
            self._recent.append((time.time(), action))
            self._alerts = []
            self._running = action.id
        if self.watcher is not None:
            self.watcher.mark(self.id, action.id)
        try:
            if (isinstance(command, str) or session is not None) and not stream:
                r = self.backend.run_shell(
                    self.id, text, timeout=timeout, session=session or "default"
                )
                what: dict[str, Any] = {"command": text, "in": "session"}
                if session is not None:
                    what["session"] = session
            else:
                argv = ["/bin/bash", "-c", command] if isinstance(command, str) else list(command)
                r = self.backend.exec(self.id, argv, timeout=timeout, stream=stream)
                what = {"argv": argv, "in": "own bubblewrap"}
        finally:
            # No waiting for the watcher: a process it first sees after this is still
            # tied to this action by its start time, and judged as having outlived it.
            with self._events_lock:
                self._running = None
        self._record_exec(action, what, r)
        # The exec's own reading of the cgroup; between commands the watcher holds it.
        self.hold_budget({"cpu_s": r.sandbox_cpu_s})
        with self._events_lock:
            alerts = tuple(self._alerts)
        if self.review is not None:
            self.review.remember(
                action, r.stdout + r.stderr, [f"{a.category.value}: {a.detector}" for a in alerts]
            )
        stderr = r.stderr
        if self.stopped:
            stderr += f"corral: the sandbox was stopped: {self.stopped}\n"
        return Result(
            r.exit_code,
            r.stdout,
            stderr,
            decision,
            alerts,
            r.duration_s,
            r.timed_out,
            action.id,
            bool(self.episode_ended),
            verdict,
        )

    def _refused(
        self,
        action: Action,
        decision: Decision | None,
        verdict: Verdict,
        reason: str,
        audit: AuditVerdict | None = None,
    ) -> Result:
        return Result(
            EXIT_DENIED,
            "",
            f"corral: {verdict.value}: {reason}\n",
            decision,
            action_id=action.id,
            audit=audit,
            refused="audit" if audit is not None else "gate",
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
                self.alerts.append(alert)
            return
        if kind == "launched":  # a new bubblewrap: the watcher follows its children
            if self.watcher is not None:
                self.watcher.adopt(self.id, int(event["pid"]))
            return
        if kind == "stopped":
            self.stopped = str(event.get("reason"))
        if self.watcher is not None and kind in ("net", "dns"):
            self.watcher.push(
                self.id, {**fields, "kind": kind, "action_id": where["action_id"], "t": t}
            )
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

    def hold_budget(self, usage: Mapping[str, Any] | None) -> None:
        """End the episode if ``usage`` (the cgroup's totals) spends its budget."""
        reason = self.budget.spent(usage)
        if reason is None:
            return
        with self._events_lock:
            if self.episode_ended:
                return
            self.episode_ended = reason
        self.ledger.append_note(
            {"event": "episode ended", "sandbox_id": self.id, "reason": reason},
            run_id=self.run_id,
        )
        self._target.stop(reason)

    def open_session(self, name: str, env: Mapping[str, str] | None = None) -> None:
        """Another persistent shell in this sandbox, for ``run(..., session=name)``:
        its own working directory, variables and background jobs; the same workspace,
        limits, watcher and way out."""
        self.backend.open_session(self.id, name, env)
        self.ledger.append_note(
            {"event": "session opened", "sandbox_id": self.id, "session": name},
            run_id=self.run_id,
        )

    def close_session(self, name: str) -> None:
        """End a named shell and everything it left running."""
        self.backend.close_session(self.id, name)

    def read_file(self, path: str) -> str:
        self.check_host_path(path, write=False)
        return self.backend.read_file(self.id, path).decode("utf-8", "replace")

    def write_file(self, path: str, text: str | bytes) -> None:
        self.check_host_path(path, write=True)
        self.backend.write_file(self.id, path, text.encode() if isinstance(text, str) else text)

    def check_host_path(self, path: str, *, write: bool) -> None:
        """Refuse, gate or no gate, what the sandbox would not let its own processes do:
        file reads and writes through this API run on the host, outside the sandbox,
        where hidden paths are not covered and protected files (git hooks, which the
        host runs later) are not bound read-only. Raises ``files.UnsafePathError``."""
        target = Path(os.path.normpath(self.workspace / path))
        for hidden in self.spec.hidden:
            # The workspace is bound over what hides it (a workspace under /root is visible).
            if hidden == self.workspace or hidden in self.workspace.parents:
                continue
            if target == hidden or hidden in target.parents:
                raise files.UnsafePathError(f"{path} is hidden by the policy (filesystem.hidden)")
        if write:
            for p in self.spec.protected:
                if target == p or p in target.parents:
                    raise files.UnsafePathError(
                        f"{path} is run by the host later; it is protected (filesystem.protected)"
                    )

    def close(self) -> None:
        if self.review is not None:
            self.review.close()
        if self.id:
            if self.watcher is not None:
                self.watcher.unwatch(self.id)
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


class EpisodeEnded(SandboxError):
    """The episode was ended (a detector, or a spent budget); it takes no more commands."""


class _Target:
    """The watcher's view of one ``Sandbox`` (``corral.watch.watcher.WatchTarget``)."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.id = sb.id
        self.gpus_granted = sb.spec.gpus > 0
        spec = sb.spec
        self.gpu_ids = spec.gpu_ids if spec.gpu_ids is not None else tuple(range(spec.gpus))
        self.cpu_limit: float | None = sb.spec.cpus

    def processes(self) -> list[int]:
        return self.sb.backend.processes(self.id)

    def roots(self) -> set[int]:
        return self.sb.backend.roots(self.id)

    def usage(self) -> Mapping[str, Any] | None:
        # Read four times a second: where the episode's CPU budget is held between commands.
        used = self.sb.backend.usage(self.id)
        self.sb.hold_budget(used)
        return used

    def watched_dirs(self) -> list[str]:
        home = self.sb.spec.env.get("HOME", SANDBOX_HOME)
        return [home, f"{home}/.ssh", f"{home}/.config/autostart", f"{home}/.config/systemd/user"]

    def action_at(self, t: float) -> tuple[str | None, bool]:
        action = self.sb._action_at(t)
        if action is None:
            return None, True
        return action.id, self.action_done(action.id)

    def action_done(self, action_id: str | None) -> bool:
        with self.sb._events_lock:
            return action_id is None or action_id != self.sb._running

    def _where(self, action_id: str | None) -> dict[str, Any]:
        action = None
        with self.sb._events_lock:
            for _, a in self.sb._recent:
                if a.id == action_id:
                    action = a
        return {
            "run_id": self.sb.run_id,
            "episode": action.episode if action else None,
            "step": action.step if action else None,
            "action_id": action_id,
            "sandbox_id": self.id,
        }

    def record(self, event: Mapping[str, Any]) -> None:
        # Built by hand: dataclasses.asdict deep-copies, and this runs for every exec.
        pid, ppid = event.get("pid"), event.get("ppid")
        body = {
            "kind": _event_kind(event.get("kind", "exec")).value,
            "sandbox_id": self.id,
            "fields": {k: v for k, v in event.items() if k not in ("sandbox", "t", "kind")},
            "pid": pid if isinstance(pid, int) else None,
            "ppid": ppid if isinstance(ppid, int) else None,
            "action_id": event.get("action_id"),
            "time": float(event.get("t", time.time())),
            "id": new_id(),
        }
        action_id = event.get("action_id")
        self.sb.ledger.append(
            "event", body, **self._where(action_id if isinstance(action_id, str) else None)
        )

    def respond(self, match: Match) -> str:
        """Record the alert, then act: a command killed by the response returns with
        the alert already in its ``Result``."""
        sb = self.sb
        reason = f"{match.rule.id}: {match.reason}"
        response = match.response
        if response == "kill-process" and match.pid is None:
            response = "alert"  # a file write names no process to kill
        elif response == "kill-process" and any(e.get("pid_foreign") for e in match.evidence):
            # Known only by NVML's pid from another pid namespace: the process cannot be
            # picked out of the sandbox, so the sandbox goes.
            response = "kill-sandbox"
        planned = {
            "kill-process": "killed the process and its children",
            "kill-sandbox": "killed the sandbox",
            "end-episode": "ended the episode and killed the sandbox",
            "freeze": "froze the sandbox for inspection",
        }.get(response, "alert only")
        evidence = tuple(
            Event(
                kind=_event_kind(e.get("kind")),
                sandbox_id=self.id,
                fields={k: v for k, v in e.items() if k not in ("sandbox", "t", "kind")},
                pid=e.get("pid") if isinstance(e.get("pid"), int) else None,
                action_id=e.get("action_id"),
                time=float(e.get("t", time.time())),
            )
            for e in match.evidence
        )
        alert = Alert(
            detector=match.rule.id,
            category=match.rule.category,
            severity=match.rule.severity,
            evidence=evidence,
            response=f"{planned} ({match.reason})",
            action_id=match.action_id,
            sandbox_id=self.id,
            time=match.t,
        )
        sb.ledger.append("alert", alert.to_dict(), **self._where(match.action_id))
        with sb._events_lock:
            sb._alerts.append(alert)
            sb.alerts.append(alert)
            if match.response == "end-episode":
                sb.episode_ended = reason
        try:
            if response == "kill-process" and match.pid is not None:
                sb.backend.kill_tree(self.id, match.pid)
            elif response in ("kill-sandbox", "end-episode"):
                self.stop(reason)
            elif response == "freeze":
                sb.stopped = f"frozen for inspection: {reason}"
                sb.backend.freeze(self.id, reason)
        except Exception as exc:  # said in the ledger; the alert stands
            sb.ledger.append_note(
                {"event": "response failed", "alert": alert.id, "error": repr(exc)},
                run_id=sb.run_id,
            )
            return f"{response} failed: {exc}"
        return planned

    def stop(self, reason: str) -> None:
        self.sb.stopped = reason
        self.sb.backend.stop(self.id, reason)
        self.sb.ledger.append_note(
            {"event": "sandbox stopped", "sandbox_id": self.id, "reason": reason},
            run_id=self.sb.run_id,
        )


def _event_kind(kind: object) -> EventKind:
    try:
        return EventKind(str(kind))
    except ValueError:
        return EventKind.RESOURCE
