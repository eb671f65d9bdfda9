"""Contain: run actions in a kernel-enforced sandbox (bubblewrap today)."""

from corral.sandbox.backend import Backend, ExecResult, SandboxError, SandboxSpec, get_backend
from corral.sandbox.sandbox import Result, Sandbox

__all__ = [
    "Backend",
    "ExecResult",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxSpec",
    "get_backend",
]
