"""Egress benchmark: what the proxy costs a client, against a direct connection.

    python bench/egress_bench.py [-n 50] [--mb 100]

A server on the host's loopback (127.0.0.2) answers a small GET and streams a large body.
The same client, curl, measures three paths in one run:
- direct: curl on the host, straight to the server;
- proxied: curl inside a sandbox (policy: strict with the proxy on and that server's
  IP:port allowed), through the egress proxy at 127.0.0.1:3128;
- bare relay: curl on the host through a relay that only splices bytes both ways (no
  parsing, no policy, no records), the floor for any user-space hop on this machine.

Printed: the median time to first byte over ``-n`` requests each (curl's
``time_starttransfer``: connect, request, first byte of the answer) and the added time,
and the median throughput of ``--mb`` MB transfers (three each) as a share of direct.
Targets: ≤ 1 ms added to the first byte at the median; ≥ 70% of direct throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox

HOST = "127.0.0.2"
_BLOCK = b"x" * (1 << 20)


def _handle(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):  # a client may hang up early
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ", 2)[1]
        size = int(path.rsplit(b"=", 1)[1]) if b"size=" in path else 6
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
        if size == 6:
            conn.sendall(b"hello\n")
            return
        left = size
        while left:
            n = min(left, len(_BLOCK))
            conn.sendall(_BLOCK[:n])
            left -= n


def _relay_forever(port: int) -> None:
    """A bare relay (``--relay PORT``): splice both ways to the server, no parsing, no
    policy, no records. What any user-space hop costs on this machine."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    print(ls.getsockname()[1], flush=True)

    def pump(a: socket.socket, b: socket.socket) -> None:
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
            while n := os.splice(a.fileno(), w, 1 << 20):
                while n:
                    n -= os.splice(r, b.fileno(), n)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)
        os.close(r)
        os.close(w)

    while True:
        # The request goes through as it is: the server reads only `size=` from it.
        c, _ = ls.accept()
        u = socket.create_connection((HOST, port))
        for sock in (c, u):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(c, u), daemon=True).start()
        threading.Thread(target=pump, args=(u, c), daemon=True).start()


def _serve_forever() -> None:
    """The server's own process (``--serve``): prints its port, serves until killed."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((HOST, 0))
    ls.listen(128)
    print(ls.getsockname()[1], flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


@contextmanager
def _process(*args: str) -> Iterator[int]:
    """This script in another process (``--serve``, ``--relay PORT``); yields its port."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def server() -> contextlib.AbstractContextManager[int]:
    """A minimal HTTP server that streams far faster than the links it measures, in a
    process of its own so that the host's bookkeeping (it writes the proxy's events to
    the ledger) does not share an interpreter lock with it."""
    return _process("--serve")


def _curl_loop(url: str, n: int, fmt: str) -> str:
    return f"for i in $(seq {n}); do curl -s -o /dev/null -w '{fmt}\\n' '{url}' || echo fail; done"


def _floats(text: str) -> list[float]:
    out = []
    for line in text.split():
        try:
            out.append(float(line))
        except ValueError:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=50, help="requests for the first-byte figure")
    ap.add_argument("--mb", type=int, default=100, help="size of the bulk transfer in MB")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--relay", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve_forever()
        return
    if args.relay:
        _relay_forever(args.relay)
        return
    size = args.mb * 1_000_000
    with (
        server() as port,
        _process("--relay", str(port)) as relay_port,
        tempfile.TemporaryDirectory() as ws,
        Ledger.memory() as ledger,
    ):
        small = f"http://{HOST}:{port}/"
        big = f"http://{HOST}:{port}/?size={size}"
        policy = Policy.from_dict(
            {
                "version": 1,
                "extends": "strict",
                "commands": {"default": "allow", "threats": False},
                "network": {"mode": "proxy", "allow": [f"{HOST}:{port}"]},
            }
        )

        relayed_via = f"--noproxy '' -x http://127.0.0.1:{relay_port}"

        def direct(cmd: str) -> str:
            env = {"PATH": "/usr/bin:/bin", "NO_PROXY": "*"}
            return subprocess.run(
                ["bash", "-c", cmd], capture_output=True, text=True, env=env, check=True
            ).stdout

        with Sandbox(policy, ws, gate=False, ledger=ledger) as sb:

            def proxied(cmd: str) -> str:
                r = sb.run(cmd, timeout=600)
                assert r.exit_code == 0, r.stderr
                return r.stdout

            proxied(_curl_loop(small, 3, "%{time_starttransfer}"))  # warm up both paths
            direct(_curl_loop(small, 3, "%{time_starttransfer}"))
            ttfb_direct = _floats(direct(_curl_loop(small, args.n, "%{time_starttransfer}")))
            ttfb_proxy = _floats(proxied(_curl_loop(small, args.n, "%{time_starttransfer}")))
            bps_direct = _floats(direct(_curl_loop(big, 3, "%{speed_download}")))
            relay_small = _curl_loop(small, args.n, "%{time_starttransfer}")
            ttfb_relay = _floats(direct(relay_small.replace("curl ", f"curl {relayed_via} ")))
            relay_big = _curl_loop(big, 3, "%{speed_download}")
            bps_relay = _floats(direct(relay_big.replace("curl ", f"curl {relayed_via} ")))
            bps_proxy = _floats(proxied(_curl_loop(big, 3, "%{speed_download}")))
    if len(ttfb_proxy) != args.n or len(bps_proxy) != 3:
        raise SystemExit("some proxied requests failed; see `corral log`")
    d, p = statistics.median(ttfb_direct), statistics.median(ttfb_proxy)
    bd, bp = statistics.median(bps_direct), statistics.median(bps_proxy)
    r, br = statistics.median(ttfb_relay), statistics.median(bps_relay)
    print(f"egress benchmark · curl · {args.n} small requests, 3 × {args.mb} MB each way")
    print(f"  first byte, direct                {d * 1e3:7.3f} ms")
    print(
        f"  first byte, through the proxy     {p * 1e3:7.3f} ms  = {p / d:.2f}× direct,"
        f" +{(p - d) * 1e3:.3f} ms (target ≤ +1 ms)"
    )
    print(
        f"  first byte, bare relay            {r * 1e3:7.3f} ms  = +{(r - d) * 1e3:.3f} ms"
        " (splice only: what any hop costs here)"
    )
    print(f"  {args.mb} MB, direct                   {bd / 1e6:8.0f} MB/s")
    print(
        f"  {args.mb} MB, through the proxy        {bp / 1e6:8.0f} MB/s  = {bp / bd:.0%} of direct"
        " (target ≥ 70%)"
    )
    print(
        f"  {args.mb} MB, bare relay               {br / 1e6:8.0f} MB/s  = {br / bd:.0%} of direct"
    )


if __name__ == "__main__":
    main()
