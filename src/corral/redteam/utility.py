"""Benign utility: do real coding-agent commands behave the same inside the sandbox?

Each command of the benign corpus runs twice in a fresh copy of a small prepared Python
repository (a package, its tests, a git history): once in a corral sandbox (``swe``
without network, the gate on, the watcher on) and once outside it, as the same ordinary
user in a network namespace of its own (so neither side reaches the internet and the
comparison is about the sandbox, not the network). ``/testbed`` in a command (where
SWE-bench keeps its repositories) means the copy. Same behaviour: the same exit status,
or both timed out. Every difference is put under a reason.

Run as root, the work happens in a child that drops to an ordinary user first: the
outside run must not be able to change the host (``pip install`` as root would).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.policy import Policy
from corral.sandbox.rootless import USER, become, ordinary_user

TIMEOUT_EXIT = 124

_FILES = {
    "README.md": "# calc\n\nA small calculator package.\n",
    "setup.py": "from setuptools import setup, find_packages\n\nsetup(name='calc', version='0.1', packages=find_packages(exclude=['tests']))\n",
    "setup.cfg": "[tool:pytest]\ntestpaths = tests\n",
    "calc/__init__.py": "from calc.core import add, divide, mean\n\n__all__ = ['add', 'divide', 'mean']\n",
    "calc/core.py": (
        "def add(a, b):\n    return a + b\n\n\n"
        "def divide(a, b):\n    if b == 0:\n        raise ZeroDivisionError('b must not be 0')\n    return a / b\n\n\n"
        "def mean(xs):\n    return sum(xs) / len(xs)\n"
    ),
    "calc/utils.py": "import re\n\n\ndef parse(text):\n    return [float(x) for x in re.findall(r'-?\\d+(?:\\.\\d+)?', text)]\n",
    "tests/__init__.py": "",
    "tests/test_core.py": (
        "from calc import add, divide, mean\n\n\n"
        "def test_add():\n    assert add(2, 3) == 5\n\n\n"
        "def test_divide():\n    assert divide(6, 3) == 2\n\n\n"
        "def test_mean():\n    assert mean([1, 2, 3]) == 2\n"
    ),
    "tests/test_utils.py": "from calc.utils import parse\n\n\ndef test_parse():\n    assert parse('a 1 b -2.5') == [1.0, -2.5]\n",
    "docs/index.rst": "calc\n====\n\n.. automodule:: calc\n",
    ".gitignore": "__pycache__/\n*.egg-info/\n",
}
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "corral",
    "GIT_AUTHOR_EMAIL": "corral@example.invalid",
    "GIT_COMMITTER_NAME": "corral",
    "GIT_COMMITTER_EMAIL": "corral@example.invalid",
}


@dataclass(frozen=True, slots=True)
class Compared:
    id: str
    command: str
    inside: int
    outside: int
    same: bool
    reason: str | None
    inside_err: str
    outside_err: str


def prepare_repo(path: Path) -> None:
    for rel, text in _FILES.items():
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    env = {**os.environ, **_GIT_ENV}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "initial"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)
    (path / "calc" / "core.py").write_text(_FILES["calc/core.py"].replace("len(xs)", "len(xs) - 1"))


def utility_policy() -> Policy:
    # Neither side may reach the internet, so the sandbox gets no way out at all: its
    # proxy is the egress suite's and the red team's to test, and starting one per
    # ordinary-user process would only add its start-up to every run here.
    return Policy.load("swe").derived(
        "swe-utility", network={"mode": "none", "allow": []}, audit={"auditor": "none"}
    )


def _reason(inside: Any, out_code: int, out_err: str) -> str:
    err = inside.stderr
    if inside.decision is not None and not inside.decision.allowed:
        return f"gate {inside.decision.verdict.value}: {inside.decision.rule}"
    if inside.timed_out != (out_code == TIMEOUT_EXIT):
        return "timed out inside only" if inside.timed_out else "timed out outside only"
    if inside.alerts:
        return f"watcher: {inside.alerts[0].detector}"
    for needle, why in (
        ("Read-only file system", "read-only root"),
        ("Operation not permitted", "not permitted (seccomp, capabilities)"),
        ("Permission denied", "permission denied"),
        ("No such file or directory", "a path not visible inside"),
        ("Network is unreachable", "network"),
        ("Temporary failure in name resolution", "network"),
    ):
        if needle in err and needle not in out_err:
            return why
    return f"other (exit {inside.exit_code} inside, {out_code} outside)"


def _compare(
    row: dict[str, Any], template: Path, work: Path, policy: Policy, timeout: float, n: int
) -> Compared:
    from corral.ledger import Ledger
    from corral.sandbox import Sandbox

    ins, outs = work / f"{n}-in" / "testbed", work / f"{n}-out" / "testbed"
    shutil.copytree(template, ins, symlinks=True)
    shutil.copytree(template, outs, symlinks=True)
    home = work / f"{n}-home"
    home.mkdir()
    cmd = str(row["command"])
    env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        **_GIT_ENV,
    }
    try:
        o = subprocess.run(
            [
                "unshare",
                "--net",
                "--map-current-user",
                "bash",
                "-c",
                cmd.replace("/testbed", str(outs)),
            ],
            cwd=outs,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        out_code, out_err = o.returncode, o.stderr
    except subprocess.TimeoutExpired as e:
        out_code = TIMEOUT_EXIT
        raw = e.stderr or b""
        out_err = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    with Ledger.memory() as led, Sandbox(policy, ins, ledger=led, auditor=False) as sb:
        r = sb.run(cmd.replace("/testbed", str(ins)), timeout=timeout)
    same = r.exit_code == out_code or (r.timed_out and out_code == TIMEOUT_EXIT)
    shutil.rmtree(work / f"{n}-in", ignore_errors=True)
    shutil.rmtree(work / f"{n}-out", ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return Compared(
        str(row.get("id", n)),
        cmd,
        r.exit_code,
        out_code,
        same,
        None if same else _reason(r, out_code, out_err),
        r.stderr[-300:],
        out_err[-300:],
    )


def compare_all(
    rows: Sequence[dict[str, Any]],
    *,
    timeout: float = 10.0,
    workers: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> list[Compared]:
    """Run in this process, as whoever runs it (see ``run_utility`` for root)."""
    policy = utility_policy()
    base = Path(tempfile.mkdtemp(prefix="corral-utility-"))
    try:
        template = base / "template" / "testbed"
        prepare_repo(template)
        work = base / "work"
        work.mkdir()
        finished = itertools.count(1)
        out: list[Compared | None] = [None] * len(rows)

        def one(i: int) -> None:
            out[i] = _compare(rows[i], template, work, policy, timeout, i)
            done = next(finished)  # atomic under the GIL, unlike += on a shared int
            if progress is not None:
                progress(done, len(rows))

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, range(len(rows))))
        return [c for c in out if c is not None]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_utility(
    rows: Sequence[dict[str, Any]],
    *,
    timeout: float = 10.0,
    workers: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> list[Compared]:
    """``compare_all``, in a child that is an ordinary user when this process is root."""
    if os.geteuid() != 0:
        return compare_all(rows, timeout=timeout, workers=workers, progress=progress)
    # Everything the child needs is loaded while root: this interpreter's own files may
    # sit where an ordinary user cannot read them (a Python under /root).
    import concurrent.futures.thread  # noqa: F401
    import resource  # noqa: F401
    import sqlite3  # noqa: F401
    import traceback

    import corral.egress.host
    import corral.sandbox.bwrap
    import corral.watch.watcher  # noqa: F401
    from corral.sandbox import seccomp

    uid, gid = ordinary_user(USER)
    seccomp.filter_bpf()
    utility_policy().check("true")
    # Made by root and handed over: /tmp may not be writable by everyone (minimal
    # containers), and the user has no home.
    home = Path(tempfile.mkdtemp(prefix="corral-utility-home-"))
    os.chown(home, uid, gid)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: an ordinary user for good, then everything
        code = 0
        try:
            os.close(read_fd)
            become(uid, gid, home)
            os.environ["TMPDIR"] = str(home)
            tempfile.tempdir = str(home)

            def tell(done: int, total: int) -> None:
                _send(write_fd, {"progress": [done, total]})

            found = compare_all(rows, timeout=timeout, workers=workers, progress=tell)
            _send(write_fd, {"result": [dataclasses.asdict(c) for c in found]})
        except BaseException as exc:  # said to the parent, never raised past the fork
            import traceback

            where = traceback.format_exc(limit=-3).strip().splitlines()
            err = f"{exc!r} at {' / '.join(ln.strip() for ln in where[-5:-1])}"
            _send(write_fd, {"error": err})
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    result: list[Compared] = []
    try:
        with os.fdopen(read_fd, "r") as pipe:
            for line in pipe:
                msg = json.loads(line)
                if "progress" in msg and progress is not None:
                    progress(*msg["progress"])
                elif "error" in msg:
                    raise RuntimeError(f"the utility run failed: {msg['error']}")
                elif "result" in msg:
                    result = [Compared(**c) for c in msg["result"]]
    finally:
        os.waitpid(pid, 0)
        shutil.rmtree(home, ignore_errors=True)
    return result


def _send(fd: int, msg: dict[str, Any]) -> None:
    data = (json.dumps(msg) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def summarize(results: Sequence[Compared]) -> dict[str, Any]:
    same = sum(c.same for c in results)
    by: dict[str, list[Compared]] = defaultdict(list)
    for c in results:
        if not c.same:
            by[
                re.sub(r"\d+", "N", c.reason or "?")
                if c.reason and c.reason.startswith("other")
                else c.reason or "?"
            ].append(c)
    counts = Counter({k: len(v) for k, v in by.items()})
    return {
        "commands": len(results),
        "same": same,
        "share_same": round(same / len(results), 5) if results else None,
        "differences": {
            reason: {
                "count": n,
                "examples": [
                    {
                        "id": c.id,
                        "command": c.command[:200],
                        "inside": c.inside,
                        "outside": c.outside,
                        "inside_stderr": c.inside_err[-200:],
                        "outside_stderr": c.outside_err[-200:],
                    }
                    for c in by[reason][:5]
                ],
            }
            for reason, n in counts.most_common()
        },
    }


def load_benign(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return rows
