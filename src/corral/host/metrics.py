"""Prometheus metrics of one host, fed by its live feed (``Host.subscribe``).

Each ``HostMetrics`` has a registry of its own, never the process-wide default: a
process may run several hosts (tests do, and a Ray node may), and each must be scraped
as itself. ``text()`` is the exposition, for ``corral serve``'s ``GET /metrics`` and for
any other layer that ships it elsewhere (a Ray actor).

No label names a sandbox, a run or a user: those are unbounded, and a time series per
rollout would swamp the Prometheus that scrapes a training cluster. Labels are profiles,
categories, severities, detector ids and layers, each a short list fixed by the rules
and profiles the host loaded. Who did what is the ledger's job, and the live view's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from corral.host.events import STARTED, HostEvent

if TYPE_CHECKING:
    from corral.host.host import Host

CONTENT_TYPE = CONTENT_TYPE_LATEST
# From a process's start to its alert: exec detectors answer in milliseconds, sustained
# resource rules after their window (3 s for CPU), so the buckets span both.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
# Process start times kept to time alerts against; older ones are forgotten first.
_STARTS_KEPT = 8192


class Exposition(Protocol):
    """Anything ``/metrics`` can serve: one host's figures, or a pool's."""

    def text(self) -> bytes: ...


class HostMetrics:
    """Counters and a latency histogram kept from ``host``'s feed, and gauges read from
    the host when scraped. ``close()`` stops listening."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started = Counter(
            "corral_sandboxes_started", "Sandboxes started, by profile", ["profile"], registry=r
        )
        self.execs = Counter(
            "corral_execs", "Commands run in a sandbox (refused ones are not)", registry=r
        )
        self.denials = Counter(
            "corral_denials",
            "Commands refused before they ran, by the layer that refused them (gate or "
            "audit) and its category",
            ["layer", "category"],
            registry=r,
        )
        self.alerts = Counter(
            "corral_alerts",
            "Alerts raised (by the watcher's detectors and the egress proxy)",
            ["category", "severity", "detector"],
            registry=r,
        )
        self.proxy_bytes = Counter(
            "corral_proxy_bytes",
            "Bytes relayed by the egress proxy, counted when each connection closes; up is "
            "from the sandbox",
            ["direction"],
            registry=r,
        )
        self.latency = Histogram(
            "corral_detection_latency_seconds",
            "From the start of the offending process (or the first evidence of it) to its "
            "alert in the ledger",
            ["category"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "corral_metrics_errors",
            "Ledger records the metrics could not read (a bug to report; the record "
            "itself is in the ledger)",
            registry=r,
        )
        r.register(_Running(host))
        self._starts: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._lock = threading.Lock()
        self._unsubscribe: Callable[[], None] | None = host.subscribe(self._on_event)

    def text(self) -> bytes:
        """The exposition in Prometheus's text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # ------------------------------------------------------------------ the feed
    def _on_event(self, e: HostEvent) -> None:
        # The feed drops a listener that raises, for good: one record of a shape this
        # code did not expect must not end a host's metrics, so it is counted instead.
        try:
            self._count(e)
        except Exception:
            self.errors.inc()

    def _count(self, e: HostEvent) -> None:
        body = e.body
        if e.kind == STARTED:
            self.started.labels(profile=str(body.get("profile") or "?")).inc()
        elif e.kind == "exec":
            self.execs.inc()
        elif e.kind == "decision":
            self._decision(e)
        elif e.kind == "audit":
            if body.get("verdict") not in (None, "allow"):
                self.denials.labels(layer="audit", category=_category(body)).inc()
        elif e.kind == "event":
            self._event(e.sandbox, body)
        elif e.kind == "alert":
            self._alert(e)

    def _decision(self, e: HostEvent) -> None:
        d = e.body.get("decision")
        if not isinstance(d, Mapping):
            return
        verdict = d.get("decision")
        # An "ask" is refused by the gate when nobody can answer it; with an auditor the
        # auditor answers, and its own record says whether that was a refusal.
        if verdict == "deny" or (verdict == "ask" and not self._has_auditor(e.sandbox)):
            self.denials.labels(layer="gate", category=_category(d)).inc()

    def _has_auditor(self, sandbox: str) -> bool:
        try:
            return self.host.get(sandbox).sandbox.review is not None
        except LookupError:
            return False

    def _event(self, sandbox: str, body: Mapping[str, Any]) -> None:
        kind = body.get("kind")
        fields = body.get("fields")
        if kind == "exec":
            pid, t = body.get("pid"), body.get("time")
            if isinstance(pid, int) and isinstance(t, int | float):
                with self._lock:
                    self._starts[(sandbox, pid)] = float(t)
                    self._starts.move_to_end((sandbox, pid))
                    while len(self._starts) > _STARTS_KEPT:
                        self._starts.popitem(last=False)
        elif kind == "net" and isinstance(fields, Mapping) and fields.get("type") == "net-closed":
            for direction in ("up", "down"):
                n = fields.get(f"bytes_{direction}")
                if isinstance(n, int) and n > 0:
                    self.proxy_bytes.labels(direction=direction).inc(n)

    def _alert(self, e: HostEvent) -> None:
        body = e.body
        category = _category(body)
        self.alerts.labels(
            category=category,
            severity=str(body.get("severity") or "none"),
            detector=str(body.get("detector") or "none"),
        ).inc()
        began = self._began(e.sandbox, body)
        if began is not None:
            self.latency.labels(category=category).observe(max(0.0, e.ts - began))

    def _began(self, sandbox: str, alert: Mapping[str, Any]) -> float | None:
        """When the trouble began: the earliest of the evidence's times and the starts
        of the processes it names (a sustained rule's first evidence is its first busy
        sample, seconds after the process started)."""
        times: list[float] = []
        t = alert.get("time")
        if isinstance(t, int | float):
            times.append(float(t))
        evidence = alert.get("evidence")
        # A tuple as the sandbox wrote it, a list once read back from the ledger.
        for ev in evidence if isinstance(evidence, list | tuple) else []:
            if not isinstance(ev, Mapping):
                continue
            t, pid = ev.get("time"), ev.get("pid")
            if isinstance(t, int | float):
                times.append(float(t))
            if isinstance(pid, int):
                with self._lock:
                    start = self._starts.get((sandbox, pid))
                if start is not None:
                    times.append(start)
        return min(times) if times else None


class _Running:
    """``corral_sandboxes``: read from the host at each scrape, so it is never stale."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("corral_sandboxes", _RUNNING_HELP, labels=["profile", "state"])

    def collect(self) -> Iterator[Metric]:
        counts = {(name, state): 0 for name in self.host.profiles.names() for state in _LIVE_STATES}
        for h in self.host.sandboxes():
            key = (h.profile.name, h.state)
            if key[1] in _LIVE_STATES:
                counts[key] = counts.get(key, 0) + 1
        family = GaugeMetricFamily("corral_sandboxes", _RUNNING_HELP, labels=["profile", "state"])
        for (profile, state), n in sorted(counts.items()):
            family.add_metric([profile, state], n)
        yield family


_RUNNING_HELP = "Sandboxes on this host now, by profile and state (running or frozen)"
_LIVE_STATES = ("running", "frozen")


def _category(body: Mapping[str, Any]) -> str:
    c = body.get("category")
    return str(c) if c else "none"
