"""Removing what a run left in cgroups: every hierarchy, whoever made the groups.

Apart from the per-test group (``facets.cgroups``) because it answers for a whole run,
after the fact and possibly from another process: the controller's clean-up at the
session's end and of a dead run (``sweep_stale``). A run's parents may sit under any
fork server's own cgroup, so besides where this process would put them it reads the
run dir's record (``cgroup_host.RECORD``) and, for a dead run, searches every hierarchy.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from pytest_isolate.facets.cgroup_host import (
    PREFIX,
    RECORD,
    CgroupHost,
    _parse_mounts,
    _read,
    _rundir,
    _writable,
    _write,
    detect,
)
from pytest_isolate.facets.cgroups import _RUN_ID_RE, _kill_loop, _wait_empty


def _cgroup_mounts() -> list[tuple[Path, str, set[str]]]:
    """(mount point, "v1" | "v2", super options) of every cgroup hierarchy mounted here."""
    try:
        mounts = _parse_mounts(_read("/proc/self/mountinfo"))
    except OSError:
        return []
    out: list[tuple[Path, str, set[str]]] = []
    seen: set[Path] = set()
    for fstype, mp, _root, opts in mounts:
        if Path(mp) not in seen:
            seen.add(Path(mp))
            out.append((Path(mp), "v2" if fstype == "cgroup2" else "v1", opts))
    return out


def _mount_of(d: Path, mounts: list[tuple[Path, str, set[str]]]) -> tuple[Path, str, set[str]] | None:
    best = None
    for m in mounts:
        if m[0] in d.parents and (best is None or len(str(m[0])) > len(str(best[0]))):
            best = m
    return best


def _recorded(run_id: str, rundir: Path | None) -> list[Path]:
    """Run parents listed in the run dir's record, only those that can be ours.

    The run dir sits in world-writable /tmp and the sweeper may be root: a record owned
    by someone else is ignored, and a line counts only if it names a directory called
    ``pytest-isolate-<run_id>`` inside a cgroup hierarchy (nothing else gets killed).
    """
    path = (rundir or _rundir(run_id)) / RECORD
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return []
    try:
        if os.fstat(fd).st_uid not in (0, os.geteuid()):
            return []
        text = os.read(fd, 1 << 20).decode(errors="replace")
    except OSError:
        return []
    finally:
        os.close(fd)
    out: list[Path] = []
    for line in text.splitlines():
        d = Path(os.path.normpath(line.strip() or "."))
        if d.is_absolute() and d.name == f"{PREFIX}{run_id}" and ".." not in d.parts and d not in out:
            out.append(d)
    return out


def _search(run_id: str, mounts: list[tuple[Path, str, set[str]]]) -> list[Path]:
    """Every directory named ``pytest-isolate-<run_id>`` in every hierarchy, wherever it is.

    For a run that died without a record (or whose record is gone): its groups may sit
    under any cgroup. One scandir per cgroup directory, ~1 ms for a small host's tree;
    only sweeps of dead runs pay it. A found group's subtree is not searched further.
    """
    want = f"{PREFIX}{run_id}"
    out: list[Path] = []
    stack = [m for m, _, _ in mounts]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                subs = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for s in subs:
            if s.name == want:
                out.append(s)
            else:
                stack.append(s)
    return out


def _sweep_parent(parent: Path, kind: str, v2_kill: bool, freezer: bool) -> list[str]:
    """Kill everything in a run parent's subtree and rmdir it all, deepest first."""
    removed: list[str] = []
    dirs = [Path(dp) for dp, _, _ in os.walk(parent, topdown=False)]
    killed = False
    if kind == "v2" and v2_kill:
        try:
            _write(parent / "cgroup.kill", "1")  # recursive: the whole subtree
            killed = _wait_empty([parent], 2.0)
        except OSError:
            pass
    if not killed:
        frz = (parent, "v2") if kind == "v2" else ((parent, "v1") if freezer else None)
        _kill_loop(dirs, frz)
    for d in dirs:  # os.walk(topdown=False) lists children before parents
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(d)
                removed.append(str(d))
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    break
                _kill_loop([d], None, timeout=0.5)
                time.sleep(0.005)
    return removed


def sweep(
    run_id: str, host: CgroupHost | None = None, rundir: Path | None = None, search: bool = False
) -> list[str]:
    """Kill and remove everything run ``run_id`` left in any hierarchy; deepest first.

    Looks where this process would put the run's groups, where the run dir's record
    says the run put them (``rundir``, default ``/tmp/pytest-isolate-<run_id>``), and,
    with ``search`` (a dead run's sweep), in every hierarchy: a run started from another
    cgroup made its groups under that one. Sweep before removing the run dir.
    """
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}")
    host = host or detect()
    removed: list[str] = []
    done: set[Path] = set()
    for h in host._usable():
        parent = host._run_parent(h, run_id)
        done.add(parent)
        if parent.is_dir():
            removed += _sweep_parent(parent, h.kind, host.v2_kill, "freezer" in h.controllers)
        host._parents.discard(parent)
    mounts = _cgroup_mounts()
    extra = _recorded(run_id, rundir) + (_search(run_id, mounts) if search else [])
    for parent in extra:
        if parent in done:
            continue
        done.add(parent)
        m = _mount_of(parent, mounts)
        if m is None or os.path.realpath(parent) != str(parent) or not parent.is_dir():
            continue
        if not _writable(parent):  # another user's run: no killing, no waiting on it
            continue
        removed += _sweep_parent(parent, m[1], host.v2_kill, "freezer" in m[2])
        host._parents.discard(parent)
    return removed
