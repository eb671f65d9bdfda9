"""Serving an MCP ``Server`` over stdio or streamable HTTP: the SDK's transports, plus
what corral needs around them (a clean shutdown on SIGTERM, and hearing when an HTTP
session ends so that its sandbox can go with it)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
from mcp.server import Server
from mcp.server.stdio import stdio_server

Transport = Literal["stdio", "http"]
SESSION_HEADER = "mcp-session-id"


def session_key(request: Any) -> str:
    """The HTTP session a request belongs to (its ``Mcp-Session-Id``), or "" for stdio,
    where the process is the session, and for HTTP clients that open none."""
    headers = getattr(request, "headers", None)
    return str(headers.get(SESSION_HEADER, "")) if headers is not None else ""


def serve(
    server: Server[Any],
    transport: Transport,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    on_session_end: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Serve until the client goes (stdio), or until SIGTERM or SIGINT; either way the
    server's lifespan is left normally, so what it opened is closed and recorded."""
    if transport == "stdio":
        anyio.run(_stdio, server)
        return
    import uvicorn

    app: Any = server.streamable_http_app(host=host)
    if on_session_end is not None:
        app = _SessionEnds(app, on_session_end)
    # uvicorn shuts down gracefully on a signal (the server's lifespan ends, closing what
    # it opened), then raises the signal again for the handler it found installed: one
    # that only notes it lets the command end with status 0 instead of dying by it.
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda n, _f: caught.append(n))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _stdio(server: Server[Any]) -> None:
    signalled = False
    async with stdio_server() as (read, write):
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                nonlocal signalled
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        signalled = True
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal)
            # Cancelled by a signal, the server still leaves its lifespan normally.
            await server.run(read, write, server.create_initialization_options())
            tg.cancel_scope.cancel()
        if signalled:
            # The SDK reads stdin on a worker thread that no cancellation reaches, and
            # leaving stdio_server() waits for it: for a line, or for the client to close
            # the pipe. Everything the server opened is closed and recorded by now.
            sys.stderr.flush()
            os._exit(0)


class _SessionEnds:
    """ASGI middleware: after a client's ``DELETE`` of its session has been answered,
    say which session ended."""

    def __init__(self, app: Any, on_end: Callable[[str], Awaitable[None]]) -> None:
        self.app = app
        self.on_end = on_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        if scope.get("type") == "http" and scope.get("method") == "DELETE":
            for name, value in scope.get("headers", ()):
                if name == SESSION_HEADER.encode():
                    await self.on_end(value.decode("latin-1"))
