"""pytest-mypy: installed, it must not change isolated runs, with or without xdist.

Its workers read where its results go from ``workerinput``, which its controller fills
only through a hook it registers when pytest-xdist is installed: without xdist every
isolated test failed, ``--mypy`` given or not (the fork server poses as a worker).
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from tests.conftest import OPTIONAL_PLUGINS
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


#: Counts mypy's runs: one file each in mypy's own cache dir, where its writes go.
COUNTING_CONFTEST = """
    import os
    import uuid

    import pytest_mypy

    _run = pytest_mypy.MypyResults.from_mypy.__func__  # type: ignore


    def _counted(cls, *args, **kwargs):
        results = _run(cls, *args, **kwargs)
        with open(os.path.join(".mypy_cache", f"run-{uuid.uuid4().hex}"), "w") as f:
            f.write("run\\n")
        return results


    pytest_mypy.MypyResults.from_mypy = classmethod(_counted)  # type: ignore
"""


@pytest.mark.parametrize("tier", ["none", "chroot", "jail"])
def test_mypy_runs_once_and_reports_as_in_process(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, h: Any, tier: str
) -> None:
    """In-process the first ``--mypy`` item runs mypy for the session, writes its cache
    into ``.mypy_cache`` and its results into a file of ``/tmp``; the later items and
    the "mypy" summary section read that file. From ``chroot`` up both stayed in the
    first item's sandbox: each later item ran mypy again, warned of a blocked
    ``write-host-file`` into ``.mypy_cache`` (in a project outside /tmp, where real
    ones live), and the summary section was missing."""
    files = {"pytest.ini": "[pytest]\n", "calc.py": CALC, "test_calc.py": CALC_TESTS, "conftest.py": COUNTING_CONFTEST}
    files = {k: textwrap.dedent(v) for k, v in files.items()}
    with h.home_project("mypy", files) as d:
        monkeypatch.chdir(d)  # mypy's cache is below the working directory
        monkeypatch.setenv("PYTEST_ADDOPTS", " ".join(f"-p no:{p}" for p in OPTIONAL_PLUGINS if p != "mypy"))
        monkeypatch.setenv("PY_COLORS", "0")
        args = ("-p", "no:cacheprovider", "--mypy")
        result = pytester.runpytest_subprocess(str(d), f"--isolate={tier}", *args, timeout=180)
        result.assert_outcomes(passed=6)
        result.stdout.fnmatch_lines(["*= mypy =*", "Success: no issues found in 3 source files"])
        result.stdout.no_fnmatch_line("*escape*")
        result.stdout.no_fnmatch_line("*warning*")
        assert len(list((d / ".mypy_cache").glob("run-*"))) == 1, "mypy ran once, its cache reached the project"
        assert list((d / ".mypy_cache").glob("*/cache*")), sorted((d / ".mypy_cache").rglob("*"))


CALC = """
    def add(a: int, b: int) -> int:
        return a + b
"""

CALC_TESTS = """
    from calc import add


    def test_add() -> None:
        assert add(1, 2) == 3


    def test_two() -> None:
        assert add(2, 2) == 4
"""
