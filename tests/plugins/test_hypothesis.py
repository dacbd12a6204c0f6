"""hypothesis: a failure found isolated is replayed first on the next run, as in-process.

hypothesis saves failing examples in its example database (``.hypothesis/examples``)
and replays them before searching. Isolated at `chroot` and up the sandbox's writes were
thrown away (and reported as a blocked escape), so the next run searched afresh.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import TIERS, Runner

SUITE = """
    from hypothesis import given, strategies as st

    @given(st.integers(min_value=0, max_value=10**9))
    def test_small(x):
        print("CALL", x)
        assert x < 1000
"""


def calls(res: pytest.RunResult) -> int:
    return sum(line.startswith("CALL") for line in res.outlines)


@pytest.mark.parametrize("tier", TIERS)
def test_failure_found_isolated_is_replayed(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(test_h=SUITE)
    # hypothesis's "ci" profile (loaded when $CI is set, as in this suite's CI) keeps no
    # database: the suite asks for the one a developer's run has.
    pytester.makeconftest("from hypothesis import settings\n\nsettings.load_profile('default')\n")
    first = run(tier, "-s", plugins=("hypothesispytest",))
    first.assert_outcomes(failed=1)
    assert calls(first) > 3, first.stdout.str()  # a search, then the shrinking to 1000
    assert "escape" not in first.stdout.str().lower(), first.stdout.str()
    assert list((pytester.path / ".hypothesis" / "examples").iterdir())
    for again in (run(None, "-s", plugins=("hypothesispytest",)), run(tier, "-s", plugins=("hypothesispytest",))):
        again.assert_outcomes(failed=1)
        again.stdout.fnmatch_lines(["*x=1000*"])
        assert calls(again) <= 3, again.stdout.str()  # the saved example, first
