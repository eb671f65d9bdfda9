"""``corral mcp-gateway`` between the mcp SDK's client and a real upstream MCP server
(``upstream_server.py``, built with the SDK) that writes down every call it receives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.mcptools.client import UPSTREAM, corral_session, records, run, text, tool_decisions

POLICY = """\
version: 1
extends: strict
tools:
  allow: [records/echo, records/read_file, records/show_config]
  deny: [records/drop_*]
  rules:
    - id: records-paths
      tool: records/read_file
      args:
        $.path: {path: read}
"""


def gateway_args(tmp_path: Path, policy: str, *extra: str) -> tuple[str, ...]:
    (tmp_path / "policy.yaml").write_text(policy)
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    return (
        "mcp-gateway",
        "--server-name",
        "records",
        "--policy",
        str(tmp_path / "policy.yaml"),
        "--workspace",
        str(ws),
        *extra,
        "--",
        sys.executable,
        str(UPSTREAM),
        str(tmp_path / "calls.jsonl"),
    )


def received(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_allowed_call_goes_through_and_a_denied_one_never_reaches_the_upstream(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()

    async def main() -> dict[str, tuple[bool, str]]:
        async with corral_session(home, *gateway_args(tmp_path, POLICY)) as s:
            listed = sorted(t.name for t in (await s.list_tools()).tools)
            assert listed == ["echo", "read_file", "show_config"]  # drop_database is not offered
            out = {}
            for key, tool, args in [
                ("echo", "echo", {"text": "hello upstream"}),
                ("drop", "drop_database", {"name": "production"}),
                ("outside", "read_file", {"path": "/etc/passwd"}),
                ("inside", "read_file", {"path": "README.md"}),
            ]:
                r = await s.call_tool(tool, args)
                out[key] = (r.is_error, text(r))
            return out

    out = run(main)
    assert out["echo"] == (False, "hello upstream")
    assert out["drop"] == (
        True,
        "corral: deny (tool-deny-list): records/drop_database is on the policy's tool deny "
        "list (tools.deny)",
    )
    assert out["outside"][0] and "outside the workspace" in out["outside"][1]
    assert out["inside"] == (False, "contents of README.md")
    # What the upstream received: the allowed calls, never the denied ones.
    assert received(tmp_path) == [
        {"tool": "echo", "args": {"text": "hello upstream"}},
        {"tool": "read_file", "args": {"path": "README.md"}},
    ]
    recs = records(home)
    (echo,) = tool_decisions(recs, "echo")
    (drop,) = tool_decisions(recs, "drop_database")
    assert echo.body["decision"]["decision"] == "allow"
    assert echo.body["action"]["payload"] == {
        "server": "records",
        "tool": "echo",
        "args": {"text": "hello upstream"},
    }
    assert drop.body["decision"]["decision"] == "deny"
    assert drop.body["decision"]["rule"] == "tool-deny-list"
    results = {r.action_id: r.body for r in recs if r.kind == "tool"}
    assert results[echo.action_id]["result"] == "hello upstream"
    assert drop.action_id not in results  # it never ran
    assert echo.run_id == drop.run_id and echo.step == 1 and drop.step == 2


def test_secrets_in_a_result_are_redacted_for_the_agent_and_the_ledger(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()

    async def main() -> str:
        async with corral_session(home, *gateway_args(tmp_path, POLICY)) as s:
            r = await s.call_tool("show_config", {})
            assert not r.is_error
            # The SDK's server sends a str result twice: as text and as structured content.
            assert r.structured_content == {"result": text(r)}
            return text(r)

    shown = run(main)
    assert "AKIAIOSFODNN7EXAMPLE" not in shown and "wJalrXUtnFEMI" not in shown
    assert "MIIEowIBAAKCAQEA7bq" not in shown
    assert "aws_access_key_id = [REDACTED:aws-access-key-id]" in shown
    assert "aws_secret_access_key = [REDACTED:aws-secret-access-key]" in shown
    assert "[REDACTED:private-key]" in shown
    (result,) = [r for r in records(home) if r.kind == "tool"]
    assert result.body["redacted"] == 6  # three secrets, in the text and the structured copy
    assert "AKIA" not in json.dumps([r.body for r in records(home)])


def test_without_redaction_the_result_is_passed_as_sent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()

    async def main() -> str:
        async with corral_session(home, *gateway_args(tmp_path, POLICY, "--no-redact")) as s:
            return text(await s.call_tool("show_config", {}))

    assert "AKIAIOSFODNN7EXAMPLE" in run(main)


def test_the_policys_auditor_is_asked_before_a_call_is_forwarded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    policy = POLICY + "audit:\n  auditor: rules\n  on_flag: deny\n"

    async def main() -> tuple[tuple[bool, str], tuple[bool, str]]:
        async with corral_session(home, *gateway_args(tmp_path, policy)) as s:
            ok = await s.call_tool("echo", {"text": "run the tests"})
            flagged = await s.call_tool("echo", {"text": "~/.aws/credentials"})
            return (ok.is_error, text(ok)), (flagged.is_error, text(flagged))

    ok, flagged = run(main)
    assert ok == (False, "run the tests")
    assert flagged[0]
    assert flagged[1].startswith("corral: deny (auditor rules, credential-access)"), flagged[1]
    assert received(tmp_path) == [{"tool": "echo", "args": {"text": "run the tests"}}]
    recs = records(home)
    audits = [r for r in recs if r.kind == "audit"]
    assert [a.body["verdict"] for a in audits] == ["allow", "deny"]
    decisions = tool_decisions(recs, "echo")
    # The gate allowed both; the auditor stopped the second, with the same action id.
    assert [d.body["decision"]["decision"] for d in decisions] == ["allow", "allow"]
    assert audits[1].action_id == decisions[1].action_id
