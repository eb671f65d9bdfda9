"""GPU telemetry: the fake, backend selection, and NVML's logic against a scripted pynvml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from corral.watch import gpu
from corral.watch.gpu import (
    ENV_VAR,
    FakeGpuBackend,
    GpuBackend,
    GpuProcess,
    NvmlBackend,
    open_backend,
)

# --- FakeGpuBackend -----------------------------------------------------------------------


def test_fake_reports_what_it_was_set() -> None:
    fake = FakeGpuBackend(devices=2)
    backend: GpuBackend = fake  # the fake satisfies the protocol the watcher holds
    assert backend.name == "fake"
    assert backend.device_count() == 2
    assert backend.processes() == []
    procs = [GpuProcess(10, 0, 1 << 30, 95.0), GpuProcess(11, 1, 0, 0.0)]
    fake.set(procs)
    assert backend.processes() == procs
    procs.append(GpuProcess(12, 0, 0, 1.0))  # the caller's list is not shared
    assert len(backend.processes()) == 2
    backend.processes().clear()  # nor is the returned one
    assert len(backend.processes()) == 2
    fake.set(iter([GpuProcess(13, 0, 5, 50.0)]))  # any iterable, read once
    assert backend.processes() == [GpuProcess(13, 0, 5, 50.0)]
    fake.set([])
    assert backend.processes() == []
    backend.close()
    assert fake.closed


def test_fake_rejects_a_process_on_a_gpu_it_does_not_have() -> None:
    fake = FakeGpuBackend()
    fake.set([GpuProcess(1, 0, 0, 0.0)])
    with pytest.raises(ValueError, match=r"FakeGpuBackend\(devices=3\)"):
        fake.set([GpuProcess(1, 0, 0, 0.0), GpuProcess(2, 2, 0, 0.0)])
    assert fake.processes() == [GpuProcess(1, 0, 0, 0.0)]  # a rejected set changes nothing
    with pytest.raises(ValueError, match="0 or more"):
        FakeGpuBackend(devices=-1)
    assert FakeGpuBackend(devices=0).device_count() == 0


def test_fake_is_thread_safe() -> None:
    # Writers set whole generations; a reader must never see two generations mixed.
    fake = FakeGpuBackend(devices=4)
    stop = threading.Event()
    errors: list[str] = []

    def writer(base: int) -> None:
        gen = 0
        while not stop.is_set():
            gen += 1
            fake.set(GpuProcess(pid, pid % 4, base + gen, 1.0) for pid in range(50))

    def reader() -> None:
        while not stop.is_set():
            procs = fake.processes()
            if procs and (len(procs) != 50 or len({p.memory for p in procs}) != 1):
                errors.append(f"torn read: {len(procs)} procs")
                return

    threads = [threading.Thread(target=writer, args=(i * 1_000_000,)) for i in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


# --- open_backend -------------------------------------------------------------------------


def test_open_backend_prefer_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    backend = open_backend("fake")
    assert isinstance(backend, FakeGpuBackend)
    assert backend.device_count() == 1


def test_open_backend_env_selects_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "fake")
    assert isinstance(open_backend(), FakeGpuBackend)
    monkeypatch.setenv(ENV_VAR, " Fake ")
    assert isinstance(open_backend(), FakeGpuBackend)


def test_open_backend_prefer_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "fake")
    assert open_backend("none") is None
    monkeypatch.setattr(NvmlBackend, "open", classmethod(lambda cls: None))
    assert open_backend("nvml") is None


def test_open_backend_none_disables_gpu_watching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "none")
    assert open_backend() is None


def test_open_backend_defaults_to_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    calls: list[str] = []
    sentinel = FakeGpuBackend()

    def fake_open(cls: type[NvmlBackend]) -> Any:
        calls.append("nvml")
        return sentinel

    monkeypatch.setattr(NvmlBackend, "open", classmethod(fake_open))
    assert open_backend() is sentinel
    monkeypatch.setenv(ENV_VAR, "")  # empty means unset
    assert open_backend() is sentinel
    assert calls == ["nvml", "nvml"]


def test_open_backend_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"\$CORRAL_GPU_BACKEND='cuda'.*nvml, fake, none"):
        open_backend()
    with pytest.raises(ValueError, match="prefer='rocm'"):
        open_backend("rocm")


def test_env_var_reaches_a_subprocess() -> None:
    env = {**os.environ, ENV_VAR: "fake"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from corral.watch.gpu import open_backend; print(open_backend().name)",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "fake"


# --- NvmlBackend on this machine ----------------------------------------------------------


def test_nvml_open_on_this_machine_does_not_raise() -> None:
    backend = NvmlBackend.open()
    if backend is None:
        assert NvmlBackend.last_error  # says why: no pynvml, no driver or no GPU
        return
    try:  # a machine with a GPU and a driver: the real thing must work too
        assert backend.device_count() >= 1
        for p in backend.processes():
            assert 0 <= p.gpu < backend.device_count()
            assert 0.0 <= p.util <= 100.0
    finally:
        backend.close()


def test_nvml_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes the import fail
    assert NvmlBackend.open() is None
    assert "nvidia-ml-py" in (NvmlBackend.last_error or "")


# --- NvmlBackend's logic against a scripted pynvml ----------------------------------------

NOT_SUPPORTED = 3
NOT_FOUND = 6
LIB_NOT_FOUND = 12


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class NVMLError_NotSupported(NVMLError):  # named as in pynvml
    def __init__(self) -> None:
        super().__init__(NOT_SUPPORTED)


def proc(pid: int, mem: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=mem)


def sample(pid: int, sm: int) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, smUtil=sm, timeStamp=0)


def raises(err: Exception) -> Callable[..., Any]:
    def f(*args: object) -> Any:
        raise err

    return f


def fake_pynvml(devices: list[dict[str, Any]], **overrides: Any) -> ModuleType:
    """A pynvml stand-in: per device, what each query returns (or an exception to raise)."""
    mod = ModuleType("pynvml")
    calls: list[str] = []

    def answer(key: str, default: Any) -> Callable[..., Any]:
        def query(handle: int, *args: object) -> Any:
            calls.append(f"{key}({handle}{', ' if args else ''}{', '.join(map(str, args))})")
            got = devices[handle].get(key, default)
            if isinstance(got, Exception):
                raise got
            return got

        return query

    ns: dict[str, Any] = {
        "NVMLError": NVMLError,
        "NVMLError_NotSupported": NVMLError_NotSupported,
        "NVML_ERROR_NOT_FOUND": NOT_FOUND,
        "nvmlInit": lambda: calls.append("init"),
        "nvmlShutdown": lambda: calls.append("shutdown"),
        "nvmlDeviceGetCount": lambda: len(devices),
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetComputeRunningProcesses": answer("compute", []),
        "nvmlDeviceGetGraphicsRunningProcesses": answer("graphics", []),
        "nvmlDeviceGetProcessUtilization": answer("samples", NVMLError(NOT_FOUND)),
        "nvmlDeviceGetUtilizationRates": answer("rates", SimpleNamespace(gpu=0, memory=0)),
        "calls": calls,
    }
    ns.update(overrides)
    for k, v in ns.items():
        setattr(mod, k, v)
    return mod


def open_with(monkeypatch: pytest.MonkeyPatch, mod: ModuleType) -> NvmlBackend | None:
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return NvmlBackend.open()


def test_nvml_processes_merges_lists_and_attributes_sm_util(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = fake_pynvml(
        [
            {  # per-process samples: mean smUtil over the window; no sample = idle
                "compute": [proc(10, 100), proc(11, None)],
                "graphics": [proc(10, 80), proc(12, 5)],
                "samples": [sample(10, 30), sample(10, 50), sample(12, 250), sample(99, 7)],
            },
            {  # no per-process accounting: every process gets the device's utilisation
                "compute": [proc(20, 1 << 30)],
                "samples": NVMLError_NotSupported(),
                "rates": SimpleNamespace(gpu=77, memory=10),
            },
            {  # nothing can be listed: no processes, and no utilisation query either
                "compute": NVMLError_NotSupported(),
                "graphics": NVMLError(999),
            },
            {  # pynvml raises "SUCCESS" when the first call finds no sample at all
                "graphics": [proc(40, 1)],
                "samples": NVMLError(0),
            },
            {  # neither utilisation works: 0, not an exception
                "compute": [proc(50, 2)],
                "samples": NVMLError(NOT_SUPPORTED),
                "rates": NVMLError(NOT_SUPPORTED),
            },
        ]
    )
    backend = open_with(monkeypatch, mod)
    assert backend is not None
    as_protocol: GpuBackend = backend
    assert as_protocol.name == "nvml"
    assert backend.device_count() == 5
    before_us = int((time.time() - 1.0) * 1e6)
    got = backend.processes()
    after_us = int((time.time() - 1.0) * 1e6)
    assert got == [
        GpuProcess(10, 0, 100, 40.0),
        GpuProcess(11, 0, 0, 0.0),
        GpuProcess(12, 0, 5, 100.0),  # clamped
        GpuProcess(20, 1, 1 << 30, 77.0),
        GpuProcess(40, 3, 1, 0.0),
        GpuProcess(50, 4, 2, 0.0),
    ]
    calls: list[str] = mod.calls
    since = [c for c in calls if c.startswith("samples(0,")]
    assert len(since) == 1
    stamp = int(since[0].split(", ")[1].rstrip(")"))
    assert before_us <= stamp <= after_us  # microseconds, one second back
    assert not [c for c in calls if c.startswith(("samples(2", "rates(2"))]
    assert not [c for c in calls if c.startswith("rates(0")]  # per-pid worked: not needed
    backend.close()
    backend.close()
    assert calls.count("shutdown") == 1
    assert backend.processes() == []


def test_nvml_names_each_gpu_by_its_device_node(monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML counts boards in PCI order; the driver numbered their nodes in probe order.
    # Grants and the watcher speak device nodes, so a process on NVML's board 0 is on
    # /dev/nvidia1 here.
    mod = fake_pynvml(
        [{"compute": [proc(10, 1)]}, {"compute": [proc(20, 2)]}],
        nvmlDeviceGetMinorNumber=lambda handle: {0: 1, 1: 0}[handle],
    )
    backend = open_with(monkeypatch, mod)
    assert backend is not None
    assert [(p.pid, p.gpu) for p in backend.processes()] == [(10, 1), (20, 0)]
    backend.close()


def test_nvml_init_failure_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml([], nvmlInit=raises(NVMLError(LIB_NOT_FOUND)))
    assert open_with(monkeypatch, mod) is None
    assert "no NVIDIA driver" in (NvmlBackend.last_error or "")


def test_nvml_zero_devices_is_none_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml([])
    assert open_with(monkeypatch, mod) is None
    assert NvmlBackend.last_error == "NVML found no GPU"
    assert mod.calls == ["init", "shutdown"]


def test_nvml_count_failure_is_none_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml([{}], nvmlDeviceGetCount=raises(OSError("ctypes went wrong")))
    assert open_with(monkeypatch, mod) is None
    assert "ctypes went wrong" in (NvmlBackend.last_error or "")
    assert mod.calls[-1] == "shutdown"


def test_nvml_success_clears_last_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_with(monkeypatch, fake_pynvml([])) is None
    backend = open_with(monkeypatch, fake_pynvml([{}]))
    assert backend is not None
    assert NvmlBackend.last_error is None
    assert backend.processes() == []
    backend.close()


def test_module_exports() -> None:
    assert gpu.BACKENDS == ("nvml", "fake", "none")


# --- the real-GPU check's scripts, where there is no GPU ------------------------------------

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_cuda_loop_says_why_it_cannot_run_without_a_driver() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "cuda_spin.py"), "count"], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "libcuda.so.1" in json.loads(r.stdout)["error"]


def test_the_gpu_check_refuses_to_pass_without_a_gpu() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent / "src")},
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no GPU to check here" in r.stderr and "NVML" in r.stderr


def test_doctor_says_whether_gpu_use_can_be_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral import doctor
    from corral.sandbox import gpus

    dev = tmp_path / "dev"
    dev.mkdir()
    assert "no NVIDIA GPU" in doctor._gpus(dev).detail
    (dev / "nvidia0").write_text("")
    (dev / "nvidiactl").write_text("")  # a control node, not a GPU
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: nothing watches the GPU
    check = doctor._gpus(dev)
    assert not check.ok and "1 GPU(s): nvidia0" in check.detail
    assert "cannot be watched" in check.detail and "nvidia-ml-py" in check.detail
    mod = fake_pynvml([{}], nvmlDeviceGetUUID=lambda handle: b"GPU-0123")
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    gpus.machine_uuids.cache_clear()
    try:
        check = doctor._gpus(dev)
    finally:
        gpus.machine_uuids.cache_clear()
    assert check.ok and "named by UUID" in check.detail and "watched through NVML" in check.detail
