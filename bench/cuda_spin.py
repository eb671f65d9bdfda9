"""A CUDA busy loop that needs nothing but the NVIDIA driver: what a GPU miner does.

    python3 cuda_spin.py count            # what CUDA sees: {"count": N, "names": [...]}
    python3 cuda_spin.py spin SECONDS     # keep GPU 0 busy that long, then exit

It talks to the driver (``libcuda.so.1``) through ctypes and JIT-compiles a small PTX
kernel, so it runs in a sandbox on any machine with a driver: no toolkit, no PyTorch.
It depends on nothing from corral, because it runs inside the sandbox. The first line it
prints is JSON; errors say which driver call failed and its CUDA error name.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

# Each thread runs a chain of dependent multiply-adds, then one store, so nothing can be
# optimised away; ``iters`` sets a launch's length (about 20 ms per 10M on an H200).
PTX = rb"""
.version 7.0
.target sm_75
.address_size 64

.visible .entry spin(.param .u64 out, .param .u32 iters)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .f32 %f<2>;
    .reg .b64 %rd<3>;

    ld.param.u64 %rd1, [out];
    ld.param.u32 %r1, [iters];
    mov.u32 %r2, 0;
    mov.f32 %f1, 0f3F800000;
$L_loop:
    fma.rn.f32 %f1, %f1, 0f3F7FFFFF, 0f3F800000;
    add.u32 %r2, %r2, 1;
    setp.lt.u32 %p1, %r2, %r1;
    @%p1 bra $L_loop;
    cvta.to.global.u64 %rd2, %rd1;
    st.global.f32 [%rd2], %f1;
    ret;
}
"""


class CudaError(Exception):
    pass


def _driver() -> ctypes.CDLL:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaError(f"no NVIDIA driver library: {e}") from None
    cuda.cuLaunchKernel.argtypes = [
        ctypes.c_void_p,
        *([ctypes.c_uint] * 7),
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_void_p),
    ]
    return cuda


def _check(cuda: ctypes.CDLL, rc: int, call: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(rc, ctypes.byref(name))
        raise CudaError(f"{call} failed: {(name.value or b'?').decode()} ({rc})")


def count() -> dict[str, object]:
    cuda = _driver()
    _check(cuda, cuda.cuInit(0), "cuInit")
    n = ctypes.c_int()
    _check(cuda, cuda.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
    names = []
    for i in range(n.value):
        dev = ctypes.c_int()
        _check(cuda, cuda.cuDeviceGet(ctypes.byref(dev), i), "cuDeviceGet")
        buf = ctypes.create_string_buffer(256)
        _check(cuda, cuda.cuDeviceGetName(buf, 256, dev), "cuDeviceGetName")
        names.append(buf.value.decode())
    return {"count": n.value, "names": names}


def spin(seconds: float) -> dict[str, object]:
    cuda = _driver()
    _check(cuda, cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cuda, cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    _check(cuda, cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(cuda, cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    module = ctypes.c_void_p()
    _check(cuda, cuda.cuModuleLoadData(ctypes.byref(module), PTX + b"\0"), "cuModuleLoadData")
    fn = ctypes.c_void_p()
    _check(cuda, cuda.cuModuleGetFunction(ctypes.byref(fn), module, b"spin"), "cuModuleGetFunction")
    out = ctypes.c_uint64()
    _check(cuda, cuda.cuMemAlloc_v2(ctypes.byref(out), 4), "cuMemAlloc")
    iters = ctypes.c_uint32(10_000_000)
    params = (ctypes.c_void_p * 2)(
        ctypes.cast(ctypes.byref(out), ctypes.c_void_p),
        ctypes.cast(ctypes.byref(iters), ctypes.c_void_p),
    )
    print(json.dumps({"spinning": os.getpid(), "t": time.time()}), flush=True)
    launches = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        # 264 blocks of 128 threads: two per SM of an H200, every SM busy.
        _check(cuda, cuda.cuLaunchKernel(fn, 264, 1, 1, 128, 1, 1, 0, None, params, None), "launch")
        _check(cuda, cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        launches += 1
    return {"launches": launches}


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["count"]:
            print(json.dumps(count()), flush=True)
        elif argv[:1] == ["spin"] and len(argv) == 2:
            print(json.dumps(spin(float(argv[1]))), flush=True)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except CudaError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
