"""The host's watcher: one thread for every sandbox of this process.

What it watches, per sandbox:
- processes: every exec, from the kernel's proc connector the moment it happens (root),
  and from a scan of the sandbox's cgroup on every tick (always; it also catches what the
  connector cannot see without root). Each process is tied to the action that started
  it: a child inherits its parent's action, daemonised ones included (the parent is
  known before it goes); a process whose parent is not known gets the action that was
  running when it started;
- resources: CPU per process on every tick (from /proc, 4 Hz by default);
- GPUs: processes on a GPU and their use, through a ``GpuBackend`` (NVML, or a fake);
- egress: what the proxy reports (pushed in by the sandbox as it arrives).

Each event goes through the detector engine (``engine.py``, rules in
``rules/detectors.yaml``); a match is answered at once (``WatchTarget.respond``) and
recorded with its evidence. One thread for all sandboxes keeps the cost of watching
proportional to what the sandboxes do, not to how many exist.

Fail closed: if the watcher's thread dies, every sandbox it watched is stopped.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import os
import queue
import select
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.watch.engine import Engine, Match
from corral.watch.files import IN_CREATE, FileWatch
from corral.watch.gpu import GpuBackend, GpuProcess, open_backend
from corral.watch.procevents import ProcConnector
from corral.watch.rules import DetectorRules, load_detectors

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# Processes that use less than this share of a core in a tick are not reported as
# samples: the rules care about saturation, and a quiet process costs nothing to skip.
_SAMPLE_FLOOR = 0.05
_CPU_WINDOW = 1.0  # seconds a sample's CPU figure is averaged over


# Process start times count clock ticks since boot on CLOCK_BOOTTIME; /proc/stat's btime
# is whole seconds, too coarse to tell which of two quick actions started a process.
_BOOT = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class WatchTarget(Protocol):
    """What the watcher needs from a sandbox (``corral.Sandbox`` provides it)."""

    id: str
    gpus_granted: bool
    # The device numbers (N of /dev/nvidiaN) its grant names: a GPU process the watcher
    # cannot see in /proc is put down to the sandbox holding that GPU.
    gpu_ids: tuple[int, ...]
    # The sandbox's CPU quota in cores (None: unlimited); a busy process is judged by
    # the share of it that it takes, so a tight quota does not hide a miner.
    cpu_limit: float | None

    def processes(self) -> list[int]:
        """Host pids of every process in the sandbox now."""
        ...

    def watched_dirs(self) -> list[str]:
        """Directories inside the sandbox whose writes matter (its home, ``.ssh``)."""
        ...

    def usage(self) -> Mapping[str, Any] | None:
        """The sandbox's cgroup totals now (CPU seconds, peak memory, OOM kills)."""
        ...

    def roots(self) -> set[int]:
        """The sandbox's own long-lived processes (each bubblewrap's pid 1 and the shell
        it runs): what they start belongs to the action running at the time, not to
        whichever action they were first seen in."""
        ...

    def action_at(self, t: float) -> tuple[str | None, bool]:
        """The action running at time ``t`` and whether it has returned since."""
        ...

    def action_done(self, action_id: str | None) -> bool:
        """Has this action returned?"""
        ...

    def record(self, event: Mapping[str, Any]) -> None:
        """Keep an observed event (an exec) in the ledger with its action."""
        ...

    def respond(self, match: Match) -> str:
        """Carry out ``match.response``; say what was done."""
        ...

    def stop(self, reason: str) -> None:
        """Kill every process of the sandbox: it can no longer be watched."""
        ...


@dataclass
class _Proc:
    pid: int
    argv: list[str]
    exe: str
    action_id: str | None
    ticks: int  # utime + stime at the last sample
    seen: float  # monotonic time of the last sample
    comm: bytes  # the kernel's short name: when it changes, the process ran a new program
    # (time, ticks) points back to about _CPU_WINDOW ago: CPU use is averaged over it.
    window: deque[tuple[float, int]] = field(default_factory=deque)


@dataclass
class _Watched:
    target: WatchTarget
    engine: Engine
    procs: dict[int, _Proc] = field(default_factory=dict)
    roots: set[int] = field(default_factory=set)
    file_pid: int | None = None  # the process whose /proc/PID/root the watches went through


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat(pid: int) -> tuple[int, int, int, bytes] | None:
    """(ppid, utime + stime ticks, start time in ticks since boot, comm)."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    try:
        head, tail = raw.rsplit(b")", 1)
        fields = tail.split()
        comm = head.split(b"(", 1)[1]
        return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]), comm
    except (IndexError, ValueError):
        return None


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_GETFD = 438  # the same number on x86_64 and arm64


def _socket_family(pid: int, fd: int) -> int | None:
    """The address family of another process's socket, from a copy of its descriptor
    (``pidfd_getfd``); None when it cannot be copied."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        copy = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            return None
        with socket.socket(fileno=copy) as sock:
            return int(sock.family)
    except OSError:
        return None
    finally:
        os.close(pidfd)


def _stdio_sockets(pid: int) -> bool:
    """Is fd 0 or 1 a network socket? (A unix socket is how many harnesses wire stdio.)"""
    for fd in (0, 1):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                continue
        except OSError:
            continue
        family = _socket_family(pid, fd)
        if family is None or family in (socket.AF_INET, socket.AF_INET6):
            return True
    return False


def _reap_marks() -> None:
    """Remove the action-mark folders of processes that are gone (killed before their
    exit handler ran)."""
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            parts = name.split("-")
            stale = (
                name.startswith("corral-marks-")
                and len(parts) >= 4
                and parts[2].isdigit()
                and not os.path.exists(f"/proc/{parts[2]}")
            )
            if stale:
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


class Watcher:
    """Watches sandboxes from one thread; ``shared()`` is this process's."""

    _shared: Watcher | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self,
        interval: float = 0.25,
        gpu: GpuBackend | None = None,
        rules: DetectorRules | None = None,
        use_connector: bool = True,
    ) -> None:
        self.interval = interval
        self.rules = rules or load_detectors()
        self.gpu = gpu if gpu is not None else open_backend()
        self._connector = ProcConnector.open() if use_connector else None
        try:
            self._files: FileWatch | None = FileWatch()
        except OSError:
            self._files = None
        # inotify watch descriptor -> (sandbox id, the directory as the sandbox sees it)
        self._file_dirs: dict[int, tuple[str, str]] = {}
        # Action boundaries in the same inotify queue as the writes: ``mark`` creates a
        # file named after the action here when it starts, so a write read late (a busy
        # host) is still tied to the action it happened in, not the one running when it
        # was read. inotify keeps one queue in order; a clock could not do this.
        self._marks: str | None = None
        self._marks_wd: int | None = None
        self._marked: dict[str, str] = {}  # sandbox id -> the action its writes belong to
        if self._files is not None:
            _reap_marks()
            with contextlib.suppress(OSError):
                self._marks = tempfile.mkdtemp(prefix=f"corral-marks-{os.getpid()}-")
                self._marks_wd = self._files.add(self._marks, IN_CREATE)
                # The shared watcher lives as long as its process and is never closed.
                atexit.register(shutil.rmtree, self._marks, True)
        self._watched: dict[str, _Watched] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self.died: str | None = None
        self.ticks = 0
        self.tick_starts: collections.deque[float] = collections.deque(maxlen=64)  # monotonic
        # The last cgroup sample of each sandbox, for a live view (``latest``).
        self._latest: dict[str, dict[str, Any]] = {}
        self._pid_sandbox: dict[int, str] = {}  # every known process of a watched sandbox
        self._thread = threading.Thread(target=self._main, name="corral-watch", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> Watcher:
        with cls._shared_lock:
            if cls._shared is None or cls._shared.died is not None:
                cls._shared = cls()
            return cls._shared

    @property
    def sources(self) -> list[str]:
        """What this watcher sees, for ``corral doctor`` and the ledger."""
        out = ["cgroup scan", "per-process CPU"]
        if self._connector is not None:
            out.append("proc connector (every exec as it happens)")
        if self._files is not None:
            out.append("inotify (writes to home and .ssh)")
        if self.gpu is not None:
            out.append(f"GPU ({self.gpu.name})")
        return out

    def watch(self, target: WatchTarget, overrides: Mapping[str, Any] | None = None) -> None:
        engine = Engine(self.rules, overrides)
        with self._lock:
            self._watched[target.id] = _Watched(target, engine)
        self._wake()

    def unwatch(self, sandbox_id: str) -> None:
        with self._lock:
            w = self._watched.pop(sandbox_id, None)
            self._latest.pop(sandbox_id, None)
            self._marked.pop(sandbox_id, None)
        for pid in list(w.procs) if w else []:
            self._pid_sandbox.pop(pid, None)

    def latest(self, sandbox_id: str) -> dict[str, Any] | None:
        """The sandbox's most recent sample: cgroup totals, process count, the busiest
        process (taken on every tick, 4 Hz by default)."""
        with self._lock:
            got = self._latest.get(sandbox_id)
            return dict(got) if got else None

    def adopt(self, sandbox_id: str, pid: int) -> None:
        """A sandbox's new pid 1, before it runs anything: what it forks is known to be
        the sandbox's from the first fork event on, not only from the next scan."""
        self._pid_sandbox[pid] = sandbox_id

    def mark(self, sandbox_id: str, action_id: str) -> None:
        """An action starts in the sandbox now: writes seen after this belong to it."""
        if self._marks is None:
            return
        path = os.path.join(self._marks, f"{sandbox_id}.{action_id}")
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            os.unlink(path)

    def push(self, sandbox_id: str, event: dict[str, Any]) -> None:
        """An event observed elsewhere (the egress proxy), for the detectors."""
        self._queue.put((sandbox_id, event))
        self._wake()

    def sync(self, timeout: float = 2.0) -> None:
        """Wait until one full tick has run after this call (tests, shutdown)."""
        start = self.ticks
        deadline = time.monotonic() + timeout
        self._wake()
        while self.ticks < start + 2 and time.monotonic() < deadline and self.died is None:
            time.sleep(self.interval / 4)

    def close(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(5)
        if self._connector is not None:
            self._connector.close()
        if self._files is not None:
            self._files.close()
        if self._marks is not None:
            shutil.rmtree(self._marks, ignore_errors=True)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ---- the loop -----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # fail closed: nothing runs on unwatched
            self.died = f"the watcher stopped: {exc!r}"
            with self._lock:
                victims = [w.target for w in self._watched.values()]
            for target in victims:
                with contextlib.suppress(Exception):
                    target.stop(self.died)
            raise

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._connector is not None:
            poller.register(self._connector.fileno(), select.POLLIN)
        if self._files is not None:
            poller.register(self._files.fileno(), select.POLLIN)
        next_tick = time.monotonic()
        while not self._stop.is_set():
            wait = max(0.0, next_tick - time.monotonic())
            for fd, _ in poller.poll(wait * 1000):
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif self._files is not None and fd == self._files.fileno():
                    self._file_events()
                elif self._connector is not None:
                    self._connector_events()
            self._drain()
            now = time.monotonic()
            if now >= next_tick:
                self.tick_starts.append(now)
                self._tick()
                self.ticks += 1
                # At a fixed rate, not a fixed pause: a tick's own time must not slow
                # sampling below the interval. One that ran long is not caught up in a burst.
                next_tick += self.interval
                if next_tick < time.monotonic():
                    next_tick = time.monotonic() + self.interval

    def _drain(self) -> None:
        while True:
            try:
                sid, event = self._queue.get_nowait()
            except queue.Empty:
                return
            w = self._watched.get(sid)
            if w is not None:
                self._feed(w, event)

    def _connector_events(self) -> None:
        assert self._connector is not None
        for ev in self._connector.read():
            if ev.what == "fork":
                # A child of a sandbox's process is in that sandbox: known before its
                # exec, without reading /proc for every exec on the machine.
                sid = self._pid_sandbox.get(ev.ppid) if ev.ppid is not None else None
                if sid is not None:
                    self._pid_sandbox[ev.pid] = sid
                continue
            if ev.what == "exit":
                self._pid_sandbox.pop(ev.pid, None)
                continue
            sid = self._pid_sandbox.get(ev.pid)
            w = self._watched.get(sid) if sid else None
            if w is not None:
                with contextlib.suppress(OSError):
                    self._seen(w, ev.pid, time.monotonic(), execed=True)

    def _watch_files(self, w: _Watched) -> None:
        """Put inotify watches on the sandbox's home (again, after a new bubblewrap:
        each has a home of its own)."""
        if self._files is None or not w.roots or w.file_pid in w.roots:
            return
        pid = min(w.roots)
        w.file_pid = pid
        for inner in w.target.watched_dirs():
            wd = self._files.add(f"/proc/{pid}/root{inner}")
            if wd is not None:
                self._file_dirs[wd] = (w.target.id, inner)

    def _file_events(self) -> None:
        assert self._files is not None
        for _, ev in self._files.read():
            if ev.wd == self._marks_wd:
                sid, _, action_id = ev.name.partition(".")
                if sid in self._watched:
                    self._marked[sid] = action_id
                continue
            where = self._file_dirs.get(ev.wd)
            if where is None or not ev.name:
                continue
            sid, inner = where
            w = self._watched.get(sid)
            if w is None:
                continue
            path = f"{inner}/{ev.name}"
            if not ev.is_dir:
                self._file_written(w, path)
            elif path in w.target.watched_dirs() and w.file_pid is not None:
                where_then = f"/proc/{w.file_pid}/root{path}"
                wd = self._files.add(where_then)
                if wd is not None:
                    self._file_dirs[wd] = (sid, path)
                # What was written before the watch was in place (`mkdir -p ~/.ssh &&
                # echo key >> ~/.ssh/authorized_keys` races it).
                with contextlib.suppress(OSError):
                    for name in os.listdir(where_then):
                        self._file_written(w, f"{path}/{name}")

    def _file_written(self, w: _Watched, path: str) -> None:
        action = self._marked.get(w.target.id)
        if action is None:
            action, _ = w.target.action_at(time.time())
        event = {"kind": "file", "path": path, "op": "write", "pid": None, "action_id": action}
        with contextlib.suppress(Exception):
            w.target.record(event)
        self._feed(w, event)

    def _tick(self) -> None:
        with self._lock:
            watched = list(self._watched.values())
        gpu_procs = self.gpu.processes() if self.gpu is not None and watched else []
        now = time.monotonic()
        unseen = self._unseen_gpu_processes(gpu_procs)
        for w in watched:
            try:
                pids = w.target.processes()
            except Exception:  # a sandbox closing under us
                continue
            alive = set(pids)
            with contextlib.suppress(Exception):
                w.roots = w.target.roots()
            for pid in pids:
                self._seen(w, pid, now)
            self._watch_files(w)
            sample: dict[str, Any] = {"kind": "resource", "t": time.time(), "pids": len(pids)}
            with contextlib.suppress(Exception):
                sample.update(w.target.usage() or {})
            with self._lock:
                self._latest[w.target.id] = sample
            self._feed(w, sample)
            for pid in [p for p in w.procs if p not in alive]:
                del w.procs[pid]
                self._pid_sandbox.pop(pid, None)
                w.engine.forget_pid(w.target.id, pid)
            for g in gpu_procs:
                proc = w.procs.get(g.pid)
                if proc is not None:
                    argv, action = proc.argv, proc.action_id
                    outlived = w.target.action_done(action)
                elif g.pid in unseen and g.gpu in w.target.gpu_ids:
                    # NVML speaks another pid namespace's pids (corral in a container
                    # without the host's): the GPU is this sandbox's alone, so is the
                    # process. Busy while no action runs is busy after its action.
                    argv = []
                    action, outlived = w.target.action_at(time.time())
                else:
                    continue
                event = {
                    "kind": "gpu",
                    "pid": g.pid,
                    "gpu": g.gpu,
                    "util": g.util,
                    "memory": g.memory,
                    "granted": w.target.gpus_granted and g.gpu in w.target.gpu_ids,
                    "argv": argv,
                    "action_id": action,
                    "outlived_action": outlived,
                }
                if proc is None:
                    event["pid_foreign"] = True
                self._feed(w, event)

    def _unseen_gpu_processes(self, gpu_procs: list[GpuProcess]) -> set[int]:
        """Pids NVML names that this pid namespace has no process for."""
        return {g.pid for g in gpu_procs if not os.path.exists(f"/proc/{g.pid}")}

    def _seen(self, w: _Watched, pid: int, now: float, execed: bool = False) -> None:
        """A process of a watched sandbox: new ones are execs; known ones are sampled.
        ``execed``: the kernel just said it ran a new program."""
        stat = _stat(pid)
        if stat is None:
            return
        ppid, ticks, start, comm = stat
        proc = w.procs.get(pid)
        # The command line is read only for what is new: reading it on every tick for
        # every process was the watcher's largest cost.
        if proc is None or execed or comm != proc.comm:
            argv_raw = _read(f"/proc/{pid}/cmdline") or b""
            argv = [a.decode(errors="replace") for a in argv_raw.split(b"\0") if a]
        else:
            argv = proc.argv
        if proc is None or (argv and argv != proc.argv):
            parent = w.procs.get(ppid)
            if parent is not None and ppid not in w.roots:
                # The shell may be newer than the last tick's list (a session restarted).
                with contextlib.suppress(Exception):
                    w.roots = w.target.roots()
            if proc is not None:
                action = proc.action_id  # a new program in the same process
            elif parent is not None and ppid not in w.roots and pid not in w.roots:
                action = parent.action_id  # inherited, daemonised or not
            else:
                # Start times are whole ticks, rounded down: give it the benefit of one.
                action, _ = w.target.action_at(_BOOT + (start + 1) / _CLK_TCK)
            exe = ""
            with contextlib.suppress(OSError):
                exe = os.readlink(f"/proc/{pid}/exe")
            proc = _Proc(pid, argv, exe, action, ticks, now, comm)
            w.procs[pid] = proc
            self._pid_sandbox[pid] = w.target.id
            event = {
                "kind": "exec",
                "pid": pid,
                "ppid": ppid,
                "argv": argv,
                "exe": exe,
                "action_id": action,
                "stdio_sockets": _stdio_sockets(pid),
            }
            # A sandbox closing under the watcher cannot record any more: not the
            # watcher's failure (which would stop every sandbox).
            with contextlib.suppress(Exception):
                w.target.record(event)
            self._feed(w, event)
            return
        dt = now - proc.seen
        if dt <= 0:
            return
        # Over one tick CPU time comes in whole clock ticks (10 ms): a process held to a
        # fifth of a core reads 0.16 and 0.24 in turn. Averaged over a second it reads
        # what it uses, so a tight quota neither hides nor fakes saturation.
        if not proc.window:
            proc.window.append((proc.seen, proc.ticks))
        proc.window.append((now, ticks))
        while len(proc.window) > 2 and now - proc.window[1][0] >= _CPU_WINDOW:
            proc.window.popleft()
        t0, k0 = proc.window[0]
        cpu = (ticks - k0) / _CLK_TCK / (now - t0)
        proc.ticks, proc.seen = ticks, now
        if cpu < _SAMPLE_FLOOR:
            return
        rss_pages = 0
        statm = _read(f"/proc/{pid}/statm")
        if statm:
            with contextlib.suppress(IndexError, ValueError):
                rss_pages = int(statm.split()[1])
        self._feed(
            w,
            {
                "kind": "sample",
                "pid": pid,
                "argv": proc.argv,
                "cpu": cpu,
                # One process can use at most one core, whatever the quota above it.
                "cpu_share": cpu / min(w.target.cpu_limit or 1.0, 1.0),
                "rss": rss_pages * os.sysconf("SC_PAGE_SIZE"),
                "outlived_action": w.target.action_done(proc.action_id),
                "action_id": proc.action_id,
            },
        )

    def _feed(self, w: _Watched, event: dict[str, Any]) -> None:
        event.setdefault("sandbox", w.target.id)
        event.setdefault("t", time.time())
        for match in w.engine.feed(event):
            with contextlib.suppress(Exception):  # a failed response is recorded by it
                w.target.respond(match)
