"""Reading policy files: YAML with line numbers, ``extends`` composition, clear errors.

A user who gets a policy wrong must be told where, in one line: ``FILE:LINE: KEY: what``.
pydantic reports a location as a tuple of keys, so the YAML is composed to a node tree
and each location is mapped back to the line of the node (or key) it names.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from corral.errors import PolicyError, RuleError
from corral.policy.schema import PolicySpec, SpecError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Aliases can make a small file expand exponentially ("billion laughs"); no real policy
# comes near this many nodes.
_MAX_NODES = 100_000

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class _Pos:
    line: int  # 1-based line where the node starts
    key_line: int | None  # line of the mapping key that holds it, if any


@dataclass(frozen=True, slots=True)
class _Include:
    """Where an ``extends`` entry was written, so errors about the target point there."""

    file: str
    line: int | None
    key: str


@dataclass(slots=True)
class _Doc:
    display: str  # how errors name this document
    data: dict[str, Any]
    index: dict[Loc, _Pos]


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    """A policy with every ``extends`` applied and the result validated."""

    spec: PolicySpec
    name: str
    source: str  # absolute path, "preset:NAME" or the caller's label for a dict
    files: tuple[str, ...]  # every file read, parents before children


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_policy(name_or_path: str | os.PathLike[str]) -> ResolvedPolicy:
    """Load a shipped preset by name, or a policy file by path, and resolve ``extends``."""
    path = _locate(name_or_path, Path.cwd(), None)
    files: list[str] = []
    merged, own = _resolve_file(path, (), None, files)
    preset = _preset_name(path)
    name = own.name or preset or path.stem
    source = f"preset:{preset}" if preset else str(path.resolve())
    spec = _validate_merged(merged, own, name, str(path))
    return ResolvedPolicy(spec, name, source, tuple(dict.fromkeys(files)))


def load_policy_data(
    data: Mapping[str, Any],
    *,
    source: str = "<dict>",
    base_dir: str | os.PathLike[str] | None = None,
) -> ResolvedPolicy:
    """Resolve a policy given as data; ``extends`` paths are relative to ``base_dir``
    (default: the current directory)."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"a policy must be a mapping, got {type(data).__name__}", file=source)
    doc = _Doc(source, dict(data), {})
    files: list[str] = []
    merged, own = _resolve_doc(doc, Path(base_dir or Path.cwd()), (), files)
    name = own.name or source
    return ResolvedPolicy(
        _validate_merged(merged, own, name, source), name, source, tuple(dict.fromkeys(files))
    )


# --- locating and reading files ------------------------------------------------------


def _is_preset_ref(ref: str) -> bool:
    return not (
        "/" in ref or os.sep in ref or ref.startswith((".", "~")) or ref.endswith((".yaml", ".yml"))
    )


def _preset_name(path: Path) -> str | None:
    resolved = path.resolve()
    return resolved.stem if resolved.parent == PRESETS_DIR and resolved.is_file() else None


def _locate(ref: str | os.PathLike[str], base: Path, include: _Include | None) -> Path:
    if isinstance(ref, str) and _is_preset_ref(ref):
        names = preset_names()
        if ref in names:
            return PRESETS_DIR / f"{ref}.yaml"
        if not (base / ref).is_file():
            hint = _did_you_mean(ref, names)
            raise PolicyError(
                f"unknown preset {ref!r}{hint} (known presets: {', '.join(names)})",
                **_where(include),
            )
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base / path


def _where(include: _Include | None) -> dict[str, Any]:
    if include is None:
        return {}
    return {"file": include.file, "line": include.line, "key": include.key}


def _read_doc(path: Path, include: _Include | None) -> _Doc:
    display = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if include is None:
            raise PolicyError("no such policy file", file=display) from None
        raise PolicyError(f"no such policy file: {display}", **_where(include)) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = _where(include) or {"file": display}
        raise PolicyError(f"cannot read policy file {display}: {why}", **where) from None
    return _parse_yaml(text, display)


# libyaml's parser when PyYAML was built with it (the wheels are): ten times faster, and
# a policy load sits on the start-up path of every `corral check`.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str, display: str) -> _Doc:
    """Parse one YAML policy document, remembering the line of every node."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark:
            what += f" ({exc.context} started on line {exc.context_mark.line + 1})"
        raise PolicyError(
            f"YAML syntax error: {what}", file=display, line=mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"YAML syntax error: {exc}", file=display) from None
    if root is None:
        raise PolicyError("empty policy file (expected at least 'version: 1')", file=display)
    builder = _Builder(display)
    data = builder.build(root, (), None)
    if not isinstance(data, dict):
        raise PolicyError(
            "a policy must be a mapping of keys to values",
            file=display,
            line=root.start_mark.line + 1,
        )
    return _Doc(display, data, builder.index)


class _Builder:
    """Turns a composed node tree into Python data plus a location -> line index."""

    def __init__(self, display: str) -> None:
        self.display = display
        self.index: dict[Loc, _Pos] = {}
        self.constructor = yaml.SafeLoader("")
        self.active: set[int] = set()
        self.count = 0

    def fail(self, message: str, node: yaml.Node, loc: Loc) -> PolicyError:
        return PolicyError(
            message, file=self.display, line=node.start_mark.line + 1, key=keypath(loc) or None
        )

    def build(self, node: yaml.Node, loc: Loc, key_line: int | None) -> Any:
        self.count += 1
        if self.count > _MAX_NODES or id(node) in self.active:
            raise self.fail("document too large or self-referencing (check aliases)", node, loc)
        self.index[loc] = _Pos(node.start_mark.line + 1, key_line)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.constructor.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                raise self.fail(f"invalid value: {exc}", node, loc) from None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*loc, i), None) for i, item in enumerate(node.value)]
            assert isinstance(node, yaml.MappingNode)
            return self._build_mapping(node, loc)
        finally:
            self.active.discard(id(node))

    def _build_mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                raise self.fail(
                    "YAML merge keys (<<) are not supported; use extends", key_node, loc
                )
            scalar = isinstance(key_node, yaml.ScalarNode)
            key = self.constructor.construct_object(key_node) if scalar else None
            if not isinstance(key, str):
                got = repr(key_node.value) if scalar else "a collection"
                raise self.fail(f"keys must be strings, got {got}", key_node, loc)
            # PyYAML keeps the last of two equal keys; in a security policy the first one
            # silently vanishing is exactly the kind of mistake that must be loud.
            if key in out:
                raise self.fail("duplicate key", key_node, (*loc, key))
            out[key] = self.build(value_node, (*loc, key), key_node.start_mark.line + 1)
        return out


# --- extends -------------------------------------------------------------------------


def _resolve_file(
    path: Path, chain: tuple[Path, ...], include: _Include | None, files: list[str]
) -> tuple[dict[str, Any], PolicySpec]:
    doc = _read_doc(path, include)
    return _resolve_doc(doc, path.parent, (*chain, path), files)


def _resolve_doc(
    doc: _Doc, base: Path, chain: tuple[Path, ...], files: list[str]
) -> tuple[dict[str, Any], PolicySpec]:
    """Resolve parents depth-first in list order, then lay this document on top.

    Each document is validated on its own first so an error names the file and line
    where it was written, not the file that happened to include it.
    """
    own = _validate(doc.data, doc)
    merged: dict[str, Any] = {}
    refs = own.extends or ()
    single = isinstance(doc.data.get("extends"), str)
    seen = {p.resolve() for p in chain}
    for i, ref in enumerate(refs):
        loc: Loc = ("extends",) if single else ("extends", i)
        include = _Include(doc.display, _line_for(doc, loc, "value_error"), keypath(loc))
        parent = _locate(ref, base, include)
        if parent.resolve() in seen:
            names = [str(p) for p in (*chain, parent)]
            raise PolicyError(f"extends cycle: {' -> '.join(names)}", **_where(include))
        parent_data, _ = _resolve_file(parent, chain, include, files)
        merged = merge(merged, parent_data)
    files.append(doc.display)
    child = own.model_dump(mode="json", exclude_unset=True)
    child.pop("extends", None)
    return merge(merged, child), own


def merge(parent: Any, child: Any, path: Loc = ()) -> Any:
    """Lay ``child`` over ``parent``: mappings merge key by key, lists concatenate without
    duplicates (parent items first), ``commands.rules`` and ``tools.rules`` merge by id,
    scalars: child wins.

    Lists only ever grow. That is a security property, not a convenience: a policy that
    extends ``strict`` cannot drop a ``network.deny`` or ``filesystem.hidden`` entry it
    inherited; it can only add its own (``writable`` is how it unprotects a path).
    """
    if isinstance(parent, dict) and isinstance(child, dict):
        out = dict(parent)
        for key, value in child.items():
            out[key] = merge(parent[key], value, (*path, key)) if key in parent else value
        return out
    if isinstance(parent, list) and isinstance(child, list):
        if path in (("commands", "rules"), ("tools", "rules")):
            return _merge_rules(parent, child)
        result = list(parent)
        for item in child:
            if item not in result:
                result.append(item)
        return result
    return child


def _merge_rules(parent: list[Any], child: list[Any]) -> list[Any]:
    result = list(parent)
    ids = [r.get("id") if isinstance(r, dict) else None for r in result]
    for rule in child:
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        if rule_id is not None and rule_id in ids:
            result[ids.index(rule_id)] = rule  # in place: the child's version replaces it
        else:
            result.append(rule)
            ids.append(rule_id)
    return result


def _validate_merged(
    merged: dict[str, Any], own: PolicySpec, name: str, display: str
) -> PolicySpec:
    # name and description identify this policy; inheriting "strict" as the name of every
    # policy that extends it would mislabel ledger records.
    merged = {**merged, "name": name, "description": own.description}
    return _validate(merged, _Doc(f"{display} (resolved through extends)", merged, {}))


# --- validation errors ---------------------------------------------------------------


def _validate(data: Any, doc: _Doc) -> PolicySpec:
    """Validate one document; the first problem (in file order) becomes a PolicyError."""
    try:
        return PolicySpec.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err, doc) for err in exc.errors(include_url=False)]
    problems.sort(key=lambda p: (p[0] is None, p[0] or 0))
    line, key, message = problems[0]
    if len(problems) > 1:
        more = len(problems) - 1
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    raise PolicyError(message, file=doc.display, line=line, key=key or None)


def _describe(err: Any, doc: _Doc) -> tuple[int | None, str, str]:
    loc: Loc = tuple(p for p in err["loc"] if p != "[key]")
    kind: str = err["type"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SpecError):
        loc += cause.subloc
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        message = f"unknown key (known: {', '.join(known)})" + _did_you_mean(str(loc[-1]), known)
    elif kind == "missing":
        message = "missing required key"
    elif cause is not None:
        message = str(cause)
    else:
        message = _rephrase(kind, err)
    return _line_for(doc, loc, kind), keypath(loc), message


_TYPE_WORDS = {
    "model_type": "a mapping",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
    "string_type": "a string",
    "bool_type": "true or false",
}


def _rephrase(kind: str, err: Any) -> str:
    """pydantic's wording, minus its internals ("instance of CommandsSpec")."""
    value = err.get("input")
    if kind in _TYPE_WORDS:
        text = f"must be {_TYPE_WORDS[kind]}"
    else:
        text = str(err["msg"])
        text = (
            "must be " + text[len("Input should be ") :]
            if text.startswith("Input should be ")
            else text
        )
    text += f" (got {_short(value)})"
    if kind in ("literal_error", "enum") and isinstance(value, str):
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        text += _did_you_mean(value, choices)
    return text


def _line_for(doc: _Doc, loc: Loc, kind: str) -> int | None:
    if kind == "missing":
        loc = loc[:-1]  # the key is absent: point at the mapping that lacks it
    while loc not in doc.index and loc:
        loc = loc[:-1]
    pos = doc.index.get(loc)
    if pos is None:
        return None
    return pos.key_line if pos.key_line is not None else pos.line


def _known_keys(loc: Loc) -> list[str]:
    tp: Any = PolicySpec
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            tp = field.annotation
        else:  # tuple[X, ...] or dict[str, X]: step into the item type
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[-1] if args else None
    tp = _unwrap(tp)
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return []
    # The key a user writes: a field aliased because its name clashes (tools.rules' schema).
    return sorted(f.alias or name for name, f in tp.model_fields.items())


def _unwrap(tp: Any) -> Any:
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(tp):
            tp = args[0]
            continue
        return tp


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def keypath(loc: Loc) -> str:
    """``("network", "allow", 2)`` -> ``network.allow[2]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_M = typing.TypeVar("_M", bound=BaseModel)


def read_data_file(path: str | os.PathLike[str], what: str) -> str:
    """The text of a data file a user names (rules, profiles, secret shapes); a
    ``RuleError`` naming the file and ``what`` it was meant to be when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise RuleError(f"cannot read {what}: {e.strerror or e}", file=str(path)) from None


def parse_data_file(text: str, display: str, model: type[_M]) -> tuple[_Doc, _M]:
    """A YAML data file (rules, profiles) read and checked against ``model``. Errors are
    ``RuleError`` naming the file, line and key; the document is returned too, so that a
    later check can point at its lines with ``data_error``."""
    from corral.errors import RuleError

    try:
        doc = _parse_yaml(text, display)
    except RuleError:
        raise
    except PolicyError as e:
        raise RuleError(e.detail, file=display, line=e.line, key=e.key) from None
    try:
        return doc, model.model_validate(doc.data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = tuple(p for p in err["loc"] if p != "[key]")
        raise RuleError(
            str(err["msg"]), file=display, line=_line_for(doc, loc, err["type"]), key=keypath(loc)
        ) from None
