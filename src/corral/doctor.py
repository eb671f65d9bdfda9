"""``corral doctor``: which isolation layers are active on this machine, and why not the others.

Each check runs the real thing (a throwaway bubblewrap, a seccomp filter compile, a
probe cgroup), never a guess from version numbers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.paths import corral_home


@dataclass(frozen=True, slots=True)
class Check:
    layer: str
    ok: bool
    essential: bool
    detail: str


def _bwrap() -> list[Check]:
    path = shutil.which("bwrap")
    if path is None:
        return [
            Check("bubblewrap", False, True, "not installed: sudo apt-get install bubblewrap"),
            Check("user namespaces", False, True, "not checked: bubblewrap is missing"),
        ]
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    probe = subprocess.run(
        [path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--", "/bin/true"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    userns = Check(
        "user namespaces",
        probe.returncode == 0,
        True,
        "sandboxes can be made" + (" as root" if os.geteuid() == 0 else " without root")
        if probe.returncode == 0
        else f"bubblewrap failed: {probe.stderr.strip()[:200]} (check kernel.unprivileged_userns_clone, "
        "user.max_user_namespaces, or an AppArmor profile for bwrap)",
    )
    return [Check("bubblewrap", True, True, f"{version} at {path}"), userns]


def _seccomp() -> Check:
    try:
        from corral.sandbox import seccomp

        size = len(seccomp.filter_bpf())
    except Exception as exc:  # libseccomp missing or refusing: report, don't crash
        return Check(
            "seccomp", False, True, f"filter could not be built: {exc} (install libseccomp2)"
        )
    return Check(
        "seccomp",
        True,
        True,
        f"filter compiled ({size // 8} BPF instructions), loaded by bubblewrap",
    )


def _cgroups() -> Check:
    from corral.sandbox.cgroups import Cgroup, Limits, detect

    version = detect()
    if version is None:
        return Check("cgroups", False, False, "no cgroup hierarchy mounted: rlimits only (weaker)")
    cg = Cgroup.create(f"doctor-{os.getpid()}", Limits(64 << 20, 16, 1.0))
    if cg is None:
        hint = (
            "run as root, or from a systemd scope with Delegate=yes (systemd-run --user --scope -p Delegate=yes)"
            if version == "v2"
            else "cgroup v1 needs root to make groups"
        )
        return Check(
            "cgroups",
            False,
            False,
            f"cgroup {version} present but not writable: rlimits only; {hint}",
        )
    cg.remove()
    return Check(
        "cgroups", True, False, f"cgroup {version}: memory, pids and CPU limits per sandbox"
    )


def _gpus(dev: Path = Path("/dev")) -> Check:
    nodes = sorted(p.name for p in dev.glob("nvidia[0-9]*") if p.name[len("nvidia") :].isdigit())
    if not nodes:
        return Check(
            "gpus", True, False, "no NVIDIA GPU on this machine; sandboxes get none anyway"
        )
    from corral.sandbox.gpus import machine_uuids
    from corral.watch.gpu import NvmlBackend

    nvml = NvmlBackend.open()
    if nvml is None:
        return Check(
            "gpus",
            False,
            False,
            f"{len(nodes)} GPU(s): {', '.join(nodes)}; granted per policy (resources.gpus), but"
            f" their use cannot be watched: {NvmlBackend.last_error}",
        )
    nvml.close()
    uuids = machine_uuids()
    named = all(int(n[len("nvidia") :]) in uuids for n in nodes)
    return Check(
        "gpus",
        True,
        False,
        f"{len(nodes)} GPU(s): {', '.join(nodes)}; granted per policy (resources.gpus),"
        + (" named by UUID in CUDA_VISIBLE_DEVICES" if named else " numbered 0..k-1 inside")
        + "; watched through NVML",
    )


def _state() -> Check:
    home = corral_home()
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        writable = os.access(home, os.W_OK)
    except OSError as exc:
        return Check("ledger", False, True, f"cannot use {home}: {exc.strerror}")
    return Check("ledger", writable, True, f"{home} ({'writable' if writable else 'read-only'})")


def _egress() -> Check:
    """The real way out: sockets made in a throwaway sandbox's network namespace, and
    the proxy process started."""
    path = shutil.which("bwrap")
    if path is None:
        return Check("egress proxy", False, False, "not checked: bubblewrap is missing")
    import json

    from corral.egress.host import EgressProxy
    from corral.sandbox.netns import listeners_in

    r, w = os.pipe()
    cmd = [path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/"]
    proc = subprocess.Popen(
        [*cmd, "--info-fd", str(w), "--", "sleep", "10"], pass_fds=(w,), stderr=subprocess.PIPE
    )
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            pid = int(json.loads(f.read() or b"{}").get("child-pid", 0))
        if not pid:
            return Check("egress proxy", False, False, "no sandbox to try it in (see above)")
        for sock in listeners_in(pid).values():
            sock.close()
        proxy = EgressProxy()
        proxy.close()
    except Exception as exc:  # report, don't crash
        return Check(
            "egress proxy",
            False,
            False,
            f"sandboxes with network.mode: proxy cannot get their way out: {exc}",
        )
    finally:
        proc.kill()
        proc.wait()
    return Check(
        "egress proxy",
        True,
        False,
        "network.mode: none gives loopback only; proxy gives 127.0.0.1:3128 (HTTP), :1080"
        " (SOCKS5) and :53 (DNS) inside, leading to the policy proxy",
    )


def _watch() -> Check:
    """What the watcher can see here: every exec as it happens needs the proc connector
    (root); without it, processes are found by scanning cgroups ten times a second."""
    from corral.watch.procevents import ProcConnector

    conn = ProcConnector.open()
    if conn is None:
        why = getattr(ProcConnector, "last_error", "") or "not available"
        return Check(
            "watcher",
            True,
            False,
            f"processes found by cgroup scans at 10 Hz; exec events as they happen need root ({why})",
        )
    conn.close()
    return Check(
        "watcher", True, False, "exec events from the kernel's proc connector, and cgroup scans"
    )


def run_checks() -> list[Check]:
    return [*_bwrap(), _seccomp(), _cgroups(), _gpus(), _state(), _egress(), _watch()]


def as_dicts(checks: list[Check]) -> list[dict[str, object]]:
    return [asdict(c) for c in checks]
