"""Recent CPU, memory and GPU use of each running sandbox, for the live view's sparklines.

A thread samples every running sandbox of a host once a second into a small ring per
sandbox (a minute by default), so a page asks for the last minute without the host
keeping any history. CPU is the cgroup's CPU seconds between two samples, in cores;
memory is what the cgroup is charged now; GPU is the sum of the SM use NVML attributes
to the sandbox's processes (percent of one device), or None where the host has no GPU
telemetry, which the page shows as such rather than as zero.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.watch.gpu import GpuBackend

if TYPE_CHECKING:
    from corral.host.host import Host, Hosted


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # epoch seconds
    cpu: float | None  # cores busy since the previous sample (None for the first)
    memory: int | None  # bytes charged to the sandbox's cgroup now
    gpu: float | None  # percent of one GPU; None: no GPU telemetry on this host

    def to_list(self) -> list[float | int | None]:
        """Compact for JSON: a minute of samples for many sandboxes is sent each poll."""
        return [
            round(self.t, 3),
            None if self.cpu is None else round(self.cpu, 3),
            self.memory,
            self.gpu,
        ]


class UsageSampler:
    """Samples ``host``'s running sandboxes every ``every`` seconds, keeping ``keep``."""

    def __init__(self, host: Host, *, every: float = 1.0, keep: int = 60) -> None:
        self.host = host
        self.every = every
        self.keep = keep
        self._rings: dict[str, deque[Sample]] = {}
        self._last_cpu: dict[str, tuple[float, float]] = {}  # id -> (monotonic, cpu s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> UsageSampler:
        if self._thread is None and self.every > 0:
            self._thread = threading.Thread(
                target=self._loop, name="corral-usage-sampler", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def samples(self, sandbox_id: str) -> tuple[Sample, ...]:
        with self._lock:
            ring = self._rings.get(sandbox_id)
            return tuple(ring) if ring else ()

    def sample(self) -> None:
        """One round over every running sandbox (the thread's tick; tests call it)."""
        hosted = [h for h in self.host.sandboxes() if h.state == "running"]
        gpu_by_pid = _gpu_use(hosted)
        now, wall = time.monotonic(), time.time()
        taken: dict[str, Sample] = {}
        for h in hosted:
            sb = h.sandbox
            try:
                usage = sb.backend.usage(sb.id) or {}
                pids = sb.backend.processes(sb.id) if gpu_by_pid else []
            except Exception:  # closing under us: it is gone by the next round
                continue
            cpu_s = usage.get("cpu_s")
            cores = None
            if isinstance(cpu_s, int | float):
                last = self._last_cpu.get(h.id)
                if last is not None and now > last[0]:
                    cores = max(0.0, (cpu_s - last[1]) / (now - last[0]))
                self._last_cpu[h.id] = (now, float(cpu_s))
            memory = usage.get("memory")
            gpu = None
            if gpu_by_pid is not None:
                gpu = sum(gpu_by_pid.get(p, 0.0) for p in pids)
            taken[h.id] = Sample(wall, cores, memory if isinstance(memory, int) else None, gpu)
        with self._lock:
            for sid, s in taken.items():
                ring = self._rings.get(sid)
                if ring is None:
                    ring = self._rings[sid] = deque(maxlen=self.keep)
                ring.append(s)
            # A stopped sandbox keeps its last minute for the page; a forgotten one goes.
            known = {h.id for h in self.host.sandboxes()}
            for sid in [s for s in self._rings if s not in known]:
                del self._rings[sid]
                self._last_cpu.pop(sid, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            # A failed round is skipped, not fatal: the live view is a window, not a guard.
            with contextlib.suppress(Exception):
                self.sample()


def _gpu_use(hosted: list[Hosted]) -> dict[int, float] | None:
    """SM use by host pid from the GPU telemetry the sandboxes' watchers use, or None
    when none of them has any."""
    backends: dict[int, GpuBackend] = {}
    for h in hosted:
        watcher = h.sandbox.watcher
        if watcher is not None and watcher.gpu is not None:
            backends[id(watcher.gpu)] = watcher.gpu
    if not backends:
        return None
    out: dict[int, float] = {}
    for backend in backends.values():
        with contextlib.suppress(Exception):  # a device that fails a query shows nothing
            for p in backend.processes():
                out[p.pid] = out.get(p.pid, 0.0) + p.util
    return out
