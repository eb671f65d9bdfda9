"""The policy schema on its own: value parsing, host patterns, strictness of the models."""

from __future__ import annotations

import ipaddress
import sys
import types
from typing import Any

import pytest
from pydantic import ValidationError

from corral import Policy
from corral.errors import PolicyError
from corral.model import Action, Category, Decision, Verdict
from corral.policy.schema import (
    CommandRule,
    HostPattern,
    NetworkSpec,
    PolicySpec,
    parse_duration,
    parse_host_pattern,
    parse_size,
    too_broad,
)

GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("4GiB", 4 * GiB),
        ("4gib", 4 * GiB),
        ("4G", 4 * GiB),
        ("4GB", 4 * GiB),
        ("512MiB", 512 * MiB),
        ("512 MiB", 512 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("10k", 10 * 1024),
        ("2T", 2 << 40),
        ("100", 100),
        ("100B", 100),
    ],
)
def test_parse_size(raw: Any, expected: int) -> None:
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["", "lots", "4XB", "4iB", "-1", -5, True, "4 G B", None, [1]])
def test_parse_size_rejects(raw: Any) -> None:
    with pytest.raises(ValueError, match=r"size|number"):
        parse_size(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("250ms", 0.25),
        ("2H", 7200.0),
    ],
)
def test_parse_duration(raw: Any, expected: float) -> None:
    assert parse_duration(raw) == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["", "soon", "30min", "1.5.3", "m30", 0, -3, "0s", False, None])
def test_parse_duration_rejects(raw: Any) -> None:
    with pytest.raises(ValueError, match=r"duration|number"):
        parse_duration(raw)


@pytest.mark.parametrize(
    ("raw", "host", "network", "port"),
    [
        ("pypi.org:443", "pypi.org", None, 443),
        ("PyPI.org", "pypi.org", None, None),
        ("*.githubusercontent.com", "*.githubusercontent.com", None, None),
        ("*:22", "*", None, 22),
        ("github.com:*", "github.com", None, None),
        ("10.0.0.0/8:5432", None, "10.0.0.0/8", 5432),
        ("192.168.1.10", None, "192.168.1.10/32", None),
        ("fe80::/10", None, "fe80::/10", None),
        ("[2001:db8::/32]:443", None, "2001:db8::/32", 443),
        ("[::1]", None, "::1/128", None),
    ],
)
def test_parse_host_pattern(
    raw: str, host: str | None, network: str | None, port: int | None
) -> None:
    pattern = parse_host_pattern(raw)
    assert isinstance(pattern, HostPattern)
    assert pattern.host == host
    assert pattern.network == (ipaddress.ip_network(network) if network else None)
    assert pattern.port == port


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "  ",
        "pypi .org",
        "pypi.org:0",
        "pypi.org:65536",
        "pypi.org:https",
        "10.0.0.0/33",
        "10.0.0.1/8",
        "999.1.1.1",
        "exa$mple.com",
        "a..b",
        ":443",
        "[::1",
    ],
)
def test_parse_host_pattern_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_host_pattern(raw)


@pytest.mark.parametrize(
    ("raw", "broad"),
    [
        ("*", True),
        ("*:*", True),
        ("*:443", True),
        ("*.com", True),
        ("*.io", True),
        ("*.dev", True),
        ("*.co.uk", True),
        ("foo*.com", True),
        ("*.herokuapp.com", True),
        ("0.0.0.0/0", True),
        ("::/0", True),
        ("*.githubusercontent.com:443", False),
        ("pypi.org:443", False),
        ("api.*.example.com", False),
        ("10.0.0.0/8", False),
        ("com", False),
    ],
)
def test_too_broad(raw: str, broad: bool) -> None:
    assert (too_broad(parse_host_pattern(raw)) is not None) is broad


def test_over_broad_only_refused_in_allow() -> None:
    spec = NetworkSpec(deny=["*:22", "0.0.0.0/0"])
    assert [p.port for p in spec.deny_patterns] == [22, None]
    with pytest.raises(ValidationError, match="too broad"):
        NetworkSpec(allow=["*:22"])


def test_network_exposes_typed_patterns() -> None:
    spec = NetworkSpec(mode="proxy", allow=["PyPI.org:443", "pypi.org:443", "10.1.0.0/16"])
    assert spec.allow == ("pypi.org:443", "10.1.0.0/16")  # normalized, duplicates dropped
    first, second = spec.allow_patterns
    assert (first.host, first.network, first.port) == ("pypi.org", None, 443)
    assert second.network == ipaddress.ip_network("10.1.0.0/16")


def test_minimal_policy_defaults() -> None:
    spec = PolicySpec.model_validate({"version": 1})
    assert spec.commands.default is Verdict.DENY
    assert spec.commands.threats is True
    assert spec.network.mode == "none"
    assert spec.filesystem.protected == (".git/hooks", ".git/config")
    assert spec.resources.memory == 4 * GiB
    assert spec.resources.wall_time == 1800.0
    assert spec.resources.gpus == 0
    assert spec.audit.on_flag is Verdict.ASK
    assert spec.detectors == {}


def test_builtin_protected_paths_stay() -> None:
    spec = PolicySpec.model_validate({"version": 1, "filesystem": {"protected": [".envrc"]}})
    assert spec.filesystem.protected == (".git/hooks", ".git/config", ".envrc")


def test_models_are_frozen_and_strict() -> None:
    spec = PolicySpec.model_validate({"version": 1})
    with pytest.raises(ValidationError):
        spec.version = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        PolicySpec.model_validate({"version": 1, "comands": {}})
    with pytest.raises(ValidationError):
        PolicySpec.model_validate({"version": 1, "commands": {"threats": "yes"}})


def test_rule_fields() -> None:
    rule = CommandRule.model_validate(
        {
            "id": "no-force-push",
            "program": "git",
            "argv": r"\bpush\b.*--force",
            "decision": "deny",
            "category": "destruction",
            "reason": "force-push rewrites shared history",
        }
    )
    assert rule.program == ("git",)
    assert rule.decision is Verdict.DENY
    assert rule.category is Category.DESTRUCTION
    pattern = rule.argv_pattern()
    assert pattern is not None and pattern.search("push origin --force")


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"id": "Bad Id", "argv": "x", "decision": "deny", "reason": "r"}, "invalid rule id"),
        ({"id": "a", "decision": "deny", "reason": "r"}, "needs program, argv or both"),
        ({"id": "a", "argv": "(", "decision": "deny", "reason": "r"}, "invalid regular expression"),
        ({"id": "a", "argv": "x", "decision": "block", "reason": "r"}, "decision"),
        ({"id": "a", "argv": "x", "decision": "deny", "reason": " "}, "reason"),
        (
            {"id": "a", "argv": "x", "decision": "deny", "reason": "r", "category": "evil"},
            "category",
        ),
    ],
)
def test_rule_rejects(rule: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        PolicySpec.model_validate({"version": 1, "commands": {"rules": [rule]}})


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("network", {"methods": ["get"]}),
        ("network", {"methods": ["TRACE"]}),
        ("network", {"max_connections": -1}),
        ("network", {"mode": "open"}),
        ("resources", {"cpus": 0}),
        ("resources", {"gpus": True}),
        ("resources", {"memory": 0}),
        ("tools", {"allow": ["no-slash"]}),
        ("audit", {"auditor": "magic"}),
        ("filesystem", {"hidden": [""]}),
        ("detectors", {"x": {"response": "explode"}}),
        ("detectors", {"Not An Id": {"enabled": False}}),
    ],
)
def test_section_rejects(section: str, value: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PolicySpec.model_validate({"version": 1, section: value})


def test_from_dict_errors_are_policy_errors() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_dict({"version": 1, "network": {"allow": ["*"]}}, source="inline")
    assert str(info.value).startswith("inline: network.allow[0]: '*' is too broad")


def test_hash_is_canonical_and_sensitive() -> None:
    a = Policy.from_dict({"version": 1, "resources": {"memory": "4GiB", "wall_time": "30m"}})
    b = Policy.from_dict({"resources": {"wall_time": 1800, "memory": 4 * GiB}, "version": 1})
    c = Policy.from_dict({"version": 1, "resources": {"memory": "8GiB"}})
    assert a.hash == b.hash
    assert a.hash != c.hash
    assert a.hash.startswith("sha256:") and len(a.hash) == len("sha256:") + 64


def test_check_delegates_to_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Policy] = []

    class FakeGate:
        def __init__(self, policy: Policy) -> None:
            made.append(policy)

        def check(self, command: str) -> Decision:
            return Decision(Verdict.DENY, "fake", None, command)

        def check_action(self, action: Action) -> Decision:
            return Decision(Verdict.ASK, "fake", None, action.payload["command"])

    fake = types.ModuleType("corral.policy.gate")
    fake.Gate = FakeGate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "corral.policy.gate", fake)
    policy = Policy.from_dict({"version": 1})
    assert policy.check("ls").reason == "ls"
    assert policy.check("pwd").reason == "pwd"
    assert policy.check_action(Action.shell("id")).verdict is Verdict.ASK
    assert made == [policy]  # the gate is built once
