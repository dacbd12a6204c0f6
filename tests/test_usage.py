"""Readings from real processes (rusage, /proc sampling, a real cgroup) and verdicts."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import statistics
import subprocess
import sys
import time

import pytest

from pytest_isolate.facets import cgroup_host, cgroup_sweep
from pytest_isolate.facets.cgroup_host import Limits
from pytest_isolate.facets.cgroups import TestCgroup
from pytest_isolate.observe import usage
from pytest_isolate.observe.usage import READINGS, TreeSampler, check, merge
from pytest_isolate.spec import IsolationSpec
from pytest_isolate.tiers.base import rusage_dict

PY = sys.executable
MiB = 1 << 20
RUN_ID = f"uu{os.getpid()}"

#: Allocates and touches 200 MiB (bytes * n writes every page), says so, waits for stdin.
ALLOC_200 = "import sys\nb = b'x' * (200 << 20)\nprint('ready', flush=True)\nsys.stdin.read()"


@pytest.fixture(scope="module", autouse=True)
def _no_cgroup_left():
    yield
    cgroup_sweep.sweep(RUN_ID)
    out = subprocess.run(
        ["find", "/sys/fs/cgroup", "-name", "*isolat*"], capture_output=True, text=True
    )
    left = [p for p in out.stdout.splitlines() if RUN_ID in p]
    assert not left, left


def _popen(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw
    )


def _ready(p: subprocess.Popen, timeout: float = 20) -> str:
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, "child never got ready"
    return p.stdout.readline()


def _finish(p: subprocess.Popen) -> None:
    try:
        p.stdin.close()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()


def _near_200(n: float) -> bool:
    return abs(n - 200 * MiB) <= 20 * MiB


# -- the documented keys -----------------------------------------------------------------


def test_readings_are_documented_for_every_tier():
    keys = {
        "wall",
        "cpu_user",
        "cpu_sys",
        "peak_memory",
        "peak_pids",
        "write_bytes",
        "oom_kills",
        "cpu_throttled",
        "pids_max_hits",
        "fds_peak",
    }
    assert set(READINGS) == keys
    for key, doc in READINGS.items():
        assert doc["unit"] and doc["what"]
        assert set(doc["sources"]) == {"process", "chroot", "jail", "zone", "uml"}, key
        for src in doc["sources"].values():
            assert src.split(":")[0].split()[0] in ("exact", "sampled", "n/a"), (key, src)


# -- 200 MB three ways ----------------------------------------------------------------------


#: A small parent for the 200 MiB child: a child's ``ru_maxrss`` starts at its parent's
#: RSS when it was forked (the kernel keeps the forked copy's high-water mark across
#: ``execve``, vfork or not), and pytest's own RSS after a few hundred tests (352 MiB in
#: one CI run) would be what the test reads. It says the child's PID, then its status
#: and rusage once the child is gone. The child waits for a line on stdin, allocates,
#: then waits for stdin's end.
SMALL_PARENT = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
print(pid, flush=True)
_, status, ru = os.wait4(pid, 0)
print(json.dumps([status, list(ru)]), flush=True)
"""
ALLOC_AFTER_GO = "import sys\nsys.stdin.readline()\nb = b'x' * (200 << 20)\nsys.stdin.read()"


def _small_parent() -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(
        [PY, "-c", SMALL_PARENT, ALLOC_AFTER_GO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    return p, int(_ready(p))


def _waited(p: subprocess.Popen) -> tuple[int, resource.struct_rusage]:
    """The child's wait status and rusage, once stdin's end has let it go."""
    p.stdin.close()
    status, ru = json.loads(p.stdout.readline())
    p.wait(10)
    p.stdout.close()
    return status, resource.struct_rusage(ru)


def test_rusage_reads_200mb():
    p, _ = _small_parent()
    try:
        p.stdin.write("go\n")
        p.stdin.flush()
        status, ru = _waited(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert _near_200(rusage_dict(ru)["max_rss"]), rusage_dict(ru)["max_rss"] / MiB


def test_sampler_reads_200mb():
    p = _popen(ALLOC_200)
    try:
        _ready(p)
        s = TreeSampler()
        for _ in range(3):
            s.sample(p.pid)
        r = s.result()
        assert _near_200(r["peak_memory"]), r["peak_memory"] / MiB
        assert r["peak_procs"] == 1 and r["peak_pids"] == 1 and r["samples"] == 3
    finally:
        _finish(p)


def test_all_sources_agree_on_200mb_in_a_real_cgroup():
    """The zone's view: sampler while it runs, rusage and cgroup after; merge picks the cgroup."""
    cg = TestCgroup(cgroup_host.detect(), RUN_ID, "agree", Limits())
    p = None
    try:
        p, pid = _small_parent()
        cg.attach(pid)
        p.stdin.write("go\n")
        p.stdin.flush()
        s = TreeSampler()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            s.sample(pid)
            time.sleep(0.02)
        status, ru = _waited(p)
        wall = time.monotonic() - t0
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        readings = {
            "rusage": rusage_dict(ru)["max_rss"],
            "sampler": s.result()["peak_memory"],
            "cgroup": cg.read()["peak_memory"],
        }
        assert all(_near_200(v) for v in readings.values()), {
            k: v / MiB for k, v in readings.items()
        }
        merged = merge(rusage_dict(ru), cg.read(), s.result(), wall)
        assert merged["peak_memory"] == readings["cgroup"]
        assert merged["fds_peak"] >= 3 and merged["oom_kills"] == 0
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        cg.remove()


def test_oom_in_cgroup_gives_a_memory_verdict():
    cg = TestCgroup(cgroup_host.detect(), RUN_ID, "oom", Limits(memory=128 * MiB))
    try:
        pid = os.fork()
        if pid == 0:
            cg.attach()
            os.execv(PY, [PY, "-c", "b = b'x' * (300 << 20)"])
        t0 = time.monotonic()
        _, status, ru = os.wait4(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        readings = merge(rusage_dict(ru), cg.read(), None, time.monotonic() - t0)
        spec = IsolationSpec(tier="zone", memory=128 * MiB)
        [rec] = check(spec, readings, {"memory"})
        assert rec["budget"] == "memory" and rec["enforced"] and rec["kind"] == "reached"
        assert rec["message"].startswith("memory budget 128 MiB exceeded: peak 12")
        assert rec["message"].endswith("MiB, OOM-killed")
    finally:
        cg.remove()


# -- the sampler on trees ---------------------------------------------------------------------

TREE = """
import os, sys, threading, time
held = [open('/dev/null') for _ in range(10)]
ev = threading.Event()
ts = [threading.Thread(target=ev.wait) for _ in range(3)]
for t in ts: t.start()
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        sys.stdin.read(); os._exit(0)
    kids.append(pid)
print(' '.join(map(str, kids)), flush=True)
sys.stdin.read()
ev.set()
for k in kids: os.waitpid(k, 0)
"""


def test_sampler_leaves_out_what_a_forked_runner_inherited():
    """A fork of this (pytest) process starts with its pages mapped, as a runner starts
    with the fork server's: only what the child then allocates is its memory."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)
        b = b"x" * (200 << 20)
        os.write(w, b".")
        os.read(go_r, 1)
        os._exit(0 if b else 1)
    os.close(w)
    os.close(go_r)
    try:
        assert os.read(r, 1) == b"."
        s = TreeSampler()
        for _ in range(3):
            s.sample(pid)
        res = s.result()
        own = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert res["inherited"] > 0.5 * own  # most of pytest's pages, found at first sight
        assert _near_200(res["peak_memory"]), res["peak_memory"] / MiB
    finally:
        os.close(go_w)
        _, status, ru = os.wait4(pid, 0)
        os.close(r)
    # rusage's max_rss has the inherited pages too; merge takes them off.
    m = merge(rusage_dict(ru), None, {**res, "peak_memory": 0}, 1.0)
    assert _near_200(m["peak_memory"]), m["peak_memory"] / MiB


def test_sampler_counts_processes_threads_and_fds():
    p = _popen(TREE)
    try:
        _ready(p)
        s = TreeSampler()
        s.sample(p.pid)
        r = s.result()
        assert r["peak_procs"] == 3
        assert r["peak_pids"] == 1 + 3 + 2  # main + 3 threads, 2 children
        assert r["fds_peak"] >= 13  # stdio + 10 held (+ the pipe ends)
    finally:
        _finish(p)


ORPHAN = """
import os, sys, time
r, w = os.pipe()
up_r, up_w = os.pipe()
a = os.fork()
if a == 0:
    if os.fork() == 0:          # the daemon: outlives its parent
        os.close(w); os.write(up_w, b'.'); os.read(r, 1); os._exit(0)
    os.read(0, 1); os._exit(0)  # the middle process exits on a byte from stdin
os.read(up_r, 1)                # the daemon exists
print(a, flush=True)
os.waitpid(a, 0)
print('gone', flush=True)
sys.stdin.read()
"""


def test_sampler_keeps_counting_a_double_forked_daemon():
    p = _popen(ORPHAN)
    try:
        _ready(p)
        s = TreeSampler()
        s.sample(p.pid)
        assert s.last["procs"] == 3
        p.stdin.write("x")
        p.stdin.flush()
        assert _ready(p).strip() == "gone"
        s.sample(p.pid)
        assert s.last["procs"] == 2  # the daemon, reparented away, still counted
    finally:
        _finish(p)
        # the daemon's pipe closed with its parent: it exits on its own


SHARED = """
import os, sys
b = b'x' * (100 << 20)
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        sys.stdin.read(); os._exit(0)
    kids.append(pid)
print('ready', flush=True)
sys.stdin.read()
for k in kids: os.waitpid(k, 0)
"""


def test_sampler_refines_shared_pages_near_the_budget():
    p = _popen(SHARED)
    try:
        _ready(p)
        loose = TreeSampler()
        loose.sample(p.pid)
        tight = TreeSampler(memory_budget=200 * MiB)
        tight.sample(p.pid)
        assert loose.result()["peak_memory"] > 350 * MiB  # 4 x 100 MiB of shared pages
        assert tight.refined == 1
        assert 100 * MiB <= tight.result()["peak_memory"] < 150 * MiB
    finally:
        _finish(p)


def test_sample_cost():
    p = _popen(TREE)
    try:
        _ready(p)
        s = TreeSampler()
        times = []
        for _ in range(200):
            t = time.perf_counter()
            s.sample(p.pid)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"TreeSampler.sample, 3 processes / 6 tasks: median {med * 1e6:.0f} us")
        # Its cost is printed, not asserted (speed is the bench's); what it saw is.
        assert s.samples == 200 and s.peak_procs == 3, (s.samples, s.peak_procs)
    finally:
        _finish(p)


def test_sampler_of_a_gone_process():
    s = TreeSampler()
    # No sample yet: only the fork baseline, this process's resident set.
    (inherited,) = s.result().values()
    assert 10 * MiB < inherited < 1024 * MiB
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    s.sample(pid)
    assert s.result()["peak_procs"] == 0


# -- merge -------------------------------------------------------------------------------


RU = {"cpu_user": 1.0, "cpu_sys": 0.5, "max_rss": 80 * MiB, "write_bytes": 4096.0}


def test_merge_without_cgroup():
    m = merge(RU, None, {"peak_memory": 120 * MiB, "peak_pids": 4, "fds_peak": 9}, 2.0)
    assert m == {
        "wall": 2.0,
        "cpu_user": 1.0,
        "cpu_sys": 0.5,
        "peak_memory": 120 * MiB,
        "peak_pids": 4,
        "write_bytes": 4096.0,
        "fds_peak": 9,
    }
    # a peak between two samples: rusage max_rss of the largest process is higher
    assert merge(RU, None, {"peak_memory": 10 * MiB}, 1.0)["peak_memory"] == 80 * MiB


def test_merge_cgroup_wins_where_it_knows():
    cg = {
        "peak_memory": 50 * MiB,
        "oom_kills": 1,
        "peak_pids": 7,
        "pids_max_hits": 2,
        "cpu_user": 3.0,
        "cpu_sys": 1.0,
        "cpu_throttled": 0.5,
        "write_bytes": 8192,
    }
    m = merge(RU, cg, {"peak_memory": 60 * MiB, "peak_pids": 3, "fds_peak": 5}, 4.0)
    assert m["peak_memory"] == 50 * MiB and m["peak_pids"] == 7
    assert m["cpu_user"] == 3.0 and m["cpu_sys"] == 1.0 and m["write_bytes"] == 8192
    assert m["oom_kills"] == 1 and m["pids_max_hits"] == 2 and m["cpu_throttled"] == 0.5
    assert m["fds_peak"] == 5


def test_merge_leaves_unknown_keys_out():
    assert merge(None, None, None, 0.5) == {"wall": 0.5}


# -- check -------------------------------------------------------------------------------


def _spec(**kw) -> IsolationSpec:
    return IsolationSpec(tier=kw.pop("tier", "zone"), **kw)


def test_check_memory_oom():
    [r] = check(
        _spec(memory=256 * MiB), {"wall": 1, "peak_memory": 300 * MiB, "oom_kills": 1}, {"memory"}
    )
    assert r == {
        "budget": "memory",
        "limit": 256 * MiB,
        "used": 300 * MiB,
        "enforced": True,
        "kind": "reached",
        "message": "memory budget 256 MiB exceeded: peak 300 MiB, OOM-killed",
    }


def test_check_oom_without_a_memory_budget():
    """uml's guest RAM is a memory limit even with no budget: its OOM kill must say so."""
    [r] = check(_spec(tier="uml"), {"wall": 1, "peak_memory": 230 * MiB, "oom_kills": 1}, set())
    assert (r["budget"], r["limit"], r["kind"], r["enforced"]) == ("memory", None, "reached", True)
    assert r["message"] == (
        "OOM-killed with no memory budget: peak 230 MiB (the guest's RAM ran out: give the test memory=)"
    )


def test_check_memory_not_enforced():
    [r] = check(
        _spec(tier="process", memory=64 * MiB), {"wall": 1, "peak_memory": 100 * MiB}, set()
    )
    assert not r["enforced"] and r["kind"] == "exceeded"
    assert (
        r["message"]
        == "memory budget 64 MiB exceeded: peak 100 MiB (not enforced by the process tier)"
    )


def test_check_pids_reached():
    [r] = check(_spec(pids=64), {"wall": 1, "peak_pids": 64, "pids_max_hits": 1}, {"pids"})
    assert r["message"] == "pids budget 64 reached: fork failed 1 time"
    [r] = check(_spec(pids=64), {"wall": 1, "peak_pids": 64, "pids_max_hits": 3}, {"pids"})
    assert r["message"].endswith("3 times")


def test_check_timeout_cpu_time_disk_fds():
    spec = _spec(tier="jail", timeout=2.0, cpu_time=1.0, disk=10 * MiB, fds=32)
    readings = {
        "wall": 2.04,
        "timed_out": True,
        "cpu_user": 1.2,
        "cpu_sys": 0.1,
        "signal": int(signal.SIGXCPU),
        "write_bytes": 12 * MiB,
        "fds_peak": 32,
    }
    recs = {r["budget"]: r for r in check(spec, readings, {"timeout", "cpu_time", "disk", "fds"})}
    assert recs["timeout"]["message"] == "timeout 2 s exceeded: still running after 2.0 s, killed"
    assert (
        recs["cpu_time"]["message"]
        == "cpu_time budget 1 s exceeded: used 1.3 s CPU, killed by SIGXCPU"
    )
    assert recs["disk"]["message"] == "disk budget 10 MiB exceeded: wrote 12 MiB"
    assert recs["fds"]["message"] == "fds budget 32 reached: a process held 32 open descriptors"


def test_check_disk_adds_the_upper_layer_and_writes_through_binds():
    spec = _spec(tier="jail", disk=100 * MiB)
    # 40 MiB in the sandbox's tmpfs upper + 80 MiB into tmp_path (a host bind)
    [r] = check(spec, {"wall": 1, "disk_used": 40 * MiB, "write_bytes": 80 * MiB}, set())
    assert r["used"] == 120 * MiB and not r["enforced"]
    assert r["message"] == "disk budget 100 MiB exceeded: wrote 120 MiB (not enforced by the jail tier)"
    assert check(spec, {"wall": 1, "disk_used": 40 * MiB, "write_bytes": 50 * MiB}, set()) == []
    # uml: the guest's upper layer is written by the UML kernel on the host: counted once
    uml = _spec(tier="uml", disk=100 * MiB)
    assert check(uml, {"wall": 1, "disk_used": 90 * MiB, "write_bytes": 90 * MiB}, set()) == []


def test_check_a_per_process_rlimit_that_fired_is_enforced():
    """rlimits.enforced() claims no total for cpu_time/disk, but their own signal shows
    the limit stopped the test (the fork server passes the signal by name)."""
    [r] = check(
        _spec(tier="process", cpu_time=1.0),
        {"wall": 2.0, "cpu_user": 1.9, "signal": "SIGXCPU"},
        set(),
    )
    assert (r["kind"], r["enforced"]) == ("reached", True)
    [r] = check(_spec(tier="process", cpu_time=1.0), {"wall": 2.0, "cpu_user": 1.9}, set())
    assert (r["kind"], r["enforced"]) == ("exceeded", False)
    [r] = check(
        _spec(tier="chroot", disk=MiB), {"wall": 1, "write_bytes": MiB, "signal": "SIGXFSZ"}, set()
    )
    assert (r["kind"], r["enforced"]) == ("reached", True)
    assert r["message"] == "disk budget 1 MiB reached: a file hit the size limit, killed by SIGXFSZ"


def test_check_cpu_share():
    # enforced (cgroup): a share is a limit, not a total: report throttling
    [r] = check(
        _spec(cpu=0.2),
        {"wall": 1.5, "cpu_user": 0.3, "cpu_sys": 0.0, "cpu_throttled": 1.1},
        {"cpu"},
    )
    assert r["kind"] == "throttled" and r["used"] == 0.2
    assert r["message"] == "cpu budget 0.2 CPU: throttled for 1.1 s (used 300 ms CPU in 1.5 s)"
    # not enforced: exceeded on average
    [r] = check(
        _spec(tier="process", cpu=0.5), {"wall": 2.0, "cpu_user": 1.8, "cpu_sys": 0.0}, set()
    )
    assert (
        r["message"]
        == "cpu budget 0.5 CPU exceeded: averaged 0.90 CPU over 2 s (not enforced by the process tier)"
    )
    # a short burst within the slack is not overuse
    assert check(_spec(tier="process", cpu=0.5), {"wall": 0.01, "cpu_user": 0.01}, set()) == []


def test_check_within_budget_is_quiet():
    spec = _spec(timeout=5.0, cpu_time=5.0, memory=256 * MiB, pids=64, disk=MiB, fds=64, cpu=1.0)
    readings = {
        "wall": 1.0,
        "cpu_user": 0.5,
        "cpu_sys": 0.1,
        "peak_memory": 100 * MiB,
        "peak_pids": 3,
        "pids_max_hits": 0,
        "oom_kills": 0,
        "write_bytes": 0,
        "fds_peak": 10,
        "cpu_throttled": 0.0,
    }
    assert check(spec, readings, {"memory", "pids", "cpu", "timeout"}) == []
    assert usage.check(IsolationSpec(tier="zone"), readings, set()) == []


def test_readings_table_for_the_docs():
    table = usage.readings_markdown().splitlines()
    assert len(table) == 2 + len(READINGS)
    assert table[0].startswith("| reading | unit | what | process |")
