"""flaky: the same reruns, outcomes and "Flaky Test Report" isolated as in-process.

flaky reruns a test inside the process the test runs in, and writes every attempt to
a report its terminal summary prints. Isolated, the reruns happened as in-process but
the report stayed in the sandbox: the summary printed an empty one.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    import os
    from flaky import flaky

    HERE = os.path.dirname(__file__)

    def attempts(name):
        # Counted in a file: each attempt is a new call (and, isolated, the same sandbox).
        p = os.path.join(HERE, name)
        n = int(open(p).read()) if os.path.exists(p) else 0
        open(p, "w").write(str(n + 1))
        return n

    @flaky(max_runs=3, min_passes=1)
    def test_second_attempt_passes():
        assert attempts("second") >= 1

    @flaky(max_runs=2, min_passes=1)
    def test_always_fails():
        assert False, "never"

    @flaky(max_runs=3, min_passes=2)
    def test_two_passes_needed():
        pass

    def test_plain():
        pass
"""


def report(res: pytest.RunResult) -> list[str]:
    """The lines of flaky's report, as its summary printed them."""
    lines = res.outlines
    start = lines.index("===Flaky Test Report===")
    return lines[start : lines.index("===End Flaky Test Report===", start) + 1]


def run_both(pytester: pytest.Pytester, run: Runner, tier: str, *args: str) -> tuple[pytest.RunResult, ...]:
    pytester.makepyfile(test_f=SUITE)
    base = run(None, *args, plugins=("flaky",))
    (pytester.path / "second").unlink()  # the isolated run counts its attempts afresh
    iso = run(tier, *args, plugins=("flaky",))
    return base, iso


@pytest.mark.parametrize("tier", TIERS)
def test_flaky_same_outcomes_and_report(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    base, iso = run_both(pytester, run, tier, "-p", "no:randomly")
    assert outcomes(iso) == outcomes(base) == {
        "test_f.py::test_second_attempt_passes": ["PASSED"],
        "test_f.py::test_always_fails": ["FAILED"],
        "test_f.py::test_two_passes_needed": ["PASSED"],
        "test_f.py::test_plain": ["PASSED"],
    }, iso.stdout.str()
    # Tracebacks name the process's frames (addresses, runner paths): compare the rest.
    shown = [line for line in report(base) if "TracebackEntry" not in line]
    assert [line for line in report(iso) if "TracebackEntry" not in line] == shown, iso.stdout.str()
    assert "test_second_attempt_passes failed (2 runs remaining out of 3)." in shown
    assert "test_two_passes_needed passed 2 out of the required 2 times. Success!" in shown


def test_flaky_report_under_xdist(pytester: pytest.Pytester, run: Runner) -> None:
    """Each xdist worker gathers its sandboxes' report, and flaky sends it to the
    controller at the worker's end, as in-process."""
    base, iso = run_both(pytester, run, "process", "-p", "xdist", "-n", "2")
    for res in (base, iso):
        res.assert_outcomes(passed=3, failed=1)
        shown = report(res)
        assert "test_second_attempt_passes passed 1 out of the required 1 times. Success!" in shown, res.stdout.str()
        assert "test_always_fails failed; it passed 0 out of the required 1 times." in shown
