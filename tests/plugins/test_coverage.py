"""pytest-cov: the same percentages and reports isolated as in-process.

Lines that only tests run are the ones a sandbox must carry back: without that, a
module's body shows as covered (the controller imported it while collecting) and every
line inside its functions as missed.
"""

from __future__ import annotations

import json

import pytest

from tests.plugins.conftest import TIERS, Runner

PROJECT = {
    "src/calc.py": """
        def sign(x):
            if x > 0:
                return 1
            if x < 0:
                return -1
            return 0


        def unused():
            return "never called"
    """,
    "tests/test_calc.py": """
        import pytest
        import calc

        def test_pos():
            assert calc.sign(5) == 1

        def test_neg():
            assert calc.sign(-5) == -1

        @pytest.mark.no_cover
        def test_zero_not_counted():
            assert calc.sign(0) == 0
    """,
    "pyproject.toml": """
        [tool.pytest.ini_options]
        pythonpath = ["src"]
        testpaths = ["tests"]
        filterwarnings = ["error"]
    """,
}


def _write(pytester: pytest.Pytester) -> None:
    import textwrap

    for name, text in PROJECT.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def _report(pytester: pytest.Pytester, run: Runner, tier: str | None, *extra: str) -> tuple[dict, str]:
    result = run(tier, "--cov=src", "--cov-branch", "--cov-report=term-missing", "--cov-report=json:cov.json",
                 "--cov-report=xml:cov.xml", "--cov-report=html:htmlcov", *extra, plugins=("pytest_cov",))
    assert result.ret == 0, result.stdout.str()
    data = json.loads((pytester.path / "cov.json").read_text())
    assert (pytester.path / "cov.xml").exists()
    total = data["totals"]["percent_covered_display"]
    assert f"{total}%" in (pytester.path / "htmlcov" / "index.html").read_text()
    return data["files"]["src/calc.py"], result.stdout.str()


@pytest.mark.parametrize("tier", TIERS)
def test_same_coverage_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    _write(pytester)
    base, _ = _report(pytester, run, None)
    iso, out = _report(pytester, run, tier)
    assert "INTERNALERROR" not in out
    # Inside sign(): the lines of the two tests counted, the no_cover test's return 0 not.
    assert base["missing_lines"] == [6, 10]
    assert iso["missing_lines"] == base["missing_lines"]
    assert iso["executed_branches"] == base["executed_branches"]
    assert iso["summary"] == base["summary"]
    assert f"tests per tier: {tier} 3" in out


def test_same_coverage_under_xdist(pytester: pytest.Pytester, run: Runner) -> None:
    _write(pytester)
    base, _ = _report(pytester, run, None)
    iso, out = _report(pytester, run, "process", "-n", "2")
    assert iso["missing_lines"] == base["missing_lines"] == [6, 10]
    assert iso["summary"] == base["summary"]


def test_cov_context_test(pytester: pytest.Pytester, run: Runner) -> None:
    """``--cov-context=test`` names each test's lines by the test, inside sandboxes too."""
    _write(pytester)
    run("jail", "--cov=src", "--cov-context=test", "--cov-report=", plugins=("pytest_cov",))
    import sqlite3

    con = sqlite3.connect(pytester.path / ".coverage")
    contexts = {row[0] for row in con.execute("select context from context")}
    con.close()
    assert "tests/test_calc.py::test_pos|run" in contexts
    assert "tests/test_calc.py::test_neg|run" in contexts


def test_same_coverage_in_a_uml_guest(pytester: pytest.Pytester, run: Runner) -> None:
    """Another kernel: the guest's lines come back over the guest's channel."""
    _write(pytester)
    base, _ = _report(pytester, run, None)
    iso, out = _report(pytester, run, "uml")
    assert iso["missing_lines"] == base["missing_lines"] == [6, 10]
    assert iso["summary"] == base["summary"]
    assert "tests per tier: uml 3" in out


PREIMPORTED = {
    # Loaded with -p, before pytest-cov starts coverage (as pytest imports iniconfig).
    "early.py": """
        def double(x):
            return 2 * x
    """,
    "tests/test_early.py": """
        import early

        def test_double():
            assert early.double(2) == 4
    """,
    "pyproject.toml": """
        [tool.pytest.ini_options]
        testpaths = ["tests"]
    """,
}


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_no_coverage_warnings_of_the_controllers_own(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """Every test runs in a sandbox, so the controller's own coverage measures none of
    the package it imported before coverage started: coverage.py would warn that it was
    "previously imported, but not measured" and that no data was collected, where
    in-process pytest (and pytest-xdist) warn of nothing. The same percentage, no warning."""
    import textwrap

    for name, text in PREIMPORTED.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    args = ("-p", "early", "--cov=early", "--cov-report=term", "--cov-report=json:cov.json")
    base = run(None, *args, plugins=("pytest_cov",))
    base_total = json.loads((pytester.path / "cov.json").read_text())["totals"]
    iso = run(tier, *args, plugins=("pytest_cov",))
    iso_total = json.loads((pytester.path / "cov.json").read_text())["totals"]
    assert base.ret == iso.ret == 0, iso.stdout.str()
    assert iso_total == base_total
    assert "CoverageWarning" not in base.stdout.str() + base.stderr.str()
    assert "CoverageWarning" not in iso.stdout.str() + iso.stderr.str(), iso.stdout.str() + iso.stderr.str()


DECIDED = {
    # All imported at collection, so the fork server decides on them ahead of the tests
    # (session/coverage.py, _decide_ahead); each decision must be coverage's own.
    "pkg/__init__.py": "",
    "pkg/calc.py": """
        def half(x):
            if x % 2:
                return None
            return x // 2
    """,
    "pkg/vendored.py": """
        def skipped(x):
            return x
    """,
    "other/helper.py": """
        def outside(x):
            return x + 1
    """,
    "tests/test_pkg.py": """
        import helper
        from pkg import calc, vendored

        def test_half():
            assert calc.half(4) == 2

        def test_others():
            assert vendored.skipped(1) == 1
            assert helper.outside(1) == 2
    """,
    "pyproject.toml": """
        [tool.pytest.ini_options]
        pythonpath = [".", "other"]
        testpaths = ["tests"]

        [tool.coverage.run]
        source_pkgs = ["pkg"]
        omit = ["*/vendored.py"]
    """,
}


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_files_decided_ahead_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """``source_pkgs`` and ``omit`` decide which files a sandbox traces as they do
    in-process: the package's module measured line by line, the omitted one and the
    module outside the package not at all."""
    import textwrap

    for name, text in DECIDED.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    args = ("--cov", "--cov-report=json:cov.json")
    base = run(None, *args, plugins=("pytest_cov",))
    base_files = json.loads((pytester.path / "cov.json").read_text())["files"]
    iso = run(tier, *args, plugins=("pytest_cov",))
    iso_files = json.loads((pytester.path / "cov.json").read_text())["files"]
    assert base.ret == iso.ret == 0, iso.stdout.str()
    assert sorted(base_files) == sorted(iso_files) == ["pkg/__init__.py", "pkg/calc.py"]
    assert base_files["pkg/calc.py"]["missing_lines"] == [3]
    assert iso_files["pkg/calc.py"]["missing_lines"] == [3]
    assert iso_files["pkg/calc.py"]["summary"] == base_files["pkg/calc.py"]["summary"]
