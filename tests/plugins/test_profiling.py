"""pytest-profiling: each test's profile is the test's own, as in-process.

Its wrapper around a test's protocol ran in the controller, around the wait for the
sandbox: the profiles showed pytest-isolate waiting, and the sandbox's own (at
`process` written to the same file, from `chroot` up thrown away) was replaced.
"""

from __future__ import annotations

import pstats

import pytest

from tests.plugins.conftest import TIERS, Runner, outcomes

SUITE = """
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def test_fib():
        assert fib(15) == 610

    def test_other():
        assert fib(10) == 55

    def test_fails():
        assert fib(5) == 0
"""


def _calls(path, name: str) -> int:  # type: ignore[no-untyped-def]
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    return sum(v[1] for k, v in stats.items() if k[2] == name)


@pytest.mark.parametrize("tier", TIERS)
def test_profiles_are_the_tests(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_p=SUITE)
    seen = {}
    for t in (None, tier):
        prof = pytester.path / "prof"
        result = run(t, "--profile", "-p", "no:randomly", plugins=("profiling",))
        assert outcomes(result) == {
            "test_p.py::test_fib": ["PASSED"], "test_p.py::test_other": ["PASSED"], "test_p.py::test_fails": ["FAILED"],
        }, result.stdout.str()
        result.stdout.fnmatch_lines(["Profiling (from */prof/combined.prof):"])
        seen[t] = {
            "fib": _calls(prof / "test_fib.prof", "fib"),
            "other": _calls(prof / "test_other.prof", "fib"),
            "combined": _calls(prof / "combined.prof", "fib"),
        }
        for p in prof.iterdir():
            p.unlink()
    # fib(15) makes 1,973 calls, fib(10) 177, fib(5) 15: the tests' own work, as in-process.
    assert seen[None] == seen[tier] == {"fib": 1973, "other": 177, "combined": 1973 + 177 + 15}, seen


def test_a_sandboxs_statistics_are_checked() -> None:
    """What a sandbox sends is untrusted: only pstats' own shapes are written, under a
    plain ``.prof`` name in the profile directory."""
    from pytest_isolate.session import profiling

    good = [[["m.py", 1, "f"], [1, 1, 0.5, 0.5, [[["m.py", 9, "g"], [1, 1, 0.5, 0.5]]]]]]
    assert profiling._stats(good) == {("m.py", 1, "f"): (1, 1, 0.5, 0.5, {("m.py", 9, "g"): (1, 1, 0.5, 0.5)})}
    bad = [
        "x", [["m.py", 1, "f"]], [[["m.py", "1", "f"], [1, 1, 0.5, 0.5, []]]],
        [[["m.py", 1, "f"], [1, 1, float("nan"), 0.5, []]]], [[["m.py", 1, "f"], [-1, 1, 0.5, 0.5, []]]],
        [[["m.py", 1, "f"], [True, 1, 0.5, 0.5, []]]], [[["m.py", 1, "f"], [1, 1, 0.5, 0.5, [["x", [1]]]]]],
        [[["m.py", 1, "f"], [1, 1, 0.5, 0.5, []]]] * (profiling._MAX_ENTRIES + 1),
    ]
    assert [profiling._stats(b) for b in bad] == [None] * len(bad)
    assert profiling._plain_name("test_x.prof")
    assert not any(profiling._plain_name(n) for n in ("../x.prof", "a/x.prof", ".x.prof", "x.txt", "", None))
