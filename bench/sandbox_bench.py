"""Sandbox benchmark: what containment costs, as ratios to baselines run alongside.

    python bench/sandbox_bench.py [-n 40]

Prints the median wall time of
- a cold sandboxed command: `corral.Sandbox` create + exec `/bin/true` + close (gate off,
  in-memory ledger), against bare `bwrap --unshare-all --ro-bind / / /bin/true`;
- the same through the gate (policy strict), to show the gate's share;
- a bare fork+exec of `/bin/true`, the floor for any command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox


def _median(fn: Callable[[], object], n: int) -> float:
    fn()  # warm caches (page cache, compiled rules)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=40, help="runs per measurement (default 40)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as ws, Ledger.memory() as ledger:
        strict = Policy.load("strict")

        def cold(gate: bool) -> Callable[[], object]:
            def run() -> object:
                with Sandbox(strict, ws, gate=gate, ledger=ledger) as sb:
                    r = sb.run(["/bin/true"])
                    assert r.exit_code == 0, r
                return r

            return run

        def bare_bwrap() -> object:
            return subprocess.run(
                ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "/bin/true"], check=True
            )

        def bare_exec() -> object:
            return subprocess.run(["/bin/true"], check=True)

        n = args.n
        t_bare_exec = _median(bare_exec, n)
        t_bare_bwrap = _median(bare_bwrap, n)
        t_cold = _median(cold(False), n)
        t_cold_gate = _median(cold(True), n)
    print(f"sandbox benchmark · {n} runs each · median wall time · pid {os.getpid()}")
    print(f"  bare fork+exec /bin/true         {t_bare_exec * 1e3:7.2f} ms")
    print(f"  bare bwrap --unshare-all         {t_bare_bwrap * 1e3:7.2f} ms")
    print(
        f"  corral cold sandbox, gate off    {t_cold * 1e3:7.2f} ms  = {t_cold / t_bare_bwrap:.2f}× bare bwrap (target ≤ 1.5×)"
    )
    print(
        f"  corral cold sandbox, gate on     {t_cold_gate * 1e3:7.2f} ms  = {t_cold_gate / t_bare_bwrap:.2f}× bare bwrap"
    )
    print("  warm exec in a session           not measured: persistent sessions are not built yet")


if __name__ == "__main__":
    main()
