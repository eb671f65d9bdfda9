"""A view of a ledger that labels every record it writes.

A host serving many users writes one ledger; each sandbox writes through a view that adds
``labels`` (who asked, for which experiment, in which namespace) to every record's body,
so ``corral log`` and ``corral export`` can tell the users' runs apart. The labels are in
the body, and so under the hash chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from corral.ledger.store import Ledger


class LabelledLedger(Ledger):
    """Writes go to ``base`` with ``labels`` added; everything else is ``base``'s."""

    def __init__(
        self,
        base: Ledger,
        labels: Mapping[str, str],
        on_append: Callable[[int, str, Mapping[str, Any], Mapping[str, Any]], None] | None = None,
    ) -> None:
        """``on_append(seq, kind, body, where)`` is called after each write (the host's
        live feed); ``body`` is as given, without the labels."""
        # No Ledger.__init__: this shares base's connection, lock and chain head.
        self._base = base
        self.labels = {k: v for k, v in labels.items() if v}
        self._on_append = on_append

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def append(self, kind: str, body: Mapping[str, Any], **where: Any) -> int:
        written = {**body, "labels": self.labels} if self.labels else body
        seq = self._base.append(kind, written, **where)
        if self._on_append is not None:
            self._on_append(seq, kind, body, where)
        return seq

    @contextmanager
    def batch(self) -> Iterator[None]:
        with self._base.batch():
            yield

    @property
    def closed(self) -> bool:
        return self._base.closed

    def close(self) -> None:
        """The host owns the ledger; a view closes nothing."""
