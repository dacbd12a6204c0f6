"""The plugin freezes its processes' heaps (``frozen.py``); the tests and plugins never see it.

CPython's gc introspection skips frozen objects, so before ``frozen.hide`` a test asking
``gc.get_referrers`` for an object held by its module's globals found none, and
hypothesis (its ``register_random`` asks) warned in the controller's terminal summary,
an error under ``filterwarnings=error`` that ended the run with a traceback (anyio's
suite); and a cycle made at collection that a test let go stayed after its
``gc.collect()``. The same inner suite runs in-process and at each tier: outcomes must
match.
"""

from __future__ import annotations

import pytest

INNER = """
import gc
import weakref

import pytest


class Thing:
    pass


THING = Thing()


def _as_in_process():
    refs = gc.get_referrers(THING)
    assert any(isinstance(r, dict) and r.get("THING") is THING for r in refs), len(refs)
    assert gc.get_freeze_count() == 0
    assert any(o is THING for o in gc.get_objects())


def test_referrers():
    _as_in_process()


@pytest.mark.isolate("none")
def test_referrers_in_the_controller():
    _as_in_process()


class Node:
    pass


CYCLE = Node()
CYCLE.me = CYCLE
CYCLE_REF = weakref.ref(CYCLE)


def test_a_cycle_made_before_the_fork_is_collected():
    global CYCLE
    del CYCLE
    gc.collect()
    assert CYCLE_REF() is None


def test_a_tests_own_freeze():
    gc.freeze()
    n = gc.get_freeze_count()
    gc.unfreeze()
    assert 0 < n < len(gc.get_objects()) + 1 and gc.get_freeze_count() == 0
"""

CONFTEST = """
import gc


def pytest_terminal_summary(terminalreporter):
    import test_heap_inner

    refs = gc.get_referrers(test_heap_inner.THING)
    found = sum(1 for r in refs if isinstance(r, dict) and "THING" in r)
    terminalreporter.write_line(f"referrers at the summary: {found}")
"""


@pytest.mark.parametrize("tier", ["none", "process", "chroot", "jail", "zone"])
def test_gc_sees_the_heap_a_test_would_in_process(pytester: pytest.Pytester, tier: str) -> None:
    pytester.makepyfile(test_heap_inner=INNER)
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", "--isolate-on-escape=warn", "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["referrers at the summary: 1"])
