"""rlimits: the per-process budgets every tier can apply, just before the test runs.

rlimits are the only enforcement tiers without a cgroup have (process, chroot, jail),
and they complement a cgroup in the zone. They are *per process* and inherited across
fork/exec: each process of a test gets the same allowance, none of them counts the
tree. Totals come from the cgroup (zone) or the sampler (``observe.usage``), which is
why ``enforced()`` says exactly which budgets an rlimit stands behind.

Decisions, and why:

- ``memory`` → ``RLIMIT_AS`` only without a memory cgroup. It caps *address space*,
  which for a warm pytest process is far above its RSS (mapped libraries, reserved
  heaps), so the limit is ``current address space + budget``: the test may map
  ``memory`` more bytes than the runner had when it started. An allocation beyond
  that raises ``MemoryError`` (instead of an OOM kill, which would lose the report).
  glibc reserves 64 MiB of address space per malloc arena, and a new thread that
  mallocs gets a new arena, so we cap glibc to one arena (``mallopt(M_ARENA_MAX, 1)``);
  each thread still maps its stack (``RLIMIT_STACK``, usually 8 MiB), which counts.
- ``cpu_time`` → ``RLIMIT_CPU`` (whole seconds, rounded up, on top of the CPU the
  process already used): SIGXCPU at the budget, SIGKILL one second later.
- ``pids`` → ``RLIMIT_NPROC``. The kernel counts *every* task of the real uid (in the
  current user namespace), not this test's, so the limit is the uid's other tasks +
  the budget, the runner being one of the budget's tasks (as with ``pids.max``). Root
  (uid 0 of the initial user namespace) bypasses RLIMIT_NPROC entirely, so it is not
  set for root: use the zone's cgroup for a real pids limit. Counting scans /proc:
  ~1–2 ms when the uid has a few hundred processes.
- ``fds`` → ``RLIMIT_NOFILE``, ``ulimit -n`` semantics (per process, highest fd + 1).
  Raised to the runner's open descriptors + 4 when lower, so pytest itself can still
  capture output.
- ``disk`` → ``RLIMIT_FSIZE``: a cap per *file*, not a total. CPython ignores SIGXFSZ,
  so an oversize write fails with ``OSError(EFBIG)``; subprocesses started by
  ``subprocess`` get SIGXFSZ back to default and are killed by it.

So ``memory``, ``cpu_time`` and ``disk`` stop a single process or file, but the
readings they are checked against are totals; ``enforced()`` does not claim them.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource

from pytest_isolate.spec import IsolationSpec

#: Descriptors left free above the runner's open ones, whatever ``fds`` says.
FD_HEADROOM = 4
_M_ARENA_MAX = -8
try:  # loaded at import (in the fork server): dlopen in every forked child costs ~0.3 ms
    _mallopt = ctypes.CDLL(None).mallopt
except (OSError, AttributeError):  # not glibc
    _mallopt = None


def _vm_size() -> int:
    """Address space of this process now (first field of statm, in pages)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _global_root() -> bool:
    """Is our real uid 0 of the initial user namespace (the one RLIMIT_NPROC spares)?

    Inside a user namespace the uid 0 we see may map to an unprivileged uid outside;
    /proc/self/uid_map tells the parent namespace's uid (one level, which is what the
    tiers create).
    """
    uid = os.getuid()
    try:
        with open("/proc/self/uid_map", encoding="utf-8") as f:
            for line in f:
                inside, outside, count = (int(x) for x in line.split())
                if inside <= uid < inside + count:
                    return outside + (uid - inside) == 0
    except (OSError, ValueError):
        pass
    return uid == 0


def _tasks_of(uid: int) -> int | None:
    """Tasks (threads) whose real uid is ``uid``, as visible in /proc; None if no /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    n = 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        real = threads = None
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                real = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
        if real == uid:
            n += threads or 1
    return n


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own descriptor
    except OSError:
        return 0


def _set(res: int, soft: int, hard: int | None = None) -> None:
    """Lower to (soft, hard), never above the current hard limit (only root may raise)."""
    _, cur_hard = resource.getrlimit(res)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))


def enforced(
    spec: IsolationSpec,
    cgroup_memory: bool = False,
    cgroup_pids: bool = False,
    root: bool | None = None,
) -> set[str]:
    """The budget keys whose *reading* the rlimits ``apply`` sets hold (for
    ``observe.usage.check``, which turns the rest into observed-only records).

    A per-process or per-file limit holds a reading only when the reading is per
    process too: ``fds`` (``fds_peak`` is one process's count) and ``pids`` (RLIMIT_NPROC
    counts the uid's tasks, so the tree's total is held). ``memory``, ``disk`` and
    ``cpu_time`` are read as totals (the sampled tree, bytes over all files, the tree's
    CPU) that three processes or three files can pass while each stays under its own
    RLIMIT_AS / RLIMIT_FSIZE / RLIMIT_CPU, so they are not listed. When such a limit
    does stop the test by its signal (SIGXCPU, SIGXFSZ), ``check`` sees the signal and
    marks that record enforced itself; a ``MemoryError`` or ``EFBIG`` inside one process
    fails the test by its own exception and leaves the total under the budget.

    ``cgroup_memory`` is kept for callers: with a memory cgroup the rlimit is not set,
    and nothing here claims ``memory`` either way. ``root``: whether the test runs as
    the initial namespace's root (default: this process is), which makes RLIMIT_NPROC a
    no-op.
    """
    del cgroup_memory
    if root is None:
        root = _global_root()
    out = {"fds"} if spec.fds is not None else set()
    if spec.pids is not None and not cgroup_pids and not root:
        out.add("pids")
    return out


def apply(spec: IsolationSpec, cgroup_memory: bool = False, cgroup_pids: bool = False) -> None:
    """Set the rlimits of ``spec`` on the calling process (the test's runner).

    ``cgroup_memory``/``cgroup_pids``: a cgroup already enforces that budget for the
    whole tree, so the per-process rlimit is left alone.
    """
    if spec.memory is not None and not cgroup_memory:
        if _mallopt is not None:
            _mallopt(_M_ARENA_MAX, 1)
        _set(resource.RLIMIT_AS, _vm_size() + spec.memory)
    if spec.cpu_time is not None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(ru.ru_utime + ru.ru_stime + spec.cpu_time)
        _set(resource.RLIMIT_CPU, soft, soft + 1)
    if spec.pids is not None and not cgroup_pids and not _global_root():
        count = _tasks_of(os.getuid())
        if count is not None:
            mine = max(1, len(os.listdir("/proc/self/task")))
            _set(resource.RLIMIT_NPROC, count - mine + spec.pids)
    if spec.fds is not None:
        _set(resource.RLIMIT_NOFILE, max(spec.fds, _open_fds() + FD_HEADROOM))
    if spec.disk is not None:
        _set(resource.RLIMIT_FSIZE, spec.disk)
