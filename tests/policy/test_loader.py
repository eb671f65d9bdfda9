"""Loading policy files: line-accurate errors, ``extends`` composition, hashing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from corral import Policy
from corral.errors import PolicyError
from corral.model import Verdict
from corral.policy import load_policy, preset_names


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def expect_error(target: str | Path, file: Path | str, line: int | None, key: str | None) -> str:
    """Load ``target``, expecting one PolicyError at FILE:LINE: KEY; return its message."""
    with pytest.raises(PolicyError) as info:
        Policy.load(target)
    err = info.value
    assert type(err) is PolicyError
    assert err.file == str(file)
    assert err.line == line
    assert err.key == key
    message = str(err)
    where = f"{file}:{line}" if line is not None else str(file)
    assert message.startswith(f"{where}: {key}: " if key else f"{where}: ")
    # One clear line, not a pydantic dump.
    assert "\n" not in message
    assert "validation error" not in message.lower()
    assert "errors.pydantic.dev" not in message
    return message


def test_minimal_policy(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "version: 1\n")
    policy = Policy.load(path)
    assert policy.name == "policy"
    assert policy.source == str(path.resolve())
    assert policy.spec.commands.default is Verdict.DENY
    assert policy.files == (str(path),)


def test_name_field_wins_over_stem(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yml", "version: 1\nname: mine\ndescription: hello\n")
    policy = Policy.load(str(path))
    assert (policy.name, policy.spec.name, policy.spec.description) == ("mine", "mine", "hello")


# Each case: file text, expected line, expected key path, fragments of the message.
ERROR_CASES = {
    "unknown-top-level-key": (
        "version: 1\nnmae: x\n",
        2,
        "nmae",
        ["unknown key (known: audit, commands,", "did you mean 'name'"],
    ),
    "unknown-nested-key": (
        "version: 1\ncommands:\n  allow: [ls]\n  defualt: ask\n",
        4,
        "commands.defualt",
        [
            "unknown key (known: allow, ask, default, deny, disable, rules, threats)",
            "did you mean 'default'",
        ],
    ),
    "unknown-key-in-rule": (
        """
        version: 1
        commands:
          rules:
            - id: a
              programs: git
              decision: deny
              reason: r
        """,
        5,
        "commands.rules[0].programs",
        ["unknown key", "did you mean 'program'"],
    ),
    "unknown-key-deep": (
        "version: 1\nresources:\n  episode:\n    max_step: 3\n",
        4,
        "resources.episode.max_step",
        ["unknown key", "max_steps"],
    ),
    "wrong-type-scalar": (
        "version: 1\nresources:\n  cpus: 2\n  pids: many\n",
        4,
        "resources.pids",
        ["integer", "'many'"],
    ),
    "wrong-type-mapping": (
        "version: 1\ncommands: [ls, cat]\n",
        2,
        "commands",
        ["must be a mapping"],
    ),
    "wrong-type-list": (
        "version: 1\nfilesystem:\n  hidden: ~/.ssh\n",
        3,
        "filesystem.hidden",
        ["must be a list"],
    ),
    "yaml-bool-for-number": (
        "version: 1\nresources:\n  gpus: yes\n",
        3,
        "resources.gpus",
        ["expected a number, got true"],
    ),
    "bad-enum": (
        "version: 1\nnetwork:\n  mode: proxi\n",
        3,
        "network.mode",
        ["'none' or 'proxy'", "did you mean 'proxy'"],
    ),
    "bad-regex": (
        """
        version: 1
        commands:
          rules:
            - id: ok
              argv: 'fine'
              decision: ask
              reason: r
            - id: broken
              argv: '(unclosed'
              decision: deny
              reason: r
        """,
        9,
        "commands.rules[1].argv",
        ["invalid regular expression", "(unclosed"],
    ),
    "missing-rule-reason": (
        "version: 1\ncommands:\n  rules:\n    - id: a\n      argv: x\n      decision: deny\n",
        4,
        "commands.rules[0].reason",
        ["missing required key"],
    ),
    "duplicate-rule-id": (
        """
        version: 1
        commands:
          rules:
            - {id: a, argv: x, decision: deny, reason: r}
            - {id: a, argv: y, decision: ask, reason: r}
        """,
        5,
        "commands.rules[1].id",
        ["duplicate rule id 'a'"],
    ),
    "bad-host-port": (
        "version: 1\nnetwork:\n  allow:\n    - pypi.org:443\n    - example.org:70000\n",
        5,
        "network.allow[1]",
        ["port must be 1-65535"],
    ),
    "bad-host-cidr": (
        "version: 1\nnetwork:\n  deny: [10.0.0.0/33]\n",
        3,
        "network.deny[0]",
        ["CIDR"],
    ),
    "bad-host-spaces": (
        "version: 1\nnetwork:\n  deny:\n    - 'evil .com'\n",
        4,
        "network.deny[0]",
        ["whitespace"],
    ),
    "over-broad-star": (
        "version: 1\nnetwork:\n  mode: proxy\n  allow: ['*']\n",
        4,
        "network.allow[0]",
        ["'*' is too broad"],
    ),
    "over-broad-tld": (
        "version: 1\nnetwork:\n  allow:\n    - pypi.org:443\n    - github.com\n    - '*.com'\n",
        6,
        "network.allow[2]",
        ["'*.com' is too broad", "public suffix"],
    ),
    "over-broad-port-only": (
        "version: 1\nnetwork:\n  allow: ['*:443']\n",
        3,
        "network.allow[0]",
        ["too broad"],
    ),
    "over-broad-cidr": (
        "version: 1\nnetwork:\n  allow: [0.0.0.0/0]\n",
        3,
        "network.allow[0]",
        ["too broad"],
    ),
    "bad-size": (
        "version: 1\nresources:\n  memory: 4 lots\n",
        3,
        "resources.memory",
        ["invalid size '4 lots'"],
    ),
    "bad-duration": (
        "version: 1\nresources:\n  episode:\n    wall_time: soon\n",
        4,
        "resources.episode.wall_time",
        ["invalid duration 'soon'"],
    ),
    "bad-method": (
        "version: 1\nnetwork:\n  methods: [GET, post]\n",
        3,
        "network.methods[1]",
        ["'GET'"],
    ),
    "bad-version": ("version: 2\nname: x\n", 1, "version", ["unsupported policy version 2"]),
    "missing-version": ("name: x\ncommands: {}\n", 1, "version", ["missing required key"]),
    "duplicate-yaml-key": (
        "version: 1\nnetwork:\n  deny: [a.example.com]\n  deny: []\n",
        4,
        "network.deny",
        ["duplicate key"],
    ),
    "not-a-mapping": ("- version: 1\n", 1, None, ["must be a mapping"]),
    "merge-key": (
        "version: 1\nbase: &b {default: ask}\ncommands:\n  <<: *b\n",
        4,
        "commands",
        ["merge keys"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_names_file_line_and_key(tmp_path: Path, case: str) -> None:
    text, line, key, fragments = ERROR_CASES[case]
    path = write(tmp_path, "policy.yaml", text)
    message = expect_error(path, path, line, key)
    for fragment in fragments:
        assert fragment in message


def test_first_error_in_file_order_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "policy.yaml",
        "version: 1\nnetwork:\n  allow: ['*']\ncommands:\n  bogus: 1\naudit:\n  auditor: x\n",
    )
    message = expect_error(path, path, 3, "network.allow[0]")
    assert message.endswith("(and 2 more problems)")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("version: 1\ncommands:\n  allow: [ls, cat\n", 4),
        ("version: 1\ncommands:\n\tallow: []\n", 3),
        ("version: 1\nname: 'unterminated\n", 3),
        ("version: 1\nnetwork: {allow: [*.com]}\n", 2),
    ],
)
def test_yaml_syntax_error(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, "policy.yaml", text)
    message = expect_error(path, path, line, None)
    assert "YAML syntax error" in message


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "# nothing\n")
    assert "empty policy file" in expect_error(path, path, None, None)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert "no such policy file" in expect_error(path, path, None, None)


def test_unknown_preset() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.load("strct")
    message = str(info.value)
    assert "unknown preset 'strct'" in message
    assert "did you mean 'strict'" in message
    for name in preset_names():
        assert name in message


# --- extends -------------------------------------------------------------------------


def test_missing_file_via_extends(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "version: 1\nname: c\nextends: parent.yaml\n")
    message = expect_error(child, child, 3, "extends")
    assert str(tmp_path / "parent.yaml") in message


def test_missing_file_via_extends_list(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\n")
    child = write(tmp_path, "child.yaml", "version: 1\nextends:\n  - a.yaml\n  - b.yaml\n")
    message = expect_error(child, child, 4, "extends[1]")
    assert "b.yaml" in message


def test_unknown_preset_via_extends(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "version: 1\nextends: swee\n")
    message = expect_error(child, child, 2, "extends")
    assert "unknown preset 'swee'" in message and "known presets" in message


def test_extends_cycle(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "version: 1\nextends: b.yaml\n")
    b = write(tmp_path, "b.yaml", "version: 1\n\nextends: [strict, a.yaml]\n")
    message = expect_error(a, b, 3, "extends[1]")
    assert f"extends cycle: {a} -> {b} -> {a}" in message


def test_extends_self(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "version: 1\nextends: ./a.yaml\n")
    assert "extends cycle" in expect_error(a, a, 2, "extends")


def test_error_in_parent_points_at_parent(tmp_path: Path) -> None:
    parent = write(tmp_path, "base/parent.yaml", "version: 1\nnetwork:\n  alow: []\n")
    child = write(tmp_path, "child.yaml", "version: 1\nextends: base/parent.yaml\n")
    message = expect_error(child, parent, 3, "network.alow")
    assert "did you mean 'allow'" in message


PARENT = """
version: 1
name: parent
description: the parent
commands:
  default: deny
  allow: [ls, cat]
  rules:
    - {id: r1, argv: one, decision: deny, reason: parent r1}
    - {id: r2, argv: two, decision: deny, reason: parent r2}
filesystem:
  hidden: [~/.ssh]
network:
  mode: none
  deny: [evil.example.com]
resources:
  cpus: 1
  memory: 1GiB
detectors:
  miner: {response: kill-sandbox}
"""

CHILD = """
version: 1
extends: parent.yaml
commands:
  default: ask
  allow: [cat, git]
  rules:
    - {id: r2, argv: two, decision: allow, reason: child r2}
    - {id: r3, program: make, decision: ask, reason: child r3}
filesystem:
  hidden: []
network:
  mode: proxy
  allow: [pypi.org:443]
  deny: []
resources:
  cpus: 4
detectors:
  miner: {enabled: false}
"""


def test_extends_merge_semantics(tmp_path: Path) -> None:
    write(tmp_path, "parent.yaml", PARENT)
    child_path = write(tmp_path, "child.yaml", CHILD)
    policy = Policy.load(child_path)
    spec = policy.spec
    # lists grow, parent items first, no duplicates
    assert spec.commands.allow == ("ls", "cat", "git")
    # rules merge by id: the child replaces r2 in place and adds r3
    assert [r.id for r in spec.commands.rules] == ["r1", "r2", "r3"]
    assert spec.commands.rules[1].decision is Verdict.ALLOW
    assert spec.commands.rules[1].reason == "child r2"
    # scalars: child wins; untouched values come from the parent
    assert spec.commands.default is Verdict.ASK
    assert spec.network.mode == "proxy"
    assert spec.resources.cpus == 4.0
    assert spec.resources.memory == 1 << 30
    # mappings merge recursively
    assert spec.detectors["miner"].response == "kill-sandbox"
    assert spec.detectors["miner"].enabled is False
    # name and description are not inherited
    assert policy.name == "child"
    assert spec.description is None
    assert spec.extends is None
    assert policy.files == (str(tmp_path / "parent.yaml"), str(child_path))


def test_child_cannot_drop_denies_or_hidden_paths(tmp_path: Path) -> None:
    write(tmp_path, "parent.yaml", PARENT)
    spec = Policy.load(write(tmp_path, "child.yaml", CHILD)).spec
    assert spec.network.deny == ("evil.example.com",)
    assert spec.filesystem.hidden == ("~/.ssh",)


def test_extends_list_order_and_diamond(tmp_path: Path) -> None:
    write(tmp_path, "p1.yaml", "version: 1\nextends: strict\nresources: {cpus: 1, pids: 10}\n")
    write(tmp_path, "p2.yaml", "version: 1\nextends: strict\nresources: {cpus: 2}\n")
    child = write(tmp_path, "child.yaml", "version: 1\nextends: [p1.yaml, p2.yaml]\n")
    policy = Policy.load(child)
    strict = Policy.load("strict")
    assert policy.spec.resources.cpus == 2.0  # later parent wins
    assert policy.spec.resources.pids == 512  # p2's copy of strict laid over p1
    assert policy.spec.filesystem.hidden == strict.spec.filesystem.hidden  # no duplicates
    assert policy.files[0].endswith("strict.yaml")
    assert len(policy.files) == 4


def test_extends_paths_are_relative_to_including_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "shared/base.yaml", "version: 1\ncommands: {allow: [make]}\n")
    write(tmp_path, "team/mid.yaml", "version: 1\nextends: ../shared/base.yaml\n")
    child = write(tmp_path, "team/project/p.yaml", "version: 1\nextends: ../mid.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Policy.load(child).spec.commands.allow == ("make",)
    assert load_policy(child).name == "p"


def test_extends_from_dict(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "version: 1\ncommands: {allow: [make]}\n")
    data = {"version": 1, "extends": "base.yaml", "commands": {"allow": ["git"]}}
    policy = Policy.from_dict(data, source="inline", base_dir=tmp_path)
    assert policy.spec.commands.allow == ("make", "git")
    assert policy.source == "inline"


# --- identity --------------------------------------------------------------------------


def test_hash_stable_across_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "version: 1\nextends: swe\nresources: {cpus: 3}\n")
    assert Policy.load(path).hash == Policy.load(path).hash


def test_hash_ignores_formatting(tmp_path: Path) -> None:
    # The name is part of the policy (ledger records show it), so both files set it.
    a = write(tmp_path, "a.yaml", "version: 1\nname: p\nresources: {memory: 2GiB, wall_time: 1h}\n")
    b = write(
        tmp_path,
        "b.yaml",
        "# same policy, written differently\nresources: {wall_time: 3600, memory: 2147483648}\n"
        "version: 1\nname: p\n",
    )
    assert Policy.load(a).hash == Policy.load(b).hash


def test_hash_changes_with_policy(tmp_path: Path) -> None:
    path = write(tmp_path, "policy.yaml", "version: 1\nextends: strict\n")
    before = Policy.load(path).hash
    path.write_text("version: 1\nextends: strict\ncommands: {allow: [make]}\n")
    assert Policy.load(path).hash != before


def test_hash_changes_when_parent_changes(tmp_path: Path) -> None:
    parent = write(tmp_path, "parent.yaml", "version: 1\n")
    child = write(tmp_path, "child.yaml", "version: 1\nextends: parent.yaml\n")
    before = Policy.load(child).hash
    parent.write_text("version: 1\nnetwork: {deny: [evil.example.com]}\n")
    assert Policy.load(child).hash != before
