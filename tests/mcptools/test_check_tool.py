"""``corral check --tool NAME --args JSON``: a tool call decided without running it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli import corral
from tests.mcptools.client import records


def test_an_allowed_and_a_denied_call_with_their_exit_codes(tmp_path: Path) -> None:
    ws = str(tmp_path)
    r = corral(
        tmp_path,
        "check",
        "--workspace",
        ws,
        "--tool",
        "corral/read_file",
        "--args",
        '{"path": "a.txt"}',
    )
    assert (r.returncode, r.stdout) == (0, "allow\t-\tallow\tallowed by policy (tools)\n")
    r = corral(
        tmp_path,
        "check",
        "--json",
        "--workspace",
        ws,
        "--tool",
        "corral/read_file",
        "--args",
        '{"path": "/root/.ssh/id_rsa"}',
    )
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert (d["decision"], d["rule"], d["category"]) == (
        "deny",
        "policy-hidden-path",
        "credential-access",
    )
    assert "hidden by the policy" in d["reason"]
    r = corral(tmp_path, "check", "--tool", "github/delete_repo")
    assert r.returncode == 1 and "tool-default" in r.stdout
    decisions = [x for x in records(tmp_path) if x.kind == "decision"]
    assert [x.body["decision"]["decision"] for x in decisions] == ["allow", "deny", "deny"]
    assert decisions[2].body["action"]["payload"] == {
        "server": "github",
        "tool": "delete_repo",
        "args": {},
    }


def test_bad_input_is_a_usage_error_that_names_the_problem(tmp_path: Path) -> None:
    cases = [
        (("--tool", "fs/read", "--args", '{"path": '), "--args is not valid JSON: Expecting value"),
        (("--tool", "fs/read", "--args", "[1, 2]"), "must be a JSON object, got list"),
        (("--tool", "read_file"), "expected SERVER/TOOL"),
        (("--tool", "fs/read", "--", "ls"), "give no command and no --batch"),
    ]
    for args, words in cases:
        r = corral(tmp_path, "check", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert words in r.stderr, (args, r.stderr)
    assert not (tmp_path / "ledger.db").exists()


def test_batch_mode_takes_tool_calls_beside_commands(tmp_path: Path) -> None:
    lines = [
        {"tool": "corral/write_file", "args": {"path": ".git/hooks/pre-push"}, "step": 1},
        {"command": "ls -la", "step": 2},
        {"tool": "nope", "args": {}},
    ]
    stdin = "".join(json.dumps(x) + "\n" for x in lines)
    r = corral(tmp_path, "check", "--workspace", str(tmp_path), "--batch", "-", stdin=stdin)
    assert r.returncode == 2  # the malformed third line
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [o["decision"] for o in out] == ["deny", "allow", "deny"]
    assert out[0]["rule"] == "tool-path-protected" and out[0]["category"] == "persistence"
    assert out[2]["rule"] == "input-error" and "<stdin>:3" in out[2]["reason"]


def test_corral_log_shows_tool_calls(tmp_path: Path) -> None:
    corral(tmp_path, "check", "--tool", "web/fetch", "--args", '{"url": "https://x.example"}')
    r = corral(tmp_path, "log")
    assert r.returncode == 0
    assert 'web/fetch {"url":"https://x.example"}' in r.stdout
