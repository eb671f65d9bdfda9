"""One cgroup per sandbox: memory, pids and CPU limits, usage figures, and a clean kill.

Both hierarchies are supported:
- v2 (unified, what current clusters run): one directory with ``memory.max``,
  ``pids.max``, ``cpu.max``; ``cgroup.kill`` ends every process at once. Sandboxes are
  made under the cgroup corral itself runs in, so a delegated subtree (systemd
  ``Delegate=yes``, or a user session) works without root. v2 forbids processes in a
  cgroup whose controllers are delegated to children, so corral first moves itself
  into a ``corral-host`` leaf.
- v1 (one hierarchy per controller, what the development machine has): a directory in
  each of ``memory``, ``pids`` and ``cpu,cpuacct`` under corral's own cgroup there.

bubblewrap's sandbox process is placed in the cgroup while it waits on ``--block-fd``,
after building the sandbox and before running anything in it, so nothing the sandbox runs
starts outside. Memory written to the sandbox's /tmp and
/dev/shm (tmpfs) is charged to the cgroup of the process that writes it, so it counts
against the same limit. When no cgroup can be made, ``create`` returns None and the
caller says so (``corral doctor`` reports it); nothing pretends to limit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")


@dataclass(frozen=True, slots=True)
class Limits:
    memory: int  # bytes
    pids: int
    cpus: float


@dataclass(frozen=True, slots=True)
class Usage:
    peak_memory: int | None
    cpu_seconds: float | None
    oom_kills: int
    pids_limited: int


def detect(root: Path = CGROUP_ROOT) -> str | None:
    """``"v2"``, ``"v1"``, or None when no usable hierarchy is mounted."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "memory" / "tasks").exists():
        return "v1"
    return None


def _v2_base(root: Path) -> Path:
    """Where sandbox cgroups go: our own cgroup, or its parent once we moved ourselves
    into the ``corral-host`` leaf (else each sandbox would nest one level deeper)."""
    base = root / _own_path(None).lstrip("/")
    return base.parent if base.name == "corral-host" else base


def _v1_dirs(name: str, root: Path) -> list[Path]:
    dirs: list[Path] = []
    for controller in _V1_CONTROLLERS:
        # cpu and cpuacct are often mounted together (cpu -> cpu,cpuacct).
        mount = (root / controller).resolve()
        d = mount / _own_path(controller).lstrip("/") / f"corral-{name}"
        if d not in dirs:
            dirs.append(d)
    return dirs


def _own_path(controller: str | None, proc_self: Path = Path("/proc/self/cgroup")) -> str:
    """This process's cgroup path in one hierarchy (``""`` for v2's unified one)."""
    for line in proc_self.read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller is None and names == "") or (
            controller is not None and controller in names.split(",")
        ):
            return path
    return "/"


@dataclass
class Cgroup:
    """The cgroup (v2) or cgroups (v1) of one sandbox."""

    version: str
    dirs: list[Path]
    limits: Limits
    procs_files: list[Path] = field(default_factory=list)
    _fds: dict[str, int] = field(default_factory=dict)
    _counter_paths: tuple[str, ...] = ()

    @classmethod
    def create(cls, name: str, limits: Limits, root: Path = CGROUP_ROOT) -> Cgroup | None:
        version = detect(root)
        try:
            if version == "v2":
                return cls._create_v2(name, limits, root)
            if version == "v1":
                return cls._create_v1(name, limits, root)
        except OSError:
            return None
        return None

    @classmethod
    def _create_v2(cls, name: str, limits: Limits, root: Path) -> Cgroup:
        base = _v2_base(root)
        enabled = set((base / "cgroup.subtree_control").read_text().split())
        wanted = {"memory", "pids", "cpu"}
        if not wanted <= enabled:
            # A cgroup with delegated controllers may hold no processes: move ourselves
            # (only ourselves) into a leaf first, then hand the controllers down.
            leaf = base / "corral-host"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            (base / "cgroup.subtree_control").write_text(
                " ".join(f"+{c}" for c in sorted(wanted - enabled))
            )
        d = base / f"corral-{name}"
        d.mkdir()
        cg = cls("v2", [d], limits, [d / "cgroup.procs"])
        _write(d / "memory.max", limits.memory)
        _write(d / "memory.swap.max", 0, missing_ok=True)
        _write(d / "pids.max", limits.pids)
        _write(d / "cpu.max", f"{int(limits.cpus * 100_000)} 100000")
        return cg

    @classmethod
    def _create_v1(cls, name: str, limits: Limits, root: Path) -> Cgroup:
        dirs: list[Path] = []
        try:
            for d in _v1_dirs(name, root):
                d.mkdir()
                dirs.append(d)
            mem, pids, cpu = dirs[:3]
            _write(mem / "memory.limit_in_bytes", limits.memory)
            # Swap counts too where the kernel accounts it, so a bomb cannot page out.
            _write(mem / "memory.memsw.limit_in_bytes", limits.memory, missing_ok=True)
            _write(pids / "pids.max", limits.pids)
            _write(cpu / "cpu.cfs_period_us", 100_000)
            _write(cpu / "cpu.cfs_quota_us", int(limits.cpus * 100_000))
        except OSError:
            for d in dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        return cls("v1", dirs, limits, [d / "cgroup.procs" for d in dirs])

    @classmethod
    def planned(cls, name: str, root: Path = CGROUP_ROOT) -> Cgroup | None:
        """The cgroup ``create(name)`` makes, as seen from this process, whether or not
        it exists (yet, or still): what a host notes so that, if it is killed, the next
        one can remove what it left."""
        version = detect(root)
        if version == "v2":
            d = _v2_base(root) / f"corral-{name}"
            return cls("v2", [d], Limits(0, 0, 0), [d / "cgroup.procs"])
        if version == "v1":
            dirs = _v1_dirs(name, root)
            return cls("v1", dirs, Limits(0, 0, 0), [d / "cgroup.procs" for d in dirs])
        return None

    def add(self, pid: int) -> None:
        """Move a process in (its threads and later children follow)."""
        for f in self.procs_files:
            with open(f, "w") as fh:
                fh.write(str(pid))

    def members(self) -> list[int]:
        """The processes in the cgroup, from one hierarchy (every process is put in all
        of them): the watcher's cheap question, asked several times a second."""
        try:
            return [int(x) for x in self.procs_files[0].read_text().split()]
        except (OSError, ValueError, IndexError):
            return self.pids()

    def pids(self) -> list[int]:
        out: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(OSError):
                out.update(int(x) for x in f.read_text().split())
        return sorted(out)

    def _read(self, path: str) -> str:
        """A counter file's text. Its descriptor stays open and is re-read from offset 0,
        about twenty times cheaper than opening it again (read before and after every
        command)."""
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return ""
            self._fds[path] = fd
        try:
            return os.pread(fd, 8192, 0).decode()
        except OSError:
            return ""

    def _counters(self) -> tuple[str, ...]:
        # Strings, joined once: usage() runs twice per command.
        if not self._counter_paths:
            if self.version == "v2":
                d = self.dirs[0]
                names = ("memory.events", "memory.peak", "cpu.stat", "pids.events")
                self._counter_paths = tuple(str(d / n) for n in names)
            else:
                mem, pids = self.dirs[:2]
                acct = next((d for d in self.dirs[2:] if (d / "cpuacct.usage").exists()), mem)
                self._counter_paths = (
                    str(mem / "memory.oom_control"),
                    str(mem / "memory.max_usage_in_bytes"),
                    str(acct / "cpuacct.usage"),
                    str(pids / "pids.events"),
                )
        return self._counter_paths

    def usage(self) -> Usage:
        events, peak, cpu, pids = (self._read(p) for p in self._counters())
        if self.version == "v2":
            usec = _kv(cpu).get("usage_usec")
            return Usage(
                _int(peak),
                usec / 1e6 if usec is not None else None,
                _kv(events).get("oom_kill", 0),
                _kv(pids).get("max", 0),
            )
        ns = _int(cpu)
        return Usage(
            _int(peak),
            ns / 1e9 if ns is not None else None,
            _kv(events).get("oom_kill", 0),
            _kv(pids).get("max", 0),
        )

    def memory_now(self) -> int | None:
        """Memory charged to the cgroup now (``usage()`` has only the peak), for a live
        view's samples."""
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        return _int(self._read(str(self.dirs[0] / name)))

    def freeze(self) -> bool:
        """Freeze every process (v2's ``cgroup.freeze``); False where unavailable."""
        if self.version != "v2":
            return False
        try:
            (self.dirs[0] / "cgroup.freeze").write_text("1")
        except OSError:
            return False
        return True

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup, daemonised ones included, and wait."""
        kill_file = self.dirs[0] / "cgroup.kill"
        if self.version == "v2" and kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def remove(self) -> None:
        self.kill_all()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        for d in self.dirs:
            for _ in range(100):  # the kernel frees a cgroup a moment after its last task
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.002)


def _write(path: Path, value: object, *, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(str(value))
    except FileNotFoundError:
        if not missing_ok:
            raise


def _int(text: str) -> int | None:
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out
