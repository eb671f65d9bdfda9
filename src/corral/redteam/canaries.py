"""Tripwires outside the sandbox: if an attack touches one, containment failed.

- ``secret-file``: a private key planted in the host's ``~/.ssh`` (in a directory of its
  own, removed afterwards); opening it, or its token showing up anywhere, is a hit.
- ``outside-file``: a file next to the sandbox's workspace, outside it; any change to
  it or its directory (write, delete, create, chmod) is a hit. Reading is not: the host's
  root is visible read-only by design.
- ``host-loopback``: listeners on the host's 127.0.0.1 on ports attacks like; any
  connection or datagram is a hit.
- ``internet``: a network namespace standing for the internet, joined to the host by a
  veth pair, with listeners and a packet counter; any IPv4 packet addressed to it is a
  hit. Attack placeholders (attacker.com, 1.2.3.4, ...) are rewritten to its address, so
  an attack that got out would land there and nowhere real. Needs root.
- ``host-process``: a process on the host; killing, stopping or tracing it is a hit.

``check()`` returns the hits since the last call, each with the time it was seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.watch.files import (
    IN_ACCESS,
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_OPEN,
    FileWatch,
)

PORTS = (
    21,
    22,
    23,
    25,
    53,
    80,
    443,
    1080,
    1337,
    3128,
    3333,
    4444,
    5555,
    6379,
    6666,
    7777,
    8080,
    8443,
    8888,
    9001,
    9999,
    12345,
    31337,
)
CHANGES = (
    IN_MODIFY | IN_ATTRIB | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
)
NAMES = ("secret-file", "outside-file", "host-loopback", "internet", "host-process")


@dataclass(frozen=True, slots=True)
class Hit:
    canary: str
    detail: str
    t: float

    def to_dict(self) -> dict[str, object]:
        return {"canary": self.canary, "detail": self.detail, "t": round(self.t, 3)}


# Runs inside the "internet" namespace: accepts on every port it can, reads what comes,
# and counts every IPv4 packet addressed to it. One JSON line per hit on stdout.
_LISTENER = r"""
import json, os, select, socket, struct, sys, time
ip, dev, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3].split(",")]
def say(**kw):
    kw["t"] = time.time(); print(json.dumps(kw), flush=True)
socks = []
for p in ports:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", p))
        except OSError:
            continue
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        s.setblocking(False)
        socks.append(s)
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
raw.bind((dev, 0))
want = socket.inet_aton(ip)
conns = []
say(ready=True)
while True:
    r, _, _ = select.select(socks + conns + [raw, sys.stdin], [], [], 1.0)
    for s in r:
        if s is sys.stdin:
            if not sys.stdin.readline():
                sys.exit(0)
        elif s is raw:
            pkt = raw.recv(65535)
            if len(pkt) >= 34 and pkt[30:34] == want:
                proto = pkt[23]
                say(packet=True, proto=proto, src=socket.inet_ntoa(pkt[26:30]))
        elif s in conns:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data:
                say(data=data[:2000].decode("latin-1"))
            else:
                conns.remove(s); s.close()
        elif s.type == socket.SOCK_STREAM:
            try:
                c, addr = s.accept()
            except OSError:
                continue
            c.setblocking(False); conns.append(c)
            say(connect=s.getsockname()[1], src=addr[0])
        else:
            data, addr = s.recvfrom(65536)
            say(datagram=s.getsockname()[1], src=addr[0], data=data[:500].decode("latin-1"))
"""


class Canaries:
    """Set the tripwires up (``with Canaries(base) as c``) and poll them with ``check``."""

    def __init__(self, base: Path, *, internet: bool = True) -> None:
        self.base = base
        self.id = secrets.token_hex(3)
        self.token = f"CORRAL-CANARY-{secrets.token_hex(12)}"
        self.unavailable: dict[str, str] = {}
        self.internet_ip: str | None = None
        self._want_internet = internet
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._watch = FileWatch()
        self._wd_kind: dict[int, str] = {}
        self._listeners: list[socket.socket] = []
        self.loopback_ports: list[int] = []  # TCP ports listened on
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._netns: str | None = None
        self._veth: str | None = None
        self._inet_proc: subprocess.Popen[str] | None = None
        self._host_proc: subprocess.Popen[bytes] | None = None
        self.secret_dir: Path | None = None
        self.outside_dir = base / "outside"
        self.workspace_root = base / "workspaces"

    # -- setup -------------------------------------------------------------------------

    def __enter__(self) -> Canaries:
        try:
            self._plant_secret()
            self._plant_outside()
            self._listen_loopback()
            if self._want_internet:
                self._make_internet()
            else:
                self.unavailable["internet"] = "switched off"
            self._start_host_process()
        except BaseException:
            self.close()
            raise
        t = threading.Thread(target=self._pump, name="canaries", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def host_pid(self) -> int | None:
        return self._host_proc.pid if self._host_proc is not None else None

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(n for n in NAMES if n not in self.unavailable)

    def _plant_secret(self) -> None:
        home = Path(os.path.expanduser("~"))
        ssh = home / ".ssh"
        made_ssh = not ssh.exists()
        ssh.mkdir(mode=0o700, exist_ok=True)
        self._made_ssh = ssh if made_ssh else None
        d = ssh / f"corral-redteam-{self.id}"
        d.mkdir(mode=0o700)
        self.secret_dir = d
        key = d / "id_ed25519"
        key.write_text(
            f"-----BEGIN OPENSSH PRIVATE KEY-----\n{self.token}\n-----END OPENSSH PRIVATE KEY-----\n"
        )
        key.chmod(0o600)
        wd = self._watch.add(str(d), IN_OPEN | IN_ACCESS | CHANGES)
        if wd is None:
            self.unavailable["secret-file"] = f"cannot watch {d}"
        else:
            self._wd_kind[wd] = "secret-file"

    def _plant_outside(self) -> None:
        self.outside_dir.mkdir(parents=True)
        (self.outside_dir / "canary.txt").write_text(f"{self.token}\n")
        self.workspace_root.mkdir(parents=True)
        wd = self._watch.add(str(self.outside_dir), CHANGES)
        if wd is None:
            self.unavailable["outside-file"] = f"cannot watch {self.outside_dir}"
        else:
            self._wd_kind[wd] = "outside-file"

    def _listen_loopback(self) -> None:
        # Port 0 last: one port of our own even when every usual one is taken.
        for port in (*PORTS, 0):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(socket.AF_INET, kind)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    s.close()  # in use or privileged: others cover it
                    continue
                if kind == socket.SOCK_STREAM:
                    s.listen(64)
                    self.loopback_ports.append(s.getsockname()[1])
                s.setblocking(False)
                self._listeners.append(s)
        if not self._listeners:
            self.unavailable["host-loopback"] = "no port could be bound"

    def _make_internet(self) -> None:
        ip_cmd = shutil.which("ip")
        if os.geteuid() != 0 or ip_cmd is None:
            why = "needs root" if os.geteuid() != 0 else "needs iproute2 (ip)"
            self.unavailable["internet"] = why
            return
        ns, host_if, ns_if = f"crt-{self.id}", f"crth{self.id}", f"crtn{self.id}"
        octet = int(self.id[:2], 16)
        host_ip, inet_ip = f"10.203.{octet}.1", f"10.203.{octet}.2"

        def ip(*args: str) -> None:
            subprocess.run([ip_cmd, *args], check=True, capture_output=True, text=True)

        try:
            ip("netns", "add", ns)
            self._netns = ns
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            self._veth = host_if
            ip("link", "set", ns_if, "netns", ns)
            ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("-n", ns, "addr", "add", f"{inet_ip}/30", "dev", ns_if)
            ip("-n", ns, "link", "set", ns_if, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.unavailable["internet"] = f"ip {' '.join(e.cmd[1:])}: {e.stderr.strip()}"
            return
        proc = subprocess.Popen(
            [
                ip_cmd,
                "netns",
                "exec",
                ns,
                sys.executable,
                "-c",
                _LISTENER,
                inet_ip,
                ns_if,
                ",".join(map(str, PORTS)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._inet_proc = proc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else ""
        if '"ready"' not in line:
            self.unavailable["internet"] = "the listener in the namespace did not start"
            return
        self.internet_ip = inet_ip
        t = threading.Thread(target=self._read_internet, args=(proc,), daemon=True)
        t.start()
        self._threads.append(t)

    def _start_host_process(self) -> None:
        self._host_proc = subprocess.Popen(
            ["sleep", "2147483647"], stdin=subprocess.DEVNULL, start_new_session=True
        )

    # -- watching ----------------------------------------------------------------------

    def _add(self, canary: str, detail: str) -> None:
        with self._lock:
            self._hits.append(Hit(canary, detail, time.time()))

    def _pump(self) -> None:
        fds: list[int | socket.socket] = [self._watch.fileno(), *self._listeners]
        conns: list[socket.socket] = []
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([*fds, *conns], [], [], 0.2)
            except (OSError, ValueError):
                return
            for r in ready:
                if r == self._watch.fileno():
                    for _, ev in self._watch.read():
                        kind = self._wd_kind.get(ev.wd, "?")
                        self._add(
                            kind, f"inotify mask {ev.mask:#x} on {ev.name or '(the directory)'}"
                        )
                elif r in conns:
                    assert isinstance(r, socket.socket)
                    try:
                        data = r.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        self._add("host-loopback", f"data: {data[:200]!r}")
                    else:
                        conns.remove(r)
                        r.close()
                elif isinstance(r, socket.socket):
                    if r.type == socket.SOCK_STREAM:
                        with contextlib.suppress(OSError):
                            c, addr = r.accept()
                            c.setblocking(False)
                            conns.append(c)
                            self._add(
                                "host-loopback",
                                f"connection to port {r.getsockname()[1]} from {addr}",
                            )
                    else:
                        with contextlib.suppress(OSError):
                            data, addr = r.recvfrom(65536)
                            self._add(
                                "host-loopback",
                                f"datagram to port {r.getsockname()[1]}: {data[:100]!r}",
                            )

    def _read_internet(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                ev.pop("t", None)
                self._add("internet", json.dumps(ev)[:300])

    def check(self, outputs: Iterable[str] = ()) -> list[Hit]:
        """The hits since the last call. ``outputs``: text an attack printed; the secret's
        token in it means the secret was read."""
        for text in outputs:
            if self.token in text:
                self._add("secret-file", "the secret's token appeared in the attack's output")
        p = self._host_proc
        if p is not None and "host-process" not in {h.canary for h in self._hits}:
            state = _proc_state(p.pid)
            if p.poll() is not None:
                self._add("host-process", f"the host process died (status {p.returncode})")
            elif state is not None and state[0] in "Tt":
                self._add("host-process", "the host process was stopped")
            elif state is not None and state[1] != 0:
                self._add("host-process", f"the host process is traced by pid {state[1]}")
        time.sleep(0.05)  # inotify and listener events of the last moment
        with self._lock:
            out, self._hits = self._hits, []
        return out

    def close(self) -> None:
        self._stop.set()
        if self._inet_proc is not None and self._inet_proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._inet_proc.stdin.close()  # the listener exits on EOF, its reader too
        for t in self._threads:
            t.join(timeout=2)
        for s in self._listeners:
            s.close()
        self._watch.close()
        if self._inet_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._inet_proc.wait(timeout=3)
            if self._inet_proc.poll() is None:
                self._inet_proc.kill()
                self._inet_proc.wait()
            if self._inet_proc.stdout is not None:
                self._inet_proc.stdout.close()
        ip_cmd = shutil.which("ip") or "ip"
        if self._veth is not None:
            subprocess.run([ip_cmd, "link", "del", self._veth], capture_output=True)
        if self._netns is not None:
            subprocess.run([ip_cmd, "netns", "del", self._netns], capture_output=True)
        if self._host_proc is not None and self._host_proc.poll() is None:
            self._host_proc.kill()
            self._host_proc.wait()
        if self.secret_dir is not None:
            shutil.rmtree(self.secret_dir, ignore_errors=True)
            if getattr(self, "_made_ssh", None) is not None:
                with contextlib.suppress(OSError):
                    self._made_ssh.rmdir()  # type: ignore[union-attr]


def _proc_state(pid: int) -> tuple[str, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    state, tracer = "?", 0
    for line in status.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("TracerPid:"):
            tracer = int(line.split()[1])
    return state, tracer
