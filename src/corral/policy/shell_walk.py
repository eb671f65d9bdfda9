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
from corral.policy.shell_repair import (
    REDIRECTS,
    collect_redirect,
    heredoc_pipe,
    is_fd_for,
    parse_copy,
    repaired,
)
from corral.policy.shell_words import Ctx, Field, Piped, Sub

Node = ts.Node


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Nodes with nothing to run inside.
_LEAVES = _names(
    "word number variable_name string_content raw_string heredoc_start heredoc_end "
    "heredoc_content file_descriptor special_variable_name extglob_pattern regex "
    "test_operator ansi_c_string comment"
)
# Statements whose parts may not run, or run in a subshell (see Ctx.cond).
_COND = _names(
    "subshell if_statement elif_clause else_clause while_statement for_statement "
    "c_style_for_statement case_statement case_item do_group"
)
# Builtins that assign the variables named by their operands at run time.
_ASSIGNING = frozenset({"read", "mapfile", "readarray", "getopts", "let"})
# Declarations that leave a variable named without a value unset or empty.
_RESETTING = _names("unset local typeset declare")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Walker(Feeds):
    def __init__(self, max_depth: int) -> None:
        super().__init__()
        self.partial = False
        self.functions: list[str] = []
        self.max_depth = max_depth
        self.pipelines = 0
        self.brace_at = -1  # where a word continues a "{" that tree-sitter took for a group
        self.top_vars: dict[str, str] = {}

    # -- entry points ---------------------------------------------------------------

    def run(self, text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused("command is not valid Unicode text") from None
        self._text(text, Ctx(self.top_vars))

    def _text(self, text: str, ctx: Ctx) -> None:
        # Decoded text may carry bytes that are not UTF-8 as surrogates: keep them.
        data = text.encode("utf-8", "surrogateescape")
        plain = parse_copy(data)
        root = ts_parse(plain).root_node
        if root.has_error:
            root = repaired(plain, root)
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
        if t in REDIRECTS:
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
                cont = heredoc_pipe(c)
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
            step = (
                got[0]
                if got is not None and len(got) == 1
                else decode.Step(
                    (), known=False, label=f"output of a {node.type.replace('_', ' ')}"
                )
            )
            steps.append(step)
            own.append(step)
            prods.extend(self.out[mark:])
        return own

    def _stage(self, node: Node, ctx: Ctx) -> list[decode.Step] | None:
        if node.type == "redirected_statement":
            return self._redirected(node, ctx, in_pipeline=True)
        return self._walk(node, ctx)

    def _redirected(
        self, node: Node, ctx: Ctx, *, in_pipeline: bool = False
    ) -> list[decode.Step] | None:
        if not in_pipeline and (cont := heredoc_pipe(node)) is not None:
            return self._stages([node, *self._flatten(cont)], ctx)
        body = node.child_by_field_name("body")
        redirs = [c for c in node.named_children if body is None or c.id != body.id]
        if body is None or body.type == "command":
            return self._command(body, ctx, redirs)
        # Redirects of a compound command apply to every command inside it.
        subs: list[Sub] = []
        own: list[Redirect] = []
        for r in redirs:
            if r.type in REDIRECTS:
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
        nodes = (
            [node]
            if node.type == "variable_assignment"
            else [c for c in node.named_children if c.type == "variable_assignment"]
        )
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
                if c.type == "variable_name" and keyword in _RESETTING:
                    ctx.vars.pop(self.text(c), None)
        self._emit([Field(a, True) for a in argv], [], ctx, None)
        for s in subs:
            self.out.extend(s.invocations)

    # -- simple commands ------------------------------------------------------------

    def _command(
        self, node: Node | None, ctx: Ctx, outer: list[Node], name: Node | None = None
    ) -> list[decode.Step] | None:
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
                elif t in REDIRECTS:
                    collect_redirect(c, items)
                elif c.is_named and t != "comment":
                    items.append(("error" if t == "ERROR" else "arg", c))
        for r in outer:
            if r.type in REDIRECTS:
                collect_redirect(r, items)
            elif r.type != "comment":
                items.append(("error" if r.type == "ERROR" else "after", r))
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
            if kind == "arg" and n.type == "number" and is_fd_for(n, items, k, self.src):
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

    # -- what a command does --------------------------------------------------------

    def _emit(
        self,
        fields: list[Field],
        redirects: list[Redirect],
        ctx: Ctx,
        stdin: In | None,
        wrappers: tuple[str, ...] = (),
        origin: str | None = None,
    ) -> decode.Step | None:
        argv = tuple(f.text for f in fields)
        dynamic = bool(fields) and not fields[0].known
        pipe = ctx.pipe
        inv = Invocation(
            argv,
            basename(argv[0]) if argv else "",
            tuple(redirects),
            origin or ctx.origin,
            wrappers,
            dynamic,
            ctx.background,
            ctx.depth,
            pipe[1] if pipe else None,
            pipe[0] if pipe else None,
        )
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
            ifields = [
                Field(t, True) if s < 0 else fields[s].derive(t)
                for t, s in zip(inner.argv, inner.src, strict=True)
            ]
            ictx, istdin = (ctx.unpiped(), None) if inner.origin == "xargs" else (ctx, stdin)
            got = self._emit(
                ifields, redirects, ictx, istdin, (*wrappers, inv.program), inner.origin or origin
            )
            if inner.origin is None:
                step = got
        return step


def _unknown_names(fields: list[Field]) -> tuple[str, ...]:
    return tuple(n for f in fields for n in f.unknown)
