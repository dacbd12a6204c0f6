"""Seccomp: refuse the few system calls no namespace confines.

Namespaces and dropped capabilities leave some kernel objects global. The kernel
keyring is the one that matters here: ``add_key`` needs no capability and keyrings are
per *user* (per uid of a user namespace), so root in a zone without a user namespace of
its own adds keys to the host root's keyring. No mount, capability or namespace the zone
can set up stops that; a seccomp filter does.

The filter is classic BPF, built once when this module is imported (in the warm fork
server), so the child only pays for one ``prctl``. It checks ``seccomp_data.arch``
first: a syscall number means something else under another ABI (``int 0x80`` on
x86_64 runs the i386 table), so every ABI the machine can run has its own table, and a
call from an ABI the filter has no table for kills the process rather than pass
unchecked. A filter is inherited by every child and survives ``execve``: a test cannot
shed it, only add stricter ones.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Mapping, Sequence

PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
SECCOMP_MODE_FILTER = 2

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028

#: x32 syscalls run with AUDIT_ARCH_X86_64 and this bit set in the number; most share
#: x86_64's numbers ("common" in the syscall table), so the filter clears the bit before
#: comparing instead of letting ``0x40000000 | 248`` through.
X32_SYSCALL_BIT = 0x40000000

# Classic BPF opcodes (linux/filter.h).
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_AND_K = 0x04 | 0x50 | 0x00  # BPF_ALU | BPF_AND | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K

#: Offsets in struct seccomp_data {int nr; __u32 arch; __u64 ip; __u64 args[6];}.
_OFF_NR = 0
_OFF_ARCH = 4

#: Denied system calls, by name, with why; each returns EPERM instead of running.
DENIED: dict[str, str] = {
    # Adds a key to a keyring named by a special id (user, user-session): keyrings are
    # per uid and not namespaced, so a zone's root writes into the host root's keyring.
    "add_key": "a key in the host's keyring (keyrings belong to a uid, not a namespace)",
    # Looks a key up and may create it, or run /sbin/request-key as root on the host
    # (a usermode helper started by the host kernel, outside every namespace).
    "request_key": "finds host keys, and can make the host kernel run /sbin/request-key",
    # Reads, links, revokes, re-owns the keys reached above; joining a named session
    # keyring (KEYCTL_JOIN_SESSION_KEYRING) shares one with host processes.
    "keyctl": "reads and changes host keys, joins host session keyrings",
}

#: Syscall numbers per ABI (audit arch), for every name in DENIED.
SYSCALLS: dict[int, dict[str, int]] = {
    AUDIT_ARCH_X86_64: {"add_key": 248, "request_key": 249, "keyctl": 250},
    AUDIT_ARCH_I386: {"add_key": 286, "request_key": 287, "keyctl": 288},
    AUDIT_ARCH_AARCH64: {"add_key": 217, "request_key": 218, "keyctl": 219},
    AUDIT_ARCH_ARM: {"add_key": 309, "request_key": 310, "keyctl": 311},
}

#: The ABIs a process on this machine can call the kernel through (native first).
ABIS: dict[str, tuple[int, ...]] = {
    "x86_64": (AUDIT_ARCH_X86_64, AUDIT_ARCH_I386),
    "aarch64": (AUDIT_ARCH_AARCH64, AUDIT_ARCH_ARM),
}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


Insn = tuple[int, int, int, int]


def build(
    abis: Sequence[int], denied: Sequence[str] = tuple(DENIED), tables: Mapping[int, Mapping[str, int]] = SYSCALLS
) -> list[Insn]:
    """The filter program as (code, jt, jf, k) tuples: one block per ABI, then kill.

    Why a block per ABI: the arch check must come first and pick the table, and each
    block ends in ALLOW so a call never falls through into another ABI's numbers.
    """
    deny_at: list[int] = []  # indexes of jumps whose jt must reach the EPERM return
    prog: list[list[int]] = []
    for arch in abis:
        nrs = [tables[arch][name] for name in denied if name in tables[arch]]
        block: list[list[int]] = [[BPF_LD_W_ABS, 0, 0, _OFF_ARCH], [BPF_JEQ_K, 0, 0, arch], [BPF_LD_W_ABS, 0, 0, _OFF_NR]]
        if arch == AUDIT_ARCH_X86_64:
            block.append([BPF_AND_K, 0, 0, ~X32_SYSCALL_BIT & 0xFFFFFFFF])
        for nr in nrs:
            deny_at.append(len(prog) + len(block))
            block.append([BPF_JEQ_K, 0, 0, nr])
        block.append([BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW])
        block[1][2] = len(block) - 2  # wrong arch: skip to the next block
        prog.extend(block)
    prog.append([BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS])  # an ABI without a table
    deny = len(prog)
    prog.append([BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM])
    for i in deny_at:
        prog[i][1] = deny - (i + 1)
    for code, jt, jf, _ in prog:
        if jt > 255 or jf > 255:  # pragma: no cover - only with hundreds of denials
            raise ValueError(f"seccomp filter too long for a BPF jump ({code:#x})")
    return [(c, jt, jf, k) for c, jt, jf, k in prog]


def machine_abis(machine: str | None = None) -> tuple[int, ...]:
    """The ABIs of ``machine`` (default: this one); empty when the filter has no tables."""
    return ABIS.get(machine or platform.machine(), ())


_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def _compile(prog: Sequence[Insn]) -> tuple[_SockFprog, ctypes.Array[_SockFilter]]:
    insns = (_SockFilter * len(prog))(*(_SockFilter(*i) for i in prog))
    return _SockFprog(len(prog), ctypes.cast(insns, ctypes.POINTER(_SockFilter))), insns


_ABIS = machine_abis()
# Compiled here, in the fork server; the array is kept alive next to the program.
_PROG, _INSNS = _compile(build(_ABIS)) if _ABIS else (None, None)


def supported() -> bool:
    """Does the filter know this machine's syscall numbers?"""
    return _PROG is not None


def install() -> bool:
    """Install the keyring filter on this thread (and everything it starts from now on).

    Needs no_new_privs first (or CAP_SYS_ADMIN): otherwise a filter could make a setuid
    program misbehave. Returns False, changing nothing, on a machine without tables:
    the caller keeps whatever that machine's escape matrix records.
    """
    if _PROG is None:
        return False
    if _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(_PROG), 0, 0) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
    return True


def mode() -> int:
    """This thread's seccomp mode: 0 none, 1 strict, 2 filter."""
    return _prctl(PR_GET_SECCOMP, 0, 0, 0, 0)
