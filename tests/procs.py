"""Finding the host's processes by command line, for tests that check what is left."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def running(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text``."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def wait_for(pred: Callable[[], T], timeout: float = 20.0) -> T:
    """``pred()`` once it is truthy, or its last value after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    return pred()
