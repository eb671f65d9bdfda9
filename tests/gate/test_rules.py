"""Threat rules are data: they load, they are validated, and their path globs mean what
they say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import RuleError
from corral.policy.rules import _trie_regex, load_ruleset, path_candidates, path_glob_regex


def test_shipped_rules_load_with_a_version() -> None:
    rs = load_ruleset()
    assert "/" in rs.version
    ids = [r.id for r in rs.rules]
    assert len(ids) == len(set(ids)) > 40
    assert all(r.reason and r.category for r in rs.rules)


def _write(tmp_path: Path, rules: str) -> Path:
    p = tmp_path / "gate.yaml"
    p.write_text(rules)
    return p


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            "version: '1'\nrules:\n  - id: a\n    category: mining\n    reason: r\n    match: {prgram: [x]}\n",
            "prgram",
        ),
        (
            "version: '1'\nrules:\n  - id: a\n    category: mining\n    reason: r\n    match: {text: '(unclosed'}\n",
            "a.match.text",
        ),
        (
            "version: '1'\nrules:\n  - id: a\n    category: mining\n    reason: r\n    match: {program: $nope}\n",
            "unknown list $nope",
        ),
        ("version: '1'\nrules:\n  - id: a\n    category: bogus\n    reason: r\n", "category"),
        (
            "version: '1'\nrules:\n  - {id: a, category: mining, reason: r}\n  - {id: a, category: mining, reason: r}\n",
            "duplicate",
        ),
        ("version: '1'\nrules: [\n", "YAML"),
    ],
)
def test_bad_rule_files_name_file_rule_and_key(tmp_path: Path, body: str, needle: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(RuleError) as exc:
        load_ruleset(rules_path=path)
    assert "gate.yaml" in str(exc.value)
    assert needle in str(exc.value)


def _matches(glob: str, word: str) -> bool:
    rx = re.compile(path_glob_regex(glob))
    return any(rx.match(c) for c in path_candidates(word))


@pytest.mark.parametrize(
    ("glob", "word", "expected"),
    [
        ("~/.ssh/id_*", "/root/.ssh/id_rsa", True),
        ("~/.ssh/id_*", "$HOME/.ssh/id_ed25519", True),
        ("~/.ssh/id_*", "--identity=~/.ssh/id_rsa", True),
        ("~/.ssh/id_*", "/home/alice//.ssh/./id_rsa", True),
        ("~/.ssh/id_*", "~/.ssh/known_hosts", False),
        ("~/.aws/*", "//.aws", True),
        ("~/.aws/*", "/root/.aws/credentials", True),
        ("/etc/shadow", "/etc/shadow.bak", False),
        ("/etc/shadow", "open('/etc/shadow')", True),
        ("/etc/shadow", "relative/etc/shadow", False),
        ("/dev/sd*", "of=/dev/sda", True),
    ],
)
def test_path_globs(glob: str, word: str, expected: bool) -> None:
    assert _matches(glob, word) is expected


@given(
    st.lists(st.text(alphabet="ab.c", min_size=1, max_size=4), min_size=1, max_size=8),
    st.text(alphabet="ab.cx", max_size=12),
)
@settings(max_examples=300, deadline=None, database=None)
def test_keyword_trie_matches_exactly_what_a_flat_alternation_matches(
    words: list[str], text: str
) -> None:
    flat = re.compile("|".join(re.escape(w) for w in words))
    trie = re.compile(_trie_regex(words))
    assert bool(trie.search(text)) == bool(flat.search(text))
