"""prefault: copy the pages a forked child will write in one system call, not one fault
per page.

A test's child is a fork of the fork server: every page it writes is copied on its
first write, one page fault each. On a host a fault costs ~3 µs and copying the same
pages in bulk saves nothing (tried: docs/tiers.md). Inside a User-Mode Linux guest a
fault is a round trip through the host (~60 µs a copy-on-write fault, measured in a
guest), while ``madvise(MADV_POPULATE_WRITE)`` copies a range for a few µs a page: a
trivial test's child wrote ~1,600 pages, most of its CPU. Which pages a child writes
hardly depends on the test (pytest's protocol, our reports, the allocator's free
lists), so one child of the guest records them (``written_ranges``, at its end) and the
later ones copy them first thing (``Prefault.apply``).

One call for all ranges: ``process_madvise`` on our own pidfd takes up to ``IOV_MAX``
ranges at once (any advice on the caller itself: Linux 6.13); one ``madvise`` per range
would cost a system call each (~50 µs in the guest) for ~850 ranges. A kernel that
refuses it (before 6.13) is found once, in the server (``unsupported``), and nothing
is copied ahead there.

The fork server pays the same faults on its own side: after each fork every page it
writes between two tests is copied too (~700 a test in a guest, ~40 % of its CPU).
``ServerPages`` learns which ones with a *witness*, an idle fork that only holds the
server's pages for one test: what the server maps alone when the witness goes is what
it wrote in between (a test's child cannot blur that: the witness still shares what the
child copied). From then on the server copies them right after each fork.

Only private writable anonymous memory and the heap: copying them changes no content,
only when the copy is made.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import threading

#: x86_64; UML guests run x86_64 binaries.
SYS_PROCESS_MADVISE = 440
MADV_POPULATE_WRITE = 23
IOV_MAX = 1024
#: A recorded set larger than this (16 MiB: a test that allocated much) is not a
#: child's usual writes (~1,600 pages for a trivial test), and copying it would cost
#: more than the faults it saves: another child is asked (``LEARN_TRIES``).
MAX_PAGES = 4096
#: Children asked to record their pages before a server stops asking.
LEARN_TRIES = 3
PAGE = 4096

_PRESENT = 1 << 63
_EXCLUSIVE = 1 << 56  # mapped by this process only: written (copied) or new since the fork


#: What copying ahead must leave available: a guest's RAM is its tests' too.
HEADROOM = 64 << 20


def room_for(nbytes: int) -> bool:
    """Would ``nbytes`` more of memory leave ``HEADROOM`` available (``MemAvailable``)?"""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024 - nbytes >= HEADROOM
    except (OSError, ValueError, IndexError):
        pass
    return False


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _anonymous_writable() -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            if fields[1].startswith("rw") and fields[1][3] == "p" and name in ("", "[heap]"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return spans


def written_ranges() -> list[tuple[int, int]]:
    """(start, length) of the pages this process maps alone: since a fork, the ones it
    wrote or allocated."""
    ranges: list[tuple[int, int]] = []
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, end in _anonymous_writable():
            data = os.pread(fd, ((end - start) // PAGE) * 8, (start // PAGE) * 8)
            run = -1
            for i, entry in enumerate(struct.unpack(f"{len(data) // 8}Q", data)):
                mine = entry & _PRESENT and entry & _EXCLUSIVE
                if mine and run < 0:
                    run = start + i * PAGE
                elif not mine and run >= 0:
                    ranges.append((run, start + i * PAGE - run))
                    run = -1
            if run >= 0:
                ranges.append((run, end - run))
    finally:
        os.close(fd)
    return ranges


def encode(ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("QQ", a, n) for a, n in ranges)


def decode(data: bytes) -> list[tuple[int, int]]:
    return [struct.unpack_from("QQ", data, i) for i in range(0, len(data) - len(data) % 16, 16)]


def unsupported() -> str | None:
    """Why this kernel cannot copy pages ahead for us (one page, freshly mapped), or None."""
    buf = ctypes.create_string_buffer(2 * PAGE)
    addr = (ctypes.addressof(buf) + PAGE - 1) & ~(PAGE - 1)
    one = (_Iovec * 1)(_Iovec(addr, PAGE))
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError as exc:
        return f"pidfd_open: {exc.strerror}"
    try:
        if libc.syscall(SYS_PROCESS_MADVISE, pidfd, one, 1, MADV_POPULATE_WRITE, 0) < 0:
            return f"process_madvise(MADV_POPULATE_WRITE): {os.strerror(ctypes.get_errno())} (needs Linux 6.13)"
        return None
    finally:
        os.close(pidfd)


class Prefault:
    """The ranges one child wrote, ready for ``apply`` in the next ones (built in the
    fork server before it forks them: a child only makes the calls)."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.count = len(ranges)
        self.pages = sum(n for _, n in ranges) // PAGE
        self._iov = (_Iovec * len(ranges))(*(_Iovec(a, n) for a, n in ranges))
        self._libc = ctypes.CDLL(None, use_errno=True)

    @classmethod
    def of(cls, ranges: list[tuple[int, int]]) -> Prefault | None:
        if not ranges or sum(n for _, n in ranges) // PAGE > MAX_PAGES:
            return None
        return cls(ranges)

    def apply(self) -> int:
        """Copy the pages now; 0, or the errno that stopped it. A range that is no
        longer mapped (the server's heap changed) is skipped."""
        pidfd = os.pidfd_open(os.getpid())
        try:
            done = 0
            while done < self.count:
                n = min(IOV_MAX, self.count - done)
                got = self._libc.syscall(
                    SYS_PROCESS_MADVISE, pidfd, ctypes.byref(self._iov, done * ctypes.sizeof(_Iovec)),
                    n, MADV_POPULATE_WRITE, 0,
                )
                if got < 0:
                    err = ctypes.get_errno()
                    if err in (errno.ENOMEM, errno.EFAULT):  # the first range is gone
                        done += 1
                        continue
                    return err
                # The ranges it got through in full; the next one stopped it.
                while n and got >= self._iov[done].len:
                    got -= self._iov[done].len
                    done += 1
                    n -= 1
                if n:
                    done += 1
            return 0
        finally:
            os.close(pidfd)


class ServerPages:
    """The pages the fork server writes between two forks, copied in one call after
    each fork once learnt.

    The server calls ``before_fork`` and ``after_fork`` around each fork of a test's
    child. At the ``START``-th fork (the first ones are not typical: first collection,
    lazy imports) it compacts its memory (``compact``) and forks the witness; at the
    next one it reads what it maps alone, ends the witness and keeps the set if it is
    small enough (``MAX_PAGES``), else it tries again (``LEARN_TRIES`` witnesses in all).
    """

    #: Forks before the first witness.
    START = 3

    def __init__(self) -> None:
        self.pages: Prefault | None = None
        self.witness = 0
        self._pidfd = -1
        self._forks = 0
        self._tries = LEARN_TRIES

    def before_fork(self) -> None:
        if not self.witness:
            return
        try:
            self.pages = Prefault.of(written_ranges())
        except OSError:  # no pagemap to read: go on without
            self._tries = 0
        finally:
            self.close()
            self._tries -= 1

    def after_fork(self) -> None:
        """In the server, right after a fork."""
        if self.pages is not None:
            self.pages.apply()
            return
        self._forks += 1
        if self._forks < self.START or self._tries <= 0:
            return
        if self._forks == self.START:
            if unsupported() is not None:
                self._tries = 0  # the server's log says so once, for the children's copies
                return
            self.compact()
        try:
            pid = os.fork()
        except OSError:  # no process to spare (a pids limit): do without
            self._tries = 0
            return
        if pid == 0:  # the witness: hold the pages, write (almost) nothing, hold no fd
            try:
                os.closerange(0, 1 << 20)
                while True:  # stopped, it runs none of the server's signal handlers
                    os.kill(os.getpid(), signal.SIGSTOP)
            finally:
                os._exit(0)
        self.witness = pid
        # Ended through a pidfd: a test may kill it, and the sweep reap it, meanwhile.
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # never left without a way to end it
            self.close()
            self._tries -= 1

    @staticmethod
    def compact() -> None:
        """Copy every page of ours once, in address order, right after a fork (the child
        keeps the old ones): a guest hands out fresh pages in physical order, so the
        server's memory becomes a few hundred contiguous runs instead of thousands of
        single pages (measured in a guest: 3,239 → 377 runs of 4,160 pages). UML maps a
        guest process's pages into a host process run by run, so every later fork,
        copy and exit of the server's pages costs less: a warm test 78 / 85 → 67 / 70 ms
        in the server's timeline, the copies after each fork 20 → 5 ms. Once, ~20-40 ms.

        Until the child forked with it exits, the server's memory is held twice: done
        only when that leaves ``HEADROOM`` (arrow's suite with ``--cov``, a ~100 MB
        server in a 256 MB guest, was OOM-killed in every guest's first tests without)."""
        with contextlib.suppress(OSError):  # only an optimisation
            spans = [(a, b - a) for a, b in _anonymous_writable()]
            if room_for(sum(n for _, n in spans)):
                Prefault(spans).apply()

    def close(self) -> None:
        pid, self.witness = self.witness, 0
        fd, self._pidfd = self._pidfd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        elif pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


class StartWarmer:
    """While the guest's fork server imports pytest and the run's plugins, copy in the
    memory its allocator maps, in bulk, before it is touched page by page.

    A fresh page costs ~78 µs in a guest (a fault through the host), and the server's
    imports, configuration and collection touch ~6,800 of them: Python's allocator maps
    1 MiB arenas and fills them a page at a time. A thread reads ``/proc/self/maps``
    every ``INTERVAL`` and fills what is new with one ``madvise(MADV_POPULATE_WRITE)``
    a mapping (measured in a guest: import, configuration and collection 1.66 / 1.59 /
    1.73 → 1.43 / 1.34 / 1.57 s; ~10 MB more resident, the arenas' unused rest). It
    stops, and is joined, before the process's first ``fork()`` (an at-fork hook), so no
    child is forked beside a thread, and none inherits it; it stops by itself once
    nothing new came for ``IDLE`` rounds.
    """

    INTERVAL = 0.02
    IDLE = 25

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: dict[int, int] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="isolate-warmer", daemon=True)
        os.register_at_fork(before=self.stop)
        # A small stack: its own mapping is anonymous too, and would be filled (8 MiB).
        size = threading.stack_size(1 << 18)
        try:
            self._thread.start()
        finally:
            threading.stack_size(size)

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def _run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        idle = 0
        while not self._stop.is_set() and idle < self.IDLE:
            try:
                spans = _anonymous_writable()
            except OSError:
                return
            new = False
            for start, end in spans:
                have = self._done.get(start, start)
                if have < end:
                    # What is mapped is not always used (a library's reserve): filled only
                    # while the machine has room to spare.
                    if room_for(end - have):
                        libc.madvise(ctypes.c_void_p(have), ctypes.c_size_t(end - have), MADV_POPULATE_WRITE)
                    self._done[start] = end
                    new = True
            idle = 0 if new else idle + 1
            self._stop.wait(self.INTERVAL)
