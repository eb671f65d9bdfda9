"""The policy's network rules as the proxy applies them: a table of destinations."""

from __future__ import annotations

import pytest

from corral.egress.decide import EgressRules
from corral.policy import Policy

RULES = EgressRules.from_dict(
    {
        "mode": "proxy",
        "allow": [
            "pypi.org:443",
            "*.githubusercontent.com",
            "10.1.2.3:8080",
            "127.0.0.2:5000",
            "93.184.216.0/24:22",
        ],
        "deny": ["evil.githubusercontent.com", "169.254.0.0/16", "*:25"],
        "methods": ["GET", "HEAD", "CONNECT"],
    },
    "test-policy",
)


@pytest.mark.parametrize(
    ("host", "port", "method", "rule"),
    [
        ("pypi.org", 443, "CONNECT", "net-allow"),
        ("pypi.org", 80, "GET", "net-not-allowed"),  # the port is part of the rule
        ("raw.githubusercontent.com", 443, "CONNECT", "net-allow"),
        ("raw.githubusercontent.com", 25, "CONNECT", "net-deny-list"),  # deny wins
        ("evil.githubusercontent.com", 443, "CONNECT", "net-deny-list"),
        ("pypi.org", 443, "POST", "net-method"),
        ("example.com", 443, "CONNECT", "net-not-allowed"),
        ("10.1.2.3", 8080, "GET", "net-allow"),  # internal, but explicitly allowed
        ("10.1.2.3", 8081, "GET", "net-internal"),
        ("127.0.0.1", 5000, "GET", "net-internal"),  # the host's loopback
        ("127.0.0.2", 5000, "GET", "net-allow"),
        ("169.254.169.254", 80, "GET", "net-deny-list"),  # cloud metadata
        ("100.64.0.1", 80, "GET", "net-internal"),  # CGNAT
        ("224.0.0.1", 80, "GET", "net-internal"),  # multicast
        ("0.0.0.0", 80, "GET", "net-internal"),
        ("fe80::1", 80, "GET", "net-internal"),
        ("93.184.216.34", 22, None, "net-allow"),  # SOCKS: no method
        ("93.184.216.34", 23, None, "net-not-allowed"),  # a public IP needs a rule too
        ("8.8.8.8", 53, None, "net-not-allowed"),
    ],
)
def test_destinations(host: str, port: int, method: str | None, rule: str) -> None:
    d = RULES.check(host, port, method)
    assert d.rule == rule, d.reason
    assert d.allowed == (rule == "net-allow")
    assert f"{host}:{port}" in d.reason or host in d.reason


@pytest.mark.parametrize(
    ("host", "ip", "rule"),
    [
        ("raw.githubusercontent.com", "185.199.108.133", "net-allow"),
        # An allowed name that resolves inside: the classic rebinding target.
        ("raw.githubusercontent.com", "127.0.0.1", "net-internal"),
        ("raw.githubusercontent.com", "10.0.0.5", "net-internal"),
        ("raw.githubusercontent.com", "169.254.169.254", "net-deny-list"),
        ("raw.githubusercontent.com", "::1", "net-internal"),
    ],
)
def test_resolved_addresses_are_checked_again(host: str, ip: str, rule: str) -> None:
    d = RULES.check_address(host, ip, 443)
    assert d.rule == rule
    if not d.allowed:
        assert f"resolved to {ip}" in d.reason


def test_dns_answers_only_names_an_allow_entry_names() -> None:
    assert RULES.check_name("pypi.org").allowed
    assert RULES.check_name("objects.githubusercontent.com").allowed
    assert RULES.check_name("evil.githubusercontent.com").rule == "net-deny-list"
    assert RULES.check_name("example.com").rule == "net-not-allowed"


def test_strict_has_no_network_at_all() -> None:
    strict = EgressRules(Policy.load("strict").spec.network, "strict")
    assert strict.check("pypi.org", 443, "CONNECT").rule == "net-off"
    assert strict.check_name("pypi.org").rule == "net-off"


def test_the_swe_preset_reaches_package_indexes_only() -> None:
    swe = EgressRules(Policy.load("swe").spec.network, "swe")
    assert swe.check("pypi.org", 443, "CONNECT").allowed
    assert swe.check("files.pythonhosted.org", 443, "CONNECT").allowed
    assert not swe.check("pastebin.com", 443, "CONNECT").allowed
    assert swe.check("metadata.google.internal", 80, "GET").rule == "net-deny-list"
