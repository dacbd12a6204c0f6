"""Failures shown by a repr of their own (a doctest's, a plugin's ``repr_failure``)
print as in-process: their blank lines kept, and no message on the short summary line.

pytest serializes such a repr as its stripped text, and a string longrepr is a message:
isolated, ``FAILED mod.py::mod.f - 002`` stood where in-process the line ends after the
node id, and sybil's and others' blank lines were gone.
"""

from __future__ import annotations

import re

import pytest

from tests.plugins.conftest import Runner

MODULE = '''
    def f():
        """
        >>> 1 + 1
        3
        """
'''

CONFTEST = """
    import pytest
    from _pytest._code.code import TerminalRepr


    class Framed(TerminalRepr):
        def toterminal(self, tw):
            tw.line("")
            tw.line("  expected: 1")
            tw.line("")
            tw.line("  got:      2")
            tw.line("")


    class Check(pytest.Item):
        def runtest(self):
            raise AssertionError("differs")

        def repr_failure(self, excinfo):
            return Framed()

        def reportinfo(self):
            return self.path, 0, "check"


    class CheckFile(pytest.File):
        def collect(self):
            yield Check.from_parent(self, name="check")


    def pytest_collect_file(file_path, parent):
        if file_path.suffix == ".chk":
            return CheckFile.from_parent(parent, path=file_path)
"""


def _shown(result: pytest.RunResult) -> list[str]:
    """The failures section and the short summary, timings masked."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "= FAILURES =" in line or "= ERRORS =" in line)
    end = next(i for i, line in enumerate(lines) if re.match(r"=+ \d+ (failed|error)", line))
    out, ours = [], False
    for line in lines[start:end]:
        if line.startswith("="):
            ours = "= isolation =" in line
        if not ours:
            out.append(line)
    return out


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_doctest_and_plugin_reprs_print_as_in_process(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makepyfile(mod=MODULE)
    pytester.makeconftest(CONFTEST)
    pytester.path.joinpath("a.chk").write_text("1\n")
    base = run(None, "-rA", "--doctest-modules")
    iso = run(tier, "-rA", "--doctest-modules")
    assert _shown(iso) == _shown(base), iso.stdout.str()
    # What the fix is about, as in-process: no message after the node ids, and the
    # plugin's repr with its blank lines.
    assert "FAILED mod.py::mod.f" in _shown(iso) and "FAILED a.chk::check" in _shown(iso)
    text = "\n".join(_shown(iso))
    assert "\n\n  expected: 1\n\n  got:      2\n" in text, text


INTERACT_CONFTEST = """
    def pytest_exception_interact(node, call, report):
        report.longrepr = "replaced in pytest_exception_interact"
"""

INTERACT_SUITE = """
    import pytest

    @pytest.fixture
    def bad():
        raise RuntimeError("setup")

    def test_fail():
        assert 1 == 2

    def test_setup(bad):
        pass
"""


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_a_report_changed_in_exception_interact_is_the_one_logged(
    pytester: pytest.Pytester, run: Runner, tier: str
) -> None:
    """pytest calls ``pytest_exception_interact`` after logging a failed report, and
    plugins change the report there (pytest-ruff sets its own longrepr): the sandbox
    sent the report before, unchanged."""
    pytester.makeconftest(INTERACT_CONFTEST)
    pytester.makepyfile(test_i=INTERACT_SUITE)
    base = run(None, "-rA")
    iso = run(tier, "-rA")
    assert _shown(iso) == _shown(base), iso.stdout.str()
    iso.stdout.fnmatch_lines(
        [
            "ERROR test_i.py::test_setup - replaced in pytest_exception_interact",
            "FAILED test_i.py::test_fail - replaced in pytest_exception_interact",
        ]
    )
