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
import ipaddress
import re
import shlex
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.model import Action, ActionKind, Category, Decision, Verdict
from corral.policy import netdest
from corral.policy.rules import (
    CompiledRule,
    RuleSet,
    load_ruleset,
    match_globs,
    path_candidates,
    path_glob_regex,
    screening_regexes,
)
from corral.policy.schema import CommandRule, HostPattern
from corral.policy.shell import Invocation, ParsedCommand, ShellFeed, parse

if TYPE_CHECKING:
    from corral.policy.policy import Policy

_OUT_OPS = frozenset({">", ">>", ">|", "&>", "&>>", "<>", ">&"})
_IN_TEXT_OPS = frozenset({"<<", "<<-", "<<<"})
_WORDS = re.compile(r"[^\s|&;<>]+")


_Plan = tuple[
    tuple[tuple[CompiledRule, "str | None"], ...],
    tuple[tuple["CommandRule", "re.Pattern[str] | None"], ...],
]


@dataclass(frozen=True, slots=True)
class Finding:
    verdict: Verdict
    rule: str
    category: Category | None
    reason: str
    priority: int = 50

    def key(self) -> tuple[int, int, int]:
        return (self.verdict.rank, 1 if self.category else 0, self.priority)


class _View:
    """What the rules look at for one invocation, computed on demand."""

    __slots__ = (
        "_joined",
        "_lower",
        "_paths",
        "_text",
        "_writes",
        "args",
        "inv",
        "is_script",
        "program",
    )

    def __init__(self, inv: Invocation, is_script: bool) -> None:
        self.inv = inv
        self.is_script = is_script
        self._paths: tuple[str, ...] | None = None
        self.program = inv.program
        self.args = inv.argv[1:]
        self._joined: str | None = None
        self._text: str | None = None
        self._lower: str | None = None
        self._writes: tuple[str, ...] | None = None

    @property
    def joined(self) -> str:
        if self._joined is None:
            self._joined = " ".join(self.inv.argv)
        return self._joined

    @property
    def stdin_text(self) -> str:
        return "\n".join(r.target for r in self.inv.redirects if r.op in _IN_TEXT_OPS)

    @property
    def text(self) -> str:
        """argv, plus here-documents when the program runs them as a script (an
        interpreter's stdin is code; ``cat``'s is only data being written)."""
        if self._text is None:
            stdin = self.stdin_text if self.is_script else ""
            self._text = f"{self.joined}\n{stdin}" if stdin else self.joined
        return self._text

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    def paths(self) -> tuple[str, ...]:
        """Path-shaped substrings of the arguments and redirection targets."""
        if self._paths is None:
            words = [
                *self.args,
                *(r.target for r in self.inv.redirects if r.op not in _IN_TEXT_OPS),
            ]
            self._paths = tuple(p for w in words for p in path_candidates(w))
        return self._paths

    def write_targets(self, writers: dict[str, str] | object) -> tuple[str, ...]:
        if self._writes is None:
            out = [
                r.target
                for r in self.inv.redirects
                if r.op in _OUT_OPS and r.target and not r.target.isdigit()
            ]
            mode = writers.get(self.program) if isinstance(writers, dict) else None
            words = [a for a in self.args if not a.startswith("-")]
            if mode == "all":
                out.extend(words)
            elif mode == "last" and words:
                out.append(words[-1])
            elif mode == "of=":
                out.extend(a[3:] for a in self.args if a.startswith("of="))
            elif mode == "-i" and any(a.startswith("-i") or a == "--in-place" for a in self.args):
                has_script_flag = any(a in ("-e", "--expression", "-f") for a in self.args)
                out.extend(words if has_script_flag else words[1:])
            self._writes = tuple(out)
        return self._writes


def _rule_matches(
    rule: CompiledRule, view: _View, pipeline_programs: frozenset[str], writers: dict[str, str]
) -> str | None:
    """None when the rule does not match; otherwise the matched path ('' if none)."""
    inv = view.inv
    if rule.wrappers and not (rule.wrappers & set(inv.wrappers)):
        return None
    if rule.background is not None and inv.background != rule.background:
        return None
    if rule.args is not None and not any(rule.args.search(a) for a in view.args):
        return None
    for pat in rule.args_all:
        if not any(pat.search(a) for a in view.args):
            return None
    if rule.args_none is not None and any(rule.args_none.search(a) for a in view.args):
        return None
    if rule.argv is not None and not rule.argv.search(view.joined):
        return None
    if rule.redirect is not None and not any(
        rule.redirect.search(f"{r.op} {r.target}") for r in inv.redirects
    ):
        return None
    if rule.first_arg is not None or rule.last_arg is not None:
        operands = [a for a in view.args if not a.startswith("-")]
        if not operands:
            return None
        if rule.first_arg is not None and not rule.first_arg.search(operands[0]):
            return None
        if rule.last_arg is not None and not rule.last_arg.search(operands[-1]):
            return None
    if rule.piped_with and not any(
        fnmatch.fnmatchcase(p, g)
        for p in pipeline_programs - {view.program}
        for g in rule.piped_with
    ):
        return None
    if rule.text is not None:
        if rule.keywords and not any(k in view.lower for k in rule.keywords):
            return None
        if not rule.text.search(view.text):
            return None
    if rule.path_regex is not None:
        if rule.path_access == "write":
            words: Iterable[str] = (
                p for w in view.write_targets(writers) for p in path_candidates(w)
            )
        else:
            words = view.paths()
        for word in words:
            m = rule.path_regex.match(word)
            if m:
                return m.group(0)
        return None
    return ""


def _host_matches(p: HostPattern, host: str, port: int | None) -> bool:
    if p.port is not None and port is not None and p.port != port:
        return False
    if p.network is not None:
        try:
            return ipaddress.ip_address(host) in p.network
        except ValueError:
            return False
    return p.host is not None and fnmatch.fnmatchcase(host, p.host)


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
        self.allow_net = spec.network.allow_patterns
        self.deny_net = spec.network.deny_patterns
        self.net_mode = spec.network.mode
        self.argv_rules = [(r, r.argv_pattern()) for r in self.commands.rules]
        hidden = [
            path_glob_regex(h.rstrip("/")) + "|" + path_glob_regex(h.rstrip("/") + "/*")
            for h in spec.filesystem.hidden
        ]
        self.hidden = re.compile("|".join(hidden)) if hidden else None
        self._writers = dict(self.rules.writers)
        self._screens = screening_regexes(self.rules.rules)
        self._plans: dict[str, _Plan] = {}
        self._program_cache: dict[str, Finding | None] = {}
        self._script_globs = (*self.rules.interpreters, *self.rules.shells)
        self._scripted: dict[str, bool] = {}

    # -- public -------------------------------------------------------------------------

    def check(self, command: str, *, action: Action | None = None) -> Decision:
        start = time.perf_counter()
        finding = self._judge_command(command)
        return Decision(
            verdict=finding.verdict,
            rule=finding.rule,
            category=finding.category,
            reason=finding.reason,
            latency_s=time.perf_counter() - start,
            action_id=action.id if action else None,
            policy_hash=self.policy.hash,
        )

    def check_action(self, action: Action) -> Decision:
        if action.kind is ActionKind.SHELL:
            return self.check(str(action.payload.get("command", "")), action=action)
        if action.kind is ActionKind.EXEC:
            argv = [str(a) for a in action.payload.get("argv", [])]
            return self.check(shlex.join(argv), action=action)
        return Decision(
            Verdict.DENY,
            "gate-unsupported-kind",
            None,
            f"actions of kind {action.kind.value!r} are not handled by the shell gate",
            action_id=action.id,
            policy_hash=self.policy.hash,
        )

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
            words = tuple(w.strip("'\"`;(){}") for w in _WORDS.findall(line))
            words = tuple(w for w in words if w)
            if not words:
                continue
            inv = Invocation(argv=words, program=words[0].rsplit("/", 1)[-1])
            view = _View(inv, True)
            for rule in self.rules.for_program(inv.program):
                if _rule_matches(rule, view, frozenset(), self._writers) is not None:
                    f = Finding(
                        Verdict.DENY,
                        rule.id,
                        rule.category,
                        f"{why}; it also looks like this: {_fill(rule.reason, view, '')}",
                        rule.priority,
                    )
                    if best is None or f.key() > best.key():
                        best = f
        return best or Finding(Verdict.DENY, "parse-error", None, why)

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
        net_tools = self.rules.network_tools
        kind = (
            "network"
            if any(p.program in net_tools or p.program in ("nc", "ncat") for p in feed.producers)
            else "encoded"
            if feed.encoding
            else None
        )
        for rule in self.rules.feed_rules:
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
        scripted = self._scripted.get(program)
        if scripted is None:
            scripted = self._scripted[program] = match_globs(program, self._script_globs)
        view = _View(inv, scripted)
        plan = self._plans.get(program)
        if plan is None:
            plan = self._plan(program)
        rules, argv_rules = plan
        screened: dict[str, bool] = {}
        for rule, key in rules:
            if key is not None:
                passed = screened.get(key)
                if passed is None:
                    passed = screened[key] = self._screen(key, view)
                if not passed:
                    continue
            hit = _rule_matches(rule, view, peers, self._writers)
            if hit is not None:
                yield Finding(
                    rule.decision,
                    rule.id,
                    rule.category,
                    _fill(rule.reason, view, hit),
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
            yield from self._judge_network(view)

    def _plan(self, program: str) -> _Plan:
        """The rules that can apply to ``program``, with their screen keys (cached:
        the same few programs recur in nearly every command)."""
        plan: _Plan = (
            tuple((r, r.screen) for r in self.rules.for_program(program)),
            tuple(
                (r, p)
                for r, p in self.argv_rules
                if not r.program or match_globs(program, r.program)
            ),
        )
        if len(self._plans) < 8192:
            self._plans[program] = plan
        return plan

    def _screen(self, key: str, view: _View) -> bool:
        regex = self._screens[key]
        if key == "keywords":
            return regex.search(view.lower) is not None
        if key == "redirect":
            return any(regex.search(f"{r.op} {r.target}") for r in view.inv.redirects)
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

    def _judge_network(self, view: _View) -> Iterator[Finding]:
        inv = view.inv
        tool = self.rules.network_tools[inv.program]
        dests = netdest.from_argv(inv.program, view.args)
        direction = tool.direction
        if (
            any(p.search(a) for p in tool.upload for a in view.args)
            or any(r.op == "<" for r in inv.redirects)
            or (inv.pipe_index or 0) > 0
        ):
            direction = Category.EXFILTRATION
        elif any(
            r.op in (">", ">>", "&>")
            and r.target not in ("/dev/null", "")
            and not r.target.isdigit()
            for r in inv.redirects
        ) or any(a in ("-o", "-O", "--output", "--output-document") for a in view.args):
            direction = Category.INGRESS
        for d in dests:
            f = self._judge_destination(inv.program, d, direction)
            if f is not None:
                yield f

    def _judge_destination(
        self, program: str, d: netdest.Destination, direction: Category
    ) -> Finding | None:
        where = f"{d.host}:{d.port}" if d.port else d.host
        if d.host in self.rules.metadata_hosts:
            return Finding(
                Verdict.DENY,
                "net-metadata",
                Category.CREDENTIAL_ACCESS,
                f"{program} would reach the cloud metadata service ({where}), which hands out credentials",
            )
        cls = netdest.address_class(d.host)
        if cls == "loopback":
            return None
        explicit = any(
            _host_matches(p, d.host, d.port)
            for p in self.allow_net
            if p.network is not None or p.host == d.host
        )
        if cls in ("private", "link-local", "multicast", "unspecified") and not explicit:
            return Finding(
                Verdict.DENY,
                "net-internal",
                Category.RECON,
                f"{program} would reach {where}, an internal ({cls}) address; only explicit IP rules allow that",
            )
        if any(_host_matches(p, d.host, d.port) for p in self.deny_net):
            return Finding(
                Verdict.DENY,
                "net-deny-list",
                direction,
                f"{program} would reach {where}, which network.deny forbids",
            )
        if self.net_mode == "none":
            return Finding(
                Verdict.DENY,
                "net-off",
                direction,
                f"{program} would reach {where}, but this policy has no network (network.mode: none)",
            )
        if any(_host_matches(p, d.host, d.port) for p in self.allow_net):
            return None
        return Finding(
            Verdict.DENY,
            "net-not-allowed",
            direction,
            f"{program} would reach {where}, which is not on the network allowlist (network.allow)",
        )


def _fill(template: str, view: _View, path: str) -> str:
    inv = view.inv
    return template.format(
        program=inv.program or "the shell",
        path=path or "a protected path",
        wrapper=inv.wrappers[0] if inv.wrappers else "a wrapper",
        arg1=view.args[0] if view.args else "",
    )
