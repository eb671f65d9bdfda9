"""A policy's network rules applied to what a connection or a DNS query asks for.

Checked twice for a connection: the name (or IP) and port the client asked for, before
anything is resolved; then every address it resolves to, because a name on the allowlist
may resolve to the host's loopback, a private network or the cloud metadata service. The
proxy then connects to the address it checked, never resolving again (no DNS rebinding).

Order, first match wins: no network at all; method not allowed; ``network.deny`` (deny
wins over allow); an internal address (loopback, private, CGNAT, link-local, multicast,
unspecified) without an explicit IP rule allowing it; ``network.allow``; otherwise not
on the allowlist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.model import Category
from corral.policy import netdest
from corral.policy.schema import HostPattern, NetworkSpec

# Beside a sandbox's network section: the policy key its byte budget came from, so the
# proxy names it to a refused client (sandbox/budget.py lowers it to an episode's).
BYTES_KEY = "max_bytes_key"


@dataclass(frozen=True, slots=True)
class EgressDecision:
    allowed: bool
    rule: str  # net-allow, net-off, net-method, net-deny-list, net-internal, net-not-allowed
    reason: str
    pattern: str | None = None  # the network.allow/deny entry that decided it
    category: Category | None = None


class EgressRules:
    """The ``network`` section of one policy, as the proxy applies it."""

    def __init__(self, spec: NetworkSpec, policy_name: str = "policy") -> None:
        self.spec = spec
        self.policy = policy_name
        self.allow = spec.allow_patterns
        self.deny = spec.deny_patterns
        self.methods = frozenset(spec.methods) if spec.methods is not None else None
        self._ip_deny = tuple(p for p in self.deny if p.network is not None)
        self._ip_allow = tuple(p for p in self.allow if p.network is not None)
        # Agents ask for the same few destinations over and over; the rules are fixed.
        self._checked: dict[tuple[str, int, str | None], EgressDecision] = {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], policy_name: str = "policy") -> EgressRules:
        return cls(NetworkSpec.model_validate(dict(data)), policy_name)

    def _deny(
        self, rule: str, reason: str, pattern: str | None = None, category: Category | None = None
    ) -> EgressDecision:
        return EgressDecision(False, rule, reason, pattern, category)

    def _first(self, patterns: tuple[HostPattern, ...], host: str, port: int | None) -> str | None:
        for p in patterns:
            if p.matches(host, port):
                return p.raw
        return None

    def check(self, host: str, port: int, method: str | None = None) -> EgressDecision:
        """May a client ask for ``host:port`` (``method``: the HTTP method, CONNECT for a
        tunnel, None for SOCKS)? ``host`` is a lower-case name or an IP literal."""
        key = (host, port, method)
        found = self._checked.get(key)
        if found is None:
            found = self._check(host, port, method)
            if len(self._checked) > 4096:
                self._checked.clear()
            self._checked[key] = found
        return found

    def _check(self, host: str, port: int, method: str | None) -> EgressDecision:
        where = f"{host}:{port}"
        if self.spec.mode != "proxy":
            return self._deny(
                "net-off", f"{where}: this policy has no network (network.mode: none)"
            )
        if method is not None and self.methods is not None and method not in self.methods:
            allowed = ", ".join(sorted(self.methods))
            return self._deny(
                "net-method", f"{method} {where}: method not allowed (network.methods: {allowed})"
            )
        denied = self._first(self.deny, host, port)
        if denied is not None:
            return self._deny(
                "net-deny-list", f"{where} is on the deny list (network.deny: {denied})", denied
            )
        if netdest.is_ip(host):
            return self.check_address(host, host, port)
        allowed_by = self._first(self.allow, host, port)
        if allowed_by is not None:
            return EgressDecision(True, "net-allow", f"{where} allowed by {allowed_by}", allowed_by)
        return self._deny("net-not-allowed", f"{where} is not on the allowlist (network.allow)")

    def check_address(self, host: str, ip: str, port: int) -> EgressDecision:
        """May the connection for ``host`` go to ``ip`` (one of its resolved addresses)?"""
        shown = ip if host == ip else f"{host} (resolved to {ip})"
        denied = self._first(self._ip_deny, ip, port)
        if denied is not None:
            return self._deny(
                "net-deny-list",
                f"{shown}:{port} is on the deny list (network.deny: {denied})",
                denied,
            )
        explicit = self._first(self._ip_allow, ip, port)
        cls = netdest.address_class(ip)
        if cls in ("loopback", "private", "link-local", "multicast", "unspecified"):
            if explicit is None:
                return self._deny(
                    "net-internal",
                    f"{shown}:{port} is an internal ({cls}) address; only an explicit IP rule"
                    " in network.allow reaches it",
                    category=Category.RECON,
                )
            return EgressDecision(
                True, "net-allow", f"{shown}:{port} allowed by {explicit}", explicit
            )
        if host == ip:  # an IP literal asked for directly must itself be allowed
            if explicit is None:
                return self._deny(
                    "net-not-allowed", f"{ip}:{port} is not on the allowlist (network.allow)"
                )
            return EgressDecision(True, "net-allow", f"{ip}:{port} allowed by {explicit}", explicit)
        return EgressDecision(True, "net-allow", f"{shown}:{port} is a public address")

    def check_name(self, name: str) -> EgressDecision:
        """May the sandbox's DNS stub answer for ``name``? Only names some allow entry
        could connect to (on any port), and none on the deny list."""
        if self.spec.mode != "proxy":
            return self._deny("net-off", f"{name}: this policy has no network (network.mode: none)")
        # Only a deny entry for every port (`evil.example`, not `*:25`) forbids a name.
        name_denials = tuple(p for p in self.deny if p.host is not None and p.port is None)
        denied = self._first(name_denials, name, None)
        if denied is not None:
            return self._deny(
                "net-deny-list", f"{name} is on the deny list (network.deny: {denied})", denied
            )
        allowed_by = self._first(tuple(p for p in self.allow if p.host is not None), name, None)
        if allowed_by is not None:
            return EgressDecision(True, "net-allow", f"{name} allowed by {allowed_by}", allowed_by)
        return self._deny("net-not-allowed", f"{name} is not on the allowlist (network.allow)")
