"""``faulthandler_timeout``: a slow test's stacks are dumped to the terminal, as in-process.

pytest arms the dump around each test's protocol in the process that runs the hook:
isolated, the controller dumped its own threads (waiting for the sandbox), and the
sandbox dumped the test's into the server's log, where pytest's copy of stderr pointed.
"""

from __future__ import annotations

import pytest

from tests.plugins.conftest import Runner

SLOW = """
    import time

    def test_slow():
        time.sleep(1.5)

    def test_quick():
        pass
"""


@pytest.mark.parametrize("tier", ["process", "jail"])
def test_slow_test_stacks_dumped_to_the_terminal(pytester: pytest.Pytester, run: Runner, tier: str) -> None:
    pytester.makeini("[pytest]\nfaulthandler_timeout = 0.5\n")
    pytester.makepyfile(test_slow=SLOW)
    base = run(None)
    iso = run(tier)
    for result in (base, iso):
        assert result.ret == 0
        result.stderr.fnmatch_lines(["Timeout (0:00:00.500000)!", "Thread 0x* (most recent call first):",
                                     '  File "*test_slow.py", line 4 in test_slow'])
        assert result.stderr.str().count("Timeout (") == 1, result.stderr.str()
    # The controller's own threads (waiting for the sandbox) are not what was asked for.
    assert "receive_link" not in iso.stderr.str() and "canaries" not in iso.stderr.str(), iso.stderr.str()
