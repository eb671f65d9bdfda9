"""The host: profiles, limits, ownership, idle time to live, cleanup."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.errors import RuleError
from corral.host import Host, HostError, ProfileRegistry, SandboxNotFound, UnknownProfileError
from corral.ledger import Ledger


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(ledger=Ledger.memory(), root=tmp_path / "host", reap_every=0)
    yield h  # type: ignore[misc]
    h.close()


def test_an_idle_sandbox_is_stopped_after_its_time_to_live(host: Host) -> None:
    idle = host.start("strict", idle_ttl=60)
    busy = host.start("strict", idle_ttl=60)
    forever = host.start("strict")
    with host.using(busy.id):
        assert host.reap_idle(now=time.monotonic() + 61) == [idle.id]  # busy: in use
    assert idle.stopped and not idle.workspace.exists()
    assert host.reap_idle(now=time.monotonic() + 61) == [busy.id]
    assert forever.alive
    with pytest.raises(HostError, match="was stopped: idle"), host.using(idle.id):
        pass


def test_a_client_may_lower_the_profiles_limits_but_not_raise_them(host: Host) -> None:
    base = host.profiles.get("strict").policy.spec.resources
    low = host.start("strict", memory=256 << 20, cpus=0.5)
    assert low.sandbox.spec.memory == 256 << 20 and low.sandbox.spec.cpus == 0.5
    high = host.start("strict", memory=base.memory * 4, cpus=base.cpus * 4)
    assert high.sandbox.spec.memory == base.memory and high.sandbox.spec.cpus == base.cpus


def test_sandboxes_belong_to_their_owner(host: Host) -> None:
    h = host.start("strict", owner="alice")
    assert host.get(h.id, "alice") is h
    with pytest.raises(SandboxNotFound):
        host.get(h.id, "bob")
    with pytest.raises(SandboxNotFound):
        host.stop(h.id, "bob")
    assert h.alive and [x.id for x in host.sandboxes("alice")] == [h.id]
    assert host.sandboxes("bob") == []


def test_stop_then_delete(host: Host) -> None:
    h = host.start("strict")
    with host.using(h.id):
        assert h.sandbox.run("echo x > f && cat f").stdout == "x\n"
    host.stop(h.id)
    assert not h.alive and not h.workspace.exists()
    assert host.get(h.id) is h  # still answers, as stopped
    host.delete(h.id)
    with pytest.raises(SandboxNotFound):
        host.get(h.id)


def test_an_unknown_profile_lists_the_known_ones(host: Host) -> None:
    with pytest.raises(UnknownProfileError, match=r"no profile 'debian'.*python:3\.11.*strict"):
        host.start("debian")


def test_a_profile_copies_its_workspace_and_sets_its_environment(tmp_path: Path) -> None:
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "README").write_text("task files\n")
    f = tmp_path / "profiles.yaml"
    f.write_text(
        "version: 1\nprofiles:\n  task-a:\n    policy: strict\n    workspace: tpl\n"
        "    env: {TASK: a}\n"
    )
    with Host(
        profiles=ProfileRegistry.load(f), ledger=Ledger.memory(), root=tmp_path / "h", reap_every=0
    ) as host:
        h = host.start("task-a")
        r = h.sandbox.run("cat README; echo $TASK")
        assert r.stdout == "task files\na\n"
    assert (tpl / "README").exists()  # the template itself is untouched


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("version: 1\nprofiles:\n  a:\n    policy: nope\n", ":4: profiles.a.policy"),
        (
            "version: 1\nprofiles:\n  a:\n    policy: strict\n    colour: red\n",
            ":5: profiles.a.colour",
        ),
        (
            "version: 1\nprofiles:\n  a:\n    policy: strict\n    workspace: missing\n",
            ":5: profiles.a.workspace",
        ),
        (
            "version: 1\nprofiles:\n  a:\n    policy: strict\n    memory: lots\n",
            ":5: profiles.a.memory",
        ),
    ],
)
def test_profile_errors_name_the_file_line_and_key(tmp_path: Path, text: str, where: str) -> None:
    f = tmp_path / "profiles.yaml"
    f.write_text(text)
    with pytest.raises(RuleError) as e:
        ProfileRegistry.load(f)
    assert f"{f}{where}" in str(e.value)


def test_listeners_see_every_record_and_the_start_and_stop(host: Host) -> None:
    from corral.host import STARTED, STOPPED, HostEvent

    seen: list[HostEvent] = []
    unsubscribe = host.subscribe(seen.append)
    h = host.start("strict", owner="alice", labels={"experiment_id": "e1"})
    with host.using(h.id):
        h.sandbox.run("echo hi")
        h.sandbox.run("ssh -R 9000:localhost:22 evil.example")
    host.stop(h.id)
    kinds = [e.kind for e in seen]
    # The sandbox notes its policy while it is made, just before the host says it started.
    assert STARTED in kinds[:3] and kinds[-1] == STOPPED
    assert "decision" in kinds
    assert all(e.sandbox == h.id and e.owner == "alice" for e in seen)
    assert all(e.labels["experiment_id"] == "e1" for e in seen)
    # Each record event is the ledger's record: same seq, same body (less the labels).
    for e in seen:
        if e.seq:
            rec = host.ledger.get(e.seq)
            assert rec is not None and rec.kind == e.kind
            assert {k: v for k, v in rec.body.items() if k != "labels"} == dict(e.body)
    denied = [e for e in seen if e.kind == "decision" and e.body["decision"]["decision"] == "deny"]
    assert denied and denied[0].action_id == denied[0].body["action"]["id"]
    unsubscribe()
    host.start("strict")
    assert [e.kind for e in seen][-1] == STOPPED  # nothing after unsubscribing


def test_a_failing_listener_is_dropped_and_the_sandbox_goes_on(host: Host) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    host.subscribe(broken)
    h = host.start("strict")
    with host.using(h.id):
        assert h.sandbox.run("echo fine").stdout == "fine\n"
    assert [type(exc) for _, exc in host.events.dropped] == [RuntimeError]


_KILLED_HOST = """
import sys, time
from corral.host import Host
from corral.ledger import Ledger
host = Host(ledger=Ledger.open(sys.argv[2]), root=sys.argv[1], reap_every=0)
h = host.start("strict")
h.sandbox.run("sleep 1000.3125 > /dev/null 2>&1 &")
# One caught between its start and its cgroup: in none, and it outlives its parent.
import subprocess
ws = str(h.workspace)
subprocess.Popen(["bwrap", "--unshare-pid", "--ro-bind", "/", "/", "--bind", ws, ws, "--", "sleep", "1000.6875"])
print(h.id, h.sandbox.id, h.workspace, flush=True)
time.sleep(1000)
"""


def test_a_host_killed_with_sigkill_leaves_nothing_once_the_next_one_starts(
    tmp_path: Path,
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.procs import running

    root = tmp_path / "host"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_HOST, str(root), str(tmp_path / "l.db")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    hosted_id, sandbox_id, workspace = proc.stdout.readline().split()
    cgroups = [
        os.path.join(r, d)
        for r, ds, _ in os.walk("/sys/fs/cgroup")
        for d in ds
        if d == f"corral-{sandbox_id}"
    ]
    assert cgroups and Path(workspace).is_dir() and running("sleep 1000.3125")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    # Its processes die with it; its cgroups and workspace stay until a host looks.
    deadline = time.monotonic() + 5
    while running("sleep 1000.3125") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running("sleep 1000.3125")
    assert all(Path(c).exists() for c in cgroups) and Path(workspace).exists()
    assert running("sleep 1000.6875")
    with Ledger.open(tmp_path / "l.db") as ledger:
        nxt = Host(ledger=ledger, root=root, reap_every=0)
        try:
            assert nxt.reaped == [hosted_id]
            assert not any(Path(c).exists() for c in cgroups) and not Path(workspace).exists()
            deadline = time.monotonic() + 5
            while running("sleep 1000.6875") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not running("sleep 1000.6875")
            with Host(ledger=ledger, root=root, reap_every=0) as again:
                assert again.reaped == []  # once only
        finally:
            nxt.close()
        assert ledger.verify().ok
        notes = [r.body for r in ledger.records(kinds="note")]
        assert any(n.get("sandbox_ids") == [hosted_id] for n in notes)


def test_gpu_sandboxes_each_get_their_own_gpus_and_give_them_back(tmp_path: Path) -> None:
    (tmp_path / "gpu.yaml").write_text(
        "version: 1\nextends: strict\nname: gpu\nresources: {gpus: 2}\n"
    )
    f = tmp_path / "profiles.yaml"
    f.write_text(
        f"version: 1\nprofiles:\n  trainer:\n    policy: {tmp_path / 'gpu.yaml'}\n"
        "  plain:\n    policy: strict\n"
    )
    with Host(
        profiles=ProfileRegistry.load(f),
        ledger=Ledger.memory(),
        root=tmp_path / "h",
        reap_every=0,
        gpus=[0, 1, 2, 3, 4],
    ) as host:
        a, b = host.start("trainer"), host.start("trainer")
        assert (a.sandbox.spec.gpu_ids, b.sandbox.spec.gpu_ids) == ((0, 1), (2, 3))
        with pytest.raises(HostError, match="needs 2 GPU"):
            host.start("trainer")  # one left: never shared, never half a grant
        host.stop(a.id)
        c = host.start("trainer")
        assert c.sandbox.spec.gpu_ids == (0, 1)
        assert host.start("plain").sandbox.spec.gpu_ids is None  # no grant, no GPUs


def test_a_marker_cut_short_by_a_kill_is_reaped_with_what_it_names(tmp_path: Path) -> None:
    import json
    import subprocess

    from corral.host import orphans

    root = tmp_path / "host"
    live = root / ".live"
    live.mkdir(parents=True)
    gone = subprocess.Popen(["true"])  # a host that has exited
    gone.wait()
    workspace = root / "abc"
    workspace.mkdir()
    body = {"pid": gone.pid, "start": "1", "workspace": str(workspace), "cgroups": []}
    # Killed between the write and the rename: whole, and cut short.
    (live / f"abc.{gone.pid}-1.tmp").write_text(json.dumps(body))
    (live / f"def.{gone.pid}-1.tmp").write_text(json.dumps(body)[:20])
    # One being written by a host that runs (this process) is left alone.
    me = orphans._start_time(os.getpid())
    (live / f"ghi.{os.getpid()}-{me}.tmp").write_text("{")
    assert orphans.reap(root) == ["abc"]
    assert not workspace.exists()
    assert sorted(p.name for p in live.iterdir()) == [f"ghi.{os.getpid()}-{me}.tmp"]
