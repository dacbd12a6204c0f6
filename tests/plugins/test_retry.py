"""pytest-retry: the same retries, outcomes and retry report isolated as in-process.

In any session with ``workerinput`` (the fork server's) pytest-retry looked for the
port of a report server only a pytest-xdist controller starts: every isolated test
failed with "isolated worker could not start: KeyError: 'server_port'".
"""

from __future__ import annotations

import re

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import pytest

    @pytest.mark.flaky(retries=2)
    def test_second_time(tmp_path_factory):
        marker = tmp_path_factory.getbasetemp() / "attempted"
        if not marker.exists():
            marker.write_text("1")
            assert False, "first attempt"
        marker.unlink()

    @pytest.mark.flaky(retries=1)
    def test_always():
        assert False

    def test_ok():
        pass
"""


def retry_report(result: pytest.RunResult) -> list[str]:
    out = result.stdout.str()
    start = out.index("the following tests were retried")
    return out[start : out.index("end of test retry report")].splitlines()


@pytest.mark.parametrize("tier", TIERS)
def test_retries_and_report_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_retry=SUITE)
    base = run(None, plugins=("pytest-retry",))
    iso = run(tier, plugins=("pytest-retry",))
    assert outcomes(iso) == outcomes(base), iso.stdout.str()
    assert re.sub(r"\d+\.\d+s", "", iso.stdout.lines[-1]) == re.sub(r"\d+\.\d+s", "", base.stdout.lines[-1])
    assert "could not start" not in iso.stdout.str()
    assert retry_report(iso) == retry_report(base)
    iso.stdout.fnmatch_lines(["*test_second_time passed on attempt 2!*", "*test_always failed after 2 attempts!*"])


def test_retries_under_xdist(pytester: pytest.Pytester, run: Runner) -> None:
    """Under pytest-xdist the sandboxes report to its controller's server, as workers do."""
    pytester.makepyfile(test_retry=SUITE)
    result = run("jail", "-n", "2", plugins=("pytest-retry",))
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_second_time passed on attempt 2!*"])
