"""What plugins attach to a report reaches the controller's hooks with its types.

pytest-xdist carries a report's extra attributes with execnet's serializer (sets,
tuples, bytes, non-string keys kept), and plugins made for it rely on that; JSON gave a
set as its repr string and an ``int`` key as a string (pytest-testmon: INTERNALERROR).
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import Runner

CONFTEST = """
    import pytest

    CONFIG = []


    def pytest_configure(config):
        CONFIG.append(config)


    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        rep = yield
        rep.lines = {"mod.py": {3, 1, 2}, "other.py": frozenset({7})}
        rep.pair = (1, "a", (2.5, None))
        rep.by_int = {1: "one", 2: [3, 4], (5, 6): True}
        rep.raw = b"\\x00\\xff"
        rep.plain = {"a": [1, 2.5, None, True], "b": "text"}
        rep.empty = set()
        return rep


    def pytest_runtest_logreport(report):
        if CONFIG[0].pluginmanager.has_plugin("isolate-forkserver"):  # the sandbox's session
            return
        seen = (report.nodeid, report.when, report.lines, report.pair, report.by_int, report.raw,
                report.plain, report.empty)
        with open("seen.txt", "a") as f:
            f.write(repr(seen) + "\\n")
"""

TESTS = """
    def test_pass():
        pass

    def test_fail():
        assert 0
"""


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_extra_attributes_keep_their_types(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_x=TESTS)
    seen = pytester.path / "seen.txt"
    base = run(None)
    expected = seen.read_text()
    seen.unlink()
    iso = run(tier)
    assert iso.ret == base.ret == 1
    assert seen.read_text() == expected, iso.stdout.str()
    assert "{'mod.py': {1, 2, 3}, 'other.py': frozenset({7})}" in expected
    assert expected.count("\n") == 6


MODULE = """
    def add(a, b):
        return a + b


    def mul(a, b):
        return a * b
"""

TESTMON_TESTS = """
    from mod import add, mul


    def test_add():
        assert add(1, 2) == 3


    def test_mul():
        assert mul(2, 3) == 6


    def test_fails():
        assert add(1, 1) == 3
"""


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_testmon_selects_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    """pytest-testmon files each test's covered lines on its report and selects the
    next run's tests from them: the same selection isolated, run after run."""
    pytester.makepyfile(mod=MODULE, test_m=TESTMON_TESTS)

    def three_runs(tier: str | None) -> list[str]:
        for db in pytester.path.glob(".testmondata*"):
            db.unlink()
        lines = []
        for change in (None, None, ("a * b", "b * a")):
            if change is not None:
                mod = pytester.path / "mod.py"
                mod.write_text(mod.read_text().replace(*change))
            result = run(tier, "--testmon", plugins=("pytest-testmon",))
            assert "INTERNALERROR" not in result.stdout.str(), result.stdout.str()
            lines.append(result.parseoutcomes())
        (pytester.path / "mod.py").write_text(pytester.path.joinpath("mod.py").read_text().replace("b * a", "a * b"))
        return lines

    base = three_runs(None)
    assert base[0] == {"passed": 2, "failed": 1} and base[1].get("deselected") == 2, base
    assert three_runs(tier) == base
