"""The spawner: a pristine copy of the fork server whose only job is to fork zygotes.

Why not fork them from the server itself: ``fork()`` makes every page of the forking
process copy-on-write, for the parent as much as for the child. The server runs Python
between tests (results, JSON, bookkeeping) and paid a page fault for each page it wrote
after every fork: ~640 faults, ~1.6 ms of CPU a test here, plus the page-table copy of
the fork itself in its own loop. The spawner is forked from the server once; it then
sits in a small loop (receive three fds, fork, answer), touches a handful of pages a
test, and the server never forks for the `process` tier again.

A `chroot` sandbox's child is a zygote too: the server mounts its root (it must, in
the host's mount namespace) and names it in the request; the zygote enters it before
it waits for its job.

The zygotes are the spawner's children, so it reaps them and reports each one's raw
wait status and rusage; the server asks for them by pid (``status``). The spawner is
not a subreaper: what a test leaves behind still reparents to the server, which finds
and kills it as before.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import select
import signal
import socket
from collections.abc import Callable
from typing import NoReturn

from pytest_isolate import frozen

#: Fields of ``resource.struct_rusage``, in order: statuses cross the socket as text.
_RUSAGE_FIELDS = 16


#: The largest message either side sends. A datagram longer than the reader's buffer
#: is cut short (``SOCK_SEQPACKET``): a list of pids cut inside a number names another
#: process.
MAX_MESSAGE = 1 << 16
#: Orphans named at once (``Spawner.orphans``): well within ``MAX_MESSAGE``. What is
#: left is named after the next test.
MAX_ORPHANS = 4000


class SpawnerGone(Exception):
    """The spawner process died: the server replaces it."""


class Spawner:
    """The server's handle on its spawner process."""

    def __init__(
        self,
        zygote: Callable[[int, int, int, str, str], NoReturn],
        close_in_child: list[int],
        netns: int | None = None,
    ) -> None:
        """``netns``: the spawner becomes PID 1 of a PID namespace of its own and joins
        this network namespace (a holder of `jail`/`zone`, tiers/jail.py)."""
        from pytest_isolate.facets import namespaces as ns

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        frozen.freeze()
        own = -1
        if netns is not None:
            own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            ns.unshare(ns.CLONE_NEWPID)
        pid = os.fork()
        if pid != 0 and own >= 0:
            ns.setns(own, ns.CLONE_NEWPID)
            os.close(own)
        if pid == 0:
            try:
                if netns is not None:
                    os.close(own)
                    ns.setns(netns, ns.CLONE_NEWNET)
                ours.close()
                for fd in close_in_child:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                _serve(theirs, zygote)
            finally:
                os._exit(70)
        theirs.close()
        self.pid = pid
        self.sock = ours
        #: Exit statuses reported and not yet asked for: pid -> (status, rusage).
        self.statuses: dict[int, tuple[int, resource.struct_rusage]] = {}
        #: Zygotes whose status nobody will ask for (they ended cleanly).
        self.forgotten: set[int] = set()
        self.children: set[int] = set()
        self.named: list[int] = []  # pids the spawner sent, oldest first, not yet taken
        self.asked = 0  # zygotes asked for whose pid has not come yet

    def spawn(self, result_w: int, stack_fd: int, go_r: int, root: str = "", cwd: str = "") -> None:
        """Ask for a new zygote holding these three fds; ``next_pid()`` answers which it is.
        Not waited for here: the fork takes ~1 ms, during which the server may have a
        test's end to notice. ``root``/``cwd``: the root the zygote chroots into
        (`chroot`), if any."""
        fields = "\0".join(("z", root, cwd))
        try:
            socket.send_fds(self.sock, [fields.encode()], [result_w, stack_fd, go_r])
        except OSError as exc:
            raise SpawnerGone(str(exc)) from None
        self.asked += 1

    def orphans(self) -> list[int]:
        """A holder's children it did not fork: what a test left in its PID namespace.

        Read here from /proc when every zygote it forked is named (each is in
        ``children``, or ``forgotten`` while it exits): asking the holder costs a round
        trip, and a wait while it forks the next sandbox's zygote. Asked otherwise: a
        zygote it is forking now would be taken for an orphan."""
        if not self.asked:
            known = self.children | self.forgotten
            try:
                with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                    return [p for p in map(int, f.read().split()) if p not in known][:MAX_ORPHANS]
            except OSError:
                pass  # gone, or /proc elsewhere: the holder answers (or its end shows)
        try:
            self.sock.send(b"o")
        except OSError as exc:
            raise SpawnerGone(str(exc)) from None
        self.found: list[int] | None = None
        while self.found is None:
            self._read()
        return self.found

    def next_pid(self) -> int:
        """The pid of the oldest zygote asked for and not yet named."""
        while not self.named:
            self._read()
        return self.named.pop(0)

    def status(self, pid: int) -> tuple[int, resource.struct_rusage]:
        """Block until zygote ``pid`` has been reaped; its wait status and rusage."""
        while pid not in self.statuses:
            self._read()
        self.children.discard(pid)
        return self.statuses.pop(pid)

    def forget(self, pid: int) -> None:
        """``pid`` ended cleanly and its figures are in: drop its status when it comes."""
        if self.statuses.pop(pid, None) is None:
            self.forgotten.add(pid)
        self.children.discard(pid)

    def poll(self) -> None:
        """Take in what the spawner sent without waiting (exit reports of zygotes
        nobody waits for); SpawnerGone if it died."""
        while True:
            try:
                self._read(socket.MSG_DONTWAIT)
            except BlockingIOError:
                return

    def _read(self, flags: int = 0) -> tuple[str, int]:
        try:
            msg = self.sock.recv(MAX_MESSAGE, flags)
        except BlockingIOError:
            raise
        except OSError:
            msg = b""
        if not msg:
            raise SpawnerGone("the spawner process exited")
        kind, pid_s, *rest = msg.decode().split()
        pid = int(pid_s)
        if kind == "pid":
            self.asked -= 1
            self.children.add(pid)
            self.named.append(pid)
        if kind == "orphans":
            self.found = [pid for pid in map(int, rest) if pid]
        if kind == "exit":
            status, fields = int(rest[0]), [float(x) for x in rest[1:]]
            ints = [*fields[:2], *(int(x) for x in fields[2:])]
            if pid in self.forgotten:
                self.forgotten.discard(pid)
            else:
                self.statuses[pid] = (status, resource.struct_rusage(ints))
        return kind, pid

    def close(self) -> None:
        """EOF tells the spawner to end its zygotes and exit; then reap it."""
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _serve(sock: socket.socket, zygote: Callable[[int, int, int, str, str], NoReturn]) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    kids: dict[int, int] = {}  # pidfd -> pid
    host: dict[int, int] = {}  # pid -> the server's name for it (a PID namespace's own)
    pid1 = os.getpid() == 1
    early: dict[int, tuple[int, resource.struct_rusage]] = {}  # zygotes reaped with orphans
    wake: list[int] = []
    if pid1:
        # A test's orphans are ours, and a test may wait for one to go (psutil's tests):
        # reaped as they die, woken by SIGCHLD.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        wake = [wake_r]
    while True:
        ready, _, _ = select.select([sock, *kids, *wake], [], [])
        if wake and wake[0] in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake[0], 4096)
            ready.remove(wake[0])
        if pid1:
            # PID 1 of its namespace: a test's orphans are ours to reap.
            while True:
                try:
                    pid, status, ru = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid in host:
                    early[pid] = (status, ru)
        for fd in ready:
            if fd is sock:
                continue
            pid = kids.pop(fd)
            os.close(fd)
            if pid in early:
                status, ru = early.pop(pid)
            else:
                _, status, ru = os.wait4(pid, 0)
            figures = " ".join(repr(v) for v in tuple(ru)[:_RUSAGE_FIELDS])
            with contextlib.suppress(OSError):
                sock.send(f"exit {host.pop(pid, pid)} {status} {figures}".encode())
        if sock not in ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
        except OSError:
            msg, fds = b"", []
        if not msg:  # the server is gone or done: so are its zygotes
            for fd, pid in kids.items():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                os.close(fd)
            os._exit(0)
        if msg == b"o":  # which of our children did we not fork? (a test's orphans)
            ours = set(host.values())
            me = int(os.readlink("/proc/self"))
            try:
                with open(f"/proc/{me}/task/{me}/children") as f:
                    orphans = [p for p in map(int, f.read().split()) if p not in ours][:MAX_ORPHANS]
            except OSError:
                orphans = []
            sock.send(" ".join(["orphans", "0", *map(str, orphans)]).encode())
            continue
        _, root, cwd = msg.decode().split("\0")
        gc.collect()  # what became garbage since the last fork: frozen, it would stay
        frozen.freeze()
        pid = os.fork()
        if pid == 0:
            sock.close()
            for fd in kids:
                os.close(fd)
            if wake:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake[0])
                os.close(wake_w)
            zygote(fds[0], fds[1], fds[2], root, cwd)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        kids[pidfd] = pid
        host[pid] = _host_pid(pidfd, pid)
        sock.send(f"pid {host[pid]}".encode())


def _host_pid(pidfd: int, pid: int) -> int:
    """``pid`` as the server sees it: a pidfd's ``Pid:`` is in /proc's PID namespace,
    the host's, also from a spawner that is PID 1 of its own."""
    if os.getpid() != 1:
        return pid
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return pid

