"""Detector rules: loading ``corral/rules/detectors.yaml`` and compiling it into matchers.

The rule file is reviewed data (its header documents the condition language). Each rule
names one event kind (``on``) and a set of conditions; compiling turns every condition
into a small predicate on the event mapping, with globs and regexes built once, so that
the engine (``engine.py``) only calls functions. Shared lists (``$miner_binaries`` ...)
come from ``corral/rules/lists.yaml`` and are resolved by the gate's rule compiler.

A broken rule file is a ``RuleError`` reading ``FILE:LINE: KEY: message``: a detector
that silently never matches is a hole in the watcher, so every unknown key, bad regex,
unknown list, unknown placeholder or condition that cannot apply to the rule's event
kind is refused at load time.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import os
import posixpath
import re
import socket
import string
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from corral.errors import PolicyError, RuleError
from corral.model import Category, Severity
from corral.policy.loader import (
    Loc,
    _Builder,
    _did_you_mean,
    _Doc,
    _line_for,
    _rephrase,
    _unwrap,
    keypath,
)
from corral.policy.rules import (
    _LIST_REF,
    _Compiler,
    _first_error,
    _ListFile,
    _load_yaml,
    path_glob_regex,
)
from corral.policy.schema import RULE_ID_RE, Response

EVENT_KINDS: tuple[str, ...] = ("exec", "net", "dns", "sample", "gpu", "file")
RESPONSES: tuple[str, ...] = typing.get_args(Response)
PLACEHOLDERS = frozenset({"program", "host", "port", "pid", "name", "path", "gpu"})
# How many events the evidence of a burst match carries at most.
MAX_EVIDENCE = 50

# Which event kinds carry what each condition looks at. A condition on a field the
# rule's events never have would never hold: that is a load error, not a silent no-op.
_PROCESS = frozenset({"exec", "sample", "gpu"})
APPLIES: dict[str, frozenset[str]] = {
    "program": _PROCESS,
    "args": _PROCESS,
    "argv": _PROCESS,
    "args_any": _PROCESS,
    "options_any": _PROCESS,
    "stdio_sockets": frozenset({"exec"}),
    "port": frozenset({"net"}),
    "host": frozenset({"net", "dns"}),
    "ip": frozenset({"net"}),
    "allowed": frozenset({"net", "dns"}),
    "cpu_above": frozenset({"sample"}),
    "cpu_share_above": frozenset({"sample"}),
    "util_above": frozenset({"gpu"}),
    "outlived_action": frozenset({"sample", "gpu"}),
    "granted": frozenset({"gpu"}),
    "path": frozenset({"file"}),
    "sustained": frozenset({"sample", "gpu"}),
    "burst": frozenset({"exec", "net", "dns", "file"}),
}
# Cheap conditions first: most events fail on a bool or a number before any regex runs.
_COST = {
    "allowed": 0,
    "stdio_sockets": 0,
    "outlived_action": 0,
    "granted": 0,
    "cpu_above": 1,
    "cpu_share_above": 1,
    "util_above": 1,
    "port": 1,
    "program": 2,
    "host": 3,
    "ip": 4,
    "path": 4,
    "args_any": 5,
    "options_any": 5,
    "args": 6,
    "argv": 7,
}

Event = Mapping[str, Any]
Test = Callable[["EventView"], bool]


# --- the file's shape ---------------------------------------------------------------


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str | int) and not isinstance(value, bool) else value


StrList = Annotated[list[StrictStr], BeforeValidator(_listify)]


class _Burst(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    count: Annotated[StrictInt, Field(ge=2)]
    within: Annotated[StrictFloat, Field(gt=0)]
    distinct: Literal["port", "host", "ip", "name"]


class _Options(BaseModel):
    """Single-letter options looked for before the program's first operand (after it,
    ``-R`` may belong to a remote command: ``ssh host ls -lR``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flags: StrList
    takes_value: StrictStr = ""  # option letters whose value follows them


class _Cond(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    program: StrList | None = None
    args: StrList | None = None
    argv: StrList | None = None
    args_any: StrList | None = None
    options_any: _Options | None = None
    stdio_sockets: StrictBool | None = None
    port: Annotated[list[Any], BeforeValidator(_listify)] | None = None
    host: StrList | None = None
    ip: StrList | None = None
    allowed: StrictBool | None = None
    cpu_above: StrictFloat | None = None
    cpu_share_above: StrictFloat | None = None
    util_above: StrictFloat | None = None
    outlived_action: StrictBool | None = None
    granted: StrictBool | None = None
    path: StrList | None = None
    sustained: Annotated[StrictFloat, Field(gt=0)] | None = None
    burst: _Burst | None = None


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[StrictStr, Field(pattern=f"^{RULE_ID_RE.pattern}$")]
    category: Category
    severity: Severity
    response: Response
    tags: list[Annotated[StrictStr, Field(pattern=r"^T\d{4}(\.\d{3})?$")]] = []
    reason: Annotated[StrictStr, Field(min_length=1)]
    on: Literal["exec", "net", "dns", "sample", "gpu", "file"]
    match: _Cond = _Cond()
    any: Annotated[list[_Cond], Field(min_length=1)] | None = None
    enabled: StrictBool = True


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: StrictStr
    rules: list[dict[str, Any]]


# --- compiled rules -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One compiled condition: ``test(event)`` says whether it holds."""

    key: str
    test: Test
    spec: tuple[Any, ...]  # what it was compiled from, lists resolved (for display)


@dataclass(frozen=True, slots=True)
class Burst:
    count: int
    within: float
    distinct: str  # port | host | ip | name


def _wild(glob: str) -> bool:
    return any(c in glob for c in "*?[")


@dataclass(frozen=True, slots=True)
class Globs:
    """Name globs (fnmatch, case-sensitive), split by shape: plain names in a set,
    ``name*`` and ``*name`` as prefix and suffix tuples, only the rest in a regex."""

    exact: frozenset[str]
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    rx: re.Pattern[str] | None = None

    @classmethod
    def of(cls, globs: Sequence[str]) -> Globs:
        exact, prefixes, suffixes, other = set(), [], [], []
        for g in globs:
            if not _wild(g):
                exact.add(g)
            elif g.endswith("*") and not _wild(g[:-1]):
                prefixes.append(g[:-1])
            elif g.startswith("*") and not _wild(g[1:]):
                suffixes.append(g[1:])
            else:
                other.append(g)
        rx = _globs_regex(other) if other else None
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), rx)

    def match(self, name: str) -> bool:
        return (
            name in self.exact
            or (bool(self.prefixes) and name.startswith(self.prefixes))
            or (bool(self.suffixes) and name.endswith(self.suffixes))
            or (self.rx is not None and self.rx.match(name) is not None)
        )


@dataclass(frozen=True, slots=True)
class DetectorRule:
    """One detector, ready to match. ``match`` must all hold, and one group of ``any_of``
    (when there is any). ``sustained`` and ``burst`` are the engine's to keep track of."""

    id: str
    category: Category
    severity: Severity
    response: str
    tags: tuple[str, ...]
    reason: str
    on: str
    match: tuple[Condition, ...] = ()
    any_of: tuple[tuple[Condition, ...], ...] = ()
    sustained: float | None = None
    burst: Burst | None = None
    line: int | None = None  # where the rule starts in its file
    programs: Globs | None = None  # every program glob, to name {program}
    interpreters: Globs | None = None
    placeholders: frozenset[str] = frozenset()

    def matches(self, event: Event | EventView) -> bool:
        """Do the rule's conditions hold for this one event (``sustained`` and ``burst``
        aside: those need the engine's memory)?"""
        if not isinstance(event, EventView):
            event = EventView(event, self.interpreters)
        for cond in self.match:
            if not cond.test(event):
                return False
        if not self.any_of:
            return True
        for group in self.any_of:
            for cond in group:
                if not cond.test(event):
                    break
            else:
                return True
        return False

    def describe(self, event: Event) -> str:
        """The rule's reason with ``{program}``, ``{host}``, ... filled from ``event``."""
        if not self.placeholders:
            return self.reason
        values: dict[str, Any] = {}
        for name in self.placeholders:
            if name == "program":
                value: Any = self._program(event)
            elif name == "host":
                value = event.get("host") or event.get("name")
            elif name == "name":
                value = event.get("name") or event.get("host")
            else:
                value = event.get(name)
            values[name] = "?" if value is None or value == "" else value
        return self.reason.format_map(values)

    def _program(self, event: Event) -> str | None:
        names = program_names(event, self.interpreters)
        if self.programs is not None:
            for name in names:
                if self.programs.match(name):
                    return name
        # What was run as typed (argv[0]) reads better than the binary it resolved to.
        if len(names) > 1 and event.get("exe") and event.get("argv"):
            return names[1]
        return names[0] if names else None


@dataclass(frozen=True, slots=True)
class DetectorRules:
    version: str
    rules: tuple[DetectorRule, ...]
    source: str  # the file the rules came from
    lists_version: str = ""
    interpreters: Globs | None = None  # whose first argument is the program ($shells ...)

    def get(self, rule_id: str) -> DetectorRule | None:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        return None

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rules)


def program_names(event: Event, interpreters: Globs | None = None) -> list[str]:
    """The names a process goes by: basename(exe), basename(argv[0]) and, when argv[0] is
    an interpreter, the script it runs (``#!/bin/sh`` scripts run as ``sh ./script``)."""
    out: list[str] = []
    exe = event.get("exe")
    if exe and isinstance(exe, str):
        out.append(exe.rpartition("/")[2])
    argv = event.get("argv")
    if argv:
        first = str(argv[0]).rpartition("/")[2].lstrip("-")  # a login shell is "-bash"
        out.append(first)
        if len(argv) > 1 and interpreters is not None and interpreters.match(first):
            script = str(argv[1])
            if script and not script.startswith("-"):
                out.append(script.rpartition("/")[2])
    return out


_UNSET: Any = object()
_NAME_CACHE = 4096


class EventView:
    """One event as conditions read it. What several rules derive from it (the program
    names, the normalised path, the address) is worked out once, when first asked."""

    __slots__ = ("_address", "_host", "_names", "_path", "event", "interpreters")

    def __init__(self, event: Event, interpreters: Globs | None = None) -> None:
        self.event = event
        self.interpreters = interpreters
        self._names: list[str] | None = None
        self._path: str | None = _UNSET
        self._host: str | None = _UNSET
        self._address: tuple[int, int] | None = _UNSET

    def names(self) -> list[str]:
        if self._names is None:
            self._names = program_names(self.event, self.interpreters)
        return self._names

    def path(self) -> str | None:
        if self._path is _UNSET:
            raw = self.event.get("path")
            self._path = posixpath.normpath(raw) if raw and isinstance(raw, str) else None
        return self._path

    def host(self) -> str | None:
        """The connection's host or the DNS name, lower-case, without a final dot."""
        if self._host is _UNSET:
            raw = self.event.get("host") or self.event.get("name")
            self._host = _norm_host(raw) if raw and isinstance(raw, str) else None
        return self._host

    def address(self) -> tuple[int, int] | None:
        if self._address is _UNSET:
            self._address = _address(self.event)
        return self._address


# --- condition predicates -----------------------------------------------------------


def _bool_test(key: str, want: bool) -> Test:
    def test(view: EventView) -> bool:
        value = view.event.get(key)
        return value is not None and bool(value) is want

    return test


def _above_test(key: str, limit: float) -> Test:
    def test(view: EventView) -> bool:
        value = view.event.get(key)
        return isinstance(value, int | float) and not isinstance(value, bool) and value > limit

    return test


def _globs_regex(globs: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(g) for g in globs))


def _program_test(globs: Globs) -> Test:
    # The same few names come back all the time (sh, python3, ls): remember the answers.
    known: dict[str, bool] = {}

    def test(view: EventView) -> bool:
        for name in view.names():
            hit = known.get(name)
            if hit is None:
                if len(known) >= _NAME_CACHE:
                    known.clear()
                hit = known[name] = globs.match(name)
            if hit:
                return True
        return False

    return test


def _args_test(rx: re.Pattern[str]) -> Test:
    search = rx.search

    def test(view: EventView) -> bool:
        argv = view.event.get("argv")
        if not argv:
            return False
        return any(search(str(a)) for a in argv[1:])

    return test


def _argv_test(rx: re.Pattern[str]) -> Test:
    search = rx.search

    def test(view: EventView) -> bool:
        argv = view.event.get("argv")
        if not argv:
            return False
        return search(" ".join(str(a) for a in argv)) is not None

    return test


def _args_any_test(tokens: frozenset[str], cluster: re.Pattern[str] | None) -> Test:
    def test(view: EventView) -> bool:
        argv = view.event.get("argv")
        if not argv:
            return False
        for arg in argv[1:]:
            if arg in tokens or (cluster is not None and cluster.match(str(arg))):
                return True
        return False

    return test


def _options_any_test(letters: frozenset[str], takes: frozenset[str]) -> Test:
    def test(view: EventView) -> bool:
        argv = view.event.get("argv") or []
        i = 1
        while i < len(argv):
            arg = str(argv[i])
            if arg == "--" or arg == "-" or not arg.startswith("-"):
                return False  # the first operand: what follows is not the program's
            if not arg.startswith("--"):
                for j, ch in enumerate(arg[1:], 1):
                    if ch in letters:
                        return True
                    if ch in takes:
                        if j == len(arg) - 1:
                            i += 1  # its value is the next argument
                        break  # the rest of this argument is its value
            i += 1
        return False

    return test


def _port_test(ports: frozenset[int]) -> Test:
    def test(view: EventView) -> bool:
        return view.event.get("port") in ports

    return test


def _norm_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _host_test(plain: frozenset[str], globs: re.Pattern[str] | None) -> Test:
    def test(view: EventView) -> bool:
        host = view.host()
        if host is None:
            return False
        if globs is not None and globs.match(host):
            return True
        if not plain:
            return False
        name = host
        while True:
            if name in plain:
                return True
            dot = name.find(".")
            if dot < 0:
                return False
            name = name[dot + 1 :]

    return test


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _parse_ip(text: str) -> tuple[int, int] | None:
    """(version, address as an int); an IPv4-mapped IPv6 address counts as IPv4.
    inet_pton: five times faster than ipaddress, and as strict."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    try:
        raw = socket.inet_pton(socket.AF_INET6, text.partition("%")[0])
    except OSError:
        return None
    if raw[:12] == _V4_MAPPED:
        return 4, int.from_bytes(raw[12:])
    return 6, int.from_bytes(raw)


def _address(event: Event) -> tuple[int, int] | None:
    """The connection's address, or its host when that is an IP literal."""
    for key in ("ip", "host"):
        raw = event.get(key)
        if raw and isinstance(raw, str):
            addr = _parse_ip(_norm_host(raw))
            if addr is not None:
                return addr
    return None


def _ip_test(nets: tuple[tuple[int, int, int], ...]) -> Test:
    """``nets``: (version, network, netmask) as ints."""

    def test(view: EventView) -> bool:
        addr = view.address()
        if addr is None:
            return False
        version, value = addr
        return any(v == version and value & mask == net for v, net, mask in nets)

    return test


def _path_regexes(globs: Sequence[str]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """Path globs (the gate's ``path_glob_regex``) as two regexes: one matched at the start
    of the path, and one for the ``*/name`` globs searched after any ``/`` (the path is
    normalised first), ten times faster than a leading ``.*`` for each."""
    anywhere = [g[2:] for g in globs if g.startswith("*/")]
    rooted = [f"(?:{path_glob_regex(g)})" for g in globs if not g.startswith("*/")]
    tails = "|".join(f"(?:{path_glob_regex(g)})" for g in anywhere)
    return (
        re.compile("|".join(rooted)) if rooted else None,
        re.compile(f"/(?:{tails})") if anywhere else None,
    )


def _path_test(rooted: re.Pattern[str] | None, anywhere: re.Pattern[str] | None) -> Test:
    def test(view: EventView) -> bool:
        path = view.path()
        if path is None:
            return False
        if rooted is not None and rooted.match(path) is not None:
            return True
        return anywhere is not None and anywhere.search(path) is not None

    return test


# --- compiling ----------------------------------------------------------------------


class _Bad(Exception):
    """A problem found while compiling, at a location in the document."""

    def __init__(self, message: str, loc: Loc) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc


class _RuleCompiler:
    def __init__(self, lists: Mapping[str, Any], file: str) -> None:
        self.lists = lists
        self.gate = _Compiler(lists, file)
        names = [str(x) for key in ("shells", "interpreters") for x in lists.get(key) or ()]
        self.interpreters = Globs.of(names) if names else None

    def _items(self, items: list[Any], loc: Loc, rule_id: str) -> list[str]:
        """Resolve ``$list`` references item by item, so an error names the item."""
        out: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                out.append(item)
                continue
            try:
                out.extend(self.gate.globs([item], rule_id, keypath(loc[2:])))
            except RuleError as exc:
                raise _Bad(exc.detail, (*loc, i)) from None
        return out

    def _regex(self, items: list[str], loc: Loc, rule_id: str) -> re.Pattern[str]:
        for i, item in enumerate(items):
            try:
                self.gate.regex(item, rule_id, keypath(loc[2:]))
            except RuleError as exc:
                raise _Bad(exc.detail, (*loc, i)) from None
        rx = self.gate.regex(items, rule_id, keypath(loc[2:]))
        if rx is None:
            raise _Bad("needs at least one regular expression", loc)
        return rx

    def condition(self, key: str, value: Any, loc: Loc, rule_id: str) -> Condition:
        if key in ("stdio_sockets", "allowed", "outlived_action", "granted"):
            return Condition(key, _bool_test(key, value), (value,))
        if key in ("cpu_above", "cpu_share_above", "util_above"):
            return Condition(key, _above_test(key.removesuffix("_above"), value), (value,))
        if isinstance(value, list) and not value:
            raise _Bad("needs at least one item", loc)
        if key == "program":
            globs = self._items(value, loc, rule_id)
            return Condition(key, _program_test(Globs.of(globs)), (*globs,))
        if key in ("args", "argv"):
            rx = self._regex(value, loc, rule_id)
            test = _args_test(rx) if key == "args" else _argv_test(rx)
            return Condition(key, test, (*value,))
        if key == "args_any":
            letters = "".join(t[1] for t in value if re.fullmatch(r"-[A-Za-z]", t))
            cluster = re.compile(f"-[A-Za-z]*[{letters}][A-Za-z]*$") if letters else None
            return Condition(key, _args_any_test(frozenset(value), cluster), (*value,))
        if key == "options_any":
            flags = [f for f in value.flags if re.fullmatch(r"-[A-Za-z]", f)]
            if len(flags) != len(value.flags):
                raise _Bad("flags must be single-letter options such as -R", (*loc, "flags"))
            wanted = frozenset(f[1] for f in flags)
            takes = frozenset(value.takes_value)
            return Condition(key, _options_any_test(wanted, takes), (*flags,))
        if key == "port":
            return self._port(value, loc, rule_id)
        if key == "host":
            names = [_norm_host(h) for h in self._items(value, loc, rule_id)]
            globs = [h for h in names if any(c in h for c in "*?[")]
            plain = frozenset(h for h in names if h not in globs)
            host_globs = _globs_regex(globs) if globs else None
            return Condition(key, _host_test(plain, host_globs), (*names,))
        if key == "ip":
            nets: list[tuple[int, int, int]] = []
            for i, item in enumerate(value):
                try:
                    net = ipaddress.ip_network(item)
                except ValueError as exc:
                    raise _Bad(f"bad CIDR: {exc}", (*loc, i)) from None
                nets.append((net.version, int(net.network_address), int(net.netmask)))
            return Condition(key, _ip_test(tuple(nets)), (*value,))
        if key == "path":
            globs = self._items(value, loc, rule_id)
            return Condition(key, _path_test(*_path_regexes(globs)), (*globs,))
        raise AssertionError(key)  # pragma: no cover - every _Cond field is handled

    def _port(self, value: list[Any], loc: Loc, rule_id: str) -> Condition:
        ports: list[int] = []
        for i, item in enumerate(value):
            if isinstance(item, str) and _LIST_REF.fullmatch(item):
                resolved: list[Any] = self._items([item], loc, rule_id)
            elif isinstance(item, int) and not isinstance(item, bool):
                resolved = [item]
            else:
                raise _Bad(f"a port must be a number or a $list (got {item!r})", (*loc, i))
            for port in resolved:
                try:
                    number = int(port)
                except ValueError:
                    raise _Bad(f"{item} holds {port!r}, not a port number", (*loc, i)) from None
                if not 0 < number < 65536:
                    raise _Bad(f"port {number} is out of range", (*loc, i))
                ports.append(number)
        return Condition("port", _port_test(frozenset(ports)), (*ports,))

    def conditions(self, cond: _Cond, on: str, loc: Loc, rule_id: str) -> tuple[Condition, ...]:
        out = []
        for key in _Cond.model_fields:  # in a fixed order: the first problem is reported
            value = getattr(cond, key)
            if value is None or key in ("sustained", "burst"):
                continue
            self._applies(key, on, (*loc, key))
            out.append(self.condition(key, value, (*loc, key), rule_id))
        return tuple(sorted(out, key=lambda c: _COST[c.key]))

    def _applies(self, key: str, on: str, loc: Loc) -> None:
        kinds = APPLIES[key]
        if on not in kinds:
            raise _Bad(
                f"{key} does not apply to {on} events (it applies to: {', '.join(sorted(kinds))})",
                loc,
            )

    def rule(self, r: _Rule, loc: Loc, line: int | None) -> DetectorRule:
        match = self.conditions(r.match, r.on, (*loc, "match"), r.id)
        groups = []
        for j, group in enumerate(r.any or ()):
            gloc: Loc = (*loc, "any", j)
            for key in ("sustained", "burst"):
                if getattr(group, key) is not None:
                    raise _Bad(f"{key} applies to the whole rule: put it under match", (*gloc, key))
            if not group.model_fields_set - {"sustained", "burst"}:
                raise _Bad("an empty condition mapping always holds", gloc)
            groups.append(self.conditions(group, r.on, gloc, r.id))
        sustained = r.match.sustained
        if sustained is not None:
            self._applies("sustained", r.on, (*loc, "match", "sustained"))
        burst = None
        if r.match.burst is not None:
            self._applies("burst", r.on, (*loc, "match", "burst"))
            if sustained is not None:
                raise _Bad("a rule cannot be both sustained and burst", (*loc, "match", "burst"))
            b = r.match.burst
            burst = Burst(b.count, float(b.within), b.distinct)
        if not match and not groups and burst is None:
            raise _Bad("a rule needs at least one condition (it would match every event)", loc)
        programs = [
            g
            for c in (*match, *(c for grp in groups for c in grp))
            if c.key == "program"
            for g in c.spec
        ]
        return DetectorRule(
            id=r.id,
            category=r.category,
            severity=r.severity,
            response=r.response,
            tags=tuple(r.tags),
            reason=r.reason,
            on=r.on,
            match=match,
            any_of=tuple(groups),
            sustained=float(sustained) if sustained is not None else None,
            burst=burst,
            line=line,
            programs=Globs.of(programs) if programs else None,
            interpreters=self.interpreters,
            placeholders=_placeholders(r.reason, (*loc, "reason")),
        )


def _placeholders(reason: str, loc: Loc) -> frozenset[str]:
    names = set()
    try:
        parsed = list(string.Formatter().parse(reason))
    except ValueError as exc:
        raise _Bad(f"bad placeholder in reason: {exc}", loc) from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            raise _Bad(f"unknown placeholder {{{field}}} in reason (known: {known})", loc)
        names.add(field)
    return frozenset(names)


# --- reading the file ---------------------------------------------------------------

_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(_BASE_LOADER):  # type: ignore[misc]
    """YAML 1.2 booleans: only true/false. In YAML 1.1 ``on``, ``off``, ``yes`` and ``no``
    are booleans too, and every rule has an ``on:`` key."""

    yaml_implicit_resolvers: ClassVar[dict[Any, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
        for first, resolvers in _BASE_LOADER.yaml_implicit_resolvers.items()
    }


_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _parse(text: str, display: str) -> _Doc:
    """Parse the rule file, keeping the line of every node (the policy loader's builder)."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        line = mark.line + 1 if mark else None
        raise RuleError(f"YAML syntax error: {what}", file=display, line=line) from None
    except yaml.YAMLError as exc:
        raise RuleError(f"YAML syntax error: {exc}", file=display) from None
    if root is None:
        raise RuleError("empty rule file (expected version: and rules:)", file=display)
    builder = _Builder(display)
    try:
        data = builder.build(root, (), None)
    except PolicyError as exc:
        raise RuleError(exc.detail, file=exc.file, line=exc.line, key=exc.key) from None
    if not isinstance(data, dict):
        raise RuleError("a rule file must be a mapping", file=display, line=1)
    return _Doc(display, data, builder.index)


def _models_at(loc: Loc) -> type[BaseModel] | None:
    """The model whose keys are valid at ``loc`` (for "unknown key (known: ...)")."""
    tp: Any = _File
    for part in loc:
        if tp is _File and part == "rules":
            tp = list[_Rule]
            continue
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        else:
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[-1] if args else None
    tp = _unwrap(tp)
    if typing.get_origin(tp) is list:
        tp = _unwrap(typing.get_args(tp)[0])
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _key(loc: Loc, data: Mapping[str, Any]) -> str:
    """``rules[3].match.args[0]`` as ``<rule id>.match.args[0]`` when the rule has an id."""
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules")
        rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        rule_id = rule.get("id") if isinstance(rule, dict) else None
        if isinstance(rule_id, str) and RULE_ID_RE.fullmatch(rule_id):
            rest = keypath(loc[2:])
            return f"{rule_id}.{rest}" if rest and not rest.startswith("[") else rule_id + rest
    return keypath(loc)


def _error(doc: _Doc, loc: Loc, message: str, kind: str = "value_error") -> RuleError:
    return RuleError(
        message, file=doc.display, line=_line_for(doc, loc, kind), key=_key(loc, doc.data) or None
    )


_PATTERN_WORDS = {
    "id": "must be lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
    "tags": "must be a MITRE ATT&CK technique id such as T1496 or T1021.004",
}


def _validation_error(exc: ValidationError, doc: _Doc, base: Loc) -> RuleError:
    problems = []
    for err in exc.errors(include_url=False):
        loc: Loc = (*base, *(p for p in err["loc"] if p != "[key]"))
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _models_at(loc[:-1])
            known = sorted(model.model_fields) if model else []
            what = "condition" if model is _Cond else "key"
            message = f"unknown {what} (known: {', '.join(known)})"
            message += _did_you_mean(str(loc[-1]), known)
        elif kind == "missing":
            message = "missing required key"
        elif kind == "string_pattern_mismatch" and len(loc) > 2 and loc[2] in _PATTERN_WORDS:
            message = f"{_PATTERN_WORDS[str(loc[2])]} (got {err.get('input')!r})"
        else:
            message = _rephrase(kind, err)
        problems.append((_line_for(doc, loc, kind), loc, kind, message))
    problems.sort(key=lambda p: (p[0] is None, p[0] or 0))
    _, loc, kind, message = problems[0]
    if len(problems) > 1:
        more = len(problems) - 1
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return _error(doc, loc, message, kind)


def compile_detectors(
    text: str, display: str, lists: Mapping[str, Any], lists_version: str = ""
) -> DetectorRules:
    """Compile a detector rule file's text; ``display`` is how errors name the file."""
    doc = _parse(text, display)
    try:
        top = _File.model_validate(doc.data)
    except ValidationError as exc:
        raise _validation_error(exc, doc, ()) from None
    compiler = _RuleCompiler(lists, display)
    rules: list[DetectorRule] = []
    first_line: dict[str, int | None] = {}
    for i, raw in enumerate(top.rules):
        loc: Loc = ("rules", i)
        try:
            r = _Rule.model_validate(raw)
        except ValidationError as exc:
            raise _validation_error(exc, doc, loc) from None
        line = _line_for(doc, loc, "value_error")
        if r.id in first_line:
            where = first_line[r.id]
            raise _error(doc, (*loc, "id"), f"duplicate rule id (first on line {where})")
        first_line[r.id] = line
        try:
            compiled = compiler.rule(r, loc, line)
        except _Bad as exc:
            raise _error(doc, exc.loc, exc.message) from None
        if r.enabled:
            rules.append(compiled)
    return DetectorRules(top.version, tuple(rules), display, lists_version, compiler.interpreters)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleError(f"no such {what} file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RuleError(f"cannot read {what} file: {why}", file=str(path)) from None


def _lists(text: str, display: str) -> tuple[dict[str, Any], str]:
    raw = _load_yaml(text, display)
    try:
        lf = _ListFile.model_validate(raw)
    except ValidationError as exc:
        raise _first_error(exc, display, raw) from None
    return dict(lf.lists), lf.version


@functools.cache
def _shipped_lists() -> tuple[dict[str, Any], str]:
    pkg = resources.files("corral.rules")
    return _lists(pkg.joinpath("lists.yaml").read_text(), str(pkg.joinpath("lists.yaml")))


@functools.cache
def _shipped() -> DetectorRules:
    pkg = resources.files("corral.rules").joinpath("detectors.yaml")
    lists, lists_version = _shipped_lists()
    return compile_detectors(pkg.read_text(), str(pkg), lists, lists_version)


def load_detectors(
    path: str | os.PathLike[str] | None = None,
    *,
    lists_path: str | os.PathLike[str] | None = None,
) -> DetectorRules:
    """Load detector rules; with no arguments, the ones shipped with corral (cached).
    ``lists_path`` replaces the shipped ``lists.yaml`` that ``$name`` refers to."""
    if path is None and lists_path is None:
        return _shipped()
    if lists_path is None:
        lists, lists_version = _shipped_lists()
    else:
        lp = Path(lists_path)
        lists, lists_version = _lists(_read(lp, "list"), str(lp))
    if path is None:
        pkg = resources.files("corral.rules").joinpath("detectors.yaml")
        return compile_detectors(pkg.read_text(), str(pkg), lists, lists_version)
    rp = Path(path)
    return compile_detectors(_read(rp, "rule"), str(rp), lists, lists_version)
