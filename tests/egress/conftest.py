"""Fixtures: real servers on 127.0.0.2 for the egress proxy's tests (see servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.egress import servers
from tests.egress.servers import CertAuthority, GitServer, HTTPServer, PackageIndex, SSHServer


@pytest.fixture
def http_server() -> Iterator[HTTPServer]:
    """http://127.0.0.2:PORT: `/` hello, `/big?n=BYTES`, `/echo` (POST body back)."""
    with servers.serve_hello() as server:
        yield server


@pytest.fixture(scope="session")
def test_ca() -> Iterator[CertAuthority]:
    """A throwaway CA; `ca_pem` is readable by any user, `issue(names)` makes server certs."""
    with servers.cert_authority() as ca:
        yield ca


@pytest.fixture
def https_server(test_ca: CertAuthority) -> Iterator[HTTPServer]:
    """As http_server, over TLS with a certificate for 127.0.0.2, localhost and
    corral-test.internal signed by test_ca."""
    with servers.serve_hello(tls=test_ca.issue().server_context()) as server:
        yield server


@pytest.fixture
def package_index() -> Iterator[PackageIndex]:
    """A PEP 503 index (`url` ends in /simple/) serving corral-probe 1.0 as a wheel."""
    with servers.serve_package_index() as index:
        yield index


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitServer]:
    """A one-commit repository over dumb HTTP; `url` is the clone URL (…/repo.git)."""
    with servers.serve_git(tmp_path / "git") as server:
        yield server


@pytest.fixture(scope="module")
def sshd_server() -> Iterator[SSHServer]:
    """A real OpenSSH server on 127.0.0.2, shared by a module's tests: compare
    `connections()` before and after rather than expecting it to start at zero."""
    with servers.serve_sshd() as server:
        yield server
