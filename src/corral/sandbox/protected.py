"""Workspace files the host will execute later (git hooks, git config, direnv and editor
task files) must not be planted by the agent.

Those that exist when the sandbox starts are bound read-only over the workspace. Those
that do not exist yet cannot be covered without creating files in the user's
workspace, so they are checked when the sandbox closes, after its last process is gone:
anything the sandbox created at a protected path is moved out of the workspace into
``$CORRAL_HOME/quarantine/<sandbox>/`` and reported as a persistence alert.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path


def present(paths: Iterable[Path]) -> frozenset[Path]:
    return frozenset(p for p in paths if p.exists() or p.is_symlink())


def quarantine_new(
    paths: Iterable[Path], before: frozenset[Path], workspace: Path, into: Path
) -> list[str]:
    """Move protected paths created since ``before`` into ``into``; the workspace-relative
    paths moved."""
    moved: list[str] = []
    for p in paths:
        if p in before or not (p.exists() or p.is_symlink()):
            continue
        rel = p.relative_to(workspace)
        dest = into / rel
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.move(str(p), str(dest))  # a symlink is moved as a link, never followed
        moved.append(str(rel))
    return moved
