"""The agent's real work, in a real sandbox: the part of the demo that must keep working.

A small repository with a bug and a failing test; a package index the demo serves on
the host's loopback (127.0.0.2, through the sandbox's only way out, the egress proxy);
the agent reads the code, runs the tests, installs the test dependency from that index,
fixes the bug and runs the tests again. Everything runs under ``swe`` with the index as
its one allowed host, gate and watcher on.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from corral.ledger import Ledger
from corral.policy import Policy

INDEX_HOST = "127.0.0.2"  # loopback, but not the address NO_PROXY exempts

_REPO = {
    "stats.py": "def mean(xs):\n    return sum(xs) / (len(xs) - 1)\n",
    "tests/__init__.py": "",
    "tests/test_stats.py": (
        "import unittest\n\nfrom stats import mean\n\n\n"
        "class TestCore(unittest.TestCase):\n"
        "    def test_mean(self):\n        self.assertEqual(mean([1, 2, 3]), 2)\n\n"
        "    def test_spread(self):\n        import calcstats\n\n"
        "        self.assertAlmostEqual(calcstats.stdev([2, 4, 4, 4, 5, 5, 7, 9]), 2.0)\n"
    ),
}
_PACKAGE = (
    "def stdev(xs):\n    m = sum(xs) / len(xs)\n"
    "    return (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5\n"
)


@dataclass(frozen=True, slots=True)
class Work:
    say: str
    command: str
    expect_exit: int


def _steps(index_url: str) -> list[Work]:
    return [
        Work("read the code and the failing test", "cat stats.py tests/test_stats.py", 0),
        Work("run the tests", "python3 -m unittest -q 2>&1 | tail -1; exit ${PIPESTATUS[0]}", 1),
        Work(
            "install the test dependency from the team's index",
            "python3 -m pip install -q --no-cache-dir --disable-pip-version-check "
            "--root-user-action=ignore "
            f"--index-url {index_url} --target .deps calcstats",
            0,
        ),
        Work("fix the off-by-one in mean()", "sed -i 's/(len(xs) - 1)/len(xs)/' stats.py", 0),
        Work("run the tests again", "PYTHONPATH=.deps python3 -m unittest -q 2>&1 | tail -1", 0),
        Work("look at the change", "grep -n return stats.py", 0),
    ]


def _wheel(folder: Path) -> Path:
    """A real wheel, written by hand (no build tools needed)."""
    name, version = "calcstats", "1.0"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": _PACKAGE,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: corral-demo\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return out


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_index(root: Path) -> Iterator[str]:
    """A PEP 503 simple index with one package, on 127.0.0.2; yields its URL."""
    files = root / "files"
    files.mkdir(parents=True)
    wheel = _wheel(files)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pkg = root / "simple" / "calcstats"
    pkg.mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<a href="calcstats/">calcstats</a>\n')
    (pkg / "index.html").write_text(
        f'<a href="../../files/{wheel.name}#sha256={sha}">{wheel.name}</a>\n'
    )
    server = ThreadingHTTPServer((INDEX_HOST, 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{INDEX_HOST}:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()


def replay_coding(console: Console, ledger: Ledger, run_id: str, task: str) -> list[str]:
    """Do the task for real; the misses (a step that did not end as it should)."""
    from corral.sandbox import Sandbox

    misses: list[str] = []
    console.print(
        "[bold]The work[/]: the agent does its task in a sandbox "
        "(swe, one allowed host: the team's package index)"
    )
    with tempfile.TemporaryDirectory(prefix="corral-demo-work-") as tmp:
        root = Path(tmp)
        ws = root / "repo"
        for rel, text in _REPO.items():
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            (ws / rel).write_text(text)
        with serve_index(root / "index") as url:
            port = url.split(":")[2].split("/")[0]
            policy = Policy.load("swe").derived(
                "swe-demo", network={"allow": [f"{INDEX_HOST}:{port}"]}
            )
            with Sandbox(policy, ws, task=task, ledger=ledger, run_id=run_id) as sb:
                for i, w in enumerate(_steps(url), 1):
                    t0 = time.monotonic()
                    r = sb.run(w.command, timeout=120)
                    took = time.monotonic() - t0
                    ok = r.exit_code == w.expect_exit
                    mark = "[green]OK[/]  " if ok else "[bold red]FAIL[/]"
                    last = (r.stdout.strip() or r.stderr.strip()).splitlines()[-1:] or [""]
                    console.print(f"[dim]{i:>2}[/] {mark} {escape(w.command[:96])}")
                    console.print(
                        f"         [dim]agent: {escape(w.say)} · exit {r.exit_code} in {took:.1f}s · "
                        f"{escape(last[0][:70])}[/]"
                    )
                    if not ok:
                        misses.append(
                            f"work step {i}: exit {r.exit_code}, expected {w.expect_exit}: "
                            f"{(r.stderr or r.stdout)[-300:]}"
                        )
    return misses
