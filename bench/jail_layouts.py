"""What a ``jail`` test's process layout costs in CPU, outside the plugin (root only).

The profiles of ``jail`` (docs/tiers.md) put the namespace's init at about a quarter of
a test's CPU, most of it in the kernel: the server forks each init from its warm heap,
the init forks the runner from the same heap, and both copies are torn down at exit.
This loop tells the parts apart on a heap the size of a collected session, so that a
new layout can be judged before it is built:

- ``init-per-test``: today's layout. A fork unshares mount, IPC and UTS namespaces into
  a fresh PID namespace, mounts a tmpfs and an overlay, and forks the runner.
- ``init-per-test-no-pidns``: the same without the PID namespace: what the PID namespace
  itself costs.
- ``holder``: a process forked once into a PID namespace of its own (its PID 1) forks
  each runner, which unshares mount, IPC and UTS and builds its root itself: one fork of
  the heap per test instead of two.
- ``one-fork``: the runner forked by the parent, the same namespaces and mounts, no PID
  namespace: the floor of the namespaced layouts.

The runner reads 600 objects spread over the heap (their reference counts are written:
copy-on-write faults, as a test's protocol causes) and exits. Per test: wall time, and
CPU of every process of the layout (``RUSAGE_SELF`` + ``RUSAGE_CHILDREN``; the kernel's
own workers, which dismantle namespaces, are not counted).

    python bench/jail_layouts.py --tests 200 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _pytest.fixtures  # noqa: E402,F401 - the heap of a pytest process
import _pytest.python  # noqa: E402,F401
import pytest  # noqa: E402,F401

from pytest_isolate.facets import mounts  # noqa: E402
from pytest_isolate.facets import namespaces as ns  # noqa: E402

#: A heap of ~60 MiB of small objects, the size of a mid-sized collected session.
DATA = [{"k": i, "v": str(i), "l": [i, i + 1]} for i in range(120_000)]
HOT = random.Random(1).sample(range(len(DATA)), 600)
SANDBOX_NS = ns.CLONE_NEWNS | ns.CLONE_NEWIPC | ns.CLONE_NEWUTS


def build_root(box: str) -> None:
    """A jail's root in small: a private mount tree, a tmpfs, an overlay on it."""
    mounts.make_private("/")
    mounts.mount_tmpfs(box, mode=0o700)
    for sub in ("upper", "work", "root"):
        os.mkdir(f"{box}/{sub}")
    mounts.mount_overlay(f"{box}/root", "/usr", f"{box}/upper", f"{box}/work")


def runner() -> None:
    for i in HOT:
        DATA[i]["k"]  # noqa: B018 - the read writes the reference count
    os._exit(0)


def sandboxed_runner(box: str) -> None:
    """Fork a runner that makes its own namespaces and root, and wait for it."""
    r = os.fork()
    if r == 0:
        ns.unshare(SANDBOX_NS)
        build_root(box)
        runner()
    os.waitpid(r, 0)


def init_per_test(n: int, box: str, pidns: bool = True) -> None:
    own = os.open("/proc/self/ns/pid", os.O_RDONLY)
    try:
        for _ in range(n):
            if pidns:
                ns.unshare(ns.CLONE_NEWPID)
            pid = os.fork()
            if pid == 0:
                ns.unshare(SANDBOX_NS)
                build_root(box)
                r = os.fork()
                if r == 0:
                    runner()
                os.waitpid(r, 0)
                os._exit(0)
            if pidns:
                ns.setns(own, ns.CLONE_NEWPID)
            os.waitpid(pid, 0)
    finally:
        os.close(own)


def holder(n: int, box: str) -> None:
    own = os.open("/proc/self/ns/pid", os.O_RDONLY)
    to_r, to_w = os.pipe()
    back_r, back_w = os.pipe()
    ns.unshare(ns.CLONE_NEWPID)
    h = os.fork()
    if h == 0:
        os.close(to_w)
        os.close(back_r)
        while os.read(to_r, 1):
            sandboxed_runner(box)
            os.write(back_w, b"x")
        os._exit(0)
    ns.setns(own, ns.CLONE_NEWPID)
    for fd in (to_r, back_w, own):
        os.close(fd)
    for _ in range(n):
        os.write(to_w, b"x")
        os.read(back_r, 1)
    os.close(to_w)
    os.close(back_r)
    os.waitpid(h, 0)


def one_fork(n: int, box: str) -> None:
    for _ in range(n):
        sandboxed_runner(box)


def measure(fn: Callable[[int, str], None], n: int, box: str) -> tuple[float, float]:
    """(wall ms, CPU ms) per test."""
    fn(10, box)  # warm
    t0 = time.perf_counter()
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    fn(n, box)
    c, d = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(x.ru_utime + x.ru_stime for x in (c, d)) - sum(x.ru_utime + x.ru_stime for x in (a, b))
    return (time.perf_counter() - t0) / n * 1e3, cpu / n * 1e3


LAYOUTS: dict[str, Callable[[int, str], None]] = {
    "init-per-test": init_per_test,
    "init-per-test-no-pidns": lambda n, box: init_per_test(n, box, pidns=False),
    "holder": holder,
    "one-fork": one_fork,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("jail_layouts.py: needs root (it unshares namespaces and mounts)")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="jail-layouts-") as box:
        for _ in range(args.rounds):  # interleaved: the host's load drifts
            for name, fn in LAYOUTS.items():
                results[name].append(measure(fn, args.tests, box))
    print(f"{'layout':<24} {'wall ms/test':>13} {'CPU ms/test':>12}   (median of {args.rounds} rounds)")
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"{name:<24} {wall:>13.2f} {cpu:>12.2f}   CPU each round: {', '.join(f'{r[1]:.2f}' for r in rows)}")


if __name__ == "__main__":
    main()
