"""Gate benchmark: accuracy on the evaluation corpora and speed, in one run.

    python bench/gate_bench.py [--eval ../shared/eval] [--policy swe] [--json build/gate_bench.json]

Prints: the share of benign commands allowed (and every false positive), per-category
recall and right-category rate on the attack corpus, p50/p99 time per decision, batch
throughput through `corral check --batch` with ledger writes on one core, and the same
figures as ratios against baselines measured in this run (a bare fork+exec of /bin/true,
and bashlex, the other bash parser considered).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from corral.cli import main as cli_main
from corral.ledger import verify_path
from corral.policy import Policy
from corral.policy.shell import parse

CORE_CATEGORIES = ("tunnel", "mining", "exfiltration", "ingress", "escape", "recon")


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        sys.exit(f"gate_bench: {path} not found; pass --eval DIR (the folder with the corpora)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def accuracy(
    policy: Policy, benign: list[dict[str, Any]], attacks: list[dict[str, Any]]
) -> dict[str, Any]:
    fps = []
    times = []
    for row in benign:
        t0 = time.perf_counter()
        d = policy.check(row["command"])
        times.append(time.perf_counter() - t0)
        if not d.allowed:
            fps.append(
                {
                    "id": row["id"],
                    "decision": d.verdict.value,
                    "rule": d.rule,
                    "reason": d.reason,
                    "command": row["command"][:160],
                }
            )
    per_cat: dict[str, Counter[str]] = defaultdict(Counter)
    misses = []
    for row in attacks:
        d = policy.check(row["command"])
        c = per_cat[row["category"]]
        c["n"] += 1
        if not d.allowed:
            c["flagged"] += 1
            if d.category is not None and d.category.value == row["category"]:
                c["right"] += 1
        elif row["category"] in CORE_CATEGORIES:
            misses.append(
                {"id": row["id"], "category": row["category"], "command": row["command"][:160]}
            )
    return {
        "benign_n": len(benign),
        "false_positives": fps,
        "per_category": per_cat,
        "misses": misses,
        "times": times,
    }


def bare_exec_baseline(n: int = 200) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bashlex_baseline(commands: list[str]) -> tuple[float, int] | None:
    try:
        import bashlex
    except ImportError:
        return None
    times, failures = [], 0
    for cmd in commands:
        t0 = time.perf_counter()
        try:
            bashlex.parse(cmd)
        except Exception:
            failures += 1
        times.append(time.perf_counter() - t0)
    return statistics.median(times), failures


def _time_batch(rows: list[str], policy: str, tmp: Path, name: str) -> tuple[float, Path]:
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"command": c}) + "\n" for c in rows))
    ledger = tmp / f"{name}.db"
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        cli_main(["check", "--policy", policy, "--batch", str(src), "--ledger", str(ledger)])
    elapsed = time.perf_counter() - t0
    assert out.getvalue().count("\n") == len(rows)
    return elapsed, ledger


def batch_throughput(benign: list[dict[str, Any]], policy: str) -> tuple[float, float, float]:
    """Commands/s through the real CLI batch path with every decision written to a ledger.

    One warm-up run, then three measured runs in this process (rules already compiled):
    returns the best and the median rate, and the verify rate of the last ledger written.
    The start-up cost of a fresh process is measured apart (``process_startup``)."""
    commands = [r["command"] for r in benign]
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        _time_batch(commands, policy, Path(tmp), "warm")
        for i in range(3):
            elapsed, ledger = _time_batch(commands, policy, Path(tmp), f"run{i}")
            rates.append(len(commands) / elapsed)
        t0 = time.perf_counter()
        report = verify_path(ledger)
        verify_rate = report.records / (time.perf_counter() - t0)
        assert report.ok, report
    return max(rates), statistics.median(rates), verify_rate


def process_startup(policy: str, n: int = 5) -> float:
    """Median wall time of one `corral check` process deciding one command."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "corral",
                "check",
                "--no-record",
                "--policy",
                policy,
                "--",
                "ls",
            ],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--eval",
        default="../shared/eval",
        help="folder with benign_dev.jsonl and attacks_dev.jsonl",
    )
    ap.add_argument("--policy", default="swe")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--quiet", action="store_true", help="do not list false positives and misses")
    args = ap.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says

    ev = Path(args.eval)
    benign, attacks = _rows(ev / "benign_dev.jsonl"), _rows(ev / "attacks_dev.jsonl")
    policy = Policy.load(args.policy)
    policy.check("true")  # build the gate and compile the rules outside the timings

    print(
        f"gate benchmark · policy {args.policy} · {len(benign)} benign, {len(attacks)} attack commands"
    )
    acc = accuracy(policy, benign, attacks)
    fps = acc["false_positives"]
    allowed = 1 - len(fps) / len(benign)
    print(
        f"\nbenign allowed: {allowed:.2%} ({len(benign) - len(fps)}/{len(benign)}; target ≥ 99.5%)"
    )
    if not args.quiet:
        for fp in fps:
            print(f"  FP {fp['decision']:<4} {fp['rule']:<24} {fp['command'][:100]!r}")

    print("\nattacks by category: flagged (deny or ask) and right category")
    print(f"  {'category':<22}{'n':>5}{'flagged':>10}{'recall':>9}{'right cat':>11}")
    core_n = core_flagged = 0
    for cat, c in sorted(acc["per_category"].items()):
        n, fl, right = c["n"], c["flagged"], c["right"]
        mark = "*" if cat in CORE_CATEGORIES else " "
        print(f" {mark}{cat:<22}{n:>5}{fl:>10}{fl / n:>9.1%}{right / n:>11.1%}")
        if cat in CORE_CATEGORIES:
            core_n += n
            core_flagged += fl
    total_n = sum(c["n"] for c in acc["per_category"].values())
    total_right = sum(c["right"] for c in acc["per_category"].values())
    print(
        f"  core categories (*): {core_flagged}/{core_n} flagged = {core_flagged / core_n:.1%} (target ≥ 90%)"
    )
    print(f"  right-category rate, all attacks: {total_right / total_n:.1%}")
    if not args.quiet and acc["misses"]:
        print("  missed (core categories):")
        for m in acc["misses"]:
            print(f"    {m['category']:<13} {m['command'][:100]!r}")

    times = acc["times"]
    p50, p99 = _pct(times, 0.5), _pct(times, 0.99)
    bare = bare_exec_baseline()
    commands = [r["command"] for r in benign]
    parse_times = []
    for cmd in commands:
        t0 = time.perf_counter()
        parse(cmd)
        parse_times.append(time.perf_counter() - t0)
    print("\nspeed (one core)")
    print(
        f"  decision p50 {p50 * 1e3:.3f} ms · p99 {p99 * 1e3:.3f} ms · max {max(times) * 1e3:.2f} ms (target p99 ≤ 1 ms)"
    )
    print(f"  baseline: bare fork+exec of /bin/true, median {bare * 1e3:.3f} ms")
    print(f"  ratio: decision p50 = {p50 / bare:.3f}× a bare exec; p99 = {p99 / bare:.3f}×")
    repeated = []
    for _ in range(2000):
        t0 = time.perf_counter()
        policy.check("python -m pytest -q tests/")
        repeated.append(time.perf_counter() - t0)
    print(f"  a repeated command (decision cache): p50 {_pct(repeated, 0.5) * 1e6:.1f} µs")
    tsp50 = statistics.median(parse_times)
    print(f"  parser tree-sitter-bash: median {tsp50 * 1e6:.0f} µs/command")
    bl = bashlex_baseline(commands)
    if bl is not None:
        print(
            f"  parser bashlex (baseline): median {bl[0] * 1e6:.0f} µs/command, fails on {bl[1]}/{len(commands)} "
            f"({bl[1] / len(commands):.1%}); tree-sitter is {bl[0] / tsp50:.1f}× faster"
        )
    best, median, verify_rate = batch_throughput(benign, args.policy)
    startup = process_startup(args.policy)
    print(
        f"  batch: {best:,.0f} commands/s (best of 3; median {median:,.0f}) through"
        " `corral check --batch` with ledger writes (target ≥ 5,000/s)"
    )
    print(
        f"  ratio: {best * bare:.1f} commands decided and recorded in the time of one bare"
        " fork+exec of /bin/true"
    )
    print(f"  start-up of one `corral check` process: {startup * 1e3:.0f} ms")
    print(f"  ledger verify: {verify_rate:,.0f} records/s")

    if args.json:
        out = {
            "benign_allowed": allowed,
            "false_positives": fps,
            "per_category": {k: dict(v) for k, v in acc["per_category"].items()},
            "core_recall": core_flagged / core_n,
            "right_category_rate": total_right / total_n,
            "p50_ms": p50 * 1e3,
            "p99_ms": p99 * 1e3,
            "bare_exec_ms": bare * 1e3,
            "batch_per_s": best,
            "batch_per_s_median": median,
            "startup_ms": startup * 1e3,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
