"""What ``corral serve``'s routes ask of wherever the sandboxes live.

The routes speak ROCK; this protocol speaks sandboxes, in plain values that cross a
process boundary (a Ray actor call) unchanged. ``LocalSandboxes`` answers from one
``Host`` in this process; ``corral.ray.serving.PoolSandboxes`` routes each call to the
host of a Ray pool that holds the sandbox. Either way the owner is checked where the
sandbox is, and a sandbox another user owns is reported as absent.
"""

from __future__ import annotations

import shlex
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.host import Host, Hosted
from corral.serve import protocol as p


@dataclass(frozen=True, slots=True)
class Status:
    """One sandbox as a client sees it."""

    id: str
    alive: bool
    profile: str
    cpus: float
    memory: int
    created: float
    stopped_at: float | None
    workdir: str
    policy: str
    stopped: str | None  # why it stopped (or was frozen)
    episode_ended: str | None
    alerts: int
    wall_time: float  # a command's time limit when it names none
    host_name: str  # the machine it runs on
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunReply:
    """One command's outcome, with what corral did about it in ``failure``."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    failure: str  # p.failure_reason: alerts so far, a refusal, an ended episode, a stop
    limit: float  # the time limit it ran under (the sandbox's wall_time when none given)


@dataclass(frozen=True, slots=True)
class AlertsReply:
    alerts: list[dict[str, Any]]
    next: int
    episode_ended: str | None
    stopped: str | None


class Sandboxes(Protocol):
    """Sandboxes by id, each owned by one user; every method takes the caller."""

    def start(
        self,
        profile: str,
        *,
        owner: str,
        sandbox_id: str | None,
        labels: Mapping[str, str],
        idle_ttl: float | None,
        memory: int | None,
        cpus: float | None,
    ) -> Status: ...

    def status(self, sandbox_id: str, owner: str) -> Status: ...

    def stop(self, sandbox_id: str, owner: str, reason: str) -> None: ...

    def delete(self, sandbox_id: str, owner: str) -> None: ...

    def run(
        self,
        sandbox_id: str,
        owner: str,
        command: str,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> RunReply: ...

    def open_session(
        self,
        sandbox_id: str,
        owner: str,
        name: str,
        env: Mapping[str, str] | None,
        sources: Sequence[str] = (),
    ) -> str: ...

    def close_session(self, sandbox_id: str, owner: str, name: str) -> None: ...

    def read_file(self, sandbox_id: str, owner: str, path: str) -> bytes: ...

    def write_file(
        self, sandbox_id: str, owner: str, path: str, data: bytes, event: str = "file written"
    ) -> None: ...

    def alerts(self, sandbox_id: str, owner: str, since: int = 0) -> AlertsReply: ...


class LocalSandboxes:
    """``Sandboxes`` on one ``Host`` in this process."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.hostname = socket.gethostname()

    def start(
        self,
        profile: str,
        *,
        owner: str,
        sandbox_id: str | None,
        labels: Mapping[str, str],
        idle_ttl: float | None,
        memory: int | None,
        cpus: float | None,
    ) -> Status:
        h = self.host.start(
            profile,
            owner=owner,
            sandbox_id=sandbox_id,
            labels=labels,
            idle_ttl=idle_ttl,
            memory=memory,
            cpus=cpus,
        )
        return self._status(h)

    def status(self, sandbox_id: str, owner: str) -> Status:
        return self._status(self.host.get(sandbox_id, owner))

    def _status(self, h: Hosted) -> Status:
        sb = h.sandbox
        return Status(
            id=h.id,
            alive=h.alive,
            profile=h.profile.name,
            cpus=sb.spec.cpus,
            memory=sb.spec.memory,
            created=h.created,
            stopped_at=h.stopped_at,
            workdir=str(h.workspace),
            policy=sb.policy.name,
            stopped=h.stopped or sb.stopped,
            episode_ended=h.episode_ended,
            alerts=len(sb.alerts),
            wall_time=sb.spec.wall_time,
            host_name=self.hostname,
            labels=dict(h.labels),
        )

    def stop(self, sandbox_id: str, owner: str, reason: str) -> None:
        self.host.stop(sandbox_id, owner, reason)

    def delete(self, sandbox_id: str, owner: str) -> None:
        self.host.delete(sandbox_id, owner)

    def run(
        self,
        sandbox_id: str,
        owner: str,
        command: str,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> RunReply:
        with self.host.using(sandbox_id, owner) as h:
            r = h.sandbox.run(command, timeout=timeout, session=session)
            refused = r.stderr.strip() if r.refused else None
            failure = p.failure_reason(
                list(h.sandbox.alerts), refused, h.episode_ended, h.sandbox.stopped
            )
            limit = timeout if timeout is not None else h.sandbox.spec.wall_time
        return RunReply(r.exit_code, r.stdout, r.stderr, r.timed_out, failure, limit)

    def open_session(
        self,
        sandbox_id: str,
        owner: str,
        name: str,
        env: Mapping[str, str] | None,
        sources: Sequence[str] = (),
    ) -> str:
        with self.host.using(sandbox_id, owner) as h:
            h.sandbox.open_session(name, env)
            output = ""
            for path in sources:
                r = h.sandbox.run(f"source {shlex.quote(path)}", session=name)
                output += r.stdout + r.stderr
        return output

    def close_session(self, sandbox_id: str, owner: str, name: str) -> None:
        with self.host.using(sandbox_id, owner) as h:
            h.sandbox.close_session(name)

    def read_file(self, sandbox_id: str, owner: str, path: str) -> bytes:
        with self.host.using(sandbox_id, owner) as h:
            h.sandbox.check_host_path(path, write=False)
            data = h.sandbox.backend.read_file(h.sandbox.id, path)
            _note(h, "file read", path, len(data))
        return data

    def write_file(
        self, sandbox_id: str, owner: str, path: str, data: bytes, event: str = "file written"
    ) -> None:
        with self.host.using(sandbox_id, owner) as h:
            h.sandbox.write_file(path, data)
            _note(h, event, path, len(data))

    def alerts(self, sandbox_id: str, owner: str, since: int = 0) -> AlertsReply:
        h = self.host.get(sandbox_id, owner)
        found = list(h.sandbox.alerts)
        return AlertsReply(
            [p.alert_dict(a) for a in found[since:]],
            len(found),
            h.episode_ended,
            h.stopped or h.sandbox.stopped,
        )


def _note(h: Hosted, event: str, path: str, size: int) -> None:
    h.sandbox.ledger.append_note(
        {"event": event, "sandbox_id": h.sandbox.id, "path": path, "bytes": size},
        run_id=h.sandbox.run_id,
    )
