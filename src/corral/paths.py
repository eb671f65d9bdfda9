"""Where corral keeps its state."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = "~/.local/share/corral"


def corral_home(override: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: ``override``, else ``$CORRAL_HOME``, else ``~/.local/share/corral``."""
    raw = override or os.environ.get("CORRAL_HOME") or DEFAULT_HOME
    return Path(raw).expanduser()


def default_ledger_path(home: str | os.PathLike[str] | None = None) -> Path:
    return corral_home(home) / "ledger.db"


def runtime_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """Private scratch space for running sandboxes (hand-over files), mode 0700."""
    d = corral_home(home) / "run"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d
