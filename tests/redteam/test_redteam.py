"""The red-team harness: canaries that notice a touch, and attacks that touch none.

A fast subset of what `make redteam` runs on the whole corpus; the attacks are this
folder's own (attacks.jsonl), aimed squarely at the canaries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from corral.policy import Policy
from corral.redteam import Canaries, load_attacks, redteam_policy, retarget, run_attacks, summarize

HERE = Path(__file__).parent
ROOT = os.geteuid() == 0


@pytest.fixture
def canaries() -> Canaries:
    base = Path(tempfile.mkdtemp(prefix="corral-rt-test-", dir="/var/tmp"))
    try:
        with Canaries(base) as c:
            yield c  # type: ignore[misc]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_each_canary_notices_a_touch_from_the_host(canaries: Canaries) -> None:
    assert canaries.check() == []
    expected = {"secret-file", "outside-file", "host-loopback", "host-process"} | (
        {"internet"} if ROOT else set()
    )
    assert set(canaries.active) == expected
    assert canaries.secret_dir is not None
    (canaries.secret_dir / "id_ed25519").read_text()
    assert {h.canary for h in canaries.check()} == {"secret-file"}
    (canaries.outside_dir / "canary.txt").write_text("x")
    assert {h.canary for h in canaries.check()} == {"outside-file"}
    with socket.create_connection(("127.0.0.1", canaries.loopback_ports[0])) as s:
        s.sendall(b"hello")
    time.sleep(0.1)
    assert {h.canary for h in canaries.check()} == {"host-loopback"}
    assert {h.canary for h in canaries.check([f"leaked: {canaries.token}"])} == {"secret-file"}
    if ROOT:
        assert canaries.internet_ip is not None
        with socket.create_connection((canaries.internet_ip, 12345), timeout=3) as s:
            s.sendall(b"exfil")
        time.sleep(0.3)
        assert {h.canary for h in canaries.check()} == {"internet"}
    else:
        assert "needs root" in canaries.unavailable["internet"]
    assert canaries.host_pid is not None
    os.kill(canaries.host_pid, signal.SIGSTOP)
    time.sleep(0.05)
    hits = canaries.check()
    os.kill(canaries.host_pid, signal.SIGCONT)
    assert {h.canary for h in hits} == {"host-process"}


def test_canaries_clean_up_after_themselves() -> None:
    base = Path(tempfile.mkdtemp(prefix="corral-rt-test-", dir="/var/tmp"))
    with Canaries(base) as c:
        secret_dir, pid = c.secret_dir, c.host_pid
        ns = f"crt-{c.id}"
    shutil.rmtree(base)
    assert secret_dir is not None and not secret_dir.exists()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    if ROOT:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert ns not in listed


def test_placeholders_point_at_the_stand_in_internet() -> None:
    cmd = "curl http://attacker.com:4444/x; nc target.example.com 80; ping 8.8.8.8; echo notattacker.com"
    out = retarget(cmd, "10.203.1.2")
    assert (
        out
        == "curl http://10.203.1.2:4444/x; nc 10.203.1.2 80; ping 10.203.1.2; echo notattacker.com"
    )


def test_the_redteam_policy_is_swe_without_a_way_out() -> None:
    p = redteam_policy()
    assert p.spec.network.mode == "proxy" and p.spec.network.allow == ()
    assert p.check("pytest -q").allowed
    assert not p.check("curl https://pypi.org/simple/").allowed


def test_no_canary_is_touched_with_the_gate_on_or_off() -> None:
    attacks = load_attacks(HERE / "attacks.jsonl")
    outcomes, canaries = run_attacks(attacks, timeout=5)
    report = summarize(outcomes, canaries)
    assert report["canary_hits"] == 0, json.dumps(report["hits"], indent=1)
    assert report["runs"] == 2 * len(attacks)
    on = [o for o in outcomes if o.gate == "on"]
    off = [o for o in outcomes if o.gate == "off"]
    assert all(o.ran for o in off)  # with the gate off everything really ran
    assert sum(o.decision != "allow" for o in on) >= len(on) - 2
    # The watcher saw what ran: the renamed miner and the reverse shell at least.
    alerts = {a for o in off for a in o.alerts}
    assert any(a.startswith("mining:") for a in alerts)


def test_a_breach_is_seen(tmp_path: Path) -> None:
    """The harness can fail: make the outside folder writable and the same attack hits."""
    base = redteam_policy().to_dict()
    attacks = [a for a in load_attacks(HERE / "attacks.jsonl") if a.id == "t-outside-write"]

    # The canary folder is made inside run_attacks; a writable /var/tmp covers it.
    base["filesystem"]["writable"] = ["/var/tmp"]
    weak = Policy.from_dict(base)
    outcomes, _ = run_attacks(attacks, gates=("off",), policy=weak, internet=False)
    assert outcomes[0].hits and outcomes[0].hits[0].canary == "outside-file"


def test_the_cli_writes_the_report_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "redteam.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "redteam",
            "--attacks",
            str(HERE / "attacks.jsonl"),
            "--category",
            "tunnel",
            "--category",
            "mining",
            "-o",
            str(out),
            "--home",
            str(tmp_path / "h"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["canary_hits"] == 0 and report["attacks"] == 3 and report["runs"] == 6
    assert set(report["per_category"]) == {"tunnel", "mining"}
    assert "canary_hits: 0" in r.stdout and "tunnel" in r.stdout
