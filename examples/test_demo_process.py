"""process tier: every test runs in a fresh process forked from a warm worker.

Nothing else is confined: same files, network, users and kernel as the host. What a
test changes in memory (module globals, monkeypatched modules, a crashed interpreter)
dies with its process, and what it started is killed and reported when it ends.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time

import pytest

pytestmark = pytest.mark.isolate("process")

_SEEN: list[int] = []


def test_module_state_does_not_leak_a() -> None:
    _SEEN.append(os.getpid())
    assert _SEEN == [os.getpid()]


def test_module_state_does_not_leak_b() -> None:
    # test_..._a appended to _SEEN in its own process: this one starts from the module
    # as it was collected, whatever ran before (in-process, this would fail).
    assert _SEEN == []


@pytest.mark.isolate(allow=["daemon"])  # expected here: reported, marked allowed, not failed
def test_leftover_process_is_killed_and_reported() -> None:
    # Forgotten on purpose; it is killed when the test ends, so it cannot disturb the
    # next test, and the report lists it under "leftovers" and as a "daemon" escape.
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    print(f"started pid {child.pid} and left it running")


def test_fails_on_purpose_segfault() -> None:
    # Reads address 0: SIGSEGV. In-process this would end the whole pytest run; here
    # only this test fails, with the signal and the Python stack in its report.
    ctypes.string_at(0)


@pytest.mark.isolate(timeout="1s")  # the closest marker wins key by key: still "process"
def test_fails_on_purpose_timeout() -> None:
    # Killed after 1 s; the report shows where it was stuck.
    time.sleep(60)
