"""The Ray pool on a local cluster of two logical nodes: real hosts (corral's own Host in
a Ray actor per node), real bubblewrap sandboxes, a host killed mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from corral.host import UnknownProfileError
from corral.ledger import MergedLedger
from corral.ray import HostLost, PoolError, PoolFull, PoolSandbox, SandboxPool
from tests.cli import corral
from tests.procs import running, wait_for

SMALL = {"cpus": 0.1, "memory": 256 << 20}


def _cgroups(ids: set[str]) -> list[str]:
    return [
        os.path.join(root, d)
        for root, dirs, _ in os.walk("/sys/fs/cgroup")
        for d in dirs
        if d.startswith("corral-") and d[len("corral-") :] in ids
    ]


def _mounts() -> int:
    return len(Path("/proc/self/mountinfo").read_text().splitlines())


def _workload(sb: PoolSandbox, i: int) -> str:
    """A rollout's mix: files, compute, a refused tunnel, a process left behind."""
    r = sb.run(f"echo {i} > n.txt && cat n.txt")
    assert r.exit_code == 0 and r.stdout == f"{i}\n", r
    kind = i % 4
    if kind == 0:
        assert sb.run("python3 -c 'print(sum(range(100000)))'").stdout == "4999950000\n"
    elif kind == 1:
        r = sb.run("ssh -R 9000:localhost:22 user@203.0.113.9")
        assert r.refused == "gate" and r.exit_code != 0
    elif kind == 2:
        sb.write_file("notes/a.txt", f"step {i}")
        assert sb.read_file("notes/a.txt") == f"step {i}"
    else:
        assert sb.run("(sleep 4242.25 > /dev/null 2>&1 &) ; echo detached").stdout == "detached\n"
    time.sleep(0.05)  # a model's think time, so runs overlap the kill
    return sb.run("cat n.txt").stdout


def test_two_hundred_sandboxes_and_a_host_killed_mid_run_leave_nothing_behind(
    cluster: Cluster, tmp_path: Path
) -> None:
    mounts_before = _mounts()
    state = tmp_path / "state"
    pool = SandboxPool(name="load", state_dir=state, run_id="run-load")
    outcomes: dict[int, str] = {}
    hosts_of: dict[int, str] = {}
    ids: set[str] = set()  # the hosts' sandbox ids (cgroup names)
    pool_ids: set[str] = set()  # the pool's
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def one(i: int) -> None:
        sb: PoolSandbox | None = None
        try:
            sb = pool.start(**SMALL, labels={"rollout": str(i)})  # type: ignore[arg-type]
            with lock:
                hosts_of[i] = sb.host
                ids.add(sb.sandbox_id)
                pool_ids.add(sb.id)
            out = _workload(sb, i)
            outcomes[i] = "finished" if out == f"{i}\n" else f"wrong output {out!r}"
        except HostLost as e:
            outcomes[i] = f"failed: {e}"
        finally:
            if sb is not None:
                sb.close()
            done.release()

    try:
        with ThreadPoolExecutor(max_workers=24) as ex:
            futures = [ex.submit(one, i) for i in range(200)]
            for _ in range(60):
                done.acquire()
            victim = pool.hosts()[0]["name"]
            ray.kill(pool.actor(victim))  # SIGKILL: the host runs no cleanup
            for f in futures:
                f.result(timeout=300)  # nothing hangs: every sandbox ends one way or another
        assert len(outcomes) == 200
        failed = {i: o for i, o in outcomes.items() if o != "finished"}
        assert all(o.startswith("failed: ") and victim in o for o in failed.values()), failed
        assert failed, "the kill hit no running sandbox"
        # Each failure is on the victim: a sandbox it ran, or one being started there.
        assert all(hosts_of.get(i) in (victim, None) for i in failed)
        assert sum(o == "finished" for o in outcomes.values()) >= 60
        # The pool put a new host on the node; it removed what the dead one left.
        assert wait_for(lambda: all(h["alive"] for h in pool.hosts()))
        replaced = next(h for h in pool.hosts() if h["name"] == victim)
        assert replaced["generation"] == 1
        sb = pool.start(**SMALL)  # type: ignore[arg-type]
        assert sb.run("echo still serving").stdout == "still serving\n"
        sb.close()
    finally:
        pool.close()
    # Nothing leaked: no process, no cgroup, no mount, no workspace.
    assert wait_for(lambda: not running("sleep 4242.25"), timeout=10), running("sleep 4242.25")
    assert not [p for p in running("bwrap") if str(state) in Path(f"/proc/{p}/cmdline").read_text()]
    assert _cgroups(ids) == []
    assert _mounts() == mounts_before
    assert [p for p in state.glob("host-*/*") if p.name != ".live"] == []
    assert [p for p in state.glob("host-*/.live/*")] == []
    # Every host's ledger checks out, the killed one included, and merges into one run.
    with MergedLedger([state]) as merged:
        assert all(v.ok for v in merged.verify().values()), merged.verify()
        assert set(merged.hosts) == {"host-0", "host-1"}
        records = list(merged.records(run_id="run-load"))
        for host in merged.hosts:  # each host's records in its chain's order
            seqs = [hr.record.seq for hr in records if hr.host == host]
            assert seqs == sorted(seqs) and seqs, (
                host,
                len(records),
                [r.record.run_id for r in merged.records()][:20],
            )
        starts = [
            hr
            for hr in merged.records(kinds="note")
            if hr.record.body.get("event") == "pool host started"
        ]
        assert [hr.host for hr in starts].count(victim) == 2  # the dead host's, and its heir's
        reaped = [
            hr.record.body
            for hr in merged.records(kinds="note")
            if hr.host == victim and "sandbox_ids" in hr.record.body
        ]
        # What the dead host ran or was starting: sandboxes the pool handed out, and
        # ones it was starting when the kill came (never handed out).
        assert reaped and reaped[0]["sandbox_ids"]
        rollouts = {(hr.record.body.get("labels") or {}).get("rollout") for hr in records} - {None}
        # Every rollout that got a sandbox is in the merged timeline.
        assert {str(i) for i in hosts_of} <= rollouts


LAUNCHER = """
import os, shutil
# A miner under its own name, started from a script: the gate sees only `python3`.
shutil.copy("/bin/sleep", "xmrig")
os.chmod("xmrig", 0o755)
os.execv("./xmrig", ["xmrig", "1000.4375"])
"""


def test_alerts_stream_back_to_the_driver_as_they_happen(pool: SandboxPool) -> None:
    seen: list[dict[str, Any]] = []
    pool.subscribe(seen.append)
    sb = pool.start(**SMALL)  # type: ignore[arg-type]
    sb.write_file("start.py", LAUNCHER)
    r = sb.run("python3 start.py", timeout=60)
    assert r.exit_code != 0  # killed, with its sandbox
    alert = wait_for(lambda: [a for a in sb.alerts if a.detector == "mining-binary"])
    assert alert, seen
    assert alert[0].action_id == r.action_id and alert[0] in pool.alerts
    assert alert[0].evidence and alert[0].evidence[0].fields["argv"][0] == "xmrig"
    assert not running("xmrig 1000.4375")
    # The host stopped the sandbox (the rule's response); the driver hears that too.
    assert wait_for(lambda: sb.stopped)
    kinds = [e["kind"] for e in seen if e.get("sandbox") == sb.id]
    assert kinds[0] == "sandbox started" and "alert" in kinds
    streamed = next(e for e in seen if e["kind"] == "alert")
    assert streamed["host"] == sb.host and streamed["labels"]["pool"] == "t"
    sb.close()
    time.sleep(1.5)  # the host's delete, streamed like the rest
    stops = [e for e in seen if e.get("sandbox") == sb.id and e["kind"] == "sandbox stopped"]
    assert len(stops) == 1  # told once, though the detector and then the close both stopped it


def test_every_host_reports_its_metrics(pool: SandboxPool) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    sbs = [pool.start(**SMALL) for _ in range(2)]  # type: ignore[arg-type]
    for sb in sbs:
        sb.run("echo counted")
        sb.run("ssh -R 9000:localhost:22 user@203.0.113.9")
    got = pool.metrics()
    assert set(got) == {"host-0", "host-1"}
    for text in got.values():
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples
        }
        assert samples[("corral_execs_total", ())] >= 1
        denied = [v for (n, lab), v in samples.items() if n == "corral_denials_total"]
        assert sum(denied) >= 1
    for sb in sbs:
        sb.close()


def test_the_async_interface_runs_many_at_once(pool: SandboxPool) -> None:
    async def rollouts() -> list[str]:
        sbs = await asyncio.gather(*(pool.astart(**SMALL) for _ in range(8)))  # type: ignore[arg-type]
        try:
            await asyncio.gather(*(sb.awrite_file("x", str(i)) for i, sb in enumerate(sbs)))
            rs = await asyncio.gather(*(sb.arun("cat x; echo") for sb in sbs))
            assert {sb.host for sb in sbs} == {"host-0", "host-1"}  # spread over both
            return [r.stdout for r in rs]
        finally:
            await asyncio.gather(*(sb.aclose() for sb in sbs))

    assert asyncio.run(rollouts()) == [f"{i}\n" for i in range(8)]
    assert pool.sandboxes == []
    assert all(h["reserved_cpus"] == pytest.approx(0) for h in pool.hosts())


def test_errors_arrive_as_themselves_and_room_is_accounted(pool: SandboxPool) -> None:
    with pytest.raises(UnknownProfileError, match="no profile 'nope'"):
        pool.start("nope")
    tight = SandboxPool(name="tight", state_dir=pool.state_dir.parent / "tight", overcommit=0.01)
    try:
        with pytest.raises(PoolFull, match=r"no host has room for a sandbox of 2 CPU.*0\.32 CPU"):
            tight.start()
    finally:
        tight.close()
    # A profile's limits are what it reserves unless told less.
    sb = pool.start()
    res = pool.profiles.get("python:3.11").policy.spec.resources
    assert sum(h["reserved_cpus"] for h in pool.hosts()) == pytest.approx(res.cpus)
    sb.close()
    sb.close()  # twice is harmless
    with pytest.raises(Exception, match="was closed"):
        sb.run("echo x")
    assert all(h["reserved_cpus"] == pytest.approx(0) for h in pool.hosts())


def test_a_pool_needs_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(PoolError, match=r"call ray.init\(\)"):
        SandboxPool()


def test_corral_log_cluster_merges_the_hosts_ledgers(pool: SandboxPool, tmp_path: Path) -> None:
    sbs = [pool.start(**SMALL) for _ in range(2)]  # type: ignore[arg-type]
    for i, sb in enumerate(sbs):
        sb.run(f"echo rollout-{i}")
    for sb in sbs:
        sb.close()
    state = str(pool.state_dir)
    out = corral(tmp_path, "log", "--cluster", state, "--run", "run-pool", "--json")
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["host"] for r in recs} == {"host-0", "host-1"}
    assert all(r["run_id"] == "run-pool" for r in recs)
    text = corral(tmp_path, "log", "--cluster", state, "--kind", "decision").stdout
    assert "echo rollout-0" in text and "echo rollout-1" in text
    assert all(line.startswith(("host-0 ", "host-1 ")) for line in text.splitlines())
