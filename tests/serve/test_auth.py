"""Tokens, and who may serve without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.serve.auth import TokenError, Tokens, labels_from, token_from
from corral.serve.server import ServeError, check_exposure

T1, T2 = "a" * 20, "b" * 20


def test_a_token_is_read_from_each_header_rock_clients_use() -> None:
    assert token_from({"xrl-authorization": f"Bearer {T1}"}) == T1
    assert token_from({"xrl-authorization": f"Baerer {T1}"}) == T1  # ROCK's docs' spelling
    assert token_from({"authorization": f"Bearer {T1}"}) == T1
    assert token_from({"x-api-key": T1}) == T1
    assert token_from({}) is None


def test_tokens_file_maps_users_and_rejects_weak_or_shared_tokens(tmp_path: Path) -> None:
    f = tmp_path / "tokens.yaml"
    f.write_text(f"alice: {T1}\nbob: [{T2}]\n")
    tokens = Tokens.load(f, {})
    assert tokens.user(T1) == "alice" and tokens.user(T2) == "bob"
    assert tokens.user("c" * 20) is None and tokens.user(None) is None
    f.write_text("alice: short\n")
    with pytest.raises(TokenError, match=r"alice: a token must be .* 16"):
        Tokens.load(f, {})
    f.write_text(f"alice: {T1}\nbob: {T1}\n")
    with pytest.raises(TokenError, match="also alice's"):
        Tokens.load(f, {})
    assert Tokens.load(None, {"CORRAL_SERVE_TOKEN": T1}).user(T1) == "default"


def test_without_tokens_only_loopback_is_served() -> None:
    none = Tokens({})
    assert check_exposure("127.0.0.1", none, local_only=True) is None
    assert check_exposure("::1", none, local_only=True) is None
    with pytest.raises(ServeError, match="loopback only"):
        check_exposure("0.0.0.0", none, local_only=True)
    with pytest.raises(ServeError, match="needs API tokens"):
        check_exposure("127.0.0.1", none, local_only=False)
    some = Tokens({T1: "alice"})
    assert check_exposure("0.0.0.0", some, local_only=False) is some


def test_labels_come_from_the_clients_headers() -> None:
    got = labels_from({"x-user-id": "u", "x-experiment-id": "e", "x-namespace": "", "x-other": "o"})
    assert got == {"user_id": "u", "experiment_id": "e"}
