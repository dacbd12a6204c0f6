"""Real rlimits, each applied in a forked child (they cannot be undone in-process)."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from pytest_isolate.facets import rlimits
from pytest_isolate.spec import IsolationSpec

MiB = 1 << 20


def _in_child(fn: Callable[[], Any], timeout: float = 20.0) -> tuple[int, Any]:
    """Run ``fn`` in a forked child; return (wait status, its JSON result or None)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            out = fn()
            os.write(w, json.dumps(out).encode())
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"error": repr(e)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        p, status = os.waitpid(pid, os.WNOHANG)
        if p:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            raise AssertionError("child did not finish in time")
        time.sleep(0.01)
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    return status, json.loads(data) if data else None


def spec(**kw: Any) -> IsolationSpec:
    return IsolationSpec(tier="process", **kw)


def test_memory_budget_turns_overallocation_into_memoryerror():
    def body():
        rlimits.apply(spec(memory=64 * MiB))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        try:
            big = bytearray(200 * MiB)
            over = "allocated"
            del big
        except MemoryError:
            over = "MemoryError"
        small = b"x" * (32 * MiB)  # within budget: fine
        return {"over": over, "small": len(small), "soft": soft, "hard": hard}

    status, out = _in_child(body)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    assert out["over"] == "MemoryError"
    assert out["small"] == 32 * MiB
    assert out["soft"] == out["hard"] != resource.RLIM_INFINITY


def test_memory_left_alone_when_a_cgroup_enforces_it():
    def body():
        before = resource.getrlimit(resource.RLIMIT_AS)
        rlimits.apply(spec(memory=64 * MiB), cgroup_memory=True)
        return [before, resource.getrlimit(resource.RLIMIT_AS)]

    _, (before, after) = _in_child(body)
    assert before == after


def test_threads_fit_in_a_small_budget():
    """One malloc arena: threads do not each reserve 64 MiB of address space."""

    def body():
        import threading

        rlimits.apply(spec(memory=64 * MiB))
        results = []

        def work():
            results.append(len(b"y" * MiB))

        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return results

    status, out = _in_child(body)
    assert out == [MiB] * 4, out


def test_cpu_time_budget_kills_with_sigxcpu():
    def body():
        rlimits.apply(spec(cpu_time=1))
        while True:
            pass

    t0 = time.monotonic()
    status, _ = _in_child(body, timeout=15)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU
    assert time.monotonic() - t0 < 5


def _fork_until_refused(limit: int, uid: int | None) -> dict[str, Any]:
    """Children block on a pipe; count successful forks, then release them."""
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    before = resource.getrlimit(resource.RLIMIT_NPROC)
    rlimits.apply(spec(pids=limit))
    r, w = os.pipe()
    kids, refused = [], None
    for _ in range(limit + 10):
        try:
            pid = os.fork()
        except OSError as e:
            refused = e.errno
            break
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        kids.append(pid)
    os.close(w)
    for k in kids:
        os.waitpid(k, 0)
    return {
        "forks": len(kids),
        "refused": refused,
        "before": before,
        "after": resource.getrlimit(resource.RLIMIT_NPROC),
    }


def test_pids_budget_for_unprivileged_user():
    status, out = _in_child(lambda: _fork_until_refused(5, 65534))
    assert "error" not in out, out
    # the runner is one of the 5 tasks: 4 more may exist
    assert out["forks"] == 4 and out["refused"] == errno.EAGAIN, out


def test_pids_not_set_for_root_which_bypasses_it():
    status, out = _in_child(lambda: _fork_until_refused(3, None))
    assert out["before"] == out["after"]
    assert out["forks"] == 13 and out["refused"] is None
    assert "pids" not in rlimits.enforced(spec(pids=3), root=True)
    assert "pids" in rlimits.enforced(spec(pids=3), root=False)


def test_fds_budget():
    def body():
        rlimits.apply(spec(fds=40))
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            err = e.errno
        return {"limit": limit, "highest": max(fds), "err": err}

    _, out = _in_child(body)
    assert out["limit"] == [40, 40]
    assert out["highest"] == 39 and out["err"] == errno.EMFILE


def test_fds_budget_keeps_room_for_pytest():
    def body():
        rlimits.apply(spec(fds=1))
        return [resource.getrlimit(resource.RLIMIT_NOFILE)[0], len(os.listdir("/proc/self/fd")) - 1]

    _, (limit, open_now) = _in_child(body)
    assert limit >= open_now + rlimits.FD_HEADROOM


def test_disk_budget_caps_file_size(tmp_path):
    target = tmp_path / "big"

    def body():
        rlimits.apply(spec(disk=1 * MiB))
        with open(target, "wb", buffering=0) as f:
            res = "written"
            try:
                data = memoryview(b"z" * (2 * MiB))
                while data:  # the write that crosses the limit is short, the next fails
                    data = data[f.write(data) :]
            except OSError as e:
                res = errno.errorcode[e.errno]
        return res

    status, out = _in_child(body)
    assert out == "EFBIG"
    assert target.stat().st_size == 1 * MiB


@pytest.mark.parametrize(
    "kw, cg, expected",
    [
        # RLIMIT_AS / RLIMIT_FSIZE / RLIMIT_CPU hold one process or file; the readings
        # checked against memory, disk and cpu_time are totals, so none is claimed.
        ({"memory": MiB}, False, set()),
        ({"memory": MiB}, True, set()),
        ({"cpu_time": 1.0, "fds": 10, "disk": MiB}, False, {"fds"}),
        ({"cpu": 0.5, "io": MiB, "timeout": 2.0}, False, set()),
    ],
)
def test_enforced(kw, cg, expected):
    assert rlimits.enforced(spec(**kw), cgroup_memory=cg, root=True) == expected


def test_apply_cost():
    """Measured: what apply() adds to every test (all budgets, as root)."""

    def body():
        t = time.perf_counter()
        rlimits.apply(spec(memory=512 * MiB, cpu_time=60, pids=100, fds=256, disk=64 * MiB))
        return time.perf_counter() - t

    took = sorted(_in_child(body)[1] for _ in range(9))[4]
    print(f"rlimits.apply median {took * 1e3:.3f} ms")
    assert took > 0  # its cost is printed, not asserted: speed is the bench's
