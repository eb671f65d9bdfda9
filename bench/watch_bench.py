"""Watch benchmark: how fast a miner is stopped, and what watching costs.

    python bench/watch_bench.py [-n 10] [--sandboxes 100]

Prints, measured in one run:
- detection latency: a miner stand-in (a hashing loop that dials a Stratum pool through
  the egress proxy) is started in a fresh sandbox; from the moment the process starts
  (it writes the time as its first act) to the moment the command returns because the
  watcher killed it; median of ``-n`` runs (target ≤ 1 s);
- monitor overhead: a CPU-bound job in a sandbox, wall time with the watcher on divided
  by the same with it off, median over back-to-back pairs (target ≤ 1.03);
- watcher CPU: the watcher thread's CPU use while ``--sandboxes`` sandboxes each start a
  short process five times a second.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox
from corral.watch.watcher import Watcher

POOL = ("127.0.0.2", 3333)  # a stratum port; the first free one of STRATUM_PORTS is used
STRATUM_PORTS = (3333, 4444, 5555, 7777, 14444)
MINER = f"""
import hashlib, json, socket, time
open("started", "w").write(repr(time.time()))
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"CONNECT {POOL[0]}:{POOL[1]} HTTP/1.1\\r\\n\\r\\n")
s.recv(1024)
s.sendall(json.dumps({{"id": 1, "method": "mining.subscribe", "params": []}}).encode() + b"\\n")
n = 0
while True:
    n += 1
    hashlib.sha256(n.to_bytes(8, "little")).digest()
"""
JOB = "python3 -c 'sum(i * i for i in range(20_000_000))'"


def _pool() -> socket.socket:
    global POOL, MINER
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for port in STRATUM_PORTS:
        try:
            ls.bind((POOL[0], port))
            break
        except OSError:
            continue
    else:
        raise SystemExit(f"no free stratum port on {POOL[0]} among {STRATUM_PORTS}")
    MINER = MINER.replace(f":{POOL[1]} ", f":{port} ")
    POOL = (POOL[0], port)
    ls.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: (c.recv(4096), c.close()), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return ls


def _policy(*allow: str) -> Policy:
    return Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "commands": {"default": "allow", "threats": False},
            "network": {"mode": "proxy", "allow": list(allow)},
        }
    )


def _thread_cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=10, help="miner runs (default 10)")
    ap.add_argument("--sandboxes", type=int, default=100, help="sandboxes for the CPU figure")
    args = ap.parse_args()
    watcher = Watcher()
    pool = _pool()
    latencies = []
    with Ledger.memory() as ledger:
        for _ in range(args.n):
            with tempfile.TemporaryDirectory() as ws:
                Path(ws, "sync.py").write_text(MINER)
                with Sandbox(
                    _policy(f"{POOL[0]}:{POOL[1]}"), ws, gate=False, ledger=ledger, watch=watcher
                ) as sb:
                    r = sb.run("python3 sync.py", timeout=60)
                    ended = time.time()
                started = float(Path(ws, "started").read_text())
                if not any(a.category.value == "mining" for a in r.alerts):
                    raise SystemExit(f"the miner was not caught: {r}")
                latencies.append(ended - started)
        pool.close()

        def job(watch: bool) -> float:
            with (
                tempfile.TemporaryDirectory() as ws,
                Sandbox(
                    _policy(), ws, gate=False, ledger=ledger, watch=watcher if watch else False
                ) as sb,
            ):
                sb.run("true")
                t0 = time.perf_counter()
                r = sb.run(JOB, timeout=120)
                assert r.exit_code == 0, r.stderr
                return time.perf_counter() - t0

        # Pairs run back to back, the ratio taken per pair: the VM's drift over a minute
        # is larger than what is measured.
        ratios = []
        for _ in range(8):
            off = job(False)
            ratios.append(job(True) / off)

        boxes = []
        tmp = tempfile.TemporaryDirectory()
        try:
            for i in range(args.sandboxes):
                box_ws = Path(tmp.name, str(i))
                box_ws.mkdir()
                sb = Sandbox(_policy(), box_ws, gate=False, ledger=ledger, watch=watcher)
                sb.run("(while true; do sleep 0.2; done) > /dev/null 2>&1 &")
                boxes.append(sb)
            tid = watcher._thread.native_id
            assert tid is not None
            c0, t0 = _thread_cpu(tid), time.monotonic()
            time.sleep(5)
            share = (_thread_cpu(tid) - c0) / (time.monotonic() - t0)
        finally:
            for sb in boxes:
                sb.close()
            tmp.cleanup()
    watcher.close()
    med = statistics.median(latencies)
    ratio = statistics.median(ratios)
    print(f"watch benchmark · {args.n} miner runs · sources: {', '.join(watcher.sources)}")
    print(
        f"  miner start to kill (median)      {med * 1e3:7.0f} ms  (max {max(latencies) * 1e3:.0f} ms;"
        " target ≤ 1000 ms)"
    )
    print(
        f"  CPU-bound job, watcher on / off   {ratio:7.3f}  (median of 8 back-to-back pairs;"
        f" pairs ranged {min(ratios):.2f}–{max(ratios):.2f}; target ≤ 1.03)"
    )
    print(
        f"  watcher CPU, {args.sandboxes} busy sandboxes  {share:7.1%} of one core"
        f" ({json.dumps(watcher.interval)} s ticks)"
    )


if __name__ == "__main__":
    main()
