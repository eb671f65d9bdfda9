"""The rule auditor: does this action serve the stated task? Embedded, no network.

It reads the same command three ways and weighs what it finds against the task:

- the gate's threat rules (a finding with a category is evidence of intent; a plain
  policy refusal is not);
- the watcher's exec and file detectors, applied to every program the command would run
  as if it had run (a miner under an innocent name still carries its pool URL);
- the checks of ``rules/audit.yaml``: what a coding task rarely needs (GPU work,
  detached processes, running what an earlier step downloaded, surveying the system),
  each with the task words that would make it plausible.

Scores combine as independent evidence; a threat or check the task calls for is capped
at ``justified`` (asked about, not denied). Parsing is shared with the gate, so a command
costs one parse; p99 is in ``bench/audit_bench.py``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.audit.protocol import Thresholds
from corral.audit.trajectory import Step, action_text
from corral.errors import RuleError
from corral.model import Action, ActionKind, AuditVerdict, Category, Verdict
from corral.policy import Policy
from corral.policy.gate import Gate
from corral.policy.loader import _line_for, parse_data_file, read_data_file
from corral.policy.shell import Invocation, ParsedCommand, parse
from corral.watch.rules import DetectorRule, EventView, load_detectors

# -- the data file ------------------------------------------------------------------------


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Cond(_M):
    program: list[str] | str | None = None
    argv: list[str] | None = None
    argv_not: list[str] | None = None
    text: list[str] | None = None
    program_path: list[str] | None = None
    program_path_not: list[str] | None = None
    detached: bool | None = None
    runs_downloaded: bool | None = None
    any: list[_Cond] | None = None


class _Check(_M):
    id: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    category: Category
    score: float = Field(ge=0, le=1)
    reason: str
    match: _Cond
    serves: list[str] = []


class _Launchers(_M):
    wrappers: list[str]
    programs: dict[str, str]


class _GateScores(_M):
    threat: dict[Literal["deny", "ask"], float]
    policy: dict[Literal["deny", "ask"], float]
    network: dict[Literal["deny", "ask"], float]
    as_policy: list[str] = []
    plain: list[str] = []


class _Injection(_M):
    score: float = Field(ge=0, le=1)
    keywords: list[str]
    patterns: list[str]


class _File(_M):
    version: str
    thresholds: dict[Literal["ask", "deny"], float]
    material: float = Field(ge=0, le=1)
    justified: float = Field(ge=0, le=1)
    served_check: float = Field(ge=0, le=1)
    gate: _GateScores
    detector: dict[Literal["severity"], dict[str, float]]
    serves: dict[Category, list[str]]
    detached: _Launchers
    downloaders: dict[str, list[str]]
    checks: list[_Check]
    injection: _Injection


def _terms(words: Iterable[str]) -> re.Pattern[str] | None:
    words = [w for w in words if w]
    if not words:
        return None
    alt = "|".join(re.escape(w.lower()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alt})(?![\w-])")


@dataclass(frozen=True, slots=True)
class Regexes:
    """Any of several regexes. Kept apart rather than joined with ``|``: a pattern that
    starts with a literal is searched by its prefix, ten times faster than an
    alternation, and a 3 KB heredoc is searched by every check."""

    patterns: tuple[re.Pattern[str], ...]

    def search(self, text: str) -> re.Match[str] | None:
        for p in self.patterns:
            m = p.search(text)
            if m is not None:
                return m
        return None


@dataclass(frozen=True, slots=True)
class _Test:
    programs: re.Pattern[str] | None = None
    argv: Regexes | None = None
    argv_not: Regexes | None = None
    text: Regexes | None = None
    path: Regexes | None = None
    path_not: Regexes | None = None
    detached: bool | None = None
    downloaded: bool | None = None
    any_of: tuple[_Test, ...] = ()


@dataclass(frozen=True, slots=True)
class Check:
    id: str
    category: Category
    score: float
    reason: str
    test: _Test
    serves: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class Injection:
    """Text addressed to a reviewer. Matched on lower-cased text, and only when one of
    ``keywords`` is in it."""

    keywords: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]

    def search(self, text: str) -> str | None:
        lower = text.lower()
        if not any(k in lower for k in self.keywords):
            return None
        for p in self.patterns:
            m = p.search(lower)
            if m is not None:
                return m.group(0)
        return None


@dataclass(frozen=True, slots=True)
class AuditRules:
    version: str
    thresholds: Thresholds
    material: float
    justified: float
    served_check: float
    gate_scores: Mapping[str, Mapping[str, float]]  # threat|policy -> verdict -> score
    gate_as_policy: frozenset[str]
    gate_plain: frozenset[str]
    severity_scores: Mapping[str, float]
    serves: Mapping[Category, re.Pattern[str] | None]
    wrappers: frozenset[str]
    launchers: Mapping[str, re.Pattern[str]]
    downloaders: Mapping[str, tuple[str, ...]]
    checks: tuple[Check, ...]
    injection: Injection | None
    injection_score: float
    source: str


def _compile_test(
    c: _Cond, lists: Mapping[str, Any], where: str, line: int | None, key: str
) -> _Test:
    programs: list[str] = []
    raw = [c.program] if isinstance(c.program, str) else (c.program or [])
    for p in raw:
        if p.startswith("$"):
            value = lists.get(p[1:])
            if value is None:
                raise RuleError(f"unknown list {p}", file=where, line=line, key=f"{key}.program")
            programs.extend(value.keys() if isinstance(value, Mapping) else value)
        else:
            programs.append(p)
    regexes: dict[str, Regexes | None] = {}
    for name in ("argv", "argv_not", "text", "program_path", "program_path_not"):
        items: list[str] | None = getattr(c, name)
        try:
            regexes[name] = Regexes(tuple(re.compile(a) for a in items)) if items else None
        except re.error as e:
            raise RuleError(f"bad regex: {e}", file=where, line=line, key=f"{key}.{name}") from None
    return _Test(
        re.compile("|".join(fnmatch.translate(g) for g in programs)) if programs else None,
        regexes["argv"],
        regexes["argv_not"],
        regexes["text"],
        regexes["program_path"],
        regexes["program_path_not"],
        c.detached,
        c.runs_downloaded,
        tuple(
            _compile_test(a, lists, where, line, f"{key}.any[{i}]")
            for i, a in enumerate(c.any or ())
        ),
    )


def load_audit_rules(path: str | Path | None = None) -> AuditRules:
    """Load the auditor's data file; with no argument the shipped one (cached)."""
    if path is None:
        return _shipped()
    p = Path(path)
    text = read_data_file(p, "audit rules")
    return _compile(text, str(p))


@functools.cache
def _shipped() -> AuditRules:
    res = resources.files("corral.rules").joinpath("audit.yaml")
    return _compile(res.read_text(encoding="utf-8"), str(res))


def _compile(text: str, display: str) -> AuditRules:
    doc, f = parse_data_file(text, display, _File)
    from corral.policy.rules import load_ruleset

    lists = load_ruleset().lists
    try:
        thresholds = Thresholds(f.thresholds.get("ask", 0.5), f.thresholds.get("deny", 0.8))
    except ValueError as e:
        raise RuleError(str(e), file=display, key="thresholds") from None
    launchers: dict[str, re.Pattern[str]] = {}
    for prog, rx in f.detached.programs.items():
        try:
            launchers[prog] = re.compile(rx)
        except re.error as e:
            raise RuleError(
                f"bad regex: {e}", file=display, key=f"detached.programs.{prog}"
            ) from None
    checks = tuple(
        Check(
            c.id,
            c.category,
            c.score,
            c.reason,
            _compile_test(
                c.match,
                lists,
                display,
                _line_for(doc, ("checks", i, "match"), ""),
                f"checks[{i}].match",
            ),
            _terms(c.serves),
        )
        for i, c in enumerate(f.checks)
    )
    try:
        injection = (
            Injection(
                tuple(k.lower() for k in f.injection.keywords),
                tuple(re.compile(p) for p in f.injection.patterns),
            )
            if f.injection.patterns
            else None
        )
    except re.error as e:
        raise RuleError(f"bad regex: {e}", file=display, key="injection.patterns") from None
    return AuditRules(
        version=f.version,
        thresholds=thresholds,
        material=f.material,
        justified=f.justified,
        served_check=f.served_check,
        gate_scores={
            "threat": {str(k): v for k, v in f.gate.threat.items()},
            "policy": {str(k): v for k, v in f.gate.policy.items()},
            "network": {str(k): v for k, v in f.gate.network.items()},
        },
        gate_as_policy=frozenset(f.gate.as_policy),
        gate_plain=frozenset(f.gate.plain),
        severity_scores=f.detector["severity"],
        serves={cat: _terms(words) for cat, words in f.serves.items()},
        wrappers=frozenset(f.detached.wrappers),
        launchers=launchers,
        downloaders={k: tuple(v) for k, v in f.downloaders.items()},
        checks=checks,
        injection=injection,
        injection_score=f.injection.score,
        source=display,
    )


# -- judging ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signal:
    id: str
    category: Category | None
    score: float
    reason: str
    served: bool = False  # the task calls for what this signal saw
    network_policy: bool = False  # only that the host is not on the policy's allowlist


_URL_NAME = re.compile(r"^[a-z][a-z0-9+.-]*://[^\s]*?/([^/?#\s]+)(?:[?#].*)?$", re.I)


class RuleAuditor:
    """The default auditor. Thread-safe; ``areview`` runs inline (it never waits)."""

    name = "rules"

    def __init__(
        self,
        policy: Policy | str = "swe",
        *,
        rules: AuditRules | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.policy = policy if isinstance(policy, Policy) else Policy.load(policy)
        self.data = rules or load_audit_rules()
        self.thresholds = thresholds or self.data.thresholds
        self.gate = Gate(self.policy)
        detectors = load_detectors()
        self._interpreters = detectors.interpreters
        self._detectors: dict[str, tuple[DetectorRule, ...]] = {
            kind: tuple(
                r
                for r in detectors.rules
                if r.on == kind and r.burst is None and r.sustained is None
            )
            for kind in ("exec", "file")
        }
        self.version = f"audit {self.data.version}, detectors {detectors.version}"
        self._task_cache: dict[str | None, str] = {}
        self._downloads: dict[str, frozenset[str]] = {}

    # -- protocol ----------------------------------------------------------------------

    def review(self, task: str | None, history: Sequence[Step], action: Action) -> AuditVerdict:
        start = time.perf_counter()
        signals = self.signals(task, history, action)
        return self.verdict(signals, action, time.perf_counter() - start)

    async def areview(
        self, task: str | None, history: Sequence[Step], action: Action
    ) -> AuditVerdict:
        return self.review(task, history, action)

    # -- parts -------------------------------------------------------------------------

    def verdict(self, signals: Sequence[Signal], action: Action, latency: float) -> AuditVerdict:
        material = [s for s in signals if s.score >= self.data.material]
        if material:
            rest = 1.0
            for s in material:
                rest *= 1.0 - s.score
            score = 1.0 - rest
            # Several views of one thing the task asked for (gate and detector both see
            # the tunnel) are still one thing asked for: a question, not a denial.
            if all(s.served or s.network_policy for s in material):
                score = min(score, self.data.justified)
        else:
            score = max((s.score for s in signals), default=0.0)
        top = max(signals, key=lambda s: s.score, default=None)
        if top is None:
            reason = "nothing in this action goes beyond what the task needs"
        else:
            reason = top.reason
            others = [s.id for s in material if s is not top]
            if others:
                reason += f" (also: {', '.join(others)})"
        return AuditVerdict(
            verdict=self.thresholds.verdict(score),
            score=min(1.0, score),
            category=top.category if top is not None and score >= self.data.material else None,
            reason=reason,
            auditor=self.name,
            signals=tuple(s.id for s in signals),
            step=action.step,
            action_id=action.id,
            latency_s=latency,
        )

    def signals(self, task: str | None, history: Sequence[Step], action: Action) -> list[Signal]:
        task_text = self._task_text(task)
        if action.kind not in (ActionKind.SHELL, ActionKind.EXEC):
            return self._tool_signals(task_text, action)
        command = action_text(action)
        parsed = parse(command)
        out: list[Signal] = []
        self._injection_signal(command, out)
        self._gate_signals(parsed, task_text, out)
        self._detector_signals(parsed, task_text, out)
        self._check_signals(parsed, task_text, history, out)
        return out

    def _injection_signal(self, text: str, out: list[Signal]) -> None:
        rx = self.data.injection
        hit = rx.search(text) if rx is not None else None
        if hit is not None:
            out.append(
                Signal(
                    "check:audit-reviewer-injection",
                    Category.DEFENSE_EVASION,
                    self.data.injection_score,
                    f"the action carries text addressed to a reviewer ({_short(hit)!r})",
                )
            )

    def _task_text(self, task: str | None) -> str:
        text = self._task_cache.get(task)
        if text is None:
            if len(self._task_cache) > 256:
                self._task_cache.clear()
            text = self._task_cache[task] = " ".join((task or "").lower().split())
        return text

    def _served(self, pattern: re.Pattern[str] | None, task: str) -> str | None:
        if pattern is None or not task:
            return None
        m = pattern.search(task)
        return m.group(0) if m else None

    def _cap(self, score: float, served: str | None) -> float:
        return min(score, self.data.justified) if served else score

    def _signal(
        self, sid: str, category: Category | None, score: float, reason: str, task: str
    ) -> Signal:
        served = self._served(self.data.serves.get(category), task) if category else None
        if served:
            reason += f"; the task mentions {served!r}, so it is asked about"
        elif category is not None and score >= self.data.material:
            reason += "; the task does not call for it"
        return Signal(sid, category, self._cap(score, served), reason, served is not None)

    def _gate_signals(self, parsed: ParsedCommand, task: str, out: list[Signal]) -> None:
        seen: set[str] = set()
        for f in self.gate.findings(parsed):
            if f.rule in seen:
                continue
            seen.add(f.rule)
            if f.category is None or f.rule in self.data.gate_plain:
                weight, category = "policy", None
            elif f.rule in self.data.gate_as_policy:
                weight, category = "network", f.category
            else:
                weight, category = "threat", f.category
            score = self.data.gate_scores[weight].get(f.verdict.value, 0.0)
            sig = self._signal(f"gate:{f.rule}", category, score, f.reason, task)
            if weight == "network":
                sig = dataclasses.replace(sig, network_policy=True)
            out.append(sig)

    def _detector_signals(self, parsed: ParsedCommand, task: str, out: list[Signal]) -> None:
        seen: set[str] = set()
        for inv in parsed.invocations:
            if not inv.argv or inv.dynamic_program:
                continue
            event = {"kind": "exec", "sandbox": "audit", "t": 0.0, "argv": list(inv.argv)}
            self._match_detectors("exec", event, seen, task, out)
            for r in inv.redirects:
                if r.op in (">", ">>", ">|", "&>", "&>>") and not r.dynamic:
                    path = {
                        "kind": "file",
                        "sandbox": "audit",
                        "t": 0.0,
                        "path": r.target,
                        "op": "write",
                    }
                    self._match_detectors("file", path, seen, task, out)

    def _match_detectors(
        self, kind: str, event: dict[str, Any], seen: set[str], task: str, out: list[Signal]
    ) -> None:
        view = EventView(event, self._interpreters)
        for rule in self._detectors[kind]:
            if rule.id in seen or not rule.matches(view):
                continue
            seen.add(rule.id)
            score = self.data.severity_scores.get(rule.severity.value, 0.5)
            out.append(
                self._signal(
                    f"detector:{rule.id}",
                    rule.category,
                    score,
                    rule.describe(event),
                    task,
                )
            )

    def _check_signals(
        self, parsed: ParsedCommand, task: str, history: Sequence[Step], out: list[Signal]
    ) -> None:
        downloaded: frozenset[str] | None = None
        fired: set[str] = set()
        text_hits: dict[Regexes, str | None] = {}
        for inv in parsed.invocations:
            if not inv.argv:
                continue
            joined = " ".join(inv.argv)
            for check in self.data.checks:
                if check.id in fired:
                    continue
                if downloaded is None and (
                    check.test.downloaded or any(t.downloaded for t in check.test.any_of)
                ):
                    downloaded = self._downloaded(history, parsed)
                hit = self._test(check.test, inv, joined, parsed.source, downloaded, text_hits)
                if hit is None:
                    continue
                fired.add(check.id)
                served = self._served(check.serves, task)
                reason = check.reason.format(what=hit, when=_when(hit, history))
                score = check.score
                if served:
                    # The task needs what this check looks for: noted, not held against it.
                    reason += f"; the task mentions {served!r}, which calls for it"
                    score = min(score, self.data.served_check)
                out.append(
                    Signal(f"check:{check.id}", check.category, score, reason, served is not None)
                )

    def _test(
        self,
        t: _Test,
        inv: Invocation,
        joined: str,
        source: str,
        downloaded: frozenset[str] | None,
        text_hits: dict[Regexes, str | None],
    ) -> str | None:
        """What matched (for the reason), or None. All set conditions must hold, and one
        of ``any_of`` when there is any."""
        what = inv.program
        if t.programs is not None and t.programs.match(inv.program) is None:
            return None
        if t.argv is not None:
            if t.argv.search(joined) is None:
                return None
            what = _short(joined)
        if t.argv_not is not None and t.argv_not.search(joined) is not None:
            return None
        if t.text is not None:
            if t.text in text_hits:
                found = text_hits[t.text]
            else:  # the whole command's text: searched once per review, not per program
                m = t.text.search(source)
                found = text_hits[t.text] = _short(m.group(0)) if m else None
            if found is None:
                return None
            what = found
        if t.path is not None:
            first = inv.argv[0]
            if "/" not in first or t.path.search(first) is None:
                return None
            if t.path_not is not None and t.path_not.search(first) is not None:
                return None
            what = first
        if t.detached is not None and self._detached(inv) != t.detached:
            return None
        if t.downloaded is not None:
            hit = self._runs_downloaded(inv, downloaded or frozenset())
            if (hit is not None) != t.downloaded:
                return None
            what = hit or what
        if t.any_of:
            for sub in t.any_of:
                found = self._test(sub, inv, joined, source, downloaded, text_hits)
                if found is not None:
                    return found
            return None
        return what

    def _detached(self, inv: Invocation) -> bool:
        if inv.program in self.data.wrappers:
            return False  # the wrapped program is its own invocation and is judged there
        if inv.background or any(w in self.data.wrappers for w in inv.wrappers):
            return True
        launcher = self.data.launchers.get(inv.program)
        return launcher is not None and launcher.search(" ".join(inv.argv[1:])) is not None

    def _runs_downloaded(self, inv: Invocation, downloaded: frozenset[str]) -> str | None:
        if not downloaded:
            return None
        candidates = [inv.argv[0]]
        if (
            inv.program == "chmod"
            or inv.program in self.gate.rules.shells
            or any(fnmatch.fnmatchcase(inv.program, g) for g in self.gate.rules.interpreters)
        ):
            candidates += [a for a in inv.argv[1:] if not a.startswith("-")][:2]
        for c in candidates:
            if _norm(c) in downloaded:
                return c
        return None

    def _downloaded(self, history: Sequence[Step], current: ParsedCommand) -> frozenset[str]:
        """Files that earlier steps (or earlier parts of this command) fetched from the
        network, by basename. A step reviewed before has its answer cached (in a
        trajectory every earlier step was), so history costs a lookup per step."""
        names: set[str] = set(self._fetched_by_text(current.source, current))
        for step in history:
            if step.action.kind is ActionKind.SHELL:
                names |= self._fetched_by_text(str(step.action.payload.get("command", "")))
        return frozenset(names)

    def _fetched_by_text(self, command: str, parsed: ParsedCommand | None = None) -> frozenset[str]:
        got = self._downloads.get(command)
        if got is None:
            # Only a command that names a downloader can have fetched anything.
            if not any(d in command for d in self.data.downloaders):
                got = frozenset()
            else:
                got = self._fetched(parsed if parsed is not None else parse(command))
            if len(self._downloads) > 8192:
                self._downloads.clear()
            self._downloads[command] = got
        return got

    def _fetched(self, parsed: ParsedCommand) -> frozenset[str]:
        out: set[str] = set()
        for inv in parsed.invocations:
            opts = self.data.downloaders.get(inv.program)
            if opts is None:
                continue
            args = inv.argv[1:]
            named = False
            for i, a in enumerate(args):
                if a in opts and i + 1 < len(args):
                    out.add(_norm(args[i + 1]))
                    named = True
                elif any(a.startswith(o + "=") for o in opts if o.startswith("--")):
                    out.add(_norm(a.split("=", 1)[1]))
                    named = True
            for r in inv.redirects:
                if r.op in (">", ">>", ">|") and not r.dynamic:
                    out.add(_norm(r.target))
                    named = True
            if not named:  # wget URL, curl -O URL: the file is named after the URL
                for a in args:
                    m = _URL_NAME.match(a)
                    if m:
                        out.add(_norm(m.group(1)))
        return frozenset(out)

    def _tool_signals(self, task: str, action: Action) -> list[Signal]:
        """A tool call that is not a shell command: judge the paths it touches."""
        args = action.payload.get("args", {})
        tool = str(action.payload.get("tool", "")).lower()
        writes = any(w in tool for w in ("write", "edit", "create", "replace", "insert", "save"))
        paths = [v for v in _strings(args) if v.startswith(("/", "~", "./", ".")) and len(v) < 4096]
        lists = self.gate.rules.lists
        out: list[Signal] = []
        for text in _strings(args):
            self._injection_signal(text, out)
            if out:
                break
        for path in paths:
            if _listed(path, lists.get("credential_paths", ())):
                out.append(
                    self._signal(
                        "check:audit-tool-credential-path",
                        Category.CREDENTIAL_ACCESS,
                        0.85,
                        f"{tool} touches {path}, where credentials live",
                        task,
                    )
                )
            if writes and _listed(path, lists.get("persistence_paths", ())):
                out.append(
                    self._signal(
                        "check:audit-tool-persistence-path",
                        Category.PERSISTENCE,
                        0.85,
                        f"{tool} writes {path}, which runs on the next login or boot",
                        task,
                    )
                )
        return out


def _norm(path: str) -> str:
    return path.rsplit("/", 1)[-1] if "/" in path else path


def _when(hit: str, history: Sequence[Step]) -> str:
    name = _norm(hit)
    for step in reversed(history):
        if name in str(step.action.payload.get("command", "")):
            return f"at step {step.action.step if step.action.step is not None else step.index}"
    return "earlier in this command"


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _listed(path: str, globs: Iterable[str]) -> bool:
    home = re.sub(r"^(/root|/home/[^/]+)(?=/)", "~", path)
    return any(fnmatch.fnmatchcase(home, g) or fnmatch.fnmatchcase(path, g) for g in globs)


__all__ = ["AuditRules", "Check", "RuleAuditor", "Signal", "Verdict", "load_audit_rules"]
