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
- asyncio for the handshakes (thousands of idle sockets cost nothing), then each
  direction of an established connection is copied by ``splice(2)`` in a thread of its
  own: the bytes never enter Python, which keeps bulk transfers near a direct
  connection's speed.
- One process for all sandboxes of a host: if it dies, every sandbox loses its way out at
  once (its listening sockets die with it) and the host stops them.
- When the control socket closes (the host is gone) the proxy exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from corral.egress import dnsmsg, http1, socks5, tls
from corral.egress.decide import EgressDecision, EgressRules
from corral.egress.peer import find_client

CONNECT_TIMEOUT = 10.0
HEAD_TIMEOUT = 30.0
# How long a tunnel waits for the client's first bytes (a TLS ClientHello, to check its
# SNI) before assuming the server speaks first (SSH, SMTP) and connecting anyway.
FIRST_BYTES_WAIT = 2.0
_CHUNK = 1 << 20


@dataclass
class Lane:
    """One bubblewrap's listening sockets (a sandbox may have several over its life)."""

    sandbox: str
    lane: str
    pid: int
    servers: list[Any] = field(default_factory=list)
    socks: list[socket.socket] = field(default_factory=list)


@dataclass
class SandboxState:
    rules: EgressRules
    max_bytes: int | None
    max_connections: int | None
    bytes_used: int = 0
    connections: int = 0
    lanes: dict[str, Lane] = field(default_factory=dict)
    open: set[socket.socket] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Proxy:
    def __init__(self, control: socket.socket, hosts: dict[str, list[str]]) -> None:
        self.control = control
        self.hosts = hosts
        self.sandboxes: dict[str, SandboxState] = {}
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self._send_lock = threading.Lock()

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
            network = msg["network"]
            state = SandboxState(
                EgressRules.from_dict(network, msg.get("policy", "policy")),
                network.get("max_bytes"),
                network.get("max_connections"),
            )
            self.sandboxes[sid] = state
        lane = Lane(sid, msg["lane"], int(msg["pid"]))
        state.lanes[lane.lane] = lane
        for name, fd in zip(msg["endpoints"], fds, strict=True):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            lane.socks.append(sock)
            if name == "dns":
                self.loop.create_task(self._serve_udp(state, lane, sock))
            else:
                handler = {"http": self.serve_http, "socks": self.serve_socks}.get(name)
                if handler is None:
                    handler = self.serve_dns_tcp
                self.loop.create_task(self._serve(state, lane, sock, handler))
        self.emit({"type": "attached", "sandbox": sid, "lane": lane.lane})

    def detach(self, sid: str, lane_id: str | None) -> None:
        state = self.sandboxes.get(sid)
        if state is None:
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
        if not state.lanes:
            # Established connections end with the sandbox.
            for s in list(state.open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            del self.sandboxes[sid]

    async def _serve(
        self,
        state: SandboxState,
        lane: Lane,
        sock: socket.socket,
        handler: Callable[[SandboxState, Lane, socket.socket], Awaitable[None]],
    ) -> None:
        async def accept_loop() -> None:
            while True:
                try:
                    conn, _ = await self.loop.sock_accept(sock)
                except OSError:  # closed: the sandbox is gone
                    return
                conn.setblocking(False)
                self.loop.create_task(self._handle(handler, state, lane, conn))

        lane.servers.append(self.loop.create_task(accept_loop()))

    async def _handle(
        self,
        handler: Callable[[SandboxState, Lane, socket.socket], Awaitable[None]],
        state: SandboxState,
        lane: Lane,
        conn: socket.socket,
    ) -> None:
        try:
            await handler(state, lane, conn)
        except Exception as exc:  # one bad connection must not stop the others
            self.emit({"type": "error", "sandbox": lane.sandbox, "message": repr(exc)[:500]})
        finally:
            conn.close()

    # ---- decisions and events ------------------------------------------------------------

    def record(
        self,
        lane: Lane,
        protocol: str,
        client: socket.socket | None,
        decision: EgressDecision,
        **fields: Any,
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "net",
            "sandbox": lane.sandbox,
            "protocol": protocol,
            "allowed": decision.allowed,
            "rule": decision.rule,
            "reason": decision.reason,
            "pattern": decision.pattern,
            "category": decision.category.value if decision.category else None,
            **fields,
        }
        if client is not None:
            event.update(self._who(lane, client, fields.get("transport", "tcp")))
        self.emit(event)
        return event

    def _who(self, lane: Lane, client: socket.socket, transport: str) -> dict[str, Any]:
        try:
            port = client.getpeername()[1]
            local = client.getsockname()[1]
        except OSError:
            return {}
        found = find_client(lane.pid, transport, port, local)
        return {"pid": found.pid, "process": found.argv} if found else {"pid": None}

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
                    False, "net-budget", f"byte budget spent ({state.max_bytes}, network.max_bytes)"
                )
            state.connections += 1
        return None

    async def resolve(
        self, state: SandboxState, host: str, port: int
    ) -> tuple[str | None, EgressDecision]:
        """The first resolved address the policy allows, and the decision on it."""
        try:
            if host in self.hosts:
                addrs = list(self.hosts[host])
            else:
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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

    async def open_upstream(
        self, state: SandboxState, host: str, port: int, first: EgressDecision
    ) -> tuple[socket.socket | None, EgressDecision, str | None]:
        """Resolve once, check, connect to the checked address."""
        ip, decision = await self.resolve(state, host, port)
        if ip is None:
            return None, decision, None
        if not first.allowed or not decision.allowed:
            return None, decision, ip
        spent = self.budget(state)
        if spent is not None:
            return None, spent, ip
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        up = socket.socket(family, socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(up, (ip, port)), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            up.close()
            why = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            return (
                None,
                EgressDecision(False, "net-connect-failed", f"{host}:{port} ({ip}): {why}"),
                ip,
            )
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The rule that let it through is the one worth recording.
        return up, first if first.pattern else decision, ip

    # ---- HTTP and CONNECT ---------------------------------------------------------------

    def _forbidden(self, lane: Lane, decision: EgressDecision) -> bytes:
        state = self.sandboxes.get(lane.sandbox)
        policy = state.rules.policy if state else "policy"
        status = 502 if decision.rule in ("net-connect-failed", "net-unresolved") else 403
        body = f"corral: blocked by policy {policy!r}, rule {decision.rule}: {decision.reason}\n"
        if status == 502:
            body = f"corral: could not connect ({decision.rule}): {decision.reason}\n"
        reason = "Forbidden" if status == 403 else "Bad Gateway"
        return http1.response(status, reason, body, [("X-Corral-Rule", decision.rule)])

    async def serve_http(self, state: SandboxState, lane: Lane, client: socket.socket) -> None:
        reader = http1.HeadReader()
        try:
            head = await asyncio.wait_for(self._read_head(client, reader), HEAD_TIMEOUT)
        except http1.HttpError as exc:
            bad = EgressDecision(False, "net-bad-request", str(exc))
            self.record(lane, "http", client, bad)
            await self._send(client, http1.response(exc.status, "Bad Request", f"corral: {exc}\n"))
            return
        except (TimeoutError, OSError, EOFError):
            return
        if head is None:
            return
        protocol = "connect" if head.is_connect else "http"
        first = state.rules.check(head.host, head.port, head.method)
        fields: dict[str, Any] = {"host": head.host, "port": head.port, "method": head.method}
        if not head.is_connect:
            fields["path"] = head.path[:200]
        if not first.allowed:
            self.record(lane, protocol, client, first, **fields)
            await self._send(client, self._forbidden(lane, first))
            return
        up, decision, ip = await self.open_upstream(state, head.host, head.port, first)
        fields["ip"] = ip
        if up is None:
            self.record(lane, protocol, client, decision, **fields)
            await self._send(client, self._forbidden(lane, decision))
            return
        try:
            if head.is_connect:
                await self._send(client, b"HTTP/1.1 200 Connection established\r\n\r\n")
                early = await self._first_bytes(client, reader.rest)
                fronting = self._fronting(head.host, early)
                if fronting is not None:
                    self.record(lane, protocol, client, fronting, **fields)
                    self.emit_alert(lane, "domain-fronting", "defense-evasion", fronting.reason)
                    return
                self.record(lane, protocol, client, decision, **fields)
                await self.relay(state, lane, client, up, early, fields, protocol)
            else:
                self.record(lane, protocol, client, decision, **fields)
                await self.relay(
                    state,
                    lane,
                    client,
                    up,
                    http1.forward_head(head) + reader.rest,
                    fields,
                    protocol,
                )
            up = None  # relay owns and closes it
        finally:
            if up is not None:
                up.close()

    async def _read_head(
        self, client: socket.socket, reader: http1.HeadReader
    ) -> http1.RequestHead | None:
        while True:
            data = await self.loop.sock_recv(client, 65536)
            if not data:
                return None
            head = reader.feed(data)
            if head is not None:
                return head

    async def _first_bytes(self, client: socket.socket, already: bytes) -> bytes:
        """The client's opening bytes: a whole TLS ClientHello if it sends one."""
        data = already
        deadline = self.loop.time() + FIRST_BYTES_WAIT
        while not tls.peek_client_hello(data).complete:
            left = deadline - self.loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(self.loop.sock_recv(client, 65536), left)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        return data

    def _fronting(self, host: str, early: bytes) -> EgressDecision | None:
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

    # ---- SOCKS5 -------------------------------------------------------------------------

    async def serve_socks(self, state: SandboxState, lane: Lane, client: socket.socket) -> None:
        reader = socks5.Socks5Reader()
        request = None
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                while request is None:
                    data = await self.loop.sock_recv(client, 4096)
                    if not data:
                        return
                    out, request = reader.feed(data)
                    if out:
                        await self._send(client, out)
        except socks5.SocksError as exc:
            self.record(lane, "socks5", client, EgressDecision(False, "net-bad-request", str(exc)))
            if exc.reply:
                await self._send(client, exc.reply)
            return
        except (TimeoutError, OSError):
            return
        fields: dict[str, Any] = {"host": request.host, "port": request.port}
        first = state.rules.check(request.host, request.port, None)
        if not first.allowed:
            self.record(lane, "socks5", client, first, **fields)
            await self._send(client, socks5.reply(socks5.REPLY_NOT_ALLOWED))
            return
        up, decision, ip = await self.open_upstream(state, request.host, request.port, first)
        fields["ip"] = ip
        if up is None:
            self.record(lane, "socks5", client, decision, **fields)
            code = {
                "net-connect-failed": socks5.REPLY_REFUSED,
                "net-unresolved": socks5.REPLY_HOST_UNREACHABLE,
            }.get(decision.rule, socks5.REPLY_NOT_ALLOWED)
            await self._send(client, socks5.reply(code))
            return
        try:
            bound = up.getsockname()
            await self._send(client, socks5.reply(socks5.REPLY_SUCCEEDED, bound[0], bound[1]))
            early = await self._first_bytes(client, reader.rest) if request.is_name else reader.rest
            fronting = self._fronting(request.host, early) if request.is_name else None
            if fronting is not None:
                self.record(lane, "socks5", client, fronting, **fields)
                self.emit_alert(lane, "domain-fronting", "defense-evasion", fronting.reason)
                return
            self.record(lane, "socks5", client, decision, **fields)
            await self.relay(state, lane, client, up, early, fields, "socks5")
            up = None
        finally:
            if up is not None:
                up.close()

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
            found = find_client(lane.pid, "udp", peer[1], 53)
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

    async def serve_dns_tcp(self, state: SandboxState, lane: Lane, client: socket.socket) -> None:
        buf = b""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                while True:
                    while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                        chunk = await self.loop.sock_recv(client, 4096)
                        if not chunk:
                            return
                        buf += chunk
                    size = int.from_bytes(buf[:2], "big")
                    msg, buf = buf[2 : 2 + size], buf[2 + size :]
                    out = await self.dns_answer(state, lane, msg, None)
                    if out is None:
                        return
                    await self._send(client, len(out).to_bytes(2, "big") + out)
        except (TimeoutError, OSError):
            return

    # ---- relaying -----------------------------------------------------------------------

    async def _send(self, sock: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):
            await self.loop.sock_sendall(sock, data)

    async def relay(
        self,
        state: SandboxState,
        lane: Lane,
        client: socket.socket,
        up: socket.socket,
        first: bytes,
        fields: dict[str, Any],
        protocol: str,
    ) -> None:
        """Copy both ways until both sides are done; count bytes against the budget."""
        state.open.update((client, up))
        if first:
            await self._send(up, first)
        counts = [len(first), 0]
        done = self.loop.create_future()
        ends: list[str] = []

        def pump(src: socket.socket, dst: socket.socket, index: int) -> None:
            end = "error"
            try:
                end = _copy(src, dst, lambda n: self._count(state, counts, index, n))
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                if end == "budget":
                    # The other direction stops too: the sandbox may send no more.
                    for s in (src, dst):
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                ends.append(end)
                if len(ends) == 2:
                    self.loop.call_soon_threadsafe(_settle, done)

        client.setblocking(True)
        up.setblocking(True)
        for args in ((client, up, 0), (up, client, 1)):
            threading.Thread(target=pump, args=args, daemon=True, name="corral-relay").start()
        try:
            await done
        finally:
            state.open.discard(client)
            state.open.discard(up)
            up.close()
            if "budget" in ends:
                d = EgressDecision(
                    False,
                    "net-budget",
                    f"byte budget spent ({state.max_bytes}, network.max_bytes); connection cut",
                )
                self.record(lane, protocol, None, d, **fields)
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

    def _count(self, state: SandboxState, counts: list[int], index: int, n: int) -> bool:
        """Add ``n`` bytes; False once the sandbox's byte budget is spent."""
        counts[index] += n
        with state.lock:
            state.bytes_used += n
            return state.max_bytes is None or state.bytes_used <= state.max_bytes


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _copy(src: socket.socket, dst: socket.socket, count: Callable[[int], bool]) -> str:
    """Blocking copy from src to dst, in the kernel (splice through a pipe): ``eof``,
    ``error`` or ``budget`` (``count`` said the byte budget is spent)."""
    r, w = os.pipe()
    try:
        while True:
            try:
                n = os.splice(src.fileno(), w, _CHUNK)
            except OSError:
                return "error"
            if n == 0:
                return "eof"
            left = n
            while left:
                try:
                    left -= os.splice(r, dst.fileno(), left)
                except OSError:
                    return "error"
            if not count(n):
                return "budget"
    finally:
        os.close(r)
        os.close(w)


async def serve(control_fd: int, hosts: dict[str, list[str]]) -> None:
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
