"""Workarounds for gaps in tree-sitter-bash, and the odd tree shapes it produces.

tree-sitter-bash parses all but a handful of real agent commands; for the rest, a
same-length rewrite of the text often yields a clean tree (nodes are read from the
original bytes, so offsets must not move). What cannot be repaired is walked leniently
and reported as ``partial`` when ``bash -n`` accepts it.
"""

from __future__ import annotations

from collections.abc import Iterator

import tree_sitter as ts

from corral.policy.shell import ts_parse

Node = ts.Node

REDIRECTS = frozenset({"file_redirect", "heredoc_redirect", "herestring_redirect"})
_ASCII = bytes(range(128)).replace(b"\x00", b" ") + b"x" * 128


def parse_copy(data: bytes) -> bytes:
    """The bytes to hand tree-sitter: tree-sitter-bash can crash the whole process on
    some characters outside the BMP ("{" then U+E139B). Bash reads every non-ASCII byte
    as a word character, and so does the parser if each becomes an "x"."""
    return data if data.isascii() and b"\x00" not in data else data.translate(_ASCII)


def repaired(data: bytes, root: Node) -> Node:
    """A clean tree for text tree-sitter-bash rejects but bash accepts, if a same-length
    rewrite gives one; otherwise ``root``. The gaps worked around: no read-write redirect
    "<>" (">|" parses the same); a heredoc ends at any line that starts with its delimiter
    ("    EOF = 1" ends <<'EOF') where bash wants the exact line, so the literal body of a
    quoted heredoc is blanked; a delimiter quoted inside (E"O"F) is not recognised; and
    ";" cannot follow a heredoc operator on its line."""
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
        word_end = _word_end(data, n.start_byte)  # tree-sitter may stop at a quote: "E"OF
        raw = data[n.start_byte : word_end]
        delim = raw.replace(b"'", b"").replace(b'"', b"").replace(b"\\", b"")
        strip = n.prev_sibling is not None and n.prev_sibling.type == "<<-"
        nl = data.find(b"\n", max(word_end, pos))
        if nl < 0:
            break
        _semicolons(out, data, word_end, nl)
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
            fill = next((c for c in b"xyzqw" if c not in delim), 0x5F)
            out[start:i] = bytes(b if b == 0x0A else fill for b in data[start:i])
            if len(raw) >= len(delim) + 2:  # E"O"F: tree-sitter wants the quotes outside
                out[n.start_byte : word_end] = (
                    b"'" + delim + b"'" + b" " * (len(raw) - len(delim) - 2)
                )
        pos = end
    return bytes(out)


def _unquoted(data: bytes, i: int, stop: int) -> Iterator[int]:
    """Positions in ``data[i:stop]`` outside quotes and not escaped by a backslash."""
    quote = 0
    while i < stop:
        c = data[i]
        if quote:
            quote = 0 if c == quote else quote
        elif c in b"'\"":
            quote = c
        elif c == 0x5C:
            i += 1
        else:
            yield i
        i += 1


def _semicolons(out: bytearray, data: bytes, i: int, stop: int) -> None:
    """tree-sitter-bash cannot end a statement with ";" after a heredoc operator on the
    same line ("cat <<EOF > f; python f"); "&&" parses, and only makes the rest of the
    line conditional, which the walk treats conservatively."""
    for j in _unquoted(data, i, stop - 1):
        if data[j] == 0x3B and data[j + 1] in b" \t" and data[j - 1] != 0x3B:
            out[j : j + 2] = b"&&"


def _word_end(data: bytes, i: int) -> int:
    for j in _unquoted(data, i, len(data)):
        if data[j] in b" \t\n;|&<>()":
            return j
    return len(data)


def collect_redirect(node: Node, items: list[tuple[str, Node]]) -> None:
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
        if c.type in REDIRECTS:
            collect_redirect(c, items)
        elif c.type == "ERROR":
            for e in c.named_children:
                if e.type in REDIRECTS:
                    collect_redirect(e, items)
                else:
                    items.append(("after", e))
        elif c.type not in ("heredoc_start", "heredoc_body", "heredoc_end", "pipeline"):
            items.append(("after", c))


def heredoc_pipe(node: Node) -> Node | None:
    """tree-sitter nests "| rest" of "cat <<EOF | sh" inside the heredoc redirect."""
    if node.type != "redirected_statement":
        return None
    for c in node.named_children:
        if c.type == "heredoc_redirect":
            for h in c.named_children:
                if h.type == "pipeline":
                    return h
    return None


def is_fd_for(node: Node, items: list[tuple[str, Node]], k: int, src: bytes) -> bool:
    """tree-sitter reads the "0" of "... 0>&1" as a word when it follows another word."""
    if k + 1 >= len(items) or node.type not in ("number", "word"):
        return False
    kind, nxt = items[k + 1]
    if kind != "redir" or nxt.start_byte != node.end_byte or nxt.type != "file_redirect":
        return False
    digits = src[node.start_byte : node.end_byte]
    return (
        len(digits) < 4
        and digits.isdigit()
        and not any(c.type == "file_descriptor" for c in nxt.children)
    )
