"""A persistent shell inside one sandbox: state survives between commands.

One bubblewrap runs one ``bash`` for the sandbox's life. Each command is handed over
through a file in a host directory bound into the sandbox at ``/run/corral`` and a line
on the shell's stdin naming it; the shell ``eval``s it in its own process, so ``cd``,
``export`` and background jobs persist (like a ROCK bash session), and reports the exit
status on a control pipe. Output goes to files in the same directory, read by the host
once the command is done. A warm command therefore costs one fork+exec inside an
already-built sandbox, not a new bubblewrap.

Limits, stated plainly:
- a command that runs ``exit`` ends the shell; the next command starts a fresh one
  (workspace files survive, shell state does not);
- a command that outlives its time limit ends the whole session the same way, since
  its processes cannot be told apart from the shell's own;
- the command runs in the shell's process, so it can reach the control pipe and report a
  false exit status. That lies only about its own result: containment does not depend
  on the protocol.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.model import new_id
from corral.paths import runtime_dir
from corral.sandbox.backend import SandboxError, exit_status
from corral.sandbox.launch import Launched

IO_DIR = "/run/corral"


def _prelude(ctrl: int) -> str:
    """Defined once when the session starts. The command text is read with builtins
    only (no fork), run by eval in this shell with the control pipe closed for it (and
    for everything it starts), and its status is written to the control pipe."""
    return f"""
__corral_run() {{
  local __corral_id=$1 __corral_cmd
  IFS= read -r -d '' __corral_cmd < "{IO_DIR}/$__corral_id.cmd"
  eval "$__corral_cmd" < /dev/null > "{IO_DIR}/$__corral_id.out" 2> "{IO_DIR}/$__corral_id.err" {ctrl}>&-
  printf '%s %s\\n' "$__corral_id" "$?" >&{ctrl}
}}
printf 'ready\\n' >&{ctrl}
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | None  # None when the time limit ended the command
    stdout: bytes
    stderr: bytes
    ended: str | None  # "timeout", "exit" or "halted" when the command did not finish


class SessionDied(SandboxError):
    """The session's shell ended (``exit``, a kill, a limit) before answering."""


class SessionHalted(SandboxError):
    """The sandbox was stopped or frozen from outside while a command ran."""


class ShellSession:
    def __init__(
        self, spawn: Callable[..., Launched], halted: Callable[[], str | None] | None = None
    ) -> None:
        """``spawn(command, io_dir, **popen)`` starts a bubblewrap that binds ``io_dir``
        at ``/run/corral`` and runs ``command``, keeping ``popen["pass_fds"]`` open.
        ``halted()`` says why the sandbox was stopped or frozen from outside, if it was:
        a command in flight then returns instead of waiting on a frozen shell."""
        self._halted = halted
        # Not the shared /tmp: corral's own private directory.
        self.io = Path(tempfile.mkdtemp(prefix="io-", dir=runtime_dir()))
        ctrl_r, ctrl_w = os.pipe()
        # bubblewrap's own complaints (a mount it cannot make) land here, host side.
        self._errlog = self.io.parent / f"{self.io.name}.err"
        try:
            with open(self._errlog, "wb") as errlog:
                self.launched = spawn(
                    ["/bin/bash", "--noprofile", "--norc", "-s"],
                    self.io,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                    pass_fds=(ctrl_w,),
                )
        except BaseException:
            os.close(ctrl_r)
            shutil.rmtree(self.io, ignore_errors=True)
            self._errlog.unlink(missing_ok=True)
            raise
        finally:
            os.close(ctrl_w)
        self.proc = self.launched.proc
        self._ctrl = os.fdopen(ctrl_r, "rb", buffering=0)
        self._poll = select.poll()
        self._poll.register(ctrl_r, select.POLLIN)
        self._buf = b""
        self._why = "no message"
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin
        try:
            self._send(_prelude(ctrl_w).encode())
            ready = self._line(timeout=30.0) == b"ready"
        except SessionDied:
            ready = False
        if not ready:
            self.close()
            why = self._why
            raise SandboxError(f"the sandbox's shell did not start: {why} (see corral doctor)")

    def _send(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
            self._stdin.flush()
        except (BrokenPipeError, ValueError):
            raise SessionDied("the sandbox's shell is gone") from None

    def _line(self, timeout: float | None) -> bytes | None:
        """The next line on the control pipe; None on timeout; SessionDied on EOF."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            wait = 0.25 if deadline is None else min(0.25, max(0.0, deadline - time.monotonic()))
            # poll, not select: a host with hundreds of sandboxes has descriptors
            # numbered past select's limit of 1024.
            ready = self._poll.poll(wait * 1000)
            if not ready:
                # A daemon the command left behind may hold the pipe open, so EOF is
                # not a reliable sign of death: the shell's own exit is.
                if self.proc.poll() is not None:
                    raise SessionDied("the sandbox's shell ended")
                why = self._halted() if self._halted is not None else None
                if why is not None:
                    raise SessionHalted(why)
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            chunk = self._ctrl.read(4096)
            if not chunk:
                raise SessionDied("the sandbox's shell ended")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, command: str, timeout: float | None) -> Outcome:
        """Run one command and collect what it wrote."""
        cid = new_id()
        base = f"{self.io}/{cid}"
        fd = os.open(f"{base}.cmd", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, command.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
        status: int | None = None
        ended: str | None = None
        try:
            self._send(f"__corral_run {cid}\n".encode())
            while True:
                line = self._line(timeout)
                if line is None:  # the command cannot be separated from the shell
                    ended = "timeout"
                    self.close()
                    break
                got_id, _, text = line.decode().partition(" ")
                if got_id == cid:
                    status = int(text) if text.isdigit() else 1
                    break
        except SessionHalted:
            # Frozen processes stay as they are, for inspection; the caller gets control.
            ended = "halted"
            status = None
        except SessionDied:
            # `exit` in the command, or a kill from outside: the shell's status is the
            # command's (bubblewrap passes its child's status on).
            ended = "exit"
            status = exit_status(self.proc.wait())
        out = _take(f"{base}.out")
        err = _take(f"{base}.err")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{base}.cmd")
        if ended == "exit":
            self.close()
        return Outcome(status, out, err, ended)

    def close(self) -> None:
        self.launched.kill()
        with contextlib.suppress(OSError):  # unsent input to a shell already gone
            self._stdin.close()
        self._ctrl.close()
        with contextlib.suppress(OSError):
            self._why = self._errlog.read_text(errors="replace").strip()[-500:] or "no message"
        shutil.rmtree(self.io, ignore_errors=True)
        self._errlog.unlink(missing_ok=True)


# What one command's stdout or stderr may hand back; the rest is dropped, and said so.
OUTPUT_LIMIT = 16 << 20


def _take(path: str) -> bytes:
    limit = OUTPUT_LIMIT
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        os.unlink(path)
        chunks = []
        size = 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        return data[:limit] + f"\n[corral: output cut at {limit} bytes]\n".encode()
    return data
