"""Soak: 20,000 trivial tests at each host tier, and nothing the run keeps grows.

Issue 12, "must hold" 1. ``test_growth.py`` catches a leak of one descriptor a test
within 250 tests; this runs the number the issue names, at every host tier, and adds
memory: a per-test leak of a few hundred bytes, a pipe that only leaks on one path in a
thousand, or a table that grows with the tests (the fork server's guesses, its reaped
children) shows only over thousands of tests.

The inner suite: 100 modules of 200 trivial tests (``PER_MODULE``), with three probe
modules between them, after 1,000, 10,000 and 20,000 tests. A probe is marked
``isolate("none")``: it runs in the controller, the one process that sees both the
controller and the fork server whatever the tier (test_growth.py says why), and records
the descriptors, threads, children and RSS of the controller and of each fork server.
The probe after 1,000 tests is the reference: by then every pool has started, the
caches have filled and the allocator has its arenas. The probes after 10,000 and
20,000 tests must count the same descriptors, threads and children (give or take
``SLACK``: what depends on the moment, a sandbox built ahead or an init still exiting).

Memory cannot be flat in the controller: pytest itself keeps every test's reports (the
terminal reporter's stats). So the bound comes from plain pytest, measured in the same
module on the same suite: ``--isolate=none``, every test in-process, grew 3.2 KB a test.
The controller keeps more per isolated test: the three reports are rebuilt from the
wire (their strings are copies, not the item's own), and each test's record stays for
the JSON report and the summary; measured 9.1 (process), 9.3 (chroot, jail) and 9.8 KB
(zone, whose record carries the cgroup's readings) a test over 19,000 tests, so it
may grow by ``CONTROLLER_FACTOR`` x plain pytest's growth + ``RSS_SLACK_PER_TEST``
(10.8 KB).
A fork server, and what lives as long as it below it (the spawner of ``process``), keep
nothing per test: ``RSS_SLACK_PER_TEST`` at most. This found a leak: the server froze
each test's garbage for good with ``gc.freeze()`` and grew by 7 KB a test at chroot
(130 MB over 20,000 tests); it now collects before it freezes, and stays flat.

Time, measured on the 2-core development host (Debian 12, root), shared with two or
three other test suites at a load of 8-10: this file took 42 min, 20,000 tests taking
557 s at process, 608 at chroot, 609 at jail, 741 at zone, plain pytest 18 s (alone
at a load of ~7, process took 298 s). A quarter of the tests per tier
in one run would see each fork server over 5,000 tests only, where the issue asks for
20,000 at every tier, and the whole soak fits CI's 90 minutes beside the ~10 minutes of
the rest of the suite even at that load, so it runs in the normal test command (the
tests are marked ``soak``: ``-m soak`` selects them, ``-m "not soak"`` leaves them out).

The inner runs use ``--isolate-on-escape=warn``: the escape canaries watch host-wide
facilities (the host's mount table), and over half an hour on a shared host another
run's mount is blamed on whichever of our tests is running and fails it. Detection runs
all the same; a real escape of these ``pass`` tests is not what this file tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests import procprobe

pytestmark = pytest.mark.soak

#: Tests in the soak, and where the probes sit (after this many trivial tests).
TOTAL = 20_000
PROBES = (1_000, 10_000, 20_000)
PER_MODULE = 200
#: Descriptors and children that come and go with the server's state at a probe.
SLACK = 8
#: The controller keeps per test what plain pytest keeps (three reports), the same three
#: reports again in size (rebuilt from the wire, their strings are not the item's, as
#: in-process ones are) and the test's record (the JSON report and the summary read it):
#: measured 2.8-3.0x plain pytest's growth (zone the most; module docstring).
CONTROLLER_FACTOR = 3
#: Bytes a test may add on top: to the controller beyond ``CONTROLLER_FACTOR`` x plain
#: pytest, to a fork server (which keeps nothing per test) at all. A leaked 4 KiB page a
#: test is above both.
RSS_SLACK_PER_TEST = 1024
#: Seconds one inner run may take (the slowest tier measured ~8 min on a shared host).
TIMEOUT = 40 * 60
ESCAPE = "--isolate-on-escape=warn"

PROBE = '''
import json
import os

import pytest
from procprobe import fork_servers, sample


@pytest.mark.isolate("none")
def test_probe(pytestconfig):
    data = {"controller": sample(os.getpid()), "servers": [sample(p, kids=True) for p in fork_servers()]}
    (pytestconfig.rootpath / "probe-AT.json").write_text(json.dumps(data))
'''


def write_suite(root: Path) -> None:
    """``TOTAL`` trivial tests in modules of ``PER_MODULE``, a probe module after each
    count in ``PROBES`` (``test_00004.py`` sorts before ``test_00004_probe.py``)."""
    procprobe.install(root)
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    isolate: pytest-isolate's marker\n")
    body = f"import pytest\n\n\n@pytest.mark.parametrize('i', range({PER_MODULE}))\ndef test_trivial(i):\n    pass\n"
    for m in range(TOTAL // PER_MODULE):
        (root / f"test_{m:05d}.py").write_text(body)
        done = (m + 1) * PER_MODULE
        if done in PROBES:
            (root / f"test_{m:05d}_probe.py").write_text(PROBE.replace("AT", str(done)))


def probes(root: Path) -> dict[int, dict[str, Any]]:
    return {at: json.loads((root / f"probe-{at}.json").read_text()) for at in PROBES}


def run(pytester: pytest.Pytester, *args: str) -> tuple[dict[int, dict[str, Any]], float]:
    """The soak at one setting: all ``TOTAL + len(PROBES)`` tests must pass."""
    write_suite(pytester.path)
    t0 = time.monotonic()
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", *args, timeout=TIMEOUT)
    wall = time.monotonic() - t0
    result.assert_outcomes(passed=TOTAL + len(PROBES))
    return probes(pytester.path), wall


def growth(a: dict[str, Any], b: dict[str, Any], tests: int) -> float:
    """RSS growth per test between two samples of one process."""
    return (b["rss"] - a["rss"]) / tests


@pytest.fixture(scope="module")
def plain_growth(tmp_path_factory: pytest.TempPathFactory, h: Any) -> float:
    """Plain pytest's own RSS growth per test over this suite, in bytes (the bound's
    base): ``--isolate=none``, so every test runs in the controller as pytest runs it."""
    root = tmp_path_factory.mktemp("plain")
    write_suite(root)
    t0 = time.monotonic()
    result = h.run_pytest(root, "-q", "-p", "no:cacheprovider", "--isolate=none", timeout=TIMEOUT)
    wall = time.monotonic() - t0
    result.assert_outcomes(passed=TOTAL + len(PROBES))
    p = probes(root)
    first = p[PROBES[0]]["controller"]
    grow = max(growth(first, p[at]["controller"], at - PROBES[0]) for at in PROBES[1:])
    print(f"plain pytest: {TOTAL} tests in {wall:.0f} s, grows {grow:.0f} B/test; {_fmt(p)}")
    return max(grow, 0.0)


def _fmt(p: dict[int, dict[str, Any]]) -> str:
    return "; ".join(
        f"@{at}: controller {v['controller']} servers {v['servers']}" for at, v in p.items()
    )


@pytest.mark.parametrize("tier", ["process", "chroot", "jail", "zone"])
def test_20000_tests_pass_and_nothing_grows(pytester: pytest.Pytester, tier: str, plain_growth: float) -> None:
    p, wall = run(pytester, f"--isolate={tier}", ESCAPE)
    print(f"{tier}: {TOTAL} tests in {wall:.0f} s; plain pytest grows {plain_growth:.0f} B/test")
    print(_fmt(p))
    first = p[PROBES[0]]
    assert len(first["servers"]) == 1, first
    s0, c0 = first["servers"][0], first["controller"]
    controller_limit = CONTROLLER_FACTOR * plain_growth + RSS_SLACK_PER_TEST
    for at in PROBES[1:]:
        late, tests = p[at], at - PROBES[0]
        assert [s["pid"] for s in late["servers"]] == [s0["pid"]], f"fork server replaced by {at} tests: {late}"
        s1, c1 = late["servers"][0], late["controller"]
        assert s1["fds"] <= s0["fds"] + SLACK, f"fork server fds @{PROBES[0]} vs @{at}: {s0} {s1}"
        assert s1["threads"] == s0["threads"] == 1, f"fork server threads: {s0} {s1}"
        assert s1["children"] <= s0["children"] + SLACK, f"fork server children: {s0} {s1}"
        assert growth(s0, s1, tests) <= RSS_SLACK_PER_TEST, f"fork server RSS @{PROBES[0]} vs @{at}: {s0} {s1}"
        # What lives as long as the server below it (the spawner of `process`): the same.
        old = {k["pid"]: k for k in s0["kids"]}
        for k1 in s1["kids"]:
            k0 = old.get(k1["pid"])
            if k0 is None:
                continue  # a sandbox of one test
            assert k1["fds"] <= k0["fds"] + SLACK, f"fork server's child {k1['pid']} fds: {k0} {k1}"
            assert k1["threads"] == k0["threads"], f"fork server's child {k1['pid']} threads: {k0} {k1}"
            assert growth(k0, k1, tests) <= RSS_SLACK_PER_TEST, f"fork server's child {k1['pid']} RSS: {k0} {k1}"
        assert c1["fds"] <= c0["fds"] + SLACK, f"controller fds @{PROBES[0]} vs @{at}: {c0} {c1}"
        assert c1["threads"] <= c0["threads"], f"controller threads: {c0} {c1}"
        assert c1["children"] <= c0["children"], f"controller children: {c0} {c1}"
        grow = growth(c0, c1, tests)
        assert grow <= controller_limit, (
            f"controller RSS grows {grow:.0f} B/test up to {at} tests, more than {controller_limit:.0f} "
            f"({CONTROLLER_FACTOR} x plain pytest's {plain_growth:.0f} + {RSS_SLACK_PER_TEST}): {c0} {c1}"
        )
