"""The gate: decide allow / ask / deny for an action before it runs.

A shell command is parsed into every program that would run (``shell.parse``); each one
is judged by the threat rules (shipped data), the policy's argv rules and program lists,
the filesystem policy and the network policy. The strictest finding wins; among equally
strict findings, one that names a threat category wins over a plain policy refusal,
because the category is what the RL reward and the incident report use.

The gate is a courtesy: it explains early and cheaply what the sandbox would stop anyway.
Nothing here is a containment guarantee.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from corral.model import Action, ActionKind, Category, Decision, Verdict
from corral.policy.matching import (
    IN_TEXT_OPS,
    Finding,
    InvocationView,
    fill_reason,
    rule_matches,
)
from corral.policy.netpolicy import NetworkRules
from corral.policy.rules import (
    CompiledRule,
    RuleSet,
    load_ruleset,
    match_globs,
    path_candidates,
    path_glob_regex,
    screening_regexes,
)
from corral.policy.schema import CommandRule
from corral.policy.shell import Invocation, ParsedCommand, ShellFeed, parse

if TYPE_CHECKING:
    from corral.policy.policy import Policy
    from corral.policy.toolgate import ToolGate

_WORDS = re.compile(r"[^\s|&;<>]+")
_CACHE_ENTRIES = 4096
_CACHE_TEXT = 512


# Per program: its threat rules grouped by screen key, the policy's argv rules for it,
# and whether it reads a script (its here-documents are then code, not data).
_Plan = tuple[
    tuple[tuple["str | None", tuple[CompiledRule, ...]], ...],
    tuple[tuple["CommandRule", "re.Pattern[str] | None"], ...],
    bool,
]


class Gate:
    """Decides about actions under one policy. Thread-safe after construction."""

    def __init__(self, policy: Policy, ruleset: RuleSet | None = None) -> None:
        self.policy = policy
        spec = policy.spec
        self.commands = spec.commands
        base = ruleset or load_ruleset()
        self.rules = (
            base.without(self.commands.disable)
            if self.commands.threats
            else base.without(r.id for r in base.rules)
        )
        self.network = NetworkRules(
            spec.network, self.rules.metadata_hosts, self.rules.network_tools
        )
        self.argv_rules = [(r, r.argv_pattern()) for r in self.commands.rules]
        # "dir/*" matches the directory itself too, so one pattern covers both.
        hidden = [path_glob_regex(h.rstrip("/") + "/*") for h in spec.filesystem.hidden]
        self.hidden = re.compile("|".join(f"(?:{h})" for h in hidden)) if hidden else None
        self._writers = dict(self.rules.writers)
        self._screens = screening_regexes(self.rules.rules)
        self._feed_rules = self.rules.feed_rules
        self._plans: dict[str, _Plan] = {}
        self._program_cache: dict[str, Finding | None] = {}
        self._script_globs = (*self.rules.interpreters, *self.rules.shells)
        self._decided: dict[str, Finding] = {}
        self._tool_gates: dict[str, ToolGate] = {}
        self._tool_gates_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------

    def check(self, command: str, *, action: Action | None = None) -> Decision:
        start = time.perf_counter()
        # A decision is a pure function of the policy and the text, and rollouts repeat
        # the same commands constantly; short texts only, so the cache stays small.
        finding = self._decided.get(command) if len(command) <= _CACHE_TEXT else None
        if finding is None:
            finding = self._judge_command(command)
            if len(command) <= _CACHE_TEXT:
                if len(self._decided) >= _CACHE_ENTRIES:
                    self._decided.clear()
                self._decided[command] = finding
        return self._decision(finding, start, action.id if action else None)

    def check_action(
        self, action: Action, *, workspace: str | os.PathLike[str] | None = None
    ) -> Decision:
        """Decide any action the gate handles: shell, exec, tool. ``workspace`` is where
        a tool call's relative paths point (default: the current directory)."""
        if action.kind is ActionKind.SHELL:
            return self.check(str(action.payload.get("command", "")), action=action)
        if action.kind is ActionKind.EXEC:
            argv = [str(a) for a in action.payload.get("argv", [])]
            return self.check(shlex.join(argv), action=action)
        if action.kind is ActionKind.TOOL:
            start = time.perf_counter()
            p = action.payload
            finding = self.tool_gate(workspace).judge(
                str(p.get("server") or ""), str(p.get("tool", "")), p.get("args", {})
            )
            return self._decision(finding, start, action.id)
        return Decision(
            Verdict.DENY,
            "gate-unsupported-kind",
            None,
            f"actions of kind {action.kind.value!r} are not handled by the gate",
            action_id=action.id,
            policy_hash=self.policy.hash,
        )

    def tool_gate(self, workspace: str | os.PathLike[str] | None = None) -> ToolGate:
        """The tool gate for one workspace, built on first use (its rules compiled once)."""
        # An absolute path is keyed as given: resolving it on every call would cost more
        # than the decision. A relative one depends on the current directory, which can
        # change, so it is resolved each time.
        text = os.fspath(Path.cwd() if workspace is None else workspace)
        key = text if os.path.isabs(text) else os.path.realpath(text)
        tg = self._tool_gates.get(key)
        if tg is None:
            from corral.policy.toolgate import ToolGate

            with self._tool_gates_lock:
                tg = self._tool_gates.get(key)
                if tg is None:
                    tg = ToolGate(self, key)
                    if len(self._tool_gates) >= 64:
                        self._tool_gates.clear()
                    self._tool_gates[key] = tg
        return tg

    def _decision(self, finding: Finding, start: float, action_id: str | None) -> Decision:
        return Decision(
            verdict=finding.verdict,
            rule=finding.rule,
            category=finding.category,
            reason=finding.reason,
            latency_s=time.perf_counter() - start,
            action_id=action_id,
            policy_hash=self.policy.hash,
        )

    def findings(self, parsed: ParsedCommand) -> list[Finding]:
        """Every finding that is not a plain allow, for a command already parsed: the
        auditor weighs them all, where ``check`` keeps only the strictest."""
        if parsed.error is not None:
            return [self._judge_unparsable(parsed.source, parsed.error)]
        return [f for f in self._findings(parsed) if f.verdict is not Verdict.ALLOW]

    # -- judging ------------------------------------------------------------------------

    def _judge_command(self, command: str) -> Finding:
        parsed = parse(command)
        if parsed.error is not None:
            return self._judge_unparsable(command, parsed.error)
        best: Finding | None = None
        for f in self._findings(parsed):
            if best is None or f.key() > best.key():
                best = f
        if best is None or best.verdict is Verdict.ALLOW:
            if parsed.partial:
                return Finding(
                    Verdict.ASK,
                    "parse-partial",
                    None,
                    "the command could only be partly parsed; a reviewer should confirm it",
                )
            return best or Finding(Verdict.ALLOW, "allow", None, "allowed by policy")
        return best

    def _judge_unparsable(self, command: str, error: str) -> Finding:
        """Deny, and name the threat if plain words of the text show one: the category
        of a broken command still matters to the reward and the report."""
        why = f"the command could not be parsed: {error}"
        best: Finding | None = None
        for line in command[:100_000].splitlines():
            words = tuple(w for w in (w.strip("'\"`;(){}") for w in _WORDS.findall(line)) if w)
            if not words:
                continue
            inv = Invocation(argv=words, program=words[0].rsplit("/", 1)[-1])
            for f in self._judge_invocation(inv, frozenset()):
                if f.category is not None and (best is None or f.key() > best.key()):
                    best = f
        if best is None:
            return Finding(Verdict.DENY, "parse-error", None, why)
        return Finding(
            Verdict.DENY,
            best.rule,
            best.category,
            f"{why}; it also looks like this: {best.reason}",
            best.priority,
        )

    def _findings(self, parsed: ParsedCommand) -> Iterator[Finding]:
        for feed in parsed.feeds:
            f = self._judge_feed(feed)
            if f:
                yield f
        pipelines: dict[int, set[str]] = {}
        for inv in parsed.invocations:
            if inv.pipeline_id is not None:
                pipelines.setdefault(inv.pipeline_id, set()).add(inv.program)
        allowed = Finding(Verdict.ALLOW, "allow", None, "allowed by policy")
        for inv in parsed.invocations:
            peers = (
                frozenset(pipelines.get(inv.pipeline_id, ()))
                if inv.pipeline_id is not None
                else frozenset()
            )
            yield from self._judge_invocation(inv, peers)
        yield allowed

    def _judge_feed(self, feed: ShellFeed) -> Finding | None:
        if feed.decoded is not None:
            return None
        kind = (
            "network"
            if any(p.program in self.rules.network_tools for p in feed.producers)
            else "encoded"
            if feed.encoding
            else None
        )
        for rule in self._feed_rules:
            if rule.feed == kind:
                return Finding(
                    rule.decision, rule.id, rule.category, f"{rule.reason} ({feed.reason})"
                )
        return Finding(
            Verdict.ASK,
            "feed-unknown",
            None,
            f"text fed to {feed.shell} cannot be read before it runs ({feed.reason})",
        )

    def _judge_invocation(self, inv: Invocation, peers: frozenset[str]) -> Iterator[Finding]:
        program = inv.program
        plan = self._plans.get(program)
        if plan is None:
            plan = self._plan(program)
        groups, argv_rules, scripted = plan
        view = InvocationView(inv, scripted)
        for key, rules in groups:
            # One screen decides for the whole group whether any of its rules can match.
            if key is not None and not self._screen(key, view):
                continue
            for rule in rules:
                hit = rule_matches(rule, view, peers, self._writers)
                if hit is not None:
                    yield Finding(
                        rule.decision,
                        rule.id,
                        rule.category,
                        fill_reason(rule.reason, view, hit),
                        rule.priority,
                    )
        if self.hidden is not None:
            for word in view.paths():
                m = self.hidden.match(word)
                if m:
                    yield Finding(
                        Verdict.DENY,
                        "policy-hidden-path",
                        Category.CREDENTIAL_ACCESS,
                        f"{m.group(0)} is hidden by the policy (filesystem.hidden)",
                    )
                    break
        for argv_rule, pattern in argv_rules:
            if pattern is not None and not pattern.search(view.joined):
                continue
            yield Finding(
                argv_rule.decision, f"policy:{argv_rule.id}", argv_rule.category, argv_rule.reason
            )
        if inv.argv:
            yield from self._judge_program(inv)
        # Inline interpreter code that downloads is the threat rule ingress-script-download's
        # job: URLs inside code are too often just strings (urlsplit("http://x")).
        if program in self.rules.network_tools:
            yield from self.network.judge_invocation(view)

    def _plan(self, program: str) -> _Plan:
        """The rules that can apply to ``program``, with their screen keys (cached:
        the same few programs recur in nearly every command)."""
        grouped: dict[str | None, list[CompiledRule]] = {}
        for r in self.rules.for_program(program):
            grouped.setdefault(r.screen, []).append(r)
        plan: _Plan = (
            tuple((key, tuple(rules)) for key, rules in grouped.items()),
            tuple(
                (r, p)
                for r, p in self.argv_rules
                if not r.program or match_globs(program, r.program)
            ),
            match_globs(program, self._script_globs),
        )
        if len(self._plans) < 8192:
            self._plans[program] = plan
        return plan

    def _screen(self, key: str, view: InvocationView) -> bool:
        regex = self._screens[key]
        if key == "keywords":
            return regex.search(view.lower) is not None
        if key == "redirect":
            # A here-document's body is text (judged as a script when a shell reads it),
            # not a redirection target; scanning it cost more than the rest of the rules.
            return any(
                regex.search(f"{r.op} {r.target}")
                for r in view.inv.redirects
                if r.op not in IN_TEXT_OPS
            )
        if key == "path:write":
            return any(
                regex.match(p)
                for w in view.write_targets(self._writers)
                for p in path_candidates(w)
            )
        return any(regex.match(p) for p in view.paths())

    def _judge_program(self, inv: Invocation) -> Iterator[Finding]:
        if inv.dynamic_program:
            yield Finding(
                Verdict.ASK,
                "program-dynamic",
                None,
                f"the program name {inv.argv[0]!r} is computed at run time and cannot be checked",
            )
            return
        written = inv.argv[0]
        key = written if "/" in written else inv.program
        cached = self._program_cache.get(key, self)
        if cached is self:
            cached = self._program_finding(written, inv.program)
            if len(self._program_cache) < 8192:
                self._program_cache[key] = cached
        if isinstance(cached, Finding):
            yield cached

    def _program_finding(self, written: str, program: str) -> Finding | None:
        c = self.commands

        def listed(globs: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(written if "/" in g else program, g) for g in globs)

        if listed(c.deny):
            return Finding(
                Verdict.DENY,
                "policy-deny-list",
                None,
                f"{program} is on the policy's deny list (commands.deny)",
            )
        if program in self.rules.builtins or listed(c.allow):
            return None
        if listed(c.ask):
            return Finding(
                Verdict.ASK, "policy-ask-list", None, f"{program} needs approval (commands.ask)"
            )
        if c.default is Verdict.ALLOW:
            return None
        return Finding(
            c.default,
            "policy-default",
            None,
            f"{written} is not on the policy's allowlist (commands.allow); default is {c.default.value}",
        )
