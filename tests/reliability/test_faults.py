"""Faults and load: what dies takes the sandbox's way out with it, and nothing is left.

The proxy's death is tested where the proxy is (tests/egress/test_proxy.py: the sandbox
is stopped and nothing gets out), and a kill -9 of the corral process, ledger writer
included, in tests/watch/test_watch.py (the ledger verifies, nothing keeps running).
Here: the watcher's death, and a hundred sandboxes at once."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox
from corral.sandbox.backend import SandboxError
from corral.watch.gpu import FakeGpuBackend
from corral.watch.watcher import Watcher
from tests.procs import running

OPEN = Policy.from_dict(
    {
        "version": 1,
        "extends": "strict",
        "commands": {"default": "allow"},
        "network": {"mode": "proxy"},
    }
)


def _wait(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watcher_dying_stops_every_sandbox_it_watched(tmp_path: Path) -> None:
    watcher = Watcher(gpu=FakeGpuBackend())
    led_path = tmp_path / "ledger.db"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Ledger.open(led_path) as ledger:
        a = Sandbox(OPEN, tmp_path / "a", ledger=ledger, watch=watcher, run_id="fault")
        b = Sandbox(OPEN, tmp_path / "b", ledger=ledger, watch=watcher, run_id="fault")
        try:
            result: dict[str, object] = {}
            t = threading.Thread(target=lambda: result.update(r=a.run("sleep 300.25")))
            t.start()
            assert _wait(lambda: bool(running("sleep 300.25")))

            def broken() -> None:
                raise RuntimeError("injected fault")

            watcher._tick = broken  # type: ignore[method-assign]
            watcher._wake()
            t.join(timeout=15)
            assert not t.is_alive(), "the running command was not stopped"
            r = result["r"]
            assert r.exit_code == 137  # type: ignore[attr-defined]
            assert "the watcher stopped" in r.stderr  # type: ignore[attr-defined]
            assert watcher.died and "injected fault" in watcher.died
            assert not running("sleep 300.25")
            # The other sandbox takes no more commands (the stop reaches it a moment
            # after the first one's).
            assert _wait(lambda: b.stopped is not None)
            with pytest.raises(SandboxError, match="was stopped: the watcher stopped"):
                b.run("echo still here")
        finally:
            a.close()
            b.close()
            watcher.close()
        assert ledger.verify().ok
        notes = [rec.body for rec in ledger.records(kinds="note")]
        assert sum(1 for n in notes if n.get("event") == "sandbox closed") == 2


def _cgroup_dirs(ids: set[str]) -> list[str]:
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        for d in dirs:
            if d.startswith("corral-") and d[len("corral-") :] in ids:
                found.append(os.path.join(root, d))
    return found


def _mounts() -> int:
    return len(Path("/proc/self/mountinfo").read_text().splitlines())


def test_a_hundred_sandboxes_at_once_leave_nothing_behind(tmp_path: Path) -> None:
    mounts_before = _mounts()
    ids: set[str] = set()
    lock = threading.Lock()
    marker = "sleep 4242.5"

    def one(i: int) -> tuple[int, str]:
        ws = tmp_path / f"ws{i}"
        ws.mkdir()
        with Ledger.memory() as led, Sandbox(OPEN, ws, ledger=led, run_id=f"load-{i}") as sb:
            with lock:
                ids.add(sb.id)
            work = (
                f"echo {i} > out.txt",  # a file
                "python3 -c 'print(sum(range(200000)))'",  # some CPU
                f"({marker} &) ; echo detached",  # a process left running
                "cat out.txt",
            )
            outs = [sb.run(w, timeout=30) for w in work]
            return outs[-1].exit_code, outs[-1].stdout.strip()

    with ThreadPoolExecutor(max_workers=25) as pool:
        results = list(pool.map(one, range(100)))
    assert results == [(0, str(i)) for i in range(100)]
    assert len(ids) == 100
    assert _wait(lambda: not running(marker), timeout=10), running(marker)[:5]
    assert _cgroup_dirs(ids) == []
    assert _mounts() == mounts_before
    assert not [p for p in running("bwrap") if any(i in str(p) for i in ids)]
