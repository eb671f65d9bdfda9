"""What happens on a host, as it happens: every record its sandboxes write, and their
starts and stops, handed to whoever listens (metrics, the live view, a Ray driver).

The ledger is the record that lasts; this feed is the live copy of it. Listeners are
called on the writing thread, after the record is written, so they must be quick and
must not raise into the sandbox: a listener that fails is dropped, never retried, and
the write it saw has already happened.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

# Kinds of host events beside the ledger's own record kinds (decision, event, alert, note).
STARTED, STOPPED = "sandbox started", "sandbox stopped"


@dataclass(frozen=True, slots=True)
class HostEvent:
    """One thing that happened on a host. ``seq`` is the ledger record's (0 for a
    lifecycle event that wrote none); ``body`` is the record's body as written."""

    kind: str
    sandbox: str
    owner: str
    body: Mapping[str, Any]
    seq: int = 0
    ts: float = 0.0
    run_id: str | None = None
    action_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sandbox": self.sandbox,
            "owner": self.owner,
            "seq": self.seq,
            "ts": self.ts,
            "run_id": self.run_id,
            "action_id": self.action_id,
            "labels": dict(self.labels),
            "body": dict(self.body),
        }


T = TypeVar("T")
Listener = Callable[[HostEvent], None]


class EventFeed(Generic[T]):
    """Listeners by token; thread-safe. ``publish`` never raises."""

    def __init__(self) -> None:
        self._listeners: dict[int, Callable[[T], None]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self.dropped: list[tuple[Callable[[T], None], BaseException]] = []

    def subscribe(self, listener: Callable[[T], None]) -> Callable[[], None]:
        """Call ``listener`` with every event from now on; returns the unsubscribe."""
        with self._lock:
            token = self._next
            self._next += 1
            self._listeners[token] = listener

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(token, None)

        return unsubscribe

    def __bool__(self) -> bool:
        """Whether anyone listens: a host with no listener builds no events."""
        return bool(self._listeners)

    def publish(self, event: T) -> None:
        with self._lock:
            listeners = list(self._listeners.items())
        for token, listener in listeners:
            try:
                listener(event)
            except Exception as exc:
                with self._lock:
                    self._listeners.pop(token, None)
                    self.dropped.append((listener, exc))
