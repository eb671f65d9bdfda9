"""Listening sockets made inside a sandbox's network namespace, held outside it.

The sandbox's network namespace has nothing but loopback. Its one way out is a handful of
sockets that listen on that loopback (``127.0.0.1:3128`` for HTTP, ``:1080`` for SOCKS5,
``:53`` for DNS) but belong to the egress proxy on the host: a socket stays in the
namespace it was made in, wherever its descriptor goes. So the sandbox gets no interface,
no route and no process of ours inside it, and when the proxy dies the sockets close with
it: connections are refused, nothing is left to carry traffic (fail closed).

Why not a unix socket bound into the sandbox with a bridge process inside: the bridge
would run as the sandbox's user (killable, replaceable by the agent), cost a process and
several MiB per sandbox, and need a relay hop per byte.

Making a socket in another namespace takes ``setns``: as root a short-lived thread
enters the namespace (only that thread moves); without root a forked child first enters
the user namespace that owns the sandbox's network namespace (its owner, our user, may),
and passes the sockets back over a unix socket (``SCM_RIGHTS``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import threading
import time
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NS_GET_USERNS = 0xB701  # ioctl on a namespace: its owning user namespace, as a new fd
NETLINK_SOCK_DIAG = 4


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    type: int  # socket.SOCK_STREAM or SOCK_DGRAM; SOCK_RAW for the netlink one
    port: int
    family: int = socket.AF_INET


# What the sandbox sees on its loopback; the proxy behind each is in corral.egress.
ENDPOINTS = (
    Endpoint("http", socket.SOCK_STREAM, 3128),
    Endpoint("socks", socket.SOCK_STREAM, 1080),
    Endpoint("dns", socket.SOCK_DGRAM, 53),
    Endpoint("dns-tcp", socket.SOCK_STREAM, 53),
    # Not a way out: the proxy asks the kernel through it which socket (and so which
    # process) a connection came from (corral.egress.peer).
    Endpoint("diag", socket.SOCK_RAW, 0, socket.AF_NETLINK),
)

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _make(endpoints: tuple[Endpoint, ...]) -> list[socket.socket]:
    out = []
    try:
        for ep in endpoints:
            if ep.family == socket.AF_NETLINK:
                out.append(socket.socket(socket.AF_NETLINK, ep.type, NETLINK_SOCK_DIAG))
                continue
            s = socket.socket(ep.family, ep.type)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", ep.port))
            if ep.type == socket.SOCK_STREAM:
                s.listen(512)
            s.setblocking(False)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


def listeners_in(pid: int, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> dict[str, socket.socket]:
    """Sockets listening on the loopback of ``pid``'s network namespace, by endpoint name."""
    make = _via_thread if os.geteuid() == 0 else _via_child
    # bubblewrap brings the namespace's loopback up a moment after it reports the pid;
    # until then 127.0.0.1 cannot be bound.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            socks = make(pid, endpoints)
            break
        except OSError as exc:
            if (
                "Cannot assign requested address" not in str(exc)
                and exc.errno != errno.EADDRNOTAVAIL
            ):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)
    return {ep.name: s for ep, s in zip(endpoints, socks, strict=True)}


def _via_thread(pid: int, endpoints: tuple[Endpoint, ...]) -> list[socket.socket]:
    result: list[socket.socket] = []
    errors: list[BaseException] = []

    def work() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target, CLONE_NEWNET)
                try:
                    result.extend(_make(endpoints))
                finally:
                    # If this failed the thread would still end here, taking the
                    # namespace it is in with it: no other thread ever moved.
                    _setns(own, CLONE_NEWNET)
            finally:
                os.close(target)
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(own)

    t = threading.Thread(target=work, name="corral-netns")
    t.start()
    t.join()
    if errors:
        for s in result:
            s.close()
        raise errors[0]
    return result


def _via_child(pid: int, endpoints: tuple[Endpoint, ...]) -> list[socket.socket]:
    net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    # The user namespace that owns the network one: not the process's own, which
    # bubblewrap's --disable-userns nests one level deeper, and from inside which the
    # network namespace is out of reach.
    user = fcntl.ioctl(net, NS_GET_USERNS)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked child
            code = 1
            try:
                ours.close()
                # Entering a user namespace needs a single-threaded process; this child
                # is one. Its owner (our uid) may enter it, and then the network one.
                _setns(user, CLONE_NEWUSER)
                _setns(net, CLONE_NEWNET)
                made = _make(endpoints)
                socket.send_fds(theirs, [b"ok"], [s.fileno() for s in made])
                code = 0
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    theirs.sendall(f"error {exc}".encode()[:1000])
            finally:
                os._exit(code)
        theirs.close()
        ours.settimeout(10)
        msg, fds, _flags, _addr = socket.recv_fds(ours, 1024, len(endpoints))
        _pid, status = os.waitpid(child, 0)
        if msg != b"ok" or len(fds) != len(endpoints):
            for fd in fds:
                os.close(fd)
            why = msg.decode(errors="replace").removeprefix("error ") or f"status {status}"
            raise OSError(f"could not open the sandbox's egress sockets: {why}")
        return [
            socket.socket(fileno=fd)  # family and type are read back from the descriptor
            for fd in fds
        ]
    finally:
        ours.close()
        theirs.close()
        os.close(user)
        os.close(net)
