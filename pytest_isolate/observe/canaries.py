"""Host-side tripwires: things no sandboxed test can touch unless it reached the host.

Planted once per run by the controller, outside every sandbox:

- a directory with a marker file holding a random token (``<rundir>/canary/marker``, in
  the run's directory so the controller's sweep removes it even after a SIGKILL),
  watched with inotify for *modifications* only: sandboxes see the host's files
  read-only through their overlay, so reading it proves nothing, while a write that
  lands on the host's inode can only come from outside the overlay;
- a TCP listener on the host's 127.0.0.1 (a sandbox with its own network namespace has
  a loopback of its own and cannot reach it);
- a listener on the abstract unix socket ``@pytest-isolate-<run_id>`` (abstract names
  belong to the network namespace);
- a sleeping host process that records every signal it gets (with the sender's pid)
  and is watched for a tracer (``TracerPid``) and for being stopped;
- the host's mount table (``/proc/self/mountinfo`` signals changes with POLLPRI): a new
  mount outside the run's own directories was made in the host's mount namespace;
- the host's kernel hooks (``core_pattern``, ``modprobe``, every cgroup v1 hierarchy's
  ``release_agent``): a change is reported *and undone* (each runs a program as root on
  the host);
- the host's keyring as the run's user sees it (``/proc/keys``): a new key.

All of these are kernel-level: they catch C code and subprocesses that the in-sandbox
audit hook cannot see. Any contact is proof of an escape.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: How often the watcher looks at the canary process (tracer, stopped) when idle.
POLL_INTERVAL = 0.05
#: How often it re-reads the host's kernel hooks and keyring (also after every test).
STATE_INTERVAL = 0.25


def kernel_hooks() -> list[str]:
    """Host files whose content the kernel runs as a program, as root, in the host."""
    paths = ["/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe"]
    with contextlib.suppress(OSError):
        for ctrl in sorted(os.listdir("/sys/fs/cgroup")):
            paths.append(f"/sys/fs/cgroup/{ctrl}/release_agent")
    return [p for p in paths if os.path.isfile(p)]


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _pread(fd: int) -> str | None:
    try:
        return os.pread(fd, 1 << 16, 0).decode(errors="replace")
    except OSError:
        return None


def _key_lines() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/keys", encoding="utf-8") as f:
        for line in f:
            parts = line.split(None, 1)
            if parts:
                out[parts[0]] = line.strip()
    return out

_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
#: Only what changes the host's files: reads through a sandbox's overlay open the same
#: inode and must not count.
_IN_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
            | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF)
_IN_NAMES = {_IN_MODIFY: "modified", _IN_ATTRIB: "attributes changed", _IN_CLOSE_WRITE: "written",
             _IN_MOVED_FROM: "moved away", _IN_MOVED_TO: "moved in", _IN_CREATE: "created",
             _IN_DELETE: "deleted", _IN_DELETE_SELF: "deleted", _IN_MOVE_SELF: "moved"}
_EVENT = struct.Struct("iIII")

#: Where mounts of pytest-isolate itself live (this run's, and concurrent runs').
_OWN_MOUNT_PREFIXES = ("/tmp/pytest-isolate-", "/run/netns/")

#: The canary process: blocks every catchable signal and reports each one it receives.
_CANARY_PROGRAM = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL: never outlive the run
sigs = {s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
os.write(1, b"ready\n")
while True:
    i = signal.sigwaitinfo(sigs)
    os.write(1, b"%d %d %d %d\n" % (i.si_signo, i.si_pid, i.si_uid, i.si_code))
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def _mountinfo(text: str | None = None) -> dict[str, tuple[str, str, str]]:
    """mount id -> (mount point, fstype, source) of the host's mount namespace (from
    ``text``, mountinfo as already read, when given)."""
    out: dict[str, tuple[str, str, str]] = {}
    if text is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                text = f.read()
        except OSError:
            return out
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        a, b = left.split(), right.split()
        if len(a) >= 5 and len(b) >= 2:
            out[a[0]] = (a[4].replace("\\040", " "), b[0], b[1])
    return out


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP_REQUEST = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_TCPF_LISTEN = 1 << 10


def _listening_ports() -> set[int]:
    """TCP ports listened on (IPv4 and IPv6), asked of the kernel's sock_diag: it walks
    the listening sockets only, where reading ``/proc/net/tcp`` walks the whole
    connection table (~3.3 ms per family here, even with nothing in it), on the way to
    every run's first test."""
    ports: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            # nlmsghdr, then inet_diag_req_v2: family, protocol, ext, pad, states, and a
            # zeroed 48-byte inet_diag_sockid (no filter).
            req = struct.pack("=BBBBI48x", family, socket.IPPROTO_TCP, 0, 0, _TCPF_LISTEN)
            nl.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_DUMP_REQUEST, seq, 0) + req)
            done = False
            while not done:
                data = nl.recv(65536)
                off = 0
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if length < 16:
                        raise OSError("sock_diag: malformed answer")
                    if kind == 3:  # NLMSG_DONE
                        done = True
                        break
                    if kind == 2:  # NLMSG_ERROR
                        raise OSError(-struct.unpack_from("=i", data, off + 16)[0], "sock_diag")
                    if kind == _SOCK_DIAG_BY_FAMILY and length >= 16 + 6:
                        # inet_diag_msg: family, state, timer, retrans, then id.sport (big-endian)
                        ports.add(struct.unpack_from("!H", data, off + 16 + 4)[0])
                    off += (length + 3) & ~3
    return ports


def _host_services_env(max_names: int = 64) -> dict[str, str]:
    """The host's loopback TCP listeners and abstract unix names right now, for the
    sandboxes' audit hook (a sandbox with its own network namespace cannot see them)."""
    try:
        ports = _listening_ports()
    except OSError:
        ports = _proc_listening_ports()
    names: list[str] = []
    try:
        with open("/proc/net/unix", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7].startswith("@") and "\n" not in parts[7]:
                    n = parts[7][1:]
                    if n not in names and len(names) < max_names and len(n) < 108:
                        names.append(n)
    except OSError:
        pass
    return {"PYTEST_ISOLATE_HOST_PORTS": ",".join(str(p) for p in sorted(ports)),
            "PYTEST_ISOLATE_HOST_ABSTRACT": "\n".join(names)}


def _proc_listening_ports() -> set[int]:
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{name}", encoding="utf-8") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except (OSError, StopIteration, ValueError):
            continue
    return ports


class Canaries:
    """Host-side tripwires planted once per run, outside every sandbox (controller process)."""

    def __init__(self, rundir: Path, run_id: str, hooks: list[str] | None = None, settle: bool = True) -> None:
        """``settle=False``: return before the canary process is armed; the first
        ``contacts`` waits for it (the controller starts its worker meanwhile)."""
        self.rundir = Path(rundir)
        self.run_id = run_id
        self.token = secrets.token_hex(16)
        self.env: dict[str, str] = {}
        self.problems: list[str] = []
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._fds: list[int] = []
        self.dir: Path | None = None
        self.file: Path | None = None
        self._inotify = -1
        self._wd_names: dict[int, Path] = {}
        self._tcp: socket.socket | None = None
        self._unix: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_buf = b""
        self._proc_ready = False
        self._proc_flags: set[str] = set()
        self._mount_fd = -1
        #: A second handle, polled only by ``contacts``: each open mountinfo file keeps its
        #: own "changed since I was last polled", so the watcher thread's poll cannot
        #: consume the change a test made before ``contacts`` reads it.
        self._mount_seen = select.poll()
        self._mount_fd2 = -1
        self._mounts: dict[str, tuple[str, str, str]] = {}
        self._mount_excluded = (*_OWN_MOUNT_PREFIXES, os.path.join(str(self.rundir), ""))
        self._hooks: dict[str, str] = {}
        self._hook_fds: dict[str, int] = {}
        self._status_fd = -1
        self._hook_paths = hooks
        self._keys: dict[str, str] = {}
        self._state_at = 0.0
        for plant in (self._plant_file, self._plant_tcp, self._plant_unix, self._plant_process, self._plant_mounts,
                      self._plant_state):
            try:
                plant()
            except Exception as exc:  # noqa: BLE001 - a missing tripwire is reported, not fatal
                self.problems.append(f"{plant.__name__[7:]}: {exc}")
        self.env.update(_host_services_env())
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        if settle:
            self._settle()  # before the watcher exists, which would read "ready" too
        self._thread = threading.Thread(target=self._watch, name="isolate-canaries", daemon=True)
        self._thread.start()

    # -- planting -----------------------------------------------------------------------
    def _plant_file(self) -> None:
        d = self.rundir / "canary"
        d.mkdir(mode=0o755, parents=True)
        self.dir = d
        self.file = d / "marker"
        self.file.write_text(self.token + "\n", encoding="utf-8")
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._inotify = fd
        for path in (d, self.file):
            wd = _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MASK)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self._wd_names[wd] = path
        self.env["PYTEST_ISOLATE_CANARY_DIR"] = str(d)
        self.env["PYTEST_ISOLATE_CANARY_FILE"] = str(self.file)

    def _plant_tcp(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.setblocking(False)
        self._tcp = s
        self.env["PYTEST_ISOLATE_CANARY_PORT"] = str(s.getsockname()[1])

    def _plant_unix(self) -> None:
        name = f"pytest-isolate-{self.run_id}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\0" + name)
        s.listen(16)
        s.setblocking(False)
        self._unix = s
        self.env["PYTEST_ISOLATE_CANARY_UNIX"] = name

    def _plant_process(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _CANARY_PROGRAM, f"pytest-isolate-{self.run_id}-canary"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        assert proc.stdout is not None
        # Its "ready" (signals blocked: a signal before that would kill it) is waited for
        # at the first ``contacts``, not here: its start-up (~17 ms) then overlaps the
        # worker's, which the controller launches right after planting.
        os.set_blocking(proc.stdout.fileno(), False)
        self._proc = proc
        self.env["PYTEST_ISOLATE_CANARY_PID"] = str(proc.pid)

    def _settle(self) -> None:
        """Wait (once) until the canary process has blocked its signals. Under the lock."""
        proc = self._proc
        if self._proc_ready or proc is None or proc.stdout is None:
            return
        end = time.monotonic() + 10
        while not self._proc_ready and proc.poll() is None and time.monotonic() < end:
            with contextlib.suppress(OSError):
                select.select([proc.stdout.fileno()], [], [], 0.05)
            self._drain_process()
        if not self._proc_ready:  # died or hung before it was armed: a problem, no contact
            self.problems.append("process: the canary process did not start")
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            self._proc = None

    def _plant_mounts(self) -> None:
        self._mount_fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._mounts = _mountinfo()
        with contextlib.suppress(OSError):
            while os.read(self._mount_fd, 65536):
                pass  # read to the end: POLLPRI now means "changed since"
        self._mount_fd2 = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._mount_seen.register(self._mount_fd2, select.POLLPRI | select.POLLERR)

    def _plant_state(self) -> None:
        for path in kernel_hooks() if self._hook_paths is None else self._hook_paths:
            value = _read(path)
            if value is not None:
                self._hooks[path] = value
                # Re-read through an open fd after every test: pread() at 0 regenerates
                # a proc/cgroup file; open+read+close of ten of them cost ~0.2 ms a test.
                with contextlib.suppress(OSError):
                    self._hook_fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._keys = _key_lines()

    # -- watching -----------------------------------------------------------------------
    def _watch(self) -> None:
        poller = select.poll()
        for fd in self._watched_fds():
            poller.register(fd, select.POLLIN)
        if self._mount_fd >= 0:
            poller.register(self._mount_fd, select.POLLPRI | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            try:
                ready = poller.poll(POLL_INTERVAL * 1000)
            except OSError:
                return
            mounts = any(fd == self._mount_fd for fd, _ in ready)
            with self._lock:
                if self._closed:
                    return
                self._drain(mounts)

    def _watched_fds(self) -> list[int]:
        fds = [self._inotify] if self._inotify >= 0 else []
        fds += [s.fileno() for s in (self._tcp, self._unix) if s is not None]
        if self._proc is not None and self._proc.stdout is not None:
            fds.append(self._proc.stdout.fileno())
        return fds

    def _add(self, technique: str, evidence: str, layer: str = "canary") -> None:
        self._pending.append({"technique": technique, "evidence": evidence, "layer": layer, "time": time.time()})

    def _drain(self, mounts: bool, state: bool = False) -> None:
        """Collect every contact the kernel has queued (never blocks). Under the lock."""
        self._drain_file()
        self._drain_socket(self._tcp, "network")
        self._drain_socket(self._unix, "abstract-socket")
        self._drain_process()
        if mounts:
            self._drain_mounts()
        now = time.monotonic()
        if state or now - self._state_at >= STATE_INTERVAL:
            self._state_at = now
            self._check_state()

    def _check_state(self) -> None:
        for path, was in self._hooks.items():
            now = _pread(self._hook_fds[path]) if path in self._hook_fds else _read(path)
            if now is None or now == was:
                continue
            undone = ""
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(was if was.strip() else "\n")
                undone = " (restored)"
            except OSError as exc:
                undone = f" (could not restore: {exc.strerror})"
            technique = "release-agent" if path.endswith("release_agent") else "core-pattern"
            self._add(technique, f"host {path} changed from {was.strip()!r} to {now.strip()!r}{undone}", layer="kernel")
        keys = _key_lines()
        for kid, line in keys.items():
            if kid not in self._keys and " keyring " not in line:
                self._add("keyring", f"a key appeared in the host's keyring: {line}", layer="kernel")
        self._keys = keys

    def _drain_file(self) -> None:
        if self._inotify < 0:
            return
        while True:
            try:
                data = os.read(self._inotify, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, _cookie, n = _EVENT.unpack_from(data, off)
                name = data[off + _EVENT.size : off + _EVENT.size + n].rstrip(b"\0").decode(errors="replace")
                off += _EVENT.size + n
                if mask & _IN_IGNORED:
                    continue
                base = self._wd_names.get(wd)
                if base is None:
                    continue
                if base == self.file and name == "":
                    # The file's own watch repeats what the directory watch says about it,
                    # except for events only it sees (written through a hard link).
                    if not mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ATTRIB):
                        continue
                path = base / name if name else base
                what = ", ".join(v for k, v in _IN_NAMES.items() if mask & k) or f"event {mask:#x}"
                if mask & _IN_Q_OVERFLOW:
                    what = "too many changes to list"
                self._add("write-host-file", f"host canary {path} {what} (the test wrote on the host)")

    def _drain_socket(self, s: socket.socket | None, technique: str) -> None:
        if s is None:
            return
        while True:
            try:
                conn, peer = s.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            with conn:
                who = ""
                if technique == "abstract-socket":
                    try:
                        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                        pid, uid, _gid = struct.unpack("3i", cred)
                        who = f" from pid {pid} uid {uid} ({_cmdline(pid)})"
                    except OSError:
                        pass
                    where = f"@{self.env.get('PYTEST_ISOLATE_CANARY_UNIX')}"
                else:
                    who = f" from {peer[0]}:{peer[1]}"
                    where = f"127.0.0.1:{self.env.get('PYTEST_ISOLATE_CANARY_PORT')}"
                data = b""
                try:
                    conn.settimeout(0.05)  # what the client says first, if it says it at once
                    data = conn.recv(120)
                except OSError:
                    pass
                said = f", sent {data[:80]!r}" if data else ""
                self._add(technique, f"connected to the host canary {where}{who}{said}")

    def _drain_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        out = proc.stdout
        if out is not None:
            while True:
                try:
                    data = os.read(out.fileno(), 4096)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if not data:
                    break
                self._proc_buf += data
            *lines, self._proc_buf = self._proc_buf.split(b"\n")
            for line in lines:
                if line == b"ready":
                    self._proc_ready = True
                    continue
                try:
                    signo, pid, uid, _code = (int(x) for x in line.split())
                except ValueError:
                    continue
                if pid == os.getpid() and signo == signal.SIGCONT:
                    continue  # our own wake-up after a stop (below)
                self._add("signal", f"{_signame(signo)} to the host canary process {proc.pid} from pid {pid} "
                                    f"uid {uid} ({_cmdline(pid)})")
        if proc.poll() is not None:
            self._add("signal", f"the host canary process {proc.pid} was killed (status {proc.returncode})")
            self._proc = None
            return
        status = self._proc_status()
        if status is None:
            return
        tracer = state = ""
        for line in status.splitlines():
            if line.startswith("TracerPid:"):
                tracer = line.split()[1]
            elif line.startswith("State:"):
                state = line.split()[1]
        if tracer and tracer != "0":
            if f"traced:{tracer}" not in self._proc_flags:
                self._proc_flags.add(f"traced:{tracer}")
                self._add("ptrace", f"the host canary process {proc.pid} is traced by pid {tracer} ({_cmdline(int(tracer))})")
        elif state in ("T", "t"):
            self._add("signal", f"the host canary process {proc.pid} was stopped (state {state}); resumed")
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)
        else:
            self._proc_flags = {f for f in self._proc_flags if not f.startswith("traced:")}

    def _proc_status(self) -> str | None:
        """/proc/<canary>/status, re-read through one open fd (pread regenerates it)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if self._status_fd < 0:
                self._status_fd = os.open(f"/proc/{proc.pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self._status_fd, 1 << 14, 0).decode(errors="replace")
        except OSError:
            return None

    def _signals_pending(self) -> bool:
        status = self._proc_status()
        if status is None:
            return False
        try:
            for line in status.splitlines():
                if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16):
                    return True
        except (ValueError, IndexError):
            pass
        return False

    def _drain_mounts(self) -> None:
        if self._mount_fd < 0:
            return
        chunks: list[bytes] = []
        with contextlib.suppress(OSError):
            os.lseek(self._mount_fd, 0, os.SEEK_SET)
            while chunk := os.read(self._mount_fd, 65536):
                chunks.append(chunk)  # reading it to the end re-arms POLLPRI
        now = _mountinfo(b"".join(chunks).decode(errors="replace") if chunks else None)
        for mid, (point, fstype, source) in now.items():
            if self._mounts.get(mid) == (point, fstype, source):
                continue  # known; mount ids are reused, so compare what is mounted too
            if point.startswith(self._mount_excluded) or point == str(self.rundir):
                continue
            self._add("mount", f"new mount in the host's mount table: {fstype} {source} on {point}", layer="kernel")
        self._mounts = now

    # -- API ------------------------------------------------------------------------------
    def contacts(self) -> list[dict[str, Any]]:
        """Contacts since the last call, oldest first: ``{"technique", "evidence", ...}``."""
        with self._lock:
            if self._closed:
                return []
            self._settle()
            # A signal the test just sent may not have been picked up by the canary yet.
            if self._signals_pending():
                end = time.monotonic() + 0.05
                while self._signals_pending() and time.monotonic() < end:
                    time.sleep(0.002)
            # The mount table is re-read only when it changed since the last test: asked
            # of our own handle (see ``_mount_seen``), a question of a few microseconds
            # where reading and parsing the table cost ~0.1 ms on the critical path.
            self._drain(mounts=self._mounts_changed(), state=True)
            out, self._pending = self._pending, []
        return out

    def _mounts_changed(self) -> bool:
        if self._mount_fd2 < 0:
            return self._mount_fd >= 0
        try:
            return bool(self._mount_seen.poll(0))
        except OSError:
            return True

    def close(self) -> None:
        """Remove every tripwire; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        for s in (self._tcp, self._unix):
            if s is not None:
                s.close()
        self._tcp = self._unix = None
        for fd in (self._mount_fd, self._mount_fd2, self._wake_r, self._wake_w, self._status_fd, *self._hook_fds.values()):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._inotify >= 0:
            # Closing an inotify instance waits for an RCU grace period: 13-16 ms here,
            # asleep in the kernel, at the end of every run. Closed beside pytest's
            # summary instead; not a daemon, so the interpreter waits for it at exit.
            threading.Thread(target=_close_quietly, args=(self._inotify,), name="isolate-canaries-close").start()
        self._inotify = self._mount_fd = self._mount_fd2 = self._wake_r = self._wake_w = self._status_fd = -1
        self._hook_fds = {}
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Canaries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
