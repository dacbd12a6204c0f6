"""Linux namespaces: unshare, setns, hostname, user-namespace id maps, and probes.

Python 3.11 has no ``os.unshare``/``os.setns`` (3.12 added them), so these go through
ctypes on libc. Every call raises ``OSError`` with the real errno, so a tier can tell
"not permitted here" (EPERM/EINVAL/ENOSPC) from a bug.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: Namespaces every jail/zone gets (user is added when not root).
JAIL_FLAGS = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def _check(ret: int, what: str) -> None:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces (``CLONE_NEWPID`` affects children)."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace ``fd`` refers to (an open ``/proc/<pid>/ns/*`` or nsfs file)."""
    _check(_libc.setns(fd, nstype), f"setns({fd}, {nstype:#x})")


def in_netns(fd: int, fn: Callable[[], T]) -> T:
    """``fn()`` run inside the network namespace ``fd`` by this thread, which then goes
    back to its own: for a single-threaded server that keeps namespaces for its tests."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, CLONE_NEWNET)
        try:
            return fn()
        finally:
            setns(home, CLONE_NEWNET)
    finally:
        os.close(home)


def new_netns(setup: Callable[[], T]) -> tuple[int, T]:
    """A new network namespace, held by the returned fd (``O_CLOEXEC``), and what
    ``setup()`` returned, run inside it; this thread alone goes in and comes back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare(CLONE_NEWNET)  # this (single) thread only
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return fd, setup()
            except BaseException:
                os.close(fd)
                raise
        finally:
            setns(home, CLONE_NEWNET)
    finally:
        os.close(home)


def sethostname(name: str) -> None:
    """Set the UTS hostname; only sensible inside a UTS namespace of our own."""
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), f"sethostname({name!r})")


def write_id_maps(
    uid: int, gid: int, inside_uid: int = 0, inside_gid: int = 0, pid: int | str = "self"
) -> None:
    """Map ``inside_uid``/``inside_gid`` of a fresh user namespace to ``uid``/``gid`` outside.

    An unprivileged process may only write a single mapping of its own ids, and only
    after denying ``setgroups`` (otherwise it could drop a supplementary group that a
    file's permissions deny it, CVE-2014-8989), hence the fixed order.
    """
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/setgroups", "w", encoding="utf-8") as f:
            f.write("deny")
    except FileNotFoundError:  # kernels before 3.19: no setgroups file, nothing to deny
        pass
    with open(f"{base}/uid_map", "w", encoding="utf-8") as f:
        f.write(f"{inside_uid} {uid} 1\n")
    with open(f"{base}/gid_map", "w", encoding="utf-8") as f:
        f.write(f"{inside_gid} {gid} 1\n")


def enter_own_ids(uid: int, gid: int) -> None:
    """Into a user namespace of the caller's own in which it is ``uid``/``gid`` (its ids on
    the host) again: mapped to the ids it has where it is now (uid 0 of the sandbox's
    user namespace). The caller keeps capabilities only in that new namespace, which
    owns nothing; it drops them itself."""
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    write_id_maps(outer_uid, outer_gid, inside_uid=uid, inside_gid=gid)


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def _userns_sysctl_reason() -> str | None:
    """The sysctl that forbids user namespaces outright, if one does."""
    if _read_int("/proc/sys/user/max_user_namespaces") == 0:
        return "user namespaces are disabled: sysctl user.max_user_namespaces=0 (set it to e.g. 15000)"
    if os.geteuid() != 0 and _read_int("/proc/sys/kernel/unprivileged_userns_clone") == 0:
        return (
            "unprivileged user namespaces are disabled: sysctl kernel.unprivileged_userns_clone=0 "
            "(set it to 1)"
        )
    return None


_probe_cache: dict[int, str | None] = {}


def userns_available() -> str | None:
    """None when this process can create a user namespace it can use, else why not.

    "Can create" is not enough: Ubuntu's AppArmor restriction lets ``unshare`` succeed but
    leaves the namespace without capabilities, so the probe also writes the id maps and
    mounts a tmpfs in a throwaway child, as a jail would. Cached per euid.
    """
    euid = os.geteuid()
    if euid in _probe_cache:
        return _probe_cache[euid]
    reason = _userns_sysctl_reason()
    if reason is None:
        reason = _probe_userns_child()
    _probe_cache[euid] = reason
    return reason


def _probe_userns_child() -> str | None:
    uid, gid = os.geteuid(), os.getegid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        step = "unshare(CLONE_NEWUSER|CLONE_NEWNS)"
        try:
            os.close(r)
            unshare(CLONE_NEWUSER | CLONE_NEWNS)
            step = "writing uid_map/gid_map"
            write_id_maps(uid, gid)
            step = "mounting a tmpfs"
            from pytest_isolate.facets import mounts

            mounts.make_private("/")
            mounts.mount("tmpfs", "/tmp", "tmpfs", 0, "size=1m")
            os.write(w, b"ok")
        except OSError as exc:
            os.write(w, f"{step} failed: {exc.strerror or exc}".encode()[:500])
        except BaseException as exc:  # noqa: BLE001
            os.write(w, f"{step} failed: {exc!r}".encode()[:500])
        os._exit(0)
    os.close(w)
    try:
        msg = os.read(r, 1024).decode(errors="replace")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if msg == "ok":
        return None
    hint = ""
    if _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == 1:
        hint = (
            "; AppArmor restricts unprivileged user namespaces: sysctl "
            "kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile allowing "
            "userns for this Python)"
        )
    elif "unshare" in msg:
        hint = (
            "; check sysctls user.max_user_namespaces and kernel.unprivileged_userns_clone, "
            "or a container seccomp profile that blocks unshare"
        )
    return f"user namespace not usable: {msg or 'probe child died'}{hint}"


#: clone(2) numbers; arguments after flags are all 0 here, so their per-arch order
#: does not matter.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "ppc64le": 120, "s390x": 120}
_SIGCHLD = 17
# PyDLL: the call keeps the GIL, as os.fork() does, so the child starts holding it.
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_pyapi = ctypes.pythonapi


def clone_fork(flags: int) -> int:
    """fork() straight into new namespaces: ``clone(flags | SIGCHLD)`` with fork semantics.

    Why: an unprivileged process cannot ``unshare(CLONE_NEWPID)`` and then fork (it has
    no CAP_SYS_ADMIN in its own user namespace), so without this a jail costs one more
    fork (~1.5 ms in a process that imported pytest). ``clone`` with
    ``CLONE_NEWUSER|CLONE_NEWPID`` creates both at once and the child is the PID
    namespace's init. CPython's own fork bookkeeping (import lock, at-fork hooks, thread
    state) is run around the raw syscall exactly as ``os.fork`` does.

    Caveat, why the child must stay simple: glibc's cached thread id is not refreshed in
    the child (glibc's fork passes CLONE_CHILD_SETTID for that), so ``raise()``/``abort()``
    misbehave in it. Processes the child creates with ``os.fork`` are fine again. Only
    for single-threaded callers, like ``os.fork``.
    """
    import platform

    nr = _SYS_CLONE.get(platform.machine())
    if nr is None:
        raise OSError(38, "clone_fork: unknown clone syscall number on this architecture")
    _pyapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(ctypes.c_long(nr), ctypes.c_ulong(flags | _SIGCHLD), 0, 0, 0, 0)
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _pyapi.PyOS_AfterFork_Parent()
    if pid == -1:
        raise OSError(err, f"clone({flags:#x}): {os.strerror(err)}")
    return pid


def in_initial_userns() -> bool:
    """Is this process in the host's own user namespace (the identity uid map)? Its root
    can then mount, make devices and join /run/netns; root of a user namespace cannot."""
    try:
        with open("/proc/self/uid_map", encoding="utf-8") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def ns_id(kind: str, pid: int | str = "self") -> str:
    """The namespace identity (``net:[4026531840]``) of ``pid``, to compare two processes."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")
