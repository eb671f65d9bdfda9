"""The sandbox without root: most users run corral as an ordinary user.

Run as root (CI), the test creates an ordinary user and drops to it in a forked child
before building any sandbox; run as an ordinary user, it is already rootless. Either way
the same checks run through bubblewrap's user namespace with no privilege at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox, seccomp
from corral.sandbox import bwrap as _bwrap  # noqa: F401  (imported before dropping root)
from corral.sandbox.rootless import become, ordinary_user

CHECKS = {
    "runs": "echo ok",
    "uid": "id -u",
    "workspace_writable": "echo w > in-workspace.txt && cat in-workspace.txt",
    "root_read_only": "echo x > /etc/corral-rootless 2>&1; echo $?",
    "tmp_private": "echo t > /tmp/t && cat /tmp/t",
    "net_only_loopback": "python3 -c 'import socket; print([n for _, n in socket.if_nameindex()])'",
    "no_nested_userns": "unshare -r true 2>/dev/null; echo $?",
    "no_ptrace": "python3 -c 'import ctypes; print(ctypes.CDLL(None).ptrace(16, 1, 0, 0))'",
}


def _run_checks(workspace: Path, server_url: str) -> dict[str, Any]:
    policy = Policy.load("strict")
    out: dict[str, Any] = {"euid": os.geteuid()}
    with Ledger.memory() as ledger, Sandbox(policy, workspace, gate=False, ledger=ledger) as sb:
        for name, cmd in CHECKS.items():
            r = sb.run(cmd, timeout=30)
            out[name] = [r.exit_code, r.stdout.strip()]
    # The way out without root: the proxy's sockets are made by a forked child that
    # enters the sandbox's user namespace (sandbox/netns.py).
    allow = server_url.removeprefix("http://")
    net = Policy.from_dict(
        {"version": 1, "extends": "strict", "network": {"mode": "proxy", "allow": [allow]}}
    )
    with Ledger.memory() as ledger, Sandbox(net, workspace, gate=False, ledger=ledger) as sb:
        r = sb.run(f"curl -sS --max-time 10 {server_url}/", timeout=30)
        out["egress_allowed"] = [r.exit_code, r.stdout.strip()]
        r = sb.run(f"curl -s --max-time 10 -w ' %{{http_code}}' {server_url.rsplit(':', 1)[0]}:1/")
        out["egress_denied"] = [r.exit_code, r.stdout.strip()[-3:]]
        events = [rec.body["fields"] for rec in ledger.records(kinds="event")]
        out["egress_events"] = [
            (e.get("allowed"), e.get("pid") is not None) for e in events if e.get("type") == "net"
        ]
    return out


def _as_user(uid: int, gid: int, workspace: Path, server_url: str) -> dict[str, Any]:
    # The interpreter's own files may sit where an ordinary user cannot read them (a
    # Python under /root): load everything the child needs while still root.
    seccomp.filter_bpf()
    Policy.load("strict").check("true")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root for good, then build sandboxes
        code = 0
        try:
            os.close(read_fd)
            become(uid, gid, workspace)
            result = _run_checks(workspace, server_url)
        except BaseException as exc:  # report, never fall back into the test runner
            result = {"error": repr(exc)}
            code = 1
        os.write(write_fd, json.dumps(result).encode())
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    parsed: dict[str, Any] = json.loads(data)
    return parsed


def test_sandbox_works_and_holds_as_anordinary_user() -> None:
    from tests.egress.servers import serve_hello

    # A workspace the ordinary user can reach (pytest's tmp_path is private to root).
    workspace = Path(tempfile.mkdtemp(prefix="corral-rootless-"))
    try:
        workspace.chmod(0o755)
        with serve_hello() as server:  # on the host, for the egress check
            if os.geteuid() == 0:
                uid, gid = ordinary_user()
                os.chown(workspace, uid, gid)
                result = _as_user(uid, gid, workspace, server.url)
            else:
                uid = os.geteuid()
                result = _run_checks(workspace, server.url)
        assert "error" not in result, result
        assert result["euid"] == uid != 0
        assert result["runs"] == [0, "ok"]
        assert result["uid"][1] == str(uid)
        assert result["workspace_writable"] == [0, "w"]
        assert result["root_read_only"][1] != "0"
        assert result["tmp_private"] == [0, "t"]
        assert result["net_only_loopback"] == [0, "['lo']"]
        assert result["no_nested_userns"][1] != "0"
        assert result["no_ptrace"][1] == "-1"
        assert result["egress_allowed"] == [0, "hello from corral test server"]
        assert result["egress_denied"][1] == "403"
        assert result["egress_events"] == [[True, True], [False, True]]
    finally:
        for p in sorted(workspace.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        workspace.rmdir()
