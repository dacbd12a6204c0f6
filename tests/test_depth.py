"""A test gets the recursion budget it has in-process (``child.match_depth``).

A sandbox's child runs the test's protocol ~25–30 frames deeper than pytest does
in-process (the fork server's loop, the tier's fork, the stem below them). Before
``match_depth`` structlog's ``test_recursive`` (it recurses until ``RecursionError`` and
asserts it got more than 950 frames) failed at every tier with 935, and a test that sets
a low limit (``sys.setrecursionlimit(60)``) raised ``RecursionError`` at once. The same
inner suite runs in-process and at each tier.
"""

from __future__ import annotations

import re

import pytest

INNER = """
import sys


def _room():
    n = 0

    def down():
        nonlocal n
        n += 1
        down()

    try:
        down()
    except RecursionError:
        pass
    return n


def test_room():
    print(f"ROOM {_room()} LIMIT {sys.getrecursionlimit()}")


def test_a_low_limit():
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(60)  # above the in-process depth, below the child's real one
    try:
        assert sys.getrecursionlimit() == 60
    finally:
        sys.setrecursionlimit(old)
    assert sys.getrecursionlimit() == old
"""


def _room(result: pytest.RunResult) -> tuple[int, int]:
    m = re.search(r"ROOM (\d+) LIMIT (\d+)", result.stdout.str())
    assert m, result.stdout.str()
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("tier", ["process", "chroot", "jail", "zone", "uml"])
def test_the_recursion_budget_is_the_in_process_one(pytester: pytest.Pytester, tier: str) -> None:
    pytester.makepyfile(test_depth_inner=INNER)
    args = ("-rP", "-p", "no:randomly", "-p", "no:cacheprovider")
    base = pytester.runpytest_subprocess("--isolate=none", *args)
    base.assert_outcomes(passed=2)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", *args)
    result.assert_outcomes(passed=2)
    (room, limit), (base_room, base_limit) = _room(result), _room(base)
    assert limit == base_limit
    # Python frames are matched exactly; calls entered from C code (a class's
    # __init__, exec) count too and differ by a few between the two stacks.
    assert abs(room - base_room) <= 5, (room, base_room)
