"""Bounded fuzzing of the policy loader: whatever the file holds, the answer is a policy
or a PolicyError naming the file, never a crash."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.errors import PolicyError
from corral.policy import Policy

KEYS = [
    "version",
    "extends",
    "commands",
    "allow",
    "deny",
    "ask",
    "default",
    "rules",
    "threats",
    "filesystem",
    "workspace",
    "hidden",
    "writable",
    "read_only",
    "protected",
    "network",
    "mode",
    "methods",
    "resources",
    "cpus",
    "memory",
    "pids",
    "wall_time",
    "gpus",
    "episode",
    "detectors",
    "response",
    "enabled",
    "audit",
    "auditor",
    "on_flag",
    "llm",
    "timeout",
    "tools",
    "name",
    "description",
    "id",
    "match",
    "decision",
    "category",
    "reason",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.sampled_from(
        [
            "strict",
            "swe",
            "proxy",
            "none",
            "allow",
            "deny",
            "ask",
            "1",
            "10MiB",
            "5s",
            "*",
            "~/.ssh",
            "pypi.org:443",
            "../x.yaml",
            "rules",
            "llm",
        ]
    ),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=20,
)
DOCS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6).map(
    lambda d: {"version": 1, **d} if len(d) % 2 else d
)

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(DOCS)
def test_any_mapping_is_a_policy_or_a_policy_error(doc: dict[str, object]) -> None:
    try:
        Policy.from_dict(doc, source="fuzz.yaml")
    except PolicyError as e:
        assert str(e).startswith("fuzz.yaml")


@SETTINGS
@given(st.one_of(DOCS.map(lambda d: yaml.safe_dump(d)), st.text(max_size=200)))
def test_any_file_is_a_policy_or_a_policy_error(tmp_path_factory, text: str) -> None:  # type: ignore[no-untyped-def]
    f: Path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    f.write_text(text)
    try:
        Policy.load(f)
    except PolicyError as e:
        assert str(e).startswith(str(f))
