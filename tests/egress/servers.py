"""Real servers on the host's loopback for the egress proxy's acceptance tests.

Inside a sandbox 127.0.0.1 is the sandbox's own loopback, so every server here listens on
127.0.0.2 (all of 127/8 is loopback on Linux) on an ephemeral port. A client in the
sandbox can reach them only through the egress proxy; a test proves that something was
refused by checking that the server recorded nothing (`hits`, `connections()`).

Each server is a context manager that starts on entry and is torn down on exit;
conftest.py wraps them as fixtures. Nothing here reads the environment's proxy settings:
clients run from the host should use `no_proxy_env()`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import ipaddress
import os
import pwd
import secrets
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.2"
HELLO = b"hello from corral test server\n"
CERT_NAMES = ("127.0.0.2", "localhost", "corral-test.internal")
SSHD = "/usr/sbin/sshd"

PROBE_PROJECT = "corral-probe"
PROBE_VERSION = "1.0"
PROBE_MODULE = "corral_probe"
PROBE_SOURCE = b'"""A package served by corral\'s test index."""\n\nPROBE = "corral-probe 1.0"\n'

README_TEXT = "corral test repository\n"

_CHUNK = b"x" * (1 << 20)
_PROXY_VARS = {"http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"}


def no_proxy_env(**extra: str) -> dict[str, str]:
    """The current environment without proxy settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env.update(extra)
    return env


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (for servers that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _world_readable_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _run(*argv: str | Path, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], env=env, check=True, capture_output=True, text=True, timeout=30
    )
    return done.stdout


# --- HTTP servers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request a server received, as it arrived (`path` may be absolute-form)."""

    method: str
    path: str
    headers: Mapping[str, str]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        handler: Callable[..., BaseHTTPRequestHandler],
        tls: ssl.SSLContext | None,
        state: Any = None,
    ) -> None:
        self.tls = tls
        self.state = state
        self.requests: list[Request] = []
        self.tls_errors: list[str] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        super().__init__((HOST, 0), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks getfqdn() for a name: a reverse lookup that can
        # stall for seconds on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = int(self.socket.getsockname()[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock = cast(socket.socket, request)
        with self._lock:
            self.accepted += 1
            self._open.add(sock)
        try:
            if self.tls is not None:
                sock.settimeout(10)
                try:
                    tls_sock = self.tls.wrap_socket(sock, server_side=True)
                except (OSError, ValueError) as e:
                    self.tls_errors.append(f"{type(e).__name__}: {e}")
                    return
                with self._lock:
                    self._open.add(tls_sock)
                try:
                    with contextlib.suppress(OSError):
                        super().finish_request(tls_sock, client_address)
                finally:
                    with self._lock:
                        self._open.discard(tls_sock)
                    # The plain socket was detached into tls_sock: shutdown_request, which
                    # runs next, cannot close it.
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(tls_sock, socket.SHUT_WR)
                    tls_sock.close()
            else:
                with contextlib.suppress(OSError):
                    super().finish_request(sock, client_address)
        finally:
            with self._lock:
                self._open.discard(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client going away mid-response is ordinary here; anything else is a bug.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self._lock:
            socks = list(self._open)
        for s in socks:
            # The plain socket's shutdown, not SSLSocket's: that one clears the TLS state
            # under the thread still reading from it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(s, socket.SHUT_RDWR)


class _Recording(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _HTTPServer

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.requests.append(Request(self.command, self.path, dict(self.headers)))
        return ok

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _route(self) -> str:
        return urlsplit(self.path).path

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _HelloHandler(_Recording):
    """`/` says hello, `/big?n=BYTES` streams n bytes of b"x", `/echo` returns the body."""

    def do_GET(self) -> None:
        route = self._route()
        if route == "/":
            self._reply(HELLO)
        elif route == "/big":
            self._big()
        elif route == "/echo":
            self._reply(b"", "application/octet-stream")
        else:
            self.send_error(404)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        body = self._read_body()
        route = self._route()
        if route == "/echo":
            self._reply(body, "application/octet-stream")
        elif route == "/":
            self._reply(HELLO)
        else:
            self.send_error(404)

    def _big(self) -> None:
        try:
            n = int(parse_qs(urlsplit(self.path).query).get("n", ["0"])[0])
        except ValueError:
            n = -1
        if n < 0:
            self.send_error(400, "n must be a byte count")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command == "HEAD":
            return
        view = memoryview(_CHUNK)
        while n > 0:
            step = min(n, len(_CHUNK))
            self.wfile.write(view[:step])
            n -= step


class _StaticHandler(_Recording):
    """Serves `server.state`: a mapping of path to (content type, body)."""

    def do_GET(self) -> None:
        routes = cast(Mapping[str, tuple[str, bytes]], self.server.state)
        route = self._route()
        if route in routes:
            self._reply(routes[route][1], routes[route][0])
        elif route + "/" in routes:
            self.send_response(301)
            self.send_header("Location", route + "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    do_HEAD = do_GET


class _DirectoryHandler(SimpleHTTPRequestHandler, _Recording):
    """Files under a directory, as a plain web server would (dumb-HTTP git)."""

    protocol_version = "HTTP/1.1"


class HTTPServer:
    """A running server on 127.0.0.2 that records what reached it."""

    def __init__(self, server: _HTTPServer) -> None:
        self._server = server
        self.host = HOST
        self.port = server.server_port
        self.url = f"{'https' if server.tls else 'http'}://{HOST}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        """Every request parsed, in order: method, path as sent, headers."""
        return self._server.requests

    @property
    def hits(self) -> list[str]:
        """The path of every request received, in order, as sent (query included)."""
        return [r.path for r in self._server.requests]

    @property
    def tls_errors(self) -> list[str]:
        """TLS handshakes that failed (a client that did not trust the certificate)."""
        return self._server.tls_errors

    def connections(self) -> int:
        """TCP connections accepted so far, whether or not a request followed."""
        return self._server.accepted


@contextlib.contextmanager
def _serving(server: _HTTPServer) -> Iterator[_HTTPServer]:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.drop_connections()
        thread.join(timeout=5)


@contextlib.contextmanager
def serve_hello(tls: ssl.SSLContext | None = None) -> Iterator[HTTPServer]:
    """The hello/big/echo server, over TLS when `tls` (a server context) is given."""
    with _serving(_HTTPServer(_HelloHandler, tls)) as server:
        yield HTTPServer(server)


# --- certificates -------------------------------------------------------------------------

_CA_EXT = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

_LEAF_EXT = """\
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
"""


@dataclass(frozen=True)
class ServerCert:
    cert_pem: Path
    key_pem: Path
    names: tuple[str, ...]

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_pem, self.key_pem)
        return ctx


@dataclass
class CertAuthority:
    """A throwaway CA made with the openssl command line.

    `ca_pem` is world-readable (0644 in a 0755 directory) so that tests running as an
    ordinary user can trust it; the keys are 0600.
    """

    directory: Path
    ca_pem: Path
    ca_key: Path
    _issued: dict[tuple[str, ...], ServerCert] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path) -> CertAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        cnf = directory / "ca.cnf"
        cnf.write_text(_CA_EXT)
        ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
        _run(
            *("openssl", "req", "-x509", "-config", cnf, "-extensions", "ca", *_EC_KEY),
            *("-days", "7", "-subj", "/CN=corral test CA", "-keyout", ca_key, "-out", ca_pem),
        )
        ca_key.chmod(0o600)
        ca_pem.chmod(0o644)
        return cls(directory, ca_pem, ca_key)

    def issue(self, names: Sequence[str] = CERT_NAMES) -> ServerCert:
        """A server certificate for `names` (IP addresses and DNS names), signed by the CA.

        Issued once per set of names and then reused.
        """
        key = tuple(names)
        if key in self._issued:
            return self._issued[key]
        stem = self.directory / f"server-{len(self._issued)}"
        san = ", ".join(f"{'IP' if _is_ip(n) else 'DNS'}:{n}" for n in key)
        ext = stem.with_suffix(".cnf")
        ext.write_text(_LEAF_EXT.format(san=san))
        csr, cert, pkey = (stem.with_suffix(s) for s in (".csr", ".pem", ".key"))
        _run(
            *("openssl", "req", "-new", "-config", self.directory / "ca.cnf", *_EC_KEY),
            *("-subj", f"/CN={key[0]}", "-keyout", pkey, "-out", csr),
        )
        _run(
            *("openssl", "x509", "-req", "-in", csr, "-CA", self.ca_pem, "-CAkey", self.ca_key),
            *("-set_serial", f"0x{secrets.token_hex(16)}", "-days", "7"),
            *("-extfile", ext, "-extensions", "leaf", "-out", cert),
        )
        pkey.chmod(0o600)
        cert.chmod(0o644)
        issued = ServerCert(cert, pkey, key)
        self._issued[key] = issued
        return issued

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA and nothing else."""
        return ssl.create_default_context(cafile=str(self.ca_pem))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def cert_authority() -> Iterator[CertAuthority]:
    directory = _world_readable_dir("corral-test-ca-")
    try:
        yield CertAuthority.create(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- package index ------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def build_probe_wheel() -> tuple[str, bytes]:
    """A valid pure-Python wheel for corral-probe 1.0: (file name, bytes)."""
    info = f"{PROBE_MODULE}-{PROBE_VERSION}.dist-info"
    files = {
        f"{PROBE_MODULE}/__init__.py": PROBE_SOURCE,
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: {PROBE_PROJECT}\n"
            f"Version: {PROBE_VERSION}\n"
            "Summary: A package served by corral's test index\n"
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\n"
            b"Generator: corral-tests\n"
            b"Root-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return f"{PROBE_MODULE}-{PROBE_VERSION}-py3-none-any.whl", buf.getvalue()


class PackageIndex(HTTPServer):
    """A PEP 503 simple index serving one project, corral-probe 1.0, as a wheel."""

    def __init__(self, server: _HTTPServer, wheel_name: str, wheel: bytes) -> None:
        super().__init__(server)
        self.url = f"{self.url}/simple/"
        self.project = PROBE_PROJECT
        self.version = PROBE_VERSION
        self.wheel_name = wheel_name
        self.wheel_sha256 = hashlib.sha256(wheel).hexdigest()


@contextlib.contextmanager
def serve_package_index() -> Iterator[PackageIndex]:
    name, wheel = build_probe_wheel()
    sha = hashlib.sha256(wheel).hexdigest()
    html = "text/html; charset=utf-8"

    def page(links: str) -> bytes:
        return f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n".encode()

    routes = {
        "/simple/": (html, page(f'<a href="{PROBE_PROJECT}/">{PROBE_PROJECT}</a>\n')),
        f"/simple/{PROBE_PROJECT}/": (
            html,
            page(f'<a href="/files/{name}#sha256={sha}">{name}</a>\n'),
        ),
        f"/files/{name}": ("application/octet-stream", wheel),
    }
    with _serving(_HTTPServer(_StaticHandler, None, routes)) as server:
        yield PackageIndex(server, name, wheel)


# --- git over dumb HTTP -------------------------------------------------------------------


class GitServer(HTTPServer):
    """A bare repository (one commit: README) served as plain files."""

    def __init__(self, server: _HTTPServer, commit: str) -> None:
        super().__init__(server)
        self.url = f"{self.url}/repo.git"
        self.commit = commit
        self.readme = README_TEXT


def make_git_repo(directory: Path) -> str:
    """A bare repo at directory/repo.git ready for dumb HTTP; returns the commit id."""
    env = no_proxy_env(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    ident = ["-c", "user.name=corral test", "-c", "user.email=test@corral.invalid"]
    work, bare = directory / "work", directory / "repo.git"
    _run("git", "init", "-q", "-b", "main", work, env=env)
    (work / "README").write_text(README_TEXT)
    _run("git", "-C", work, "add", "README", env=env)
    _run("git", "-C", work, *ident, "commit", "-q", "-m", "corral test commit", env=env)
    _run("git", "clone", "-q", "--bare", work, bare, env=env)
    _run("git", "-C", bare, "update-server-info", env=env)
    return _run("git", "-C", bare, "rev-parse", "HEAD", env=env).strip()


@contextlib.contextmanager
def serve_git(directory: Path) -> Iterator[GitServer]:
    commit = make_git_repo(directory)
    handler = partial(_DirectoryHandler, directory=str(directory))
    with _serving(_HTTPServer(handler, None)) as server:
        yield GitServer(server, commit)


# --- OpenSSH ------------------------------------------------------------------------------


class SSHServer:
    """A real sshd on 127.0.0.2 accepting `client_key` for the current user.

    `client_key` is 0600 and owned by the current user, as ssh demands of its own keys.
    `shared_client_key` is the same key at 0644 for a test that drops to another user: ssh
    only rejects an open private key when the user running it owns the file.
    """

    def __init__(self, directory: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.host = HOST
        self.port = port
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.client_key = directory / "client_key"
        self.shared_client_key = directory / "shared_client_key"
        self.log_path = directory / "sshd.log"
        self.proc = proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connections(self) -> int:
        """Connections sshd has accepted (its "Connection from" log lines)."""
        return sum("Connection from " in line for line in self.log().splitlines())


_SSHD_CONFIG = """\
ListenAddress {host}:{port}
HostKey {dir}/host_key
PidFile none
UsePAM no
StrictModes no
AuthorizedKeysFile {dir}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
MaxStartups 100
LogLevel VERBOSE
"""


@contextlib.contextmanager
def serve_sshd(start_timeout: float = 10.0) -> Iterator[SSHServer]:
    """sshd in the foreground with its own config and keys in a fresh 0755 directory."""
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"{SSHD} missing: run `bash scripts/setup-system.sh --test`")
    directory = _world_readable_dir("corral-test-sshd-")
    try:
        yield from _sshd(directory, start_timeout)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _sshd(directory: Path, start_timeout: float) -> Iterator[SSHServer]:
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd started as root refuses to run without its privilege-separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    keygen = ("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corral-test")
    _run(*keygen, "-f", directory / "host_key")
    _run(*keygen, "-f", directory / "client_key")
    shutil.copyfile(directory / "client_key", directory / "shared_client_key")
    (directory / "shared_client_key").chmod(0o644)
    shutil.copyfile(directory / "client_key.pub", directory / "authorized_keys")

    last_log = ""
    for _ in range(3):  # another process may take the port between probe and bind
        port = free_port()
        config = directory / "sshd_config"
        config.write_text(_SSHD_CONFIG.format(host=HOST, port=port, dir=directory))
        with open(directory / "sshd.log", "wb") as log:
            # sshd re-executes itself per connection, so it must be named by absolute path.
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        server = SSHServer(directory, port, proc)
        try:
            if _wait_for_sshd(server, start_timeout):
                yield server
                return
            last_log = server.log()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if "Address already in use" not in last_log:
            break
    raise RuntimeError(f"sshd did not start:\n{last_log}")


def _wait_for_sshd(server: SSHServer, timeout: float) -> bool:
    # "Server listening" comes once sshd is bound; probing the port instead would itself
    # count as a connection.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Server listening on" in server.log():
            return True
        if server.proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False
