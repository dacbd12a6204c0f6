"""The pages a forked child writes: recorded from its pagemap, copied ahead in the next.

Each check forks (a child's pages are shared with its parent until it writes them) and
reads the child's ``/proc/self/pagemap``: a page the child maps alone (bit 56) is one it
copied, the thing ``Prefault.apply`` must do before the child writes anything.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

import pytest

from pytest_isolate.facets import prefault
from pytest_isolate.facets.prefault import PAGE, Prefault
from tests.forked import in_child

PAGES = 64


def _alone(addr: int, pages: int) -> list[bool]:
    """Per page: present and mapped by this process only."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((addr // PAGE) * 8)
        entries = struct.unpack(f"{pages}Q", f.read(pages * 8))
    return [bool(e >> 63 & 1 and e >> 56 & 1) for e in entries]


@pytest.fixture
def buffer() -> Any:
    """An anonymous private mapping, every page written (present) before the fork."""
    m = mmap.mmap(-1, PAGES * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(PAGES):
        m[i * PAGE] = 1
    import ctypes

    ref = ctypes.c_char.from_buffer(m)
    yield m, ctypes.addressof(ref)
    del ref
    m.close()


def test_kernel_copies_ahead() -> None:
    assert prefault.unsupported() is None  # Linux 6.13+ (this host and the UML guests' 7.x)


def test_written_ranges_are_the_pages_the_child_wrote(buffer: Any) -> None:
    m, addr = buffer

    def child() -> Any:
        for i in (3, 4, 5, 40):
            m[i * PAGE] = 2
        ranges = prefault.written_ranges()
        inside = [(a, n) for a, n in ranges if addr <= a < addr + PAGES * PAGE]
        return [[(a - addr) // PAGE, n // PAGE] for a, n in inside]

    assert in_child(child) == [[3, 3], [40, 1]]


def test_apply_copies_the_pages_before_they_are_written(buffer: Any) -> None:
    m, addr = buffer
    ranges = [(addr + 8 * PAGE, 4 * PAGE), (addr + 20 * PAGE, PAGE)]
    pf = Prefault.of(ranges)
    assert pf is not None and pf.pages == 5

    def child() -> Any:
        before = _alone(addr, PAGES)
        err = pf.apply()
        after = _alone(addr, PAGES)
        return {
            "err": err,
            "before": [i for i, x in enumerate(before) if x],
            "after": [i for i, x in enumerate(after) if x],
            "content": [m[i * PAGE] for i in range(PAGES)],
        }

    out = in_child(child)
    assert out["err"] == 0
    assert out["before"] == []  # shared with the parent until written
    assert out["after"] == [8, 9, 10, 11, 20]
    assert out["content"] == [1] * PAGES  # copied, not changed


def test_apply_skips_a_range_that_is_gone(buffer: Any) -> None:
    """The server's heap may have shrunk since the ranges were recorded."""
    m, addr = buffer
    gone = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    import ctypes

    ref = ctypes.c_char.from_buffer(gone)
    gone_addr = ctypes.addressof(ref)
    del ref
    gone.close()  # unmapped: its range fails
    pf = Prefault.of([(gone_addr, 2 * PAGE), (addr + 30 * PAGE, 2 * PAGE)])
    assert pf is not None

    def child() -> Any:
        return {"err": pf.apply(), "after": [i for i, x in enumerate(_alone(addr, PAGES)) if x]}

    assert in_child(child) == {"err": 0, "after": [30, 31]}


def test_a_large_set_is_not_copied_ahead() -> None:
    assert Prefault.of([(1 << 30, (prefault.MAX_PAGES + 1) * PAGE)]) is None
    assert Prefault.of([]) is None
    assert Prefault.of([(1 << 30, prefault.MAX_PAGES * PAGE)]) is not None


def test_ranges_round_trip() -> None:
    ranges = [(0x7F0000001000, 3 * PAGE), (0x55AA00000000, PAGE)]
    assert prefault.decode(prefault.encode(ranges)) == ranges


def _server_after_test_child(buffer: Any, child_writes: list[int], server_writes: list[int]) -> Any:
    """A fork server's cycle, in a throwaway process: fork a test's child (which writes
    ``child_writes`` and exits), let ``ServerPages`` fork its witness, write
    ``server_writes``, then the next fork's ``before_fork`` learns."""
    import os
    import signal
    import time

    m, addr = buffer

    def server() -> Any:
        sp = prefault.ServerPages()
        sp.START = 1
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the test's child
            for i in child_writes:
                m[i * PAGE] = 3
            os.write(done_w, b"x")
            os._exit(0)
        sp.after_fork()
        witness = sp.witness
        for _ in range(200):  # it stops itself once it has closed its fds
            with open(f"/proc/{witness}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "T":
                break
            time.sleep(0.01)
        fds = os.listdir(f"/proc/{witness}/fd")
        os.read(done_r, 1)
        os.waitpid(pid, 0)
        for i in server_writes:
            m[i * PAGE] = 4
        sp.before_fork()
        gone = not os.path.exists(f"/proc/{witness}")
        learnt = [] if sp.pages is None else [
            [(a - addr) // PAGE, n // PAGE] for a, n in sp.pages.ranges if addr <= a < addr + PAGES * PAGE
        ]
        # The next fork: the learnt pages are copied right after it, the rest shared.
        nxt = os.fork()
        if nxt == 0:
            signal.pause()
            os._exit(0)
        sp.after_fork()
        alone = [i for i, x in enumerate(_alone(addr, PAGES)) if x]
        os.kill(nxt, signal.SIGKILL)
        os.waitpid(nxt, 0)
        return {"state": state, "fds": fds, "gone": gone, "learnt": learnt, "alone": alone,
                "content": [m[i * PAGE] for i in range(PAGES)]}

    return in_child(server)


def test_server_pages_are_what_the_server_wrote_not_its_child(buffer: Any) -> None:
    out = _server_after_test_child(buffer, child_writes=[10, 11, 50], server_writes=[3, 4, 20])
    assert out["state"] == "T"  # the witness is stopped: no handler of the server runs in it
    assert out["fds"] == []  # it holds no pipe of a test open
    assert out["gone"]  # ended once read
    assert out["learnt"] == [[3, 2], [20, 1]]  # the child's copies left it shared with the witness
    assert out["alone"] == [3, 4, 20]  # copied right after the next fork, before any write
    assert out["content"][:5] == [1, 1, 1, 4, 4] and out["content"][10] == 1  # nothing changed


def test_server_pages_close_ends_the_witness(buffer: Any) -> None:
    import os

    def server() -> Any:
        sp = prefault.ServerPages()
        sp.START = 1
        sp.after_fork()
        witness = sp.witness
        alive = os.path.exists(f"/proc/{witness}")
        sp.close()
        return {"alive": alive, "after": os.path.exists(f"/proc/{witness}"), "witness": sp.witness}

    assert in_child(server) == {"alive": True, "after": False, "witness": 0}


def _frames(addr: int, pages: int) -> list[int]:
    """Per page: its physical frame (root reads them from pagemap)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((addr // PAGE) * 8)
        return [e & ((1 << 55) - 1) for e in struct.unpack(f"{pages}Q", f.read(pages * 8))]


def test_server_pages_copies_all_its_pages_once_when_it_learns(buffer: Any) -> None:
    """The compaction: at the learning fork every page of the server is copied (new
    frames, same content), the test's child keeps the old ones; not at later forks."""
    import os
    import signal

    m, addr = buffer

    def server() -> Any:
        sp = prefault.ServerPages()
        sp.START = 2
        kids = []

        def fork_and(step: Any) -> list[int]:
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            kids.append(pid)
            before = _frames(addr, PAGES)
            step()
            after = _frames(addr, PAGES)
            return [i for i in range(PAGES) if before[i] != after[i]]

        first = fork_and(sp.after_fork)  # fork 1: nothing yet
        learning = fork_and(sp.after_fork)  # fork 2 = START: compacts, forks the witness
        sp.close()
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return {"first": first, "learning": learning, "content": [m[i * PAGE] for i in range(PAGES)]}

    out = in_child(server)
    assert out["first"] == []
    assert out["learning"] == list(range(PAGES))
    assert out["content"] == [1] * PAGES


def test_server_pages_survive_a_witness_a_test_killed() -> None:
    """A test may kill any process it sees, and the server's sweep reap it: the next
    fork then learns without it (or not at all) and ends nothing else."""
    import os
    import signal

    def server() -> Any:
        sp = prefault.ServerPages()
        sp.START = 1
        sp.after_fork()
        witness = sp.witness
        os.kill(witness, signal.SIGKILL)
        os.waitpid(witness, 0)  # reaped by someone else first
        sp.before_fork()
        return {"witness": sp.witness, "tries_left": sp._tries}

    assert in_child(server) == {"witness": 0, "tries_left": prefault.LEARN_TRIES - 1}


def _present(addr: int, pages: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((addr // PAGE) * 8)
        return sum(1 for e in struct.unpack(f"{pages}Q", f.read(pages * 8)) if e >> 63 & 1)


def test_start_warmer_fills_new_memory_and_stops_before_a_fork() -> None:
    """A mapping made while the warmer runs is filled without being touched; the first
    fork() stops the thread first, so the child is single-threaded."""
    import ctypes
    import os
    import threading
    import time

    def server() -> Any:
        w = prefault.StartWarmer()
        w.start()
        m = mmap.mmap(-1, 256 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        ref = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(ref)
        for _ in range(200):  # a few of its rounds
            if _present(addr, 256) == 256:
                break
            time.sleep(0.01)
        filled = _present(addr, 256)
        threads_before = threading.active_count()
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(wfd, str(threading.active_count()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        in_child = int(os.read(r, 16))
        del ref
        m.close()
        return {"filled": filled, "threads_before": threads_before, "in_child": in_child,
                "after": threading.active_count()}

    assert in_child(server) == {"filled": 256, "threads_before": 2, "in_child": 1, "after": 1}


def test_start_warmer_stops_by_itself_when_nothing_new_comes() -> None:
    import threading
    import time

    def server() -> Any:
        w = prefault.StartWarmer()
        w.INTERVAL = 0.001
        w.start()
        for _ in range(500):
            if threading.active_count() == 1:
                break
            time.sleep(0.01)
        return threading.active_count()

    assert in_child(server) == 1
