"""What a run leaves on the host, and what runs that died left: swept by run id.

Every host object a run creates carries its run id (docs/architecture.md, "Naming of
host objects"). ``sweep`` removes one run's objects (the controller's own, at its
session end). The run dir's ``owner`` record (``_write_owner``) names the controller
that owns the run; at its start every controller sweeps the runs whose owner is
certainly gone (``sweep_stale``, ``owner_dead``), their processes first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path


def sweep(run_id: str, rundir: Path, loaded_only: bool = False, search: bool = False) -> list[str]:
    """Remove everything carrying ``run_id``: mounts under the run dir, cgroups, the
    switch namespace, then the run dir. Safe to call twice.

    ``loaded_only``: skip the switch when this process never imported ``net``: only a
    controller makes the switch (importing ``net``), and one that made none need not pay
    ~0.5 s of pyroute2 import at every session end to find none. Cgroups are made by the
    fork servers, so they are always swept; so is all of a dead run (``sweep_stale``).

    The run dir goes last: it records where the run's cgroups are (the fork servers'
    cgroups, not necessarily the sweeper's). ``search``: also look for the run's cgroups
    in every hierarchy, for a dead run whose record may be incomplete.
    """
    removed: list[str] = []
    removed += _unmount_under(rundir)
    with contextlib.suppress(Exception):
        from pytest_isolate.facets import cgroup_sweep

        removed += cgroup_sweep.sweep(run_id, rundir=rundir, search=search)
    if not loaded_only or "pytest_isolate.facets.net" in sys.modules:
        with contextlib.suppress(Exception):
            from pytest_isolate.facets import net

            removed += net.sweep(run_id)
    if rundir.exists():
        shutil.rmtree(rundir, ignore_errors=True)
        removed.append(str(rundir))
    return removed


def _starttime(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "?"


def _identity() -> tuple[str, str]:
    """(boot id, pid namespace) of this process: what a pid in an owner record means.

    A pid names a process only within one pid namespace of one running kernel. A run
    inside a sandbox of another run sees the outer run's record under /tmp (a jail's or
    zone's root is an overlay of the host's; a UML guest has the host's /tmp read-only)
    but neither its pid namespace nor, in a guest, its kernel: the outer pid is absent
    there, and without these two fields the outer run looked dead and was swept (its
    cgroup, named by its run id, held the very test that swept it).
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        st = os.stat("/proc/self/ns/pid")
        pidns = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        pidns = "?"
    return boot, pidns


def _write_owner(rundir: Path) -> None:
    """``<pid> <start time> <boot id> <pid namespace>`` in ``rundir/owner``: enough for
    any other run to tell whether this one is alive, or whether it cannot know.

    Written to a temporary name and renamed, so a sweeper never reads half a record."""
    pid = os.getpid()
    boot, pidns = _identity()
    tmp = rundir / "owner.tmp"
    tmp.write_text(f"{pid} {_starttime(pid)} {boot} {pidns}\n", encoding="utf-8")
    tmp.rename(rundir / "owner")


def owner_dead(text: str, identity: tuple[str, str] | None = None) -> bool:
    """Whether the owner record ``text`` names a controller that is certainly gone.

    Only a record made in this kernel's boot and this pid namespace can say so: from
    anywhere else (a sandbox of that run, a UML guest, another container sharing /tmp)
    the pid means nothing here, so such a run is never "dead" from here; its own
    namespace's runs sweep it. A record without the two fields (written by an older
    version) is judged by its pid, as before.
    """
    fields = text.split()
    if len(fields) < 2 or not fields[0].isdigit():
        return False  # being written, or not a record of ours
    pid, start = fields[0], fields[1]
    if len(fields) >= 4 and tuple(fields[2:4]) != (identity or _identity()):
        return False
    return not (os.path.exists(f"/proc/{pid}") and _starttime(int(pid)) == start)


def sweep_stale() -> list[str]:
    """Sweep runs whose controller died without cleaning up (SIGKILL, a segfault in an
    unisolated test): the next session on the machine removes what they left — its
    processes, mounts, cgroups, switch namespace and run dir (``sweep``).

    Runs that are alive, or whose record was made in another pid namespace or kernel
    (``owner_dead``), are not touched: a run inside another's sandbox, and two runs side
    by side, each clean up only their own objects.
    """
    # Here, not with this module: that module imports this one.
    from pytest_isolate.facets.switch import sweep_stale_switches

    removed: list[str] = sweep_stale_switches()
    me = _identity()
    for owner in Path("/tmp").glob("pytest-isolate-*/owner"):
        try:
            text = owner.read_text(encoding="utf-8")
        except OSError:
            continue
        if not owner_dead(text, me):
            continue  # alive, not a recycled pid, or not ours to judge
        run_id = owner.parent.name.removeprefix("pytest-isolate-")
        removed += _kill_run_processes(run_id, owner.parent)
        removed += sweep(run_id, owner.parent, search=True)
    return removed


def _kill_run_processes(run_id: str, rundir: Path) -> list[str]:
    """SIGKILL what is left of a dead run's processes: those started with its
    environment (every worker and sandbox inherits the controller's
    ``PYTEST_ISOLATE_CANARY_UNIX``), those named after it (canary, switch holder), and
    those whose root or cwd is inside its run dir (a sandbox that cleared its
    environment). The fork servers see the controller die and stop their tests; this is
    for what could not (a stopped or wedged server, a test that escaped it).

    Never this process or its ancestors: a run started by a test of the dead run is its
    process too, and must live to sweep it. Cgroup members are killed by the cgroup
    sweep as well; this also reaches tiers without a cgroup.
    """
    name = f"pytest-isolate-{run_id}"
    env_mark = f"PYTEST_ISOLATE_CANARY_UNIX={name}".encode()
    argv_mark = name.encode()
    inside = str(rundir) + "/"
    spared = _ancestors()
    killed: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
            if not argv:
                continue  # a kernel thread or a zombie
            hit = any(arg == argv_mark or arg.startswith(argv_mark + b"-") for arg in argv.split(b"\0"))
            if not hit:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    hit = env_mark in f.read().split(b"\0")
            if not hit:
                places = (os.readlink(f"/proc/{pid}/root"), os.readlink(f"/proc/{pid}/cwd"))
                hit = any((p + "/").startswith(inside) for p in places)
        except OSError:
            continue  # gone, or not ours to read
        if hit:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(f"process {pid}")
    return killed


def _ancestors() -> set[int]:
    """This process and every process above it."""
    out: set[int] = set()
    pid = os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def _unmount_under(root: Path) -> list[str]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prefix = str(root)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return []
    mine = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    for p in sorted(set(mine), key=len, reverse=True):
        libc.umount2(p.encode(), 2)  # MNT_DETACH
    return mine
