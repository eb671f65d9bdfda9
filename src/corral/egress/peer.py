"""Which process in a sandbox opened a connection to the proxy.

The proxy sees only an address on the sandbox's loopback. The kernel's socket diagnostics
(``NETLINK_SOCK_DIAG``, asked through a netlink socket made inside the sandbox's network
namespace) map that address to a socket inode in one exact lookup; the sandbox's process
tree (walked down from its pid 1) has exactly one descriptor naming that inode. Without
the netlink socket the namespace's ``/proc/PID/net/tcp`` table is read instead: that walks
every socket of the host and took 1-4 ms per connection on a busy machine, on a path
every first byte waits for. Best effort: a client that has already exited is not found.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass

from corral.procfs import descendants

_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
_NLMSG_HDR = struct.Struct("=IHHII")
_INODE_OFFSET = 16 + 4 + 48 + 12 + 4  # nlmsghdr, family..retrans, sockid, expires..uid


@dataclass(frozen=True, slots=True)
class Client:
    pid: int  # as the host sees it
    argv: list[str]


class SockDiag:
    """Exact socket lookups through a ``NETLINK_SOCK_DIAG`` socket of one namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(1.0)
        self._lock = threading.Lock()
        self._seq = 0

    def inode(self, transport: str, port: int, server_port: int) -> str | None:
        """The inode of the loopback socket on ``port`` talking to ``server_port``."""
        proto = socket.IPPROTO_TCP if transport == "tcp" else socket.IPPROTO_UDP
        loop = socket.inet_aton("127.0.0.1") + bytes(12)
        dst = loop if transport == "tcp" else bytes(16)
        dport = server_port if transport == "tcp" else 0
        req = (
            struct.pack("=BBBBI", socket.AF_INET, proto, 0, 0, _ALL_STATES)
            + struct.pack("!HH", port, dport)
            + loop
            + dst
            + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
        )
        with self._lock:
            self._seq += 1
            msg = _NLMSG_HDR.pack(16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, self._seq, 0)
            try:
                self.sock.send(msg + req)
                data = self.sock.recv(65536)
            except OSError:
                return None
        if len(data) < 16:
            return None
        _len, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data)
        if kind == _NLMSG_ERROR or len(data) < _INODE_OFFSET + 4:
            return None
        return str(struct.unpack_from("=I", data, _INODE_OFFSET)[0])


def _inode(init_pid: int, transport: str, port: int, server_port: int) -> str | None:
    want_local = f":{port:04X}"
    want_remote = f":{server_port:04X}"
    for table in (transport, transport + "6"):
        try:
            with open(f"/proc/{init_pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10 or not cols[1].endswith(want_local):
                        continue
                    if transport == "tcp" and not cols[2].endswith(want_remote):
                        continue
                    return cols[9]
        except OSError:
            continue
    return None


def find_client(
    init_pid: int, transport: str, port: int, server_port: int, diag: SockDiag | None = None
) -> Client | None:
    """The process holding the ``transport`` socket bound to ``port`` in the sandbox whose
    pid 1 is ``init_pid`` (``server_port``: the proxy side's port, for TCP)."""
    inode = diag.inode(transport, port, server_port) if diag is not None else None
    if inode is None:
        inode = _inode(init_pid, transport, port, server_port)
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in descendants(init_pid):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != target:
                    continue
            except OSError:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    raw = f.read(4096)
            except OSError:
                raw = b""
            argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
            return Client(pid, argv)
    return None
