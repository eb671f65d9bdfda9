"""Redirects, and the text a command hands to a shell: ``bash -c STR``, ``eval``, a
heredoc fed to ``sh``, ``... | base64 -d | sh``, ``source <(curl ...)``.

Each becomes a ``ShellFeed`` when a producer computes the text at run time, and the
text, when it can be recovered statically, is parsed again with the invocations it
runs marked by origin and depth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import tree_sitter as ts

from corral.policy import decode
from corral.policy.shell import Invocation, Redirect, ShellFeed, ts_parse
from corral.policy.shell_argv import Script
from corral.policy.shell_repair import REDIRECTS, parse_copy
from corral.policy.shell_words import BACKTICK, Ctx, Field, Sub, Words, unescape

Node = ts.Node
_BACKTICK_ESC = re.compile(r"\\([\\$`])")


@dataclass(slots=True)
class In:
    """Where a command's standard input comes from, when a redirect sets it."""

    kind: str  # "heredoc", "herestring" or "file"
    text: str  # body, word (with its newline) or file name
    known: bool
    target: Field | None = None
    used: bool = False  # a shell took it as its script


class Feeds(Words):
    """Redirects and shell feeds; ``Walker`` supplies the walking methods below."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[Invocation] = []
        self.feeds: list[ShellFeed] = []

    def recurse(self, text: str, ctx: Ctx, origin: str, *, share: bool = False) -> None:
        raise NotImplementedError

    def _text(self, text: str, ctx: Ctx) -> None:
        raise NotImplementedError

    def _walk(self, node: Node, ctx: Ctx) -> list[decode.Step] | None:
        raise NotImplementedError

    # -- redirects: where standard input, and so a shell's script, comes from -------

    def _redirect(
        self, node: Node, ctx: Ctx, subs: list[Sub], fd: str | None, *, herestring: bool = False
    ) -> tuple[Redirect, In | None, Node | None] | None:
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
            elif target is None and t not in REDIRECTS and node.type != "heredoc_redirect":
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

    def _heredoc(
        self, node: Node, ctx: Ctx, op: str, delim: str, body: Node | None, fd: str | None
    ) -> tuple[Redirect, In | None, Node | None]:
        # tree-sitter leaves leading blanks out of heredoc_body: take the lines whole.
        end = (
            body.end_byte
            if body is not None
            else (
                ends[0].start_byte
                if (ends := [c for c in node.children if c.type == "heredoc_end"])
                else node.end_byte
            )
        )
        start = body.start_byte if body is not None else end
        line = self.src.rfind(b"\n", 0, start)
        if line >= 0 and all(
            line >= c.end_byte for c in node.children if c.type == "heredoc_start"
        ):
            start = line + 1
        quoted = any(q in delim for q in "'\"\\")
        if quoted or body is None:
            text, known = self.src[start:end].decode("utf-8", "replace"), True
            if op == "<<-":
                text = "\n".join(ln.lstrip("\t") for ln in text.split("\n"))
        else:
            text, known = self.heredoc_text(body, ctx, start, end, strip_tabs=op == "<<-")
        src = In("heredoc", text, known) if fd in (None, "0") else None
        walk = (
            body
            if body is not None
            and not quoted
            and (body.named_child_count or b"`" in self.raw(body))
            else None
        )
        return Redirect(op or "<<", text, fd, dynamic=not known), src, walk

    def _heredoc_subs(self, body: Node, ctx: Ctx) -> None:
        """Run the substitutions of an unquoted heredoc body. tree-sitter-bash leaves
        backticks there as text and reads $((...)) as a command substitution."""
        for c in body.named_children:
            if c.type == "command_substitution" and self.text(c).startswith("$(("):
                subs: list[Sub] = []
                saved, self.src = self.src, b": " + self.raw(c)
                try:
                    self.subs_in(ts_parse(parse_copy(self.src)).root_node, ctx, subs)
                finally:
                    self.src = saved
                for s in subs:
                    self.out.extend(s.invocations)
            elif c.type != "heredoc_content":
                self._walk(c, ctx)
        for m in BACKTICK.finditer(self.text(body)):
            self._text(unescape(m.group(1), _BACKTICK_ESC), ctx)

    # -- shells and the text they run ----------------------------------------------

    def _decoded_word(self, f: Field, ctx: Ctx) -> None:
        for s in f.subs:
            r = s.result
            if r is not None and r.text is not None and r.encoding not in (None, "plain"):
                self.feeds.append(
                    ShellFeed(
                        "exec", s.invocations, f.text, r.encoding, f"{r.source} run as a command"
                    )
                )

    def _script(self, sc: Script, fields: list[Field], ctx: Ctx, stdin: In | None) -> None:
        shell = sc.shell
        if sc.kind == "string":
            parts = [fields[i] for i in sc.idx if i < len(fields)]
            if parts:
                self._script_string(shell, parts, sc.offset, ctx)
        elif sc.kind == "stdin" and stdin is not None:
            stdin.used = True
            if stdin.kind == "file":
                self._from_file(shell, stdin.target, stdin.text, ctx, "read by")
            else:
                what = "heredoc" if stdin.kind == "heredoc" else "here-string"
                reason = f"{what} fed to {shell}"
                if not stdin.known:
                    reason += " (it contains expansions not known statically)"
                self.feeds.append(
                    ShellFeed(
                        shell,
                        (),
                        stdin.text if stdin.known else None,
                        "plain" if stdin.known else None,
                        reason,
                    )
                )
                self.recurse(stdin.text, ctx, "heredoc")
        elif sc.kind == "stdin" and ctx.stdin is not None:
            self._piped(shell, *ctx.stdin.producers(), ctx, "piped into")
        elif sc.kind == "file" and sc.idx[0] < len(fields):
            f = fields[sc.idx[0]]
            self._from_file(shell, f, f.text, ctx, "run by", only_subst=True)

    def _from_file(
        self,
        shell: str,
        target: Field | None,
        name: str,
        ctx: Ctx,
        verb: str,
        *,
        only_subst: bool = False,
    ) -> None:
        procs = [s for s in (target.subs if target else ()) if s.process]
        if procs and target is not None and target.whole:
            self._piped(shell, tuple(procs[0].steps or ()), procs[0].invocations, ctx, verb)
        elif not only_subst:
            self.feeds.append(
                ShellFeed(
                    shell,
                    (),
                    None,
                    None,
                    f"contents of {name} {verb} {shell} (a file that cannot be read statically)",
                )
            )

    def _piped(
        self,
        shell: str,
        steps: tuple[decode.Step, ...],
        prods: tuple[Invocation, ...],
        ctx: Ctx,
        verb: str,
    ) -> None:
        r = (
            decode.evaluate(steps)
            if steps
            else decode.Recovered(
                None, None, "output of a process substitution", "not computed statically"
            )
        )
        self._feed(shell, prods, r, verb, ctx)

    def _feed(
        self, shell: str, prods: tuple[Invocation, ...], r: decode.Recovered, verb: str, ctx: Ctx
    ) -> None:
        reason = f"{r.source} {verb} {shell}"
        if r.why == "binary":
            reason = f"binary: {reason} is not UTF-8 text"
        elif r.why:
            reason += f" ({r.why})"
        self.feeds.append(ShellFeed(shell, prods, r.text, r.encoding, reason))
        text = r.text if r.text is not None else r.approx
        if text is not None:
            self.recurse(text, ctx, f"decoded:{r.encoding or 'plain'}", share=shell == "eval")

    def _script_string(self, shell: str, parts: list[Field], offset: int, ctx: Ctx) -> None:
        text = " ".join(f.text for f in parts)[offset:]
        origin = "eval" if shell == "eval" else "shell-c"
        subs = [s for f in parts for s in f.subs]
        if all(f.known for f in parts):
            done = [s for s in subs if s.result is not None and s.result.text is not None]
            if not done:
                self.recurse(text, ctx, origin, share=shell == "eval")
                return
            encs = list(dict.fromkeys(s.result.encoding or "plain" for s in done if s.result))
            enc = "+".join(encs)
            r = decode.Recovered(text, enc, "text" if enc == "plain" else f"{enc} text")
            self._feed(
                shell, tuple(i for s in done for i in s.invocations), r, "substituted into", ctx
            )
            return
        open_subs = [s for s in subs if s.result is None or s.result.text is None]
        if open_subs:
            first = open_subs[0].result or decode.Recovered(
                None, None, "output of a command", "not computed statically"
            )
            r = decode.Recovered(None, first.encoding, first.source, first.why)
            self._feed(
                shell,
                tuple(i for s in open_subs for i in s.invocations),
                r,
                "substituted into",
                ctx,
            )
        elif len(parts) == 1 and parts[0].whole:
            names = ", ".join(parts[0].unknown) or parts[0].text
            self.feeds.append(
                ShellFeed(
                    shell,
                    (),
                    None,
                    None,
                    f"value of {names} run by {shell} is not known statically",
                )
            )
        if not (len(parts) == 1 and parts[0].whole):
            self.recurse(text, ctx, origin, share=shell == "eval")
