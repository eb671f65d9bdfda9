"""Which process in a sandbox opened a connection to the proxy.

The proxy sees only an address on the sandbox's loopback. The sandbox's socket table
(``/proc/PID/net/tcp`` of any process in its network namespace) maps that address to a
socket inode, and the sandbox's process tree (walked down from its pid 1) has exactly one
descriptor naming that inode. Best effort: a client that has already exited is not found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Client:
    pid: int  # as the host sees it
    argv: list[str]


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


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        try:
            tasks = os.listdir(f"/proc/{cur}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{cur}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return out


def find_client(init_pid: int, transport: str, port: int, server_port: int) -> Client | None:
    """The process holding the ``transport`` socket bound to ``port`` in the sandbox whose
    pid 1 is ``init_pid`` (``server_port``: the proxy side's port, for TCP)."""
    inode = _inode(init_pid, transport, port, server_port)
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in _descendants(init_pid):
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
