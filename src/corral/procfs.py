"""Process trees read from /proc: shared by the sandbox (kills, its processes), the
egress proxy (which process connected) and the watcher."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """The direct children of every thread of ``pid`` (none once it is gone)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children(cur))
    return out
