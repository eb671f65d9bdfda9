"""The seccomp filter every sandbox runs under, compiled with libseccomp (pyseccomp).

Denied calls fail with EPERM, so tools report an ordinary "Operation not permitted"
instead of dying. The list is data below, not code paths.

Known bypasses and how they are closed:
- 32-bit syscalls (``int 0x80``, the i386 ``socketcall`` multiplexer) and x32: the filter
  holds only the native architecture, and libseccomp's bad-architecture action kills the
  process, so a call through another ABI never reaches the kernel.
- ``clone3`` passes its flags in a struct the filter cannot read: it fails with ENOSYS,
  which makes glibc fall back to ``clone``, whose flags the filter does check.
- ``unshare``/``setns`` are refused outright, and bubblewrap's ``--disable-userns`` also
  caps user namespaces at the sandbox's own, for a kernel where the filter were missing.
- ``ioctl(TIOCSTI)``/``TIOCLINUX`` (pushing keystrokes into a terminal) are refused; the
  sandbox also runs in a new session with no controlling terminal.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import socket

import pyseccomp as sc

# Refused whatever their arguments.
DENIED = (
    # debugging other processes, reading or writing their memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    # mounts and namespaces
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "chroot",
    # kernel surfaces with a long record of privilege escalations
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "add_key",
    "request_key",
    "keyctl",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "quotactl",
    "quotactl_fd",
    # the machine itself
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "nfsservctl",
    "sysfs",
    "uselib",
    "ustat",
    "_sysctl",
)

_NS_FLAGS = (
    0x10000000,  # CLONE_NEWUSER
    0x00020000,  # CLONE_NEWNS
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x08000000,  # CLONE_NEWIPC
    0x04000000,  # CLONE_NEWUTS
    0x02000000,  # CLONE_NEWCGROUP
    0x00000080,  # CLONE_NEWTIME
)
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
_ADDR_NO_RANDOMIZE, _READ_IMPLIES_EXEC = 0x0040000, 0x0400000
_SOCK_TYPE_MASK = 0xF


def _deny(f: sc.SyscallFilter, call: str, *args: sc.Arg, code: int = errno.EPERM) -> None:
    # A call this architecture does not have (umount, _sysctl on arm64) cannot be made
    # here either: nothing to refuse.
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        f.add_rule(sc.ERRNO(code), call, *args)


@functools.cache
def filter_bpf() -> bytes:
    """The compiled filter as a BPF program, ready for ``bwrap --seccomp FD``."""
    f = sc.SyscallFilter(sc.ALLOW)
    for call in DENIED:
        _deny(f, call)
    for flag in _NS_FLAGS:
        _deny(f, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    _deny(f, "clone3", code=errno.ENOSYS)
    _deny(f, "socket", sc.Arg(0, sc.EQ, socket.AF_PACKET))
    # Raw IP sockets forge packets; raw netlink sockets (what `ip` and if_nameindex use)
    # stay allowed: the network namespace has nothing but loopback to show.
    for family in (socket.AF_INET, socket.AF_INET6):
        _deny(
            f,
            "socket",
            sc.Arg(0, sc.EQ, family),
            sc.Arg(1, sc.MASKED_EQ, _SOCK_TYPE_MASK, socket.SOCK_RAW),
        )
    _deny(f, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    _deny(f, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCLINUX))
    _deny(f, "personality", sc.Arg(0, sc.MASKED_EQ, _ADDR_NO_RANDOMIZE, _ADDR_NO_RANDOMIZE))
    _deny(f, "personality", sc.Arg(0, sc.MASKED_EQ, _READ_IMPLIES_EXEC, _READ_IMPLIES_EXEC))
    buf = io.BytesIO()
    with _temp_file() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        buf.write(tmp.read())
    return buf.getvalue()


def _temp_file() -> io.BufferedRandom:
    # export_bpf writes through a real file descriptor.
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    return os.fdopen(fd, "w+b")


def filter_fd() -> int:
    """A fresh, readable descriptor holding the filter (bubblewrap reads it to the end)."""
    fd = os.memfd_create("corral-seccomp", 0)
    os.write(fd, filter_bpf())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
