"""A small JSONPath subset for naming tool arguments in a policy.

``$.path``, ``$.files[*]``, ``$.edits[0].file``, ``$['odd key']``, ``$.*`` and ``$..url``
(``url`` at any depth) cover how tool arguments are shaped in practice. Filters and
slices are left out on purpose: a policy must say plainly which values it checks, and a
path that cannot be read is an error at load time, never a constraint that silently
matches nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_QUOTED = re.compile(r"""\[\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")\s*\]""")
_INDEX = re.compile(r"\[\s*(-?\d+)\s*\]")
_WILD = re.compile(r"\[\s*\*\s*\]")

# A step is (op, arg): ("key", name), ("index", n), ("wild", None) or ("deep", name).
Step = tuple[str, "str | int | None"]
# Objects nest; a hostile argument could nest deeply to make ``..`` walk forever.
_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class JsonPath:
    text: str
    steps: tuple[Step, ...]

    def find(self, value: Any) -> list[Any]:
        """Every value this path names in ``value`` (empty when none)."""
        current = [value]
        for op, arg in self.steps:
            nxt: list[Any] = []
            for v in current:
                if op == "key":
                    if isinstance(v, dict) and arg in v:
                        nxt.append(v[arg])
                elif op == "index":
                    if isinstance(v, list) and isinstance(arg, int) and -len(v) <= arg < len(v):
                        nxt.append(v[arg])
                elif op == "wild":
                    if isinstance(v, dict):
                        nxt.extend(v.values())
                    elif isinstance(v, list):
                        nxt.extend(v)
                else:
                    nxt.extend(_deep(v, arg, 0))
            if not nxt:
                return []
            current = nxt
        return current


def _deep(value: Any, name: str | int | None, depth: int) -> Iterator[Any]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if name is None or key == name:
                yield item
            yield from _deep(item, name, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _deep(item, name, depth + 1)


def compile_path(text: str) -> JsonPath:
    """Parse ``text``; a ValueError says where it stops making sense."""
    if not text.startswith("$"):
        raise ValueError(f"JSON path {text!r} must start with '$'")
    steps: list[Step] = []
    i = 1
    while i < len(text):
        rest = text[i:]
        if rest.startswith(".."):
            if rest[2:3] == "*":
                steps.append(("deep", None))
                i += 3
                continue
            m = _NAME.match(text, i + 2)
            if not m:
                raise ValueError(f"JSON path {text!r}: expected a name after '..' at {i}")
            steps.append(("deep", m.group(0)))
            i = m.end()
        elif rest.startswith("."):
            if rest[1:2] == "*":
                steps.append(("wild", None))
                i += 2
                continue
            m = _NAME.match(text, i + 1)
            if not m:
                raise ValueError(
                    f"JSON path {text!r}: expected a name after '.' at {i} "
                    "(use ['...'] for other keys)"
                )
            steps.append(("key", m.group(0)))
            i = m.end()
        elif m := _QUOTED.match(text, i):
            raw = m.group(1) if m.group(1) is not None else m.group(2)
            steps.append(("key", re.sub(r"\\(.)", r"\1", raw)))
            i = m.end()
        elif m := _INDEX.match(text, i):
            steps.append(("index", int(m.group(1))))
            i = m.end()
        elif m := _WILD.match(text, i):
            steps.append(("wild", None))
            i = m.end()
        else:
            raise ValueError(
                f"JSON path {text!r}: unexpected {text[i]!r} at {i} "
                "(supported: .name, ['name'], [N], [*], .*, ..name)"
            )
    return JsonPath(text, tuple(steps))
