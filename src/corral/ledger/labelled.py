"""A view of a ledger that labels every record it writes.

A host serving many users writes one ledger; each sandbox writes through a view that adds
``labels`` (who asked, for which experiment, in which namespace) to every record's body,
so ``corral log`` and ``corral export`` can tell the users' runs apart. The labels are in
the body, and so under the hash chain.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from corral.ledger.store import Ledger


class LabelledLedger(Ledger):
    """Writes go to ``base`` with ``labels`` added; everything else is ``base``'s."""

    def __init__(self, base: Ledger, labels: Mapping[str, str]) -> None:
        # No Ledger.__init__: this shares base's connection, lock and chain head.
        self._base = base
        self.labels = {k: v for k, v in labels.items() if v}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def append(self, kind: str, body: Mapping[str, Any], **where: Any) -> int:
        if self.labels:
            body = {**body, "labels": self.labels}
        return self._base.append(kind, body, **where)

    @contextmanager
    def batch(self) -> Iterator[None]:
        with self._base.batch():
            yield

    @property
    def closed(self) -> bool:
        return self._base.closed

    def close(self) -> None:
        """The host owns the ledger; a view closes nothing."""
