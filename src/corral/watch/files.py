"""Writes to the files an agent would use to persist, seen with inotify.

The sandbox's home is a tmpfs of its own, out of the host's sight: it is watched through
``/proc/PID/root``, which reaches into the sandbox's mount namespace (an inotify watch
belongs to the inode, whichever namespace the path was resolved in). Only the places
that matter are watched: the home directory itself (shell rc files, profiles) and
``.ssh`` once it exists. ``parse`` turns the kernel's bytes into events without I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from dataclasses import dataclass

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WRITES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class FileEvent:
    wd: int
    mask: int
    name: str

    @property
    def is_dir(self) -> bool:
        return bool(self.mask & IN_ISDIR)


def parse(data: bytes) -> list[FileEvent]:
    """inotify records from one read(); a truncated tail is dropped."""
    out = []
    i = 0
    while i + _HEADER.size <= len(data):
        wd, mask, _cookie, size = _HEADER.unpack_from(data, i)
        start = i + _HEADER.size
        if start + size > len(data):
            break
        name = data[start : start + size].split(b"\0", 1)[0].decode(errors="replace")
        out.append(FileEvent(wd, mask, name))
        i = start + size
    return out


class FileWatch:
    """One inotify instance; directories are added by path, events read by the watcher."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = int(fd)
        self.dirs: dict[int, str] = {}  # watch descriptor -> the directory it watches

    def fileno(self) -> int:
        return self.fd

    def add(self, path: str, mask: int = WRITES) -> int | None:
        """Watch a directory (for writes, unless ``mask`` says otherwise); None if it
        cannot be watched (gone, no right)."""
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            return None
        self.dirs[wd] = path
        return int(wd)

    def remove(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)
        self.dirs.pop(wd, None)

    def read(self) -> list[tuple[str, FileEvent]]:
        """(directory, event) pairs queued now."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return [(self.dirs.get(ev.wd, ""), ev) for ev in parse(b"".join(chunks))]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
