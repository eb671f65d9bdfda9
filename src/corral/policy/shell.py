"""Turn a shell command string into every program it would run.

The gate decides on what would run, so this parser must be complete (nested, wrapped,
decoded and recursed commands included) and must never raise: anything it cannot
understand becomes ``ParsedCommand.error``, which the gate denies. It uses the real bash
grammar through tree-sitter-bash; the walk over the tree lives in ``shell_walk``, the
wrapper table in ``shell_argv`` and the static decoding in ``decode``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import tree_sitter as ts
import tree_sitter_bash as tsb


@dataclass(frozen=True, slots=True)
class Redirect:
    """One redirection. ``op`` is as written (">", ">>", "<", "<<", "<<-", "<<<", "&>",
    "&>>", ">&", "<&", "<>", ">|"); a close (">&-") is op ">&" with target "-". ``target``
    is the word after unquoting, the heredoc body for "<<", and for fd duplications the fd
    ("2>&1" has target "1"). A target with an unknown expansion keeps it as written
    ("/dev/tcp/$H/80") and has ``dynamic`` set."""

    op: str
    target: str
    fd: str | None = None
    dynamic: bool = False


@dataclass(frozen=True, slots=True)
class Invocation:
    """A program that would run. ``argv`` is unquoted, with known variables substituted,
    ``$HOME`` written as ``~``, and unknown expansions kept as written ("$PID", "$(date)").

    ``origin`` is "top", "subst" ($(...), backticks), "procsubst" (<(...), >(...)),
    "function" (a function body), "shell-c" (bash -c, su -c, watch, ...), "eval",
    "heredoc" (a heredoc or here-string fed to a shell), "decoded:<encoding>" (text a
    pipeline or substitution computes and a shell runs; the encoding is that of the
    ShellFeed, e.g. "decoded:base64", "decoded:printf-escape", "decoded:plain"), "xargs"
    or "find-exec". ``depth`` counts the shell-c/eval/heredoc/decoded levels above it."""

    argv: tuple[str, ...]
    program: str
    redirects: tuple[Redirect, ...] = ()
    origin: str = "top"
    wrappers: tuple[str, ...] = ()
    dynamic_program: bool = False
    background: bool = False
    depth: int = 0
    pipe_index: int | None = None
    pipeline_id: int | None = None


@dataclass(frozen=True, slots=True)
class ShellFeed:
    """Text that flows into a shell interpreter (sh, bash, eval, source, ...) at run time.

    ``shell`` is the interpreter's name, "eval", "source", or "exec" when the text is a
    command word produced by decoding (``$(echo bHM= | base64 -d) -la``)."""

    shell: str
    producers: tuple[Invocation, ...]
    decoded: str | None
    encoding: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    """Everything ``parse`` found. With ``error`` set, ``invocations`` holds only what was
    found before the failure and must not be trusted."""

    source: str
    invocations: tuple[Invocation, ...]
    feeds: tuple[ShellFeed, ...] = ()
    error: str | None = None
    partial: bool = False
    variables: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    functions: tuple[str, ...] = ()  # names of shell functions defined in the text

    @property
    def programs(self) -> tuple[str, ...]:
        return tuple(inv.program for inv in self.invocations)


class Refused(Exception):
    """Raised inside the walk for input that must become ``ParsedCommand.error``."""


_LANGUAGE = ts.Language(tsb.language())
_LOCAL = threading.local()


def ts_parse(data: bytes) -> ts.Tree:
    """Parse with this thread's parser: tree-sitter parsers are not thread-safe."""
    parser: ts.Parser | None = getattr(_LOCAL, "parser", None)
    if parser is None:
        parser = _LOCAL.parser = ts.Parser(_LANGUAGE)
    return parser.parse(data)


def bash_syntax_error(data: bytes) -> str | None:
    """Ask ``bash -n`` (parse only, never execute) whether text is valid shell.

    tree-sitter-bash rejects a few things bash accepts, so its verdict alone would make
    the gate deny valid commands. Returns None when bash accepts the text."""
    try:
        proc = subprocess.run(
            # extglob on: interactive shells usually have it, and it only adds syntax
            [shutil.which("bash") or "bash", "--norc", "--noprofile", "-O", "extglob", "-n"],
            input=data,
            capture_output=True,
            timeout=2,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin", "LC_ALL": "C"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "syntax error: bash -n timed out checking the text"
    except OSError as exc:
        return f"syntax error: tree-sitter rejected the text and bash -n is unavailable ({exc})"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    msg = lines[0] if lines else f"bash -n exited with status {proc.returncode}"
    msg = re.sub(r"^\S*bash: (?:line \d+: )?", "", msg)
    if "matching" in msg and "EOF" in msg:
        return f"unbalanced quote: {msg}"
    return msg if msg.startswith("syntax error") else f"syntax error: {msg}"


def parse(command: str, *, max_depth: int = 6, max_length: int = 1_000_000) -> ParsedCommand:
    """Every program that ``command`` would run, as far as static analysis can tell."""
    from corral.policy.shell_walk import Walker  # the walker needs the types above

    source = command if isinstance(command, str) else ""
    walker: Walker | None = None
    try:
        if not isinstance(command, str):
            raise Refused("command is not a string")
        if len(command) > max_length:
            raise Refused(f"command longer than {max_length} characters")
        if "\x00" in command:
            raise Refused("command contains a NUL byte")
        walker = Walker(max_depth)
        walker.run(command)
        return ParsedCommand(
            source=source,
            invocations=tuple(walker.out),
            feeds=tuple(walker.feeds),
            partial=walker.partial,
            variables=MappingProxyType(dict(walker.top_vars)),
            functions=tuple(walker.functions),
        )
    except Refused as exc:
        error = str(exc)
    except RecursionError:
        error = "command is nested too deeply to analyse"
    except Exception as exc:  # never let a parser bug become a crash of the gate
        error = f"internal error while parsing ({type(exc).__name__}: {exc})"
    found = tuple(walker.out) if walker is not None else ()
    return ParsedCommand(source=source, invocations=found, error=error)
