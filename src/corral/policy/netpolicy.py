"""The network section of a policy, applied to a destination.

Shared by the gate (destinations read from a command's arguments) and, later, the egress
proxy (destinations a connection asks for): one set of rules, one set of reasons.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from corral.model import Category, Verdict
from corral.policy import netdest
from corral.policy.matching import Finding, InvocationView
from corral.policy.rules import NetTool
from corral.policy.schema import NetworkSpec


class NetworkRules:
    """Decides whether a program may reach a host:port under one policy."""

    def __init__(
        self, spec: NetworkSpec, metadata_hosts: frozenset[str], tools: Mapping[str, NetTool]
    ) -> None:
        self.mode = spec.mode
        self.allow = spec.allow_patterns
        self.deny = spec.deny_patterns
        self.metadata_hosts = metadata_hosts
        self.tools = tools

    def judge_invocation(self, view: InvocationView) -> Iterator[Finding]:
        """Findings for every destination a network tool's arguments name."""
        inv = view.inv
        tool = self.tools[inv.program]
        dests = netdest.from_argv(inv.program, view.args)
        direction = tool.direction
        if (
            any(p.search(a) for p in tool.upload for a in view.args)
            or any(r.op == "<" for r in inv.redirects)
            or (inv.pipe_index or 0) > 0
        ):
            direction = Category.EXFILTRATION
        elif any(
            r.op in (">", ">>", "&>")
            and r.target not in ("/dev/null", "")
            and not r.target.isdigit()
            for r in inv.redirects
        ) or any(a in ("-o", "-O", "--output", "--output-document") for a in view.args):
            direction = Category.INGRESS
        for d in dests:
            f = self.judge_destination(inv.program, d, direction)
            if f is not None:
                yield f

    def judge_destination(
        self, program: str, d: netdest.Destination, direction: Category
    ) -> Finding | None:
        where = f"{d.host}:{d.port}" if d.port else d.host
        if d.host in self.metadata_hosts:
            return Finding(
                Verdict.DENY,
                "net-metadata",
                Category.CREDENTIAL_ACCESS,
                f"{program} would reach the cloud metadata service ({where}), which hands out credentials",
            )
        cls = netdest.address_class(d.host)
        if cls == "loopback":
            return None
        explicit = any(
            p.matches(d.host, d.port)
            for p in self.allow
            if p.network is not None or p.host == d.host
        )
        if cls in ("private", "link-local", "multicast", "unspecified") and not explicit:
            return Finding(
                Verdict.DENY,
                "net-internal",
                Category.RECON,
                f"{program} would reach {where}, an internal ({cls}) address; only explicit IP rules allow that",
            )
        if any(p.matches(d.host, d.port) for p in self.deny):
            return Finding(
                Verdict.DENY,
                "net-deny-list",
                direction,
                f"{program} would reach {where}, which network.deny forbids",
            )
        if self.mode == "none":
            return Finding(
                Verdict.DENY,
                "net-off",
                direction,
                f"{program} would reach {where}, but this policy has no network (network.mode: none)",
            )
        if any(p.matches(d.host, d.port) for p in self.allow):
            return None
        return Finding(
            Verdict.DENY,
            "net-not-allowed",
            direction,
            f"{program} would reach {where}, which is not on the network allowlist (network.allow)",
        )
