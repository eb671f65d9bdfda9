"""The tool gate: a tool call (an MCP server's tool, an agent framework's file or web tool)
decided by its ``server/tool`` name and held to the policy's argument rules.

The lists (``tools.deny``, ``ask``, ``allow``, ``default``) say which tools may be called
at all. ``tools.rules`` say what their arguments must be, value by value, through JSON
paths: a path an agent could read or write under the filesystem section, a URL the network
section lets out, a command the shell gate allows, a pattern, a JSON Schema. The checks are
the ones the shell gate already uses (its hidden-path regex, ``NetworkRules``, the shell
gate itself), so one policy says the same thing about ``cat ~/.ssh/id_rsa`` and about
``read_file(path="~/.ssh/id_rsa")``.

A tool usually runs outside any sandbox (an MCP server on the host), so this gate is
stricter than the shell gate about where a path or URL may lead: a path must stay in the
workspace (or a path the filesystem section lists), a symbolic link is followed to where
it points, and loopback is the host's own, reachable only through an explicit IP rule.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from corral.model import Category, Verdict
from corral.policy import netdest
from corral.policy.jsonpath import JsonPath, compile_path
from corral.policy.matching import Finding
from corral.policy.schema import ArgConstraint, ToolRule, ToolsSpec

if TYPE_CHECKING:
    from corral.policy.gate import Gate

_CACHE_ENTRIES = 4096
_VALUE_CHARS = 80  # how much of an offending value a reason quotes


def split_name(name: str) -> tuple[str, str]:
    """``"server/tool"`` -> ``("server", "tool")``; a name without a server has ``""``."""
    server, sep, tool = name.partition("/")
    return (server, tool) if sep else ("", name)


@dataclass(frozen=True, slots=True)
class _Glob:
    """One ``server/tool`` glob, split so that ``*`` in the server part never swallows a
    ``/`` that belongs to the tool name."""

    server: re.Pattern[str]
    tool: re.Pattern[str]

    @classmethod
    def compile(cls, glob: str) -> _Glob:
        server, tool = split_name(glob)
        return cls(re.compile(fnmatch.translate(server)), re.compile(fnmatch.translate(tool)))

    def matches(self, server: str, tool: str) -> bool:
        return self.server.match(server) is not None and self.tool.match(tool) is not None


@dataclass(frozen=True, slots=True)
class _Check:
    path: JsonPath
    spec: ArgConstraint
    pattern: re.Pattern[str] | None
    not_pattern: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class _Rule:
    spec: ToolRule
    globs: tuple[_Glob, ...]
    checks: tuple[_Check, ...]
    validator: Any  # a jsonschema validator, or None


class ToolGate:
    """Decides tool calls under one policy for one workspace (relative paths in arguments
    are relative to it). Built by ``Gate.tool_gate``; thread-safe after construction."""

    def __init__(self, gate: Gate, workspace: str | os.PathLike[str]) -> None:
        spec: ToolsSpec = gate.policy.spec.tools
        fs = gate.policy.spec.filesystem
        self.gate = gate
        self.default = spec.default
        self.workspace = Path(os.path.realpath(workspace))
        ws = str(self.workspace)
        self._deny = tuple(_Glob.compile(g) for g in spec.deny)
        self._ask = tuple(_Glob.compile(g) for g in spec.ask)
        self._allow = tuple(_Glob.compile(g) for g in spec.allow)
        self._rules = tuple(_compile_rule(r) for r in spec.rules)
        home = os.environ.get("HOME") or os.path.expanduser("~")

        def host_path(p: str) -> str:
            if p == "~" or p.startswith("~/"):
                p = home + p[1:]
            return os.path.normpath(os.path.join(ws, p))

        writable = tuple(host_path(p) for p in fs.writable)
        self._read_only = tuple(host_path(p) for p in fs.read_only)
        self._read_roots = (ws, *self._read_only, *writable)
        self._write_roots = (ws, *writable)
        self._protected = tuple(
            p
            for p in (host_path(q) for q in fs.protected if not os.path.isabs(q))
            if p not in writable
        )
        self._home = home
        # A workspace under a hidden path (/root/project) is still bound into the sandbox
        # and visible there; what is inside it is then judged by the other rules alone.
        self._ws_hidden = gate.hidden is not None and gate.hidden.match(ws) is not None
        self._names: dict[tuple[str, str], tuple[Finding | None, tuple[_Rule, ...]]] = {}

    # -- public -------------------------------------------------------------------------

    def listed(self, server: str, tool: str) -> Finding | None:
        """What the lists alone say about a tool (None: allowed); ``mcp-gateway`` lists
        a tool to its agent only when this is not a deny."""
        return self._lookup(server, tool)[0]

    def judge(self, server: str, tool: str, args: Any) -> Finding:
        """The strictest finding about one call; an allow when there is none."""
        best: Finding | None = None
        for f in self.findings(server, tool, args):
            if best is None or f.key() > best.key():
                best = f
        return best or Finding(Verdict.ALLOW, "allow", None, "allowed by policy (tools)")

    def findings(self, server: str, tool: str, args: Any) -> Iterator[Finding]:
        listed, rules = self._lookup(server, tool)
        if listed is not None:
            yield listed
        if not isinstance(args, dict):
            yield Finding(
                Verdict.DENY,
                "tool-bad-args",
                None,
                f"{server}/{tool}: arguments must be a JSON object, got {type(args).__name__}",
            )
            return
        for rule in rules:
            yield from self._judge_rule(rule, server, tool, args)

    # -- lists --------------------------------------------------------------------------

    def _lookup(self, server: str, tool: str) -> tuple[Finding | None, tuple[_Rule, ...]]:
        key = (server, tool)
        hit = self._names.get(key)
        if hit is None:
            rules = tuple(r for r in self._rules if any(g.matches(server, tool) for g in r.globs))
            hit = (self._list_finding(server, tool), rules)
            if len(self._names) >= _CACHE_ENTRIES:
                self._names.clear()
            self._names[key] = hit
        return hit

    def _list_finding(self, server: str, tool: str) -> Finding | None:
        name = f"{server}/{tool}"
        if any(g.matches(server, tool) for g in self._deny):
            return Finding(
                Verdict.DENY,
                "tool-deny-list",
                None,
                f"{name} is on the policy's tool deny list (tools.deny)",
            )
        if any(g.matches(server, tool) for g in self._ask):
            return Finding(Verdict.ASK, "tool-ask-list", None, f"{name} needs approval (tools.ask)")
        if any(g.matches(server, tool) for g in self._allow) or self.default is Verdict.ALLOW:
            return None
        return Finding(
            self.default,
            "tool-default",
            None,
            f"{name} is not on the policy's tool allowlist (tools.allow); default is {self.default.value}",
        )

    # -- rules --------------------------------------------------------------------------

    def _judge_rule(
        self, rule: _Rule, server: str, tool: str, args: dict[str, Any]
    ) -> Iterator[Finding]:
        spec = rule.spec
        for check in rule.checks:
            values = check.path.find(args)
            where = f"{server}/{tool} {check.path.text}"
            if not values:
                if check.spec.required:
                    yield _violation(
                        spec, Verdict.DENY, "tool-arg-missing", None, f"{where} is missing"
                    )
                continue
            for value in values:
                yield from self._judge_value(spec, check, where, server, tool, value)
        if rule.validator is not None:
            error = _schema_error(rule.validator, args)
            if error is not None:
                yield _violation(
                    spec,
                    Verdict.DENY,
                    "tool-schema",
                    None,
                    f"{server}/{tool} arguments break the rule's JSON Schema: {error}",
                )

    def _judge_value(
        self, rule: ToolRule, check: _Check, where: str, server: str, tool: str, value: Any
    ) -> Iterator[Finding]:
        c = check.spec
        if check.pattern is not None or check.not_pattern is not None:
            text = _as_text(value)
            if text is None:
                yield _violation(
                    rule,
                    Verdict.DENY,
                    "tool-pattern",
                    None,
                    f"{where} must be text, got {_json_type(value)}",
                )
            else:
                if check.pattern is not None and check.pattern.fullmatch(text) is None:
                    yield _violation(
                        rule,
                        Verdict.DENY,
                        "tool-pattern",
                        None,
                        f"{where} {_quote(text)} does not match {check.pattern.pattern!r}",
                    )
                if check.not_pattern is not None and (m := check.not_pattern.search(text)):
                    yield _violation(
                        rule,
                        Verdict.DENY,
                        "tool-pattern",
                        None,
                        f"{where} contains {_quote(m.group(0))}, which {check.not_pattern.pattern!r} forbids",
                    )
        if c.path is not None:
            f = self._judge_path(where, value, write=c.path == "write")
            if f is not None:
                yield _violation(rule, f.verdict, f.rule, f.category, f.reason)
        if c.url:
            for f in self._judge_url(where, f"{server}/{tool}", value):
                yield _violation(rule, f.verdict, f.rule, f.category, f.reason)
        if c.command:
            if not isinstance(value, str):
                yield _violation(
                    rule,
                    Verdict.DENY,
                    "tool-command",
                    None,
                    f"{where} must be a command string, got {_json_type(value)}",
                )
            else:
                d = self.gate.check(value)
                if d.verdict is not Verdict.ALLOW:
                    yield _violation(
                        rule, d.verdict, d.rule, d.category, f"{where}: {d.reason}", cap=True
                    )

    def _judge_path(self, where: str, value: Any, *, write: bool) -> Finding | None:
        if not isinstance(value, str) or not value or "\0" in value:
            return Finding(
                Verdict.DENY, "tool-path", None, f"{where} must be a path, got {_quote(value)}"
            )
        text = value
        if text.lower().startswith("file:"):
            text = unquote(urlsplit(text).path) or "/"
        if text == "~" or text.startswith("~/"):
            text = self._home + text[1:]
        lexical = os.path.normpath(os.path.join(self.workspace, text))
        # The lexical path is what the policy's globs name; the resolved one is where a
        # symbolic link planted in the workspace would actually lead the tool.
        for p in dict.fromkeys((lexical, os.path.realpath(lexical))):
            via = "" if p == lexical else f" (through a symbolic link, {p})"
            hidden = self.gate.hidden.match(p) if self.gate.hidden is not None else None
            if hidden and not (self._ws_hidden and _under(p, str(self.workspace))):
                return Finding(
                    Verdict.DENY,
                    "policy-hidden-path",
                    Category.CREDENTIAL_ACCESS,
                    f"{where} {_quote(value)}{via}: {hidden.group(0)} is hidden by the policy (filesystem.hidden)",
                )
            roots = self._write_roots if write else self._read_roots
            if not any(_under(p, r) for r in roots):
                return Finding(
                    Verdict.DENY,
                    "tool-path-outside",
                    None,
                    f"{where} {_quote(value)}{via} is outside the workspace {self.workspace}"
                    + (" and the paths filesystem lists" if len(roots) > 1 else ""),
                )
            if write:
                if any(_under(p, r) for r in self._read_only):
                    return Finding(
                        Verdict.DENY,
                        "tool-path-read-only",
                        None,
                        f"{where} {_quote(value)}{via} is read-only (filesystem.read_only)",
                    )
                if any(_under(p, r) for r in self._protected):
                    return Finding(
                        Verdict.DENY,
                        "tool-path-protected",
                        Category.PERSISTENCE,
                        f"{where} {_quote(value)}{via} is run by the host later; it is protected (filesystem.protected)",
                    )
        return None

    def _judge_url(self, where: str, name: str, value: Any) -> Iterator[Finding]:
        if not isinstance(value, str) or not value.strip():
            yield Finding(
                Verdict.DENY, "tool-url", None, f"{where} must be a URL, got {_quote(value)}"
            )
            return
        if value.lower().startswith("file:"):
            f = self._judge_path(where, value, write=False)
            if f is not None:
                yield f
            return
        dests = netdest.from_urls(value) or netdest.from_argv("curl", [value.strip()])
        if not dests:
            yield Finding(
                Verdict.DENY,
                "tool-url",
                None,
                f"{where} {_quote(value)} names no host the gate can read",
            )
            return
        network = self.gate.network
        for d in dests:
            if netdest.address_class(d.host) == "loopback" and not any(
                p.matches(d.host, d.port)
                for p in network.allow
                if p.network is not None or p.host == d.host
            ):
                yield Finding(
                    Verdict.DENY,
                    "net-internal",
                    Category.RECON,
                    f"{where}: {name} would reach {d.host}; a tool runs outside the sandbox, where "
                    "loopback is the host's own, so only an explicit IP rule allows it",
                )
                continue
            f = network.judge_destination(name, d, Category.EXFILTRATION)
            if f is not None:
                yield Finding(f.verdict, f.rule, f.category, f"{where}: {f.reason}", f.priority)


def _compile_rule(rule: ToolRule) -> _Rule:
    checks = tuple(
        _Check(
            compile_path(path),
            c,
            re.compile(c.pattern) if c.pattern is not None else None,
            re.compile(c.not_pattern) if c.not_pattern is not None else None,
        )
        for path, c in rule.args.items()
    )
    validator = None
    if rule.json_schema is not None:
        validator = _jsonschema().validators.validator_for(rule.json_schema)(rule.json_schema)
    return _Rule(rule, tuple(_Glob.compile(g) for g in rule.tool), checks, validator)


def _violation(
    rule: ToolRule,
    verdict: Verdict,
    check: str,
    category: Category | None,
    detail: str,
    *,
    cap: bool = False,
) -> Finding:
    """A broken constraint: the rule's decision (``cap``: no stricter than the check's own
    verdict, so a command the shell gate only asks about is asked about here too), the
    rule's category when it names one."""
    if not cap or verdict is Verdict.DENY:
        verdict = rule.decision
    reason = f"{rule.reason}: {detail}" if rule.reason else detail
    return Finding(verdict, check, rule.category or category, f"{reason} (tools.rules {rule.id})")


def _schema_error(validator: Any, args: dict[str, Any]) -> str | None:
    error = _jsonschema().exceptions.best_match(validator.iter_errors(args))
    if error is None:
        return None
    where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"{where}: {error.message[:200]}"


def _jsonschema() -> Any:
    # Through importlib: jsonschema ships no type information, and only policies with a
    # schema rule pay for importing it.
    return importlib.import_module("jsonschema")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return None


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > _VALUE_CHARS:
        text = text[: _VALUE_CHARS - 3] + "..."
    return repr(text)


def tool_text(server: str | None, tool: str, args: Any, limit: int = 200) -> str:
    """A call as one line, ``server/tool {"arg": ...}``, for logs and reports."""
    text = json.dumps(args, sort_keys=True, default=str, separators=(",", ":"))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{server + '/' if server else ''}{tool} {text}"
