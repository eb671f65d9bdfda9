"""ROCK's sandbox protocol for a whole Ray pool: ``corral serve --ray``.

The driver serves the same routes ``corral serve`` serves for one host
(``corral.serve.app``), with the pool's live view and every host's ``/metrics``. A start
is placed by the pool (the host with the most room); every later call goes to the host
that holds the sandbox, which checks the owner itself. A ROLL trainer points ROCK's SDK
at this one address and its sandboxes spread over the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI

from corral.host import HostError, SandboxNotFound
from corral.serve.app import create_app
from corral.serve.auth import Tokens
from corral.serve.sandboxes import AlertsReply, RunReply, Status
from corral.serve.server import serving_app

from .live import PoolFleet
from .metrics import PoolMetrics
from .pool import PoolSandbox, SandboxPool


class PoolSandboxes:
    """``corral.serve.sandboxes.Sandboxes`` over a ``SandboxPool``."""

    def __init__(self, pool: SandboxPool) -> None:
        self.pool = pool

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
        if sandbox_id is not None and self._known(sandbox_id) is not None:
            # Each host knows only its own: the pool keeps ids unique across them.
            raise HostError(f"a sandbox {sandbox_id!r} already exists")
        sb = self.pool.start(
            profile,
            owner=owner,
            sandbox_id=sandbox_id,
            labels=labels,
            idle_ttl=idle_ttl,
            memory=memory,
            cpus=cpus,
        )
        try:
            status: Status = sb._call("rock", "status", owner)
        except BaseException:
            sb.close()
            raise
        return status

    def status(self, sandbox_id: str, owner: str) -> Status:
        status: Status = self._call(sandbox_id, "status", owner)
        return status

    def stop(self, sandbox_id: str, owner: str, reason: str) -> None:
        self._call(sandbox_id, "stop", owner, reason)

    def delete(self, sandbox_id: str, owner: str) -> None:
        self._call(sandbox_id, "delete", owner)
        sb = self._known(sandbox_id)
        if sb is not None:
            self.pool._release(sb)

    def run(
        self,
        sandbox_id: str,
        owner: str,
        command: str,
        *,
        timeout: float | None = None,
        session: str | None = None,
    ) -> RunReply:
        reply: RunReply = self._call(
            sandbox_id, "run", owner, command, timeout=timeout, session=session
        )
        return reply

    def open_session(
        self,
        sandbox_id: str,
        owner: str,
        name: str,
        env: Mapping[str, str] | None,
        sources: Sequence[str] = (),
    ) -> str:
        output: str = self._call(
            sandbox_id, "open_session", owner, name, dict(env) if env else None, list(sources)
        )
        return output

    def close_session(self, sandbox_id: str, owner: str, name: str) -> None:
        self._call(sandbox_id, "close_session", owner, name)

    def read_file(self, sandbox_id: str, owner: str, path: str) -> bytes:
        data: bytes = self._call(sandbox_id, "read_file", owner, path)
        return data

    def write_file(
        self, sandbox_id: str, owner: str, path: str, data: bytes, event: str = "file written"
    ) -> None:
        self._call(sandbox_id, "write_file", owner, path, data, event)

    def alerts(self, sandbox_id: str, owner: str, since: int = 0) -> AlertsReply:
        reply: AlertsReply = self._call(sandbox_id, "alerts", owner, since)
        return reply

    def _known(self, sandbox_id: str) -> PoolSandbox | None:
        with self.pool._lock:
            return self.pool._sandboxes.get(sandbox_id)

    def _call(self, sandbox_id: str, op: str, owner: str, *args: Any, **kwargs: Any) -> Any:
        sb = self._known(sandbox_id)
        if sb is None:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        try:
            return sb._call("rock", op, owner, *args, **kwargs)
        except SandboxNotFound:
            # Someone else's, or gone from its host (reaped when idle): only the second
            # frees its place in the pool.
            try:
                sb._call("rock", "status", None)
            except SandboxNotFound:
                self.pool._release(sb)
            raise


def pool_app(pool: SandboxPool, tokens: Tokens | None, *, live_view: bool = True) -> FastAPI:
    """ROCK's routes over ``pool``, with its live view and every host's ``/metrics``;
    ``tokens`` None: no token asked for (bind loopback only)."""
    return create_app(
        PoolSandboxes(pool),
        tokens,
        live_view=live_view,
        fleet=PoolFleet(pool),
        metrics=PoolMetrics(pool),
    )


@contextmanager
def serving_pool(
    pool: SandboxPool, tokens: Tokens | None = None, address: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """``pool_app`` on a thread of the driver; yields its base URL."""
    with serving_app(pool_app(pool, tokens), address, port) as url:
        yield url
