"""ROCK's sandbox protocol, the subset RL frameworks use, without any I/O.

ROCK (Alibaba's sandbox service, driven by the ``rl-rock`` SDK and by ROLL) answers every
call with HTTP 200 and an envelope ``{status: "Success"|"Failed", message, error,
result}``; a failure is in the envelope, not in the HTTP status. This module holds the
request shapes (extra fields are accepted and ignored, as ROCK's server accepts fields it
does not use) and turns a corral ``Result`` into ROCK's answers, so the rules that ROCK
clients depend on are tested without a server:

- ``run_in_session`` with ``check="raise"`` (the SDK's default) answers Failed when the
  command exits non-zero. The SDK's wait for a ``nohup`` job polls ``kill -0 PID`` and
  takes a Failed answer to mean the job has ended.
- ``check="ignore"`` answers no exit code; ``check="silent"`` answers it without failing.
- What corral did about a command (a denial, an alert, the episode ended) is in the
  observation's ``failure_reason``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from corral.model import Alert

SUCCESS, FAILED = "Success", "Failed"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StartRequest(_Request):
    image: str = "python:3.11"
    sandbox_id: str | None = None
    auto_clear_time_minutes: int | None = None
    auto_clear_time: int | None = None
    memory: str | None = None
    cpus: float | None = None


class SandboxRef(_Request):
    sandbox_id: str


class CreateSessionRequest(SandboxRef):
    session: str = "default"
    startup_source: list[str] = []
    env_enable: bool = False
    env: dict[str, str] | None = None
    remote_user: str | None = None


class BashAction(SandboxRef):
    command: str
    session: str = "default"
    timeout: float | None = None
    check: Literal["silent", "raise", "ignore"] = "raise"


class CloseSessionRequest(SandboxRef):
    session: str = "default"


class CommandRequest(SandboxRef):
    command: str | list[str]
    timeout: float | None = 1200
    env: dict[str, str] | None = None
    cwd: str | None = None


class ReadFileRequest(SandboxRef):
    path: str
    encoding: str | None = None
    errors: str | None = None


class WriteFileRequest(SandboxRef):
    path: str
    content: str


def envelope(
    result: Any = None,
    *,
    status: str = SUCCESS,
    message: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    return {"status": status, "message": message, "error": error, "result": result}


def failed(message: str, error: str) -> dict[str, Any]:
    return envelope(status=FAILED, message=message, error=error)


def alert_line(alert: Alert) -> str:
    what = f" ({alert.response})" if alert.response else ""
    return f"corral alert: {alert.category.value}/{alert.detector}{what}"


# Alerts listed in one failure_reason; the /alerts route has them all.
ALERTS_SHOWN = 5


def failure_reason(
    alerts: Sequence[Alert], refused: str | None, episode_ended: str | None, stopped: str | None
) -> str:
    """What corral did, one line each: a plain SDK client's only view of it.

    Every alert the sandbox has raised so far is listed, not only this command's: the
    SDK drops ``failure_reason`` on some answers (its nohup polling reads only the
    exit code), so an alert must still be visible in the next answer the caller reads.
    A trajectory with an alert in it stays marked to its end."""
    lines = [alert_line(a) for a in alerts[-ALERTS_SHOWN:]]
    if len(alerts) > ALERTS_SHOWN:
        lines.insert(0, f"corral: {len(alerts)} alerts in this sandbox, the last {ALERTS_SHOWN}:")
    if refused:
        lines.append(refused)
    if episode_ended:
        lines.append(f"corral: the episode was ended: {episode_ended}")
    elif stopped:
        lines.append(f"corral: the sandbox was stopped: {stopped}")
    return "\n".join(lines)


def observation(
    action: BashAction,
    exit_code: int,
    output: str,
    reason: str,
    timed_out: bool,
    limit: float | None,
) -> dict[str, Any]:
    """ROCK's answer to ``run_in_session`` for a command that ran (or was refused)."""
    if timed_out:
        return failed(
            "run in session failed",
            f"timeout: {action.command!r} did not finish within {limit:g} s"
            + (f"\n{reason}" if reason else ""),
        )
    if action.check == "raise" and exit_code != 0:
        error = (
            f"Command {action.command!r} failed with exit code {exit_code}. "
            f"Here is the output:\n{output!r}"
        )
        return failed("run in session failed", error + (f"\n{reason}" if reason else ""))
    return envelope(
        {
            "session_type": "bash",
            "output": output,
            "exit_code": None if action.check == "ignore" else exit_code,
            "failure_reason": reason,
            "expect_string": "",
        }
    )


def size_text(n: int) -> str:
    """Bytes as ROCK writes a memory size (``8g``, ``512m``)."""
    if n % (1 << 30) == 0:
        return f"{n >> 30}g"
    return f"{max(1, n >> 20)}m"


def parse_cpus(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None


def alert_dict(a: Alert) -> dict[str, Any]:
    """An alert as the ``/alerts`` route lists it."""
    return {
        "id": a.id,
        "detector": a.detector,
        "category": a.category.value,
        "severity": a.severity.value,
        "response": a.response,
        "action_id": a.action_id,
        "time": a.time,
    }
