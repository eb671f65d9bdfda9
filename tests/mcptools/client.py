"""Talking to ``corral mcp`` and ``corral mcp-gateway`` the way an agent does: the mcp
SDK's own client over stdio, with the server started as a process."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

from corral.ledger import Ledger, LedgerRecord

_T = TypeVar("_T")
UPSTREAM = Path(__file__).with_name("upstream_server.py")


@asynccontextmanager
async def corral_session(home: Path, *args: str) -> AsyncIterator[ClientSession]:
    """An initialized client session with ``corral ARGS`` over stdio, state in ``home``."""
    params = StdioServerParameters(
        command=sys.executable,
        # --home right after the subcommand: the gateway's upstream command comes last.
        args=["-m", "corral", args[0], "--home", str(home), *args[1:]],
        env={"PATH": "/usr/bin:/bin"},
    )
    with (home / "server-stderr.txt").open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(main: Callable[[], Awaitable[_T]]) -> _T:
    # Bounded: a hung server fails the test instead of the whole run.
    async def bounded() -> _T:
        with anyio.fail_after(120):
            return await main()

    return anyio.run(bounded)


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content)


def records(home: Path) -> list[LedgerRecord]:
    with Ledger.open(home / "ledger.db", create=False) as ledger:
        return list(ledger.records())


def tool_decisions(recs: list[LedgerRecord], tool: str) -> list[LedgerRecord]:
    return [
        r for r in recs if r.kind == "decision" and r.body["action"]["payload"].get("tool") == tool
    ]
