"""The escape techniques, one test each, run *inside* a tier by test_matrix.py.

Not collected by the project's own run (no ``test_`` prefix): the matrix copies it into
a pytester directory and runs it with ``--isolate=<tier>``. Every technique aims at two
targets: the plugin's canaries (``PYTEST_ISOLATE_CANARY_*``, what the plugin watches)
and the matrix's own oracles (``MATRIX_*``, what the matrix watches, independently of
the plugin). Each test writes what it saw to ``<basetemp>/facts/<technique>.json`` for
the few techniques whose effect only the sandbox itself can observe.

Safety: nothing here changes the host for good. Signals are SIGUSR1 to processes that
record them; ptrace attaches and detaches; mounts are undone in ``finally``; the kernel
files (core_pattern, release_agent) are only *opened* for writing, never written (a
read-only /proc/sys is remounted read-write only in a child's own mount namespace); keys
are invalidated; TIOCSTI only targets the matrix's own pty (checked by device number
and boot id); files land in the matrix's own directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV = os.environ
TOKEN = ENV["MATRIX_TOKEN"]
ODIR = ENV["MATRIX_DIR"]  # the matrix's host directory (outside every temp dir)
HOLD = 0.3  # seconds an effect is held so the oracles' pollers see it

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
KEY_SPEC_USER_KEYRING = -4
KEYCTL_SET_TIMEOUT, KEYCTL_INVALIDATE = 15, 21
TIOCSTI = 0x5412
_SYS_ADD_KEY = {"x86_64": 248, "aarch64": 217}.get(os.uname().machine)
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)


class Facts:
    """What the test saw, printed as ``MATRIX-FACTS <name> <json>`` lines: pytest's
    capture holds an fd opened before the technique, so a root or namespace change does
    not redirect them, and ``-rA`` brings them back to the matrix at every tier."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, object] = {"boot_id": _boot_id()}

    def __setitem__(self, key: str, value: object) -> None:
        self.data[key] = value
        print(f"MATRIX-FACTS {self.name} {json.dumps(self.data)}", flush=True)


@pytest.fixture
def facts(request: pytest.FixtureRequest) -> Facts:
    f = Facts(request.node.name.removeprefix("test_"))
    f["started"] = True
    return f


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch dir (not tmp_path: a mount on it must not sit under a dir the plugin
    treats as its own, and it must work at every tier)."""
    d = Path(tempfile.mkdtemp(prefix="isolate-matrix-"))
    yield d
    with contextlib.suppress(OSError):
        shutil.rmtree(d)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _pids() -> list[int]:
    """The plugin's canary process and the matrix's target: the host processes to aim at."""
    return [int(ENV[k]) for k in ("PYTEST_ISOLATE_CANARY_PID", "MATRIX_PID") if ENV.get(k)]


def _write(path: str, text: str = TOKEN) -> str:
    try:
        with open(path, "w") as f:
            f.write(text)
        return "ok"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _write_targets(name: str, prefix: str = "") -> dict[str, str]:
    out = {"oracle": _write(f"{prefix}{ODIR}/{name}")}
    canary = ENV.get("PYTEST_ISOLATE_CANARY_DIR")
    if canary:
        out["canary"] = _write(f"{prefix}{canary}/{name}")
    return out


def test_chroot(scratch, facts):
    inner = scratch / "inner"
    inner.mkdir()
    outside = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    os.chroot(inner)
    os.fchdir(outside)  # cwd now lies outside the new root
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    facts["writes"] = _write_targets("chroot")


def test_proc_root(facts):
    out = {}
    for pid in _pids():
        out[str(pid)] = _write_targets("proc-root", prefix=f"/proc/{pid}/root")
    facts["writes"] = out


def test_signal(facts):
    out = {}
    for pid in _pids():
        try:
            os.kill(pid, 10)  # SIGUSR1: both targets record it
            out[str(pid)] = "sent"
        except OSError as exc:
            out[str(pid)] = str(exc)
    facts["kill"] = out


def test_ptrace(facts):
    ptrace = libc.ptrace
    ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    ptrace.restype = ctypes.c_long
    out = {}
    attached = []
    for pid in _pids():
        if ptrace(PTRACE_ATTACH, pid, None, None) == 0:
            attached.append(pid)
            out[str(pid)] = "attached"
        else:
            out[str(pid)] = os.strerror(ctypes.get_errno())
    try:
        for pid in attached:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0x40000000)  # __WALL: the attach stop
        time.sleep(HOLD)
    finally:
        for pid in attached:
            ptrace(PTRACE_DETACH, pid, None, None)
    facts["ptrace"] = out


def test_mount(scratch, facts):
    target = scratch / "m"
    target.mkdir()
    source = f"pytest-isolate-matrix-{TOKEN}".encode()
    rc = libc.mount(source, str(target).encode(), b"tmpfs", 0, None)
    facts["mount"] = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
    if rc == 0:
        try:
            time.sleep(HOLD)
        finally:
            libc.umount2(str(target).encode(), 2)


def test_setns(facts):
    pid = _pids()[0]
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
    except OSError as exc:
        facts["setns"] = f"open: {exc}"
        return
    rc = libc.setns(fd, CLONE_NEWNS)
    facts["setns"] = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
    if rc == 0:
        facts["writes"] = _write_targets("setns")


def test_raw_socket(facts):
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    except OSError as exc:
        facts["socket"] = str(exc)
        return
    facts["socket"] = "ok"
    seen = False
    with s:
        try:
            s.bind(("lo", 0))
        except OSError as exc:
            facts["bind"] = str(exc)
        s.settimeout(0.1)
        end = time.monotonic() + 2
        beacon = f"beacon-{TOKEN}".encode()
        while time.monotonic() < end and not seen:
            try:
                seen = beacon in s.recv(65536)
            except OSError:
                continue
    facts["saw_host_traffic"] = seen


def _connect(family: int, address: object) -> str:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)
            s.sendall(TOKEN.encode())
            return "ok"
    except OSError as exc:
        return str(exc)


def test_network(facts):
    out = {"oracle": _connect(socket.AF_INET, ("127.0.0.1", int(ENV["MATRIX_PORT"])))}
    if ENV.get("PYTEST_ISOLATE_CANARY_PORT"):
        out["canary"] = _connect(socket.AF_INET, ("127.0.0.1", int(ENV["PYTEST_ISOLATE_CANARY_PORT"])))
    facts["connect"] = out


def test_abstract_socket(facts):
    out = {"oracle": _connect(socket.AF_UNIX, "\0" + ENV["MATRIX_UNIX"])}
    if ENV.get("PYTEST_ISOLATE_CANARY_UNIX"):
        out["canary"] = _connect(socket.AF_UNIX, "\0" + ENV["PYTEST_ISOLATE_CANARY_UNIX"])
    facts["connect"] = out


def test_unix_socket(facts):
    facts["connect"] = _connect(socket.AF_UNIX, f"{ODIR}/sock")


def test_device(scratch, tmp_path_factory, facts):
    major, minor = (int(x) for x in ENV["MATRIX_DISK_DEV"].split(":"))
    want = ENV["MATRIX_DISK_HASH"]
    out: dict[str, object] = {}
    candidates = [f"/dev/{ENV['MATRIX_DISK_NAME']}"]
    dirs = [str(scratch), "/dev/shm"]
    with contextlib.suppress(Exception):
        dirs.append(str(tmp_path_factory.getbasetemp()))  # bound from the host at chroot/jail/zone
    for d in dirs:
        node = os.path.join(str(d), f"disk-{TOKEN}")
        try:
            os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(major, minor))
            candidates.append(node)
            out[f"mknod {d}"] = "ok"
        except OSError as exc:
            out[f"mknod {d}"] = str(exc)
    try:
        os.mknod(scratch / "mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))
        candidates.append(str(scratch / "mem"))
    except OSError as exc:
        out["mknod mem"] = str(exc)
    host_disk = False
    for path in candidates:
        try:
            st = os.stat(path)
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            out[path] = str(exc)
            continue
        try:
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(major, minor):
                data = os.pread(fd, 4096, 0)
                match = hashlib.sha256(data).hexdigest() == want
                out[path] = f"read; host disk: {match}"
                host_disk = host_disk or match
            else:
                out[path] = "opened"
        except OSError as exc:
            out[path] = f"opened; read: {exc}"
        finally:
            os.close(fd)
    for path in candidates[1:]:
        with contextlib.suppress(OSError):
            os.unlink(path)
    facts["opened"] = out
    facts["host_disk"] = host_disk


def test_keyring(facts):
    if _SYS_ADD_KEY is None:
        pytest.skip(f"no add_key syscall number for {os.uname().machine}")
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    desc = f"pytest-isolate-matrix-{TOKEN}".encode()
    key = syscall(_SYS_ADD_KEY, b"user", desc, b"x", ctypes.c_size_t(1), ctypes.c_int(KEY_SPEC_USER_KEYRING))
    if key < 0:
        facts["add_key"] = os.strerror(ctypes.get_errno())
        return
    facts["add_key"] = "ok"
    try:
        syscall(_SYS_KEYCTL, KEYCTL_SET_TIMEOUT, ctypes.c_long(key), 10)
        time.sleep(HOLD)
    finally:
        syscall(_SYS_KEYCTL, KEYCTL_INVALIDATE, ctypes.c_long(key))


def _open_for_write(path: str) -> str:
    """Open for writing and close without writing a byte: proves the access, changes nothing."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        return str(exc)
    os.close(fd)
    return "ok"


def _reopen_after_remount(path: str) -> str:
    """Root with CAP_SYS_ADMIN undoes a read-only /proc/sys: in a child with a mount
    namespace of its own (the host's mount table is never touched), remount the bind
    read-write and open ``path`` for writing again."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            if libc.unshare(CLONE_NEWNS) != 0:
                out = f"unshare: {os.strerror(ctypes.get_errno())}"
            elif libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                out = f"make private: {os.strerror(ctypes.get_errno())}"
            else:
                flags = MS_REMOUNT | MS_BIND | _kept_flags("/proc/sys")
                if libc.mount(None, b"/proc/sys", None, flags, None) != 0:
                    out = f"remount: {os.strerror(ctypes.get_errno())}"
                else:
                    out = _open_for_write(path)
            os.write(w, out.encode()[:500])
        finally:
            os._exit(0)
    os.close(w)
    try:
        return os.read(r, 1024).decode(errors="replace") or "child died"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def _kept_flags(path: str) -> int:
    """nosuid/nodev/noexec of ``path``: a remount that clears a locked one is refused."""
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in ((os.ST_NOSUID, 2), (os.ST_NODEV, 4), (os.ST_NOEXEC, 8)) if f & st)


def test_core_pattern(facts):
    path = "/proc/sys/kernel/core_pattern"
    first = _open_for_write(path)
    facts["direct"] = first
    if first != "ok" and os.statvfs("/proc/sys").f_flag & os.ST_RDONLY:
        facts["after_remount"] = second = _reopen_after_remount(path)
        if second == "ok":
            first = "ok"
    facts["open"] = first


def test_release_agent(scratch, facts):
    target = scratch / "cg"
    target.mkdir()
    source = f"pytest-isolate-matrix-{TOKEN}".encode()
    tried = []
    for opts in (b"pids", b"none,name=pytest-isolate-matrix"):
        rc = libc.mount(source, str(target).encode(), b"cgroup", 0, opts)
        tried.append(f"{opts.decode()}: {'ok' if rc == 0 else os.strerror(ctypes.get_errno())}")
        if rc == 0:
            break
    facts["mount"] = tried
    if rc != 0:
        facts["open"] = "no cgroup v1 hierarchy"
        return
    try:
        facts["open"] = _open_for_write(str(target / "release_agent"))
    finally:
        libc.umount2(str(target).encode(), 2)


def test_tiocsti(facts):
    import fcntl

    want = int(ENV["MATRIX_PTY_RDEV"])
    injected = []
    if _boot_id() != ENV.get("MATRIX_BOOT_ID"):
        # Another kernel (a UML guest): the matrix's pty is not here, and the guest's own
        # consoles carry its channel to the host. A pty of our own is the guest's terminal.
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, TIOCSTI, b"x")
            facts["injected"] = "guest pty: ok"
        except OSError as exc:
            facts["injected"] = f"guest pty: {exc}"
        finally:
            os.close(master)
            os.close(slave)
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != want:
            continue  # never anything but the matrix's own pty
        try:
            for ch in f"tiocsti-{TOKEN}":
                fcntl.ioctl(fd, TIOCSTI, ch.encode())
            injected.append(f"{fd}: ok")
        except OSError as exc:
            injected.append(f"{fd}: {exc}")
        break
    facts["injected"] = injected or "no fd on the matrix pty"


def test_write_host_file(facts):
    facts["writes"] = _write_targets("direct")


def test_daemon(facts):
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", f"pytest-isolate-matrix-{TOKEN}-daemon"],
        start_new_session=True,
    )
    try:
        facts["pidns"] = os.stat(f"/proc/{proc.pid}/ns/pid").st_ino
    except OSError as exc:
        facts["pidns"] = str(exc)
    facts["pid"] = proc.pid
