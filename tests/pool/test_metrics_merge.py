"""A pool's hosts' expositions merged into one, each sample labelled with its host."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from corral.ray.metrics import merge_expositions


def _host(execs: int, running: int, latency: float) -> bytes:
    r = CollectorRegistry()
    Counter("corral_execs", "commands run", registry=r).inc(execs)
    Gauge("corral_sandboxes", "running", ["profile"], registry=r).labels("strict").set(running)
    Histogram("corral_detection_latency_seconds", "latency", registry=r).observe(latency)
    return generate_latest(r)


def test_each_family_once_each_sample_with_its_host() -> None:
    text = merge_expositions({"host-1": _host(3, 2, 0.4), "host-0": _host(5, 1, 2.0)})
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert text.decode().count("# TYPE corral_execs_total counter") == 1  # both hosts in one
    execs = {
        s.labels["host"]: s.value for s in fams["corral_execs"].samples if s.name.endswith("_total")
    }
    assert execs == {"host-0": 5.0, "host-1": 3.0}
    running = {
        (s.labels["host"], s.labels["profile"]): s.value for s in fams["corral_sandboxes"].samples
    }
    assert running == {("host-0", "strict"): 1.0, ("host-1", "strict"): 2.0}
    hist = fams["corral_detection_latency_seconds"]
    assert hist.type == "histogram"
    counts = {s.labels["host"]: s.value for s in hist.samples if s.name.endswith("_count")}
    assert counts == {"host-0": 1.0, "host-1": 1.0}


def test_no_hosts_is_an_empty_exposition() -> None:
    assert merge_expositions({}) == b""
