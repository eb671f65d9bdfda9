"""Destinations read from network tools' arguments (no sockets, no DNS)."""

from __future__ import annotations

import pytest

from corral.policy.netdest import address_class, from_argv


@pytest.mark.parametrize(
    ("program", "args", "expected"),
    [
        ("curl", ["-s", "https://pypi.org/simple/"], [("pypi.org", 443)]),
        ("curl", ["http://attacker.example:8080/x"], [("attacker.example", 8080)]),
        ("curl", ["-A", "agent", "-m3", "www.example.org"], [("www.example.org", None)]),
        ("ssh", ["-p", "2222", "ops@203.0.113.7"], [("203.0.113.7", None)]),
        ("ssh", ["-i", "key", "host.example.net", "uptime"], [("host.example.net", None)]),
        ("nc", ["-zv", "10.1.2.3", "6379"], [("10.1.2.3", 6379)]),
        ("nc", ["-l", "-p", "4444"], []),
        ("scp", ["f", "u@files.example:/tmp/"], [("files.example", None)]),
        ("openssl", ["s_client", "-connect", "evil.example:443"], [("evil.example", 443)]),
        ("socat", ["-", "tcp-connect:evil.example:4444"], [("evil.example", 4444)]),
        ("dig", ["@8.8.8.8", "example.org"], [("8.8.8.8", 53)]),
        ("whois", ["-h", "whois.example", "x"], [("whois.example", None)]),
        ("git", ["clone", "https://github.com/psf/requests.git"], [("github.com", 443)]),
    ],
)
def test_destinations(
    program: str, args: list[str], expected: list[tuple[str, int | None]]
) -> None:
    got = [(d.host, d.port) for d in from_argv(program, args)]
    for item in expected:
        assert item in got
    if not expected:
        assert got == []


@pytest.mark.parametrize(
    ("host", "cls"),
    [
        ("localhost", "loopback"),
        ("127.0.0.5", "loopback"),
        ("10.0.0.1", "private"),
        ("100.64.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("8.8.8.8", "public"),
        ("pypi.org", "name"),
    ],
)
def test_address_classes(host: str, cls: str) -> None:
    assert address_class(host) == cls
