"""Nothing runs in a sandbox before its limits are on, and a failure to set them is fatal."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox, cgroups
from corral.sandbox.backend import SandboxError
from corral.sandbox.launch import Launched, launch

from ..procs import running
from .test_sandbox import OPEN_GATE


def _touch(marker: Path) -> Callable[[int, int], list[str]]:
    """A bubblewrap command line, for launch(), that creates ``marker`` when it runs."""
    where = str(marker.parent)

    def build(info: int, block: int) -> list[str]:
        return [
            *("bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/"),
            *("--bind", where, where, "--info-fd", str(info), "--block-fd", str(block)),
            *("touch", str(marker)),
        ]

    return build


def test_a_failed_confinement_kills_the_sandbox_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    seen: list[int] = []

    def confine(pid: int, launched: Launched) -> None:
        seen.append(pid)
        raise PermissionError(13, "Permission denied", "/sys/fs/cgroup/x/cgroup.procs")

    with pytest.raises(SandboxError, match="could not put the sandbox under its limits"):
        launch(_touch(marker), confine, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert seen and not marker.exists()
    assert not Path(f"/proc/{seen[0]}").exists()


def test_confinement_happens_before_the_command_starts(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    order: list[str] = []

    def confine(pid: int, launched: Launched) -> None:
        # The sandbox process exists but is held before running the command.
        order.append("confined" if not marker.exists() else "too late")

    launched = launch(_touch(marker), confine)
    assert launched.proc.wait() == 0
    launched.release()
    assert order == ["confined"] and marker.exists()


def test_without_a_cgroup_the_sandbox_runs_under_rlimits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups.Cgroup, "create", classmethod(lambda cls, *a, **k: None))
    policy = Policy.from_dict({"version": 1, "extends": "strict", "resources": {"memory": "300Mi"}})
    with Ledger.memory() as ledger, Sandbox(policy, tmp_path, gate=False, ledger=ledger) as sb:
        r = sb.run("ulimit -v")
        assert sb.backend.limits(sb.id) == "rlimit"  # type: ignore[attr-defined]
    assert r.stdout.strip() == str(300 * 1024)


def test_closing_waits_for_every_process_in_the_namespace(tmp_path: Path) -> None:
    with Ledger.memory() as ledger:
        sb = Sandbox(OPEN_GATE, tmp_path, gate=False, ledger=ledger)
        r = sb.run("for i in 1 2 3; do setsid sleep 1000.5 & done; echo $!")
        assert r.exit_code == 0
        session = sb.backend._boxes[sb.id].sessions["default"]  # type: ignore[attr-defined]
        init = session.launched.init
        assert init is not None
        sb.close()
    # Straight after close, not eventually: close returned only once they were gone.
    assert running("sleep 1000.5") == []
    with pytest.raises(OSError):
        os.fstat(init)  # the pidfd was released


def test_a_sandbox_started_from_a_thread_outlives_the_thread(tmp_path: Path) -> None:
    # The parent-death signal behind --die-with-parent follows the thread that forked;
    # a sandbox started from a worker thread must not die when that thread retires.
    import threading

    with Ledger.memory() as led, Sandbox(OPEN_GATE, tmp_path, ledger=led) as sb:
        first: list[str] = []

        def step() -> None:
            first.append(sb.run("sleep 1000.5625 > /dev/null 2>&1 & echo $$").stdout)

        t = threading.Thread(target=step)
        t.start()
        t.join()
        assert running("sleep 1000.5625")  # the background job the thread started
        assert sb.run("echo $$").stdout == first[0]  # the same shell, still there
    assert not running("sleep 1000.5625")
