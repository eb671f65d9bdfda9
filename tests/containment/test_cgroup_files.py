"""cgroup v2 bookkeeping against a directory laid out like cgroupfs.

This machine runs cgroup v1 (tested for real in test_resources.py); v2 cannot be mounted
beside it with the controllers it needs, so the v2 path's file protocol is checked here
on a plain directory, and what v2 does with processes on a real cgroup2 mount (which
has no memory, pids or cpu controller on a v1 host)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.sandbox import cgroups
from corral.sandbox.cgroups import Cgroup, Limits


def _fake_v2(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    own = root / cgroups._own_path(None).lstrip("/")
    own.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids io\n")
    (own / "cgroup.subtree_control").write_text("")
    return root


def test_detects_v2_and_v1(tmp_path: Path) -> None:
    assert cgroups.detect(_fake_v2(tmp_path)) == "v2"
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "tasks").write_text("")
    assert cgroups.detect(v1) == "v1"
    assert cgroups.detect(tmp_path / "none") is None


def test_v2_sandbox_cgroup_gets_limits_and_the_host_moves_to_a_leaf(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    cg = Cgroup.create("abc", Limits(memory=256 << 20, pids=64, cpus=1.5), root=root)
    assert cg is not None and cg.version == "v2"
    own = root / cgroups._own_path(None).lstrip("/")
    d = own / "corral-abc"
    assert (d / "memory.max").read_text() == str(256 << 20)
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "150000 100000"
    # Controllers handed down only after corral itself left the parent for a leaf.
    assert (own / "corral-host" / "cgroup.procs").read_text() == str(os.getpid())
    assert set((own / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+memory", "+pids"}
    assert cg.procs_files == [d / "cgroup.procs"]


def test_v2_usage_reads_events_and_stats(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path)
    cg = Cgroup.create("u", Limits(1 << 30, 10, 1.0), root=root)
    assert cg is not None
    d = cg.dirs[0]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "memory.peak").write_text("1234\n")
    (d / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (d / "pids.events").write_text("max 7\n")
    u = cg.usage()
    assert (u.peak_memory, u.cpu_seconds, u.oom_kills, u.pids_limited) == (1234, 2.5, 1, 7)


def test_no_cgroup_hierarchy_means_none_not_a_pretend_limit(tmp_path: Path) -> None:
    assert Cgroup.create("x", Limits(1 << 30, 10, 1.0), root=tmp_path / "missing") is None


@pytest.fixture
def cgroup2_mount(tmp_path: Path) -> Iterator[Path]:
    """The kernel's own cgroup v2 hierarchy, mounted beside this machine's v1 one. On a
    v1 host the memory, pids and cpu controllers stay with v1, so this checks what v2
    does with processes (moving them in, cgroup.kill, removal), not its limits."""
    mnt = tmp_path / "cgroup2"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting cgroup2 needs root")
def test_v2_kernel_moves_a_sandbox_in_and_kills_it_whole(cgroup2_mount: Path) -> None:
    # One unified hierarchy per kernel: every mount of it shows the same directories.
    d = cgroup2_mount / f"corral-v2test-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    cg = Cgroup("v2", [d], Limits(1 << 30, 10, 1.0), [d / "cgroup.procs"])
    # A leader and a daemon it starts in a new session: both must go.
    # It waits for a line before starting anything, so the daemon is born inside.
    proc = subprocess.Popen(
        ["sh", "-c", "read go; setsid sleep 1000.75 & exec sleep 1000.75"], stdin=subprocess.PIPE
    )
    try:
        cg.add(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        deadline = time.monotonic() + 5
        while len(cg.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        members = cg.pids()
        assert proc.pid in members and len(members) == 2
        cg.remove()  # cgroup.kill, then rmdir
        assert proc.wait(timeout=5) == -9
        assert not d.exists()
        for pid in members:
            assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_v2_sandboxes_stay_beside_the_host_leaf_not_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once corral has moved itself into its corral-host leaf, its own cgroup is that
    # leaf; sandboxes must still be made in the parent, not one level deeper each time.
    from corral.sandbox import cgroups

    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    base = tmp_path / "user.slice"
    base.mkdir()
    (base / "cgroup.subtree_control").write_text("cpu memory pids\n")
    monkeypatch.setattr(cgroups, "_own_path", lambda controller: "/user.slice/corral-host")
    made = [Cgroup.create(n, Limits(1 << 30, 10, 1.0), root=tmp_path) for n in ("a", "b")]
    assert [cg.dirs if cg else None for cg in made] == [[base / "corral-a"], [base / "corral-b"]]
    planned = Cgroup.planned("c", root=tmp_path)
    assert planned is not None and planned.dirs == [base / "corral-c"]
