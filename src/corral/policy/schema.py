"""The policy schema: pydantic models for one policy document (``version: 1``).

Every model forbids unknown keys and is frozen: a misspelled key in a security
configuration must be an error, never a silently ignored line, and a policy that was
checked must not change afterwards. Lists are tuples for the same reason.

Sizes and durations are parsed here to plain numbers (int bytes, float seconds) so that
every consumer sees one unit. Host patterns stay strings in the model, so the resolved
policy dumps back to the YAML a user writes; ``NetworkSpec.allow_patterns`` gives the
parsed form an egress proxy needs.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from corral.model import Category, Verdict

SUPPORTED_VERSIONS = (1,)

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT"]
NetworkMode = Literal["none", "proxy"]
Auditor = Literal["none", "rules", "llm", "ensemble"]
Response = Literal["alert", "kill-process", "kill-sandbox", "freeze", "end-episode"]

ALWAYS_PROTECTED = (".git/hooks", ".git/config")
RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _rule_id(value: str) -> str:
    if not RULE_ID_RE.fullmatch(value):
        raise ValueError(f"invalid rule id {value!r}: use [a-z0-9][a-z0-9._-]*")
    return value


# Suffixes under which anyone can obtain a name. A wildcard whose fixed part is one of
# these (or a bare TLD) lets an agent reach hosts an attacker registers, i.e. it is an
# exfiltration channel, so it is refused in allow lists. Deliberately small; extend it
# when a new free-subdomain service shows up in practice.
PUBLIC_SUFFIXES = frozenset(
    """
    co.uk org.uk ac.uk gov.uk me.uk ltd.uk plc.uk net.uk
    com.au net.au org.au co.nz co.jp ne.jp or.jp co.kr co.in co.za
    com.br com.cn net.cn org.cn com.mx com.tw com.hk com.sg com.tr com.ar
    github.io gitlab.io herokuapp.com appspot.com blogspot.com web.app firebaseapp.com
    pages.dev workers.dev vercel.app netlify.app ngrok.io ngrok-free.app ngrok.app
    trycloudflare.com cloudfront.net s3.amazonaws.com amazonaws.com azurewebsites.net
    blob.core.windows.net glitch.me repl.co onrender.com fly.dev loca.lt serveo.net
    """.split()  # noqa: SIM905 - a word list reads better than 50 quoted strings
)


class SpecError(ValueError):
    """A validation error that knows a more precise location below the validated field.

    pydantic only reports the field a validator is attached to; the loader appends
    ``subloc`` so that, say, a duplicate rule id points at that rule's ``id`` line.
    """

    def __init__(self, message: str, subloc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.subloc = subloc


def _reject_bool(value: Any) -> Any:
    # YAML turns yes/no/on/off into booleans; pydantic would then quietly read them as 1/0.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``"500MiB"``, ``"4g"``, ``"10GB"``.

    K/M/G/T are binary multiples with or without the ``i`` (as docker reads them): these
    are resource limits, where a 7% difference between readings is not worth a trap.
    """
    value = _reject_bool(value)
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
        if m.group(3) and not m.group(2):
            raise ValueError(f"invalid size {value!r}")
        number = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"invalid size {value!r} (expected bytes or e.g. '512MiB', '4GiB')")
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"invalid size {value!r}: must not be negative")
    return round(number)


_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"``."""
    value = _reject_bool(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text, seconds, pos = value.strip(), 0.0, 0
        while pos < len(text):
            m = _DURATION_PART_RE.match(text, pos)
            if not m or (not m.group(2) and m.end() != len(text)):
                raise ValueError(f"invalid duration {value!r} (expected e.g. '90s', '30m', '2h')")
            seconds += float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
            pos = m.end()
            while pos < len(text) and text[pos] == " ":
                pos += 1
    else:
        raise ValueError(f"invalid duration {value!r} (expected seconds or e.g. '30m')")
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be positive")
    return seconds


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Count = Annotated[int, BeforeValidator(_reject_bool), Field(ge=0)]


def _one_or_many(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


def _nonempty_strings(values: tuple[str, ...], what: str) -> tuple[str, ...]:
    for i, item in enumerate(values):
        if not item.strip():
            raise SpecError(f"empty {what}", (i,))
        if "\0" in item:
            raise SpecError(f"{what} contains a NUL byte", (i,))
    return values


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- network host patterns ---------------------------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST_RE = re.compile(r"[a-z0-9*?_-]+(\.[a-z0-9*?_-]+)*\.?")


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One parsed ``network.allow``/``deny`` entry: exactly one of ``host`` (an fnmatch
    glob on the lower-cased host name) or ``network`` (a CIDR block; a bare IP is a
    /32 or /128) is set. ``port`` None means any port."""

    raw: str
    host: str | None
    network: IPNetwork | None
    port: int | None

    def matches(self, host: str, port: int | None) -> bool:
        """Does ``host`` (a lower-case name or an IP literal) on ``port`` (None: any)
        fall under this pattern?"""
        if self.port is not None and port is not None and self.port != port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        return self.host is not None and fnmatch.fnmatchcase(host, self.host)


@functools.lru_cache(maxsize=4096)
def parse_host_pattern(raw: str) -> HostPattern:
    """Parse ``host[:port]``; IPv6 with a port goes in brackets: ``[2001:db8::/32]:443``."""
    text = raw.strip()
    if not text:
        raise ValueError("empty host pattern")
    if any(c.isspace() for c in text):
        raise ValueError(f"{raw!r}: host pattern contains whitespace")
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            raise ValueError(f"{raw!r}: malformed bracketed IPv6 pattern")
        host, port_text = text[1:end], (text[end + 2 :] if end + 1 < len(text) else None)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    port: int | None = None
    if port_text is not None and port_text != "*":
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{raw!r}: port must be 1-65535 or *, got {port_text!r}")
        port = int(port_text)
    if not host:
        raise ValueError(f"{raw!r}: missing host")
    if "/" in host or ":" in host or _looks_numeric(host):
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            raise ValueError(f"{raw!r}: invalid IP address or CIDR block ({exc})") from None
        return HostPattern(raw, None, network, port)
    host = host.lower()
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"{raw!r}: invalid host name or glob")
    return HostPattern(raw, host.rstrip("."), None, port)


def _looks_numeric(host: str) -> bool:
    return all(part.isdigit() for part in host.split("."))


def too_broad(pattern: HostPattern) -> str | None:
    """Why an allow entry would let traffic reach hosts nobody vetted, or None."""
    if pattern.network is not None:
        if pattern.network.prefixlen == 0:
            return "matches every address"
        return None
    labels = (pattern.host or "").split(".")
    wild = [i for i, label in enumerate(labels) if "*" in label or "?" in label]
    if not wild:
        return None
    fixed = ".".join(labels[wild[-1] + 1 :])
    if not fixed:
        return "matches every host"
    if "." not in fixed or fixed in PUBLIC_SUFFIXES:
        return f"its fixed part {fixed!r} is a public suffix anyone can register names under"
    return None


def _check_hosts(values: tuple[str, ...], *, allow: bool) -> tuple[str, ...]:
    out: list[str] = []
    for i, raw in enumerate(values):
        try:
            pattern = parse_host_pattern(raw)
        except ValueError as exc:
            raise SpecError(str(exc), (i,)) from None
        if allow and (why := too_broad(pattern)):
            raise SpecError(f"{raw!r} is too broad: {why}; list the hosts you need", (i,))
        norm = raw.strip() if pattern.host is None else raw.strip().lower()
        if norm not in out:
            out.append(norm)
    return tuple(out)


# --- sections ----------------------------------------------------------------------


class CommandRule(_Model):
    """An argv rule; the gate evaluates every rule and takes the strictest match."""

    id: str
    program: tuple[str, ...] | None = None
    argv: str | None = None
    decision: Verdict
    category: Category | None = None
    reason: str

    @field_validator("program", mode="before")
    @classmethod
    def _norm_program(cls, value: Any) -> Any:
        return _one_or_many(value)

    _check_id = field_validator("id")(_rule_id)

    @field_validator("program")
    @classmethod
    def _check_program(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else _nonempty_strings(value, "program glob")

    @field_validator("argv")
    @classmethod
    def _check_argv(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @field_validator("reason")
    @classmethod
    def _check_reason(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("reason must not be empty: the agent reads it")
        return value

    def argv_pattern(self) -> re.Pattern[str] | None:
        return None if self.argv is None else re.compile(self.argv)


class CommandsSpec(_Model):
    default: Verdict = Verdict.DENY
    allow: tuple[str, ...] = ()
    ask: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    rules: tuple[CommandRule, ...] = ()
    threats: StrictBool = True
    disable: tuple[str, ...] = ()

    @field_validator("allow", "ask", "deny")
    @classmethod
    def _check_globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _nonempty_strings(value, "program glob")

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, value: tuple[CommandRule, ...]) -> tuple[CommandRule, ...]:
        seen: set[str] = set()
        for i, rule in enumerate(value):
            if rule.id in seen:
                raise SpecError(f"duplicate rule id {rule.id!r}", (i, "id"))
            seen.add(rule.id)
        for i, rule in enumerate(value):
            if rule.program is None and rule.argv is None:
                raise SpecError(f"rule {rule.id!r} needs program, argv or both", (i,))
        return value


def _check_tool_globs(value: tuple[str, ...]) -> tuple[str, ...]:
    for i, item in enumerate(value):
        server, sep, tool = item.partition("/")
        if not (sep and server.strip() and tool.strip()):
            raise SpecError(f"{item!r}: expected 'server/tool' (globs allowed)", (i,))
        if "\0" in item:
            raise SpecError(f"{item!r} contains a NUL byte", (i,))
    return value


class ArgConstraint(_Model):
    """What the values at one JSON path of a tool call's arguments must be. Every key
    given applies; a value that fails one is a violation of the rule."""

    # A filesystem path the policy lets the agent read (or write): inside the workspace
    # (or a listed read_only/writable path), not hidden; for write, not read-only or
    # protected.
    path: Literal["read", "write"] | None = None
    # A URL or host[:port] the network section lets the agent reach.
    url: StrictBool = False
    # A shell command the commands section allows (the shell gate judges it).
    command: StrictBool = False
    # A regular expression the whole value must match, or one it must not contain.
    pattern: str | None = None
    not_pattern: str | None = None
    # The path must name at least one value (absent is a violation).
    required: StrictBool = False

    @field_validator("pattern", "not_pattern")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _says_something(self) -> ArgConstraint:
        if (
            not (self.path or self.url or self.command or self.pattern or self.not_pattern)
            and not self.required
        ):
            raise ValueError(
                "a constraint needs at least one of path, url, command, pattern, "
                "not_pattern, required"
            )
        return self


class ToolRule(_Model):
    """Constraints on the arguments of the tools ``tool`` names. A call that violates
    one gets ``decision``; a call that satisfies all is left to the allow/ask/deny
    lists. ``schema`` is a JSON Schema the whole arguments object must validate
    against."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    id: str
    tool: tuple[str, ...]
    args: dict[str, ArgConstraint] = Field(default_factory=dict)
    # "schema" is a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    decision: Verdict = Verdict.DENY
    category: Category | None = None
    reason: str | None = None

    @field_validator("decision")
    @classmethod
    def _check_decision(cls, value: Verdict) -> Verdict:
        if value is Verdict.ALLOW:
            raise ValueError(
                "must be deny or ask: it is what a call that breaks the rule gets "
                "(allow a tool with tools.allow)"
            )
        return value

    @field_validator("tool", mode="before")
    @classmethod
    def _norm_tool(cls, value: Any) -> Any:
        return _one_or_many(value)

    _check_id = field_validator("id")(_rule_id)

    @field_validator("tool")
    @classmethod
    def _check_tool(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one 'server/tool' glob")
        return _check_tool_globs(value)

    @field_validator("args")
    @classmethod
    def _check_args(cls, value: dict[str, ArgConstraint]) -> dict[str, ArgConstraint]:
        from corral.policy.jsonpath import compile_path

        for key in value:
            try:
                compile_path(key)
            except ValueError as exc:
                raise SpecError(str(exc), (key,)) from None
        return value

    @field_validator("json_schema")
    @classmethod
    def _check_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            # Through importlib: jsonschema ships no type information, and only policies
            # with a schema rule pay for importing it.
            jsonschema: Any = importlib.import_module("jsonschema")
            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.exceptions.SchemaError as exc:
                where = "".join(f"[{p!r}]" for p in exc.absolute_path)
                raise SpecError(
                    f"not a valid JSON Schema{' at ' + where if where else ''}: {exc.message}"
                ) from None
        return value

    @field_validator("reason")
    @classmethod
    def _check_reason(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("reason must not be empty: the agent reads it")
        return value

    @model_validator(mode="after")
    def _constrains_something(self) -> ToolRule:
        if not self.args and self.json_schema is None:
            raise ValueError(f"rule {self.id!r} needs args, schema or both")
        return self


class ToolsSpec(_Model):
    """Tool calls by ``server/tool`` name (globs). Deny wins, then ask, then allow, then
    ``default``; ``rules`` constrain the arguments of the calls they name."""

    default: Verdict = Verdict.DENY
    allow: tuple[str, ...] = ()
    ask: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    rules: tuple[ToolRule, ...] = ()

    @field_validator("allow", "ask", "deny")
    @classmethod
    def _check_tools(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_tool_globs(value)

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, value: tuple[ToolRule, ...]) -> tuple[ToolRule, ...]:
        seen: set[str] = set()
        for i, rule in enumerate(value):
            if rule.id in seen:
                raise SpecError(f"duplicate rule id {rule.id!r}", (i, "id"))
            seen.add(rule.id)
        return value


class FilesystemSpec(_Model):
    workspace: str = "."
    read_only: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    # Files the host runs later (git hooks, git config aliases): writing them would let
    # the agent execute code outside the sandbox, so they are read-only by default.
    protected: tuple[str, ...] = ALWAYS_PROTECTED

    @field_validator("workspace")
    @classmethod
    def _check_workspace(cls, value: str) -> str:
        return _nonempty_strings((value,), "workspace path")[0]

    @field_validator("read_only", "hidden", "writable", "protected")
    @classmethod
    def _check_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _nonempty_strings(value, "path")

    @field_validator("protected")
    @classmethod
    def _keep_builtin_protected(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Listing one's own protected files must not quietly unprotect git hooks; the
        # deliberate way to do that is to list them in writable.
        return (*ALWAYS_PROTECTED, *(p for p in value if p not in ALWAYS_PROTECTED))


class NetworkSpec(_Model):
    mode: NetworkMode = "none"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    methods: tuple[HttpMethod, ...] | None = None
    max_bytes: Size | None = None
    max_connections: Count | None = None

    @field_validator("allow")
    @classmethod
    def _check_allow(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_hosts(value, allow=True)

    @field_validator("deny")
    @classmethod
    def _check_deny(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_hosts(value, allow=False)

    @property
    def allow_patterns(self) -> tuple[HostPattern, ...]:
        return tuple(parse_host_pattern(p) for p in self.allow)

    @property
    def deny_patterns(self) -> tuple[HostPattern, ...]:
        return tuple(parse_host_pattern(p) for p in self.deny)


class EpisodeSpec(_Model):
    max_steps: Count | None = None
    wall_time: Duration | None = None
    cpu_seconds: Duration | None = None
    egress_bytes: Size | None = None


class ResourcesSpec(_Model):
    cpus: Annotated[float, BeforeValidator(_reject_bool), Field(gt=0)] = 2.0
    memory: Annotated[Size, Field(gt=0)] = 4 << 30
    pids: Annotated[int, BeforeValidator(_reject_bool), Field(gt=0)] = 512
    wall_time: Duration = 1800.0
    disk: Annotated[Size, Field(gt=0)] = 10 << 30
    tmp_size: Size = 512 << 20
    gpus: Count = 0
    episode: EpisodeSpec = EpisodeSpec()


class DetectorOverride(_Model):
    response: Response | None = None
    enabled: StrictBool = True


class LLMAuditSpec(_Model):
    """An OpenAI-compatible chat-completions endpoint. ``url`` and ``model`` may be left
    out here and given by $CORRAL_AUDIT_URL / $CORRAL_AUDIT_MODEL (or flags) instead; the
    key is read from the environment variable ``api_key_env`` names, never from the file."""

    url: str | None = None
    model: str | None = None
    api_key_env: str = "CORRAL_AUDIT_API_KEY"
    timeout: Annotated[Duration, Field(gt=0)] = 20.0
    retries: Count = 2
    failure_mode: Literal["deny", "ask"] = "ask"


class AuditSpec(_Model):
    """``auditor``: who reviews actions (``rules`` is embedded and cheap; ``llm`` asks a
    model; ``ensemble`` asks both and combines by ``aggregate``). ``on_flag``: what a
    flagged action becomes in a sandbox (deny, or ask: held for a person)."""

    auditor: Auditor = "none"
    on_flag: Verdict = Verdict.ASK
    aggregate: Literal["max", "mean", "vote"] = "max"
    llm: LLMAuditSpec = LLMAuditSpec()


class PolicySpec(_Model):
    """One policy document, or the resolved result of a chain of ``extends``."""

    version: int
    name: str | None = None
    description: str | None = None
    extends: tuple[str, ...] | None = None
    commands: CommandsSpec = CommandsSpec()
    tools: ToolsSpec = ToolsSpec()
    filesystem: FilesystemSpec = FilesystemSpec()
    network: NetworkSpec = NetworkSpec()
    resources: ResourcesSpec = ResourcesSpec()
    detectors: dict[str, DetectorOverride] = Field(default_factory=dict)
    audit: AuditSpec = AuditSpec()

    @field_validator("extends", mode="before")
    @classmethod
    def _norm_extends(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("version", mode="before")
    @classmethod
    def _check_version(cls, value: Any) -> int:
        if isinstance(value, bool) or value not in SUPPORTED_VERSIONS:
            supported = ", ".join(map(str, SUPPORTED_VERSIONS))
            raise ValueError(f"unsupported policy version {value!r} (supported: {supported})")
        return int(value)

    @field_validator("extends")
    @classmethod
    def _check_extends(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else _nonempty_strings(value, "extends entry")

    @field_validator("detectors")
    @classmethod
    def _check_detector_ids(cls, value: dict[str, DetectorOverride]) -> dict[str, Any]:
        for key in value:
            if not RULE_ID_RE.fullmatch(key):
                raise SpecError(f"invalid detector rule id {key!r}", (key,))
        return value
