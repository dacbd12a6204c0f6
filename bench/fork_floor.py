"""The bench's "fork-floor" row: what one bare fork per test costs a warm pytest.

Each test's protocol runs in a child forked from the collected session, which exits;
the parent waits and logs what in-process pytest logs. No plugin of ours, no reports
across the boundary, no sandbox, nothing run ahead: the least any tier that gives each
test a fresh child forked from a warm pytest (the design the issues ask for) can cost on
this host. A tier's overhead minus this row's is what the tier itself adds.
"""

from __future__ import annotations

import os

import pytest
from _pytest.runner import runtestprotocol


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
    pid = os.fork()
    if pid == 0:
        try:
            reports = runtestprotocol(item, nextitem=None, log=False)
            os._exit(0 if all(r.passed for r in reports) else 1)
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    outcome = "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for when in ("setup", "call", "teardown"):
        rep = pytest.TestReport(item.nodeid, item.location, {}, outcome, None, when)  # type: ignore[arg-type]
        item.ihook.pytest_runtest_logreport(report=rep)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
