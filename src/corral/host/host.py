"""The host: one per machine, owning the sandboxes that wrappers hand out.

``corral serve`` (ROCK's protocol over HTTP), and later an MCP server and Ray actors, are
thin layers over this class: they authenticate, translate and call it. The host owns the
parts that are shared (the ledger, the watcher, the egress proxy through the backend) and
a table of its sandboxes with who owns each, their labels and when each was last used, so
that an idle sandbox is stopped after its time to live and one user never reaches
another's sandbox.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import CorralError
from corral.host import orphans
from corral.host.events import STARTED, STOPPED, EventFeed, HostEvent, Listener
from corral.host.profiles import Profile, ProfileRegistry
from corral.ledger import LabelledLedger, Ledger
from corral.model import new_id
from corral.paths import corral_home, default_ledger_path
from corral.policy import Policy
from corral.sandbox import Sandbox
from corral.watch.watcher import Watcher

# Ids a client may choose: they end up in paths and log lines.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class HostError(CorralError, RuntimeError):
    """A request the host cannot honour; the message says why."""


class SandboxNotFound(HostError, LookupError):
    """No such sandbox, or not one the caller owns (the two are not told apart)."""


@dataclass(eq=False)
class Hosted:
    """One sandbox the host runs, with what the host knows about it."""

    id: str  # the id clients use (theirs when they chose one)
    profile: Profile
    owner: str
    labels: Mapping[str, str]
    sandbox: Sandbox
    workspace: Path
    idle_ttl: float | None
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    stopped: str | None = None
    stopped_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    marker: Path | None = None  # orphans.mark's note, removed on a clean stop
    announced_stop: bool = False  # listeners were told it stopped (once is enough)
    gpu_ids: tuple[int, ...] = ()  # the GPUs it holds, handed back when it stops

    @property
    def alive(self) -> bool:
        return self.stopped is None and self.sandbox.stopped is None

    @property
    def episode_ended(self) -> str | None:
        return self.sandbox.episode_ended

    @property
    def state(self) -> str:
        """``running``, ``frozen`` (its processes held where they were, by a person or
        a detector's response) or ``stopped``."""
        if self.stopped is not None:
            return "stopped"
        why = self.sandbox.stopped
        if why is None:
            return "running"
        return "frozen" if why.startswith("frozen") else "stopped"


class Host:
    """Sandboxes by id, made from profiles, written to one ledger, stopped when idle."""

    def __init__(
        self,
        *,
        profiles: ProfileRegistry | None = None,
        ledger: Ledger | str | os.PathLike[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        backend: str = "bwrap",
        watch: bool | Watcher = True,
        gate: bool = True,
        reap_every: float = 5.0,
        gpus: Sequence[int] | None = None,
    ) -> None:
        """``root``: where sandbox workspaces are made (default ``$CORRAL_HOME/host``).
        ``reap_every``: seconds between looks for idle sandboxes (0: never look).
        ``gpus``: the GPU indices this host hands out (default: every ``/dev/nvidiaN``);
        a sandbox whose policy grants GPUs gets its own, never one another holds."""
        self._gpus_free = sorted(gpus if gpus is not None else _machine_gpus())
        self.profiles = profiles or ProfileRegistry.load()
        self._own_ledger = not isinstance(ledger, Ledger)
        self.ledger = (
            ledger if isinstance(ledger, Ledger) else Ledger.open(ledger or default_ledger_path())
        )
        self.root = Path(root) if root is not None else corral_home() / "host"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A host killed earlier in this root left cgroups and workspaces: remove them.
        self.reaped = orphans.reap(self.root)
        if self.reaped:
            self.ledger.append_note(
                {"event": "left by a killed host, removed", "sandbox_ids": self.reaped}
            )
        self.backend = backend
        self.watch = watch
        self.gate = gate
        self._sandboxes: dict[str, Hosted] = {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self._policies: dict[tuple[str, int | None, float | None], Policy] = {}
        self._closed = threading.Event()
        self.events: EventFeed[HostEvent] = EventFeed()
        self._reaper: threading.Thread | None = None
        if reap_every > 0:
            self._reaper = threading.Thread(
                target=self._reap_loop, args=(reap_every,), name="corral-host-reaper", daemon=True
            )
            self._reaper.start()

    # ------------------------------------------------------------------ lifecycle
    def start(
        self,
        profile: str,
        *,
        owner: str = "local",
        sandbox_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        idle_ttl: float | None = None,
        memory: int | None = None,
        cpus: float | None = None,
        task: str | None = None,
        run_id: str | None = None,
    ) -> Hosted:
        """A new sandbox from ``profile``. ``memory`` and ``cpus`` may lower the
        profile's limits, never raise them. ``idle_ttl``: seconds without a request
        after which it is stopped (None: never)."""
        prof = self.profiles.get(profile)
        if sandbox_id is not None and not _ID_RE.fullmatch(sandbox_id):
            raise HostError(
                f"sandbox id {sandbox_id!r} is not allowed: 1-64 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit"
            )
        sid = sandbox_id or new_id()[:16]
        policy = self._policy(prof, memory, cpus)
        wants = policy.spec.resources.gpus
        gpu_ids: list[int] | None = None
        with self._lock:
            if sid in self._sandboxes or sid in self._claimed:
                raise HostError(f"a sandbox with id {sid!r} already exists")
            if wants:
                if len(self._gpus_free) < wants:
                    raise HostError(
                        f"profile {prof.name!r} needs {wants} GPU(s); {len(self._gpus_free)} "
                        "of this host's are free (the others are held by running sandboxes)"
                    )
                gpu_ids, self._gpus_free = self._gpus_free[:wants], self._gpus_free[wants:]
            # Claimed now, so a second start with the same id fails instead of racing.
            self._claimed.add(sid)
        workspace: Path | None = None
        marker: Path | None = None
        try:
            # Noted before it exists, so a kill at any moment leaves nothing unnoted.
            workspace = self.root / f"{sid}-{new_id()[:8]}"
            marker = orphans.mark(self.root, sid, workspace)
            workspace.mkdir(mode=0o700)
            if prof.workspace is not None:
                shutil.copytree(prof.workspace, workspace, symlinks=True, dirs_exist_ok=True)
            all_labels = {**(labels or {}), "owner": owner, "sandbox": sid, "profile": prof.name}
            view = LabelledLedger(
                self.ledger, all_labels, self._publisher(sid, owner, all_labels, run_id)
            )
            sb = Sandbox(
                policy,
                workspace,
                task=task,
                run_id=run_id,
                gate=self.gate,
                ledger=view,
                backend=self.backend,
                watch=self.watch,
                env=prof.env,
                gpu_ids=gpu_ids,
            )
        except BaseException:
            with self._lock:
                self._claimed.discard(sid)
                self._gpus_free = sorted([*self._gpus_free, *(gpu_ids or ())])
            if workspace is not None:
                shutil.rmtree(workspace, ignore_errors=True)
            if marker is not None:
                orphans.unmark(marker)
            raise
        hosted = Hosted(sid, prof, owner, all_labels, sb, workspace, idle_ttl)
        hosted.gpu_ids = tuple(gpu_ids or ())
        # Its cgroup is made on its first command, after this names it.
        hosted.marker = orphans.mark(self.root, sid, workspace, sb.id)
        with self._lock:
            self._claimed.discard(sid)
            self._sandboxes[sid] = hosted
        self._lifecycle(hosted, STARTED, {"profile": prof.name, "sandbox_id": sb.id})
        return hosted

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every record this host's sandboxes write and every
        start and stop, from now on (``corral.host.events``); returns the unsubscribe."""
        return self.events.subscribe(listener)

    def _publisher(
        self, sid: str, owner: str, labels: Mapping[str, str], run_id: str | None
    ) -> Callable[[int, str, Mapping[str, Any], Mapping[str, Any]], None]:
        def publish(seq: int, kind: str, body: Mapping[str, Any], where: Mapping[str, Any]) -> None:
            if not self.events:  # every exec and event writes through here
                return
            self.events.publish(
                HostEvent(
                    kind,
                    sid,
                    owner,
                    body,
                    seq=seq,
                    ts=where.get("ts") or time.time(),
                    run_id=where.get("run_id") or run_id,
                    action_id=where.get("action_id"),
                    labels=labels,
                )
            )
            # A detector that kills the whole sandbox stops it from inside, not through
            # the host: say so as the host would, so listeners see every stop.
            if kind == "note" and body.get("event") == "sandbox stopped":
                hosted = self._sandboxes.get(sid)
                if hosted is not None and hosted.stopped is None and not hosted.announced_stop:
                    hosted.announced_stop = True
                    self._lifecycle(hosted, STOPPED, {"reason": body.get("reason")})

        return publish

    def _lifecycle(self, hosted: Hosted, kind: str, body: Mapping[str, Any]) -> None:
        self.events.publish(
            HostEvent(
                kind,
                hosted.id,
                hosted.owner,
                body,
                ts=time.time(),
                run_id=hosted.sandbox.run_id,
                labels=hosted.labels,
            )
        )

    def _policy(self, prof: Profile, memory: int | None, cpus: float | None) -> Policy:
        res = prof.policy.spec.resources
        caps = [c for c in (prof.memory, res.memory) if c is not None]
        mem = min([*caps, memory]) if memory else min(caps)
        cpu_caps = [c for c in (prof.cpus, res.cpus) if c is not None]
        cpu = min([*cpu_caps, cpus]) if cpus else min(cpu_caps)
        if mem == res.memory and cpu == res.cpus:
            return prof.policy
        key = (prof.name, mem, cpu)
        with self._lock:
            policy = self._policies.get(key)
            if policy is None:
                policy = prof.policy.derived(
                    prof.policy.name, resources={"memory": mem, "cpus": cpu}
                )
                self._policies[key] = policy
        return policy

    def get(self, sandbox_id: str, owner: str | None = None) -> Hosted:
        """The sandbox, if it exists and ``owner`` (None: anyone) owns it."""
        with self._lock:
            hosted = self._sandboxes.get(sandbox_id)
        if hosted is None or (owner is not None and hosted.owner != owner):
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return hosted

    @contextmanager
    def using(self, sandbox_id: str, owner: str | None = None) -> Iterator[Hosted]:
        """The sandbox, held for one request: requests to one sandbox run one at a time
        (its shells are not shared between threads), and each counts as use."""
        hosted = self.get(sandbox_id, owner)
        with hosted.lock:
            if hosted.stopped is not None:
                raise HostError(f"sandbox {sandbox_id!r} was stopped: {hosted.stopped}")
            hosted.last_used = time.monotonic()
            try:
                yield hosted
            finally:
                hosted.last_used = time.monotonic()

    def stop(
        self,
        sandbox_id: str,
        owner: str | None = None,
        reason: str = "stopped",
        *,
        by: str | None = None,
    ) -> Hosted:
        """Stop the sandbox: every process ends, its workspace is removed, its record
        stays (``get`` still answers, as stopped) until ``delete``. ``by``: who asked,
        for the ledger (a person at the live view, say)."""
        hosted = self.get(sandbox_id, owner)
        if not hosted.lock.acquire(blocking=False):
            # A request is running in it: its processes end now and the request returns,
            # rather than the stop waiting for the very command it is meant to end.
            hosted.sandbox.backend.stop(hosted.sandbox.id, reason)
            hosted.lock.acquire()
        try:
            self._stop(hosted, reason, by)
        finally:
            hosted.lock.release()
        return hosted

    def _stop(self, hosted: Hosted, reason: str, by: str | None = None) -> None:
        if hosted.stopped is not None:
            return
        hosted.stopped = reason
        hosted.stopped_at = time.time()
        note: dict[str, Any] = {
            "event": "sandbox stopped",
            "sandbox_id": hosted.sandbox.id,
            "reason": reason,
        }
        if by is not None:
            note["by"] = by
        try:
            hosted.sandbox.ledger.append_note(note, run_id=hosted.sandbox.run_id)
        finally:
            hosted.sandbox.close()
            shutil.rmtree(hosted.workspace, ignore_errors=True)
            if hosted.marker is not None:
                orphans.unmark(hosted.marker)
            if hosted.gpu_ids:  # its processes are gone: the GPUs are free again
                with self._lock:
                    self._gpus_free = sorted([*self._gpus_free, *hosted.gpu_ids])
                hosted.gpu_ids = ()
            if not hosted.announced_stop:
                hosted.announced_stop = True
                self._lifecycle(
                    hosted, STOPPED, {k: note[k] for k in ("reason", "by") if k in note}
                )

    def freeze(
        self,
        sandbox_id: str,
        owner: str | None = None,
        reason: str = "frozen",
        *,
        by: str | None = None,
    ) -> Hosted:
        """Hold every process of the sandbox where it is, for inspection (the backend's
        freezer: cgroup v2's, or SIGSTOP on v1). It takes no more commands; ``stop``
        ends it. Not under the sandbox's request lock: a command running in it is what
        is being frozen, and that request then returns."""
        hosted = self.get(sandbox_id, owner)
        sb = hosted.sandbox
        if not hosted.alive:
            raise HostError(
                f"sandbox {sandbox_id!r} is not running: {hosted.stopped or sb.stopped}"
            )
        sb.stopped = f"frozen for inspection: {reason}"
        sb.backend.freeze(sb.id, reason)
        note: dict[str, Any] = {"event": "sandbox frozen", "sandbox_id": sb.id, "reason": reason}
        if by is not None:
            note["by"] = by
        sb.ledger.append_note(note, run_id=sb.run_id)
        return hosted

    def delete(self, sandbox_id: str, owner: str | None = None) -> None:
        """Forget a sandbox (stopping it first if it runs)."""
        hosted = self.stop(sandbox_id, owner, "deleted")
        with self._lock:
            self._sandboxes.pop(hosted.id, None)

    def sandboxes(self, owner: str | None = None) -> list[Hosted]:
        with self._lock:
            return [h for h in self._sandboxes.values() if owner in (None, h.owner)]

    # ------------------------------------------------------------------ idle reaping
    def reap_idle(self, now: float | None = None) -> list[str]:
        """Stop every running sandbox idle past its time to live; their ids. A sandbox
        busy with a request is not idle."""
        now = time.monotonic() if now is None else now
        reaped = []
        for hosted in self.sandboxes():
            ttl = hosted.idle_ttl
            if hosted.stopped is not None or ttl is None or now - hosted.last_used < ttl:
                continue
            if not hosted.lock.acquire(blocking=False):
                continue  # in use right now
            try:
                if now - hosted.last_used >= ttl:
                    self._stop(hosted, f"idle for more than {ttl:g} s")
                    reaped.append(hosted.id)
            finally:
                hosted.lock.release()
        # Stopped ones are kept a while so a client can read why, then forgotten.
        with self._lock:
            for sid, h in list(self._sandboxes.items()):
                if h.stopped_at is not None and time.time() - h.stopped_at > 3600:
                    del self._sandboxes[sid]
        return reaped

    def _reap_loop(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                self.reap_idle()
            except Exception as e:  # never let one bad sandbox end the reaping
                self.ledger.append_note({"event": "reaper error", "error": repr(e)})

    def close(self) -> None:
        """Stop every sandbox; the host is done."""
        self._closed.set()
        for hosted in self.sandboxes():
            with hosted.lock:
                self._stop(hosted, "the host shut down")
        if self._reaper is not None:
            self._reaper.join(timeout=10)
        if self._own_ledger:
            self.ledger.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _machine_gpus(dev: Path = Path("/dev")) -> list[int]:
    """The indices of this machine's NVIDIA GPUs, from their device nodes."""
    return sorted(
        int(p.name[len("nvidia") :])
        for p in dev.glob("nvidia[0-9]*")
        if p.name[len("nvidia") :].isdigit()
    )
