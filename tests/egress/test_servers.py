"""The egress test servers work: real clients on the host reach them directly, no proxy."""

from __future__ import annotations

import os
import pwd
import socket
import ssl
import stat
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.egress.servers import (
    HELLO,
    HOST,
    CertAuthority,
    GitServer,
    HTTPServer,
    PackageIndex,
    SSHServer,
    no_proxy_env,
    serve_hello,
)

ENV = no_proxy_env(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)


def run(*argv: str | Path, timeout: float = 30, input: bytes | None = None) -> bytes:
    done = subprocess.run(
        [str(a) for a in argv], env=ENV, input=input, capture_output=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def curl(*args: str | Path, input: bytes | None = None) -> bytes:
    return run("curl", "--silent", "--show-error", "--fail", "--noproxy", "*", *args, input=input)


def test_http_server(http_server: HTTPServer) -> None:
    assert http_server.host == HOST
    assert http_server.url == f"http://{HOST}:{http_server.port}"
    assert http_server.hits == [] and http_server.connections() == 0

    # Two requests on one kept-alive connection: HTTP/1.1 works.
    out = curl(f"{http_server.url}/", f"{http_server.url}/?again")
    assert out == HELLO * 2
    assert http_server.hits == ["/", "/?again"]
    assert http_server.connections() == 1

    assert curl("--data-binary", "ping\n", f"{http_server.url}/echo") == b"ping\n"
    head = curl("--head", f"{http_server.url}/big?n=123")
    assert b"Content-Length: 123" in head
    assert http_server.requests[-1].method == "HEAD"
    assert run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{http_server.url}/no") == (
        b"404"
    )


def test_http_server_streams_100mb(http_server: HTTPServer) -> None:
    n = 100 * 1000 * 1000
    out = curl("-o", "/dev/null", "-w", "%{size_download}", f"{http_server.url}/big?n={n}")
    assert int(out) == n


def test_http_server_echo_chunked(http_server: HTTPServer) -> None:
    body = b"y" * 70000
    out = curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", "@-", f"{http_server.url}/echo",
        input=body,
    )  # fmt: skip
    assert out == body


def test_test_ca_files(test_ca: CertAuthority) -> None:
    assert stat.S_IMODE(test_ca.ca_pem.stat().st_mode) == 0o644
    assert stat.S_IMODE(test_ca.ca_pem.parent.stat().st_mode) == 0o755
    cert = test_ca.issue()
    text = run("openssl", "x509", "-in", cert.cert_pem, "-noout", "-text").decode()
    assert "IP Address:127.0.0.2" in text
    assert "DNS:localhost" in text and "DNS:corral-test.internal" in text
    run("openssl", "verify", "-CAfile", test_ca.ca_pem, cert.cert_pem)
    assert test_ca.issue() is cert


def test_https_server_curl(https_server: HTTPServer, test_ca: CertAuthority) -> None:
    assert https_server.url == f"https://{HOST}:{https_server.port}"
    assert curl("--cacert", test_ca.ca_pem, f"{https_server.url}/") == HELLO
    # By name too: the certificate covers corral-test.internal.
    name_url = f"https://corral-test.internal:{https_server.port}/?named"
    resolve = f"corral-test.internal:{https_server.port}:{HOST}"
    assert curl("--cacert", test_ca.ca_pem, "--resolve", resolve, name_url) == HELLO
    assert https_server.hits == ["/", "/?named"]
    assert https_server.requests[1].headers["Host"] == f"corral-test.internal:{https_server.port}"

    # Without the CA the client refuses, and the server saw a failed handshake.
    refused = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", f"{https_server.url}/"],
        env=ENV,
        capture_output=True,
        timeout=30,
    )
    assert refused.returncode == 60  # peer certificate cannot be authenticated
    assert https_server.tls_errors


def test_https_server_urllib(https_server: HTTPServer, test_ca: CertAuthority) -> None:
    ctx = ssl.create_default_context(cafile=str(test_ca.ca_pem))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
    )
    with opener.open(f"{https_server.url}/", timeout=10) as resp:
        assert resp.read() == HELLO
    req = urllib.request.Request(f"{https_server.url}/echo", data=b"abc", method="POST")
    with opener.open(req, timeout=10) as resp:
        assert resp.read() == b"abc"
    assert https_server.hits == ["/", "/echo"]


def test_package_index_pip_download(package_index: PackageIndex, tmp_path: Path) -> None:
    assert package_index.url.endswith("/simple/")
    run(
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--isolated",
        "--disable-pip-version-check", "--index-url", package_index.url,
        "corral-probe", "-d", tmp_path / "dl",
        timeout=60,
    )  # fmt: skip
    wheel = tmp_path / "dl" / package_index.wheel_name
    assert wheel.is_file()
    assert "/simple/corral-probe/" in package_index.hits
    assert f"/files/{package_index.wheel_name}" in package_index.hits
    with zipfile.ZipFile(wheel) as zf:
        assert zf.testzip() is None

    # It installs, and imports: the wheel is valid (RECORD hashes included).
    run(
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--isolated",
        "--disable-pip-version-check", "--no-index", "--find-links", tmp_path / "dl",
        "--target", tmp_path / "site", "corral-probe",
        timeout=60,
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", "import corral_probe; print(corral_probe.PROBE)"],
        env={**ENV, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout == "corral-probe 1.0\n", done.stderr


def test_git_server_clone(git_server: GitServer, tmp_path: Path) -> None:
    assert git_server.url.endswith("/repo.git")
    run("git", "clone", "-q", git_server.url, tmp_path / "clone")
    assert (tmp_path / "clone" / "README").read_text() == git_server.readme
    head = run("git", "-C", tmp_path / "clone", "rev-parse", "HEAD").decode().strip()
    assert head == git_server.commit
    assert any(h.startswith("/repo.git/info/refs") for h in git_server.hits)


def _ssh(server: SSHServer, key: Path, *command: str, input: bytes | None = None) -> bytes:
    return run(
        "ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", str(server.port),
        f"{server.user}@{server.host}", *command,
        input=input,
    )  # fmt: skip


def test_sshd_server(sshd_server: SSHServer) -> None:
    assert sshd_server.host == HOST
    assert sshd_server.user == pwd.getpwuid(os.getuid()).pw_name
    assert stat.S_IMODE(sshd_server.client_key.stat().st_mode) == 0o600
    before = sshd_server.connections()
    assert _ssh(sshd_server, sshd_server.client_key, "echo", "ok") == b"ok\n"
    assert sshd_server.connections() == before + 1


def test_sshd_server_forwards(sshd_server: SSHServer, http_server: HTTPServer) -> None:
    # AllowTcpForwarding: ssh -W reaches a server on the host through sshd.
    out = _ssh(
        sshd_server,
        sshd_server.client_key,
        "-W",
        f"{HOST}:{http_server.port}",
        input=b"GET /?via-ssh HTTP/1.0\r\n\r\n",
    )
    assert out.endswith(HELLO)
    assert http_server.hits == ["/?via-ssh"]


def test_sshd_refuses_unknown_key(sshd_server: SSHServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other)
    with pytest.raises(AssertionError, match="Permission denied"):
        _ssh(sshd_server, other, "true")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_files_usable_by_an_ordinary_user(
    test_ca: CertAuthority, https_server: HTTPServer, sshd_server: SSHServer
) -> None:
    # Part of the suite runs as an ordinary user: it must trust the CA and use the key.
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    assert curl("--cacert", test_ca.ca_pem, f"{https_server.url}/") == HELLO
    out = run(
        *nobody, "curl", "-sS", "--noproxy", "*", "--cacert", test_ca.ca_pem, https_server.url
    )
    assert out == HELLO
    out = run(*nobody, "ssh", "-F", "/dev/null", "-i", sshd_server.shared_client_key,
              "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
              "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
              "-p", str(sshd_server.port), f"{sshd_server.user}@{HOST}", "echo", "ok")  # fmt: skip
    assert out == b"ok\n"


def test_servers_stop() -> None:
    with serve_hello() as server:
        port = server.port
    with socket.socket() as s:
        assert s.connect_ex((HOST, port)) != 0
