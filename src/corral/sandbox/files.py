"""Host-side file operations inside a workspace that never follow a link out of it.

The agent controls the workspace, so any component of a path may be a symlink it planted
(``notes -> /etc/shadow``, ``dir -> /root``). Paths are walked one component at a time
with ``O_NOFOLLOW`` relative to the previous directory's descriptor: a symlink anywhere
is refused, ``..`` is refused, and nothing is resolved by the kernel's path lookup.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

from corral.errors import CorralError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(CorralError, PermissionError):
    """A path leaves the workspace or goes through a symbolic link."""


def _components(workspace: Path, path: str) -> list[str]:
    p = PurePosixPath(path)
    if p.is_absolute():
        try:
            p = p.relative_to(workspace)
        except ValueError:
            raise UnsafePathError(f"{path} is outside the workspace {workspace}") from None
    parts = [c for c in p.parts if c not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"{path!r} names the workspace itself, not a file in it")
    if ".." in parts:
        raise UnsafePathError(f"{path} climbs out with '..'")
    return parts


def _open_parent(workspace: Path, parts: list[str], *, create_dirs: bool) -> int:
    fd = os.open(workspace, _DIR_FLAGS)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create_dirs:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(
                        f"{name} in the path is a symbolic link or not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_in_workspace(workspace: Path, path: str, flags: int, *, create_dirs: bool) -> int:
    """A descriptor for ``path`` under ``workspace``, no link followed on the way."""
    parts = _components(workspace, path)
    parent = _open_parent(workspace, parts, create_dirs=create_dirs)
    try:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symbolic link; it is not followed") from None
        raise
    finally:
        os.close(parent)


def read_file(workspace: Path, path: str, *, limit: int = 64 << 20) -> bytes:
    fd = _open_in_workspace(workspace, path, os.O_RDONLY, create_dirs=False)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafePathError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CorralError(f"{path} is larger than {limit} bytes")
    return data


def write_file(workspace: Path, path: str, data: bytes) -> None:
    fd = _open_in_workspace(
        workspace, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, create_dirs=True
    )
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def list_dir(workspace: Path, path: str, *, limit: int = 10_000) -> list[tuple[str, str]]:
    """A directory's entries as ``(name, kind)``, kind ``dir``, ``file``, ``link`` or
    ``other``, sorted by name; a link is reported as one, never followed."""
    p = PurePosixPath(path)
    whole = p.parts in ((), (".",)) or (p.is_absolute() and Path(p) == workspace)
    if whole:
        fd = os.open(workspace, _DIR_FLAGS)
    else:
        try:
            fd = _open_in_workspace(
                workspace, path, os.O_RDONLY | os.O_DIRECTORY, create_dirs=False
            )
        except NotADirectoryError:
            raise UnsafePathError(f"{path} is not a directory") from None
    out: list[tuple[str, str]] = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_symlink():
                    kind = "link"
                elif entry.is_dir(follow_symlinks=False):
                    kind = "dir"
                elif entry.is_file(follow_symlinks=False):
                    kind = "file"
                else:
                    kind = "other"
                out.append((entry.name, kind))
                if len(out) >= limit:
                    break
    finally:
        os.close(fd)
    return sorted(out)
