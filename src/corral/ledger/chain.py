"""Canonical JSON, the hash chain and its checking: pure code, no I/O (``store`` reads).

Canonical JSON
    ``json`` with sorted keys, separators ``(",", ":")``, ``ensure_ascii=False`` (UTF-8 text,
    not ``\\u`` escapes) and no NaN or infinities: those raise ``ValueError`` because JSON has
    no spelling for them and ``float("nan") != float("nan")`` would make equal data hash
    differently. Tuples become lists and ``StrEnum`` members their values, so a record's
    canonical text is exactly what reading its JSON back and re-encoding gives.

Hashes
    Every hash is the text ``"sha256:" + hexdigest``. The prefix names the algorithm so that a
    later version can change it without guessing what an old ledger used.

    ``record_hash = sha256(prev_hash + "\\n" + canonical_json(fields))`` where ``fields`` is
    ``{"seq", "ts", "kind", "run_id", "episode", "step", "action_id", "sandbox_id", "body"}``
    and ``body`` is the record's canonical JSON *text* (a string), exactly as stored. Hashing
    the stored text rather than the parsed object means verification never parses bodies,
    and any edit to the stored bytes, even one that parses to the same object, shows up.
    ``prev_hash`` has a fixed alphabet and the JSON after it contains no raw newline, so the
    concatenation cannot be split two ways.

    The first record's ``prev_hash`` is ``genesis_hash(ledger_id)``: derived from the ledger's
    random id, so two ledgers never share a chain prefix and records cannot be transplanted
    from one ledger into another with their hashes intact.

Checking
    ``ChainChecker`` is fed stored rows in ``seq`` order, a chunk at a time (so a caller can
    stream any number of them), recomputes every link and hash, and finally compares the end
    of the chain with the separately stored head. It names the first bad ``seq``:

    - an edited row (any field, the body, or its hash): that row, "hash mismatch";
    - deleted rows in the middle: the row after the gap ("record N missing");
    - deleted last rows: the first missing seq ("ledger truncated after seq N");
    - a forged row that links correctly but recomputes differently, reordered or swapped
      rows, a row from another ledger: the first row whose ``prev_hash`` no longer links
      or whose hash no longer matches;
    - rows beyond the stored head (appended behind the ledger's back): the first of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.errors import LedgerIntegrityError

HASH_PREFIX = "sha256:"

_GENESIS_DOMAIN = "corral-ledger-genesis\n"


def _unsupported(o: object) -> Any:
    raise TypeError(f"cannot canonicalize {type(o).__name__}: not a JSON type")


# json.dumps with options builds a new JSONEncoder (and C encoder) per call, which is a large
# share of the cost of a small record; build the C encoder once. No circular-reference
# markers: a cycle ends in RecursionError, turned into ValueError below.
_quote = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
_c_make = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODER = (
    _c_make(None, _unsupported, _quote, None, ":", ",", True, False, False) if _c_make else None
)
_PY_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``.

    Raises ``ValueError`` for NaN, infinities and cycles and ``TypeError`` for values JSON
    cannot represent (or dict keys of mixed types, which cannot be sorted).
    """
    try:
        if _C_ENCODER is not None:
            return "".join(_C_ENCODER(obj, 0))
        return _PY_ENCODER.encode(obj)
    except RecursionError:
        raise ValueError("cannot canonicalize: circular reference or nesting too deep") from None
    except ValueError as e:
        if "Out of range float" not in str(e):
            raise
        # json's own message does not say which rule was broken or why.
        raise ValueError(f"canonical JSON has no NaN or infinity: {e}") from None


def sha256_hex(text: str) -> str:
    """``"sha256:" + hexdigest`` of the UTF-8 encoding of ``text``."""
    return HASH_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()


def genesis_hash(ledger_id: str) -> str:
    """The ``prev_hash`` of a ledger's first record."""
    return sha256_hex(_GENESIS_DOMAIN + ledger_id)


def record_hash(
    prev_hash: str,
    seq: int,
    ts: float,
    kind: str,
    run_id: str | None,
    episode: int | None,
    step: int | None,
    action_id: str | None,
    sandbox_id: str | None,
    body: str,
) -> str:
    """The hash of one record; the arguments after ``prev_hash`` are in column order.

    ``body`` is the record's canonical JSON text, not a dict. The result equals
    ``sha256_hex(prev_hash + "\\n" + canonical_json({"seq": seq, ..., "body": body}))``
    (the tests hold it to that), but the JSON is assembled by hand, keys already in sorted
    order, because this runs once per append and once per record verified. Types are
    checked strictly: a value of the wrong type can only come from a tampered row, and a
    bool or int where the column reads back differently could never re-verify.
    """
    if type(ts) is not float or not math.isfinite(ts):
        # An int ts would hash as "5" but read back from SQLite's REAL column as 5.0.
        raise ValueError(f"ts must be a finite float, got {ts!r}")
    if (
        type(seq) is not int
        or (episode is not None and type(episode) is not int)
        or (step is not None and type(step) is not int)
    ):
        raise TypeError(f"seq, episode and step must be ints, got {(seq, episode, step)!r}")
    # Inline rather than helper calls: this is the hot loop of both append and verify.
    # _quote raises TypeError for anything but a str; "{n}" of an exact int is its repr.
    q = _quote
    return sha256_hex(
        f'{prev_hash}\n{{"action_id":{"null" if action_id is None else q(action_id)},'
        f'"body":{q(body)},"episode":{"null" if episode is None else episode},'
        f'"kind":{q(kind)},"run_id":{"null" if run_id is None else q(run_id)},'
        f'"sandbox_id":{"null" if sandbox_id is None else q(sandbox_id)},"seq":{seq},'
        f'"step":{"null" if step is None else step},"ts":{float.__repr__(ts)}}}'
    )


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One stored record. ``body`` is the parsed JSON that was appended."""

    seq: int
    ts: float
    kind: str
    run_id: str | None
    episode: int | None
    step: int | None
    action_id: str | None
    sandbox_id: str | None
    body: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> LedgerRecord:
        """Build from a stored row (columns in ``LedgerRecord`` field order, body as text)."""
        seq, ts, kind, run_id, episode, step, action_id, sandbox_id, body, prev, h = row
        try:
            parsed = json.loads(body)
        except (TypeError, ValueError) as e:
            raise LedgerIntegrityError(f"record {seq}: body is not JSON ({e})", seq) from e
        return cls(seq, ts, kind, run_id, episode, step, action_id, sandbox_id, parsed, prev, h)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def as_ts(v: object) -> float:
    """``v`` as a finite float timestamp; rejects bools, non-numbers, NaN and infinities."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"ts must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"ts must be finite, got {v!r}")
    return f


def as_opt_int(name: str, v: object) -> int | None:
    """``v`` as an exact int or ``None``. A bool would hash as true/false but read back as 1/0."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or None, got {type(v).__name__}")
    return int(v)


def as_opt_str(name: str, v: object) -> str | None:
    """``v`` as an exact str or ``None``; a ``StrEnum`` member becomes its plain value."""
    if v is None:
        return None
    if isinstance(v, str):
        return str.__str__(v)
    raise TypeError(f"{name} must be a str or None, got {type(v).__name__}")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of checking a ledger's chain.

    ``records`` counts the records that checked out before the first problem (all of them
    when ``ok``). ``first_bad_seq`` is the seq of the first record that is wrong or missing.
    ``head_hash`` is the hash of the last good record: the ledger's head when ``ok``, the
    genesis hash of an empty ledger, ``None`` if the file could not be read as a ledger.
    Keep the head hash somewhere else: it is what makes rewriting the whole file evident.
    """

    ok: bool
    records: int
    first_bad_seq: int | None
    problem: str | None
    head_hash: str | None

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.records} records, head {self.head_hash}"
        if self.first_bad_seq is None:
            return f"FAILED: {self.problem}"
        return f"FAILED at seq {self.first_bad_seq}: {self.problem} ({self.records} good before it)"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def raise_for_problem(self) -> None:
        """Raise ``LedgerIntegrityError`` (carrying ``first_bad_seq``) unless ``ok``."""
        if not self.ok:
            raise LedgerIntegrityError(str(self), self.first_bad_seq)

    @classmethod
    def unreadable(cls, problem: str) -> VerifyReport:
        """A file that could not be read as a ledger at all."""
        return cls(False, 0, None, problem, None)


class ChainChecker:
    """Checks stored rows fed in ``seq`` order, then the stored head.

    A row is ``(seq, ts, kind, run_id, episode, step, action_id, sandbox_id, body,
    prev_hash, hash)`` as read from the database. ``feed`` takes rows a chunk at a time and
    returns a failing report at the first bad row, ``None`` if all were good; after the
    last chunk call ``finish``.
    """

    def __init__(self, ledger_id: str, head_seq: object, head_hash: object) -> None:
        self._head_seq = head_seq
        self._head_hash = head_hash
        self._expect = 1
        self.good = 0
        self.last_hash = genesis_hash(ledger_id)

    def feed(self, rows: Iterable[Sequence[Any]]) -> VerifyReport | None:
        # The hot loop of verification: state in locals, one combined test per row, and
        # the reason worked out only for the row that fails.
        expect, prev, good = self._expect, self.last_hash, self.good
        top = self._head_seq if type(self._head_seq) is int else math.inf
        try:
            for row in rows:
                seq = row[0]
                try:
                    ok = (
                        seq == expect
                        and seq <= top
                        and row[9] == prev
                        and record_hash(prev, *row[:9]) == row[10]
                    )
                except (ValueError, TypeError):
                    ok = False
                if not ok:
                    problem = self._explain(row, expect, prev)
                    return VerifyReport(False, good, seq, problem, prev)
                prev, expect, good = row[10], seq + 1, good + 1
            return None
        finally:
            self._expect, self.last_hash, self.good = expect, prev, good

    def _explain(self, row: Sequence[Any], expect: int, prev: str) -> str:
        seq, head_seq = row[0], self._head_seq
        if seq != expect:
            # Rows come back in seq order, so a mismatch is always a gap (deleted rows);
            # it is the row after the gap that no longer links, so that one is named.
            gap = seq - expect
            return f"seq {seq} follows seq {expect - 1}: record {expect} missing" + (
                f" (and {gap - 1} more)" if gap > 1 else ""
            )
        if isinstance(head_seq, int) and seq > head_seq:
            return f"record {seq} is beyond the recorded head (seq {head_seq})"
        if row[9] != prev:
            return f"prev_hash does not link to record {seq - 1}"
        try:
            record_hash(prev, *row[:9])
        except (ValueError, TypeError) as e:
            return f"record fields cannot be hashed ({e})"
        return "hash mismatch: record content was altered"

    def finish(self) -> VerifyReport:
        """Compare the end of the chain with the stored head (catches deleted last rows)."""
        last_seq, head_seq = self._expect - 1, self._head_seq
        problem = None
        if head_seq != last_seq:
            if isinstance(head_seq, int) and head_seq > last_seq:
                problem = f"ledger truncated after seq {last_seq} (meta head is seq {head_seq})"
                return VerifyReport(False, self.good, last_seq + 1, problem, self.last_hash)
            problem = f"meta head seq {head_seq!r} does not match last record {last_seq}"
        elif self._head_hash != self.last_hash:
            problem = f"meta head hash does not match record {last_seq}'s hash"
        if problem is not None:
            return VerifyReport(False, self.good, last_seq or None, problem, self.last_hash)
        return VerifyReport(True, self.good, None, None, self.last_hash)

    def interrupted(self, problem: str) -> VerifyReport:
        """The rows stopped coming because of an error (e.g. a corrupt database page)."""
        return VerifyReport(False, self.good, self._expect, problem, self.last_hash)
