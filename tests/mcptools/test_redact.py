"""Secret shapes taken out of tool results (``rules/secrets.yaml``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import RuleError
from corral.mcp.redact import load_redactor

R = load_redactor()

LEAKS = [
    ("aws-access-key-id", "key=AKIAIOSFODNN7EXAMPLE,", "key=[REDACTED:aws-access-key-id],"),
    (
        "aws-secret-access-key",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_SECRET_ACCESS_KEY=[REDACTED:aws-secret-access-key]",
    ),
    (
        "private-key",
        "x\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\nNzaC1r\n-----END OPENSSH PRIVATE KEY-----\ny",
        "x\n[REDACTED:private-key]\ny",
    ),
    (
        "github-token",
        "token: ghp_" + "a1B2" * 9,
        "token: [REDACTED:github-token]",
    ),
    (
        "github-token",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
        "[REDACTED:github-token]",
    ),
    (
        "bearer-token",
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9abcdefgh",
        "Authorization: Bearer [REDACTED:bearer-token]",
    ),
    ("slack-token", "xoxb-1234567890-abcdefghij", "[REDACTED:slack-token]"),
    (
        "basic-auth-url",
        "git clone https://bob:hunter2hunter2@git.example/r.git",
        "git clone https://bob:[REDACTED:basic-auth-url]@git.example/r.git",
    ),
]


@pytest.mark.parametrize(("shape", "text", "expected"), LEAKS, ids=[x[0] for x in LEAKS])
def test_a_known_secret_shape_is_redacted(shape: str, text: str, expected: str) -> None:
    out, n = R.text(text)
    assert out == expected and n == 1


@pytest.mark.parametrize(
    "text",
    [
        "pip install scikit-learn  # sk-learn is not a key",
        "commit 0123456789abcdef0123456789abcdef01234567",
        "the bearer of bad news",
        "AKIA is a prefix, AKIA123 is too short",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert R.text(text) == (text, 0)


def test_strings_nested_in_json_are_redacted() -> None:
    value = {"items": [{"k": "AKIAIOSFODNN7EXAMPLE"}, 3, None], "ok": True}
    out, n = R.value(value)
    assert out == {"items": [{"k": "[REDACTED:aws-access-key-id]"}, 3, None], "ok": True}
    assert n == 1


def test_a_bad_secrets_file_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("version: '1'\nsecrets:\n  - id: x\n    reason: r\n    pattern: '(unclosed'\n")
    with pytest.raises(RuleError) as info:
        load_redactor(path)
    assert (info.value.line, info.value.key) == (5, "secrets[0].pattern")
    assert "bad regex" in str(info.value)
