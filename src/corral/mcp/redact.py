"""Secrets taken out of what a tool returns, before an agent (or the ledger) sees it.

An MCP server that reads files, environments or cloud consoles hands back whatever it
finds; a key in that text is a key the agent can now use or send on. The shapes are
data (``rules/secrets.yaml``): a match becomes ``[REDACTED:<id>]``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import RuleError
from corral.policy.loader import _line_for, parse_data_file, read_data_file


class _Secret(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    reason: str
    pattern: str
    group: int = Field(default=0, ge=0)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    secrets: tuple[_Secret, ...]


@dataclass(frozen=True, slots=True)
class SecretShape:
    id: str
    regex: re.Pattern[str]
    group: int


@dataclass(frozen=True, slots=True)
class Redactor:
    """Replaces every secret shape it knows in text, and in strings nested in JSON."""

    shapes: tuple[SecretShape, ...]
    version: str

    def text(self, text: str) -> tuple[str, int]:
        """``text`` with its secrets replaced, and how many were."""
        count = 0
        for shape in self.shapes:
            # A cheap screen first: most tool output holds no secret at all.
            if shape.regex.search(text) is None:
                continue

            def mark(m: re.Match[str], shape: SecretShape = shape) -> str:
                nonlocal count
                count += 1
                label = f"[REDACTED:{shape.id}]"
                if not shape.group:
                    return label
                start, end = m.span(shape.group)
                base = m.start()
                whole = m.group(0)
                return whole[: start - base] + label + whole[end - base :]

            text = shape.regex.sub(mark, text)
        return text, count

    def value(self, value: Any) -> tuple[Any, int]:
        """A JSON value with every string in it redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            total = 0
            out: dict[Any, Any] = {}
            for k, v in value.items():
                out[k], n = self.value(v)
                total += n
            return out, total
        if isinstance(value, list | tuple):
            total = 0
            items = []
            for v in value:
                item, n = self.value(v)
                items.append(item)
                total += n
            return items, total
        return value, 0


def load_redactor(path: str | os.PathLike[str] | None = None) -> Redactor:
    """The secret shapes of ``path``, or the shipped ones (cached)."""
    if path is None:
        return _shipped()
    p = Path(path)
    text = read_data_file(p, "secret patterns")
    return _compile(text, str(p))


@functools.cache
def _shipped() -> Redactor:
    res = resources.files("corral.rules").joinpath("secrets.yaml")
    return _compile(res.read_text(encoding="utf-8"), str(res))


def _compile(text: str, display: str) -> Redactor:
    doc, f = parse_data_file(text, display, _File)
    shapes: list[SecretShape] = []
    for i, s in enumerate(f.secrets):
        line = _line_for(doc, ("secrets", i, "pattern"), "")
        key = f"secrets[{i}].pattern"
        try:
            regex = re.compile(s.pattern)
        except re.error as e:
            raise RuleError(f"bad regex: {e}", file=display, line=line, key=key) from None
        if s.group > regex.groups:
            raise RuleError(
                f"group {s.group} but the pattern has {regex.groups}",
                file=display,
                line=line,
                key=key,
            )
        shapes.append(SecretShape(s.id, regex, s.group))
    return Redactor(tuple(shapes), f.version)
