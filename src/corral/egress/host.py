"""The host's side of the egress proxy: start it, hand it sandboxes, hear what it saw.

One proxy process per host process, started on the first sandbox that has a network
(``network.mode: proxy``). A sandbox's listening sockets (made in its network namespace)
go to the proxy with the policy's network section; the host keeps no copy, so the proxy
is the only thing that can ever accept on them. Events come back on the same control
socket and are handed to the sandbox's callback (which writes them to the ledger).

Fail closed: a reader thread notices the proxy's end (its control socket closes) and
calls every attached sandbox's ``on_death``, which stops the sandbox. The sandbox had no
way out from the moment the proxy died anyway: its listening sockets died with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import CorralError

EventSink = Callable[[dict[str, Any]], None]


class EgressError(CorralError, RuntimeError):
    """The egress proxy could not be started or reached."""


@dataclass
class _Attached:
    on_event: EventSink
    on_death: Callable[[str], None]
    lanes: set[str]


class EgressProxy:
    """A running proxy process and the sandboxes attached to it."""

    _shared: EgressProxy | None = None
    _shared_lock = threading.Lock()

    def __init__(self, hosts: Mapping[str, list[str]] | None = None) -> None:
        self._hosts_file: Path | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # $CORRAL_PYTHON: for a host whose sys.executable is not a Python that can run
        # corral (an embedding application, an interpreter this user may not execute).
        python = os.environ.get("CORRAL_PYTHON") or sys.executable
        cmd = [python, "-m", "corral.egress.server", "--control", str(theirs.fileno())]
        if hosts:
            from corral.paths import runtime_dir

            fd, name = _mkstemp(runtime_dir())
            with os.fdopen(fd, "w") as f:
                json.dump(dict(hosts), f)
            self._hosts_file = Path(name)
            cmd += ["--hosts", name]
        try:
            self.proc = subprocess.Popen(
                cmd,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # Its own process group: a ^C at the terminal reaches the host, which
                # then stops its sandboxes in order; the proxy ends when the host does.
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        self._attached: dict[str, _Attached] = {}
        self._pending: dict[str, threading.Event] = {}
        self.dead: str | None = None
        ready = self._recv(timeout=30.0)
        if ready is None or ready.get("type") != "ready":
            self.close()
            raise EgressError(f"the egress proxy did not start (got {ready!r})")
        self.pid = int(ready["pid"])
        self._reader = threading.Thread(target=self._read_events, daemon=True, name="corral-egress")
        self._reader.start()

    @classmethod
    def shared(cls) -> EgressProxy:
        """This process's proxy, started on first use and again after it died."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared.dead is not None:
                cls._shared = cls()
            return cls._shared

    def _recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(1 << 16)
        except (TimeoutError, OSError):
            return None
        if not data:
            return None
        parsed: dict[str, Any] = json.loads(data)
        return parsed

    def _read_events(self) -> None:
        self._sock.settimeout(None)
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            try:
                event = json.loads(data)
            except ValueError:
                continue
            kind = event.get("type")
            if kind in ("attached", "detached"):
                lane = event.get("lane") if kind == "attached" else ""
                waiter = self._pending.pop(f"{event.get('sandbox')}/{lane}", None)
                if waiter is not None:
                    waiter.set()
                continue
            with self._lock:
                target = self._attached.get(event.get("sandbox", ""))
            if target is not None:
                with contextlib.suppress(Exception):  # a failing sink must not stop the reader
                    target.on_event(event)
        code = self.proc.wait()
        self.dead = f"the egress proxy (pid {self.proc.pid}) ended with status {code}"
        self._sock.close()
        with self._lock:
            victims = list(self._attached.values())
            self._attached.clear()
        for a in victims:
            with contextlib.suppress(Exception):
                a.on_death(self.dead)

    def attach(
        self,
        sandbox_id: str,
        lane: str,
        pid: int,
        listeners: Mapping[str, socket.socket],
        network: Mapping[str, Any],
        policy_name: str,
        on_event: EventSink,
        on_death: Callable[[str], None],
    ) -> None:
        """Hand over one bubblewrap's listening sockets. They are closed here once sent:
        from now on only the proxy holds them."""
        if self.dead is not None:
            raise EgressError(self.dead)
        names = list(listeners)
        msg = {
            "op": "attach",
            "sandbox": sandbox_id,
            "lane": lane,
            "pid": pid,
            "policy": policy_name,
            "network": dict(network),
            "endpoints": names,
        }
        waiter = threading.Event()
        self._pending[f"{sandbox_id}/{lane}"] = waiter
        with self._lock:
            entry = self._attached.setdefault(sandbox_id, _Attached(on_event, on_death, set()))
            entry.lanes.add(lane)
        try:
            socket.send_fds(
                self._sock, [json.dumps(msg).encode()], [listeners[n].fileno() for n in names]
            )
        except OSError as exc:
            raise EgressError(f"could not reach the egress proxy: {exc}") from exc
        finally:
            for s in listeners.values():
                s.close()
        # Listening already (the sockets were), but wait until the proxy accepts on them,
        # so that a refusal can only mean the policy, never a race.
        if not waiter.wait(10.0):
            raise EgressError("the egress proxy did not take the sandbox's sockets")

    def detach(self, sandbox_id: str, lane: str | None = None, wait: float = 5.0) -> None:
        """Stop one bubblewrap's way out (``lane``), or the whole sandbox's (None). For
        the whole sandbox, wait until the proxy has sent its last events for it: its
        connections are cut first, and their closing events still reach the ledger."""
        waiter = threading.Event()
        if lane is None:
            self._pending[f"{sandbox_id}/"] = waiter
        msg = {"op": "detach", "sandbox": sandbox_id, "lane": lane}
        sent = False
        if self.dead is None:
            try:
                self._sock.send(json.dumps(msg).encode())
                sent = True
            except OSError:
                pass
        if lane is None:
            if sent:
                waiter.wait(wait)
            self._pending.pop(f"{sandbox_id}/", None)
        with self._lock:
            entry = self._attached.get(sandbox_id)
            if entry is not None:
                if lane is None:
                    del self._attached[sandbox_id]
                else:
                    entry.lanes.discard(lane)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sock.close()
        if self._hosts_file is not None:
            self._hosts_file.unlink(missing_ok=True)


def _mkstemp(where: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="egress-hosts-", suffix=".json", dir=where)


def wait_dead(proxy: EgressProxy, timeout: float = 5.0) -> bool:
    """For tests and shutdown: has the proxy's end been noticed within ``timeout``?"""
    deadline = time.monotonic() + timeout
    while proxy.dead is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proxy.dead is not None
