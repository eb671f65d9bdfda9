"""The live security view: a page at ``/live``, its JSON API under ``/apis/live/v1/``, a
stream of alerts as server-sent events, and ``GET /metrics``.

Auth is the rest of corral serve's: a token in a header (``Authorization: Bearer``,
``XRL-Authorization`` or ``X-API-Key``), never in a URL, so it stays out of access logs,
proxies' logs and browser history. That is why the page reads its stream with
``fetch()`` rather than ``EventSource``, which cannot send a header. The page itself
holds no secret and loads without a token; everything it shows comes from the API, which
answers 401 without one. Under ``--local-only`` nothing asks for a token, so those routes
then answer only requests addressed to a loopback name (a ``Host`` header of another
name is a DNS-rebinding page in the user's browser), and the POST routes take JSON only
(a cross-site form or ``no-cors`` fetch cannot send it).

A slow page never slows a sandbox: each open stream has a bounded queue filled from the
host's writing threads without waiting; a page that falls behind is told it lagged and
reloads the recent events instead.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at
# runtime, and some name types local to mount().
import asyncio
import contextlib
import ipaddress
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.host.metrics import CONTENT_TYPE, Exposition
from corral.serve.auth import LOCAL_USER, Tokens, token_from
from corral.serve.fleet import Caller, Fleet, NotRunning, NotVisible
from corral.serve.timeline import LiveEvent

PREFIX = "/apis/live/v1"
# A comment line this often keeps proxies from closing an idle stream and lets the
# server notice a page that went away.
HEARTBEAT_S = 15.0
CLIENT_QUEUE = 512
# Open streams per user: a few pages each, not one per loop iteration of a broken script.
STREAMS_PER_USER = 16
EVENTS_MAX = 500
REASON_MAX = 500
_STATIC = {
    "live.js": "text/javascript; charset=utf-8",
    "live.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class _Refusal(Exception):
    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.headers = status, error, headers or {}


class Streams:
    """The open streams, each with its caller and queue; fed by one fleet subscription."""

    def __init__(self, fleet: Fleet) -> None:
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self.closed = False
        self._unsubscribe: Callable[[], None] | None = fleet.subscribe(self._publish)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)

    def open_for(self, user: str) -> int:
        with self._lock:
            return sum(1 for c in self._clients if c.caller.user == user)

    def _publish(self, event: LiveEvent) -> None:
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            if c.caller.sees(event.owner):
                c.offer(event)

    async def events(self, caller: Caller) -> AsyncIterator[str]:
        client = _Client(caller, asyncio.get_running_loop())
        with self._lock:
            if self.closed:
                return
            self._clients.add(client)
        try:
            # Sent at once so the page knows it is connected before anything happens.
            yield "retry: 3000\n: corral live stream\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(client.queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is _CLOSE:
                    return
                if item is _LAGGED:
                    yield "event: lagged\ndata: {}\n\n"
                    continue
                assert isinstance(item, LiveEvent)
                yield sse(item)
        finally:
            with self._lock:
                self._clients.discard(client)

    def close(self) -> None:
        """End every open stream (the server is shutting down: it waits for them)."""
        with self._lock:
            self.closed = True
            clients = list(self._clients)
        for c in clients:
            c.offer(_CLOSE)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


_CLOSE, _LAGGED = object(), object()


class _Client:
    def __init__(self, caller: Caller, loop: asyncio.AbstractEventLoop) -> None:
        self.caller = caller
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize=CLIENT_QUEUE)

    def offer(self, item: object) -> None:
        """From any thread, never waiting."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the stream is over
            self.loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: object) -> None:
        if item is _CLOSE or self.queue.full():
            # Closing must get through; a page that cannot keep up is told to reload
            # rather than being fed an ever older backlog.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(_CLOSE if item is _CLOSE else _LAGGED)
            return
        self.queue.put_nowait(item)


def sse(event: LiveEvent) -> str:
    """One server-sent event: its kind as the event name, the host ledger's seq as id."""
    data = json.dumps(event.to_dict(), separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"


def mount(
    app: FastAPI, fleet: Fleet | None, metrics: Exposition | None, tokens: Tokens | None
) -> Streams | None:
    """Add the live view (when ``fleet`` is given) and ``/metrics`` (when ``metrics``
    is) to ``app``; returns the streams to close on shutdown."""

    def caller(request: Request) -> Caller:
        if tokens is None:
            name = _host_name(request.headers.get("host", ""))
            if not _loopback_name(name):
                raise _Refusal(
                    403,
                    f"--local-only answers loopback names only, not {name!r}: open "
                    "http://127.0.0.1:PORT/live",
                )
            # Whoever reaches loopback is the one local user, whose are all sandboxes.
            return Caller(LOCAL_USER, operator=True)
        user = tokens.user(token_from(request.headers))
        if user is None:
            raise _Refusal(
                401,
                "a valid API token is required (Authorization: Bearer TOKEN); the live page "
                "takes it from /live#token=TOKEN or its token field",
                {"WWW-Authenticate": "Bearer"},
            )
        return Caller(user, tokens.is_operator(user))

    Who = Annotated[Caller, Depends(caller)]

    @app.exception_handler(_Refusal)
    def _refused(request: Request, exc: _Refusal) -> JSONResponse:
        return JSONResponse({"error": exc.error}, status_code=exc.status, headers=exc.headers)

    if metrics is not None:

        @app.get("/metrics")
        def get_metrics(who: Who) -> Response:
            return Response(metrics.text(), media_type=CONTENT_TYPE)

    if fleet is None:
        return None
    streams = Streams(fleet)

    @app.get("/live")
    def page() -> Response:
        return Response(
            _static("live.html"), media_type="text/html; charset=utf-8", headers=_HEADERS
        )

    @app.get("/live/{name}")
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise _Refusal(404, f"no file {name!r}")
        return Response(_static(name), media_type=_STATIC[name], headers=_HEADERS)

    @app.get(f"{PREFIX}/hosts")
    def hosts(who: Who) -> dict[str, Any]:
        return {
            "user": who.user,
            "operator": who.operator,
            "local_only": tokens is None,
            "hosts": [asdict(h) for h in fleet.hosts(who)],
        }

    @app.get(f"{PREFIX}/sandboxes")
    def sandboxes(who: Who) -> dict[str, Any]:
        return {"sandboxes": [s.to_dict() for s in fleet.sandboxes(who)]}

    @app.get(f"{PREFIX}/events")
    def events(who: Who, limit: int = 100) -> dict[str, Any]:
        limit = max(0, min(limit, EVENTS_MAX))
        return {"events": [e.to_dict() for e in fleet.recent(who, limit)]}

    @app.get(f"{PREFIX}/stream")
    def stream(who: Who) -> StreamingResponse:
        if streams.open_for(who.user) >= STREAMS_PER_USER:
            raise _Refusal(
                429, f"{who.user} has {STREAMS_PER_USER} live streams open already; close a page"
            )
        return StreamingResponse(
            streams.events(who),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get(f"{PREFIX}/incidents/{{seq}}")
    def incident(seq: int, who: Who, host: str | None = None) -> dict[str, Any]:
        try:
            return fleet.timeline(who, host, seq).to_dict()
        except NotVisible as e:
            raise _Refusal(404, str(e)) from None

    async def act_reason(request: Request, verb: str, who: Caller) -> str:
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise _Refusal(415, "send a JSON body (Content-Type: application/json)")
        try:
            body = await request.json()
        except ValueError:
            raise _Refusal(400, "the body is not JSON") from None
        reason = body.get("reason") if isinstance(body, dict) else None
        if reason is not None and not isinstance(reason, str):
            raise _Refusal(400, "reason must be a string")
        reason = (reason or "").strip()[:REASON_MAX]
        return reason or f"{verb} from the live view by {who.user}"

    @app.post(f"{PREFIX}/sandboxes/{{sandbox_id}}/freeze")
    async def freeze(sandbox_id: str, request: Request, who: Who) -> dict[str, Any]:
        reason = await act_reason(request, "frozen", who)
        return await asyncio.to_thread(_act, fleet.freeze, who, sandbox_id, reason)

    @app.post(f"{PREFIX}/sandboxes/{{sandbox_id}}/kill")
    async def kill(sandbox_id: str, request: Request, who: Who) -> dict[str, Any]:
        reason = await act_reason(request, "killed", who)
        return await asyncio.to_thread(_act, fleet.kill, who, sandbox_id, reason)

    return streams


def _act(
    what: Callable[[Caller, str, str], Any], who: Caller, sandbox_id: str, reason: str
) -> dict[str, Any]:
    try:
        info = what(who, sandbox_id, reason)
    except NotVisible as e:
        raise _Refusal(404, str(e)) from None
    except NotRunning as e:
        raise _Refusal(409, str(e)) from None
    return {"sandbox": info.to_dict()}


def _host_name(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8080`` -> ``[::1]``)."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _loopback_name(name: str) -> bool:
    """``localhost`` or a loopback address; not a name that merely starts like one
    (``127.attacker.example`` resolves wherever its owner likes)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def _static(name: str) -> bytes:
    # Read on each request, not cached: the page is small and fetched once per visit.
    return (Path(__file__).parent / "static" / name).read_bytes()
