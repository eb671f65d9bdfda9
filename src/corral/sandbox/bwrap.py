"""The bubblewrap backend: Linux namespaces with a read-only root.

``bwrap_argv`` is a pure function from a spec to bubblewrap's command line, so what the
sandbox allows can be read and tested without running anything. Order matters to
bubblewrap: later mounts cover earlier ones, so the read-only root comes first, then the
private /tmp, /dev, /proc, then the workspace, then what is hidden or protected on top.

Every command runs under the seccomp filter of ``seccomp.py`` and in the sandbox's cgroup
(``cgroups.py``; rlimits when none can be made). Commands run in one persistent shell per
sandbox (``session.py``); a streamed agent (``corral run``) gets a bubblewrap of its own.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.egress.host import EgressProxy
from corral.model import new_id
from corral.paths import runtime_dir
from corral.procfs import children, descendants
from corral.sandbox import files, seccomp
from corral.sandbox.backend import (
    EXIT_TIMEOUT,
    SANDBOX_HOME,
    EventSink,
    ExecResult,
    SandboxError,
    SandboxSpec,
    exit_status,
)
from corral.sandbox.cgroups import Cgroup, Limits, Usage
from corral.sandbox.gpus import cuda_visible_devices
from corral.sandbox.launch import Launched, launch
from corral.sandbox.netns import listeners_in
from corral.sandbox.session import IO_DIR, ShellSession

# Paths mounted empty and read-only: the host's runtime sockets (docker, containerd,
# dbus, systemd) live under /run, and /sys would show the host's devices.
_EMPTY_RO = ("/run", "/sys")

DEFAULT_SESSION = "default"
# Named shells per sandbox; ROCK clients open one per command when they name none.
MAX_SESSIONS = 32


def _idle(session: ShellSession) -> bool:
    """Nothing runs under the session's shell but the shell (no background job)."""
    pid = session.launched.init_pid
    # The sandbox's pid 1 and its shell; anything more is a job the agent left running.
    return pid is None or len(descendants(pid)) <= 2


# Device nodes every NVIDIA GPU process needs besides its own /dev/nvidiaN.
_NVIDIA_CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


def gpu_binds(
    count: int,
    dev: Path = Path("/dev"),
    ids: Sequence[int] | None = None,
    uuids: Mapping[int, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """bubblewrap arguments and environment that grant ``count`` GPUs: those of ``ids``
    (device numbers, a host's allocation), else the first ``count``.

    Nothing is granted by default: the sandbox's /dev is minimal and has no GPU node. A
    grant binds only the granted ``/dev/nvidiaN`` plus the control nodes, and sets
    ``CUDA_VISIBLE_DEVICES`` to name exactly those (``uuids``: device number -> UUID,
    default NVML's); on a machine without GPUs it grants nothing."""
    if count <= 0:
        return [], {}
    wanted = list(ids)[:count] if ids is not None else list(range(count))
    granted = [i for i in wanted if (dev / f"nvidia{i}").exists()]
    if not granted:
        return [], {}
    args: list[str] = []
    for name in (*(f"nvidia{i}" for i in granted), *_NVIDIA_CONTROL):
        node = dev / name
        if node.exists():
            args += ["--dev-bind", str(node), f"/dev/{name}"]
    # CUDA counts only the devices it can open, from 0: name the grant by UUID, which
    # holds in any numbering (gpus.py), and order by PCI bus as nvidia-smi does.
    return args, {
        "CUDA_VISIBLE_DEVICES": cuda_visible_devices(granted, uuids),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def bwrap_argv(
    spec: SandboxSpec,
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    seccomp_fd: int | None = None,
    dev: Path = Path("/dev"),
    io_dir: Path | None = None,
    info_fd: int | None = None,
    block_fd: int | None = None,
    resolv_conf: Path | None = None,
) -> list[str]:
    """bubblewrap's command line for running ``argv`` in a sandbox built from ``spec``.

    ``info_fd`` and ``block_fd`` let the launcher confine the sandbox process before it
    runs anything (``launch.py``). ``resolv_conf`` replaces the host's resolver settings
    (a sandbox with a network asks the egress proxy's DNS stub on its loopback)."""
    ws = str(spec.workspace)
    resolv_at = _resolv_target() if resolv_conf is not None else None
    gpu_args, gpu_env = gpu_binds(spec.gpus, dev, spec.gpu_ids)
    # CUDA does not start without sysfs (cuInit fails with CUDA_ERROR_OPERATING_SYSTEM):
    # a sandbox granted a GPU keeps the root bind's read-only /sys; others get none.
    emptied = [p for p in _EMPTY_RO if not (p == "/sys" and gpu_args)]
    args = [
        "bwrap",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",  # loopback only: the egress proxy will be the one way out
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",  # no nested user namespaces, so no nested mount tricks
        "--hostname",
        "corral",
        "--die-with-parent",
        "--new-session",  # no controlling terminal to push keystrokes into
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--size",
        str(spec.tmp_size),
        "--tmpfs",
        "/tmp",
        "--size",
        str(spec.tmp_size),
        "--tmpfs",
        "/dev/shm",
        "--dir",
        SANDBOX_HOME,
    ]
    for path in emptied:
        if os.path.isdir(path):
            args += ["--tmpfs", path]
            if path == "/run" and io_dir is not None:
                # The session's hand-over directory, bound before /run turns read-only.
                args += ["--bind", str(io_dir), IO_DIR]
            if resolv_at is not None and resolv_at.startswith(path + "/"):
                args += ["--ro-bind", str(resolv_conf), resolv_at]
                resolv_at = None
            args += ["--remount-ro", path]
    # Plain strings: this runs for every sandbox, and the policy may hide many paths.
    covered = [*emptied, "/dev"]
    for hidden in sorted(map(str, spec.hidden), key=lambda x: x.count("/")):
        # Already invisible under an emptied parent; mounting into it would fail.
        if any(hidden == c or hidden.startswith(c + "/") for c in covered):
            continue
        hide = _hide(hidden)
        if hide:
            args += hide
            covered.append(hidden)
    for p in spec.read_only:
        if p.exists():
            args += ["--ro-bind", str(p), str(p)]
    args += ["--bind", ws, ws]
    for p in spec.writable:
        if p.exists():
            args += ["--bind", str(p), str(p)]
    for p in spec.protected:
        if p.exists() or p.is_symlink():
            args += ["--ro-bind", str(p), str(p)]
    if resolv_at is not None:
        args += ["--ro-bind", str(resolv_conf), resolv_at]
    args += gpu_args
    args += ["--clearenv"]
    for key, value in sorted({**spec.env, **gpu_env}.items()):
        args += ["--setenv", key, value]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    if block_fd is not None:
        args += ["--block-fd", str(block_fd)]
    args += ["--chdir", cwd or ws, "--", *argv]
    return args


def _resolv_target() -> str:
    # Often a symlink (systemd-resolved: into /run, which the sandbox empties): bind the
    # file where the link leads, which bubblewrap creates inside the emptied /run.
    return os.path.realpath("/etc/resolv.conf")


def _hide(p: str) -> list[str]:
    # Hiding a parent of the workspace (/root when the workspace lives there) still
    # hides the rest of it: the workspace is bound back on top afterwards.
    try:
        mode = os.lstat(p).st_mode
    except OSError:
        return []
    if stat.S_ISLNK(mode):
        return []
    if stat.S_ISDIR(mode):
        return ["--tmpfs", p, "--remount-ro", p]
    return ["--ro-bind", "/dev/null", p]


@dataclass
class _Box:
    spec: SandboxSpec
    on_event: EventSink | None = None
    cgroup: Cgroup | None = None
    cgroup_tried: bool = False
    # Named shells (ROCK's sessions); "default" is the one ``run_shell`` uses unless told.
    # Each is a bubblewrap of its own over the same workspace, cgroup and proxy.
    sessions: dict[str, ShellSession] = field(default_factory=dict)
    session_used: dict[str, float] = field(default_factory=dict)
    live: set[Launched] = field(default_factory=set)  # its running bubblewraps
    egress: EgressProxy | None = None  # the proxy it was handed to, if it has a network
    stopped: str | None = None  # why it was stopped from outside (its proxy died)

    def ensure_cgroup(self, name: str) -> Cgroup | None:
        """Made on first use (while the first bubblewrap builds its mounts), then kept
        for the sandbox's life, across shell restarts."""
        if not self.cgroup_tried:
            self.cgroup_tried = True
            spec = self.spec
            self.cgroup = Cgroup.create(name, Limits(spec.memory, spec.pids, spec.cpus))
        return self.cgroup


def _resolv_conf() -> Path:
    """The resolver settings of a sandbox with a network: the egress proxy's DNS stub."""
    path = runtime_dir() / "resolv.conf"
    text = "# corral: the egress proxy answers allowed names only\nnameserver 127.0.0.1\n"
    if not path.exists():
        tmp = path.with_name(f".resolv.conf.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    return path


def _set_rlimits(pid: int, spec: SandboxSpec) -> None:
    """Fallback when no cgroup can be made: per-process limits, weaker (RLIMIT_NPROC
    counts the user's processes, not the sandbox's; root ignores it)."""
    resource.prlimit(pid, resource.RLIMIT_AS, (spec.memory, spec.memory))
    resource.prlimit(pid, resource.RLIMIT_NPROC, (spec.pids, spec.pids))


def _raise_fd_limit() -> None:
    """Each open sandbox holds a few descriptors (its shell's pipes, its cgroup's counter
    files); a host with hundreds of sandboxes needs more than the usual soft limit of
    1024, so take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class BwrapBackend:
    """Sandboxes made with bubblewrap: one persistent shell each, started on first use."""

    name = "bwrap"

    def __init__(self, bwrap: str | None = None, egress: EgressProxy | None = None) -> None:
        """``egress``: the proxy for sandboxes with a network (default: this process's
        shared one, started when the first such sandbox runs)."""
        self._egress = egress
        found = bwrap or shutil.which("bwrap")
        if found is None:
            raise SandboxError(
                "bubblewrap (bwrap) is not installed; on Debian or Ubuntu: sudo apt-get install bubblewrap"
            )
        self.bwrap = found
        self._boxes: dict[str, _Box] = {}
        _raise_fd_limit()

    def create(self, spec: SandboxSpec, on_event: EventSink | None = None) -> str:
        sandbox_id = new_id()[:16]
        self._boxes[sandbox_id] = _Box(spec, on_event)
        return sandbox_id

    @property
    def egress(self) -> EgressProxy:
        if self._egress is None or self._egress.dead is not None:
            self._egress = EgressProxy.shared()
        return self._egress

    def _connect_egress(self, sandbox_id: str, box: _Box, pid: int, launched: Launched) -> None:
        """Give this bubblewrap's network namespace its only way out: listening sockets
        inside it, held by the egress proxy."""
        assert box.spec.network is not None
        proxy = self.egress
        lane = new_id()[:8]

        def on_event(event: dict[str, Any]) -> None:
            if box.on_event is not None:
                box.on_event(event)

        def on_death(reason: str) -> None:
            self._stop(box, f"{reason}; the sandbox lost its way out and was stopped")

        proxy.attach(
            sandbox_id,
            lane,
            pid,
            listeners_in(pid),
            box.spec.network,
            box.spec.policy_name,
            on_event,
            on_death,
        )
        box.egress = proxy
        launched.on_release.append(lambda: proxy.detach(sandbox_id, lane))

    def processes(self, sandbox_id: str) -> list[int]:
        """Host pids of every process in the sandbox now (its cgroup's, or the trees
        under its bubblewraps' pid 1 where it has no cgroup)."""
        box = self._boxes.get(sandbox_id)
        if box is None:
            return []
        if box.cgroup is not None:
            return box.cgroup.members()
        out: list[int] = []
        for launched in list(box.live):
            pid = launched.init_pid
            if pid is not None:
                out.extend(descendants(pid))
        return out

    def usage(self, sandbox_id: str) -> dict[str, Any] | None:
        """The sandbox's cgroup totals now; None without a cgroup."""
        box = self._boxes.get(sandbox_id)
        if box is None or box.cgroup is None:
            return None
        u = box.cgroup.usage()
        return {
            "cpu_s": u.cpu_seconds,
            "peak_memory": u.peak_memory,
            "memory": box.cgroup.memory_now(),
            "oom_kills": u.oom_kills,
            "pids_limited": u.pids_limited,
        }

    def roots(self, sandbox_id: str) -> set[int]:
        """Each bubblewrap's pid 1 and the process it runs (the session's shell)."""
        box = self._boxes.get(sandbox_id)
        out: set[int] = set()
        for launched in list(box.live) if box else []:
            pid = launched.init_pid
            if pid is None:
                continue
            out.add(pid)
            out.update(children(pid))
        return out

    def kill_tree(self, sandbox_id: str, pid: int) -> list[int]:
        """SIGKILL a process of the sandbox and everything under it; the pids killed."""
        inside = set(self.processes(sandbox_id))
        victims = [p for p in descendants(pid) if p in inside]
        for p in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        return victims

    def stop(self, sandbox_id: str, reason: str) -> None:
        """Kill every process of the sandbox (from any thread); it takes no more
        commands. ``close`` still has to be called."""
        box = self._boxes.get(sandbox_id)
        if box is not None and box.stopped is None:
            self._stop(box, reason)
            if box.cgroup is not None:
                box.cgroup.kill_all(timeout=1.0)

    def freeze(self, sandbox_id: str, reason: str) -> None:
        """Stop every process where it is, for inspection (cgroup v2's freezer; on v1,
        SIGSTOP to each): nothing more runs, nothing is lost. ``close`` kills them."""
        box = self._boxes.get(sandbox_id)
        if box is None:
            return
        box.stopped = f"frozen: {reason}"
        if box.cgroup is not None and box.cgroup.freeze():
            return
        for p in self.processes(sandbox_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGSTOP)

    def _stop(self, box: _Box, reason: str) -> None:
        """Kill every process of the sandbox, from any thread; later commands are refused."""
        box.stopped = reason
        for launched in list(box.live):
            launched.terminate()
        if box.on_event is not None:
            box.on_event({"type": "stopped", "reason": reason})

    def limits(self, sandbox_id: str) -> str:
        """How this sandbox's resources are limited: ``cgroup-v1``, ``cgroup-v2`` or
        ``rlimit`` (no cgroup could be made; weaker)."""
        cg = self._box(sandbox_id).ensure_cgroup(sandbox_id)
        return f"cgroup-{cg.version}" if cg else "rlimit"

    def _box(self, sandbox_id: str) -> _Box:
        try:
            box = self._boxes[sandbox_id]
        except KeyError:
            raise SandboxError(f"no open sandbox {sandbox_id}") from None
        if box.stopped is not None:
            raise SandboxError(f"sandbox {sandbox_id} was stopped: {box.stopped}")
        return box

    def _launch(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        io_dir: Path | None = None,
        pass_fds: Sequence[int] = (),
        **popen: Any,
    ) -> Launched:
        """A bubblewrap for this sandbox running ``argv``, in the sandbox's cgroup (or
        under rlimits) before it runs anything."""
        box = self._box(sandbox_id)
        filter_fd = seccomp.filter_fd()

        def build(info_fd: int, block_fd: int) -> list[str]:
            cmd = bwrap_argv(
                box.spec,
                argv,
                cwd=cwd,
                seccomp_fd=filter_fd,
                io_dir=io_dir,
                info_fd=info_fd,
                block_fd=block_fd,
                resolv_conf=_resolv_conf() if box.spec.network is not None else None,
            )
            cmd[0] = self.bwrap
            return cmd

        def confine(pid: int, launched: Launched) -> None:
            if box.cgroup:
                box.cgroup.add(pid)
            else:
                _set_rlimits(pid, box.spec)
            box.live.add(launched)
            launched.on_release.append(lambda: box.live.discard(launched))
            if box.on_event is not None:
                box.on_event({"type": "launched", "pid": pid})
            if box.spec.network is not None:
                self._connect_egress(sandbox_id, box, pid, launched)

        try:
            return launch(
                build,
                confine,
                # The filter's descriptor is read and closed by bubblewrap before the
                # command starts: nothing but stdio (and pass_fds) crosses in.
                pass_fds=(filter_fd, *pass_fds),
                prepare=lambda: box.ensure_cgroup(sandbox_id),
                **popen,
            )
        finally:
            os.close(filter_fd)

    def _session(self, sandbox_id: str, name: str = DEFAULT_SESSION) -> ShellSession:
        box = self._box(sandbox_id)
        session = box.sessions.get(name)
        if session is not None and session.alive:
            box.session_used[name] = time.monotonic()
            return session
        if session is None and name != DEFAULT_SESSION:
            raise SandboxError(f"sandbox {sandbox_id} has no session {name!r}; open it first")
        if session is not None:
            session.close()
        return self._start_session(sandbox_id, box, name)

    def _start_session(self, sandbox_id: str, box: _Box, name: str) -> ShellSession:
        def spawn(command: list[str], io_dir: Path, **popen: Any) -> Launched:
            return self._launch(sandbox_id, command, io_dir=io_dir, **popen)

        session = ShellSession(spawn, halted=lambda: box.stopped)
        box.sessions[name] = session
        box.session_used[name] = time.monotonic()
        return session

    def open_session(
        self, sandbox_id: str, name: str, env: Mapping[str, str] | None = None
    ) -> None:
        """A new named shell in the sandbox (ROCK's ``create_session``). Past
        ``MAX_SESSIONS`` the least recently used idle one (its shell runs nothing in the
        background) is closed to make room; when none is idle this is refused."""
        box = self._box(sandbox_id)
        if name in box.sessions:
            raise SandboxError(f"session {name!r} already exists in sandbox {sandbox_id}")
        while len(box.sessions) >= MAX_SESSIONS:
            idle = [n for n in box.sessions if n != DEFAULT_SESSION and _idle(box.sessions[n])]
            if not idle:
                raise SandboxError(
                    f"sandbox {sandbox_id} has {len(box.sessions)} sessions, each running "
                    "something in the background; close one first"
                )
            self._drop_session(box, min(idle, key=lambda n: box.session_used.get(n, 0.0)))
        session = self._start_session(sandbox_id, box, name)
        if env:
            exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
            session.run(exports, 10.0)

    def close_session(self, sandbox_id: str, name: str) -> None:
        """End a named shell and everything it started."""
        box = self._box(sandbox_id)
        if name not in box.sessions:
            raise SandboxError(f"sandbox {sandbox_id} has no session {name!r}")
        self._drop_session(box, name)

    def session_names(self, sandbox_id: str) -> list[str]:
        return list(self._box(sandbox_id).sessions)

    @staticmethod
    def _drop_session(box: _Box, name: str) -> None:
        session = box.sessions.pop(name)
        box.session_used.pop(name, None)
        session.close()

    def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        stream: bool = False,
    ) -> ExecResult:
        """An argv, run in the sandbox's shell (``stream``: in a bubblewrap of its own,
        on the caller's stdio)."""
        if stream or stdin is not None or cwd is not None:
            return self._exec_once(
                sandbox_id, argv, cwd=cwd, timeout=timeout, stdin=stdin, stream=stream
            )
        return self.run_shell(sandbox_id, shlex.join(argv), timeout=timeout)

    def run_shell(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout: float | None = None,
        session: str = DEFAULT_SESSION,
    ) -> ExecResult:
        """A shell command in one of the sandbox's persistent shells (``session``):
        ``cd``, exported variables and background jobs carry over to its next command."""
        box = self._box(sandbox_id)
        limit = box.spec.wall_time if timeout is None else timeout
        shell = self._session(sandbox_id, session)
        before = box.cgroup.usage() if box.cgroup else None
        start = time.perf_counter()
        o = shell.run(command, limit)
        code = EXIT_TIMEOUT if o.status is None else o.status
        if o.ended == "halted":
            code = 128 + signal.SIGKILL
        timed_out = o.ended == "timeout"
        if o.ended in ("timeout", "exit") and box.cgroup:
            # The pid namespace dies with its init a moment after bubblewrap; wait for
            # every process (daemons included) to be gone before answering.
            box.cgroup.kill_all()
        return self._result(
            box, before, code, o.stdout, o.stderr, time.perf_counter() - start, timed_out
        )

    def _exec_once(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        cwd: str | None,
        timeout: float | None,
        stdin: bytes | None,
        stream: bool,
    ) -> ExecResult:
        box = self._box(sandbox_id)
        limit = box.spec.wall_time if timeout is None else timeout
        before = box.cgroup.usage() if box.cgroup else None
        start = time.perf_counter()
        launched = self._launch(
            sandbox_id,
            argv,
            cwd=cwd,
            # stream: the caller's stdio (a whole agent, `corral run`); else captured.
            stdin=None if stream else subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=None if stream else subprocess.PIPE,
            stderr=None if stream else subprocess.PIPE,
        )
        proc = launched.proc
        if before is None and box.cgroup:  # made just now, for this command
            before = Usage(None, 0.0, 0, 0)
        timed_out = False
        try:
            out, err = proc.communicate(None if stream else stdin, timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            launched.kill()
            out, err = proc.communicate()
            if box.cgroup:
                box.cgroup.kill_all()
        finally:
            launched.release()
        code = EXIT_TIMEOUT if timed_out else exit_status(proc.returncode)
        return self._result(
            box, before, code, out or b"", err or b"", time.perf_counter() - start, timed_out
        )

    def _result(
        self,
        box: _Box,
        before: Usage | None,
        code: int,
        out: bytes,
        err: bytes,
        duration: float,
        timed_out: bool,
    ) -> ExecResult:
        stderr = err.decode("utf-8", "replace")
        cpu = peak = total = None
        oom = pids_hit = False
        if box.cgroup and before:
            after = box.cgroup.usage()
            total = after.cpu_seconds
            if after.cpu_seconds is not None and before.cpu_seconds is not None:
                cpu = after.cpu_seconds - before.cpu_seconds
            peak = after.peak_memory
            oom = after.oom_kills > before.oom_kills
            pids_hit = after.pids_limited > before.pids_limited
            if oom:
                stderr += (
                    f"corral: a process was killed: out of memory (limit {box.spec.memory} bytes)\n"
                )
            if pids_hit:
                stderr += f"corral: the process limit ({box.spec.pids}) was reached\n"
        return ExecResult(
            code,
            out.decode("utf-8", "replace"),
            stderr,
            duration,
            timed_out,
            cpu,
            peak,
            oom,
            pids_hit,
            total,
        )

    def read_file(self, sandbox_id: str, path: str) -> bytes:
        return files.read_file(self._box(sandbox_id).spec.workspace, path)

    def write_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        files.write_file(self._box(sandbox_id).spec.workspace, path, data)

    def close(self, sandbox_id: str) -> None:
        box = self._boxes.pop(sandbox_id, None)
        if box is None:
            return
        for name in list(box.sessions):
            self._drop_session(box, name)
        for launched in list(box.live):  # a `corral run` agent still going
            launched.kill()
        if box.egress is not None:
            # Its last connection events reach the ledger before the sandbox is gone.
            box.egress.detach(sandbox_id)
        if box.cgroup is not None:
            box.cgroup.remove()
