"""Which processes use which GPU, and how hard, behind one small interface.

``NvmlBackend`` asks NVIDIA's management library (the ``pynvml`` module of
nvidia-ml-py); ``FakeGpuBackend`` stands in where there is no GPU, so the watcher's GPU
rules are tested in CI by scripting what it reports. ``open_backend`` picks one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Final, Protocol

# Set to "fake" to make a process (a test's subprocess, say) use FakeGpuBackend, "nvml"
# to require NVML, or "none" to watch no GPU at all.
ENV_VAR: Final = "CORRAL_GPU_BACKEND"
BACKENDS: Final = ("nvml", "fake", "none")

# Per-process SM samples are averaged over this window: long enough to hold a few of
# NVML's samples, short enough to follow a burst.
_UTIL_WINDOW_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """One process on one GPU."""

    pid: int  # pid as NVML sees it: the host's, unless corral runs in another pid namespace
    gpu: int  # device number: the N of /dev/nvidiaN (what a grant names)
    memory: int  # bytes used by this process on that GPU (0 if unknown)
    util: float  # percent 0-100 of that GPU's SMs attributed to this process


class GpuBackend(Protocol):
    """A source of GPU process telemetry."""

    name: str

    def device_count(self) -> int: ...

    def processes(self) -> list[GpuProcess]: ...  # every process using any GPU now

    def close(self) -> None: ...


class NvmlBackend:
    """GPU telemetry from NVML; built only where the driver and a GPU exist."""

    name = "nvml"
    # Why the last open() returned None (None after a successful open).
    last_error: ClassVar[str | None] = None

    def __init__(self, nvml: ModuleType, handles: list[Any]) -> None:
        """Wrap an initialised NVML and its device handles; use ``open()``."""
        self._nvml = nvml
        self._handles = handles
        # NVML counts boards in PCI order; grants name device nodes (sandbox/gpus.py).
        self._numbers = device_numbers(nvml, handles)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls) -> NvmlBackend | None:
        """NVML with at least one device, or None (never an exception), with ``last_error``."""
        got = _open_nvml()
        if isinstance(got, str):
            cls.last_error = got
            return None
        cls.last_error = None
        return cls(*got)

    def device_count(self) -> int:
        return len(self._handles)

    def processes(self) -> list[GpuProcess]:
        """Every process on every device now; a device that fails a query is skipped."""
        with self._lock:
            if self._closed:
                return []
            out: list[GpuProcess] = []
            for number, handle in zip(self._numbers, self._handles, strict=True):
                out.extend(self._device_processes(number, handle))
            return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _shutdown(self._nvml)

    def _device_processes(self, index: int, handle: Any) -> list[GpuProcess]:
        nvml = self._nvml
        # A process can be in both lists (CUDA and graphics); memory is its total either
        # way, so the larger figure is kept rather than the sum.
        memory: dict[int, int] = {}
        for query in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            try:
                found = query(handle)
            except nvml.NVMLError:  # NotSupported on some boards, NoPermission in VMs
                continue
            for p in found:
                used = p.usedGpuMemory  # None where the driver cannot tell (WDDM, MIG)
                memory[int(p.pid)] = max(memory.get(int(p.pid), 0), int(used or 0))
        if not memory:
            return []
        per_pid = self._sm_util(handle)
        device = self._device_util(handle) if per_pid is None else 0.0
        return [
            GpuProcess(pid, index, mem, per_pid.get(pid, 0.0) if per_pid is not None else device)
            for pid, mem in sorted(memory.items())
        ]

    def _sm_util(self, handle: Any) -> dict[int, float] | None:
        """Mean SM percent per pid over the last window; None if the device cannot say."""
        nvml = self._nvml
        since_us = int((time.time() - _UTIL_WINDOW_S) * 1_000_000)
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, since_us)
        except nvml.NVMLError as e:
            # NotFound (and pynvml's raise of SUCCESS when the first call finds nothing)
            # mean "supported, but no process ran in the window": idle, not unknown.
            if getattr(e, "value", None) in (0, getattr(nvml, "NVML_ERROR_NOT_FOUND", 6)):
                return {}
            return None
        sums: dict[int, list[float]] = {}
        for s in samples:
            acc = sums.setdefault(int(s.pid), [0.0, 0.0])
            acc[0] += float(s.smUtil)
            acc[1] += 1.0
        return {pid: _percent(total / count) for pid, (total, count) in sums.items()}

    def _device_util(self, handle: Any) -> float:
        nvml = self._nvml
        try:
            return _percent(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        except nvml.NVMLError:
            return 0.0


def _percent(x: float) -> float:
    return min(100.0, max(0.0, x))


def device_numbers(nvml: Any, handles: Sequence[Any]) -> list[int]:
    """The device number of each NVML handle, in NVML's order; NVML's index where the
    driver cannot say (it then numbers its nodes the same way on every machine seen)."""
    out: list[int] = []
    for index, handle in enumerate(handles):
        try:
            out.append(int(nvml.nvmlDeviceGetMinorNumber(handle)))
        except Exception:  # NotSupported on some boards; a broken install raises anything
            out.append(index)
    return out


def _open_nvml() -> tuple[ModuleType, list[Any]] | str:
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return "nvidia-ml-py is not installed (pip install 'nvidia-ml-py>=12')"
    # pynvml raises its own NVMLError subclasses, but a broken install can raise anything
    # (OSError from ctypes, AttributeError from an old module); none may reach the watcher.
    try:
        nvml.nvmlInit()
    except Exception as e:
        return f"NVML could not start ({e}): no NVIDIA driver or GPU on this machine"
    try:
        count = int(nvml.nvmlDeviceGetCount())
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    except Exception as e:
        _shutdown(nvml)
        return f"NVML could not list the GPUs ({e}): check the driver with nvidia-smi"
    if not handles:
        _shutdown(nvml)
        return "NVML found no GPU"
    return nvml, handles


def _shutdown(nvml: ModuleType) -> None:
    # Nothing useful can be done about a failed shutdown, and it must not reach the watcher.
    with contextlib.suppress(Exception):
        nvml.nvmlShutdown()


class FakeGpuBackend:
    """Stands in for NVML where no GPU exists (CI). Tests script what it reports."""

    name = "fake"

    def __init__(self, devices: int = 1) -> None:
        if devices < 0:
            raise ValueError(f"a fake GPU backend needs 0 or more devices, not {devices}")
        self._devices = devices
        self._lock = threading.Lock()
        self._procs: tuple[GpuProcess, ...] = ()
        self.closed = False

    def set(self, processes: Iterable[GpuProcess]) -> None:
        """What ``processes()`` returns from now on (safe from any thread)."""
        procs = tuple(processes)
        for p in procs:
            if not 0 <= p.gpu < self._devices:
                raise ValueError(
                    f"GpuProcess(pid={p.pid}) is on GPU {p.gpu}, but this fake has "
                    f"{self._devices} device(s): pass FakeGpuBackend(devices={p.gpu + 1})"
                )
        with self._lock:
            self._procs = procs

    def device_count(self) -> int:
        return self._devices

    def processes(self) -> list[GpuProcess]:
        with self._lock:
            return list(self._procs)

    def close(self) -> None:
        self.closed = True


def open_backend(prefer: str | None = None) -> GpuBackend | None:
    """The GPU backend to watch with, or None when there is no GPU to watch.

    ``prefer`` ("nvml", "fake" or "none") wins; else ``$CORRAL_GPU_BACKEND``; else NVML
    if it works. A name outside those is a configuration mistake and raises ValueError.
    """
    source = "prefer"
    choice = prefer
    if choice is None:
        choice = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if choice is None:
        return NvmlBackend.open()
    choice = choice.strip().lower()
    if choice == "fake":
        return FakeGpuBackend()
    if choice == "nvml":
        return NvmlBackend.open()
    if choice == "none":
        return None
    raise ValueError(f"{source}={choice!r} is not a GPU backend: use one of {', '.join(BACKENDS)}")
