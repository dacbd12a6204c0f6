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
