"""Capabilities, no_new_privs, sessions and inherited descriptors.

Dropping a capability from the *bounding* set is what makes it stick: a capability
only removed from the effective/permitted sets comes back when root execs a program
(or a setuid one is run). So tiers drop from the bounding set first, then clear the
current sets with capset, then clear the ambient set, then set no_new_privs.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_NET_BIND_SERVICE = 10
CAP_NET_BROADCAST = 11
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_IPC_LOCK = 14
CAP_IPC_OWNER = 15
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_CHROOT = 18
CAP_SYS_PTRACE = 19
CAP_SYS_PACCT = 20
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
CAP_SYS_NICE = 23
CAP_SYS_RESOURCE = 24
CAP_SYS_TIME = 25
CAP_SYS_TTY_CONFIG = 26
CAP_MKNOD = 27
CAP_LEASE = 28
CAP_AUDIT_WRITE = 29
CAP_AUDIT_CONTROL = 30
CAP_SETFCAP = 31
CAP_MAC_OVERRIDE = 32
CAP_MAC_ADMIN = 33
CAP_SYSLOG = 34
CAP_WAKE_ALARM = 35
CAP_BLOCK_SUSPEND = 36
CAP_AUDIT_READ = 37
CAP_PERFMON = 38
CAP_BPF = 39
CAP_CHECKPOINT_RESTORE = 40

NAMES = {v: k for k, v in globals().items() if k.startswith("CAP_") and isinstance(v, int)}

#: What a jail drops. It has its own network namespace, so the test must not reconfigure
#: it (e.g. route out of a network="ip" veth, or firewall); and it may not open files
#: by handle: with CAP_DAC_READ_SEARCH, open_by_handle_at() reaches the host filesystem through any bind
#: mount (basetemp), the "shocker" escape.
JAIL_DROP: tuple[int, ...] = (CAP_NET_ADMIN, CAP_DAC_READ_SEARCH)

#: What a zone drops. Each one is a known way out of, or around, a namespace sandbox:
#: SYS_ADMIN (mount, unshare, setns, remount the masks), NET_RAW (raw sockets), NET_ADMIN,
#: SYS_PTRACE, MKNOD (device nodes -> host disks), SYS_MODULE, SYS_RAWIO (/dev/mem, ioperm),
#: SYS_BOOT (reboot), SYS_TIME (host clock), SYS_RESOURCE (raise the hard rlimits that
#: enforce budgets), SYS_NICE (real-time priority starves the host; CFS quotas do not
#: cover RT), DAC_READ_SEARCH (open_by_handle_at opens any file of a filesystem we can
#: see, e.g. via the basetemp bind - the "shocker" escape), LINUX_IMMUTABLE, SYS_PACCT,
#: SYS_TTY_CONFIG, SETFCAP (plant file capabilities in the kept basetemp), AUDIT_*,
#: MAC_*, SYSLOG, WAKE_ALARM, BLOCK_SUSPEND, PERFMON, BPF, CHECKPOINT_RESTORE.
#: Kept on purpose: SYS_CHROOT (after pivot_root + detaching the old root there is no
#: outer root to climb back to, and tests of chrooting tools need it), CHOWN/FOWNER/
#: DAC_OVERRIDE/SETUID/SETGID/KILL (ordinary root inside its own files and PID ns),
#: NET_BIND_SERVICE, IPC_LOCK/IPC_OWNER (own IPC ns; memory is capped by the cgroup).
ZONE_DROP: tuple[int, ...] = (
    CAP_DAC_READ_SEARCH,
    CAP_LINUX_IMMUTABLE,
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    CAP_SYS_MODULE,
    CAP_SYS_RAWIO,
    CAP_SYS_PTRACE,
    CAP_SYS_PACCT,
    CAP_SYS_ADMIN,
    CAP_SYS_BOOT,
    CAP_SYS_NICE,
    CAP_SYS_RESOURCE,
    CAP_SYS_TIME,
    CAP_SYS_TTY_CONFIG,
    CAP_MKNOD,
    CAP_AUDIT_WRITE,
    CAP_AUDIT_CONTROL,
    CAP_SETFCAP,
    CAP_MAC_OVERRIDE,
    CAP_MAC_ADMIN,
    CAP_SYSLOG,
    CAP_WAKE_ALARM,
    CAP_BLOCK_SUSPEND,
    CAP_AUDIT_READ,
    CAP_PERFMON,
    CAP_BPF,
    CAP_CHECKPOINT_RESTORE,
)

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _prctl(op: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0) -> int:
    ret = _libc.prctl(op, a, b, c, d)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({op}): {os.strerror(err)}")
    return ret


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="utf-8") as f:
            return int(f.read())
    except OSError:
        return CAP_CHECKPOINT_RESTORE


def in_bounding_set(cap: int) -> bool:
    return _prctl(PR_CAPBSET_READ, cap) == 1


def get_caps() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this process as 64-bit masks."""
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(hdr), data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    eff = data[0].effective | (data[1].effective << 32)
    perm = data[0].permitted | (data[1].permitted << 32)
    inh = data[0].inheritable | (data[1].inheritable << 32)
    return eff, perm, inh


def set_caps(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(hdr), data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def drop(caps: Iterable[int]) -> None:
    """Remove ``caps`` for good: bounding set, then effective/permitted/inheritable, ambient.

    Capabilities this kernel does not know are skipped, so one list serves old and new
    kernels. Needs CAP_SETPCAP for the bounding set (kept, it only allows dropping more).
    """
    top = last_cap()
    wanted = [c for c in caps if c <= top]
    for c in wanted:
        if in_bounding_set(c):
            _prctl(PR_CAPBSET_DROP, c)
    mask = 0
    for c in wanted:
        mask |= 1 << c
    eff, perm, inh = get_caps()
    if (eff | perm | inh) & mask:
        set_caps(eff & ~mask, perm & ~mask, inh & ~mask)
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:  # kernels before 4.3 have no ambient set
        pass


def has_cap(cap: int) -> bool:
    """True when ``cap`` is in this process's effective set."""
    return bool(get_caps()[0] & (1 << cap))


def no_new_privs() -> None:
    """execve can no longer grant privileges (setuid bits, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def get_no_new_privs() -> bool:
    return _prctl(PR_GET_NO_NEW_PRIVS) == 1


def new_session() -> None:
    """setsid(): no controlling terminal, so TIOCSTI cannot type into the user's shell.

    A process that already leads a process group cannot setsid (EPERM); then it is
    already detached enough for our purpose only if it has no controlling tty, which we
    cannot fix from here, so the error propagates.
    """
    try:
        os.setsid()
    except PermissionError:
        if os.getsid(0) != os.getpid():
            raise


def close_fds(keep: Iterable[int] = (), keep_std: bool = True) -> None:
    """Close every descriptor except ``keep`` (and 0-2 unless ``keep_std`` is False).

    Why: descriptors the fork server holds (pipes to the controller, host directories,
    namespace files) are handles to the outside a test could use.
    """
    keep_set = set(keep)
    if keep_std:
        keep_set |= {0, 1, 2}
    lo = 0
    for fd in sorted(keep_set):
        if fd > lo:
            os.closerange(lo, fd)
        lo = max(lo, fd + 1)
    os.closerange(lo, 1 << 20)
