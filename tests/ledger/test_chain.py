"""Canonical JSON and the hash construction (pure functions)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import LedgerIntegrityError
from corral.ledger.chain import (
    HASH_PREFIX,
    ChainChecker,
    LedgerRecord,
    VerifyReport,
    canonical_json,
    genesis_hash,
    record_hash,
    sha256_hex,
)
from corral.model import Category, Verdict

PREV = genesis_hash("test")


def reference_hash(prev: str, **fields: Any) -> str:
    """The documented definition, spelled out independently of record_hash's fast path."""
    text = json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return "sha256:" + hashlib.sha256((prev + "\n" + text).encode("utf-8")).hexdigest()


# -- canonical JSON ----------------------------------------------------------------------


def test_key_order_does_not_matter() -> None:
    a = {"b": 1, "a": {"y": [1, 2], "x": None}, "c": "z"}
    b = {"c": "z", "a": {"x": None, "y": [1, 2]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":{"x":null,"y":[1,2]},"b":1,"c":"z"}'


def test_unicode_is_kept_as_text_not_escaped() -> None:
    text = canonical_json({"msg": "héllo 日本 🐄", "quote": 'a"b\\c\n'})
    assert "héllo 日本 🐄" in text
    assert '"a\\"b\\\\c\\n"' in text  # JSON escapes still apply to quotes, backslashes, controls
    assert json.loads(text) == {"msg": "héllo 日本 🐄", "quote": 'a"b\\c\n'}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        canonical_json({"deep": [1, {"x": bad}]})


def test_unsupported_types_and_cycles_are_rejected() -> None:
    with pytest.raises(TypeError):
        canonical_json({"x": {1, 2}})
    with pytest.raises(TypeError):
        canonical_json({"x": b"bytes"})
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="circular"):
        canonical_json(loop)


def test_tuples_and_str_enums_encode_as_plain_json() -> None:
    assert canonical_json({"t": (1, "a"), "v": Verdict.DENY, "c": Category.MINING}) == (
        '{"c":"mining","t":[1,"a"],"v":"deny"}'
    )


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
@settings(max_examples=60)
def test_canonical_json_matches_json_dumps_and_is_a_fixed_point(value: Any) -> None:
    text = canonical_json(value)
    assert text == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    assert canonical_json(json.loads(text)) == text


# -- hashes ------------------------------------------------------------------------------


def test_hashes_carry_the_algorithm_prefix() -> None:
    h = sha256_hex("x")
    assert h.startswith(HASH_PREFIX) and len(h) == len(HASH_PREFIX) + 64


def test_genesis_depends_on_ledger_id() -> None:
    assert genesis_hash("a") == genesis_hash("a")
    assert genesis_hash("a") != genesis_hash("b")


def test_record_hash_matches_the_documented_definition() -> None:
    fields: dict[str, Any] = dict(
        seq=7,
        ts=1715000000.25,
        kind="decision",
        run_id="r1",
        episode=2,
        step=None,
        action_id="abc",
        sandbox_id=None,
        body='{"a":"日本\\"x"}',
    )
    assert record_hash(PREV, **fields) == reference_hash(PREV, **fields)


_opt_text = st.none() | st.text()
_opt_int = st.none() | st.integers()


@given(
    seq=st.integers(min_value=1),
    ts=st.floats(allow_nan=False, allow_infinity=False),
    kind=st.text(min_size=1),
    run_id=_opt_text,
    episode=_opt_int,
    step=_opt_int,
    action_id=_opt_text,
    sandbox_id=_opt_text,
    body=st.text(),
)
@settings(max_examples=100)
def test_record_hash_fast_path_equals_reference(**fields: Any) -> None:
    try:
        expected = reference_hash(PREV, **fields)
    except UnicodeEncodeError:  # lone surrogates: neither form can be hashed
        with pytest.raises(UnicodeEncodeError):
            record_hash(PREV, **fields)
        return
    assert record_hash(PREV, **fields) == expected


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("ts", 5, ValueError),  # would read back from SQLite as 5.0 and hash differently
        ("ts", math.nan, ValueError),
        ("episode", True, TypeError),  # would read back as 1
        ("step", 1.0, TypeError),
        ("run_id", b"r1", TypeError),
        ("body", {"a": 1}, TypeError),  # the body is hashed as its stored text
    ],
)
def test_record_hash_rejects_values_that_would_not_read_back(
    field: str, value: Any, error: type[Exception]
) -> None:
    fields: dict[str, Any] = dict(
        seq=1,
        ts=1.0,
        kind="note",
        run_id=None,
        episode=None,
        step=None,
        action_id=None,
        sandbox_id=None,
        body="{}",
    )
    fields[field] = value
    with pytest.raises(error):
        record_hash(PREV, **fields)


def test_every_field_is_covered_by_the_hash() -> None:
    base: dict[str, Any] = dict(
        seq=1,
        ts=1.0,
        kind="note",
        run_id="r",
        episode=1,
        step=1,
        action_id="a",
        sandbox_id="s",
        body="{}",
    )
    changed = {
        "seq": 2,
        "ts": 1.5,
        "kind": "event",
        "run_id": "q",
        "episode": 2,
        "step": 2,
        "action_id": "b",
        "sandbox_id": "t",
        "body": '{"x":1}',
    }
    h = record_hash(PREV, **base)
    assert record_hash(genesis_hash("other"), **base) != h
    for key, value in changed.items():
        assert record_hash(PREV, **{**base, key: value}) != h, key


# -- records and reports -----------------------------------------------------------------


def _row(seq: int, prev: str, body: str = "{}") -> tuple[Any, ...]:
    h = record_hash(prev, seq, 1.0, "note", None, None, None, None, None, body)
    return (seq, 1.0, "note", None, None, None, None, None, body, prev, h)


def test_ledger_record_from_row_parses_body() -> None:
    row = _row(1, PREV, '{"message":"hi"}')
    rec = LedgerRecord.from_row(row)
    assert rec.body == {"message": "hi"}
    assert rec.to_dict()["hash"] == row[-1]
    assert list(rec.to_dict()) == [
        "seq",
        "ts",
        "kind",
        "run_id",
        "episode",
        "step",
        "action_id",
        "sandbox_id",
        "body",
        "prev_hash",
        "hash",
    ]
    with pytest.raises(LedgerIntegrityError) as exc:
        LedgerRecord.from_row(_row(3, PREV, "not json"))
    assert exc.value.seq == 3


def test_chain_checker_on_hand_built_rows() -> None:
    r1 = _row(1, genesis_hash("L"))
    r2 = _row(2, r1[-1])
    checker = ChainChecker("L", 2, r2[-1])
    assert checker.feed([r1]) is None and checker.feed([r2]) is None
    report = checker.finish()
    assert report.ok and report.records == 2 and report.head_hash == r2[-1]

    wrong_ledger = ChainChecker("M", 2, r2[-1]).feed([r1, r2])
    assert wrong_ledger is not None and wrong_ledger.first_bad_seq == 1


def test_verify_report_helpers() -> None:
    good = VerifyReport(True, 3, None, None, "sha256:x")
    good.raise_for_problem()
    assert "3 records" in str(good) and good.to_dict()["head_hash"] == "sha256:x"
    bad = VerifyReport(False, 3, 4, "hash mismatch", "sha256:x")
    with pytest.raises(LedgerIntegrityError) as exc:
        bad.raise_for_problem()
    assert exc.value.seq == 4 and "hash mismatch" in str(exc.value)
