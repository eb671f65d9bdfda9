"""Running the API: in the foreground (``corral serve``) or in a thread (tests, benches)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from corral.errors import CorralError
from corral.host import Host
from corral.serve.app import create_app
from corral.serve.auth import TOKEN_ENV, Tokens


class ServeError(CorralError, ValueError):
    """``corral serve`` was asked for something unsafe or impossible."""


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_exposure(address: str, tokens: Tokens, local_only: bool) -> Tokens | None:
    """The tokens to require, or None when none are (``--local-only``, loopback only)."""
    if local_only:
        if not _loopback(address):
            raise ServeError(
                f"--local-only serves loopback only, not {address}: bind 127.0.0.1, or give "
                "tokens instead"
            )
        return None
    if not tokens.by_token:
        raise ServeError(
            f"corral serve needs API tokens: --tokens FILE (user: token lines) or ${TOKEN_ENV}; "
            "or --local-only to serve loopback without a token"
        )
    return tokens


class _Server(uvicorn.Server):
    """uvicorn's server, which first ends the live view's open streams when it shuts
    down: it waits for every open response to finish, and a stream never would."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.live_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        streams = self.live_app.state.streams
        if streams is not None:
            streams.close()
        await super().shutdown(sockets)


def _server_for(app: FastAPI, address: str, port: int) -> _Server:
    config = uvicorn.Config(
        app,
        host=address,
        port=port,
        log_level="warning",
        access_log=False,
        # Many rollout workers hold connections open between calls.
        backlog=2048,
        timeout_keep_alive=30,
    )
    return _Server(config, app)


def serve_forever(
    host: Host, address: str, port: int, tokens: Tokens | None, *, live_view: bool = True
) -> None:
    """Until SIGINT or SIGTERM; then every sandbox is stopped and recorded as such."""
    serve_app_forever(
        create_app(host, tokens, live_view=live_view), address, port, close=host.close
    )


def serve_app_forever(app: FastAPI, address: str, port: int, *, close: Callable[[], None]) -> None:
    """``app`` until SIGINT or SIGTERM; then ``close`` (which stops the sandboxes)."""
    server = _server_for(app, address, port)
    # uvicorn shuts down gracefully on a signal, then raises it again for the handler it
    # found installed. Installing one that only notes it lets the host close its
    # sandboxes (and write that to the ledger) instead of dying on the spot.
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda n, _f: caught.append(n))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.run()
    finally:
        close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def serving(
    host: Host,
    address: str = "127.0.0.1",
    port: int = 0,
    tokens: Tokens | None = None,
    *,
    live_view: bool = True,
) -> Iterator[str]:
    """The API on a thread; yields its base URL (``port`` 0: any free one)."""
    with serving_app(create_app(host, tokens, live_view=live_view), address, port) as url:
        yield url


@contextmanager
def serving_app(app: FastAPI, address: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Any of corral's apps (``create_app``, a pool's live view) on a thread; yields its
    base URL."""
    server = _server_for(app, address, port)
    thread = threading.Thread(target=server.run, name="corral-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServeError(f"the API did not start on {address}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{address}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tokens_from(path: str | None) -> Tokens:
    return Tokens.load(path, os.environ)
