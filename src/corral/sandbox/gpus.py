"""Which GPU is which: the device number N of ``/dev/nvidiaN`` and the GPU's UUID.

corral names a GPU by its device number everywhere (grants, the host's allocator, the
watcher's events), because that is what a sandbox is given: the one device node. CUDA
names GPUs differently. Inside a sandbox the driver enumerates only the devices it can
open, counting from 0 in its own order, so ``CUDA_VISIBLE_DEVICES=3`` for a sandbox bound
to ``/dev/nvidia3`` alone names a device CUDA does not have. A UUID names the same GPU in
every numbering, so a grant is written in UUIDs when NVML can tell them; without NVML
(no driver: a test's fake ``/dev``) it is written as the sandbox's own 0..k-1.

NVML's own index (nvidia-smi's) is a third numbering: it follows PCI order, while device
numbers follow the order the driver probed the boards. ``device_numbers`` maps one to
the other for the watcher.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Mapping, Sequence

from corral.watch.gpu import device_numbers


def cuda_visible_devices(granted: Sequence[int], uuids: Mapping[int, str] | None = None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a sandbox bound to exactly the ``granted`` device
    numbers: their UUIDs if every one is known, else the sandbox's own 0..k-1."""
    known = machine_uuids() if uuids is None else uuids
    if granted and all(n in known for n in granted):
        return ",".join(known[n] for n in granted)
    return ",".join(str(i) for i in range(len(granted)))


@functools.cache
def machine_uuids() -> Mapping[int, str]:
    """Device number -> UUID of every GPU NVML can see; empty where there is no NVML.

    Asked once per process: the boards of a machine do not change while it runs."""
    return {number: uuid for number, uuid in _nvml_devices() if uuid}


def _nvml_devices() -> list[tuple[int, str]]:
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:  # no module, no driver, no GPU: nothing to name
        return []
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        out = []
        for number, handle in zip(device_numbers(nvml, handles), handles, strict=True):
            uuid = nvml.nvmlDeviceGetUUID(handle)
            out.append((number, uuid.decode() if isinstance(uuid, bytes) else str(uuid)))
        return out
    except Exception:
        return []
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
