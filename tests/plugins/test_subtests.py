"""pytest 9's subtests: the same outcomes isolated as in-process.

A subtest's report is logged in the test's process while the test runs, and pytest
fails a passed test whose subtests failed when the terminal reporter asks
``pytest_report_teststatus`` about its report, from a count kept in that process.
"""

from __future__ import annotations

import re

import pytest

from tests.plugins.conftest import Runner

SUBTESTS = """
    def test_parts(subtests):
        for i in range(4):
            with subtests.test(msg="part", i=i):
                assert i % 2 == 0

    def test_plain():
        pass

    def test_all_pass_one_skips(subtests):
        import pytest
        for i in range(3):
            with subtests.test(i=i):
                if i == 2:
                    pytest.skip("not this one")
"""


def summary(result: pytest.RunResult) -> list[str]:
    """The ``-rA`` lines, subtests' included, in order."""
    return [line for line in result.outlines if re.match(r"(SUB)?(PASSED|FAILED|ERROR) ", line)]


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_subtests_with_bdd_loaded(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """pytest 9's subtest reports are dataclasses (unhashable): looking one up in
    pytest-bdd's registry raised into the test, which failed isolated only."""
    pytester.makepyfile(test_parts=SUBTESTS)
    base = run(None, "-rA", plugins=("pytest-bdd",))
    iso = run(tier, "-rA", plugins=("pytest-bdd",))
    assert summary(base) == summary(iso), iso.stdout.str()
    assert "TypeError" not in iso.stdout.str()
    iso.stdout.fnmatch_lines(
        [
            "SUBFAILED*test_parts.py::test_parts*",
            "*3 failed, 2 passed, 1 skipped, 4 subtests passed*",
        ]
    )


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_failed_subtests_fail_their_test(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """pytest 9 fails a passed test with failed subtests when the terminal reporter asks
    ``pytest_report_teststatus`` about its report, with a count kept in the process the
    test ran in: in a sandbox, so it must be asked there too (it was not: PASSED)."""
    pytester.makepyfile(test_parts=SUBTESTS)
    base = run(None, "-rA")
    iso = run(tier, "-rA")
    assert summary(base) == summary(iso), iso.stdout.str()
    iso.stdout.fnmatch_lines(["FAILED test_parts.py::test_parts - contains 2 failed subtests"])
    assert iso.ret == base.ret == 1
