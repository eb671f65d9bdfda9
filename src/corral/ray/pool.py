"""``SandboxPool``: corral's sandboxes across a Ray cluster, one corral host per node.

Each node runs one ``HostService`` actor, which is ``corral.host.Host`` itself: the same
sandboxes, policies, watcher, egress proxy and ledger as on one machine, with the node's
own ledger file. The driver places each new sandbox on a host by Ray resources
(``placement``), hands back a ``PoolSandbox`` with the local ``Sandbox``'s interface
(sync and async), and streams alerts back from every host as they happen.

A host that dies (its actor killed, its node lost) fails its sandboxes: calls on them
raise ``HostLost`` at once, never hang, and the pool starts a new host on the node if
the node is still there; that host removes what the dead one left (cgroups, workspaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from corral.errors import CorralError
from corral.host import EventFeed, ProfileRegistry
from corral.model import Alert, new_id
from corral.paths import corral_home
from corral.ray.placement import Capacity, NoRoom, Request, choose
from corral.ray.service import HostService
from corral.sandbox import Result, SandboxError
from corral.serve.timeline import LiveEvent

T = TypeVar("T")
_HostActor = ray.remote(HostService)


class PoolError(CorralError, RuntimeError):
    """The pool cannot do what was asked; the message says why."""


class PoolFull(PoolError):
    """No live host has room for the sandbox asked for."""


class HostLost(SandboxError):
    """The host running this sandbox died, and the sandbox with it."""


@dataclass
class _Host:
    name: str
    node_id: str
    actor: Any
    capacity: Capacity
    generation: int = 0
    error: str | None = None

    @property
    def alive(self) -> bool:
        return self.error is None


class PoolSandbox:
    """A sandbox on one of the pool's hosts, used as a local ``corral.Sandbox`` is."""

    def __init__(
        self, pool: SandboxPool, host: _Host, sid: str, backend_id: str, req: Request
    ) -> None:
        self._pool = pool
        self._host = host
        self.id = sid
        self.sandbox_id = backend_id  # the id in the host's ledger and cgroup names
        self.run_id = pool.run_id
        self.alerts: list[Alert] = []
        self.episode_ended: str | None = None
        self.stopped: str | None = None
        # What it reserves on its host: given back when it stops (its processes are
        # gone), though it stays known (its status and alerts) until it is closed.
        self._req: Request | None = req
        self._closed = False

    @property
    def host(self) -> str:
        return self._host.name

    @property
    def failed(self) -> str | None:
        """Why the sandbox is gone with its host (None while the host lives)."""
        return self._host.error

    # ---------------------------------------------------------------- sync
    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        step: int | None = None,
        episode: int | None = None,
        session: str | None = None,
    ) -> Result:
        cmd = command if isinstance(command, str) else list(command)
        r: Result = self._call(
            "run", cmd, timeout=timeout, step=step, episode=episode, session=session
        )
        return r

    def read_file(self, path: str) -> str:
        text: str = self._call("read_file", path)
        return text

    def write_file(self, path: str, text: str | bytes) -> None:
        self._call("write_file", path, text)

    def open_session(self, name: str, env: Mapping[str, str] | None = None) -> None:
        self._call("open_session", name, dict(env) if env else None)

    def close_session(self, name: str) -> None:
        self._call("close_session", name)

    def close(self) -> None:
        """Stop the sandbox and free its place; a sandbox whose host died is closed."""
        if self._closed:
            return
        try:
            if self.failed is None:
                self._call("delete")
        except HostLost:
            pass
        finally:
            self._pool._release(self)

    def __enter__(self) -> PoolSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- async
    async def arun(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None = None,
        step: int | None = None,
        episode: int | None = None,
        session: str | None = None,
    ) -> Result:
        cmd = command if isinstance(command, str) else list(command)
        r: Result = await self._acall(
            "run", cmd, timeout=timeout, step=step, episode=episode, session=session
        )
        return r

    async def aread_file(self, path: str) -> str:
        text: str = await self._acall("read_file", path)
        return text

    async def awrite_file(self, path: str, text: str | bytes) -> None:
        await self._acall("write_file", path, text)

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if self.failed is None:
                await self._acall("delete")
        except HostLost:
            pass
        finally:
            self._pool._release(self)

    async def __aenter__(self) -> PoolSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- plumbing
    def _check(self) -> None:
        if self.failed is not None:
            raise HostLost(f"sandbox {self.id}: {self.failed}")
        if self._closed:
            raise SandboxError(f"sandbox {self.id} was closed")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        ref = getattr(self._host.actor, method).remote(self.id, *args, **kwargs)
        with self._pool._translated(self):
            return self._after(ray.get(ref))

    async def _acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._check()
        ref = getattr(self._host.actor, method).remote(self.id, *args, **kwargs)
        with self._pool._translated(self):
            return self._after(await ref)

    def _after(self, value: T) -> T:
        if isinstance(value, Result) and value.episode_ended and self.episode_ended is None:
            self.episode_ended = "a detector ended the episode"
        return value

    def __repr__(self) -> str:
        state = self.failed or self.stopped or "running"
        return f"PoolSandbox({self.id!r} on {self.host}, {state})"


class SandboxPool:
    """Sandboxes across the nodes of a Ray cluster; see the module's doc."""

    def __init__(
        self,
        *,
        name: str = "corral",
        run_id: str | None = None,
        profiles: str | None = None,
        nodes: Sequence[str] | None = None,
        overcommit: float = 1.0,
        state_dir: str | Path | None = None,
        gate: bool = True,
        watch: bool = True,
        max_concurrency: int = 256,
        replace_dead: bool = True,
    ) -> None:
        """Needs Ray started (``ray.init``); starts one host on each node.

        ``nodes``: Ray node ids to use (default: every live node with CPUs).
        ``overcommit``: how many times a node's CPUs and memory sandboxes may reserve.
        ``state_dir``: where each node keeps its ledger and workspaces (default
        ``$CORRAL_HOME/cluster/NAME``, on each node's own disk).
        ``max_concurrency``: calls one host serves at once (Ray threads).
        ``replace_dead``: start a new host on a node whose host died."""
        if not ray.is_initialized():
            raise PoolError(
                "Ray is not running here: call ray.init() (or ray.init(address=...) to join "
                "a cluster) before making a SandboxPool"
            )
        if overcommit <= 0:
            raise PoolError(f"overcommit must be positive, not {overcommit}")
        self.name = name
        self.run_id = run_id or new_id()
        self.profiles = ProfileRegistry.load(profiles)
        self._profiles_path = profiles
        self.overcommit = overcommit
        self.state_dir = Path(state_dir) if state_dir else corral_home() / "cluster" / name
        self._gate, self._watch = gate, watch
        self._max_concurrency = max_concurrency
        self._replace_dead = replace_dead
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._sandboxes: dict[str, PoolSandbox] = {}
        self.alerts: list[Alert] = []
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._live: EventFeed[LiveEvent] = EventFeed()
        self._closed = threading.Event()
        found = [n for n in _nodes() if n.get("Alive")]
        chosen = [
            n
            for n in found
            if (n["NodeID"] in nodes if nodes is not None else n["Resources"].get("CPU", 0) > 0)
        ]
        if nodes is not None and len(chosen) != len(set(nodes)):
            missing = set(nodes) - {n["NodeID"] for n in chosen}
            raise PoolError(f"no live Ray node with id {', '.join(sorted(missing))}")
        if not chosen:
            raise PoolError("the Ray cluster has no live node with CPUs to put hosts on")
        for i, node in enumerate(chosen):
            host = self._start_host(f"host-{i}", node)
            self._hosts[host.name] = host
        # Each host's info() answers only once its Host is up: wait for all, fail clearly.
        try:
            ray.get([h.actor.info.remote() for h in self._hosts.values()], timeout=120)
        except (RayActorError, RayTaskError, GetTimeoutError) as e:
            self.close()
            raise PoolError(f"a host of the pool did not start: {e}") from e
        self._pollers = [
            threading.Thread(target=self._poll, args=(h.name,), daemon=True, name=f"pool-{h.name}")
            for h in self._hosts.values()
        ]
        for t in self._pollers:
            t.start()

    # ---------------------------------------------------------------- hosts
    def _start_host(self, name: str, node: Mapping[str, Any], generation: int = 0) -> _Host:
        node_id = node["NodeID"]
        res = node["Resources"]
        actor = _HostActor.options(
            num_cpus=0,
            max_concurrency=self._max_concurrency,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            name=f"{self.name}-{self.run_id}-{name}-{generation}",
        ).remote(
            name=name,
            root=str(self.state_dir / name),
            ledger=str(self.state_dir / f"{name}.db"),
            profiles=self._profiles_path,
            gate=self._gate,
            watch=self._watch,
        )
        cap = Capacity(
            name,
            float(res.get("CPU", 0)),
            int(res.get("memory", 0)),
            int(res.get("GPU", 0)),
        )
        return _Host(name, node_id, actor, cap, generation)

    def hosts(self) -> list[dict[str, Any]]:
        """Each host: name, node, whether it lives, and what its sandboxes reserve."""
        with self._lock:
            hosts = list(self._hosts.values())
        return [
            {
                "name": h.name,
                "node_id": h.node_id,
                "alive": h.alive,
                "error": h.error,
                "generation": h.generation,
                "sandboxes": sum(1 for s in self._sandboxes.values() if s._host is h),
                "cpus": h.capacity.cpus,
                "reserved_cpus": h.capacity.used_cpus,
                "memory": h.capacity.memory,
                "reserved_memory": h.capacity.used_memory,
            }
            for h in hosts
        ]

    def actor(self, host: str) -> Any:
        """The Ray actor of a host (for operators and tests: ``ray.kill`` it)."""
        return self._hosts[host].actor

    def ledgers(self) -> list[Path]:
        """Every host's ledger file (``corral log --cluster`` merges them)."""
        return sorted(self.state_dir.glob("host-*.db"))

    def metrics(self) -> dict[str, bytes]:
        """Each live host's Prometheus exposition, by host name."""
        with self._lock:
            hosts = [h for h in self._hosts.values() if h.alive]
        out = {}
        for h in hosts:
            with contextlib.suppress(RayActorError):
                out[h.name] = ray.get(h.actor.metrics.remote(), timeout=30)
        return out

    # ---------------------------------------------------------------- sandboxes
    def start(
        self,
        profile: str = "python:3.11",
        *,
        cpus: float | None = None,
        memory: int | None = None,
        labels: Mapping[str, str] | None = None,
        task: str | None = None,
        sandbox_id: str | None = None,
        idle_ttl: float | None = None,
        owner: str = "local",
    ) -> PoolSandbox:
        """A new sandbox from ``profile`` on the host with the most room for it.
        ``cpus``/``memory`` lower the profile's limits and are what it reserves.
        ``owner``: whose it is (the live view shows a user only their own)."""
        host, req, kwargs = self._place(
            profile, cpus, memory, labels, task, sandbox_id, idle_ttl, owner
        )
        try:
            info = ray.get(host.actor.start.remote(profile, **kwargs))
        except BaseException as e:
            self._unreserve(host, req)
            raise self._error(host, e) from None
        return self._adopt(host, info, req)

    async def astart(
        self,
        profile: str = "python:3.11",
        *,
        cpus: float | None = None,
        memory: int | None = None,
        labels: Mapping[str, str] | None = None,
        task: str | None = None,
        sandbox_id: str | None = None,
        idle_ttl: float | None = None,
        owner: str = "local",
    ) -> PoolSandbox:
        host, req, kwargs = self._place(
            profile, cpus, memory, labels, task, sandbox_id, idle_ttl, owner
        )
        try:
            info = await host.actor.start.remote(profile, **kwargs)
        except BaseException as e:
            self._unreserve(host, req)
            raise self._error(host, e) from None
        return self._adopt(host, info, req)

    def _place(
        self,
        profile: str,
        cpus: float | None,
        memory: int | None,
        labels: Mapping[str, str] | None,
        task: str | None,
        sandbox_id: str | None,
        idle_ttl: float | None,
        owner: str = "local",
    ) -> tuple[_Host, Request, dict[str, Any]]:
        if self._closed.is_set():
            raise PoolError("the pool is closed")
        req = self._request(profile, cpus, memory)
        sid = sandbox_id or new_id()[:16]
        with self._lock:
            try:
                name = choose([h.capacity for h in self._hosts.values()], req, self.overcommit)
            except NoRoom as e:
                raise PoolFull(str(e)) from None
            host = self._hosts[name]
            host.capacity = host.capacity.reserve(req)
        kwargs = {
            "owner": owner,
            "sandbox_id": sid,
            "labels": {**(labels or {}), "pool": self.name, "host": host.name},
            "task": task,
            "run_id": self.run_id,
            "idle_ttl": idle_ttl,
            "cpus": req.cpus,
            "memory": req.memory,
        }
        return host, req, kwargs

    def _request(self, profile: str, cpus: float | None, memory: int | None) -> Request:
        prof = self.profiles.get(profile)
        res = prof.policy.spec.resources
        cpu_cap = min(c for c in (prof.cpus, res.cpus) if c is not None)
        mem_cap = min(m for m in (prof.memory, res.memory) if m is not None)
        for what, value in (("cpus", cpus), ("memory", memory)):
            if value is not None and value <= 0:
                raise PoolError(f"{what} must be positive, not {value}")
        return Request(
            min(cpus, cpu_cap) if cpus else cpu_cap,
            min(memory, mem_cap) if memory else mem_cap,
            res.gpus,
        )

    def _adopt(self, host: _Host, info: Mapping[str, Any], req: Request) -> PoolSandbox:
        sb = PoolSandbox(self, host, info["id"], info["sandbox_id"], req)
        with self._lock:
            self._sandboxes[sb.id] = sb
        return sb

    def _unreserve(self, host: _Host, req: Request) -> None:
        with self._lock:
            if host.alive:  # a dead host's reservations went with it
                host.capacity = host.capacity.release(req)

    def _release(self, sb: PoolSandbox) -> None:
        """Forget a closed sandbox and give back what it reserved."""
        with self._lock:
            sb._closed = True
            self._sandboxes.pop(sb.id, None)
        self._free(sb)

    def _free(self, sb: PoolSandbox) -> None:
        """Give back what a sandbox reserved (once): it stopped, or it is closed."""
        with self._lock:
            req, sb._req = sb._req, None
        if req is not None:
            self._unreserve(sb._host, req)

    @property
    def sandboxes(self) -> list[PoolSandbox]:
        with self._lock:
            return list(self._sandboxes.values())

    # ---------------------------------------------------------------- errors
    @contextlib.contextmanager
    def _translated(self, sb: PoolSandbox) -> Any:
        try:
            yield
        except BaseException as e:
            raise self._error(sb._host, e, sb) from None

    def _error(self, host: _Host, e: BaseException, sb: PoolSandbox | None = None) -> BaseException:
        """What a failed remote call means here: the host's death as ``HostLost`` (and
        the host marked dead), a corral error as itself, anything else unchanged."""
        if isinstance(e, RayActorError):
            self._host_died(host, f"host {host.name} died: {_first_line(e)}")
            what = f"sandbox {sb.id}" if sb else "the sandbox"
            return HostLost(f"{what}: {host.error}")
        if isinstance(e, RayTaskError):
            cause = e.cause
            if isinstance(cause, CorralError | ValueError | TypeError | LookupError):
                return cause
        return e

    def _host_died(self, host: _Host, why: str) -> None:
        with self._lock:
            if host.error is not None or self._closed.is_set():
                return
            host.error = why
            host.capacity = Capacity(host.name, 0, 0, alive=False)
            lost = [s for s in self._sandboxes.values() if s._host is host]
        event = {"kind": "host lost", "host": host.name, "reason": why, "ts": time.time()}
        event["sandboxes"] = [s.id for s in lost]
        self._publish(event)
        if self._replace_dead:
            threading.Thread(target=self._replace, args=(host,), daemon=True).start()

    def _replace(self, dead: _Host) -> None:
        node = next((n for n in _nodes() if n["NodeID"] == dead.node_id and n.get("Alive")), None)
        if node is None or self._closed.is_set():
            return
        fresh = self._start_host(dead.name, node, dead.generation + 1)
        try:
            info = ray.get(fresh.actor.info.remote(), timeout=120)
        except (RayActorError, RayTaskError, GetTimeoutError):
            return
        with self._lock:
            if self._closed.is_set():
                return
            self._hosts[dead.name] = fresh
        self._publish(
            {
                "kind": "host replaced",
                "host": dead.name,
                "reaped": info["reaped"],
                "ts": time.time(),
            }
        )
        t = threading.Thread(target=self._poll, args=(dead.name,), daemon=True)
        t.start()
        self._pollers.append(t)

    # ---------------------------------------------------------------- the stream
    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` on a pool thread with each alert, sandbox start and stop,
        and host death as they happen (dicts; ``kind`` says which)."""
        self._listeners.append(listener)

    def _poll(self, name: str) -> None:
        host = self._hosts[name]
        cursor = 0
        while not self._closed.is_set() and host.alive:
            try:
                cursor, events = ray.get(host.actor.events.remote(cursor, 1.0), timeout=30)
            except RayActorError as e:
                self._host_died(host, f"host {host.name} died: {_first_line(e)}")
                return
            except GetTimeoutError:
                continue
            for event in events:
                self._on_event(event)

    def subscribe_live(self, listener: Callable[[LiveEvent], None]) -> Callable[[], None]:
        """The live view's lines (``corral.serve.timeline.LiveEvent``) from every host
        as they happen; returns the unsubscribe."""
        return self._live.subscribe(listener)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["kind"] == "live":
            self._live.publish(event["event"])
            return
        if event["kind"] == "alert":
            alert = Alert.from_dict(event["body"])
            with self._lock:
                self.alerts.append(alert)
                sb = self._sandboxes.get(event["sandbox"])
            if sb is not None:
                sb.alerts.append(alert)
        elif event["kind"] == "sandbox stopped":
            with self._lock:
                sb = self._sandboxes.get(event["sandbox"])
            if sb is not None:
                sb.stopped = str(event["body"].get("reason"))
                self._free(sb)  # stopped by its host (idle, a detector, a client)
        self._publish(event)

    def _publish(self, event: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener(event)

    # ---------------------------------------------------------------- the end
    def close(self) -> None:
        """Stop every sandbox and every host (each closes its ledger)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            hosts = list(self._hosts.values())
            self._sandboxes.clear()
        closing = [h.actor.close.remote() for h in hosts if h.alive]
        with contextlib.suppress(RayActorError, RayTaskError, GetTimeoutError):
            ray.get(closing, timeout=120)
        for h in hosts:
            with contextlib.suppress(Exception):
                ray.kill(h.actor)
        for t in getattr(self, "_pollers", []):
            t.join(timeout=5)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SandboxPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)


def _nodes() -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
