"""pytest-ruff (``--ruff``, ``--ruff-format``): each item runs ruff on its file, and ruff
writes its cache into the project, as in-process."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from tests.conftest import OPTIONAL_PLUGINS

CALC = """
    def add(a, b):
        return a + b
"""

CALC_TESTS = """
    from calc import add


    def test_add():
        assert add(1, 2) == 3
"""


@pytest.mark.parametrize("tier", ["none", "chroot", "jail"])
def test_ruffs_cache_is_written_as_in_process(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, h: Any, tier: str
) -> None:
    """ruff writes ``.ruff_cache`` into the project's root. From ``chroot`` up each ruff
    item warned of a blocked ``write-host-file`` there (in a project outside /tmp, where
    real ones live), a warning in-process pytest never gives."""
    files = {"pytest.ini": "[pytest]\n", "calc.py": CALC, "test_calc.py": CALC_TESTS}
    with h.home_project("ruff", {k: textwrap.dedent(v) for k, v in files.items()}) as d:
        monkeypatch.chdir(d)
        monkeypatch.setenv("PYTEST_ADDOPTS", " ".join(f"-p no:{p}" for p in OPTIONAL_PLUGINS if p != "ruff"))
        monkeypatch.setenv("PY_COLORS", "0")
        monkeypatch.delenv("RUFF_CACHE_DIR", raising=False)
        result = pytester.runpytest_subprocess(
            str(d), f"--isolate={tier}", "-p", "no:cacheprovider", "--ruff", "--ruff-format", "-v", timeout=120
        )
        result.stdout.fnmatch_lines(["*calc.py::ruff PASSED*", "*calc.py::ruff::format PASSED*"])
        result.assert_outcomes(passed=5)
        result.stdout.no_fnmatch_line("*escape*")
        result.stdout.no_fnmatch_line("*warning*")
        assert (d / ".ruff_cache" / "CACHEDIR.TAG").is_file(), sorted(d.rglob("*"))
