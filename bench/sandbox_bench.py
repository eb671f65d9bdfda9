"""Sandbox benchmark: what containment costs, as ratios to baselines run alongside.

    python bench/sandbox_bench.py [-n 40]

Prints the median wall time of
- a cold sandboxed command: `corral.Sandbox` create + exec `/bin/true` + close (gate off,
  in-memory ledger), against bare `bwrap --unshare-all --ro-bind / / /bin/true`, and
  against bubblewrap given corral's own sandbox command line (minimal /dev, /proc, sized
  tmpfs, hidden paths, seccomp) running `/bin/true`: what the sandbox definition itself
  costs in bubblewrap, before corral's shell, cgroup and bookkeeping;
- the same through the gate (policy strict), to show the gate's share;
- a bare fork+exec of `/bin/true` from Python (subprocess, which uses vfork), the floor
  for any command, and the same from a shell (`bash` running `/bin/true` in a loop,
  per iteration): what any shell session pays per command before a sandbox is involved;
- a warm command: `/bin/true` in an open sandbox's persistent shell, against both;
- memory per idle sandbox (its bubblewrap and shell, proportional set size) with
  `--idle` sandboxes open at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox, seccomp
from corral.sandbox.backend import SandboxSpec
from corral.sandbox.bwrap import bwrap_argv


def _median(fn: Callable[[], object], n: int) -> float:
    fn()  # warm caches (page cache, compiled rules)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children.get(cur, []))
    return out


def _shell_exec(count: int) -> float:
    """Per-command time of a bash loop running /bin/true (one bash, so its startup is
    spread over ``count`` commands and is negligible)."""
    script = f"for ((i=0; i<{count}; i++)); do /bin/true; done"
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(["bash", "--noprofile", "--norc", "-c", script], check=True)
        runs.append((time.perf_counter() - t0) / count)
    return statistics.median(runs)


def idle_memory(policy: Policy, ws: str, ledger: Ledger, count: int) -> tuple[float, int]:
    """Mean proportional set size of an idle sandbox's processes, ``count`` open at once."""
    boxes = []
    try:
        for _ in range(count):
            sb = Sandbox(policy, ws, gate=False, ledger=ledger)
            sb.run("true")  # start its shell, then leave it idle
            boxes.append(sb)
        total = 0
        for sb in boxes:
            session = sb.backend._boxes[sb.id].sessions["default"]  # type: ignore[attr-defined]
            total += sum(_pss(p) for p in _tree(session.proc.pid))
        return total / len(boxes), len(boxes)
    finally:
        for sb in boxes:
            sb.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=40, help="runs per measurement (default 40)")
    ap.add_argument("--idle", type=int, default=200, help="idle sandboxes held open at once")
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

        spec = SandboxSpec.from_policy(strict, ws)

        def corral_line_bwrap() -> object:
            fd = seccomp.filter_fd()
            try:
                cmd = bwrap_argv(spec, ["/bin/true"], seccomp_fd=fd)
                return subprocess.run(cmd, check=True, pass_fds=(fd,))
            finally:
                os.close(fd)

        def bare_exec() -> object:
            return subprocess.run(["/bin/true"], check=True)

        n = args.n
        t_bare_exec = _median(bare_exec, n)
        t_shell_exec = _shell_exec(n * 5)
        t_bare_bwrap = _median(bare_bwrap, n)
        t_line_bwrap = _median(corral_line_bwrap, n)
        t_cold = _median(cold(False), n)
        t_cold_gate = _median(cold(True), n)
        with Sandbox(strict, ws, gate=False, ledger=ledger) as sb:
            t_warm = _median(lambda: sb.run("/bin/true"), n * 5)
            t_warm_gate = 0.0
        with Sandbox(strict, ws, gate=True, ledger=ledger) as sb:
            t_warm_gate = _median(lambda: sb.run("/bin/true"), n * 5)
        per_idle, idle_n = idle_memory(strict, ws, ledger, args.idle)
    print(f"sandbox benchmark · {n} runs each · median wall time · pid {os.getpid()}")
    print(f"  bare fork+exec /bin/true         {t_bare_exec * 1e3:7.2f} ms  (Python subprocess)")
    print(
        f"  shell fork+exec /bin/true        {t_shell_exec * 1e3:7.2f} ms  (bash loop, per command)"
    )
    print(f"  bare bwrap --unshare-all         {t_bare_bwrap * 1e3:7.2f} ms")
    print(
        f"  bwrap, corral's sandbox line     {t_line_bwrap * 1e3:7.2f} ms  = {t_line_bwrap / t_bare_bwrap:.2f}× bare bwrap"
    )
    print(
        f"  corral cold sandbox, gate off    {t_cold * 1e3:7.2f} ms  = {t_cold / t_bare_bwrap:.2f}× bare bwrap (target ≤ 1.5×), {t_cold / t_line_bwrap:.2f}× corral's line"
    )
    print(
        f"  corral cold sandbox, gate on     {t_cold_gate * 1e3:7.2f} ms  = {t_cold_gate / t_bare_bwrap:.2f}× bare bwrap"
    )
    print(
        f"  corral warm command, gate off    {t_warm * 1e3:7.2f} ms  = {t_warm / t_bare_exec:.2f}× bare fork+exec (target ≤ 2×), {t_warm / t_shell_exec:.2f}× shell fork+exec"
    )
    print(
        f"  corral warm command, gate on     {t_warm_gate * 1e3:7.2f} ms  = {t_warm_gate / t_bare_exec:.2f}× bare fork+exec"
    )
    print(
        f"  memory per idle sandbox          {per_idle / 2**20:7.2f} MiB (PSS of its bubblewrap and shell, {idle_n} open; target ≤ 4 MiB)"
    )


if __name__ == "__main__":
    main()
