"""``corral mcp-gateway``: an MCP server that stands between an agent and another MCP
server (the upstream), and lets through only what the policy allows.

- ``tools/list``: the upstream's tools, less those the policy's lists deny; the agent
  never learns of a tool it may not call.
- ``tools/call``: the tool gate (by ``server/tool`` name and ``tools.rules`` on the
  arguments), then the auditor when the policy names one, each recorded before anything
  is sent; a refused call never reaches the upstream and comes back as a tool error
  whose text is the reason. An allowed call is forwarded; its result has well-known
  secret shapes replaced (``rules/secrets.yaml``) and is recorded as a ``tool`` record.

Only tools pass. The upstream's resources and prompts are not offered to the agent:
nothing in the policy decides about them yet, so in a zero-trust gateway they stay shut.
The upstream is named by the operator (``server_name``), never by what it calls itself,
so a server cannot claim another's rules.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from corral import __version__
from corral.audit.preaction import ActionReview
from corral.errors import CorralError
from corral.ledger import Ledger
from corral.mcp.guard import ToolGuard
from corral.mcp.redact import Redactor
from corral.model import Action, ActionKind, Verdict, new_id
from corral.policy import Policy

# Pages of tools/list to follow from an upstream before giving up on it.
_MAX_PAGES = 100


@dataclass(frozen=True, slots=True)
class Upstream:
    """The MCP server behind the gateway: a command run over stdio, or a URL (streamable
    HTTP). ``env`` is what the command gets on top of the SDK's safe default environment
    (HOME, PATH, ...); nothing else of the gateway's environment leaks to it."""

    server_name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.command) == bool(self.url):
            raise CorralError("give the upstream as a command or as a URL (one of them)")
        name = self.server_name
        if not name or "/" in name or any(c.isspace() for c in name):
            raise CorralError(
                f"server name {name!r}: one word without '/', as the policy's tools section names it"
            )


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    policy: Policy
    workspace: Path
    ledger: Path
    upstream: Upstream
    gate: bool = True
    redactor: Redactor | None = None
    run_id: str | None = None
    task: str | None = None


class Gateway:
    """The state of one gateway: the upstream session, the guard, a step counter."""

    def __init__(self, settings: GatewaySettings, upstream: ClientSession, ledger: Ledger) -> None:
        self.settings = settings
        self.upstream = upstream
        self.ledger = ledger
        self.server = settings.upstream.server_name
        review = ActionReview(settings.policy)
        self.guard = ToolGuard(
            settings.policy,
            ledger,
            workspace=settings.workspace,
            gate=settings.gate,
            review=review if review.active else None,
            task=settings.task,
        )
        self.run_id = settings.run_id or f"mcp-gw-{new_id()[:12]}"
        self._step = 0

    async def list_tools(self) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await self.upstream.list_tools(params=params)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return [t for t in tools if self._listable(t.name)]

    def _listable(self, tool: str) -> bool:
        f = self.guard.listed(self.server, tool)
        return f is None or f.verdict is not Verdict.DENY

    async def call_tool(self, name: str, args: dict[str, Any]) -> types.CallToolResult:
        self._step += 1
        action = Action(
            ActionKind.TOOL,
            {"server": self.server, "tool": name, "args": args},
            run_id=self.run_id,
            step=self._step,
            task=self.settings.task,
        )
        # The gate is fast, but the auditor may ask a model, and the ledger writes to disk.
        outcome = await anyio.to_thread.run_sync(self.guard.check, action)
        if not outcome.allowed:
            return _error(outcome.reason)
        start = time.monotonic()
        try:
            result = await self.upstream.call_tool(name, args)
        except MCPError as exc:
            result = _error(f"the upstream server {self.server} refused the call: {exc}")
        result, redacted = self._redact(result)
        await anyio.to_thread.run_sync(
            self._record, action, result, time.monotonic() - start, redacted
        )
        return result

    def _redact(self, result: types.CallToolResult) -> tuple[types.CallToolResult, int]:
        r = self.settings.redactor
        if r is None:
            return result, 0
        data, count = r.value(result.model_dump(mode="json", by_alias=True, exclude_none=True))
        if not count:
            return result, 0
        return types.CallToolResult.model_validate(data), count

    def _record(
        self, action: Action, result: types.CallToolResult, took: float, redacted: int
    ) -> None:
        text = "\n".join(_content_text(c) for c in result.content)
        if result.structured_content is not None and not text:
            text = str(result.structured_content)
        self.guard.record(
            action, is_error=result.is_error, text=text, duration_s=took, redacted=redacted
        )


def _content_text(block: Any) -> str:
    if isinstance(block, types.TextContent):
        return block.text
    if isinstance(block, types.EmbeddedResource) and isinstance(
        block.resource, types.TextResourceContents
    ):
        return block.resource.text
    return f"[{getattr(block, 'type', 'content')}]"


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


@asynccontextmanager
async def connect(upstream: Upstream) -> AsyncIterator[ClientSession]:
    """An initialized client session with the upstream, for as long as the block runs."""
    async with AsyncExitStack() as stack:
        if upstream.command:
            params = StdioServerParameters(
                command=upstream.command[0], args=list(upstream.command[1:]), env=dict(upstream.env)
            )
            read, write = await stack.enter_async_context(stdio_client(params, errlog=sys.stderr))
        else:
            assert upstream.url is not None
            read, write = await stack.enter_async_context(streamable_http_client(upstream.url))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        yield session


def build_gateway(settings: GatewaySettings) -> Server[Gateway]:
    @asynccontextmanager
    async def lifespan(_: Server[Gateway]) -> AsyncIterator[Gateway]:
        ledger = Ledger.open(settings.ledger)
        try:
            ledger.append_note(
                {
                    "event": "mcp gateway started",
                    "server": settings.upstream.server_name,
                    "upstream": list(settings.upstream.command) or settings.upstream.url,
                    "policy": settings.policy.name,
                    "policy_hash": settings.policy.hash,
                    "gate": settings.gate,
                    "redact": settings.redactor.version if settings.redactor else None,
                },
                run_id=settings.run_id,
            )
            async with connect(settings.upstream) as session:
                yield Gateway(settings, session, ledger)
        finally:
            ledger.append_note(
                {"event": "mcp gateway stopped", "server": settings.upstream.server_name},
                run_id=settings.run_id,
            )
            ledger.close()

    async def list_tools(
        ctx: ServerRequestContext[Gateway], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=await ctx.lifespan_context.list_tools())

    async def call_tool(
        ctx: ServerRequestContext[Gateway], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        return await ctx.lifespan_context.call_tool(params.name, dict(params.arguments or {}))

    return Server(
        f"corral-gateway:{settings.upstream.server_name}",
        version=__version__,
        lifespan=lifespan,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def pass_env(names: Sequence[str]) -> dict[str, str]:
    """``NAME`` (the gateway's own value) or ``NAME=VALUE`` entries for the upstream."""
    out: dict[str, str] = {}
    for item in names:
        key, eq, value = item.partition("=")
        if not key:
            raise CorralError(f"--upstream-env {item!r}: expected NAME or NAME=VALUE")
        if not eq:
            if key not in os.environ:
                raise CorralError(f"--upstream-env {key}: not set in this environment")
            value = os.environ[key]
        out[key] = value
    return out
