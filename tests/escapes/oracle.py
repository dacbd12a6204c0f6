"""The matrix's own view of the host: what *actually* happened, independent of the plugin.

An ``Oracle`` plants host-side targets of its own (a directory outside every temp dir, a
TCP listener on the host's loopback, an abstract and a path unix socket, a process that
records the signals it gets, a pty) and watches the host (its mount table, its keyring,
the target's tracer) while a pytester run attacks them from inside a tier. Nothing here
imports the plugin's detection code.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pty
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

_TARGET = r"""
import os, signal, sys
sigs = {s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
os.write(1, b"ready\n")
while True:
    i = signal.sigwaitinfo(sigs)
    os.write(1, b"%d %d\n" % (i.si_signo, i.si_pid))
"""


def root_disk() -> tuple[str, str, str]:
    """(major:minor, device name, sha256 of its first 4 KiB) of the disk holding ``/``."""
    dev = os.stat("/").st_dev
    mm = f"{os.major(dev)}:{os.minor(dev)}"
    name = ""
    with contextlib.suppress(OSError), open(f"/sys/dev/block/{mm}/uevent") as f:
        for line in f:
            if line.startswith("DEVNAME="):
                name = line.split("=", 1)[1].strip()
    digest = ""
    if name:
        with contextlib.suppress(OSError):
            fd = os.open(f"/dev/{name}", os.O_RDONLY)
            try:
                digest = hashlib.sha256(os.pread(fd, 4096, 0)).hexdigest()
            finally:
                os.close(fd)
    return mm, name, digest


class Oracle:
    def __init__(self, label: str) -> None:
        self.token = f"{label}-{secrets.token_hex(6)}"
        self.dir = Path(f"/var/cache/pytest-isolate-matrix-{self.token}")
        self.dir.mkdir(mode=0o755, parents=True)
        self.received: dict[str, list[bytes]] = {"tcp": [], "abstract": [], "unix": []}
        self.signals: list[tuple[int, int]] = []
        self.tracers: set[int] = set()
        self.mounts: list[str] = []
        self.keys: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.abstract_name = f"pytest-isolate-matrix-{self.token}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + self.abstract_name)
        self.abstract.listen(8)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(str(self.dir / "sock"))
        os.chmod(self.dir / "sock", 0o777)
        self.unix.listen(8)
        self.udp_sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_sink.bind(("127.0.0.1", 0))
        self.udp_out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        self.target = subprocess.Popen(
            [sys.executable, "-S", "-c", _TARGET, f"pytest-isolate-matrix-{self.token}-target"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
        )
        assert self.target.stdout is not None
        assert self.target.stdout.readline() == b"ready\n"
        os.set_blocking(self.target.stdout.fileno(), False)

        # A pty standing in for the user's terminal: the inner pytest's stderr.
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)  # non-canonical: injected input is readable without a newline
        os.set_blocking(self.slave, False)
        os.set_blocking(self.master, False)
        self.pty_rdev = os.fstat(self.slave).st_rdev
        self.pty_input = b""

        self.mount_fd = os.open("/proc/self/mountinfo", os.O_RDONLY)
        self.disk = root_disk()
        self.thread = threading.Thread(target=self._watch, name="matrix-oracle", daemon=True)
        self.thread.start()

    def env(self) -> dict[str, str]:
        mm, name, digest = self.disk
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return {
            "MATRIX_TOKEN": self.token,
            "MATRIX_DIR": str(self.dir),
            "MATRIX_PORT": str(self.tcp.getsockname()[1]),
            "MATRIX_UNIX": self.abstract_name,
            "MATRIX_PID": str(self.target.pid),
            "MATRIX_PTY_RDEV": str(self.pty_rdev),
            "MATRIX_BOOT_ID": boot,
            "MATRIX_DISK_DEV": mm,
            "MATRIX_DISK_NAME": name,
            "MATRIX_DISK_HASH": digest,
            "MATRIX_HOST_PIDNS": str(os.stat("/proc/self/ns/pid").st_ino),
        }

    # -- watching -------------------------------------------------------------------
    def _watch(self) -> None:
        poller = select.poll()
        for s in (self.tcp, self.abstract, self.unix):
            poller.register(s.fileno(), select.POLLIN)
        assert self.target.stdout is not None
        poller.register(self.target.stdout.fileno(), select.POLLIN)
        poller.register(self.master, select.POLLIN)
        poller.register(self.mount_fd, select.POLLPRI | select.POLLERR)
        beacon = f"beacon-{self.token}".encode()
        sink = self.udp_sink.getsockname()
        last_beacon = 0.0
        while not self._stop.is_set():
            for fd, ev in poller.poll(5):
                self._event(fd, ev)
            now = time.monotonic()
            if now - last_beacon > 0.02:
                last_beacon = now
                with contextlib.suppress(OSError):
                    self.udp_out.sendto(beacon, sink)
                with contextlib.suppress(OSError):
                    self.udp_sink.recv(4096, socket.MSG_DONTWAIT)
            self._check_tracer()
            self._check_keys()

    def _event(self, fd: int, ev: int) -> None:
        for kind, s in (("tcp", self.tcp), ("abstract", self.abstract), ("unix", self.unix)):
            if fd == s.fileno():
                conn, _ = s.accept()
                with conn:
                    conn.settimeout(1)
                    with contextlib.suppress(OSError):
                        data = conn.recv(200)
                        with self._lock:
                            self.received[kind].append(data)
                return
        if self.target.stdout is not None and fd == self.target.stdout.fileno():
            with contextlib.suppress(BlockingIOError):
                for line in os.read(fd, 4096).splitlines():
                    signo, pid = (int(x) for x in line.split())
                    with self._lock:
                        self.signals.append((signo, pid))
            return
        if fd == self.master:
            with contextlib.suppress(OSError):
                os.read(self.master, 65536)  # the inner pytest's stderr: drain it
            return
        if fd == self.mount_fd:
            os.lseek(self.mount_fd, 0, os.SEEK_SET)
            data = b""
            while chunk := os.read(self.mount_fd, 65536):
                data += chunk
            for line in data.decode(errors="replace").splitlines():
                if f"pytest-isolate-matrix-{self.token}" in line:
                    with self._lock:
                        if line not in self.mounts:
                            self.mounts.append(line)

    def _check_tracer(self) -> None:
        with contextlib.suppress(OSError), open(f"/proc/{self.target.pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    t = int(line.split()[1])
                    if t:
                        with self._lock:
                            self.tracers.add(t)
                    return

    def _check_keys(self) -> None:
        with contextlib.suppress(OSError), open("/proc/keys") as f:
            for line in f:
                if f"pytest-isolate-matrix-{self.token}" in line:
                    with self._lock:
                        if line not in self.keys:
                            self.keys.append(line.strip())

    # -- after the run ----------------------------------------------------------------
    def read_pty_input(self) -> bytes:
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self.slave, 4096):
                self.pty_input += chunk
        return self.pty_input

    def settle(self) -> None:
        """Give the watcher a last round so effects of the run's final moments are in."""
        time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.target.kill()
        with contextlib.suppress(Exception):
            self.target.wait(timeout=5)
        if self.target.stdout is not None:
            self.target.stdout.close()
        for s in (self.tcp, self.abstract, self.unix, self.udp_sink, self.udp_out):
            s.close()
        for fd in (self.master, self.slave, self.mount_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.cleanup_host()
        shutil.rmtree(self.dir, ignore_errors=True)

    def cleanup_host(self) -> list[str]:
        """Undo anything a failed technique may have left: mounts, keys, processes."""
        left: list[str] = []
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4] for ln in f if f"pytest-isolate-matrix-{self.token}" in ln]
        for p in sorted(points, key=len, reverse=True):
            libc.umount2(p.encode(), 2)
            left.append(f"mount {p}")
        with contextlib.suppress(OSError), open("/proc/keys") as f:
            for line in f:
                if f"pytest-isolate-matrix-{self.token}" in line:
                    keyctl = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine, 250)
                    libc.syscall(keyctl, 21, int(line.split()[0], 16))  # KEYCTL_INVALIDATE
                    left.append(f"key {line.split()[0]}")
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == self.target.pid:
                continue
            with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as f:
                if f"pytest-isolate-matrix-{self.token}".encode() in f.read():
                    os.kill(int(name), signal.SIGKILL)
                    left.append(f"process {name}")
        return left
