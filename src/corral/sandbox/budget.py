"""A policy's per-episode budgets (``resources.episode``), held by the sandbox.

A sandbox is one episode. Its CPU time is the cgroup's total since the sandbox started,
daemonised processes included, so a miner left in the background spends the budget as
surely as the command that started it; once spent, the episode ends like a detector's
``end-episode``. Its bytes through the egress proxy are the proxy's per-sandbox byte
budget, the smaller of ``network.max_bytes`` and ``resources.episode.egress_bytes``.
``max_steps`` and ``wall_time`` belong to whoever counts steps (``corral.rl.ShellEnv``,
a trainer): they truncate an episode, they do not punish it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.egress.decide import BYTES_KEY


@dataclass(frozen=True, slots=True)
class EpisodeBudget:
    cpu_seconds: float | None = None

    def spent(self, usage: Mapping[str, Any] | None) -> str | None:
        """Why the episode is over, given the sandbox's cgroup totals; None if it is not
        (or if there is no cgroup to measure: ``corral doctor`` says so)."""
        if self.cpu_seconds is None or not usage:
            return None
        used = usage.get("cpu_s")
        if isinstance(used, int | float) and used >= self.cpu_seconds:
            return (
                f"the episode's CPU budget is spent: {used:.1f} s of {self.cpu_seconds:g} s"
                " (resources.episode.cpu_seconds)"
            )
        return None


def with_egress_budget(network: Mapping[str, Any], egress_bytes: int | None) -> dict[str, Any]:
    """The network section the proxy enforces: its byte budget lowered to the episode's."""
    out = dict(network)
    if egress_bytes is None:
        return out
    current = out.get("max_bytes")
    if current is None or egress_bytes < current:
        out["max_bytes"] = egress_bytes
        out[BYTES_KEY] = "resources.episode.egress_bytes"
    return out
