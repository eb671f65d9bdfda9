"""Running the ``corral`` command as a user would, with its state in one directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CORRAL = [sys.executable, "-m", "corral"]


def corral(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``corral ARGS`` with ``$CORRAL_HOME`` at ``home`` and nothing else of this
    environment (no token, no proxy settings leak in)."""
    return subprocess.run(
        [*CORRAL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={"CORRAL_HOME": str(home), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
