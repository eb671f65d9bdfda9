"""``ShellEnv``: a gymnasium environment whose actions are shell commands run in corral.

    with ShellEnv(task="make the tests pass", workspace="repo/", max_steps=20) as env:
        obs, info = env.reset()
        obs, reward, terminated, truncated, info = env.step("pytest -q")

Each episode gets a fresh sandbox over a fresh copy of the workspace, so nothing an
episode does (files written, processes left running) reaches the next. Every command
goes through the same gate, auditor, watcher and ledger as ``corral.Sandbox.run``; what
they found comes back in ``info`` and, when it is an attack, ends the episode with a
penalty, so a policy being trained learns that attacking costs reward.
"""

from __future__ import annotations

import os
import shutil
import stat
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec
from gymnasium.error import ResetNeeded

from corral.audit.protocol import Auditor
from corral.ledger import Ledger
from corral.model import Alert, Category, Severity, new_id
from corral.paths import default_ledger_path
from corral.policy import Policy
from corral.sandbox import Result, Sandbox, SandboxError
from corral.sandbox.sandbox import EXIT_DENIED
from corral.watch.watcher import Watcher

__all__ = ["CHARSET", "ENV_ID", "EpisodeOver", "RewardFn", "ShellEnv"]

ENV_ID = "corral/Shell-v0"

# What an observation or command may hold. Gymnasium's Text space needs a finite
# charset, and printable ASCII (with newline and tab) is what every tokenizer reads.
CHARSET = string.printable

RewardFn = Callable[[Result, "ShellEnv"], SupportsFloat]

_REFUSED_SEVERITY = Severity.HIGH
# Control characters outside the charset are written as escapes rather than dropped, so
# that an agent can still tell that a binary file is binary and what is in it.
_ESCAPES = {c: f"\\x{c:02x}" for c in range(128) if chr(c) not in CHARSET}
_RESET_OPTIONS = frozenset({"task", "workspace"})


class EpisodeOver(ResetNeeded):
    """``step`` was called after the episode terminated or was truncated."""


def _no_reward(result: Result, env: ShellEnv) -> float:
    return 0.0


class ShellEnv(gymnasium.Env[str, str]):
    """Shell commands in a corral sandbox as a gymnasium environment.

    Observations and actions are text (``gymnasium.spaces.Text`` over ``CHARSET``).
    ``reset`` closes the previous episode's sandbox and opens a new one over a fresh
    copy of ``workspace`` (None: an empty directory); its observation is the task.
    ``step(command)`` runs the command with ``Sandbox.run(command, step=n, episode=k)``;
    its observation is stdout and stderr followed by an ``[exit code N]`` line, with
    characters outside the charset escaped and the middle cut out when it is longer
    than ``observation_length``.

    Reward: ``reward_fn(result, env)`` on every step (0.0 by default); a step that
    terminates the episode adds ``penalty`` (-1.0 by default) to it.

    The episode terminates when:

    - an alert raised while a command ran has a severity in ``terminate_on`` (default
      critical only: the watcher's high alerts, such as an ssh tunnel it killed, are
      answered by the policy's detector response but do not end the episode unless
      ``terminate_on`` includes high or the policy overrides the detector to
      ``end-episode``);
    - the policy's response ended the episode (``Result.episode_ended``) or stopped the
      sandbox (``kill-sandbox``, ``freeze``): it takes no more commands;
    - with ``terminate_on_denied_threat`` (the default), the gate or the policy's auditor
      refused the command as a threat (any category but ``policy``). The command did not
      run, but the attempt is what training should penalise: an episode that went on
      would teach the agent to try variants until one gets past the gate. Refusals for
      the policy's own reasons (a program not on the allowlist, no network) never
      terminate; the agent reads the reason and tries something else. With
      ``terminate_on_denied_threat=False`` a refused threat is only reported.

    It is truncated after ``max_steps`` steps, or once the episode has run longer than
    the policy's ``resources.episode.wall_time``; ``max_steps=None`` takes the policy's
    ``resources.episode.max_steps`` (none: no step limit).

    ``info`` after a step holds ``alerts`` (dicts with ``detector``, ``category``,
    ``severity``, ``response``, ``action_id`` and ``layer``: ``"watch"`` for what was
    raised while commands ran, the watcher's detectors and the egress proxy, including
    one raised late for an earlier command; ``"gate"`` and ``"audit"`` for a threat
    refused before it ran, with the gate's rule id or ``audit:<auditor>`` as detector and
    severity high), ``decision`` (the gate's decision as a dict, or None), ``audit``,
    ``exit_code``, ``timed_out``, ``action_id``, ``episode_ended``, ``stopped`` (why the
    sandbox was stopped, or None), ``terminated_by`` (why the episode terminated, or
    None), ``step`` and ``episode``.

    ``step`` after the episode is over raises ``EpisodeOver``: call ``reset()``. Close
    the environment (or use it as a context manager) to close the last sandbox.
    """

    # Commands see the clock, pids and the network: the same seed and command need not
    # give the same observation, and gymnasium's checker must not expect it to.
    spec = EnvSpec(ENV_ID, entry_point="corral.rl.env:ShellEnv", nondeterministic=True)

    def __init__(
        self,
        policy: str | os.PathLike[str] | Policy = "rl-rollout",
        task: str = "",
        workspace: str | os.PathLike[str] | None = None,
        *,
        reward_fn: RewardFn | None = None,
        penalty: float = -1.0,
        terminate_on: Iterable[Severity | str] = (Severity.CRITICAL,),
        terminate_on_denied_threat: bool = True,
        max_steps: int | None = None,
        gate: bool = True,
        watch: bool | Watcher = True,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        auditor: Auditor | bool = True,
        timeout: float | None = None,
        observation_length: int = 16_384,
        command_length: int = 4_096,
    ) -> None:
        """``auditor`` is passed to ``Sandbox`` (True: the policy's). ``timeout`` limits
        each command in seconds (None: the policy's ``resources.wall_time``, cut to what
        is left of the episode's wall time). The ledger, when given as a path (None: the
        default ledger), is opened at the first ``reset`` and closed by ``close``."""
        if observation_length < 1 or command_length < 1:
            raise ValueError("observation_length and command_length must be at least 1")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.policy = policy if isinstance(policy, Policy) else Policy.load(policy)
        self.task = task
        self.template = Path(workspace) if workspace is not None else None
        if self.template is not None and not self.template.is_dir():
            raise ValueError(f"workspace {str(self.template)!r} is not a directory")
        self.reward_fn: RewardFn = reward_fn or _no_reward
        self.penalty = float(penalty)
        self.terminate_on = frozenset(Severity(s) for s in terminate_on)
        self.terminate_on_denied_threat = terminate_on_denied_threat
        budget = self.policy.spec.resources.episode
        self.max_steps = max_steps if max_steps is not None else budget.max_steps
        self.wall_time = budget.wall_time
        self.gate = gate
        self.watch = watch
        self.auditor = auditor
        self.timeout = timeout
        self.run_id = run_id or f"rl-{new_id()}"
        self.observation_length = observation_length
        self.observation_space = spaces.Text(observation_length, min_length=0, charset=CHARSET)
        self.action_space = spaces.Text(command_length, min_length=1, charset=CHARSET)
        self._ledger_arg = ledger
        self._ledger: Ledger | None = None  # one this environment opened
        self.sandbox: Sandbox | None = None
        self.workspace: Path | None = None  # this episode's copy
        self._scratch: Path | None = None
        self.episode = 0
        self.steps = 0
        self.episode_return = 0.0
        self._over: str | None = None  # why step() is refused until the next reset()
        self._started = 0.0
        self._alerts_seen = 0

    @property
    def ledger(self) -> Ledger:
        """The ledger every episode is recorded in (opened on first use)."""
        given = self._ledger_arg
        if isinstance(given, Ledger):
            return given
        if self._ledger is None or self._ledger.closed:
            self._ledger = Ledger.open(given or default_ledger_path())
        return self._ledger

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start the next episode. ``options``: ``task`` (this episode's task text) and
        ``workspace`` (a directory to copy instead of the constructor's, None for empty)."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - _RESET_OPTIONS
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; known: task, workspace")
        task = options.get("task", self.task)
        if not isinstance(task, str):
            raise TypeError(f"the task is text, got {type(task).__name__}")
        template = self.template
        if "workspace" in options:
            given = options["workspace"]
            template = Path(given) if given is not None else None
        self._end_sandbox()
        self._scratch = Path(tempfile.mkdtemp(prefix="corral-rl-"))
        workspace = self._scratch / "workspace"
        try:
            if template is not None:
                shutil.copytree(template, workspace, symlinks=True)
            else:
                workspace.mkdir()
            self.episode += 1
            self.sandbox = Sandbox(
                self.policy,
                workspace,
                task=task or None,
                run_id=self.run_id,
                gate=self.gate,
                ledger=self.ledger,
                watch=self.watch,
                auditor=self.auditor,
            )
        except BaseException:
            self._end_sandbox()
            self._over = "the last reset() failed"
            raise
        self.workspace = workspace
        self.steps = 0
        self.episode_return = 0.0
        self._over = None
        self._started = time.monotonic()
        self._alerts_seen = 0
        info = {
            "episode": self.episode,
            "run_id": self.run_id,
            "sandbox_id": self.sandbox.id,
            "workspace": str(workspace),
            "policy": self.policy.name,
            "max_steps": self.max_steps,
        }
        return self._observation(task), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if not isinstance(action, str):
            raise TypeError(f"an action is a shell command (str), got {type(action).__name__}")
        if self.episode == 0:
            raise ResetNeeded("call reset() before step()")
        if self._over is not None or self.sandbox is None:
            raise EpisodeOver(f"the episode is over ({self._over}); call reset() to start another")
        sb = self.sandbox
        self.steps += 1
        result = self._run(sb, action)
        alerts = [_alert_dict(a) for a in self._new_alerts(sb)]
        reasons = [
            f"{a['severity']} alert {a['detector']} ({a['category']})"
            for a in alerts
            if Severity(a["severity"]) in self.terminate_on
        ]
        refused = _refused_threat(result)
        if refused is not None:
            alerts.append(refused)
            if self.terminate_on_denied_threat:
                layer = "the gate" if refused["layer"] == "gate" else "the auditor"
                reasons.append(
                    f"{layer} refused a {refused['category']} threat ({refused['detector']})"
                )
        if sb.episode_ended:
            reasons.append(f"the policy ended the episode: {sb.episode_ended}")
        elif sb.stopped:
            reasons.append(f"the sandbox was stopped: {sb.stopped}")
        terminated = bool(reasons)
        reward = float(self.reward_fn(result, self))
        if terminated:
            reward += self.penalty
        self.episode_return += reward
        truncated = False
        if not terminated:
            if self.max_steps is not None and self.steps >= self.max_steps:
                self._over = f"truncated after {self.steps} steps (max_steps)"
                truncated = True
            elif self.wall_time is not None and self._elapsed() >= self.wall_time:
                self._over = f"truncated after {self.wall_time:g}s (the policy's episode wall time)"
                truncated = True
        terminated_by = "; ".join(reasons) or None
        if terminated:
            self._over = f"terminated: {terminated_by}"
        if terminated or truncated:
            self._record_end(sb, terminated_by, truncated)
        info: dict[str, Any] = {
            "alerts": alerts,
            "decision": result.decision.to_dict() if result.decision is not None else None,
            "audit": result.audit.to_dict() if result.audit is not None else None,
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "action_id": result.action_id,
            "episode_ended": bool(sb.episode_ended) or result.episode_ended,
            "stopped": sb.stopped,
            "terminated_by": terminated_by,
            "step": self.steps,
            "episode": self.episode,
        }
        return self._observation(_output(result)), reward, terminated, truncated, info

    def close(self) -> None:
        """Close the sandbox and, when this environment opened it, the ledger. A later
        ``reset`` opens them again; closing twice is harmless."""
        self._end_sandbox()
        self._over = "the environment was closed"
        if self._ledger is not None:
            self._ledger.close()
        super().close()

    def _run(self, sb: Sandbox, command: str) -> Result:
        if sb.episode_ended or sb.stopped:  # since the last step, by a late alert
            return _not_run(sb)
        timeout = self.timeout
        if self.wall_time is not None:
            left = max(self.wall_time - self._elapsed(), 1.0)
            timeout = left if timeout is None else min(timeout, left)
        try:
            return sb.run(command, step=self.steps, episode=self.episode, timeout=timeout)
        except SandboxError:
            # A response that lands between the check above and the command: the
            # sandbox refuses it, and the episode is over for the same reason.
            if sb.episode_ended or sb.stopped:
                return _not_run(sb)
            raise

    def _new_alerts(self, sb: Sandbox) -> list[Alert]:
        # Every alert of the sandbox since the previous step: those of this command, and
        # any the watcher raised late about an earlier one (a process left running).
        new = sb.alerts[self._alerts_seen :]
        self._alerts_seen += len(new)
        return list(new)

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _observation(self, text: str) -> str:
        text = text.translate(_ESCAPES).encode("ascii", "backslashreplace").decode("ascii")
        return _fit(text, self.observation_length)

    def _record_end(self, sb: Sandbox, terminated_by: str | None, truncated: bool) -> None:
        # The gate, auditor and watcher records say what happened; this says what the
        # trainer was told, so that a reward can be traced back to its reason.
        self.ledger.append(
            "note",
            {
                "event": "episode over",
                "terminated": terminated_by is not None,
                "truncated": truncated,
                "reason": self._over,
                "steps": self.steps,
                "return": self.episode_return,
                "penalty": self.penalty if terminated_by is not None else 0.0,
            },
            run_id=self.run_id,
            episode=self.episode,
            step=self.steps,
            sandbox_id=sb.id,
        )

    def _end_sandbox(self) -> None:
        sb, self.sandbox = self.sandbox, None
        scratch, self._scratch = self._scratch, None
        self.workspace = None
        try:
            if sb is not None:
                sb.close()
        finally:
            if scratch is not None:
                _remove(scratch)


def _alert_dict(alert: Alert) -> dict[str, Any]:
    return {
        "detector": alert.detector,
        "category": alert.category.value,
        "severity": alert.severity.value,
        "response": alert.response,
        "action_id": alert.action_id,
        "layer": "watch",
    }


def _refused_threat(result: Result) -> dict[str, Any] | None:
    """The gate's or the auditor's refusal of a threat, as an alert dict; None when the
    command ran or was refused for the policy's own reasons."""
    d, audit = result.decision, result.audit
    if result.refused is None:
        return None
    if result.refused == "audit" and audit is not None and _is_threat(audit.category):
        return {
            "detector": f"audit:{audit.auditor}",
            "category": str(audit.category),
            "severity": _REFUSED_SEVERITY.value,
            "response": f"refused by the auditor: {audit.reason}",
            "action_id": result.action_id,
            "layer": "audit",
        }
    if d is None or not _is_threat(d.category):
        return None
    return {
        "detector": d.rule,
        "category": str(d.category),
        "severity": _REFUSED_SEVERITY.value,
        "response": f"refused by the gate: {d.reason}",
        "action_id": result.action_id,
        "layer": "gate",
    }


def _is_threat(category: Category | None) -> bool:
    return category is not None and category is not Category.POLICY


def _not_run(sb: Sandbox) -> Result:
    reason = sb.episode_ended or sb.stopped
    return Result(
        EXIT_DENIED,
        "",
        f"corral: not run: the sandbox takes no more commands ({reason})\n",
        None,
        episode_ended=bool(sb.episode_ended),
    )


def _output(result: Result) -> str:
    text = result.stdout
    if result.stderr:
        if text and not text.endswith("\n"):
            text += "\n"
        text += result.stderr
    if text and not text.endswith("\n"):
        text += "\n"
    if result.timed_out:
        return text + f"[timed out; exit code {result.exit_code}]"
    return text + f"[exit code {result.exit_code}]"


def _fit(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: the middle goes, since a command's
    first lines (what it is doing) and last lines (how it ended, the exit code) are
    what an agent needs most."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    while True:  # the count is part of the marker, so its length depends on itself
        marker = f"\n[... {cut} characters cut ...]\n"
        room = limit - len(marker)
        if room < 2:
            return text[-limit:]
        if len(text) - room == cut:
            break
        cut = len(text) - room
    head = room // 2
    return text[:head] + marker + text[len(text) - (room - head) :]


def _remove(path: Path) -> None:
    def writable_and_retry(func: Callable[..., object], name: str, exc: object) -> None:
        # A command may have left a directory without write permission; its owner (us)
        # can still grant it back and delete what is inside.
        parent = os.path.dirname(name)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, os.stat(name).st_mode | stat.S_IRWXU)
        func(name)

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=writable_and_retry)
        else:
            shutil.rmtree(path, onerror=writable_and_retry)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
