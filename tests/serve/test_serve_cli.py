"""``corral serve`` as a user starts it."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.cli import CORRAL, corral


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_refuses_to_start_without_tokens_or_off_loopback(tmp_path: Path) -> None:
    r = corral(tmp_path, "serve")
    assert r.returncode == 2 and "needs API tokens" in r.stderr
    r = corral(tmp_path, "serve", "--local-only", "--host", "0.0.0.0")
    assert r.returncode == 2 and "loopback only" in r.stderr


def test_local_only_serve_runs_sandboxes_and_stops_them_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CORRAL, "serve", "--local-only", "--port", str(port), "--home", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        v1 = f"{base}/apis/envs/sandbox/v1"
        started = httpx.post(f"{v1}/start_async", json={"image": "strict"}).json()
        assert started["status"] == "Success", started
        sid = started["result"]["sandbox_id"]
        out = httpx.post(f"{v1}/execute", json={"sandbox_id": sid, "command": "echo up"}).json()
        assert out["result"]["stdout"] == "up\n"
        workdir = Path(
            httpx.get(f"{v1}/get_status", params={"sandbox_id": sid}).json()["result"]["workdir"]
        )
        assert workdir.is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "no token (loopback only)" in err
    assert not workdir.exists()  # the host stopped its sandbox on the way out
    r = corral(tmp_path, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
