"""Where a new sandbox goes: pure bookkeeping over the hosts' Ray resources, no Ray.

Each node's host reports the node's CPU, memory and GPU as Ray sees them. A sandbox
reserves what it asks for (by default its profile's limits) until it stops. A host takes
a sandbox only if the reservation fits in what is left (times ``overcommit``: rollout
sandboxes mostly sit waiting for the model, so clusters often pack more than their
cores), and among those that fit the one with the most left, so load spreads across
nodes instead of filling the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Request:
    """What one sandbox reserves."""

    cpus: float
    memory: int
    gpus: int = 0


@dataclass(frozen=True, slots=True)
class Capacity:
    """One host: the node's resources, what its sandboxes reserve, whether it lives."""

    host: str
    cpus: float
    memory: int
    gpus: int = 0
    used_cpus: float = 0.0
    used_memory: int = 0
    used_gpus: int = 0
    alive: bool = True

    def free(self, overcommit: float = 1.0) -> Request:
        return Request(
            self.cpus * overcommit - self.used_cpus,
            int(self.memory * overcommit) - self.used_memory,
            self.gpus - self.used_gpus,  # a GPU is never shared by overcommitting
        )

    def fits(self, req: Request, overcommit: float = 1.0) -> bool:
        free = self.free(overcommit)
        # A little slack so that 0.1 + 0.2 reservations do not miss by rounding.
        return (
            self.alive
            and req.cpus <= free.cpus + 1e-9
            and req.memory <= free.memory
            and req.gpus <= free.gpus
        )

    def reserve(self, req: Request) -> Capacity:
        return replace(
            self,
            used_cpus=self.used_cpus + req.cpus,
            used_memory=self.used_memory + req.memory,
            used_gpus=self.used_gpus + req.gpus,
        )

    def release(self, req: Request) -> Capacity:
        return replace(
            self,
            used_cpus=max(0.0, self.used_cpus - req.cpus),
            used_memory=max(0, self.used_memory - req.memory),
            used_gpus=max(0, self.used_gpus - req.gpus),
        )


class NoRoom(Exception):
    """No live host has room; the message says what was asked and what is free."""


def choose(hosts: Iterable[Capacity], req: Request, overcommit: float = 1.0) -> str:
    """The host for ``req``: of those it fits, the one with the most CPU left (then
    memory), by share of the node so a small node is not favoured for being empty."""
    hosts = list(hosts)
    fitting = [h for h in hosts if h.fits(req, overcommit)]
    if not fitting:
        raise NoRoom(_no_room(hosts, req, overcommit))

    def left(h: Capacity) -> tuple[float, float]:
        free = h.free(overcommit)
        return (
            (free.cpus - req.cpus) / max(h.cpus * overcommit, 1e-9),
            (free.memory - req.memory) / max(h.memory * overcommit, 1),
        )

    return max(fitting, key=left).host


def _no_room(hosts: list[Capacity], req: Request, overcommit: float) -> str:
    asked = f"{req.cpus:g} CPU, {req.memory / 2**30:.2f} GiB" + (
        f", {req.gpus} GPU" if req.gpus else ""
    )
    if not any(h.alive for h in hosts):
        return f"no sandbox of {asked}: no host is alive in the pool"
    free = "; ".join(
        f"{h.host}: {f.cpus:g} CPU, {f.memory / 2**30:.2f} GiB, {f.gpus} GPU free"
        for h in hosts
        if h.alive
        for f in (h.free(overcommit),)
    )
    return (
        f"no host has room for a sandbox of {asked} ({free}); stop sandboxes, ask for "
        "less (cpus=, memory=), add nodes, or raise the pool's overcommit"
    )
