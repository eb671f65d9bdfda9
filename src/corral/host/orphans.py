"""What a killed host leaves behind, found and removed by the next host on the machine.

A host killed with SIGKILL (the OOM killer, ``kill -9``, a Ray node's actor killed) runs
no cleanup. Its sandboxes' processes die with it (bubblewrap's ``--die-with-parent``),
but their cgroup directories and workspaces stay. So each sandbox has a marker in the
host's root, ``.live/<id>.json``, written before its workspace is made: the host's pid and
start time, the sandbox's workspace and, once it has one, its cgroup directories. A clean stop removes the marker; a host starting in the
same root removes whatever markers name a host that is no longer running, killing
anything still in those cgroups, or still binding those workspaces, first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

from corral.sandbox.cgroups import Cgroup, Limits

_DIR = ".live"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of its stat): with
    the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def mark(root: Path, hosted_id: str, workspace: Path, sandbox_id: str | None = None) -> Path:
    """Note a sandbox the host is making (``sandbox_id`` None: its workspace only, so
    far) or runs; returns the marker (``unmark`` it on a clean stop)."""
    cg = Cgroup.planned(sandbox_id) if sandbox_id else None
    marker = root / _DIR / f"{hosted_id}.json"
    marker.parent.mkdir(mode=0o700, exist_ok=True)
    body = {
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "sandbox_id": sandbox_id,
        "version": cg.version if cg else None,
        "cgroups": [str(d) for d in cg.dirs] if cg else [],
        "workspace": str(workspace),
    }
    # Named for its writer: a host killed between the write and the rename leaves it, and
    # the reaper must tell whether that writer still runs even if the text is cut short.
    tmp = marker.with_name(f"{hosted_id}.{body['pid']}-{body['start']}.tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, marker)
    return marker


def _kill_bubblewraps(workspace: str) -> None:
    """SIGKILL every bubblewrap that binds ``workspace``. One caught between its start
    and its move into the sandbox's cgroup is in no cgroup to kill, and its inner
    process (pid 1 of the sandbox) can outlive the host that started it."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]) == b"bwrap" and workspace.encode() in args:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(p.name), signal.SIGKILL)


def unmark(marker: Path) -> None:
    marker.unlink(missing_ok=True)


def reap(root: Path) -> list[str]:
    """Remove what dead hosts left in ``root``; the host's ids of the sandboxes reaped."""
    reaped = []
    where = root / _DIR
    for marker in sorted(where.glob("*.json")):
        try:
            body = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue  # being written, or not ours to judge
        pid, start = body.get("pid"), body.get("start")
        if isinstance(pid, int) and start is not None and _start_time(pid) == start:
            continue  # its host still runs
        _remove(root, body)
        with contextlib.suppress(OSError):
            marker.unlink()
        reaped.append(marker.stem)
    for tmp in sorted(where.glob("*.tmp")):
        hosted_id, _, writer = tmp.name[: -len(".tmp")].rpartition(".")
        pid, _, start = writer.partition("-")
        if pid.isdigit() and _start_time(int(pid)) == start:
            continue  # being written now
        with contextlib.suppress(OSError, ValueError):
            _remove(root, json.loads(tmp.read_text()))
            if hosted_id not in reaped:
                reaped.append(hosted_id)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return reaped


def _remove(root: Path, body: dict[str, object]) -> None:
    """What one marker names: bubblewraps on its workspace, its cgroups, the workspace."""
    workspace = body.get("workspace")
    if isinstance(workspace, str):
        _kill_bubblewraps(workspace)
    cgroups = body.get("cgroups")
    dirs = [Path(str(d)) for d in cgroups] if isinstance(cgroups, list) else []
    version = body.get("version")
    existing = [d for d in dirs if d.is_dir()]
    if existing and version in ("v1", "v2"):
        leftover = Cgroup(
            version,
            existing,
            Limits(0, 0, 0),
            [d / "cgroup.procs" for d in existing],
        )
        leftover.remove()
    if isinstance(workspace, str) and Path(workspace).parent == root:
        shutil.rmtree(workspace, ignore_errors=True)
