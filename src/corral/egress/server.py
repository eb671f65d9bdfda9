"""The egress proxy process: every way out of every sandbox on this host.

    python -m corral.egress.server --control FD [--hosts FILE]

It holds listening sockets that live inside sandboxes' network namespaces (see
``corral.sandbox.netns``), handed over on the control socket (``FD``, a unix
``SOCK_SEQPACKET``) with the policy's network section. For each connection it parses the
request (``http1``, ``socks5``, ``tls``, ``dnsmsg``: sans-IO), decides (``decide``),
resolves once, connects to the address it checked, and relays. Every attempt, allowed or
not, goes back on the control socket as one JSON event; the host writes it to the ledger
with the action that was running.

Design choices, measured (``bench/egress_bench.py``):
- asyncio waits on the listening sockets and the DNS stub (thousands of idle sockets
  cost one event loop); each accepted connection then goes to a pool thread that reads
  the request, decides, connects and copies with ``splice(2)``, the other direction on a
  second thread: the bytes never enter Python. Done on the event loop instead, the same
  handshake took several loop turns and thread hand-offs and added 3–4 ms to the first
  byte; blocking code on a warm pool thread adds well under 1 ms.
- One process for all sandboxes of a host: if it dies, every sandbox loses its way out at
  once (its listening sockets die with it) and the host stops them.
- When the control socket closes (the host is gone) the proxy exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from corral.egress import dnsmsg, http1, socks5, tls
from corral.egress.decide import BYTES_KEY, EgressDecision, EgressRules
from corral.egress.peer import SockDiag, find_client
from corral.policy import netdest

CONNECT_TIMEOUT = 10.0
HEAD_TIMEOUT = 30.0
# How long a tunnel waits for the client's first bytes (a TLS ClientHello, to check its
# SNI) before assuming the server speaks first (SSH, SMTP) and connecting anyway.
FIRST_BYTES_WAIT = 2.0
# Connections one sandbox may hold open at once. Each takes a thread while it lasts; the
# cap keeps one sandbox from starving the others (a flood of idle connections).
MAX_OPEN = 256
_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


@dataclass
class Lane:
    """One bubblewrap's listening sockets (a sandbox may have several over its life)."""

    sandbox: str
    lane: str
    pid: int
    servers: list[Any] = field(default_factory=list)
    socks: list[socket.socket] = field(default_factory=list)
    diag: SockDiag | None = None


@dataclass
class SandboxState:
    rules: EgressRules
    max_bytes: int | None
    max_connections: int | None
    bytes_key: str = "network.max_bytes"  # the policy key the byte budget came from
    bytes_used: int = 0
    connections: int = 0
    lanes: dict[str, Lane] = field(default_factory=dict)
    open: set[socket.socket] = field(default_factory=set)
    handling: int = 0  # connections being handled now
    lock: threading.Lock = field(default_factory=threading.Lock)


class Proxy:
    def __init__(self, control: socket.socket, hosts: dict[str, list[str]]) -> None:
        self.control = control
        self.hosts = hosts
        self.sandboxes: dict[str, SandboxState] = {}
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self._send_lock = threading.Lock()
        # Connections are handled by blocking code on pool threads: measured, one thread
        # hop per connection costs less first-byte time than several event-loop turns.
        self.pool = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="corral-conn")

    # ---- control channel -------------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        """One event to the host (thread-safe: relay threads report byte counts)."""
        event.setdefault("t", time.time())
        data = json.dumps(event, separators=(",", ":")).encode()
        with self._send_lock, contextlib.suppress(OSError):
            self.control.sendall(data)

    def on_control(self) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.control, 1 << 16, 16)
        except BlockingIOError:
            return
        except OSError:
            msg, fds = b"", []
        if not msg:
            if not self.done.done():
                self.done.set_result(None)
            return
        try:
            self.handle(json.loads(msg), fds)
        except Exception as exc:  # a bad message must not take every sandbox down
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.emit({"type": "error", "message": f"control message rejected: {exc}"})

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg["op"]
        if op == "attach":
            self.attach(msg, fds)
        elif op == "detach":
            self.detach(msg["sandbox"], msg.get("lane"))
        elif op == "ping":
            self.emit({"type": "pong", "id": msg.get("id")})
        else:
            raise ValueError(f"unknown op {op!r}")

    def attach(self, msg: dict[str, Any], fds: list[int]) -> None:
        sid = msg["sandbox"]
        state = self.sandboxes.get(sid)
        if state is None:
            network = dict(msg["network"])
            bytes_key = network.pop(BYTES_KEY, "network.max_bytes")
            state = SandboxState(
                EgressRules.from_dict(network, msg.get("policy", "policy")),
                network.get("max_bytes"),
                network.get("max_connections"),
                bytes_key=bytes_key,
            )
            self.sandboxes[sid] = state
        lane = Lane(sid, msg["lane"], int(msg["pid"]))
        state.lanes[lane.lane] = lane
        for name, fd in zip(msg["endpoints"], fds, strict=True):
            sock = socket.socket(fileno=fd)
            lane.socks.append(sock)
            if name == "diag":
                lane.diag = SockDiag(sock)
                continue
            sock.setblocking(False)
            if name == "dns":
                self.loop.create_task(self._serve_udp(state, lane, sock))
            else:
                handler = {"http": self.serve_http, "socks": self.serve_socks}.get(name)
                if handler is None:
                    handler = self.serve_dns_tcp
                self.loop.create_task(self._serve(state, lane, sock, handler))
        self.emit({"type": "attached", "sandbox": sid, "lane": lane.lane})

    def detach(self, sid: str, lane_id: str | None) -> None:
        """Stop listening for one bubblewrap (``lane_id``) or, with None, for the whole
        sandbox: its connections are cut, and once their last events are out the host
        hears ``detached`` (so it can close its ledger knowing nothing is pending)."""
        state = self.sandboxes.get(sid)
        if state is None:
            if lane_id is None:
                self.emit({"type": "detached", "sandbox": sid})
            return
        lanes = [lane_id] if lane_id else list(state.lanes)
        for lid in lanes:
            lane = state.lanes.pop(lid, None)
            if lane is None:
                continue
            for server in lane.servers:
                if isinstance(server, asyncio.Task):
                    server.cancel()
                else:
                    server.close()
            for s in lane.socks:
                s.close()
        if lane_id is None:
            # Established connections end with the sandbox; budgets lived as long.
            del self.sandboxes[sid]
            with state.lock:
                cut = list(state.open)
            for sock in cut:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.pool.submit(self._drained, sid, state)

    def _drained(self, sid: str, state: SandboxState, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with state.lock:
                if not state.open:
                    break
            time.sleep(0.005)
        self.emit({"type": "detached", "sandbox": sid})

    async def _serve(
        self,
        state: SandboxState,
        lane: Lane,
        sock: socket.socket,
        handler: Callable[[SandboxState, Lane, socket.socket], None],
    ) -> None:
        async def accept_loop() -> None:
            while True:
                try:
                    conn, _ = await self.loop.sock_accept(sock)
                except OSError:  # closed: the sandbox is gone
                    return
                with state.lock:
                    full = state.handling >= MAX_OPEN
                    state.handling += not full
                if full:
                    conn.close()
                    self.record(
                        lane,
                        "tcp",
                        None,
                        EgressDecision(
                            False, "net-budget", f"more than {MAX_OPEN} connections open at once"
                        ),
                    )
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(HEAD_TIMEOUT)
                self.pool.submit(self._handle, handler, state, lane, conn)

        lane.servers.append(self.loop.create_task(accept_loop()))

    def _handle(
        self,
        handler: Callable[[SandboxState, Lane, socket.socket], None],
        state: SandboxState,
        lane: Lane,
        conn: socket.socket,
    ) -> None:
        try:
            handler(state, lane, conn)
        except Exception as exc:  # one bad connection must not stop the others
            self.emit({"type": "error", "sandbox": lane.sandbox, "message": repr(exc)[:500]})
        finally:
            conn.close()
            with state.lock:
                state.handling -= 1

    # ---- decisions and events ------------------------------------------------------------

    def record(
        self,
        lane: Lane,
        protocol: str,
        client: socket.socket | Future[dict[str, Any]] | None,
        decision: EgressDecision,
        **fields: Any,
    ) -> None:
        """One attempt to the host, with the sandbox process that made it (``client``:
        the connection, or what ``who`` already found out about it)."""
        event: dict[str, Any] = {
            "type": "net",
            "t": time.time(),
            "sandbox": lane.sandbox,
            "protocol": protocol,
            "allowed": decision.allowed,
            "rule": decision.rule,
            "reason": decision.reason,
            "pattern": decision.pattern,
            "category": decision.category.value if decision.category else None,
            **fields,
        }
        if isinstance(client, Future):
            event.update(client.result())
        elif client is not None:
            event.update(self.who(lane, client))
        self.emit(event)

    def who(self, lane: Lane, client: socket.socket) -> dict[str, Any]:
        """The sandbox process behind a connection. Asked while the client still waits
        for an answer: a quick one may be gone once its response has arrived."""
        try:
            port, local = client.getpeername()[1], client.getsockname()[1]
        except OSError:
            return {"pid": None}
        found = find_client(lane.pid, "tcp", port, local, lane.diag)
        return {"pid": found.pid, "process": found.argv} if found else {"pid": None}

    def emit_alert(self, lane: Lane, detector: str, category: str, reason: str) -> None:
        self.emit(
            {
                "type": "alert",
                "sandbox": lane.sandbox,
                "detector": detector,
                "category": category,
                "reason": reason,
            }
        )

    def budget(self, state: SandboxState) -> EgressDecision | None:
        with state.lock:
            if state.max_connections is not None and state.connections >= state.max_connections:
                return EgressDecision(
                    False,
                    "net-budget",
                    f"connection budget spent ({state.max_connections}, network.max_connections)",
                )
            if state.max_bytes is not None and state.bytes_used >= state.max_bytes:
                return EgressDecision(
                    False,
                    "net-budget",
                    f"byte budget spent ({state.max_bytes}, {state.bytes_key})",
                )
            state.connections += 1
        return None

    def resolve(
        self, state: SandboxState, host: str, port: int
    ) -> tuple[str | None, EgressDecision]:
        """The first resolved address the policy allows, and the decision on it."""
        try:
            if host in self.hosts:
                addrs = list(self.hosts[host])
            elif netdest.is_ip(host):
                addrs = [host]
            else:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
        except OSError as exc:
            return None, EgressDecision(False, "net-unresolved", f"{host} does not resolve: {exc}")
        first: EgressDecision | None = None
        for ip in addrs:
            d = state.rules.check_address(host, ip, port)
            if d.allowed:
                return ip, d
            first = first or d
        return None, first or EgressDecision(False, "net-unresolved", f"{host} has no address")

    def open_upstream(
        self, state: SandboxState, host: str, port: int, first: EgressDecision
    ) -> tuple[socket.socket | None, EgressDecision, str | None]:
        """Resolve once, check every address, connect to the one checked."""
        ip, decision = self.resolve(state, host, port)
        if ip is None:
            return None, decision, None
        spent = self.budget(state)
        if spent is not None:
            return None, spent, ip
        try:
            up = socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            failed = EgressDecision(False, "net-connect-failed", f"{host}:{port} ({ip}): {why}")
            return None, failed, ip
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The rule that let it through is the one worth recording.
        return up, first if first.pattern else decision, ip

    # ---- HTTP and CONNECT ---------------------------------------------------------------

    def _refusal(self, state: SandboxState, decision: EgressDecision) -> bytes:
        if decision.rule in ("net-connect-failed", "net-unresolved"):
            body = f"corral: could not connect ({decision.rule}): {decision.reason}\n"
            return http1.response(502, "Bad Gateway", body, [("X-Corral-Rule", decision.rule)])
        body = (
            f"corral: blocked by policy {state.rules.policy!r}, rule {decision.rule}:"
            f" {decision.reason}\n"
        )
        return http1.response(403, "Forbidden", body, [("X-Corral-Rule", decision.rule)])

    def serve_http(self, state: SandboxState, lane: Lane, client: socket.socket) -> None:
        reader = http1.HeadReader()
        try:
            head = None
            while head is None:
                data = client.recv(65536)
                if not data:
                    return
                head = reader.feed(data)
        except http1.HttpError as exc:
            self.record(lane, "http", client, EgressDecision(False, "net-bad-request", str(exc)))
            _send(client, http1.response(exc.status, "Bad Request", f"corral: {exc}\n"))
            return
        except OSError:
            return
        # Looked up beside the connect, not before it: it is on every first byte's path.
        who = self.pool.submit(self.who, lane, client)
        protocol = "connect" if head.is_connect else "http"
        fields: dict[str, Any] = {"host": head.host, "port": head.port, "method": head.method}
        if not head.is_connect:
            fields["path"] = head.path[:200]
        first = state.rules.check(head.host, head.port, head.method)
        if not first.allowed:
            self.record(lane, protocol, who, first, **fields)
            _send(client, self._refusal(state, first))
            return
        up, decision, ip = self.open_upstream(state, head.host, head.port, first)
        fields["ip"] = ip
        if up is None:
            self.record(lane, protocol, who, decision, **fields)
            _send(client, self._refusal(state, decision))
            return
        # Found before anything is forwarded: once its answer arrives, a quick client
        # may be gone before the lookup (run beside the connect) is done.
        _settled(who)
        with up:
            if head.is_connect:
                _send(client, b"HTTP/1.1 200 Connection established\r\n\r\n")
                early = _first_bytes(client, reader.rest)
                fronting = _fronting(head.host, early)
                if fronting is not None:
                    self.record(lane, protocol, who, fronting, **fields)
                    self.emit_alert(lane, "domain-fronting", "defense-evasion", fronting.reason)
                    return
                self.relay(state, lane, client, up, early, decision, protocol, fields, who)
                return
            # One request per connection: its body, and nothing after it (a pipelined
            # second request would reach the server unchecked).
            body, rest = _request_body(head, reader.rest)
            early = http1.forward_head(head) + body
            self.relay(state, lane, client, up, early, decision, protocol, fields, who, rest)

    # ---- SOCKS5 -------------------------------------------------------------------------

    def serve_socks(self, state: SandboxState, lane: Lane, client: socket.socket) -> None:
        reader = socks5.Socks5Reader()
        request = None
        try:
            while request is None:
                data = client.recv(4096)
                if not data:
                    return
                out, request = reader.feed(data)
                if out:
                    client.sendall(out)
        except socks5.SocksError as exc:
            self.record(lane, "socks5", client, EgressDecision(False, "net-bad-request", str(exc)))
            if exc.reply:
                _send(client, exc.reply)
            return
        except OSError:
            return
        who = self.pool.submit(self.who, lane, client)
        fields: dict[str, Any] = {"host": request.host, "port": request.port}
        first = state.rules.check(request.host, request.port, None)
        if not first.allowed:
            self.record(lane, "socks5", who, first, **fields)
            _send(client, socks5.reply(socks5.REPLY_NOT_ALLOWED))
            return
        up, decision, ip = self.open_upstream(state, request.host, request.port, first)
        fields["ip"] = ip
        if up is None:
            self.record(lane, "socks5", who, decision, **fields)
            code = {
                "net-connect-failed": socks5.REPLY_REFUSED,
                "net-unresolved": socks5.REPLY_HOST_UNREACHABLE,
            }.get(decision.rule, socks5.REPLY_NOT_ALLOWED)
            _send(client, socks5.reply(code))
            return
        _settled(who)
        with up:
            bound = up.getsockname()
            _send(client, socks5.reply(socks5.REPLY_SUCCEEDED, bound[0], bound[1]))
            early = reader.rest
            if request.is_name:
                early = _first_bytes(client, early)
                fronting = _fronting(request.host, early)
                if fronting is not None:
                    self.record(lane, "socks5", who, fronting, **fields)
                    self.emit_alert(lane, "domain-fronting", "defense-evasion", fronting.reason)
                    return
            self.relay(state, lane, client, up, early, decision, "socks5", fields, who)

    # ---- DNS ----------------------------------------------------------------------------

    async def dns_answer(
        self, state: SandboxState, lane: Lane, data: bytes, peer: Any
    ) -> bytes | None:
        try:
            q = dnsmsg.parse_query(data)
        except dnsmsg.DnsFormatError:
            return dnsmsg.format_error(data)
        signs = dnsmsg.exfiltration_signs(q.name)
        decision = state.rules.check_name(q.name)
        answer: list[str] = []
        if signs is not None:
            decision = EgressDecision(False, "dns-exfiltration", f"{q.name}: {signs}")
        elif decision.allowed and q.qtype in ("A", "AAAA"):
            answer = await self._lookup(q.name, q.qtype)
        event = {
            "type": "dns",
            "sandbox": lane.sandbox,
            "name": q.name,
            "qtype": q.qtype,
            "allowed": decision.allowed,
            "rule": decision.rule,
            "reason": decision.reason,
            "answer": answer,
        }
        if peer is not None:
            found = find_client(lane.pid, "udp", peer[1], 53, lane.diag)
            event.update({"pid": found.pid, "process": found.argv} if found else {"pid": None})
        self.emit(event)
        if signs is not None:
            self.emit_alert(
                lane, "dns-exfiltration", "exfiltration", f"query for {q.name}: {signs}"
            )
        if not decision.allowed:
            return dnsmsg.refuse(q)
        return dnsmsg.answer(q, answer)

    async def _lookup(self, name: str, qtype: str) -> list[str]:
        if name in self.hosts:
            addrs = self.hosts[name]
        else:
            family = socket.AF_INET6 if qtype == "AAAA" else socket.AF_INET
            try:
                infos = await self.loop.getaddrinfo(name, None, family=family)
            except OSError:
                return []
            addrs = [str(i[4][0]) for i in infos]
        want6 = qtype == "AAAA"
        return list(dict.fromkeys(a for a in addrs if (":" in a) == want6))

    async def _serve_udp(self, state: SandboxState, lane: Lane, sock: socket.socket) -> None:
        proxy = self

        class Dns(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: Any) -> None:
                async def reply() -> None:
                    out = await proxy.dns_answer(state, lane, data, addr)
                    if out is not None:
                        self.transport.sendto(out, addr)

                proxy.loop.create_task(reply())

        transport, _ = await self.loop.create_datagram_endpoint(Dns, sock=sock)
        lane.servers.append(transport)

    def serve_dns_tcp(self, state: SandboxState, lane: Lane, client: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                    chunk = client.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                size = int.from_bytes(buf[:2], "big")
                msg, buf = buf[2 : 2 + size], buf[2 + size :]
                fut = asyncio.run_coroutine_threadsafe(
                    self.dns_answer(state, lane, msg, None), self.loop
                )
                out = fut.result(timeout=HEAD_TIMEOUT)
                if out is None:
                    return
                client.sendall(len(out).to_bytes(2, "big") + out)
        except (TimeoutError, OSError):
            return

    # ---- relaying -----------------------------------------------------------------------

    def relay(
        self,
        state: SandboxState,
        lane: Lane,
        client: socket.socket,
        up: socket.socket,
        first: bytes,
        decision: EgressDecision,
        protocol: str,
        fields: dict[str, Any],
        who: Future[dict[str, Any]],
        body: int | http1.ChunkedBody | None = None,
    ) -> None:
        """Record the attempt, then copy both ways until both sides are done, counting
        bytes against the sandbox's budget. Runs on a pool thread; the other direction
        gets a thread of its own."""
        client.settimeout(None)
        up.settimeout(None)
        counts = [0, 0]
        with state.lock:
            state.open.update((client, up))
        try:
            if first:
                up.sendall(first)
                self._take(state, counts, 0, len(first))
            back = self.pool.submit(self._pump, state, up, client, counts, 1)
            self.record(lane, protocol, who, decision, **fields)
            if body is None:  # a tunnel: everything, both ways
                ends = [self._pump(state, client, up, counts, 0)]
            else:  # the rest of one request's body, then nothing
                ends = [self._request_rest(state, client, up, counts, body)]
            ends.append(back.result())
        except OSError:
            ends = ["error"]
        finally:
            with state.lock:
                state.open.discard(client)
                state.open.discard(up)
        if "budget" in ends:
            cut = EgressDecision(
                False,
                "net-budget",
                f"byte budget spent ({state.max_bytes}, {state.bytes_key}); connection cut",
            )
            self.record(lane, protocol, who, cut, **fields)
        self.emit(
            {
                "type": "net-closed",
                "sandbox": lane.sandbox,
                "protocol": protocol,
                "host": fields.get("host"),
                "port": fields.get("port"),
                "bytes_up": counts[0],
                "bytes_down": counts[1],
            }
        )

    def _pump(
        self, state: SandboxState, src: socket.socket, dst: socket.socket, counts: list[int], i: int
    ) -> str:
        end = "error"
        try:
            end = _copy(src, dst, lambda n: self._take(state, counts, i, n))
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            if end == "budget":
                # The other direction stops too: the sandbox may move no more bytes.
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        return end

    def _request_rest(
        self,
        state: SandboxState,
        client: socket.socket,
        up: socket.socket,
        counts: list[int],
        body: int | http1.ChunkedBody,
    ) -> str:
        """Copy what is left of a request body (a byte count, or a chunked body read
        until its end), then stop reading the client."""
        try:
            while body if isinstance(body, int) else not body.done:
                want = min(_CHUNK, body) if isinstance(body, int) else 65536
                room = self._take(state, counts, 0, want)
                if room <= 0:
                    return "budget"
                data = client.recv(room)
                self._take(state, counts, 0, len(data) - room)
                if not data:
                    return "eof"
                if isinstance(body, int):
                    body -= len(data)
                else:
                    end = body.feed(data)
                    data = data if end is None else data[:end]
                up.sendall(data)
        except (OSError, http1.HttpError):
            return "error"
        return "eof"

    def _take(self, state: SandboxState, counts: list[int], index: int, n: int) -> int:
        """Grant up to ``n`` bytes (negative: return unused ones) from the budget."""
        with state.lock:
            if n > 0 and state.max_bytes is not None:
                n = min(n, state.max_bytes - state.bytes_used)
                if n <= 0:
                    return 0
            state.bytes_used += n
        counts[index] += n
        return n


def _settled(fut: Future[Any], timeout: float = 2.0) -> None:
    with contextlib.suppress(Exception):
        fut.result(timeout)


def _request_body(
    head: http1.RequestHead, rest: bytes
) -> tuple[bytes, int | http1.ChunkedBody | None]:
    """The part of ``rest`` (bytes read past the head) that is this request's body, and
    what is left of the body to read: a byte count or a chunked-body tracker."""
    if head.is_chunked:
        tracker = http1.ChunkedBody()
        end = tracker.feed(rest)
        return (rest, tracker) if end is None else (rest[:end], 0)
    length = head.content_length or 0
    return rest[:length], max(0, length - len(rest))


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _first_bytes(client: socket.socket, already: bytes) -> bytes:
    """The client's opening bytes: a whole TLS ClientHello if it sends one. A client
    that says nothing for a while may be waiting for the server to speak first."""
    data = already
    deadline = time.monotonic() + FIRST_BYTES_WAIT
    try:
        while not tls.peek_client_hello(data).complete:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            client.settimeout(left)
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data


def _fronting(host: str, early: bytes) -> EgressDecision | None:
    """A TLS ClientHello naming another server than the tunnel asked for: the allowed
    name is a front for a forbidden one (domain fronting)."""
    if not early:
        return None
    hello = tls.peek_client_hello(early)
    if not hello.is_tls or hello.sni is None or host == hello.sni:
        return None
    return EgressDecision(
        False,
        "net-sni-mismatch",
        f"the tunnel is for {host} but its TLS handshake names {hello.sni} (domain fronting)",
    )


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _copy(src: socket.socket, dst: socket.socket, take: Callable[[int], int]) -> str:
    """Blocking copy from src to dst, in the kernel (splice through a pipe): ``eof``,
    ``error`` or ``budget``. ``take(n)`` grants up to ``n`` more bytes from the sandbox's
    budget (0: spent), asked before each move so that no chunk overshoots it."""
    r, w = os.pipe()
    # A pipe holds 64 KiB by default: one splice per 64 KiB. A larger one moves more per
    # call (the limit is /proc/sys/fs/pipe-max-size, 1 MiB by default).
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)
    try:
        while True:
            room = take(_CHUNK)
            if room <= 0:
                return "budget"
            try:
                n = os.splice(src.fileno(), w, room)
            except OSError:
                return "error"
            take(n - room)  # give back what was granted and not moved
            if n == 0:
                return "eof"
            left = n
            while left:
                try:
                    left -= os.splice(r, dst.fileno(), left)
                except OSError:
                    return "error"
    finally:
        os.close(r)
        os.close(w)


async def serve(control_fd: int, hosts: dict[str, list[str]]) -> None:
    # A relay thread that wakes with data waits for the interpreter lock; the default
    # switch interval (5 ms) would let a busy thread hold it that long.
    sys.setswitchinterval(0.0002)
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    proxy = Proxy(control, hosts)
    proxy.loop.add_reader(control.fileno(), proxy.on_control)
    proxy.emit({"type": "ready", "pid": os.getpid()})
    await proxy.done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m corral.egress.server", description=__doc__)
    ap.add_argument("--control", type=int, required=True, help="control socket descriptor")
    ap.add_argument(
        "--hosts",
        type=Path,
        help="JSON object mapping host names to address lists, consulted before DNS",
    )
    args = ap.parse_args(argv)
    hosts = json.loads(args.hosts.read_text()) if args.hosts else {}
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.control, hosts))
    sys.exit(0)


if __name__ == "__main__":
    main()
