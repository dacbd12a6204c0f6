"""What a sandbox formats for the terminal has the colors and width it has in-process.

A test's log lines (captured and live), its highlighted assertion diffs and the live
log's separators are formatted in the sandbox. Their markup and width followed the
controller's stderr, where pytest's follow its stdout: ``pytest | tee log`` or
``pytest > out.txt`` from a terminal wrote escape codes (and separators as wide as the
terminal) into the file, where in-process there are none. And logging's level colors
were chosen while the fork server configured, its stdout ``/dev/null``: on a terminal,
captured and live log lines lost their levels' colors.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_ADDOPTS

LOGS = """
    import logging

    def test_logs():
        logging.getLogger("proj").warning("careful")
        assert [1, 2] == [1, 3]
"""

pytestmark = pytest.mark.skipif(shutil.which("script") is None, reason="util-linux's script is not installed")


def _in_a_terminal(cwd: Path, args: list[str], redirect: Path | None = None) -> str:
    """pytest's stdout in a 100-column pseudo-terminal (util-linux ``script``), or in
    ``redirect`` with stderr still on the terminal (``pytest > out.txt``)."""
    cmd = shlex.join([sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", *args])
    if redirect is not None:
        cmd += f" > {shlex.quote(str(redirect))}"
    env = {k: v for k, v in os.environ.items() if k not in ("PY_COLORS", "NO_COLOR", "FORCE_COLOR", "COLUMNS")}
    env.update(PYTEST_ADDOPTS=FAST_ADDOPTS, TERM="xterm")
    out = subprocess.run(
        ["script", "-qec", f"stty cols 100 rows 40; {cmd}", "/dev/null"],
        cwd=cwd, capture_output=True, text=True, timeout=120, env=env,
    )
    text = redirect.read_text() if redirect is not None else out.stdout
    return text.replace("\r", "")


@pytest.mark.parametrize("tier", ("process", "jail", "uml"))
def test_output_redirected_from_a_terminal_has_no_markup(pytester: pytest.Pytester, tier: str) -> None:
    pytester.makepyfile(test_l=LOGS)
    args = ["-vv", "--log-cli-level=WARNING"]
    base = _in_a_terminal(pytester.path, args, pytester.path / "base.txt")
    iso = _in_a_terminal(pytester.path, [*args, f"--isolate={tier}"], pytester.path / "iso.txt")
    assert "careful" in base and "careful" in iso, (base, iso)
    assert "\x1b[" not in base, base
    assert "\x1b[" not in iso, iso
    live = [line for line in base.splitlines() if "live log call" in line]
    assert live and live == [line for line in iso.splitlines() if "live log call" in line], (base, iso)


@pytest.mark.parametrize("tier", ("process", "jail", "uml"))
def test_log_levels_colored_on_a_terminal(pytester: pytest.Pytester, tier: str) -> None:
    pytester.makepyfile(test_l=LOGS)
    args = ["--log-cli-level=WARNING"]
    base = _in_a_terminal(pytester.path, args)
    iso = _in_a_terminal(pytester.path, [*args, f"--isolate={tier}"])
    shown = [line for line in base.splitlines() if "WARNING" in line and "careful" in line]
    # live, then captured: both with the level's color
    assert len(shown) == 2 and all("\x1b[33mWARNING" in line for line in shown), base
    assert [line for line in iso.splitlines() if "WARNING" in line and "careful" in line] == shown, iso
