"""``corral mcp``: a shell and the workspace's files as MCP tools, under a policy.

Four tools, ``run_command``, ``read_file``, ``write_file`` and ``list_files``, for any
agent that speaks MCP (Claude Code, Codex, Cursor-style tools). Each MCP session gets its
own sandbox over the workspace, made on its first call and closed when the session ends
(stdio: when the client goes; HTTP: on the client's DELETE, after ``idle_ttl`` without a
call, or when the server stops).

Every call is a tool action (server ``corral``) that passes the tool gate, and is
recorded with its result. A command then goes through the sandbox's own path, the shell
gate, the auditor and the ledger, exactly as ``corral exec`` runs it; a file is read or
written host-side without following links out of the workspace. A refusal comes back as a
tool error whose text is the reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server, ServerRequestContext

from corral import __version__
from corral.errors import CorralError
from corral.ledger import Ledger
from corral.mcp.guard import ToolGuard, refusal
from corral.mcp.transport import session_key
from corral.model import Action, ActionKind, Verdict, new_id
from corral.policy import Policy
from corral.sandbox import Sandbox, files

SERVER = "corral"
READ_LIMIT = 1 << 20

_PATH = {"type": "string", "description": "a path in the workspace (relative to it)"}
TOOLS = (
    types.Tool(
        name="run_command",
        description=(
            "Run a bash command in this session's sandbox, in the workspace. The shell "
            "persists between calls (working directory, variables). Returns the output and "
            "the exit code. A command the policy refuses does not run; the error says why."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "the bash command"},
                "timeout": {"type": "number", "description": "seconds (default: the policy's)"},
            },
            "required": ["command"],
        },
    ),
    types.Tool(
        name="read_file",
        description="Read a text file in the workspace (up to 1 MiB).",
        input_schema={"type": "object", "properties": {"path": _PATH}, "required": ["path"]},
    ),
    types.Tool(
        name="write_file",
        description="Write a text file in the workspace, creating its directories.",
        input_schema={
            "type": "object",
            "properties": {"path": _PATH, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    ),
    types.Tool(
        name="list_files",
        description="List a directory of the workspace; directories end in '/'.",
        input_schema={
            "type": "object",
            "properties": {"path": {**_PATH, "default": "."}},
        },
    ),
)
_NAMES = frozenset(t.name for t in TOOLS)


@dataclass(frozen=True, slots=True)
class Settings:
    policy: Policy
    workspace: Path
    ledger: Path
    gate: bool = True
    run_id: str | None = None
    task: str | None = None
    idle_ttl: float = 1800.0


class _Session:
    def __init__(self, sandbox: Sandbox, guard: ToolGuard, run_id: str) -> None:
        self.sandbox = sandbox
        self.guard = guard
        self.run_id = run_id
        self.lock = threading.Lock()  # a sandbox runs one action at a time
        self.step = 0
        self.used = time.monotonic()


class Sessions:
    """The sandboxes of one ``corral mcp``, by MCP session. Blocking: call it from a
    worker thread, not the event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger.open(settings.ledger)
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._closed = False

    def call(self, key: str, name: str, args: dict[str, Any]) -> types.CallToolResult:
        if name not in _NAMES:
            return _error(f"corral: no tool {name!r} (tools: {', '.join(sorted(_NAMES))})")
        self._reap_idle(keep=key)
        try:
            session = self._get(key)
        except CorralError as exc:
            return _error(f"corral: the sandbox could not be started: {exc}")
        with session.lock:
            session.step += 1
            session.used = time.monotonic()
            action = Action(
                ActionKind.TOOL,
                {"server": SERVER, "tool": name, "args": args},
                run_id=session.run_id,
                step=session.step,
                task=self.settings.task,
            )
            # A command is shown to the auditor by the sandbox, as a command.
            outcome = session.guard.check(action, audit=name != "run_command")
            if not outcome.allowed:
                return _error(outcome.reason)
            start = time.monotonic()
            try:
                text, is_error, extra = _TOOLS[name](session, args)
            except (CorralError, OSError, ValueError, TypeError) as exc:
                text, is_error, extra = f"corral: {name} failed: {exc}", True, {}
            session.guard.record(
                action, is_error=is_error, text=text, duration_s=time.monotonic() - start, **extra
            )
        return _error(text) if is_error else types.CallToolResult(content=[_text(text)])

    def allowed_tools(self) -> list[types.Tool]:
        """The tools the policy lets a client call (the others are not listed)."""
        if not self.settings.gate:
            return list(TOOLS)
        tg = self.settings.policy.tool_gate(self.settings.workspace)
        return [t for t in TOOLS if _listed_ok(tg.listed(SERVER, t.name))]

    def close(self, key: str) -> None:
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            with session.lock:
                session.sandbox.close()

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
            keys = list(self._sessions)
        for key in keys:
            self.close(key)
        self.ledger.close()

    def _get(self, key: str) -> _Session:
        with self._lock:
            if self._closed:
                raise CorralError("the server is shutting down")
            session = self._sessions.get(key)
            if session is None:
                # Made under the lock: two first calls of one session must not make two.
                session = self._open()
                self._sessions[key] = session
            return session

    def _open(self) -> _Session:
        s = self.settings
        run_id = s.run_id or f"mcp-{new_id()[:12]}"
        sandbox = Sandbox(
            s.policy, s.workspace, task=s.task, run_id=run_id, gate=s.gate, ledger=self.ledger
        )
        guard = ToolGuard(
            s.policy,
            self.ledger,
            workspace=sandbox.workspace,
            gate=s.gate,
            review=sandbox.review,
            task=s.task,
            sandbox_id=sandbox.id,
        )
        return _Session(sandbox, guard, run_id)

    def _reap_idle(self, keep: str) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [
                k
                for k, v in self._sessions.items()
                if k != keep and now - v.used > self.settings.idle_ttl
            ]
        for key in idle:
            self.close(key)


# -- the tools ----------------------------------------------------------------------------

_Result = tuple[str, bool, dict[str, Any]]


def _run_command(s: _Session, args: dict[str, Any]) -> _Result:
    command = _string(args, "command")
    timeout = args.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        raise ValueError("timeout must be a number of seconds")
    r = s.sandbox.run(command, timeout=timeout, step=s.step)
    extra = {"exit_code": r.exit_code, "command_action_id": r.action_id}
    if r.refused:
        on_flag = s.sandbox.review.on_flag if s.sandbox.review else Verdict.DENY
        why = refusal(r.decision, r.audit if r.refused == "audit" else None, on_flag)
        return why, True, {**extra, "refused": r.refused}
    out = r.stdout
    if r.stderr:
        out += ("\n" if out and not out.endswith("\n") else "") + r.stderr
    if out and not out.endswith("\n"):
        out += "\n"
    out += f"[exit code {r.exit_code}{', timed out' if r.timed_out else ''}]"
    for a in r.alerts:
        out += f"\n[alert {a.detector} ({a.category.value}): {a.response}]"
    return out, False, extra


def _read_file(s: _Session, args: dict[str, Any]) -> _Result:
    path = _string(args, "path")
    s.sandbox.check_host_path(path, write=False)
    data = files.read_file(s.sandbox.workspace, path, limit=READ_LIMIT)
    return data.decode("utf-8", "replace"), False, {}


def _write_file(s: _Session, args: dict[str, Any]) -> _Result:
    path, content = _string(args, "path"), _string(args, "content", empty=True)
    data = content.encode("utf-8")
    s.sandbox.write_file(path, data)
    return f"wrote {len(data)} bytes to {path}", False, {}


def _list_files(s: _Session, args: dict[str, Any]) -> _Result:
    path = args.get("path", ".")
    if not isinstance(path, str):
        raise ValueError("path must be a string")
    s.sandbox.check_host_path(path, write=False)
    entries = files.list_dir(s.sandbox.workspace, path)
    mark = {"dir": "/", "link": "@", "other": ""}
    return "\n".join(name + mark.get(kind, "") for name, kind in entries), False, {}


_TOOLS: dict[str, Callable[[_Session, dict[str, Any]], _Result]] = {
    "run_command": _run_command,
    "read_file": _read_file,
    "write_file": _write_file,
    "list_files": _list_files,
}


def _string(args: dict[str, Any], key: str, *, empty: bool = False) -> str:
    value = args.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise ValueError(
            f"{key} must be a non-empty string" if not empty else f"{key} must be a string"
        )
    return value


def _listed_ok(finding: Any) -> bool:
    return finding is None or finding.verdict is not Verdict.DENY


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[_text(text)], is_error=True)


# -- the MCP server -----------------------------------------------------------------------


def build_server(sessions: Sessions) -> Server[Sessions]:
    @asynccontextmanager
    async def lifespan(_: Server[Sessions]) -> AsyncIterator[Sessions]:
        try:
            yield sessions
        finally:
            # Shielded: on SIGTERM the serving task is cancelled, and the sandboxes must
            # still be closed and their end recorded.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(sessions.close_all)

    async def list_tools(
        ctx: ServerRequestContext[Sessions], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=ctx.lifespan_context.allowed_tools())

    async def call_tool(
        ctx: ServerRequestContext[Sessions], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        key = session_key(ctx.request)
        return await anyio.to_thread.run_sync(
            ctx.lifespan_context.call, key, params.name, dict(params.arguments or {})
        )

    return Server(
        SERVER,
        version=__version__,
        instructions=(
            "A sandboxed shell and the workspace's files. Every call is checked against "
            "a policy; a refused call returns an error that says why."
        ),
        lifespan=lifespan,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )
