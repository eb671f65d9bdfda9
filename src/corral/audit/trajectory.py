"""Reading a finished trajectory: the task and the agent's steps, in order.

Two formats, told apart by their content:

- OpenAI chat format: a JSON array of messages, an object with ``messages``, or JSONL
  with one message per line. The task is the first user message. Each tool call of an
  assistant message is one step (a call whose arguments carry ``command`` or ``cmd`` is a
  shell command, any other a tool call); a ``tool`` message is the output of the call it
  answers. An assistant message without tool calls whose text holds one fenced
  ```` ```bash ```` block is a step too (the mini-swe-agent convention), and the user
  message after it is its output.
- JSONL of steps: ``{"task": ..., "command": ...}`` per line (``command`` a string or an
  argv list; or ``tool`` with ``args``; optional ``output`` and ``step``). A line's
  ``task`` holds for the lines after it until another one is given.

Pure parsing: text in, ``Trajectory`` out; errors name the file, the line (or the message
index for a JSON document) and the key.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import TrajectoryError
from corral.model import Action, ActionKind

# Argument names that carry a shell command in common agent tool schemas (SWE-agent,
# OpenHands, mini-swe-agent, Claude Code, the OpenAI shell tool).
_COMMAND_KEYS = ("command", "cmd", "bash_command", "shell_command")
_FENCE = re.compile(r"```(?:bash|sh|shell|console)?[ \t]*\n(.*?)```", re.S)


@dataclass(frozen=True, slots=True)
class Step:
    """One action of the agent, with what it was shown back (untrusted text)."""

    index: int  # 1-based
    action: Action
    output: str | None = None
    where: str = ""  # file:line or file: messages[i], for messages about this step
    # What the watcher raised while it ran ("mining: resource-hijack-cpu"), when known.
    alerts: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The action as one line of text: the command, or ``tool(args)``."""
        return action_text(self.action)


@dataclass(frozen=True, slots=True)
class Trajectory:
    task: str | None
    steps: tuple[Step, ...]
    source: str


def action_text(action: Action) -> str:
    p = action.payload
    if action.kind is ActionKind.SHELL:
        return str(p.get("command", ""))
    if action.kind is ActionKind.EXEC:
        return shlex.join(str(a) for a in p.get("argv", ()))
    if action.kind is ActionKind.TOOL:
        args = json.dumps(p.get("args", {}), sort_keys=True, ensure_ascii=False)
        return f"{p.get('tool')}({args})"
    return json.dumps(p, sort_keys=True, ensure_ascii=False)


def load_trajectory(path: str | Path) -> Trajectory:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrajectoryError("no such file", file=str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrajectoryError(f"cannot read: {e}", file=str(p)) from None
    return parse_trajectory(text, str(p))


def parse_trajectory(text: str, source: str = "<trajectory>") -> Trajectory:
    stripped = text.strip()
    if not stripped:
        raise TrajectoryError("empty file: no task and no steps", file=source)
    if stripped[0] in "[{":
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError:
            doc = None  # JSONL, one object per line
        if isinstance(doc, list):
            return _from_messages(_indexed(doc, source), source)
        if isinstance(doc, dict) and isinstance(doc.get("messages"), list):
            return _from_messages(_indexed(doc["messages"], source, "messages"), source)
        if isinstance(doc, dict):
            if "role" in doc:
                return _from_messages(iter([(f"{source}:1", doc)]), source)
            return _from_steps(iter([(1, doc)]), source)
    lines = list(_jsonl(text, source))
    if lines and "role" in lines[0][1]:
        return _from_messages(((f"{source}:{n}", m) for n, m in lines), source)
    return _from_steps(iter(lines), source)


def _jsonl(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrajectoryError(
                f"not JSON: {e.msg} (column {e.colno})", file=source, line=n
            ) from None
        if not isinstance(obj, dict):
            raise TrajectoryError(
                f"expected a JSON object, got {type(obj).__name__}", file=source, line=n
            )
        yield n, obj


def _indexed(
    messages: list[Any], source: str, key: str = ""
) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, m in enumerate(messages):
        where = f"{source}: {key}[{i}]" if key else f"{source}: [{i}]"
        if not isinstance(m, dict):
            raise TrajectoryError(
                f"a message must be a JSON object, got {type(m).__name__}",
                file=source,
                key=f"{key}[{i}]" if key else f"[{i}]",
            )
        yield where, m


def _content(value: Any) -> str:
    """Message content as text: a string, or the text parts of a content list."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(
            str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in value
        )
    return str(value)


def _from_messages(messages: Iterator[tuple[str, dict[str, Any]]], source: str) -> Trajectory:
    task: str | None = None
    steps: list[list[Any]] = []  # [action-kwargs, output, where, call id]
    by_call: dict[str, list[Any]] = {}
    for where, m in messages:
        role = m.get("role")
        if not isinstance(role, str):
            raise TrajectoryError("a message needs a string 'role'", file=where, key="role")
        if role == "user":
            text = _content(m.get("content"))
            if task is None:
                task = text
            elif steps and steps[-1][1] is None:
                steps[-1][1] = text  # mini-swe-agent: the observation comes as a user turn
        elif role == "assistant":
            calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else [])
            if not isinstance(calls, list):
                raise TrajectoryError("'tool_calls' must be a list", file=where, key="tool_calls")
            for j, call in enumerate(calls):
                action = _call_action(call, where, f"tool_calls[{j}]")
                entry = [action, None, where, None]
                if isinstance(call, Mapping) and isinstance(call.get("id"), str):
                    entry[3] = call["id"]
                    by_call[call["id"]] = entry
                steps.append(entry)
            if not calls:
                blocks = _FENCE.findall(_content(m.get("content")))
                if len(blocks) == 1 and blocks[0].strip():
                    steps.append(
                        [(ActionKind.SHELL, {"command": blocks[0].strip()}), None, where, None]
                    )
        elif role in ("tool", "function"):
            text = _content(m.get("content"))
            call_id = m.get("tool_call_id")
            target = by_call.get(call_id) if isinstance(call_id, str) else None
            if target is None and steps:
                target = steps[-1]
            if target is not None:
                target[1] = text
    out = tuple(
        Step(i, Action(kind=kind, payload=payload, step=i, task=task), output, where)
        for i, ((kind, payload), output, where, _id) in enumerate(steps, 1)
    )
    return Trajectory(task, out, source)


def _call_action(call: Any, where: str, key: str) -> tuple[ActionKind, dict[str, Any]]:
    if not isinstance(call, Mapping):
        raise TrajectoryError("a tool call must be an object", file=where, key=key)
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise TrajectoryError(
            "a tool call needs function.name", file=where, key=f"{key}.function.name"
        )
    raw = fn.get("arguments", {})
    if isinstance(raw, str):
        try:
            args = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise TrajectoryError(
                f"arguments are not JSON: {e.msg}", file=where, key=f"{key}.function.arguments"
            ) from None
    else:
        args = raw
    if not isinstance(args, Mapping):
        # Some tools take a bare string: treat it as the command when the tool runs one.
        args = {"input": args}
    for k in _COMMAND_KEYS:
        cmd = args.get(k)
        if isinstance(cmd, str):
            return ActionKind.SHELL, {"command": cmd}
        if isinstance(cmd, list) and all(isinstance(a, str) for a in cmd):
            return ActionKind.SHELL, {"command": shlex.join(cmd)}
    return ActionKind.TOOL, {"tool": fn["name"], "args": dict(args)}


def _from_steps(lines: Iterator[tuple[int, dict[str, Any]]], source: str) -> Trajectory:
    task: str | None = None
    first_task: str | None = None
    steps: list[Step] = []
    for n, obj in lines:
        if "task" in obj:
            if not isinstance(obj["task"], str):
                raise TrajectoryError("expected a string", file=source, line=n, key="task")
            task = obj["task"]
            first_task = first_task if first_task is not None else task
        output = obj.get("output")
        if output is not None and not isinstance(output, str):
            raise TrajectoryError("expected a string", file=source, line=n, key="output")
        cmd = obj.get("command")
        if isinstance(cmd, list) and all(isinstance(a, str) for a in cmd):
            cmd = shlex.join(cmd)
        if cmd is not None and not isinstance(cmd, str):
            raise TrajectoryError(
                "expected a string or a list of strings", file=source, line=n, key="command"
            )
        payload: dict[str, Any]
        if cmd is not None:
            kind, payload = ActionKind.SHELL, {"command": cmd}
        elif isinstance(obj.get("tool"), str):
            args = obj.get("args", {})
            if not isinstance(args, Mapping):
                raise TrajectoryError("expected an object", file=source, line=n, key="args")
            kind, payload = ActionKind.TOOL, {"tool": obj["tool"], "args": dict(args)}
        elif set(obj) <= {"task", "run_id", "episode"}:
            continue  # a header line that only sets the task
        else:
            raise TrajectoryError(
                "a step needs 'command' (or 'tool' with 'args')", file=source, line=n, key="command"
            )
        index = len(steps) + 1
        number = obj.get("step", index)
        if isinstance(number, bool) or not isinstance(number, int):
            raise TrajectoryError("expected an integer", file=source, line=n, key="step")
        action = Action(kind=kind, payload=payload, step=number, task=task)
        steps.append(Step(index, action, output, f"{source}:{n}"))
    if not steps:
        raise TrajectoryError("no steps: each line needs a 'command'", file=source)
    return Trajectory(first_task, tuple(steps), source)
