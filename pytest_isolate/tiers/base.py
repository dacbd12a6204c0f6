"""The contract between the fork server and a tier.

The fork server (``forkserver.py``) owns the test protocol; a tier owns only *how the
process that runs the test is confined*. For each test the server calls, in order:

    box = Box(...)
    tier.prepare(box)                 # host side, in the server, before any fork
    pid = tier.spawn(box, run)        # forks; the confined process calls run()
    ... server waits on pid, reading wire messages from box.result_fd's read end ...
    tier.kill(box, pid)               # only on timeout / shutdown: kill the whole tree
    tier.finish(box, pid, status, ru) # host side, after pid is reaped: readings, cleanup
    tier.release(box)                 # only after a "released" frame: pid reaped at last
    tier.tidy()                       # later, while another test runs: what no answer needs

``run`` never returns: it runs the test protocol and ``os._exit``s with 0. If the pid
the server waits on is not the process that called ``run`` (e.g. a PID-namespace init
sits between them), the tier must send ``{"t": "exit", "status": <raw wait status of
the runner>, "rusage": rusage_dict(ru)}`` on ``box.result_fd`` once the runner is done,
so crashes are reported with the runner's real signal/exit code. Such a tier may then
send ``{"t": "released", ...}`` as its last frame: nothing of the test runs any more
and everything ``finish`` reads is in place (the server keeps the frame in
``box.state["released"]``). The server answers at once (``finish`` runs while ``pid``
is still exiting) and reaps ``pid`` later, then calls ``release``.

Tiers compose facets (``pytest_isolate.facets``) in a fixed order, as nsjail does:
cgroup join → namespaces → mounts/root → hostname → network → devices → rlimits →
capabilities → no_new_privs/setsid → seccomp (zone) → run.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from pytest_isolate.spec import IsolationSpec

#: How ``Tier.entry`` marks a sandbox that a holder's zygote builds itself (jail.py):
#: ``holder:<tier>:<plan>`` instead of a root to chroot into.
HOLDER_ENTRY = "holder:"


class Unavailable(Exception):
    """The tier cannot run on this host; str() is one line: what is missing, how to fix."""


@dataclass
class WorkerContext:
    """Facts shared by every test one fork server runs."""

    run_id: str  # short id of this pytest run; every host object we create carries it
    rundir: Path  # host dir of the run; the controller removes it at session end
    workdir: Path  # this worker's dir under rundir
    rootdir: Path  # pytest rootdir: visible at its usual path inside sandboxes
    basetemp: Path  # pytest basetemp: bound read-write so tmp_path works as usual
    invocation_dir: Path
    switch_netns: str | None = None  # path of the run's switch netns (network="ip")
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Box:
    """One test's sandbox, as the host side (fork server) sees it."""

    nodeid: str
    spec: IsolationSpec
    index: int  # sequence number within the worker: unique names for host objects
    hostname: str  # UTS name for tiers with their own UTS namespace
    result_fd: int  # write end of the message pipe; inherited by the child
    usage: dict[str, Any] = field(default_factory=dict)  # readings (observe.usage shape)
    notes: list[str] = field(default_factory=list)  # report lines ("OOM-killed", ...)
    events: list[dict[str, Any]] = field(default_factory=list)  # escape/overuse records
    state: dict[str, Any] = field(default_factory=dict)  # tier-private


class Tier:
    """Base tier: subclasses override what they confine."""

    name: ClassVar[str] = ""
    #: True when the pid ``spawn`` returns is the process that calls ``run``: the server
    #: may then answer as soon as the runner says it is done and reap it afterwards.
    direct: ClassVar[bool] = False

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    @classmethod
    def availability(cls) -> str | None:
        """None when this host can run the tier, else one line: what is missing and how
        to enable it. Called once per run on the controller (cheap probes only)."""
        return None

    def prepare(self, box: Box) -> None:
        """Host-side set-up before the fork (e.g. create the test's cgroup)."""

    def spawn(self, box: Box, run: Callable[[], NoReturn]) -> int:
        raise NotImplementedError

    def entry(self, box: Box) -> tuple[str, str] | None:
        """How a child forked elsewhere (the fork server's spawner) enters this prepared
        sandbox: the root to chroot into and the cwd in it. None: only ``spawn`` can
        make its child (namespaces, an init between the server and the runner)."""
        return None

    def own_pids(self) -> set[int]:
        """Children of the server that are the tier's own, not a test's leftovers."""
        return set()

    def kill(self, box: Box, pid: int) -> None:
        """Kill everything the test started, not only ``pid``."""
        kill_tree(pid)

    def finish(self, box: Box, pid: int, status: int, rusage: resource.struct_rusage | None) -> None:
        """Host-side readings and clean-up after ``pid`` was reaped."""

    def release(self, box: Box) -> None:
        """After ``finish``, once the last process of a sandbox whose init answered
        before exiting ("released", jail.py) is reaped: what needs them all gone."""

    def tidy(self) -> None:
        """Clean-up that ``finish`` left for later because no answer depends on it (a
        root's unmounting and removal): the server calls this once the next test runs,
        and before ``close``. Problems go to the server's log; nothing of a test's
        answer waits for it."""

    def close(self) -> None:
        """Release per-worker resources at worker shutdown."""


def fork_child(body: Callable[[], NoReturn]) -> int:
    """fork(); the child runs ``body`` and never returns into the caller's stack.

    Any exception escaping ``body`` is printed and the child exits 70 (EX_SOFTWARE):
    a confinement step that fails must not fall back into the fork server's loop.
    """
    pid = os.fork()
    if pid == 0:
        try:
            body()
        except BaseException:  # noqa: BLE001 - last resort in a forked child
            import traceback

            try:
                traceback.print_exc()
            finally:
                os._exit(70)
        os._exit(0)
    return pid


#: How long processes a test left are given to finish exiting on their own.
EXIT_GRACE = 0.2


def still_running(pids: Iterable[int], grace: float = EXIT_GRACE) -> list[int]:
    """Those of ``pids`` still running after up to ``grace`` seconds.

    A test may end with a process on its way out: execnet's ``gw.exit()`` sends its
    gateway the word and returns, and the gateway is gone ~20 ms later. In-process that
    is nothing; killed and reported at once, it was a daemon escape that failed 20 of
    execnet's passing tests. A process that is still there after the grace (a daemon)
    costs its test the wait."""
    pids = list(pids)
    end = time.monotonic() + grace
    while True:
        live = [p for p in pids if _state(p) not in ("Z", "X", "")]
        if not live or time.monotonic() >= end:
            return live
        time.sleep(0.002)


def describe_procs(pids: Iterable[int]) -> list[dict[str, Any]]:
    """``{"pid", "cmdline"}`` of each live process, for the report's ``leftovers`` (a
    process already gone, or a zombie, is left out).

    A process caught inside ``execve`` has no command line yet: the new image's
    arguments are set up after its parent may already go on (``subprocess.Popen`` returns
    once the exec has begun), and on a busy host that takes milliseconds. Skipped, such a
    process was neither reported nor killed with its test, and was found at the next
    test's end and blamed on it. Its arguments are waited for (up to 0.2 s), else it is
    named by its ``comm``."""
    out = []
    for p in pids:
        cmdline = _cmdline(p)
        if cmdline == "":
            cmdline = exec_cmdline(p)
        if cmdline:
            out.append({"pid": p, "cmdline": cmdline})
    return out


def exec_cmdline(pid: int, wait: float = 0.2) -> str:
    """The command line of a live process that showed none: one inside ``execve``
    (see ``describe_procs``), once its arguments are there, else ``[comm]``; "" for a
    zombie or a process that is gone."""
    end = time.monotonic() + wait
    while _state(pid) not in ("Z", "X", ""):
        cmdline = _cmdline(pid)
        if cmdline:
            return cmdline
        if time.monotonic() >= end:
            return f"[{_comm(pid)}]"
        time.sleep(0.002)
    return ""


def _cmdline(pid: int) -> str | None:
    """``/proc/<pid>/cmdline`` as text; None: gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _state(pid: int) -> str:
    """The state letter of ``/proc/<pid>/stat`` ("" when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return "?"


def children(pid: int) -> list[int]:
    """Live children of ``pid`` (via /proc/<pid>/task/*/children)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children", encoding="utf-8") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid``, deepest last."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Kill ``pid`` and every descendant; stop them first so none can fork meanwhile."""
    procs = [pid, *descendants(pid)]
    for p in procs:
        try:
            os.kill(p, signal.SIGSTOP)
        except OSError:
            pass
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except OSError:
            pass


def rusage_dict(ru: resource.struct_rusage | None) -> dict[str, float]:
    """The rusage fields reports use, JSON-ready (maxrss in bytes)."""
    if ru is None:
        return {}
    return {
        "cpu_user": ru.ru_utime,
        "cpu_sys": ru.ru_stime,
        "max_rss": ru.ru_maxrss * 1024,
        "write_bytes": float(ru.ru_oublock * 512),
    }


def holds_sockets(pid: int) -> bool:
    """Whether ``pid`` (still exiting, not reaped) has a socket open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                return True
    return False
