"""Starting one bubblewrap and ending it, with nothing run before its limits are on.

bubblewrap builds the sandbox (namespaces, mounts), then waits on ``--block-fd`` before
running anything in it; ``--info-fd`` has already told the host the sandbox process's pid.
In that pause the host moves the process into the sandbox's cgroup (or sets its rlimits),
then lets it go. Everything the sandbox ever runs descends from that process, so nothing
starts outside the limits, and the launcher needs no code between fork and exec: Python
can then spawn bubblewrap with vfork, several milliseconds cheaper than a fork of a large
host process, and the cgroup is made while bubblewrap builds the mounts.

The sandbox process is pid 1 of its pid namespace. Killing it makes the kernel kill every
other process in the namespace, daemonised ones included, and it is not reaped before they
are all gone: ending a sandbox is one signal and one wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from corral.sandbox.backend import SandboxError

# How long bubblewrap may take to report its sandbox process (a loaded host, a slow
# filesystem). It fails fast on a bad command line, which ends the wait early.
_INFO_TIMEOUT = 30.0


@dataclass(eq=False)  # compared and hashed by identity: it stands for one process
class Launched:
    """A running bubblewrap and a pidfd for its sandbox's pid 1 (None: it never started)."""

    proc: subprocess.Popen[bytes]
    init: int | None
    # Run once when this bubblewrap is done with (its egress sockets handed back, say).
    on_release: list[Callable[[], None]] = field(default_factory=list)
    _init_pid: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def init_pid(self) -> int | None:
        """The host pid of the sandbox's pid 1, while it runs."""
        with self._lock:
            return self._init_pid if self.init is not None else None

    def terminate(self) -> None:
        """SIGKILL to every process of this bubblewrap, from any thread; whoever owns it
        still waits for it (``kill`` or ``proc.wait``)."""
        with self._lock:
            if self.init is not None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pidfd_send_signal(self.init, signal.SIGKILL)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self, timeout: float = 5.0) -> int:
        """End every process of this bubblewrap; its exit status."""
        with self._lock:
            init = self.init
        if init is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(init, signal.SIGKILL)
            # Readable once pid 1 has exited, which it does only after the kernel has
            # reaped every other process in its namespace.
            _wait_readable(init, timeout)
            # bubblewrap reaps it and exits with its status; killing bubblewrap first
            # would leave the zombie to whatever reaps orphans on this host.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        self.release()
        return code

    def release(self) -> None:
        with self._lock:
            init, self.init = self.init, None
            hooks, self.on_release = self.on_release, []
        if init is not None:
            os.close(init)
        for hook in hooks:
            with contextlib.suppress(Exception):
                hook()


def launch(
    build: Callable[[int, int], Sequence[str]],
    confine: Callable[[int, Launched], None],
    *,
    pass_fds: Sequence[int] = (),
    prepare: Callable[[], object] | None = None,
    **popen: Any,
) -> Launched:
    """Start ``build(info_fd, block_fd)``, a bubblewrap command line, and run
    ``confine(pid, launched)`` on its sandbox process before it may run anything.

    ``prepare`` runs while bubblewrap builds the sandbox (making the cgroup overlaps
    with making the mounts). If ``confine`` fails the sandbox is killed and a
    ``SandboxError`` says why: nothing runs unconfined."""
    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    block_r, block_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            proc = _SPAWNER.popen(
                list(build(info_w, block_r)),
                close_fds=True,
                pass_fds=(info_w, block_r, *pass_fds),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin"},
                **popen,
            )
        finally:
            os.close(info_w)
            os.close(block_r)
        launched = Launched(proc, None)
        try:
            if prepare is not None:
                prepare()
            pid = _read_child_pid(info_r)
            if pid is None:  # bubblewrap failed before making the sandbox
                return launched
            launched.init = os.pidfd_open(pid)
            launched._init_pid = pid
            confine(pid, launched)
        except ProcessLookupError:
            launched.kill()  # it died while being built; its stderr says why
            return launched
        except OSError as exc:
            launched.kill()
            raise SandboxError(f"could not put the sandbox under its limits: {exc}") from exc
        except BaseException:
            launched.kill()
            raise
        with contextlib.suppress(BrokenPipeError):
            os.write(block_w, b"x")
        return launched
    finally:
        os.close(info_r)
        os.close(block_w)


class _Spawner:
    """One long-lived thread that starts every bubblewrap of this process.

    bubblewrap's ``--die-with-parent`` (what ends the sandboxes of a host killed with
    SIGKILL) is the kernel's parent-death signal, and that follows the *thread* that
    forked: a sandbox started from a worker thread (a thread pool's, a web server's)
    would be killed when that thread retires, taking the shell's state and background
    jobs with it. Forking from this thread, which lives as long as the process, ties
    the sandboxes to the process instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[
            tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            # A forked child inherits no threads: start its own.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._serve, args=(self._queue,), name="corral-spawner", daemon=True
                )
                self._pid = os.getpid()
                self._thread.start()
            if threading.current_thread() is self._thread:
                return subprocess.Popen(argv, **kwargs)
            future: Future[subprocess.Popen[bytes]] = Future()
            self._queue.put((future, argv, kwargs))
        return future.result()

    @staticmethod
    def _serve(
        q: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]],
    ) -> None:
        while True:
            future, argv, kwargs = q.get()
            try:
                future.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)


_SPAWNER = _Spawner()


def _read_child_pid(fd: int) -> int | None:
    """The ``child-pid`` of bubblewrap's ``--info-fd`` report; None if it exited first."""
    data = b""
    deadline = time.monotonic() + _INFO_TIMEOUT
    while not data.rstrip().endswith(b"}"):
        left = deadline - time.monotonic()
        if left <= 0 or not _wait_readable(fd, left):
            raise SandboxError("bubblewrap did not report its sandbox process in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        raise SandboxError(f"bubblewrap's --info-fd report is unreadable: {data[:200]!r}") from None


def _wait_readable(fd: int, timeout: float) -> bool:
    # poll, not select: a host with hundreds of sandboxes numbers descriptors past 1024.
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))
