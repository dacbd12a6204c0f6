"""A guest's server runs the code the controller rewrote, instead of rewriting it again.

Under ``PYTHONDONTWRITEBYTECODE`` (or with a site-packages nobody may write) pytest
keeps no rewritten copy on disk, and the guest sees the host's files read-only: its
server used to parse and rewrite every plugin, conftest and test module once more on the
guest's one CPU (~1.2 s of a guest's start with this repository's test venv). Here each
kind of module the controller rewrites is checked: a plugin loaded before this one
(``-p``, rewritten again on the controller's thread), a conftest and a module
registered with ``register_assert_rewrite`` (kept as rewritten), and a test module
(written while the controller collects). The guest must rewrite none of them, and run
them as rewritten code: a failing assert in each shows pytest's introspection.
"""

from __future__ import annotations

import textwrap

import pytest

#: Loaded first (``-p counter``): records every module pytest's rewriter is asked for
#: in this process.
COUNTER = textwrap.dedent(
    """
    from _pytest.assertion import rewrite

    SEEN = []
    _orig = rewrite._rewrite_test

    def _counted(fn, config):
        SEEN.append(fn.name)
        return _orig(fn, config)

    rewrite._rewrite_test = _counted
    """
)

TEST = textwrap.dedent(
    """
    import os

    import counter
    import helpers
    import myplug

    MINE = {"conftest.py", "helpers.py", "myplug.py", "test_rw.py"}

    def test_rewritten_here():
        expected = set(filter(None, os.environ["ISOLATE_EXPECT_REWRITTEN"].split(",")))
        assert MINE & set(counter.SEEN) == expected

    def test_plugin_assert():
        myplug.check(1, 2)

    def test_helper_assert():
        helpers.check([1, 2], [1, 3])

    def test_own_assert():
        x = 3
        assert x == 4
    """
)


def _run(pytester: pytest.Pytester, tier: str, expect: str, monkeypatch: pytest.MonkeyPatch) -> pytest.RunResult:
    monkeypatch.setenv("ISOLATE_EXPECT_REWRITTEN", expect)
    return pytester.runpytest_subprocess(
        f"--isolate={tier}",
        "-p",
        "counter",
        "-p",
        "myplug",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-p",
        "no:rerunfailures",
        "-o",
        "isolate_on_escape=ignore",
        timeout=300,
    )


def test_guest_runs_the_controllers_rewritten_code(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    pytester.makepyfile(
        counter=COUNTER,
        myplug="def check(a, b):\n    assert a == b\n",
        helpers="def check(a, b):\n    assert a == b\n",
        test_rw=TEST,
    )
    pytester.makeconftest('import pytest\n\npytest.register_assert_rewrite("helpers")\n')
    introspection = [
        "*def check(a, b):",
        ">       assert a == b",
        "E       assert 1 == 2",
        "*myplug.py:2: AssertionError",
        "*def check(a, b):",
        ">       assert a == b",
        "E       assert [1, 2] == [1, 3]",
        "*helpers.py:2: AssertionError",
        "*def test_own_assert():",
        "E       assert 3 == 4",
        "*test_rw.py:*: AssertionError",
    ]

    # In-process: pytest rewrites all four (no cached copy on disk), which shows that
    # the counter sees what it should.
    inproc = _run(pytester, "none", "conftest.py,helpers.py,myplug.py,test_rw.py", monkeypatch)
    inproc.assert_outcomes(passed=1, failed=3)
    inproc.stdout.fnmatch_lines(introspection, consecutive=False)
    assert not list(pytester.path.rglob("*-pytest-*.pyc"))  # nothing cached on disk

    guest = _run(pytester, "uml", "", monkeypatch)
    guest.assert_outcomes(passed=1, failed=3)
    guest.stdout.fnmatch_lines(introspection, consecutive=False)
    assert not list(pytester.path.rglob("*-pytest-*.pyc"))
