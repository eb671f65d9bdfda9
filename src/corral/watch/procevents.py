"""Fork, exec and exit of every process on the machine, from the kernel's proc connector.

The proc connector multicasts one netlink datagram per event the moment it happens, so
the watcher learns of a process even if it lives for a microsecond, which no scan of
/proc can promise. Wire format (``linux/netlink.h``, ``linux/connector.h``,
``linux/cn_proc.h``), all in host byte order::

    struct nlmsghdr   { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }     16 bytes
    struct cn_msg     { u32 idx; u32 val; u32 seq; u32 ack; u16 len; u16 flags; }  20
    struct proc_event { u32 what; u32 cpu; u64 timestamp_ns; union {...}; }   16 + union

``parse`` turns datagrams into ``ProcEvent``s without touching a socket, so every layout
case is tested without the kernel; ``ProcConnector`` is the thin socket around it.

Kernel behaviour worth knowing (checked on 6.18):
- recent kernels (upstream since 6.6; seen on 6.18) let any user in the initial user and
  PID namespaces listen, and ack an unprivileged subscription with err 0; older kernels
  need CAP_NET_ADMIN for both the bind and the subscription;
- from any other user or PID namespace the subscription is dropped silently: no ack, no
  events. ``open`` therefore waits for the ack and reports its absence;
- the ack echoes our ``ack`` field plus one, but not our ``seq``, and goes to every
  listener, so ours is matched on a random ``ack`` value;
- exit events carry ``parent_pid``/``parent_tgid`` after ``exit_signal`` on newer
  kernels; the parser only needs the first four fields and accepts either length.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Final, NamedTuple

# linux/netlink.h
NETLINK_CONNECTOR: Final = 11
NLMSG_DONE: Final = 3  # the connector sends every message with this type
NLMSG_HDRLEN: Final = 16
# linux/connector.h
CN_IDX_PROC: Final = 1
CN_VAL_PROC: Final = 1
# linux/cn_proc.h
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2
PROC_EVENT_NONE: Final = 0x00000000  # the kernel's ack of a (un)subscription
PROC_EVENT_FORK: Final = 0x00000001
PROC_EVENT_EXEC: Final = 0x00000002
PROC_EVENT_EXIT: Final = 0x80000000
# asm-generic/socket.h: not exported by Python's socket module.
SO_RCVBUFFORCE: Final = 33

_NLMSGHDR: Final = struct.Struct("=IHHII")
_CN_MSG: Final = struct.Struct("=IIIIHH")
_EVENT_HEAD: Final = struct.Struct("=IIQ")  # what, cpu, timestamp_ns (8-aligned in C: no gap)
_U32: Final = struct.Struct("=I")
_U32X2: Final = struct.Struct("=II")
_U32X4: Final = struct.Struct("=IIII")

# A burst of process churn must not overflow the queue between two watcher ticks: one
# event costs ~1 KiB of socket memory, so 4 MiB holds a few thousand.
RCVBUF_BYTES: Final = 4 << 20
# One read() drains at most this many datagrams, so a fork bomb cannot pin the watcher's
# thread in here forever; the fd stays readable and the next read() goes on.
_MAX_DATAGRAMS_PER_READ: Final = 16384
_RECV_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class ProcEvent:
    """One process-level event. ``pid`` is always the process (thread group) id."""

    what: str  # "fork" | "exec" | "exit"
    pid: int  # the process (tgid) it is about: for fork the CHILD tgid
    tid: int  # thread id (for fork: child pid field)
    ppid: int | None  # fork: the parent tgid; else None
    exit_code: int | None  # exit: the raw wait status (as os.waitstatus_to_exitcode takes)
    timestamp_ns: int  # nanoseconds since boot, CLOCK_MONOTONIC (ktime_get_ns)


class _Record(NamedTuple):
    """One proc_event as it came, before it is judged process-level or not."""

    ack: int  # cn_msg.ack: our subscription's ack + 1 on the kernel's answer to it
    what: int
    timestamp_ns: int
    body: bytes  # the union, as long as the message had it


def _records(data: bytes) -> Iterator[_Record]:
    """Every proc connector message in one datagram; stops quietly at the first damage."""
    off = 0
    end = len(data)
    while off + NLMSG_HDRLEN <= end:
        length, kind, _flags, _seq, _port = _NLMSGHDR.unpack_from(data, off)
        # A length that cannot be right means we cannot find the next message either.
        if length < NLMSG_HDRLEN or off + length > end:
            return
        if kind == NLMSG_DONE:
            payload = data[off + NLMSG_HDRLEN : off + length]
            if len(payload) >= _CN_MSG.size:
                idx, val, _cseq, ack, cn_len, _cflags = _CN_MSG.unpack_from(payload)
                event = payload[_CN_MSG.size : _CN_MSG.size + cn_len]
                if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC) and len(event) >= _EVENT_HEAD.size:
                    what, _cpu, ts = _EVENT_HEAD.unpack_from(event)
                    yield _Record(ack, what, ts, event[_EVENT_HEAD.size :])
        off += (length + 3) & ~3  # NLMSG_ALIGN


def _event(rec: _Record) -> ProcEvent | None:
    body = rec.body
    if rec.what == PROC_EVENT_FORK and len(body) >= _U32X4.size:
        _parent_pid, parent_tgid, child_pid, child_tgid = _U32X4.unpack_from(body)
        # A new thread is not a new process (and its "parent" is the process's parent,
        # which would read as a second fork of the process).
        if child_pid != child_tgid:
            return None
        return ProcEvent("fork", child_tgid, child_pid, parent_tgid, None, rec.timestamp_ns)
    if rec.what == PROC_EVENT_EXEC and len(body) >= _U32X2.size:
        # exec makes the calling thread the leader first, so pid == tgid here.
        pid, tgid = _U32X2.unpack_from(body)
        return ProcEvent("exec", tgid, pid, None, None, rec.timestamp_ns)
    if rec.what == PROC_EVENT_EXIT and len(body) >= _U32X4.size:
        pid, tgid, exit_code, _exit_signal = _U32X4.unpack_from(body)
        # Every thread reports its exit; only the leader's is the process's.
        if pid != tgid:
            return None
        return ProcEvent("exit", tgid, pid, None, exit_code, rec.timestamp_ns)
    return None


def parse(data: bytes) -> list[ProcEvent]:
    """Events in one received datagram (which may hold several netlink messages).

    Unknown event kinds, other connectors' messages, thread creation and the exits of
    non-leader threads are skipped; damaged data ends the parse with what came before it.
    Never raises.
    """
    out: list[ProcEvent] = []
    for rec in _records(bytes(data)):
        ev = _event(rec)
        if ev is not None:
            out.append(ev)
    return out


def _acks(data: bytes) -> list[tuple[int, int]]:
    """(cn_msg.ack, err) of each subscription answer in one datagram."""
    return [
        (rec.ack, _U32.unpack_from(rec.body)[0])
        for rec in _records(bytes(data))
        if rec.what == PROC_EVENT_NONE and len(rec.body) >= _U32.size
    ]


def subscribe_message(*, op: int = PROC_CN_MCAST_LISTEN, ack: int = 0) -> bytes:
    """The datagram that starts (or with ``op=PROC_CN_MCAST_IGNORE`` stops) the events.

    The kernel answers with a PROC_EVENT_NONE message whose cn_msg.ack is ``ack + 1``.
    """
    payload = _U32.pack(op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0) + payload
    return _NLMSGHDR.pack(NLMSG_HDRLEN + len(cn), NLMSG_DONE, 0, 0, 0) + cn


def _errname(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


class _Opened(NamedTuple):
    sock: socket.socket
    pending: list[ProcEvent]
    dropped: int


class ProcConnector:
    """The kernel's stream of fork/exec/exit events for the whole machine."""

    # Why the last open() returned None (None after a successful open). A class
    # attribute so that callers that only hold the class can say why they run blind.
    last_error: ClassVar[str | None] = None

    def __init__(
        self, sock: socket.socket, pending: list[ProcEvent] | None = None, dropped: int = 0
    ) -> None:
        """Wrap an already subscribed socket; use ``open()``."""
        self._sock: socket.socket | None = sock
        self._pending = pending or []
        self._buf = bytearray(_RECV_SIZE)
        # How many times the kernel said it dropped events (ENOBUFS) because the queue
        # was full; each time is one or more lost events, so the picture has holes.
        self.dropped = dropped

    @classmethod
    def open(cls, *, timeout: float = 1.0) -> ProcConnector | None:
        """Subscribe; None (never an exception) when unavailable, with ``last_error`` set.

        Waits up to ``timeout`` seconds for the kernel to acknowledge the subscription,
        since from a non-initial namespace the kernel ignores it without an error.
        """
        try:
            got = _open(timeout)
        except Exception as e:  # the watcher must go on without the connector, not die
            got = f"the proc connector failed unexpectedly: {e!r}"
        if isinstance(got, str):
            cls.last_error = got
            return None
        cls.last_error = None
        return cls(got.sock, got.pending, got.dropped)

    def fileno(self) -> int:
        """For select/poll; -1 once closed."""
        return self._sock.fileno() if self._sock is not None else -1

    def read(self) -> list[ProcEvent]:
        """Everything queued now, oldest first; [] when nothing. Never blocks.

        ENOBUFS (the kernel dropped events) is counted in ``dropped``; any other socket
        error is a broken connector and raises OSError.
        """
        out, self._pending = self._pending, []
        sock = self._sock
        if sock is None:
            return out
        view = memoryview(self._buf)
        for _ in range(_MAX_DATAGRAMS_PER_READ):
            try:
                n, addr = sock.recvfrom_into(self._buf)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.dropped += 1
                    continue
                raise
            # A privileged local process can unicast to our port; only the kernel (port 0)
            # is believed, so nothing but the kernel writes the processes' history.
            if addr[0] != 0:
                continue
            out.extend(parse(bytes(view[:n])))
        return out

    def close(self) -> None:
        """Unsubscribe and close; safe to call twice."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        # Kernels before 6.6 count listeners globally and only an IGNORE lowers the count;
        # while it is above zero every fork on the machine pays for an event.
        with contextlib.suppress(OSError):
            sock.send(subscribe_message(op=PROC_CN_MCAST_IGNORE))
        sock.close()

    def __enter__(self) -> ProcConnector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _open(timeout: float) -> _Opened | str:
    """A subscribed, non-blocking socket, or why there cannot be one."""
    family = getattr(socket, "AF_NETLINK", None)
    if family is None:
        return "the proc connector is Linux-only; process events come from /proc scans only"
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as e:
        return (
            f"cannot open a NETLINK_CONNECTOR socket ({_errname(e.errno)}: {e.strerror}): "
            "the kernel needs CONFIG_CONNECTOR and CONFIG_PROC_EVENTS, and a seccomp or "
            "LSM policy may forbid netlink"
        )
    try:
        got = _subscribe(sock, timeout)
    except BaseException:
        sock.close()
        raise
    if isinstance(got, str):
        sock.close()
    return got


def _subscribe(sock: socket.socket, timeout: float) -> _Opened | str:
    # SO_RCVBUFFORCE passes net.core.rmem_max but needs CAP_NET_ADMIN; without it the
    # plain option still gets up to rmem_max.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
    try:
        sock.bind((0, CN_IDX_PROC))  # port 0: the kernel picks a free port id
    except OSError as e:
        return (
            f"joining the proc connector's multicast group was refused ({_errname(e.errno)}): "
            "run corral as root or give it CAP_NET_ADMIN (kernels before 6.6 require it)"
        )
    sock.setblocking(False)
    ack = secrets.randbelow(0xFFFF_FFFE) + 1  # never 0xFFFFFFFF: the answer is ack + 1
    try:
        sock.send(subscribe_message(ack=ack))
    except OSError as e:
        return (
            f"the proc connector subscription could not be sent ({_errname(e.errno)}): "
            "run corral as root or give it CAP_NET_ADMIN"
        )
    pending: list[ProcEvent] = []
    dropped = 0
    buf = bytearray(_RECV_SIZE)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return (
                f"the kernel did not acknowledge the proc connector subscription within "
                f"{timeout:g}s: it serves only processes in the initial user and PID "
                "namespaces, so run the watcher on the host, not in a container or user "
                "namespace"
            )
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            continue
        try:
            n, addr = sock.recvfrom_into(buf)
        except BlockingIOError:
            continue
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                return f"reading from the proc connector failed ({_errname(e.errno)})"
            dropped += 1
            continue
        if addr[0] != 0:
            continue
        data = bytes(buf[:n])
        # Events of other processes may come before our ack (another listener keeps the
        # stream going); they are real and are handed to the first read().
        pending.extend(parse(data))
        for got_ack, err in _acks(data):
            if got_ack != (ack + 1) & 0xFFFF_FFFF:
                continue  # another listener's answer: the kernel multicasts acks
            if err != 0:
                return (
                    f"the kernel refused the proc connector subscription "
                    f"({_errname(err)}: {os.strerror(err)}): run corral as root or give it "
                    "CAP_NET_ADMIN"
                )
            return _Opened(sock, pending, dropped)
