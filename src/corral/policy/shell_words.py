"""Shell words: quoting, variable and substitution expansion, field splitting, braces.

A word becomes one or more argv fields, the way bash would build them, except that an
expansion whose value cannot be known statically is kept as written ("$PID", "$(date)")
and marks its field as not ``known``. Known values are those of static assignments seen
earlier in the same text; ``$HOME`` is written ``~`` so that path rules can match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import tree_sitter as ts

from corral.policy import decode
from corral.policy.shell import Invocation, Redirect, Refused

Node = ts.Node


@dataclass(frozen=True, slots=True)
class Piped:
    """The stages piped into a command: the first ``n`` steps and ``m`` invocations of
    lists that the pipeline keeps growing (copying them per stage would be quadratic)."""

    steps: list[decode.Step]
    prods: list[Invocation]
    n: int
    m: int

    def producers(self) -> tuple[tuple[decode.Step, ...], tuple[Invocation, ...]]:
        return tuple(self.steps[: self.n]), tuple(self.prods[: self.m])


@dataclass(frozen=True, slots=True)
class Ctx:
    """Where a statement runs. ``vars`` is the (mutable) scope of known variables."""

    vars: dict[str, str]
    origin: str = "top"
    depth: int = 0
    background: bool = False
    # True where a statement may not run, or runs in a subshell; an assignment there
    # cannot be trusted later, so it makes its variable unknown instead.
    cond: bool = False
    pipe: tuple[int, int] | None = None  # (pipeline id, stage index)
    stdin: Piped | None = None  # what is piped into this context
    redirects: tuple[Redirect, ...] = ()  # from an enclosing redirected compound command

    # Hand-written copies: dataclasses.replace is a hot spot of the whole parse.
    def conditional(self, background: bool | None = None) -> Ctx:
        bg = self.background if background is None else background
        if self.cond and bg == self.background:
            return self
        return Ctx(
            self.vars, self.origin, self.depth, bg, True, self.pipe, self.stdin, self.redirects
        )

    def nested(self, origin: str) -> Ctx:
        """Context of a substitution or function body: its own, unpiped world."""
        return Ctx(self.vars, origin, self.depth, self.background, True)

    def stage(self, pipe: tuple[int, int], stdin: Piped | None) -> Ctx:
        return Ctx(
            self.vars, self.origin, self.depth, self.background, True, pipe, stdin, self.redirects
        )

    def redirected(self, redirects: tuple[Redirect, ...]) -> Ctx:
        return Ctx(
            self.vars,
            self.origin,
            self.depth,
            self.background,
            self.cond,
            self.pipe,
            self.stdin,
            redirects,
        )

    def unpiped(self) -> Ctx:
        return Ctx(
            self.vars,
            self.origin,
            self.depth,
            self.background,
            self.cond,
            None,
            None,
            self.redirects,
        )


@dataclass(frozen=True, slots=True, eq=False)
class Sub:
    """A command or process substitution, walked apart from the command using it."""

    invocations: tuple[Invocation, ...]
    result: decode.Recovered | None  # static output (None: not a simple pipeline)
    steps: list[decode.Step] | None
    process: bool


@dataclass(frozen=True, slots=True)
class Field:
    """One argv word after expansion."""

    text: str
    known: bool
    subs: tuple[Sub, ...] = ()
    unknown: tuple[str, ...] = ()  # unknown expansions, as written
    whole: bool = False  # the field is nothing but one expansion

    def derive(self, text: str) -> Field:
        if text == self.text:
            return self
        return Field(text, self.known, self.subs, self.unknown, False)


@dataclass(slots=True)
class _Seg:
    text: str
    split: bool = False  # an unquoted expansion: subject to field splitting
    known: bool = True
    sub: Sub | None = None
    unknown: str | None = None
    expansion: bool = False


_ESC = re.compile(r"\\(\n|.)", re.S)
_DQ_ESC = re.compile(r'\\([\\"$`\n])')
_HEREDOC_ESC = re.compile(r"\\([\\$`\n])")
_PLAIN = frozenset({"word", "brace_expression", "number"})
_SUBST = frozenset({"command_substitution", "process_substitution"})
_DEFAULT_IFS = " \t\n"
# X=aaaa; X=$X$X; X=$X$X; ... doubles each time: stop long before memory runs out.
MAX_EXPANSION = 4_000_000
BACKTICK = re.compile(r"(?<!\\)`((?:[^`\\]|\\.)*)`", re.S)


def _drop_backslash(m: re.Match[str]) -> str:
    return "" if m.group(1) == "\n" else m.group(1)


def unescape(raw: str, pattern: re.Pattern[str] = _ESC) -> str:
    return pattern.sub(_drop_backslash, raw) if "\\" in raw else raw


class Words:
    """Word expansion; ``Walker`` supplies ``substitution``."""

    def __init__(self) -> None:
        self.expanded = 0  # characters produced by variable expansion, against blow-ups
        self.src = b""  # the text being walked; nodes are read from it, not from the tree

    def substitution(self, node: Node, ctx: Ctx, process: bool) -> Sub:
        raise NotImplementedError

    def raw(self, node: Node) -> bytes:
        return self.src[node.start_byte : node.end_byte]

    def text(self, node: Node) -> str:
        return self.src[node.start_byte : node.end_byte].decode("utf-8", "replace")

    @staticmethod
    def assign(ctx: Ctx, name: str, value: str | None) -> None:
        if value is not None and (not ctx.cond or ctx.vars.get(name) == value):
            ctx.vars[name] = value
        else:
            ctx.vars.pop(name, None)

    def expand(
        self, node: Node, ctx: Ctx, subs: list[Sub], *, split: bool, prefix: str = ""
    ) -> list[Field]:
        t = node.type
        if t == "word" and not prefix:
            raw = self.text(node)
            if "\\" not in raw and "{" not in raw:
                return [Field(raw, True)]
        if split and _plain(node):
            raw = prefix + self.text(node)
            if "{" in raw:
                words = brace(raw)
                # A word too big to expand is not known: it may hide "{nc,-e,sh,...}".
                return [Field(unescape(w), words is not None) for w in words or [raw]]
        segs: list[_Seg] = [_Seg(prefix)] if prefix else []
        self._segs(node, ctx, subs, segs, False)
        return _fields(segs, ctx.vars.get("IFS", _DEFAULT_IFS) if split else "")

    def subs_in(self, node: Node, ctx: Ctx, subs: list[Sub]) -> None:
        for c in node.named_children:
            if c.type in _SUBST:
                subs.append(self.substitution(c, ctx, c.type == "process_substitution"))
            elif c.named_child_count:
                self.subs_in(c, ctx, subs)

    def heredoc_text(
        self, body: Node, ctx: Ctx, start: int, end: int, *, strip_tabs: bool
    ) -> tuple[str, bool]:
        """Text of an unquoted heredoc body with known variables expanded. Command
        substitutions stay as written: the caller walks them, or hands the whole text
        to a shell that will."""
        raw = self.src[start:end]
        base = start
        segs: list[_Seg] = []
        pos = 0
        for c in body.named_children:
            start, end = c.start_byte - base, c.end_byte - base
            if start > pos:
                segs.append(_Seg(unescape(raw[pos:start].decode("utf-8", "replace"), _HEREDOC_ESC)))
            if c.type in ("simple_expansion", "expansion"):
                self._var(c, ctx, None, segs, True)
            elif c.type == "heredoc_content":
                content = self.text(c)
                segs.append(_Seg(unescape(content, _HEREDOC_ESC), known="`" not in content))
            else:
                segs.append(_Seg(self.text(c), known=False, unknown=self.text(c)))
            pos = max(pos, end)
        segs.append(_Seg(unescape(raw[pos:].decode("utf-8", "replace"), _HEREDOC_ESC)))
        text = "".join(s.text for s in segs)
        if strip_tabs:
            text = "\n".join(line.lstrip("\t") for line in text.split("\n"))
        return text, all(s.known for s in segs)

    def _segs(self, node: Node, ctx: Ctx, subs: list[Sub], segs: list[_Seg], quoted: bool) -> None:
        t = node.type
        if t == "word":
            raw = self.text(node)
            segs.append(_Seg(raw if quoted else unescape(raw)))
        elif t == "raw_string":
            segs.append(_Seg(self.text(node)[1:-1]))
        elif t in ("string", "translated_string"):
            self._string(node, ctx, subs, segs)
        elif t == "ansi_c_string":
            segs.append(_Seg(decode.ansi_c(self.text(node)[2:-1])))
        elif t == "concatenation":
            for c in node.children:
                self._segs(c, ctx, subs, segs, quoted)
        elif t in ("simple_expansion", "expansion"):
            self._var(node, ctx, subs, segs, quoted)
        elif t in _SUBST:
            sub = self.substitution(node, ctx, t == "process_substitution")
            subs.append(sub)
            r = sub.result
            if r is not None and r.text is not None and not sub.process:
                value = r.text.rstrip("\n").replace("\x00", "")  # as bash drops NULs
                segs.append(_Seg(value, split=not quoted, sub=sub, expansion=True))
            else:
                segs.append(_Seg(self.text(node), known=False, sub=sub, expansion=True))
        elif t == "arithmetic_expansion":
            self.subs_in(node, ctx, subs)
            raw = self.text(node)
            segs.append(_Seg(raw, known=False, unknown=raw, expansion=True))
        else:
            self.subs_in(node, ctx, subs)
            segs.append(_Seg(self.text(node)))

    def _string(self, node: Node, ctx: Ctx, subs: list[Sub], segs: list[_Seg]) -> None:
        raw = self.raw(node)
        base = node.start_byte
        children = node.children
        pos = children[0].end_byte - base if children else len(raw)
        stop = children[-1].start_byte - base if len(children) > 1 else len(raw)
        segs.append(_Seg(""))  # "" is an empty field, not no field
        for c in children[1:-1]:
            start = c.start_byte - base
            if start > pos:
                segs.append(_Seg(unescape(raw[pos:start].decode("utf-8", "replace"), _DQ_ESC)))
            if c.type == "string_content" or not c.is_named:
                segs.append(_Seg(unescape(self.text(c), _DQ_ESC)))
            else:
                self._segs(c, ctx, subs, segs, True)
            pos = max(pos, c.end_byte - base)
        if stop > pos:
            segs.append(_Seg(unescape(raw[pos:stop].decode("utf-8", "replace"), _DQ_ESC)))

    def _var(
        self, node: Node, ctx: Ctx, subs: list[Sub] | None, segs: list[_Seg], quoted: bool
    ) -> None:
        raw = self.text(node)
        named = node.named_children
        if len(named) == 1 and named[0].type == "variable_name":
            name = self.text(named[0])
            if raw in ("$" + name, "${" + name + "}"):
                value = ctx.vars.get(name)
                if value is None and name == "HOME":
                    value = "~"
                elif value is None and name == "IFS":
                    value = _DEFAULT_IFS
                if value is not None:
                    self.expanded += len(value)
                    if self.expanded > MAX_EXPANSION:
                        raise Refused(f"variable expansion larger than {MAX_EXPANSION} characters")
                    segs.append(_Seg(value, split=not quoted, expansion=True))
                    return
        if subs is not None:
            self.subs_in(node, ctx, subs)
        segs.append(_Seg(raw, known=False, unknown=raw, expansion=True))


def _plain(node: Node) -> bool:
    """A word made only of unquoted literal text, where brace expansion applies."""
    if node.type in _PLAIN:
        return True
    return node.type == "concatenation" and all(
        c.type in _PLAIN or not c.is_named for c in node.children
    )


def _fields(segs: list[_Seg], ifs: str) -> list[Field]:
    """Join segments into fields, splitting unquoted expansions on IFS."""
    if not ifs:
        return [_field([(s.text, s) for s in segs])]
    sep = re.compile("[" + re.escape(ifs) + "]+")
    fields: list[Field] = []
    cur: list[tuple[str, _Seg]] | None = None
    for seg in segs:
        if not seg.split:
            cur = cur if cur is not None else []
            cur.append((seg.text, seg))
            continue
        for k, part in enumerate(sep.split(seg.text)):
            if k and cur is not None:
                fields.append(_field(cur))
                cur = None
            if part:
                cur = cur if cur is not None else []
                cur.append((part, seg))
    if cur is not None:
        fields.append(_field(cur))
    return fields


def _field(parts: list[tuple[str, _Seg]]) -> Field:
    segs = [s for _, s in parts]
    subs: list[Sub] = []
    for s in segs:
        if s.sub is not None and all(s.sub is not x for x in subs):
            subs.append(s.sub)
    meaningful = [s for s in segs if s.expansion or s.text]
    whole = (
        bool(meaningful) and all(s is meaningful[0] for s in meaningful) and meaningful[0].expansion
    )
    return Field(
        "".join(p for p, _ in parts),
        all(s.known for s in segs),
        tuple(subs),
        tuple(s.unknown for s in segs if s.unknown),
        whole,
    )


# -- brace expansion ("{a,b}", "{1..3}") -------------------------------------------------

_BRACE_LIMIT = 256
_BRACE_MAX_WORD = 4096  # the scan below is quadratic in the number of braces
_BRACE_MAX_OPEN = 64
_SEQ = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?")


def brace(word: str) -> list[str] | None:
    """Brace expansion of an unquoted word; None if it is too big to expand."""
    if len(word) > _BRACE_MAX_WORD or word.count("{") > _BRACE_MAX_OPEN:
        return None
    return _brace(word)


def _brace(w: str) -> list[str] | None:
    i, n = 0, len(w)
    while i < n:
        c = w[i]
        if c == "\\":
            i += 2
            continue
        if c == "{" and (i == 0 or w[i - 1] != "$"):
            alts, end = _alternatives(w, i)
            if alts is not None:
                tails = _brace(w[end + 1 :])
                if tails is None:
                    return None
                res: list[str] = []
                for alt in alts:
                    heads = _brace(alt)
                    if heads is None or len(res) + len(heads) * len(tails) > _BRACE_LIMIT:
                        return None
                    res.extend(w[:i] + h + t for h in heads for t in tails)
                return res
        i += 1
    return [w]


def _alternatives(w: str, start: int) -> tuple[list[str] | None, int]:
    depth, last, i = 0, start + 1, start + 1
    parts: list[str] = []
    while i < len(w):
        c = w[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}" and depth:
            depth -= 1
        elif c == "}":
            if parts:
                return [*parts, w[last:i]], i
            return _sequence(w[start + 1 : i]), i
        elif c == "," and not depth:
            parts.append(w[last:i])
            last = i + 1
        i += 1
    return None, start


def _sequence(body: str) -> list[str] | None:
    m = _SEQ.fullmatch(body)
    if m is None:
        return None
    if m.group(1) is not None:
        a, b = int(m.group(1)), int(m.group(2))
        step = abs(int(m.group(3) or 1)) or 1
        if abs(b - a) // step >= _BRACE_LIMIT:
            return None
        width = (
            max(len(m.group(1)), len(m.group(2)))
            if (m.group(1).lstrip("-").startswith("0") or m.group(2).lstrip("-").startswith("0"))
            else 0
        )
        rng = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        return [str(v).zfill(width) for v in rng]
    x, y = ord(m.group(4)), ord(m.group(5))
    step = abs(int(m.group(6) or 1)) or 1
    rng = range(x, y + 1, step) if x <= y else range(x, y - 1, -step)
    return [chr(v) for v in rng]
