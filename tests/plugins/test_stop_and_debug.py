"""A test that stops the session, and a test's debugger, isolated as in-process.

``pytest.exit()`` in a test or fixture (a suite that finds its database down), a
``KeyboardInterrupt`` raised by test code, and pdb's "quit" stop pytest's session with
their message and exit code. Isolated, the sandbox ended as a crash ("exit code 70"),
the test failed, and the run went on. ``--pdb`` was switched off in sandboxes and
``breakpoint()`` read ``/dev/null``: a debugger in a sandbox now has the user's terminal,
as in-process.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_ADDOPTS
from tests.plugins.conftest import TIERS, Runner

STOPS = """
    import pytest

    @pytest.fixture(scope="session")
    def database():
        pytest.exit("the database is down", returncode=4)

    def test_first():
        pass

    def test_needs_database(database):
        pass

    def test_never_runs():
        pass
"""


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    ("body", "code", "line"),
    [
        (STOPS, 4, "*_pytest.outcomes.Exit: the database is down*"),
        ("def test_first():\n    pass\n\ndef test_stop():\n    raise KeyboardInterrupt\n\ndef test_never_runs():\n    pass\n",
         2, "*KeyboardInterrupt*"),
        ("import pytest\n\ndef test_first():\n    pass\n\ndef test_stop():\n    pytest.exit('enough')\n\n"
         "def test_never_runs():\n    pass\n", 2, "*_pytest.outcomes.Exit: enough*"),
    ],
    ids=["exit-in-fixture", "keyboard-interrupt", "exit-in-test"],
)
def test_a_test_that_stops_the_session(
    pytester: pytest.Pytester, run: Runner, tier: str, body: str, code: int, line: str
) -> None:
    pytester.makepyfile(test_s=body)
    base = run(None, "-p", "no:randomly")
    iso = run(tier, "-p", "no:randomly")
    for res in (base, iso):
        assert res.ret == code, res.stdout.str()
        res.stdout.fnmatch_lines([line])
        res.stdout.fnmatch_lines(["*1 passed*"])
        assert "test_never_runs" not in res.stdout.str()
        assert "CRASHED" not in res.stdout.str() and "INTERNALERROR" not in res.stdout.str()


def _in_a_terminal(cwd: Path, args: list[str], keys: str) -> str:
    """pytest run in a pseudo-terminal (util-linux ``script``), ``keys`` typed into it."""
    cmd = shlex.join([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *args])
    out = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], cwd=cwd, input=keys, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "PYTEST_ADDOPTS": FAST_ADDOPTS, "PY_COLORS": "0"},
    )
    return out.stdout.replace("\r", "")


DEBUGGED = """
    def test_fails():
        value = 6
        assert value * 7 == 41

    def test_breaks():
        here = "in the test"
        breakpoint()

    def test_after():
        pass
"""


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux's script (a pseudo-terminal) is not installed")
@pytest.mark.parametrize("tier", ("process", "jail"))
def test_debugger_in_the_sandbox_has_the_terminal(pytester: pytest.Pytester, tier: str) -> None:
    pytester.makepyfile(test_d=DEBUGGED)
    for args in ([], [f"--isolate={tier}"]):
        # --pdb: the failure's post-mortem answers, "quit" ends the session there.
        out = _in_a_terminal(pytester.path, ["--pdb", *args], "p value * 7\nq\n")
        assert "(Pdb) p value * 7\n42\n" in out, out
        assert "Exit: Quitting debugger" in out and "1 failed" in out, out
        assert "= FAILURES =" not in out, out  # shown in the debugger already
        # breakpoint() under capture: the prompt, the test's frame, then on to the end.
        out = _in_a_terminal(pytester.path, ["-k", "breaks or after", *args], "p here\nc\n")
        assert "(Pdb) p here\n'in the test'\n" in out, out
        assert "2 passed" in out, out
