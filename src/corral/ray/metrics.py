"""One Prometheus exposition for a whole pool: every host's figures with a ``host`` label.

Each host keeps its own ``HostMetrics``; a scraper pointed at the driver should not have
to know the nodes. Families are merged by name (two hosts' counters of the same name are
one family in the exposition, as Prometheus requires), each sample labelled with the
host it came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from corral.ray.pool import SandboxPool


def merge_expositions(by_host: Mapping[str, bytes]) -> bytes:
    """Hosts' expositions as one, each sample labelled ``host``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(by_host))
    return generate_latest(registry)


class _Merged(Collector):
    def __init__(self, by_host: Mapping[str, bytes]) -> None:
        self.by_host = by_host

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for host, text in sorted(self.by_host.items()):
            for fam in text_string_to_metric_families(text.decode("utf-8")):
                merged = families.get(fam.name)
                if merged is None:
                    merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for s in fam.samples:
                    merged.add_sample(s.name, {**s.labels, "host": host}, s.value, s.timestamp)
        yield from families.values()


class PoolMetrics:
    """``/metrics`` for the pool's live view: asks every live host when scraped."""

    def __init__(self, pool: SandboxPool) -> None:
        self.pool = pool

    def text(self) -> bytes:
        return merge_expositions(self.pool.metrics())
