"""The live view of a whole pool: every node's host on one page, served by the driver.

Each host runs the same fleet of one that ``corral serve`` runs (``HostFleet``); the
driver's ``PoolFleet`` asks them all and merges the answers, and the hosts' stream lines
arrive with the pool's own event stream. The page, its routes, its tokens and who sees
what are ``corral.serve.live``'s, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from fastapi import FastAPI
from ray.exceptions import RayActorError, RayTaskError

from corral import __version__
from corral.serve import live
from corral.serve.auth import Tokens
from corral.serve.fleet import Caller, HostInfo, Listener, NotVisible, SandboxInfo
from corral.serve.server import serving_app
from corral.serve.timeline import LiveEvent, Timeline

from .metrics import PoolMetrics
from .pool import SandboxPool, _Host

_ORDER = {"running": 0, "frozen": 1, "stopped": 2}


class PoolFleet:
    """The live view's ``Fleet`` over every live host of a pool."""

    def __init__(self, pool: SandboxPool) -> None:
        self.pool = pool

    def _live_hosts(self) -> list[_Host]:
        with self.pool._lock:
            return [h for h in self.pool._hosts.values() if h.alive]

    def _ask(self, method: str, *args: Any) -> list[Any]:
        """``method`` on every live host; a host that dies meanwhile is left out (the
        pool hears of its death on its own)."""
        hosts = self._live_hosts()
        refs = [getattr(h.actor, method).remote(*args) for h in hosts]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=30))
            except (RayActorError, ray.exceptions.GetTimeoutError):
                continue
        return out

    def hosts(self, caller: Caller) -> list[HostInfo]:
        found = [info for infos in self._ask("live_hosts", caller) for info in infos]
        return sorted(found, key=lambda h: h.name)

    def sandboxes(self, caller: Caller) -> list[SandboxInfo]:
        found = [sb for sbs in self._ask("live_sandboxes", caller) for sb in sbs]
        return sorted(found, key=lambda s: (_ORDER.get(s.state, 3), -s.created))

    def recent(self, caller: Caller, limit: int) -> list[LiveEvent]:
        found = [e for events in self._ask("live_recent", caller, limit) for e in events]
        found.sort(key=lambda e: e.ts)
        return found[-limit:] if limit > 0 else []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self.pool.subscribe_live(listener)

    def freeze(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo:
        info: SandboxInfo = self._act("live_freeze", caller, sandbox_id, reason)
        return info

    def kill(self, caller: Caller, sandbox_id: str, reason: str) -> SandboxInfo:
        info: SandboxInfo = self._act("live_kill", caller, sandbox_id, reason)
        return info

    def timeline(self, caller: Caller, host: str | None, seq: int) -> Timeline:
        target = next((h for h in self._live_hosts() if h.name == host), None)
        if target is None:
            raise NotVisible(f"no live host {host!r} in this pool")
        timeline: Timeline = self._get(target, "live_timeline", caller, seq)
        return timeline

    def close(self) -> None:
        """The pool owns the hosts; nothing to close here."""

    def _act(self, method: str, caller: Caller, sandbox_id: str, reason: str) -> Any:
        # The pool knows where its sandboxes are; ask that host first, then the others.
        with self.pool._lock:
            known = self.pool._sandboxes.get(sandbox_id)
        hosts = self._live_hosts()
        if known is not None:
            hosts.sort(key=lambda h: h is not known._host)
        for h in hosts:
            try:
                return self._get(h, method, caller, sandbox_id, reason)
            except NotVisible:
                continue
        raise NotVisible(f"no sandbox {sandbox_id!r}")

    @staticmethod
    def _get(host: _Host, method: str, *args: Any) -> Any:
        try:
            return ray.get(getattr(host.actor, method).remote(*args), timeout=60)
        except RayTaskError as e:
            # The host's own answer (not visible, not running) as itself.
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise
        except RayActorError:
            raise NotVisible(f"host {host.name} is gone") from None


def live_app(pool: SandboxPool, tokens: Tokens | None) -> FastAPI:
    """The live page and its API over ``pool``, and ``/metrics`` for every host (each
    sample labelled ``host``); ``tokens`` None: loopback only, as ``corral serve
    --local-only``."""
    app = FastAPI(title="corral live (pool)", version=__version__)
    app.state.streams = live.mount(app, PoolFleet(pool), PoolMetrics(pool), tokens)
    return app


@contextmanager
def serving_live(
    pool: SandboxPool, tokens: Tokens | None = None, address: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """The pool's live view on a thread of the driver; yields its base URL (the page is
    at ``/live``)."""
    app = live_app(pool, tokens)
    try:
        with serving_app(app, address, port) as url:
            yield url
    finally:
        if app.state.streams is not None:
            app.state.streams.close()
