"""Listening sockets made inside a sandbox's network namespace and held by the host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from corral.sandbox import netns

CLIENT = (
    "import socket, time\n"
    "for _ in range(200):\n"
    "    try:\n"
    "        s = socket.create_connection(('127.0.0.1', 3128), timeout=5)\n"
    "        break\n"
    "    except OSError:\n"
    "        time.sleep(0.02)\n"
    "print(s.recv(100).decode())\n"
)


@pytest.fixture
def sandbox_pid() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A bubblewrap with its own user and network namespaces, running CLIENT."""
    r, w = os.pipe()
    proc = subprocess.Popen(
        [
            "bwrap",
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--info-fd",
            str(w),
            "python3",
            "-c",
            CLIENT,
        ],
        pass_fds=(w,),
        stdout=subprocess.PIPE,
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        pid = json.loads(f.read())["child-pid"]
    try:
        yield pid, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("make", [netns._via_thread, netns._via_child], ids=["thread", "child"])
def test_the_sandbox_reaches_a_socket_only_the_host_holds(
    sandbox_pid: tuple[int, subprocess.Popen[bytes]],
    make: Callable[[int, tuple[netns.Endpoint, ...]], list[socket.socket]],
) -> None:
    pid, proc = sandbox_pid
    http, *rest = make(pid, netns.ENDPOINTS)
    try:
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        http.setblocking(True)
        http.settimeout(10)
        conn, _ = http.accept()
        conn.sendall(b"from the host")
        conn.close()
        out, _ = proc.communicate(timeout=10)
        assert out.decode().strip() == "from the host"
        # On the host's own loopback nothing of the sandbox's listens.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 3128), timeout=1).close()
    finally:
        for s in (http, *rest):
            s.close()


def test_a_namespace_that_is_gone_is_an_error() -> None:
    with pytest.raises(OSError):
        netns.listeners_in(2**22 + 12345)
