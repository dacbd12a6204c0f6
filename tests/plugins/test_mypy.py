"""pytest-mypy: installed, it must not change isolated runs, with or without xdist.

Its workers read where its results go from ``workerinput``, which its controller fills
only through a hook it registers when pytest-xdist is installed: without xdist every
isolated test failed, ``--mypy`` given or not (the fork server poses as a worker).
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import Runner, outcomes

SUITE = """
    def test_ok():
        pass


    def test_typed() -> None:
        x: int = 1
        assert x == 1
"""

BAD = """
    x: int = "s"
"""


@pytest.mark.parametrize("xdist", [True, False], ids=["with-xdist", "without-xdist"])
@pytest.mark.parametrize("tier", ["process", "jail"])
def test_same_outcomes_installed_or_asked_for(pytester: pytest.Pytester, run: Runner, tier: str, xdist: bool) -> None:
    pytester.makepyfile(test_plain=SUITE, bad=BAD)
    no_xdist = () if xdist else ("-p", "no:xdist")
    for args in ((), ("--mypy",)):
        base = run(None, *no_xdist, *args, plugins=("mypy",))
        iso = run(tier, *no_xdist, *args, plugins=("mypy",))
        assert outcomes(iso) == outcomes(base), iso.stdout.str()
        assert "worker could not start" not in iso.stdout.str()
    # --mypy: the file with the type error fails, as in-process.
    assert outcomes(iso)["bad.py::mypy"] == ["FAILED"]
    assert outcomes(iso)["test_plain.py::test_ok"] == ["PASSED"]
