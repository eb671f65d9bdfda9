"""Matching one invocation against one compiled threat rule.

``InvocationView`` computes, once and on demand, what rules look at (joined argv, script
text, path candidates, write targets); ``rule_matches`` applies a rule's conditions in
cheapest-first order. Pure functions over parsed data: no policy, no I/O.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from corral.model import Category, Verdict
from corral.policy.rules import CompiledRule, path_candidates
from corral.policy.shell import Invocation

OUT_OPS = frozenset({">", ">>", ">|", "&>", "&>>", "<>", ">&"})
IN_TEXT_OPS = frozenset({"<<", "<<-", "<<<"})


@dataclass(frozen=True, slots=True)
class Finding:
    verdict: Verdict
    rule: str
    category: Category | None
    reason: str
    priority: int = 50

    def key(self) -> tuple[int, int, int]:
        return (self.verdict.rank, 1 if self.category else 0, self.priority)


class InvocationView:
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
        return "\n".join(r.target for r in self.inv.redirects if r.op in IN_TEXT_OPS)

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
                *(r.target for r in self.inv.redirects if r.op not in IN_TEXT_OPS),
            ]
            self._paths = tuple(p for w in words for p in path_candidates(w))
        return self._paths

    def write_targets(self, writers: Mapping[str, str]) -> tuple[str, ...]:
        if self._writes is None:
            out = [
                r.target
                for r in self.inv.redirects
                if r.op in OUT_OPS and r.target and not r.target.isdigit()
            ]
            mode = writers.get(self.program)
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


def rule_matches(
    rule: CompiledRule,
    view: InvocationView,
    pipeline_programs: frozenset[str],
    writers: Mapping[str, str],
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
        rule.redirect.search(f"{r.op} {r.target}") for r in inv.redirects if r.op not in IN_TEXT_OPS
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


def fill_reason(template: str, view: InvocationView, path: str) -> str:
    inv = view.inv
    reason = template.format(
        program=inv.program or "the shell",
        path=path or "a protected path",
        wrapper=inv.wrappers[0] if inv.wrappers else "a wrapper",
        arg1=view.args[0] if view.args else "",
    )
    if inv.origin.startswith("decoded:"):
        # Say where it came from: the agent (and the reviewer) only saw the encoded text.
        return f"{reason} (hidden as {inv.origin.split(':', 1)[1]}-encoded text: {' '.join(inv.argv)[:80]})"
    return reason
