"""What the host looks like from inside the sandbox, for the audit hook (``audit.py``).

The hook decides, as a test crosses a boundary, whether the kernel will refuse it and
whether it reaches the host: which root and namespaces the host has (taken where this
module is first imported: the fork server, before any tier confined anything; a UML
guest's, inside UML), which capabilities the test holds, whether a device would open,
who serves a port or an abstract socket. Those are facts about the host and the kernel,
not the hook's policy, and they change when the kernel or the tiers do; the hook's tables
and handlers stay in ``audit.py``.

Everything here runs among the test's code: the ``os`` functions it calls are bound at
import (a test that replaces ``os.stat`` must neither change them nor see our calls), and
the hook reports replacing this module's names as ``tamper`` (``audit._build``).
"""

from __future__ import annotations

import os
import stat
import types
from collections.abc import Callable, Iterable

#: The os functions the audit hook calls while a test runs, taken before any test runs.
#: A test that replaces ``os.getcwd`` or ``os.stat`` (say, to assert that its code never
#: calls them) must not see the plugin's calls: in-process, pytest makes none.
_os = types.SimpleNamespace(**{n: getattr(os, n) for n in ('getcwd', 'stat', 'fstat', 'listdir', 'getpgrp', 'getpid', 'isatty', 'access', 'readlink', 'strerror', 'major', 'minor', 'fspath', 'fsdecode')})
_open_fd = os.open
_close = os.close


def _root_id() -> tuple[int, int]:
    st = _os.stat("/")
    return st.st_dev, st.st_ino


def _ns_ids(kinds: Iterable[str] = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup")) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in kinds:
        try:
            out[kind] = _os.stat(f"/proc/self/ns/{kind}").st_ino
        except OSError:
            pass
    return out


HOST_ROOT = _root_id()
HOST_NS = _ns_ids()


#: Written by a UML guest's init (``tiers/uml_init.py``): its presence says "in a guest".
#: Here, not in ``tiers/uml.py`` (which imports it): the audit hook needs it, and
#: importing the uml tier into every host server for one path would cost its start-up.
GUEST_INFO = "/run/isolate/guest.json"


def _in_guest() -> bool:
    try:
        _os.stat(GUEST_INFO)
    except OSError:
        return False
    return True


#: Imported in a UML guest: its "host" namespaces are the guest kernel's, and the real
#: host's processes are not in them.
IN_GUEST = _in_guest()


_PROBED_CHR = {(1, 1), (1, 2), (1, 4)}  # /dev/mem, /dev/kmem, /dev/port


def _probe_device(path: str) -> str | None:
    """Would opening this disk or memory device be refused? (None: allowed or not probed.)

    The audit event comes before the open, so the hook opens it itself first, read-only
    and non-blocking, and closes it at once: for block devices and /dev/mem that has no
    side effect, and the result is what the test's own open will get (same credentials,
    same device cgroup). Other character devices (watchdogs, ttys) are never probed."""
    try:
        st = _os.stat(path)
    except OSError:
        return None
    if not (stat.S_ISBLK(st.st_mode) or (stat.S_ISCHR(st.st_mode) and (_os.major(st.st_rdev), _os.minor(st.st_rdev)) in _PROBED_CHR)):
        return None
    try:
        fd = _open_fd(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        return exc.strerror or str(exc)
    _close(fd)
    return None


CAP_NET_RAW, CAP_SYS_MODULE, CAP_SYS_CHROOT, CAP_SYS_ADMIN, CAP_SYS_BOOT, CAP_MKNOD = 13, 16, 18, 21, 22, 27
#: The capability each technique needs; without it the kernel refuses (EPERM).
_CAP_FOR = {"mount": CAP_SYS_ADMIN, "setns": CAP_SYS_ADMIN, "chroot": CAP_SYS_CHROOT, "raw-socket": CAP_NET_RAW,
            "kernel-module": CAP_SYS_MODULE, "reboot": CAP_SYS_BOOT, "release-agent": CAP_SYS_ADMIN}
#: Techniques only the initial user namespace's root can carry out: root of a user
#: namespace (an unprivileged sandbox) is refused.
_INIT_USERNS_ONLY = frozenset({"core-pattern", "release-agent", "sysctl", "sysrq", "kernel-module", "reboot"})


def _ctty() -> int:
    """Device number of this process's controlling terminal (0: none)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[4])
    except (OSError, ValueError, IndexError):
        return -1


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding='utf-8') as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _has_cap(cap: int) -> bool:
    try:
        with open("/proc/self/status", encoding='utf-8') as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return True  # unknown: assume the worst


def _lacks(technique: str, shares: Callable[[str], bool | None]) -> str | None:
    """Why the kernel will refuse ``technique`` to this process, when it will (the hook
    sees most attempts before they happen; this settles the common cases)."""
    cap = _CAP_FOR.get(technique)
    if cap is not None and not _has_cap(cap):
        return f"no {_CAP_NAMES[cap]}: refused by the kernel"
    if technique in _INIT_USERNS_ONLY and shares("user") is False:
        return "root of a user namespace only: refused by the kernel"
    return None


_CAP_NAMES = {CAP_NET_RAW: "CAP_NET_RAW", CAP_SYS_MODULE: "CAP_SYS_MODULE", CAP_SYS_CHROOT: "CAP_SYS_CHROOT",
              CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_SYS_BOOT: "CAP_SYS_BOOT", CAP_MKNOD: "CAP_MKNOD"}


def _host_services() -> tuple[frozenset[int], frozenset[str]]:
    """Ports and abstract socket names the host served when the run started (the
    canaries put them in the environment): an attempt at them from a sandbox with its own
    network namespace is reported as blocked rather than passing unnoticed."""
    ports: set[int] = set()
    for p in os.environ.get("PYTEST_ISOLATE_HOST_PORTS", "").split(","):
        if p.isdigit():
            ports.add(int(p))
    names = {n for n in os.environ.get("PYTEST_ISOLATE_HOST_ABSTRACT", "").split("\n") if n}
    unix = os.environ.get("PYTEST_ISOLATE_CANARY_UNIX")
    if unix:
        names.add(unix)
    return frozenset(ports), frozenset(names)


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "localhost") or addr.startswith("::ffff:127.")


def _port_owner(proto: str, port: int, own: Callable[[int], bool]) -> str | None:
    """"own" when a process of the test listens on ``port``, "host" when another one
    does, None when nobody does (a connect then reaches nothing)."""
    inodes: set[str] = set()
    for name in (proto, proto + "6"):
        try:
            with open(f"/proc/net/{name}", encoding='utf-8') as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10:
                        continue
                    local, state = parts[1], parts[3]
                    if int(local.rsplit(":", 1)[1], 16) != port:
                        continue
                    if proto == "tcp" and state != "0A":
                        continue
                    inodes.add(parts[9])
        except (OSError, StopIteration, ValueError):
            continue
    if not inodes:
        return None
    return "own" if _inodes_owned(inodes, own) else "host"


def _unix_owner(name: str, own: Callable[[int], bool]) -> str | None:
    inodes: set[str] = set()
    try:
        with open("/proc/net/unix", encoding='utf-8') as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == "@" + name:
                    inodes.add(parts[6])
    except OSError:
        return None
    if not inodes:
        return None
    return "own" if _inodes_owned(inodes, own) else "host"


def _inodes_owned(inodes: set[str], own: Callable[[int], bool]) -> bool:
    wanted = {f"socket:[{i}]" for i in inodes}
    for name in _os.listdir("/proc"):
        if not name.isdigit() or not own(int(name)):
            continue
        try:
            fds = _os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if _os.readlink(f"/proc/{name}/fd/{fd}") in wanted:
                    return True
            except OSError:
                continue
    return False
