"""A long run costs nothing per test in the processes that outlive its tests.

The fork server and the controller live for the whole run; whatever they keep per test
(a descriptor, a thread, a child) adds up over thousands of tests until the run breaks:
one pipe a test left open in the fork server (issue 12) failed two thirds of a
3,000-test suite at ``jail`` and ``zone``, once a sandbox's init, which inherits the
server's descriptors, got numbers past ``select()``'s 1024.

The inner suite runs a few hundred trivial tests at one tier between two probes. A probe
is marked ``isolate("none")``, so it runs in the controller itself, the one place that
sees both processes whatever the tier (a jail's test has a PID namespace of its own and
cannot see the fork server): it counts the open descriptors, threads and children of the
controller and of the fork server (the controller's descendant running
``pytest_isolate.forkserver``), with the server idle between two tests. The late probe
must count what the early one did, give or take the few descriptors that depend on
what the server is doing at that moment (a zygote or a sandbox built ahead, an init
still exiting).
"""

from __future__ import annotations

import json

import pytest

from tests import procprobe

#: Isolated tests between the two probes: a leak of one descriptor a test shows as
#: ~250, far above ``SLACK``; each tier's run stays well under 30 s.
BETWEEN = 250
#: Descriptors and children that come and go with the server's state at a probe.
SLACK = 8
ESCAPE = "--isolate-on-escape=warn"  # host mounts and keys of other runs are not ours

INNER = f'''
import json
import os

import pytest
from procprobe import fork_servers, sample


def _probe(pytestconfig, name):
    data = {{"controller": sample(os.getpid()), "servers": [sample(p) for p in fork_servers()]}}
    (pytestconfig.rootpath / f"probe-{{name}}.json").write_text(json.dumps(data))


@pytest.mark.parametrize("i", range(20))
def test_warm(i):
    pass


@pytest.mark.isolate("none")
def test_probe_early(pytestconfig):
    _probe(pytestconfig, "early")


@pytest.mark.parametrize("i", range({BETWEEN}))
def test_many(i):
    pass


@pytest.mark.isolate("none")
def test_probe_late(pytestconfig):
    _probe(pytestconfig, "late")
'''


@pytest.mark.parametrize("tier", ["process", "chroot", "jail", "zone"])
def test_fork_server_and_controller_do_not_grow_per_test(pytester: pytest.Pytester, tier: str) -> None:
    pytester.makepyfile(test_many=INNER)
    procprobe.install(pytester.path)
    result = pytester.runpytest_subprocess(f"--isolate={tier}", ESCAPE, timeout=120)
    result.assert_outcomes(passed=20 + BETWEEN + 2)
    early = json.loads((pytester.path / "probe-early.json").read_text())
    late = json.loads((pytester.path / "probe-late.json").read_text())
    assert len(early["servers"]) == len(late["servers"]) == 1, (early, late)
    server = (early["servers"][0], late["servers"][0])
    controller = (early["controller"], late["controller"])
    assert server[1]["fds"] <= server[0]["fds"] + SLACK, f"fork server: {server}"
    assert server[1]["threads"] == server[0]["threads"] == 1, f"fork server: {server}"
    assert server[1]["children"] <= server[0]["children"] + SLACK, f"fork server: {server}"
    assert controller[1]["fds"] <= controller[0]["fds"] + SLACK, f"controller: {controller}"
    assert controller[1]["threads"] <= controller[0]["threads"], f"controller: {controller}"
    assert controller[1]["children"] <= controller[0]["children"], f"controller: {controller}"
