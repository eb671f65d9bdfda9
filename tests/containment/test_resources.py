"""Resource bombs stop inside the sandbox, and closing it leaves nothing behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox

from ..procs import running

LIMITED = Policy.from_dict(
    {
        "version": 1,
        "extends": "strict",
        "commands": {"default": "allow", "threats": False},
        "resources": {"memory": "256MiB", "pids": 64, "cpus": 1},
    }
)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    with Ledger.memory() as ledger, Sandbox(LIMITED, tmp_path, gate=False, ledger=ledger) as sb:
        yield sb


def _cgroup_dirs(sb: Sandbox) -> list[Path]:
    cg = sb.backend._boxes[sb.id].cgroup  # type: ignore[attr-defined]
    return list(cg.dirs) if cg else []


def test_limits_come_from_a_cgroup(sandbox: Sandbox) -> None:
    assert sandbox.backend.limits(sandbox.id) in ("cgroup-v1", "cgroup-v2")  # type: ignore[attr-defined]


def test_memory_bomb_is_oom_killed_inside_with_a_clear_reason(sandbox: Sandbox) -> None:
    r = sandbox.run("python3 -c 'x = bytearray(1 << 30); print(len(x))'", timeout=60)
    assert r.exit_code == 137 and r.stdout == ""
    assert "out of memory" in r.stderr
    # The sandbox itself lives on.
    assert sandbox.run("echo alive").stdout == "alive\n"


def test_fork_bomb_stops_at_the_pids_limit(sandbox: Sandbox) -> None:
    r = sandbox.run(":(){ :|:& };: ; sleep 1; echo survived", timeout=30)
    assert not r.timed_out
    assert "process limit (64)" in r.stderr
    assert sandbox.run("echo alive").stdout == "alive\n"


def test_tmp_is_charged_to_the_sandbox_memory(sandbox: Sandbox) -> None:
    # 400 MiB into a tmpfs with a 256 MiB memory limit: the writer is stopped.
    r = sandbox.run("head -c 400M /dev/zero > /tmp/fill; echo $?", timeout=60)
    assert r.stdout.strip() != "0" or r.exit_code != 0


def test_exec_record_has_cpu_time_and_peak_memory(tmp_path: Path) -> None:
    with Ledger.memory() as ledger, Sandbox(LIMITED, tmp_path, gate=False, ledger=ledger) as sb:
        sb.run("python3 -c 'sum(range(3_000_000))'")
        (rec,) = list(ledger.records(kinds="exec"))
    assert rec.body["cpu_s"] is not None and rec.body["cpu_s"] > 0
    assert rec.body["peak_memory"] is not None and rec.body["peak_memory"] > 0


def test_closing_leaves_no_process_cgroup_or_mount(tmp_path: Path) -> None:
    mounts_before = Path("/proc/self/mountinfo").read_text()
    with Ledger.memory() as ledger:
        sb = Sandbox(LIMITED, tmp_path, gate=False, ledger=ledger)
        r = sb.run("setsid nohup sleep 1000.25 > /dev/null 2>&1 & echo started", timeout=10)
        assert r.stdout == "started\n"
        dirs = _cgroup_dirs(sb)  # made with the sandbox's first process
        assert dirs and all(d.is_dir() for d in dirs)
        deadline = time.monotonic() + 5
        while not running("sleep 1000.25") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running("sleep 1000.25")  # the daemon runs before the close
        sb.close()
    assert running("sleep 1000.25") == []
    assert not any(d.exists() for d in dirs)
    assert Path("/proc/self/mountinfo").read_text() == mounts_before
