"""Dropping to an ordinary user from root, for the checks that must run without root
(the rootless tests, the benign-utility comparison)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

USER = "corral-rootless"


def ordinary_user(name: str = USER) -> tuple[int, int]:
    """The uid and gid of ``name``, made as a system user (no home) if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def become(uid: int, gid: int, home: Path) -> None:
    """Drop root for good in this (forked) process and live in ``home``: no
    supplementary groups, the given ids, HOME and corral's state under ``home``, and an
    interpreter the user may run for the egress proxy."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.environ["HOME"] = str(home)
    os.environ["CORRAL_HOME"] = str(home / ".corral")
    runnable_python()


def runnable_python() -> None:
    """The egress proxy runs as ``python -m corral.egress.server``. When this
    interpreter lives where an ordinary user may not execute it (a Python under /root),
    use the system's Python 3 with this checkout and its packages on the path."""
    if os.access(os.path.realpath(sys.executable), os.X_OK):
        return
    import corral

    src = str(Path(corral.__file__).resolve().parents[1])
    site = [p for p in sys.path if p.endswith("site-packages")]
    os.environ["CORRAL_PYTHON"] = "/usr/bin/python3"
    os.environ["PYTHONPATH"] = os.pathsep.join([src, *site])
