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
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.model import new_id
from corral.paths import runtime_dir
from corral.sandbox.backend import SandboxError, exit_status

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
    ended: str | None  # "timeout" or "exit" when the session ended with the command


class SessionDied(SandboxError):
    """The session's shell ended (``exit``, a kill, a limit) before answering."""


class ShellSession:
    def __init__(
        self,
        argv_for: Callable[[list[str], Path], list[str]],
        preexec: Callable[[], None] | None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """``argv_for(command, io_dir)`` builds the bubblewrap command line that binds
        ``io_dir`` at ``/run/corral`` and runs ``command``; ``pass_fds`` (and the control
        pipe) are kept open across it."""
        # Not the shared /tmp: corral's own private directory.
        self.io = Path(tempfile.mkdtemp(prefix="io-", dir=runtime_dir()))
        ctrl_r, ctrl_w = os.pipe()
        cmd = argv_for(["/bin/bash", "--noprofile", "--norc", "-s"], self.io)
        # bubblewrap's own complaints (a mount it cannot make) land here, host side.
        self._errlog = self.io.parent / f"{self.io.name}.err"
        try:
            with open(self._errlog, "wb") as errlog:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                    close_fds=True,
                    pass_fds=(ctrl_w, *pass_fds),
                    start_new_session=True,
                    preexec_fn=preexec,
                    env={"PATH": "/usr/bin:/bin"},
                )
        finally:
            os.close(ctrl_w)
        self._ctrl = os.fdopen(ctrl_r, "rb", buffering=0)
        self._poll = select.poll()
        self._poll.register(ctrl_r, select.POLLIN)
        self._buf = b""
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin
        self._send(_prelude(ctrl_w).encode())
        try:
            ready = self._line(timeout=30.0) == b"ready"
        except SessionDied:
            ready = False
        if not ready:
            why = self._errlog.read_text(errors="replace").strip()[-500:] or "no message"
            self.close()
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
        (self.io / f"{cid}.cmd").write_bytes(command.encode("utf-8", "surrogateescape"))
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
        except SessionDied:
            # `exit` in the command, or a kill from outside: the shell's status is the
            # command's (bubblewrap passes its child's status on).
            ended = "exit"
            status = exit_status(self.proc.wait())
        out = _take(self.io / f"{cid}.out")
        err = _take(self.io / f"{cid}.err")
        (self.io / f"{cid}.cmd").unlink(missing_ok=True)
        if ended == "exit":
            self.close()
        return Outcome(status, out, err, ended)

    def close(self) -> None:
        if self.proc.poll() is None:
            # bwrap leads the session's process group; its pid namespace dies with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._stdin.close()
        self._ctrl.close()
        shutil.rmtree(self.io, ignore_errors=True)
        self._errlog.unlink(missing_ok=True)


# What one command's stdout or stderr may hand back; the rest is dropped, and said so.
OUTPUT_LIMIT = 16 << 20


def _take(path: Path) -> bytes:
    limit = OUTPUT_LIMIT
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return b""
    path.unlink(missing_ok=True)
    if len(data) > limit:
        return data[:limit] + f"\n[corral: output cut at {limit} bytes]\n".encode()
    return data
