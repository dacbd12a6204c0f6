"""What a call the audit hook sees means, and which line of the test made it.

The tables (writable paths, C tools, libc names and syscall numbers by technique) and
the small pure helpers that name a call's arguments and its caller change with what
the detector knows about the kernel and about Python; the hook in ``audit`` changes
with how it is installed and reports. Like ``audit`` and ``hostview`` this module is
imported in the fork server before any fork, and the hook guards its names: a test that
replaces one (``calls._where``) is reported as ``tamper``.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
import sysconfig
import types
from typing import Any

from pytest_isolate.observe.hostview import _os


def _exists(p: str) -> bool:
    try:
        _os.stat(p)
    except (OSError, ValueError):
        return False
    return True


def _isdir(p: str) -> bool:
    try:
        return stat.S_ISDIR(_os.stat(p).st_mode)
    except (OSError, ValueError):
        return False


# --- who called: the first frame that is the test's (not stdlib, pytest or us) ----------


def _dir_of(mod: str) -> str | None:
    m = sys.modules.get(mod)
    f = getattr(m, "__file__", None)
    return os.path.dirname(f) + os.sep if f else None


_paths = sysconfig.get_paths()
_STDLIB = tuple({os.path.join(_paths[k], "") for k in ("stdlib", "platstdlib") if k in _paths})
_SITE = tuple({os.path.join(_paths[k], "") for k in ("purelib", "platlib") if k in _paths})
_OURS = tuple(
    d
    for d in (
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
        _dir_of("pytest"),
        _dir_of("_pytest"),
        _dir_of("pluggy"),
        _dir_of("execnet"),
    )
    if d
)
_user_cache: dict[str, bool] = {}


def _is_user(filename: str) -> bool:
    r = _user_cache.get(filename)
    if r is None:
        r = not (
            filename.startswith("<")
            or filename.startswith(_OURS)
            or (filename.startswith(_STDLIB) and not filename.startswith(_SITE))
        )
        _user_cache[filename] = r
    return r


#: The session's rootdir with a trailing "/" (``arm`` sets it; "" for none): an escape's
#: location under it is named relative to it, as pytest names the test itself.
_ROOT = [""]


def _where(depth: int = 2) -> str | None:
    """``file:line`` of the innermost user frame ``depth`` frames up, if there is one."""
    try:
        f: types.FrameType | None = sys._getframe(depth)
    except ValueError:
        return None
    while f is not None:
        fn = f.f_code.co_filename
        if _is_user(fn):
            return f"{_located(fn)}:{f.f_lineno}"
        f = f.f_back
    return None


def _located(filename: str) -> str:
    """Relative under the rootdir, absolute anywhere else.

    Against the rootdir taken at ``arm``, not the cwd of the moment: a test that chroots
    or chdirs to "/" would otherwise turn /tmp/x/t.py into "tmp/x/t.py". String work
    only: no ``os.path`` call, which would reach ``os.fspath``/``os.getcwd`` (the test
    may have replaced them, and must not see our calls).
    """
    root = _ROOT[0]
    if root and filename.startswith(root):
        return filename[len(root):]
    return filename


# --- classification helpers -------------------------------------------------------------

_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: Always the test's own business, at every tier.
_WRITABLE = (
    "/tmp/",
    "/var/tmp/",
    "/dev/shm/",
    "/dev/pts/",
    "/dev/fd/",
    "/proc/self/",
    "/proc/thread-self/",
    "/run/user/",
)
_WRITABLE_EXACT = frozenset(
    {"/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/dev/stdout", "/dev/stderr", "/dev/stdin",
     "/dev/random", "/dev/urandom", "/dev/ptmx", "/tmp", "/var/tmp"}
)
_SAFE_DEV = _WRITABLE_EXACT | {"/dev/pts", "/dev/shm", "/dev/fd", "/dev/console", "/dev/log"}
_USERMODE_HELPERS = ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe", "/proc/sys/fs/binfmt_misc/",
                     "/proc/sys/kernel/hotplug", "/sys/kernel/uevent_helper")

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_UNIX, AF_INET, AF_INET6, AF_PACKET = 1, 2, 10, 17
SOCK_RAW = 3

#: Command names whose execution is itself worth a record (C tools the audit hook cannot
#: follow into): technique per program.
_TOOLS = {
    "mount": "mount", "umount": "mount", "pivot_root": "mount", "switch_root": "mount", "losetup": "mount",
    "chroot": "chroot", "nsenter": "setns", "unshare": "unshare", "mknod": "device",
    "insmod": "kernel-module", "modprobe": "kernel-module", "rmmod": "kernel-module",
    "keyctl": "keyring", "sysctl": "sysctl", "reboot": "reboot", "shutdown": "reboot",
    "halt": "reboot", "poweroff": "reboot", "kexec": "reboot",
}

#: libc functions (and syscall numbers) looked up through ctypes, by technique.
_LIBC = {
    "mount": "mount", "umount": "mount", "umount2": "mount", "pivot_root": "mount",
    "fsopen": "mount", "fsmount": "mount", "move_mount": "mount", "open_tree": "mount", "mount_setattr": "mount",
    "chroot": "chroot", "setns": "setns", "unshare": "unshare", "ptrace": "ptrace",
    "process_vm_writev": "ptrace", "process_vm_readv": "ptrace", "pidfd_getfd": "ptrace",
    "kill": "signal", "killpg": "signal", "tgkill": "signal", "pidfd_send_signal": "signal", "sigqueue": "signal",
    "mknod": "device", "mknodat": "device", "add_key": "keyring", "request_key": "keyring", "keyctl": "keyring",
    "init_module": "kernel-module", "finit_module": "kernel-module", "delete_module": "kernel-module",
    "reboot": "reboot", "kexec_load": "reboot", "kexec_file_load": "reboot",
    "ioctl": "tiocsti", "syscall": "",
}
_SYSCALLS = {
    "x86_64": {165: "mount", 166: "umount2", 155: "pivot_root", 161: "chroot", 308: "setns", 272: "unshare",
               101: "ptrace", 310: "process_vm_readv", 311: "process_vm_writev", 438: "pidfd_getfd",
               62: "kill", 234: "tgkill", 424: "pidfd_send_signal", 133: "mknod", 259: "mknodat",
               248: "add_key", 249: "request_key", 250: "keyctl", 175: "init_module", 313: "finit_module",
               176: "delete_module", 169: "reboot", 246: "kexec_load", 320: "kexec_file_load", 16: "ioctl",
               428: "open_tree", 429: "move_mount", 430: "fsopen", 432: "fsmount", 442: "mount_setattr"},
    "aarch64": {40: "mount", 39: "umount2", 41: "pivot_root", 51: "chroot", 268: "setns", 97: "unshare",
                117: "ptrace", 270: "process_vm_readv", 271: "process_vm_writev", 438: "pidfd_getfd",
                129: "kill", 131: "tgkill", 424: "pidfd_send_signal", 33: "mknodat", 217: "add_key",
                218: "request_key", 219: "keyctl", 105: "init_module", 273: "finit_module",
                106: "delete_module", 142: "reboot", 104: "kexec_load", 294: "kexec_file_load", 29: "ioctl",
                428: "open_tree", 429: "move_mount", 430: "fsopen", 432: "fsmount", 442: "mount_setattr"},
}.get(os.uname().machine, {})

_ROOT_CHANGING = frozenset({"chroot", "setns", "pivot_root", "unshare"})
#: libc/syscall names that move a process (root or namespaces).
_MOVES = _ROOT_CHANGING
#: Namespaces compared before and after such a move.
_NS_WATCH = ("mnt", "net", "pid", "user", "ipc", "uts")

def _text(x: Any, limit: int = 120) -> str:
    if isinstance(x, ctypes._SimpleCData):  # type: ignore[attr-defined]
        x = x.value
    if isinstance(x, os.PathLike):
        x = _os.fspath(x)
    if isinstance(x, bytes):
        x = x.decode(errors="replace")
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fspath(p: Any) -> str | None:
    if isinstance(p, str):
        return p
    if isinstance(p, int):
        return None
    try:
        return _os.fsdecode(_os.fspath(p))
    except TypeError:
        return None


def _alive(pid: int) -> bool:
    """Is there a process ``pid`` here (a zombie counts: it still takes a signal)?"""
    try:
        _os.stat(f"/proc/{pid}")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _stat_number(pid: int, index: int) -> int:
    """Field ``index`` after the command name in ``/proc/<pid>/stat`` (0: gone or
    unreadable): 1 the parent, 2 the process group."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[index])
    except (OSError, ValueError, IndexError):
        return 0


def _ppid(pid: int) -> int:
    return _stat_number(pid, 1)


def _pgid(pid: int) -> int:
    return _stat_number(pid, 2)


_INFO_ARGS = frozenset({"--version", "-V", "--help", "-h", "--list", "show", "list", "print", "describe",
                        "rdescribe", "read", "pipe", "search"})


def _acts(technique: str, args: list[str]) -> bool:
    """Does this command line change something (``mount -t tmpfs x /mnt``), rather than
    ask (``mount``, ``mount --version``, ``sysctl kernel.core_pattern``)?"""
    if not args or all(a in _INFO_ARGS for a in args[:1]):
        return False
    if technique == "sysctl":
        return any("=" in a or a == "-w" for a in args)
    return True


def _num(x: Any) -> Any:
    return x.value if isinstance(x, ctypes._SimpleCData) else x  # type: ignore[attr-defined]
