"""pytest-check: a test's failed checks are reported as in-process.

pytest-check collects the failed checks of a test and makes its failure repr at
``pytest_runtest_makereport``, in the sandbox. When the test raised too, the repr is a
chain whose crash line (the short summary's message, junit's ``message``) pytest-check
sets to the first failed check; pytest rebuilds a chain from its links alone, so
isolated the summary named the exception raised after the checks instead.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

TESTS = """
    import pytest
    from pytest_check import check as check_ctx

    def test_checks_then_raises(check):
        check.equal(1, 2, "first check")
        assert 3 == 4

    def test_checks_only(check):
        check.is_true(False, "only check")

    def test_context_then_raises():
        with check_ctx:
            assert 1 == 0, "in a with"
        raise ValueError("after the checks")

    def test_raises_only():
        assert 5 == 6

    def test_passes(check):
        check.equal(1, 1)
"""

SUMMARY = [
    "FAILED test_chk.py::test_checks_then_raises - check 1 == 2: first check",
    "FAILED test_chk.py::test_checks_only - check bool(False): only check",
    "FAILED test_chk.py::test_context_then_raises - in a with",
    "FAILED test_chk.py::test_raises_only - assert 5 == 6",
    "*= 4 failed, 1 passed in *",
]


@pytest.mark.parametrize("tier", [None, *TIERS])
def test_a_failed_checks_summary_line_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str | None) -> None:
    pytest.importorskip("pytest_check")
    pytester.makepyfile(test_chk=TESTS)
    result = run(tier, "-rf", "--junitxml=out.xml", plugins=("check",))
    # In order, not consecutive: on CI (``CI`` set) pytest prints each message whole,
    # and a check's message has more lines (where the check failed).
    result.stdout.fnmatch_lines(SUMMARY)
    assert outcomes(result)["test_chk.py::test_checks_then_raises"] == ["FAILED"]
    xml = (pytester.path / "out.xml").read_text()
    assert '<failure message="check 1 == 2: first check' in xml
    assert '<failure message="in a with' in xml
