"""The sandbox backend protocol and the records it exchanges.

A backend turns a ``SandboxSpec`` (what the policy allows) into an isolated place to run
commands. The bubblewrap backend is the real one; others (a remote host, a VM) plug in
behind the same protocol, selected by name in ``get_backend``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from corral.errors import CorralError
from corral.sandbox.budget import with_egress_budget

if TYPE_CHECKING:
    from corral.policy import Policy

# What a sandboxed program sees of the host's environment: nothing but these (API keys,
# tokens and the host's proxy settings stay out).
ENV_PASSTHROUGH = ("LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TERM", "TZ")
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_HOME = "/tmp/home"

EXIT_TIMEOUT = 124

# Where a sandbox with a network finds the egress proxy (on its own loopback; see
# sandbox/netns.py), in the variables and tool settings that programs read. Loopback stays
# local: a server the agent runs inside is reached directly.
HTTP_PROXY_URL = "http://127.0.0.1:3128"
SOCKS_PROXY_URL = "socks5h://127.0.0.1:1080"
PROXY_ENV = {
    "HTTP_PROXY": HTTP_PROXY_URL,
    "HTTPS_PROXY": HTTP_PROXY_URL,
    "http_proxy": HTTP_PROXY_URL,
    "https_proxy": HTTP_PROXY_URL,
    "ALL_PROXY": SOCKS_PROXY_URL,
    "all_proxy": SOCKS_PROXY_URL,
    "NO_PROXY": "localhost,127.0.0.1,::1",
    "no_proxy": "localhost,127.0.0.1,::1",
    "PIP_PROXY": HTTP_PROXY_URL,
    # git reads configuration from the environment too (git >= 2.31).
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "http.proxy",
    "GIT_CONFIG_VALUE_0": HTTP_PROXY_URL,
}


def exit_status(returncode: int) -> int:
    """A process's status as a shell reports it: death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


EventSink = Callable[[dict[str, Any]], None]


class SandboxError(CorralError, RuntimeError):
    """The sandbox could not be created or used (not: the command inside failed)."""


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a backend needs to build one sandbox, resolved to absolute host paths."""

    workspace: Path
    hidden: tuple[Path, ...] = ()
    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    protected: tuple[Path, ...] = ()
    tmp_size: int = 512 << 20
    wall_time: float = 1800.0
    memory: int = 4 << 30
    pids: int = 512
    cpus: float = 2.0
    gpus: int = 0
    # Which GPUs (device indices) the grant is, when a host hands them out so that no two
    # sandboxes share one; None: the first ``gpus`` of the machine.
    gpu_ids: tuple[int, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # The policy's network section when it has one (network.mode: proxy): the sandbox then
    # gets the egress proxy's endpoints on its loopback. None: loopback and nothing else.
    network: Mapping[str, Any] | None = None
    policy_name: str = ""

    @classmethod
    def from_policy(
        cls,
        policy: Policy,
        workspace: str | os.PathLike[str],
        *,
        host_env: Mapping[str, str] | None = None,
    ) -> SandboxSpec:
        host_env = os.environ if host_env is None else host_env
        ws = Path(workspace).expanduser().resolve()
        if not ws.is_dir():
            raise SandboxError(f"workspace {ws} is not a directory")
        fs = policy.spec.filesystem
        home = host_env.get("HOME") or os.path.expanduser("~")

        def host_path(p: str) -> Path:
            if p == "~" or p.startswith("~/"):
                p = home + p[1:]
            return Path(p) if os.path.isabs(p) else ws / p

        writable = tuple(host_path(p) for p in fs.writable)
        protected = tuple(
            ws / p for p in fs.protected if (ws / p) not in writable and not os.path.isabs(p)
        )
        env = {k: host_env[k] for k in ENV_PASSTHROUGH if k in host_env}
        env.update({"PATH": SANDBOX_PATH, "HOME": SANDBOX_HOME, "TMPDIR": "/tmp"})
        net = policy.spec.network
        network = net.model_dump(mode="json") if net.mode == "proxy" else None
        if network is not None:
            env.update(PROXY_ENV)
            network = with_egress_budget(network, policy.spec.resources.episode.egress_bytes)
        return cls(
            workspace=ws,
            hidden=tuple(host_path(p) for p in fs.hidden),
            read_only=tuple(host_path(p) for p in fs.read_only),
            writable=writable,
            protected=protected,
            tmp_size=policy.spec.resources.tmp_size,
            wall_time=policy.spec.resources.wall_time,
            memory=policy.spec.resources.memory,
            pids=policy.spec.resources.pids,
            cpus=policy.spec.resources.cpus,
            gpus=policy.spec.resources.gpus,
            env=env,
            network=network,
            policy_name=policy.name,
        )


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What one command did inside a sandbox."""

    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    cpu_s: float | None = None  # CPU time of everything the command ran (cgroup)
    peak_memory: int | None = None  # the sandbox's peak memory so far (cgroup)
    oom_killed: bool = False
    pids_limited: bool = False
    sandbox_cpu_s: float | None = None  # the sandbox's CPU time so far, all it has run


class Backend(Protocol):
    """Create, use and close sandboxes. Implementations must fail closed: a sandbox that
    cannot be built as specified is an error, never a weaker sandbox."""

    name: str

    def create(self, spec: SandboxSpec, on_event: EventSink | None = None) -> str:
        """Make a sandbox; returns its id. ``on_event`` hears what the sandbox did that
        the backend observed (connections through the egress proxy, DNS queries) and
        what happened to it (stopped because its proxy died); it may be called from
        another thread."""
        ...

    def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        stream: bool = False,
    ) -> ExecResult: ...

    def run_shell(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout: float | None = None,
        session: str = "default",
    ) -> ExecResult:
        """A shell command in one of the sandbox's persistent shells (state carries over
        between commands of the same ``session``)."""
        ...

    def open_session(
        self, sandbox_id: str, name: str, env: Mapping[str, str] | None = None
    ) -> None:
        """Another persistent shell in the sandbox; an error if ``name`` exists."""
        ...

    def close_session(self, sandbox_id: str, name: str) -> None: ...

    def read_file(self, sandbox_id: str, path: str) -> bytes: ...

    def write_file(self, sandbox_id: str, path: str, data: bytes) -> None: ...

    def close(self, sandbox_id: str) -> None: ...

    # What the watcher uses to observe and answer (corral.watch).
    def processes(self, sandbox_id: str) -> list[int]: ...

    def roots(self, sandbox_id: str) -> set[int]: ...

    def usage(self, sandbox_id: str) -> dict[str, Any] | None: ...

    def kill_tree(self, sandbox_id: str, pid: int) -> list[int]: ...

    def stop(self, sandbox_id: str, reason: str) -> None: ...

    def freeze(self, sandbox_id: str, reason: str) -> None: ...


def get_backend(name: str = "bwrap") -> Backend:
    """A backend by name, imported only when asked for."""
    if name == "bwrap":
        from corral.sandbox.bwrap import BwrapBackend

        return BwrapBackend()
    raise SandboxError(f"unknown sandbox backend {name!r} (known: bwrap)")
