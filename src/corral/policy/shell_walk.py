"""The walk over a tree-sitter-bash tree that finds every program a command would run.

Statements are handled here; words (quoting, expansion, substitution) in
``shell_words``. The walk is deliberately lenient: tree-sitter marks what it cannot
parse with ERROR nodes, and when ``bash -n`` accepts the text anyway the walk still
visits every statement it can find inside them (the result is then ``partial``).
"""

from __future__ import annotations

import re

import tree_sitter as ts

from corral.policy import decode
from corral.policy.shell import (
    Invocation,
    Redirect,
    Refused,
    bash_syntax_error,
    ts_parse,
)
from corral.policy.shell_argv import basename, script, unwrap
from corral.policy.shell_feeds import Feeds, In
from corral.policy.shell_words import BACKTICK, Ctx, Field, Piped, Sub, unescape

Node = ts.Node

_REDIRECTS = frozenset({"file_redirect", "heredoc_redirect", "herestring_redirect"})
_LEAVES = frozenset({
    "word", "number", "variable_name", "string_content", "raw_string", "heredoc_start",
    "heredoc_end", "heredoc_content", "file_descriptor", "special_variable_name",
    "extglob_pattern", "regex", "test_operator", "ansi_c_string", "comment",
})
_COND = frozenset({
    "subshell", "if_statement", "elif_clause", "else_clause", "while_statement",
    "for_statement", "c_style_for_statement", "case_statement", "case_item", "do_group",
})
# Builtins that assign the variables named by their operands at run time.
_ASSIGNING = frozenset({"read", "mapfile", "readarray", "getopts", "let"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BACKTICK_ESC = re.compile(r"\\([\\$`])")


class Walker(Feeds):
    def __init__(self, max_depth: int) -> None:
        super().__init__()
        self.out: list[Invocation] = []
        self.partial = False
        self.functions: list[str] = []
        self.max_depth = max_depth
        self.pipelines = 0
        self.brace_at = -1  # where a word continues a "{" that tree-sitter took for a group
        self.top_vars: dict[str, str] = {}

    # -- entry points ---------------------------------------------------------------

    def run(self, text: str) -> None:
        self._text(text, Ctx(self.top_vars))

    def _text(self, text: str, ctx: Ctx) -> None:
        data = text.encode("utf-8", "surrogateescape")
        root = ts_parse(data).root_node
        if root.has_error:
            root = _repaired(data, root)
        if root.has_error:
            msg = bash_syntax_error(data)
            if msg is not None:
                raise Refused(msg if ctx.depth == 0 else f"{msg} (in text run by {ctx.origin})")
            self.partial = True
        saved, self.src = self.src, data
        try:
            self._block(root, ctx)
        finally:
            self.src = saved

    def recurse(self, text: str, ctx: Ctx, origin: str, *, share: bool = False) -> None:
        depth = ctx.depth + 1
        if depth > self.max_depth:
            raise Refused(f"nesting deeper than {self.max_depth} levels")
        vars_ = ctx.vars if share else dict(ctx.vars)
        self._text(text, Ctx(vars_, origin, depth, ctx.background, ctx.cond))

    def substitution(self, node: Node, ctx: Ctx, process: bool) -> Sub:
        """Walk a $(...), `...` or <(...) apart, so its invocations can be placed after
        the command that uses it and its output can be computed when it is static."""
        mark = len(self.out)
        steps = self._block(node, ctx.nested("procsubst" if process else "subst"))
        invs = tuple(self.out[mark:])
        del self.out[mark:]
        result = decode.evaluate(steps) if steps else None
        return Sub(invs, result, steps, process)

    # -- statements -----------------------------------------------------------------

    def _walk(self, node: Node, ctx: Ctx) -> list[decode.Step] | None:
        t = node.type
        if t == "command":
            return self._command(node, ctx, [])
        if t == "redirected_statement":
            return self._redirected(node, ctx)
        if t == "pipeline":
            return self._stages(self._flatten(node), ctx)
        if t == "list":
            for k, c in enumerate(c for c in node.named_children if c.type != "comment"):
                self._walk(c, ctx if k == 0 else ctx.conditional())
            return None
        if t in _COND:
            if t == "for_statement" and (var := node.child_by_field_name("variable")):
                ctx.vars.pop(self.text(var), None)
            return self._block(node, ctx.conditional())
        if t == "function_definition":
            name = node.child_by_field_name("name")
            if name is not None:
                self.functions.append(self.text(name))
            body = node.child_by_field_name("body")
            if body is not None:
                self._walk(body, ctx.nested("function"))
            return None
        if t in ("variable_assignment", "variable_assignments"):
            self._assignments(node, ctx)
            return None
        if t in ("declaration_command", "unset_command"):
            self._declaration(node, ctx)
            return None
        if t in ("command_substitution", "process_substitution"):
            self.out.extend(self.substitution(node, ctx, t == "process_substitution").invocations)
            return None
        if t in _REDIRECTS:
            return self._command(None, ctx, [node])
        if t == "command_name":
            return self._command(None, ctx, [], name=node)
        if t in _LEAVES:
            return None
        return self._block(node, ctx)

    def _block(self, node: Node, ctx: Ctx) -> list[decode.Step] | None:
        """Walk the statements under node; their steps when there is exactly one."""
        children = node.children
        steps: list[decode.Step] | None = None
        count = 0
        for i, c in enumerate(children):
            nxt = children[i + 1] if i + 1 < len(children) else None
            if not c.is_named:
                # tree-sitter reads "{cat,/etc/passwd}" as a broken group; bash as a word.
                if c.type == "{" and nxt is not None and nxt.start_byte == c.end_byte:
                    self.brace_at = c.end_byte
                continue
            if c.type in _LEAVES or c.type == "comment":
                continue
            bg = nxt is not None and nxt.type == "&" and not ctx.background
            steps = self._walk(c, ctx.conditional(True) if bg else ctx)
            count += 1
        return steps if count == 1 else None

    def _flatten(self, node: Node) -> list[Node]:
        stages: list[Node] = []
        for c in node.named_children:
            if c.type == "pipeline":
                stages.extend(self._flatten(c))
            elif c.type != "comment":
                stages.append(c)
                cont = _heredoc_pipe(c)
                if cont is not None:
                    stages.extend(self._flatten(cont))
        return stages

    def _stages(self, stages: list[Node], ctx: Ctx) -> list[decode.Step] | None:
        if len(stages) == 1:
            return self._stage(stages[0], ctx)
        self.pipelines += 1
        pid = self.pipelines
        before = ctx.stdin.producers() if ctx.stdin else ((), ())
        steps, prods = list(before[0]), list(before[1])
        own: list[decode.Step] = []
        for idx, node in enumerate(stages):
            stdin = Piped(steps, prods, len(steps), len(prods)) if idx or ctx.stdin else None
            mark = len(self.out)
            got = self._stage(node, ctx.stage((pid, idx), stdin))
            step = got[0] if got is not None and len(got) == 1 else decode.Step(
                (), known=False, label=f"output of a {node.type.replace('_', ' ')}")
            steps.append(step)
            own.append(step)
            prods.extend(self.out[mark:])
        return own

    def _stage(self, node: Node, ctx: Ctx) -> list[decode.Step] | None:
        if node.type == "redirected_statement":
            return self._redirected(node, ctx, in_pipeline=True)
        return self._walk(node, ctx)

    def _redirected(self, node: Node, ctx: Ctx, *, in_pipeline: bool = False
                    ) -> list[decode.Step] | None:
        if not in_pipeline and (cont := _heredoc_pipe(node)) is not None:
            return self._stages([node, *self._flatten(cont)], ctx)
        body = node.child_by_field_name("body")
        redirs = [c for c in node.named_children if body is None or c.id != body.id]
        if body is None or body.type == "command":
            return self._command(body, ctx, redirs)
        # Redirects of a compound command apply to every command inside it.
        subs: list[Sub] = []
        own: list[Redirect] = []
        for r in redirs:
            if r.type in _REDIRECTS:
                got = self._redirect(r, ctx, subs, None)
                if got is not None:
                    own.append(got[0])
        mark = len(self.out)
        steps = self._walk(body, ctx.redirected(ctx.redirects + tuple(own)))
        if len(self.out) == mark:
            self._emit([], own, ctx, None)
        for s in subs:
            self.out.extend(s.invocations)
        return steps

    def _assignments(self, node: Node, ctx: Ctx, *, persist: bool = True) -> list[str]:
        """Record NAME=value assignments; returns them as written for an argv."""
        nodes = [node] if node.type == "variable_assignment" else [
            c for c in node.named_children if c.type == "variable_assignment"]
        shown: list[str] = []
        subs: list[Sub] = []
        for a in nodes:
            name_node = a.child_by_field_name("name")
            value = a.child_by_field_name("value")
            name = self.text(name_node) if name_node is not None else ""
            val: Field | None = None
            if value is not None and value.type != "array":
                val = self.expand(value, ctx, subs, split=False)[0]
            elif value is not None:
                self.subs_in(value, ctx, subs)
            else:
                val = Field("", True)
            shown.append(f"{name}={val.text if val else self.text(value) if value else ''}")
            if persist and name_node is not None and name_node.type == "variable_name":
                append = any(c.type == "+=" for c in a.children)
                known = val is not None and val.known and (not append or name in ctx.vars)
                text = (ctx.vars.get(name, "") if append else "") + (val.text if val else "")
                self.assign(ctx, name, text if known else None)
        for s in subs:
            self.out.extend(s.invocations)
        return shown

    def _declaration(self, node: Node, ctx: Ctx) -> None:
        argv: list[str] = []
        subs: list[Sub] = []
        keyword = ""
        for c in node.children:
            if not c.is_named:
                keyword = keyword or c.type
                argv.append(self.text(c))
            elif c.type == "variable_assignment":
                argv.extend(self._assignments(c, ctx))
            else:
                fields = self.expand(c, ctx, subs, split=True)
                argv.extend(f.text for f in fields)
                if c.type == "variable_name" and keyword in ("unset", "local", "typeset",
                                                             "declare"):
                    ctx.vars.pop(self.text(c), None)
        self._emit([Field(a, True) for a in argv], [], ctx, None)
        for s in subs:
            self.out.extend(s.invocations)

    # -- simple commands ------------------------------------------------------------

    def _command(self, node: Node | None, ctx: Ctx, outer: list[Node],
                 name: Node | None = None) -> list[decode.Step] | None:
        items: list[tuple[str, Node]] = []
        if name is not None:
            items.append(("name", name.named_children[0] if name.named_child_count else name))
        if node is not None:
            for c in node.children:
                t = c.type
                if t == "command_name":
                    items.append(("name", c.named_children[0] if c.named_child_count else c))
                elif t == "variable_assignment":
                    items.append(("assign", c))
                elif t in _REDIRECTS:
                    _collect(c, items)
                elif c.is_named and t != "comment":
                    items.append(("error" if t == "ERROR" else "arg", c))
        for r in outer:
            if r.type in _REDIRECTS:
                _collect(r, items)
            elif r.type != "comment":
                items.append(("after", r))
        if outer:
            items.sort(key=lambda kv: kv[1].start_byte)
        subs: list[Sub] = []
        fields: list[Field] = []
        redirects: list[Redirect] = list(ctx.redirects)
        stdin: In | None = None
        after: list[Node] = []
        bodies: list[tuple[Node, In | None]] = []
        fd: str | None = None
        herestring = False
        for k, (kind, n) in enumerate(items):
            if kind == "arg" and n.type == "number" and _is_fd_for(n, items, k, self.src):
                fd = self.text(n)
            elif kind in ("name", "arg"):
                brace = kind == "name" and n.start_byte == self.brace_at
                fields.extend(self.expand(n, ctx, subs, split=True, prefix="{" if brace else ""))
            elif kind == "assign":
                self._assignments(n, ctx, persist=False)
            elif kind in ("redir", "heredoc"):
                got = self._redirect(n, ctx, subs, fd, herestring=herestring)
                fd, herestring = None, False
                if got is not None:
                    redirects.append(got[0])
                    if got[1] is not None:
                        stdin = got[1]
                    if got[2] is not None:
                        bodies.append((got[2], got[1]))
            elif kind == "error" and self.text(n) == "<<":
                herestring = True  # tree-sitter splits "2>&1 <<< x" into "<<" and "< x"
            else:
                after.append(n)
        if not fields and not redirects:
            for n in after:
                self._walk(n, ctx.conditional())
            return None
        step = self._emit(fields, redirects, ctx, stdin)
        for s in subs:
            self.out.extend(s.invocations)
        for body, src in bodies:
            if src is None or not src.used:
                self._heredoc_subs(body, ctx.nested("subst"))
        for n in after:
            self._walk(n, ctx.conditional())
        if fields and basename(fields[0].text) in _ASSIGNING:
            for f in fields[1:]:
                if _IDENT.fullmatch(f.text):
                    ctx.vars.pop(f.text, None)
        return [step] if step is not None else None

    def _redirect(self, node: Node, ctx: Ctx, subs: list[Sub], fd: str | None, *,
                  herestring: bool = False) -> tuple[Redirect, In | None, Node | None] | None:
        op = ""
        target: Field | None = None
        body: Node | None = None
        delim = ""
        for c in node.children:
            t = c.type
            if t == "file_descriptor":
                fd = self.text(c)
            elif t == "heredoc_start":
                delim = self.text(c)
            elif t == "heredoc_body":
                body = c
            elif t == "ERROR":
                if op == "<" and self.text(c) == ">":
                    op = "<>"  # tree-sitter-bash does not know the read-write redirect
            elif not c.is_named:
                op = op or self.text(c)
            elif target is None and t not in _REDIRECTS and node.type != "heredoc_redirect":
                target = self.expand(c, ctx, subs, split=False)[0]
        if node.type == "heredoc_redirect":
            return self._heredoc(node, ctx, op, delim, body, fd)
        if herestring and op == "<":
            op = "<<<"
        if op.endswith("-") and op in (">&-", "<&-"):
            return Redirect(op[:-1], "-", fd), None, None
        text = target.text if target else ""
        red = Redirect(op, text, fd, dynamic=target is not None and not target.known)
        src: In | None = None
        if fd in (None, "0"):
            if op == "<<<" and target is not None:
                src = In("herestring", text + "\n", target.known)
            elif op in ("<", "<>"):
                src = In("file", text, target is not None and target.known, target)
        return red, src, None

    def _heredoc(self, node: Node, ctx: Ctx, op: str, delim: str, body: Node | None,
                 fd: str | None) -> tuple[Redirect, In | None, Node | None]:
        # tree-sitter leaves leading blanks out of heredoc_body: take the lines whole.
        end = body.end_byte if body is not None else (
            ends[0].start_byte if (ends := [c for c in node.children if c.type == "heredoc_end"])
            else node.end_byte)
        start = body.start_byte if body is not None else end
        line = self.src.rfind(b"\n", 0, start)
        if line >= 0 and all(line >= c.end_byte for c in node.children
                             if c.type == "heredoc_start"):
            start = line + 1
        quoted = any(q in delim for q in "'\"\\")
        if quoted or body is None:
            text, known = self.src[start:end].decode("utf-8", "replace"), True
            if op == "<<-":
                text = "\n".join(ln.lstrip("\t") for ln in text.split("\n"))
        else:
            text, known = self.heredoc_text(body, ctx, start, end, strip_tabs=op == "<<-")
        src = In("heredoc", text, known) if fd in (None, "0") else None
        walk = body if body is not None and not quoted and body.named_child_count else None
        return Redirect(op or "<<", text, fd, dynamic=not known), src, walk

    def _heredoc_subs(self, body: Node, ctx: Ctx) -> None:
        """Run the substitutions of an unquoted heredoc body. tree-sitter-bash leaves
        backticks there as text and reads $((...)) as a command substitution."""
        for c in body.named_children:
            if c.type == "command_substitution" and self.text(c).startswith("$(("):
                subs: list[Sub] = []
                saved, self.src = self.src, b": " + self.raw(c)
                try:
                    self.subs_in(ts_parse(self.src).root_node, ctx, subs)
                finally:
                    self.src = saved
                for s in subs:
                    self.out.extend(s.invocations)
            elif c.type != "heredoc_content":
                self._walk(c, ctx)
        for m in BACKTICK.finditer(self.text(body)):
            self._text(unescape(m.group(1), _BACKTICK_ESC), ctx)

    # -- what a command does --------------------------------------------------------

    def _emit(self, fields: list[Field], redirects: list[Redirect], ctx: Ctx,
              stdin: In | None, wrappers: tuple[str, ...] = (), origin: str | None = None
              ) -> decode.Step | None:
        argv = tuple(f.text for f in fields)
        dynamic = bool(fields) and not fields[0].known
        pipe = ctx.pipe
        inv = Invocation(argv, basename(argv[0]) if argv else "", tuple(redirects),
                         origin or ctx.origin, wrappers, dynamic, ctx.background, ctx.depth,
                         pipe[1] if pipe else None, pipe[0] if pipe else None)
        self.out.append(inv)
        if not argv or dynamic:
            return None
        known = all(f.known for f in fields)
        step: decode.Step | None
        if stdin is None:
            step = decode.Step(argv, known, unknown=_unknown_names(fields))
        elif stdin.kind == "file":
            step = decode.Step(argv, known, stdin_file=stdin.text)
        else:
            step = decode.Step(argv, known, stdin=stdin.text, stdin_known=stdin.known)
        if not wrappers:
            self._decoded_word(fields[0], ctx)
        sc = script(argv)
        if sc is not None:
            self._script(sc, fields, ctx, stdin)
        for inner in unwrap(argv):
            ifields = [Field(t, True) if s < 0 else fields[s].derive(t)
                       for t, s in zip(inner.argv, inner.src, strict=True)]
            ictx, istdin = (ctx.unpiped(), None) if inner.origin == "xargs" else (ctx, stdin)
            got = self._emit(ifields, redirects, ictx, istdin, (*wrappers, inv.program),
                             inner.origin or origin)
            if inner.origin is None:
                step = got
        return step


def _repaired(data: bytes, root: Node) -> Node:
    """Work around two tree-sitter-bash gaps with same-length rewrites of the text (nodes
    are read from the original bytes, so offsets must not move): it lacks the read-write
    redirect "<>" (">|" parses the same), and it ends a heredoc at any line that starts
    with the delimiter ("    EOF = 1" ends <<'EOF'), where bash wants the exact line; the
    body of a quoted heredoc is literal, so blanking it lets the true end be found."""
    fixed = data.replace(b"<>", b">|") if b"<>" in data else data
    if b"<<" in data:
        fixed = _blank_heredocs(fixed, root)
    if fixed == data:
        return root
    alt = ts_parse(fixed).root_node
    return root if alt.has_error else alt


def _blank_heredocs(data: bytes, root: Node) -> bytes:
    starts: list[Node] = []
    stack = [root]
    while stack:
        n = stack.pop()
        if n.type == "heredoc_start":
            starts.append(n)
        stack.extend(n.children)
    out = bytearray(data)
    pos = 0
    for n in sorted(starts, key=lambda x: x.start_byte):
        if n.start_byte < pos:
            continue  # a "<<" inside a body we already placed
        raw = data[n.start_byte:n.end_byte]
        delim = raw.replace(b"'", b"").replace(b'"', b"").replace(b"\\", b"")
        strip = n.prev_sibling is not None and n.prev_sibling.type == "<<-"
        nl = data.find(b"\n", max(n.end_byte, pos))
        if nl < 0:
            break
        start = i = nl + 1
        while True:
            j = data.find(b"\n", i)
            end = j if j >= 0 else len(data)
            line = data[i:end]
            if (line.lstrip(b"\t") if strip else line) == delim or j < 0:
                break
            i = j + 1
        if delim != raw:  # quoted: the body is literal text
            # Not blanks: tree-sitter would leave the body out of its heredoc_body node.
            fill = next(c for c in b"xyz" if c not in delim)
            out[start:i] = bytes(b if b == 0x0A else fill for b in data[start:i])
            if len(raw) >= len(delim) + 2:  # E"O"F: tree-sitter wants the quotes outside
                out[n.start_byte:n.end_byte] = b"'" + delim + b"'" + b" " * (
                    len(raw) - len(delim) - 2)
        pos = end
    return bytes(out)


def _collect(node: Node, items: list[tuple[str, Node]]) -> None:
    """Add a redirect to a command's items, unpacking what tree-sitter nests in it."""
    if node.type == "file_redirect":
        items.append(("redir", node))
        seen_target = False
        for c in node.children:
            if c.is_named and c.type not in ("file_descriptor", "ERROR"):
                if seen_target:
                    items.append(("arg", c))  # "echo > f a b" passes a and b to echo
                seen_target = True
        return
    if node.type == "herestring_redirect":
        items.append(("redir", node))
        return
    items.append(("heredoc", node))
    for c in node.named_children:
        if c.type in _REDIRECTS:
            _collect(c, items)
        elif c.type == "ERROR":
            for e in c.named_children:
                (_collect(e, items) if e.type in _REDIRECTS else items.append(("after", e)))
        elif c.type not in ("heredoc_start", "heredoc_body", "heredoc_end", "pipeline"):
            items.append(("after", c))


def _heredoc_pipe(node: Node) -> Node | None:
    """tree-sitter nests "| rest" of "cat <<EOF | sh" inside the heredoc redirect."""
    if node.type != "redirected_statement":
        return None
    for c in node.named_children:
        if c.type == "heredoc_redirect":
            for h in c.named_children:
                if h.type == "pipeline":
                    return h
    return None


def _is_fd_for(node: Node, items: list[tuple[str, Node]], k: int, src: bytes) -> bool:
    """tree-sitter reads the "0" of "... 0>&1" as a word when it follows another word."""
    if k + 1 >= len(items) or node.type not in ("number", "word"):
        return False
    kind, nxt = items[k + 1]
    if kind != "redir" or nxt.start_byte != node.end_byte or nxt.type != "file_redirect":
        return False
    digits = src[node.start_byte:node.end_byte]
    return len(digits) < 4 and digits.isdigit() and not any(
        c.type == "file_descriptor" for c in nxt.children)


def _unknown_names(fields: list[Field]) -> tuple[str, ...]:
    return tuple(n for f in fields for n in f.unknown)
