"""bubblewrap's command line, read as a list of guarantees (no sandbox is started)."""

from __future__ import annotations

from pathlib import Path

from corral.policy import Policy
from corral.sandbox.backend import SandboxSpec
from corral.sandbox.bwrap import bwrap_argv, gpu_binds
from corral.watch.gpu import device_numbers


def _argv(tmp_path: Path, **policy: object) -> list[str]:
    ws = tmp_path / "ws"
    (ws / ".git" / "hooks").mkdir(parents=True, exist_ok=True)
    spec = SandboxSpec.from_policy(
        Policy.from_dict({"version": 1, **policy}),
        ws,
        host_env={"HOME": str(tmp_path), "OPENAI_API_KEY": "k"},
    )
    return bwrap_argv(spec, ["true"], seccomp_fd=9)


def test_every_namespace_is_unshared_and_privileges_dropped(tmp_path: Path) -> None:
    a = _argv(tmp_path)
    for flag in (
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in a
    assert a[a.index("--cap-drop") + 1] == "ALL"
    assert "--share-net" not in a
    assert a[a.index("--seccomp") + 1] == "9"


def test_root_is_read_only_and_the_workspace_is_bound_after_it(tmp_path: Path) -> None:
    a = _argv(tmp_path)
    ws = str((tmp_path / "ws").resolve())
    assert a[a.index("--ro-bind") : a.index("--ro-bind") + 3] == ["--ro-bind", "/", "/"]
    assert a.index("--bind") > a.index("--ro-bind")
    assert a[a.index("--bind") + 1 : a.index("--bind") + 3] == [ws, ws]


def test_git_hooks_are_bound_read_only_over_the_workspace(tmp_path: Path) -> None:
    a = _argv(tmp_path)
    hooks = str((tmp_path / "ws" / ".git" / "hooks").resolve())
    i = max(i for i, x in enumerate(a) if x == hooks)
    assert a[i - 2] == "--ro-bind" and i > a.index("--bind")


def test_hidden_home_directories_are_covered(tmp_path: Path) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".netrc").write_text("machine x")
    a = _argv(tmp_path, filesystem={"hidden": ["~/.ssh", "~/.netrc"]})
    ssh = str(tmp_path / ".ssh")
    assert a[a.index(ssh) - 1] == "--tmpfs"
    netrc = str(tmp_path / ".netrc")
    assert a[a.index(netrc) - 2 : a.index(netrc)] == ["--ro-bind", "/dev/null"]


def test_environment_is_an_allowlist(tmp_path: Path) -> None:
    a = _argv(tmp_path)
    keys = [a[i + 1] for i, x in enumerate(a) if x == "--setenv"]
    assert "OPENAI_API_KEY" not in keys
    assert {"PATH", "HOME", "TMPDIR"} <= set(keys)


def _fake_dev(tmp_path: Path, gpus: int) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in [f"nvidia{i}" for i in range(gpus)] + ["nvidiactl", "nvidia-uvm"]:
        (dev / name).write_text("")
    return dev


def test_no_gpu_unless_granted(tmp_path: Path) -> None:
    dev = _fake_dev(tmp_path, 4)
    spec = SandboxSpec(workspace=tmp_path, gpus=0)
    a = bwrap_argv(spec, ["true"], dev=dev)
    assert not any("nvidia" in x for x in a)
    assert "CUDA_VISIBLE_DEVICES" not in a


def test_a_gpu_grant_binds_only_those_devices_and_sets_cuda_visible(tmp_path: Path) -> None:
    dev = _fake_dev(tmp_path, 4)
    a = bwrap_argv(SandboxSpec(workspace=tmp_path, gpus=2), ["true"], dev=dev)
    bound = [a[i + 2] for i, x in enumerate(a) if x == "--dev-bind"]
    assert bound == ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    i = a.index("CUDA_VISIBLE_DEVICES")
    assert a[i - 1] == "--setenv" and a[i + 1] == "0,1"


def test_a_host_allocated_grant_binds_exactly_those_gpus(tmp_path: Path) -> None:
    dev = _fake_dev(tmp_path, 4)
    spec = SandboxSpec(workspace=tmp_path, gpus=2, gpu_ids=(3, 1))
    a = bwrap_argv(spec, ["true"], dev=dev)
    bound = [a[i + 2] for i, x in enumerate(a) if x == "--dev-bind"]
    assert bound == ["/dev/nvidia3", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    # CUDA inside counts only the devices it can open, from 0; with no NVML here to name
    # them by UUID the grant is the sandbox's own numbering.
    assert a[a.index("CUDA_VISIBLE_DEVICES") + 1] == "0,1"
    assert a[a.index("CUDA_DEVICE_ORDER") + 1] == "PCI_BUS_ID"


def test_a_grant_names_its_gpus_by_uuid_when_the_driver_can(tmp_path: Path) -> None:
    dev = _fake_dev(tmp_path, 4)
    uuids = {n: f"GPU-{n:08x}-aaaa" for n in range(4)}
    args, env = gpu_binds(1, dev, ids=(3,), uuids=uuids)
    assert next(args[i + 2] for i, x in enumerate(args) if x == "--dev-bind") == "/dev/nvidia3"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-00000003-aaaa"
    # One unknown UUID and the UUIDs cannot name the whole grant: fall back to 0..k-1.
    _, env = gpu_binds(2, dev, ids=(3, 1), uuids={3: "GPU-3"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_device_numbers_follow_the_driver_not_nvml_order() -> None:
    class Nvml:
        def nvmlDeviceGetMinorNumber(self, handle: str) -> int:
            if handle == "broken":
                raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
            return {"a": 2, "b": 0}[handle]

    assert device_numbers(Nvml(), ["b", "broken", "a"]) == [0, 1, 2]


def test_a_gpu_grant_on_a_machine_without_gpus_is_a_no_op(tmp_path: Path) -> None:
    dev = _fake_dev(tmp_path, 0)
    a = bwrap_argv(SandboxSpec(workspace=tmp_path, gpus=1), ["true"], dev=dev)
    assert "--dev-bind" not in a


def test_only_a_gpu_grant_keeps_sysfs_and_then_read_only(tmp_path: Path) -> None:
    # CUDA cannot start without /sys; nothing else in a sandbox needs the host's devices.
    import subprocess

    dev = _fake_dev(tmp_path, 1)
    probe = ["sh", "-c", "ls /sys | wc -l; touch /sys/kernel/x 2>/dev/null || echo read-only"]
    plain = bwrap_argv(SandboxSpec(workspace=tmp_path, gpus=0), probe, dev=dev)
    granted = bwrap_argv(SandboxSpec(workspace=tmp_path, gpus=1), probe, dev=dev)
    assert "/sys" in [plain[i + 1] for i, x in enumerate(plain) if x == "--tmpfs"]
    assert "/sys" not in [granted[i + 1] for i, x in enumerate(granted) if x == "--tmpfs"]
    out = subprocess.run(plain, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "read-only"]
    out = subprocess.run(granted, capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 0 and out[1] == "read-only"
