"""cgroups: one group per test, for hard limits, exact readings and a kill that misses nothing.

Why cgroups and not only rlimits: a cgroup sees the *whole* process tree of a test, even
processes that double-fork away from it, so its memory/pids/CPU figures are exact totals
and ``kill()`` cannot miss a daemonised grandchild. rlimits (``facets.rlimits``) are per
process and remain the fallback for tiers without a cgroup.

Host layouts handled (``CgroupHost.mode``):

- ``v2``: pure unified hierarchy. One group per test under a run-level parent whose
  ``cgroup.subtree_control`` enables memory, pids, cpu, io (whatever is available). The
  run parent goes into pytest's own cgroup (rootless: the delegated one, e.g. the scope
  of ``systemd-run --user --scope -p Delegate=yes``), or an ancestor if only that can
  give more controllers (see ``_v2_hierarchy``). cgroup v2's no-internal-process rule
  means a cgroup holding processes (our own, nearly always: a session scope, a CI
  runner's service, a container's root) cannot enable controllers for its children, so
  before the first test group is made its processes are moved into a leaf of it,
  ``pytest-isolate.leaf`` (``_vacate``), as container runtimes do, and the controllers
  are enabled; root also enables them on ancestors that left them off. Why not
  siblings of our cgroup under its parent: there the tests would escape the limits of
  the job, scope or container pytest runs in, a container's parent is out of reach, a
  rootless user may not write it, and its ``subtree_control`` is another unit's.
- ``v1``: one group per controller hierarchy (memory, cpu, cpuacct, pids, blkio, freezer),
  created under our own cgroup of each hierarchy (so an outer limit keeps applying).
- ``hybrid`` (systemd's hybrid layout, this project's CI host): the v1 controllers do the
  limiting; the controller-less cgroup2 at ``/sys/fs/cgroup/unified`` adds one more group
  per test purely for ``cgroup.kill`` (and core ``cpu.stat``).
- ``none``: nothing mounted; ``missing()`` says so.

Readings need no reset: every test gets a fresh group, whose peak counters start at 0.
On v1 a process that joins a memory group keeps its existing pages charged to its old
group (``move_charge_at_immigrate`` is 0), so ``peak_memory`` is what the test touched
*after* joining — the forked runner's shared interpreter pages are not counted, which is
what a memory budget means. After an OOM kill v1's ``memory.failcnt`` may stay 0, so
``oom_kills`` comes from ``memory.oom_control`` (v1) / ``memory.events`` (v2).

Cost per test on this host (hybrid: memory, cpuacct, pids + unified; cpu/blkio with a
limit), medians: probe (once per process) 0.26 ms; create 0.17–0.27 ms, attach (in the
forked child) 0.33 ms, read 0.17 ms, remove 0.07 ms — under 1 ms in all. ``kill`` of a
6-process tree through cgroup.kill: 2.1 ms. One attach in ~50 took 10 ms here: a
migration takes the global cgroup_threadgroup_rwsem, whose writer may wait for an RCU
grace period (cgroup2's ``favordynmods`` mount option trades that away).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Every host object of a run is named PREFIX + run_id, so ``sweep`` finds it.
PREFIX = "pytest-isolate-"
#: CFS period for CPU quotas: 100 ms is the kernel default and keeps throttling smooth.
CFS_PERIOD_US = 100_000
#: The kernel refuses quotas under 1 ms.
MIN_QUOTA_US = 1_000
#: v1 hierarchies we create groups in. cpuset/devices are left alone (cpuset needs
#: cpus/mems copied before a task can join; devices is the zone's business via mounts).
V1_USED = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer")
#: v2 controllers enabled for test groups when the host offers them.
V2_WANTED = ("memory", "pids", "cpu", "io")
_LIMIT_CTRL = {"memory": "memory", "pids": "pids", "cpu": "cpu", "io": "io"}
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_DELEGATE_HINT = "`systemd-run --user --scope -p Delegate=yes pytest ...`"
#: The leaf a v2 base's own processes are moved into so that it may enable controllers
#: for the run's groups (no-internal-process rule). Shared by every run and worker in
#: that cgroup, never named PREFIX + run id: it is no run's object, sweeps leave it, and
#: it holds whatever lived in the base (pytest, and the shell or CI agent beside it).
LEAF = "pytest-isolate.leaf"


@dataclass(frozen=True)
class Limits:
    """What the kernel enforces for one test's group.

    memory: bytes, hard (OOM kill at it, no swap beyond it); pids: max tasks;
    cpu: fraction of one CPU (0.5 → 50 ms per 100 ms); io: bytes/s, applied to reads
    and to writes each, on the block device backing ``/``. On v1 blkio throttles reads
    and direct/sync writes only: buffered writeback is not attributed to cgroups there.
    """

    memory: int | None = None
    pids: int | None = None
    cpu: float | None = None
    io: int | None = None

    def names(self) -> list[str]:
        return [k for k in ("memory", "pids", "cpu", "io") if getattr(self, k) is not None]


class CgroupUnavailable(RuntimeError):
    """A group with the requested limits cannot be made here; str() is one line."""


# -- small file helpers: raw os calls, cgroup files are tiny and this runs per test ----


def _read(path: Path | str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _write(path: Path | str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def _procs(d: Path) -> list[int]:
    try:
        return [int(x) for x in _read(d / "cgroup.procs").split()]
    except OSError:
        return []


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (major, minor)


def _writable(d: Path) -> bool:
    """Can we mkdir here and move a process out of here (cgroup.procs)?

    For rootless v2 the kernel also wants write access to cgroup.procs of the common
    ancestor of source and destination; our groups live below this base, so it is this.
    """
    return os.access(d, os.W_OK) and os.access(d / "cgroup.procs", os.W_OK)


def _boot_disabled() -> set[str]:
    """Controllers present in the kernel but disabled (cgroup_disable=, or not enabled)."""
    out: set[str] = set()
    try:
        for line in _read("/proc/cgroups").splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 4 and parts[3] == "0":
                out.add(parts[0])
    except OSError:
        pass
    return out


def _block_device(path: str = "/") -> tuple[str | None, str]:
    """The whole-disk ``MAJ:MIN`` backing ``path``: throttling refuses partitions."""
    try:
        dev = os.stat(path).st_dev
    except OSError as e:
        return None, f"cannot stat {path}: {e.strerror}"
    maj, mi = os.major(dev), os.minor(dev)
    if maj == 0:
        return None, (
            f"{path} is on a filesystem without a block device (device 0:{mi}, e.g. "
            "overlay, tmpfs or btrfs): io limits need / on a plain block device"
        )
    sysdir = Path(f"/sys/dev/block/{maj}:{mi}")
    if not sysdir.exists():
        return None, f"no block device {maj}:{mi} in /sys/dev/block for {path}"
    if (sysdir / "partition").exists():
        try:
            return _read(sysdir.resolve().parent / "dev").strip(), ""
        except OSError as e:
            return None, f"cannot find the disk of partition {maj}:{mi}: {e.strerror}"
    return f"{maj}:{mi}", ""


@dataclass
class _Hier:
    """One mounted hierarchy as we use it."""

    kind: str  # "v1" | "v2"
    mount: Path
    #: v1: controllers bound to it; v2: controllers our run parents can give their children.
    controllers: frozenset[str]
    base: Path | None  # where run parents are created; None = unusable (see why)
    why: str = ""
    #: v2: controllers to switch on in base/cgroup.subtree_control before use.
    enable_at_base: tuple[str, ...] = ()
    #: v2: controller → why it is unusable, with "{c}" standing for the controller name.
    whys: dict[str, str] = field(default_factory=dict)
    #: v2: (ancestor, controllers) to switch on, top-down, before ``enable_at_base``.
    enable_chain: tuple[tuple[Path, tuple[str, ...]], ...] = ()
    #: v2: the base holds processes: move them into ``base / LEAF`` before enabling.
    vacate: bool = False


def _parse_mounts(text: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount point, root inside the filesystem, super options) of cgroup mounts."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 5 or not r or r[0] not in ("cgroup", "cgroup2"):
            continue
        opts = set(r[2].split(",")) if len(r) > 2 else set()
        out.append((r[0], _unescape(f[4]), _unescape(f[3]), opts))
    return out


def _parse_own(text: str) -> dict[str, str]:
    """controller → own cgroup path; the v2 line ("0::/path") is keyed by ""."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not ctrls:
            own[""] = path
        for c in ctrls.split(","):
            if c:
                own[c] = path
    return own


def _under(mount: Path, mroot: str, path: str) -> Path | None:
    """Directory of cgroup ``path`` in a hierarchy mounted at ``mount`` with root ``mroot``."""
    mroot = mroot.rstrip("/") or "/"
    if mroot == "/":
        rel = path.lstrip("/")
    elif path == mroot or path.startswith(mroot + "/"):
        rel = path[len(mroot) :].lstrip("/")
    else:
        return None
    d = mount / rel if rel else mount
    return d if d.is_dir() else None


def _enabled_by_chain(
    chain: list[Path], idx: int, missing: set[str]
) -> tuple[dict[str, list[Path]], dict[str, Path]]:
    """Controllers ``chain[idx]`` lacks that its ancestors in ``chain`` can pass down to it.

    ``chain`` runs from our own cgroup (index 0) up. For each missing controller, walk
    up until an ancestor whose ``cgroup.controllers`` has it; every ancestor on the way
    (it included) must let us write its ``cgroup.subtree_control`` and hold no processes
    (the real root is exempt): those get ``+c``, top-down. Root can do this wherever
    systemd left a slice's controllers off (e.g. ``cpu`` or ``io`` not enabled for
    ``system.slice``); an unprivileged user cannot write above the delegated subtree.
    Returns (controller → dirs to enable it in, top-down) and (controller → the
    ancestor that blocked it, when one held processes).
    """
    got: dict[str, list[Path]] = {}
    blocked: dict[str, Path] = {}
    for c in missing:
        path: list[Path] = []
        for x in chain[idx + 1 :]:
            real_root = not (x / "cgroup.type").exists()
            if not os.access(x / "cgroup.subtree_control", os.W_OK):
                break
            if not real_root and _procs(x):
                blocked[c] = x
                break
            path.append(x)
            try:
                avail = set(_read(x / "cgroup.controllers").split())
            except OSError:
                break
            if c in avail:
                got[c] = list(reversed(path))
                break
    return got, blocked


def _v2_hierarchy(
    mount: Path, own_dir: Path, wanted: tuple[str, ...], uid: int, disabled: set[str]
) -> _Hier:
    """Pick where test groups go in a cgroup2 tree, and what it takes to get there.

    Candidates are our own cgroup and its ancestors up to the mount, filtered to the
    ones we may write (for rootless users: the delegated part). A candidate gives the
    wanted controllers already in its ``subtree_control``, plus — if we may write that
    file — those in its ``cgroup.controllers`` and those its writable, process-free
    ancestors can pass down (``_enabled_by_chain``). The candidate giving the most wanted
    controllers wins; ties go to the deepest, to stay as close to our own cgroup as
    possible: the outer limits (a CI job's scope, a container) keep applying to tests,
    and nothing is written into cgroups that belong to someone else.

    cgroup v2's no-internal-process rule: a cgroup holding processes cannot enable
    controllers for its children (the real root is exempt). Where the chosen base holds
    processes — pytest's own cgroup, always, unless it is the real root — its processes
    are moved into a leaf of it (``LEAF``) before the controllers are enabled
    (``vacate``), as container runtimes and systemd do; they stay inside the same
    cgroup subtree, so its limits and its unit's accounting still cover them. A probe
    from inside that leaf (a second pytest-xdist worker, a later run) plans from the
    leaf's parent, never a leaf inside the leaf.
    """
    if own_dir.name == LEAF and own_dir != mount:
        own_dir = own_dir.parent
    chain: list[Path] = []
    d = own_dir
    while True:
        chain.append(d)
        # Never climb out of a pytest-isolate test group: a pytest run inside a zone
        # test must stay under that test's limits, not make siblings of it.
        if (
            d == mount
            or mount not in d.parents
            or d.name.startswith(PREFIX)
            or d.parent.name.startswith(PREFIX)
        ):
            break
        d = d.parent
    want = set(wanted)
    best: tuple[int, int, _Hier] | None = None
    blocked: dict[str, Path] = {}
    for idx in range(len(chain) - 1, -1, -1):
        cand = chain[idx]
        depth = len(chain) - 1 - idx
        if not _writable(cand):
            continue
        try:
            avail = set(_read(cand / "cgroup.controllers").split())
            enabled = set(_read(cand / "cgroup.subtree_control").split())
        except OSError:
            continue
        real_root = not (cand / "cgroup.type").exists()
        try:
            ctype = "domain" if real_root else _read(cand / "cgroup.type").strip()
        except OSError:
            ctype = "?"
        usable = enabled & want
        chain_plan: dict[str, list[Path]] = {}
        # Only pytest's own cgroup is vacated: an ancestor's processes are not ours.
        busy = not real_root and bool(_procs(cand))
        if (
            os.access(cand / "cgroup.subtree_control", os.W_OK)
            and ctype == "domain"
            and (idx == 0 or not busy)
        ):
            chain_plan, why_blocked = _enabled_by_chain(chain, idx, want - avail - enabled)
            for c, x in why_blocked.items():
                blocked.setdefault(c, x)
            usable |= (avail | set(chain_plan)) & want
        to_enable = usable - enabled
        vacate = bool(to_enable) and busy
        steps: dict[Path, set[str]] = {}
        for c in sorted(to_enable & set(chain_plan)):
            for x in chain_plan[c]:
                steps.setdefault(x, set()).add(c)
        order = [x for x in reversed(chain[idx + 1 :]) if x in steps]  # top-down
        h = _Hier(
            "v2",
            mount,
            frozenset(usable),
            cand,
            enable_at_base=tuple(sorted(to_enable)),
            enable_chain=tuple((x, tuple(sorted(steps[x]))) for x in order),
            vacate=vacate,
        )
        score = (len(usable), depth)
        if best is None or score > best[:2]:
            best = (len(usable), depth, h)
    if best is None:
        who = "root" if uid == 0 else f"uid {uid}"
        return _Hier(
            "v2",
            mount,
            frozenset(),
            None,
            why=(
                f"no cgroup v2 directory from {own_dir} up to {mount} is writable by {who}"
                + (
                    f": run pytest under {_DELEGATE_HINT}"
                    if uid != 0
                    else " (read-only cgroup mount? in a container, mount cgroup2 read-write)"
                )
            ),
        )
    h = best[2]
    assert h.base is not None
    try:
        offered = set(_read(mount / "cgroup.controllers").split())
    except OSError:
        offered = set()
    try:
        base_avail = " ".join(sorted(set(_read(h.base / "cgroup.controllers").split()))) or "none"
    except OSError:
        base_avail = "?"
    for c in wanted:
        if c in h.controllers:
            continue
        if c in disabled:
            h.whys[c] = (
                "the {c} controller is disabled at boot: add cgroup_enable={c} to the kernel command line"
            )
        elif c not in offered:
            h.whys[c] = (
                f"cgroup2 at {mount} does not offer the {{c}} controller (bound to a v1 "
                "hierarchy, or not compiled in)"
            )
        elif c in blocked:
            h.whys[c] = (
                f"the {{c}} controller cannot be enabled for children of {blocked[c]}: it holds "
                "processes (cgroup v2 no-internal-process rule) and is not pytest's own "
                "cgroup: run pytest in a cgroup of its own below it "
                "(`systemd-run --scope -p Delegate=yes pytest ...`)"
            )
        elif uid != 0:
            h.whys[c] = (
                f"the {{c}} controller is not delegated to uid {uid}: {h.base} offers only "
                f"{base_avail} (cgroup.controllers) and its parent is not writable by uid {uid}: "
                f"run pytest under {_DELEGATE_HINT}"
                + (" with io delegated to user@.service" if c == "io" else "")
            )
        else:
            h.whys[c] = (
                f"the {{c}} controller cannot be enabled for {h.base}: no writable ancestor "
                f"up to {chain[-1]} offers it (cgroup.controllers)"
            )
    return h


class CgroupHost:
    """What this host's cgroups offer us, probed once (see ``detect``)."""

    def __init__(
        self,
        mode: str,
        v1: dict[str, _Hier],
        v2: _Hier | None,
        uid: int,
        io_device: str | None,
        io_why: str,
        why: str = "",
        v2_kill: bool = False,
        disabled: set[str] | None = None,
    ) -> None:
        self.mode = mode
        self.v1 = v1  # controller → hierarchy (co-mounted controllers share one object)
        self.v2 = v2
        self.uid = uid
        self.io_device = io_device
        self.io_why = io_why
        self.why = why  # why nothing at all is usable (mode "none", ...)
        self.v2_kill = v2_kill
        self.disabled = disabled or set()  # controllers switched off at boot
        self._parents: set[Path] = set()

    # -- probing ---------------------------------------------------------------------

    @classmethod
    def probe(
        cls,
        *,
        v1: bool = True,
        v2: bool = True,
        v2_mount: Path | str | None = None,
        v2_wanted: tuple[str, ...] = V2_WANTED,
        mountinfo: str | None = None,
        proc_cgroup: str | None = None,
    ) -> CgroupHost:
        """Probe the host. Tests use ``v1=False, v2_mount=<a cgroup2 mount>`` to drive
        the pure-v2 code path on a hybrid host, and ``v2=False`` for the v1-only one."""
        uid = os.geteuid()
        mounts = _parse_mounts(
            mountinfo if mountinfo is not None else _read("/proc/self/mountinfo")
        )
        own = _parse_own(proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup"))
        disabled = _boot_disabled()
        hiers: dict[str, _Hier] = {}
        if v1:
            for fstype, mp, mroot, opts in mounts:
                if fstype != "cgroup":
                    continue
                ctrls = opts & set(V1_USED)
                if not ctrls or any(c in hiers for c in ctrls):
                    continue
                path = next((own[c] for c in ctrls if c in own), None)
                d = _under(Path(mp), mroot, path) if path is not None else None
                if d is None:
                    h = _Hier(
                        "v1",
                        Path(mp),
                        frozenset(ctrls),
                        None,
                        why=f"own cgroup not visible under {mp}",
                    )
                elif not _writable(d):
                    h = _Hier(
                        "v1",
                        Path(mp),
                        frozenset(ctrls),
                        None,
                        why=(
                            f"cgroup v1 {','.join(sorted(ctrls))} hierarchy {d} is not writable by "
                            f"uid {uid}: run as root, or use a cgroup v2 host and {_DELEGATE_HINT}"
                        ),
                    )
                else:
                    h = _Hier("v1", Path(mp), frozenset(ctrls), d)
                for c in ctrls:
                    hiers[c] = h
        v2h: _Hier | None = None
        if not v2:
            v2_entries = []
        elif v2_mount is not None:
            v2_entries = [("cgroup2", str(v2_mount), "/", set())]
        else:
            v2_entries = [m for m in mounts if m[0] == "cgroup2"]
        if v2_entries and "" in own:
            _, mp, mroot, _ = v2_entries[0]
            d = _under(Path(mp), mroot, own[""])
            wanted = tuple(
                c for c in v2_wanted if c not in hiers and (c != "io" or "blkio" not in hiers)
            )
            if d is None:
                v2h = _Hier(
                    "v2",
                    Path(mp),
                    frozenset(),
                    None,
                    why=f"own cgroup {own['']} not visible under {mp}",
                )
            else:
                v2h = _v2_hierarchy(Path(mp), d, wanted, uid, disabled)
        has_v1 = any(c in hiers for c in ("memory", "cpu", "cpuacct", "pids", "blkio"))
        if has_v1 and v2h is not None:
            mode = "hybrid"
        elif has_v1:
            mode = "v1"
        elif v2h is not None:
            mode = "v2"
        else:
            mode = "none"
        io_device, io_why = _block_device("/")
        why = ""
        if mode == "none":
            why = "no cgroup filesystem is mounted (mount cgroup2 on /sys/fs/cgroup)"
        return cls(mode, hiers, v2h, uid, io_device, io_why, why, _kernel_at_least(5, 14), disabled)

    # -- queries ---------------------------------------------------------------------

    def _ctrl(self, ctrl: str) -> tuple[_Hier | None, str]:
        """The hierarchy enforcing ``ctrl`` (v2 name), or None and why not."""
        v1name = "blkio" if ctrl == "io" else ctrl
        h = self.v1.get(v1name)
        if h is not None:
            return (h, "") if h.base is not None else (None, h.why)
        if self.v2 is not None and self.v2.base is not None and ctrl in self.v2.controllers:
            return self.v2, ""
        if ctrl in self.disabled or v1name in self.disabled:
            extra = " swapaccount=1" if ctrl == "memory" else ""
            return None, (
                f"the {v1name} controller is disabled at boot: add cgroup_enable={v1name}{extra} "
                "to the kernel command line"
            )
        if self.v2 is not None:
            why = self.v2.why or self.v2.whys.get(ctrl) or f"cgroup2 at {self.v2.mount} lacks {{c}}"
            return None, why.replace("{c}", ctrl)
        return None, self.why or f"no {v1name} cgroup hierarchy is mounted"

    def _usable(self) -> list[_Hier]:
        seen: list[_Hier] = []
        for h in [*self.v1.values(), self.v2]:
            if h is not None and h.base is not None and all(h is not s for s in seen):
                seen.append(h)
        return seen

    def missing(self, limits: Limits) -> str | None:
        """None if a TestCgroup with ``limits`` can be made here, else one line saying
        which limit cannot be enforced, why, and how to enable it."""
        if self.mode == "none":
            return f"cgroups: {self.why}"
        probs: dict[str, list[str]] = {}  # reason → limit names (one clause per reason)
        for name in limits.names():
            h, why = self._ctrl(_LIMIT_CTRL[name])
            if h is None:
                tmpl = (self.v2.whys.get(name) if self.v2 is not None else None) or why
                probs.setdefault(tmpl, []).append(name)
            elif name == "io" and self.io_device is None:
                probs.setdefault(self.io_why, []).append(name)
        if not probs and not self._usable():
            whys = [h.why for h in [*self.v1.values(), self.v2] if h is not None and h.why]
            return "cgroups: " + (whys[0] if whys else "no usable cgroup hierarchy")
        clauses = []
        for tmpl, names in probs.items():
            label = ", ".join(names) + (" limits" if len(names) > 1 else " limit")
            clauses.append(f"{label}: " + tmpl.replace("{c}", ",".join(names)))
        return "; ".join(clauses) or None

    def enforceable(self, limits: Limits) -> set[str]:
        """Names of the limits in ``limits`` this host can enforce (for partial use)."""
        out = set()
        for name in limits.names():
            h, _ = self._ctrl(_LIMIT_CTRL[name])
            if h is not None and (name != "io" or self.io_device is not None):
                out.add(name)
        return out

    def describe(self) -> str:
        """One line for the pytest header."""
        if self.mode == "none":
            return f"cgroups: none ({self.why})"
        parts = []
        v1_ok = [c for c in V1_USED if c in self.v1 and self.v1[c].base is not None]
        v1_bad = [c for c in V1_USED if c in self.v1 and self.v1[c].base is None]
        if v1_ok:
            parts.append("v1 " + ",".join(v1_ok))
        if v1_bad:
            parts.append("v1 " + ",".join(v1_bad) + " not writable")
        if self.v2 is not None:
            if self.v2.base is None:
                parts.append("v2 unusable")
            else:
                feats = [c for c in V2_WANTED if c in self.v2.controllers]
                feats.append("kill" if self.v2_kill else "freeze")
                where = "" if self.mode == "hybrid" else f" under {self.v2.base}"
                if self.v2.vacate:
                    where += f" (its processes moved into {LEAF})"
                parts.append("v2 " + ",".join(feats) + where)
        return f"cgroups: {self.mode} ({'; '.join(parts)})"

    # -- group plumbing (used by TestCgroup and sweep) --------------------------------

    def _plan(self, limits: Limits) -> dict[str, _Hier]:
        """role → hierarchy for one test. Roles: memory, pids, cpu, cpuacct, io, v2, freezer."""
        plan: dict[str, _Hier] = {}
        for role in ("memory", "pids"):
            h, _ = self._ctrl(role)
            if h is not None:
                plan[role] = h
        if limits.cpu is not None:
            h, _ = self._ctrl("cpu")
            if h is not None:
                plan["cpu"] = h
        if limits.io is not None:
            h, _ = self._ctrl("io")
            if h is not None:
                plan["io"] = h
        v2 = self.v2 if self.v2 is not None and self.v2.base is not None else None
        acct = self.v1.get("cpuacct")
        if acct is not None and acct.base is not None:
            plan["cpuacct"] = acct
        elif v2 is not None:
            plan["cpuacct"] = v2
        if v2 is not None:
            plan["v2"] = v2
        else:
            fr = self.v1.get("freezer")
            if fr is not None and fr.base is not None:
                plan["freezer"] = fr
        return plan

    def _run_parent(self, h: _Hier, run_id: str) -> Path:
        assert h.base is not None
        return h.base / f"{PREFIX}{run_id}"

    def _make_parent(self, h: _Hier, parent: Path) -> None:
        if h.kind == "v2" and h.base is not None:
            for d, ctrls in h.enable_chain:
                _enable(d, ctrls)
            if h.vacate:
                _vacate(h.base, h.enable_at_base)
            elif h.enable_at_base:
                _enable(h.base, h.enable_at_base)
        try:
            os.mkdir(parent)
        except FileExistsError:
            pass
        if h.kind == "v2" and h.controllers:
            avail = set(_read(parent / "cgroup.controllers").split())
            enabled = set(_read(parent / "cgroup.subtree_control").split())
            need = sorted((h.controllers & avail) - enabled)
            if need:
                _write(parent / "cgroup.subtree_control", " ".join("+" + c for c in need))
        _record_parent(parent.name.removeprefix(PREFIX), parent)
        self._parents.add(parent)

    def _make_group(self, h: _Hier, run_id: str, name: str) -> Path:
        parent = self._run_parent(h, run_id)
        if parent not in self._parents:
            self._make_parent(h, parent)
        d = parent / name
        try:
            os.mkdir(d)
        except FileNotFoundError:  # the parent was swept meanwhile: make it again
            self._parents.discard(parent)
            self._make_parent(h, parent)
            os.mkdir(d)
        return d


def _enable(d: Path, ctrls: tuple[str, ...]) -> None:
    """Switch ``ctrls`` on in ``d``'s subtree_control (those not on already)."""
    enabled = set(_read(d / "cgroup.subtree_control").split())
    need = [c for c in ctrls if c not in enabled]
    if need:
        _write(d / "cgroup.subtree_control", " ".join("+" + c for c in need))


def _vacate(base: Path, ctrls: tuple[str, ...], timeout: float = 5.0) -> None:
    """Move every process of ``base`` into ``base / LEAF``, then enable ``ctrls`` there.

    What container runtimes do at a cgroup namespace's root (Docker-in-Docker's
    entrypoint, systemd's ``init.scope``): the no-internal-process rule lets a cgroup
    give controllers to its children only while it holds no process. Idempotent and
    safe to race with: pytest-xdist's workers all start in the same cgroup, and each
    may vacate it at its first test. A process forked in ``base`` during the move, or
    placed there by someone else, makes the enable fail with EBUSY: the loop moves it
    too and tries again. Once the controllers are on, the kernel refuses new members
    of ``base`` itself; children of the moved processes are born in the leaf.
    """
    leaf = base / LEAF
    try:
        os.mkdir(leaf)
    except FileExistsError:
        pass
    deadline = time.monotonic() + timeout
    while True:
        for pid in _procs(base):
            try:
                _write(leaf / "cgroup.procs", str(pid))
            except OSError as e:
                if e.errno != errno.ESRCH:  # ESRCH: it exited meanwhile
                    raise CgroupUnavailable(
                        f"cannot move process {pid} out of {base} into {leaf} (so that {base} "
                        f"may enable controllers for the tests' cgroups): {e.strerror}"
                    ) from None
        try:
            _enable(base, ctrls)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise CgroupUnavailable(
                    f"cannot enable {', '.join(ctrls)} in {base}/cgroup.subtree_control after "
                    f"moving its processes into {leaf}: {e.strerror}"
                ) from None


_HOST: CgroupHost | None = None


def detect() -> CgroupHost:
    """The host's cgroup layout, probed once per process (forked children inherit it)."""
    global _HOST
    if _HOST is None:
        _HOST = CgroupHost.probe()
    return _HOST


def _wait_empty(dirs: list[Path], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        if not any(_populated(d) for d in dirs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _populated(d: Path) -> bool:
    """Any live process in ``d`` or below (v2: cgroup.events; v1: cgroup.procs here)."""
    try:
        return _kv(_read(d / "cgroup.events")).get("populated", 0) == 1
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return bool(_procs(d))


def _freeze(d: Path, kind: str, on: bool) -> bool:
    try:
        if kind == "v2":
            _write(d / "cgroup.freeze", "1" if on else "0")
        else:
            _write(d / "freezer.state", "FROZEN" if on else "THAWED")
        return True
    except OSError:
        return False


def _kill_loop(dirs: list[Path], freezer: tuple[Path, str] | None, timeout: float = 5.0) -> bool:
    """SIGKILL everything in ``dirs`` until they are empty.

    Frozen first when a freezer is at hand, so a fork bomb cannot outrun the loop: the
    signals are queued while frozen and take effect at thaw, and a task with a pending
    SIGKILL cannot fork. Without a freezer the loop still converges: each round kills
    all current members, and a killed task cannot fork again.
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout
    while True:
        frozen = freezer is not None and _freeze(*freezer, on=True)
        pids = {p for d in dirs for p in _procs(d)} - {me}
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if frozen:
            assert freezer is not None
            _freeze(*freezer, on=False)
        if not pids:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


class TestCgroup:
    """The cgroup(s) of one test: one directory in every hierarchy it needs."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, host: CgroupHost, run_id: str, name: str, limits: Limits) -> None:
        if not _RUN_ID_RE.match(run_id) or not _RUN_ID_RE.match(name):
            raise ValueError(
                f"cgroup run id / name must match [A-Za-z0-9_.-]+: {run_id!r}, {name!r}"
            )
        problem = host.missing(limits)
        if problem:
            raise CgroupUnavailable(problem)
        self.host = host
        self.run_id = run_id
        self.name = name
        self.limits = limits
        self.dirs: dict[str, Path] = {}  # role → directory
        self.kinds: dict[str, str] = {}  # role → "v1" | "v2"
        self.leftover: list[str] = []  # dirs remove() could not delete (sweep will)
        made: dict[Path, Path] = {}
        try:
            for role, h in host._plan(limits).items():
                d = made.get(h.mount)
                if d is None:
                    d = host._make_group(h, run_id, name)
                    made[h.mount] = d
                self.dirs[role] = d
                self.kinds[role] = h.kind
            self._apply()
        except BaseException:
            self.remove()
            raise

    def _unique(self) -> list[Path]:
        out: list[Path] = []
        for d in self.dirs.values():
            if d not in out:
                out.append(d)
        return out

    def _apply(self) -> None:
        lim = self.limits
        if lim.memory is not None:
            d = self.dirs["memory"]
            if self.kinds["memory"] == "v1":
                _write(d / "memory.limit_in_bytes", str(lim.memory))
                # With swap accounting, also cap memory+swap, or the group swaps instead
                # of being OOM-killed at its budget.
                try:
                    _write(d / "memory.memsw.limit_in_bytes", str(lim.memory))
                except OSError:
                    pass
            else:
                _write(d / "memory.max", str(lim.memory))
                try:
                    _write(d / "memory.swap.max", "0")
                except OSError:
                    pass
        if lim.pids is not None:
            _write(self.dirs["pids"] / "pids.max", str(lim.pids))
        if lim.cpu is not None:
            quota = max(MIN_QUOTA_US, round(lim.cpu * CFS_PERIOD_US))
            d = self.dirs["cpu"]
            if self.kinds["cpu"] == "v1":
                _write(d / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(quota))
            else:
                _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
        if lim.io is not None:
            dev = self.host.io_device
            d = self.dirs["io"]
            if self.kinds["io"] == "v1":
                _write(d / "blkio.throttle.read_bps_device", f"{dev} {lim.io}")
                _write(d / "blkio.throttle.write_bps_device", f"{dev} {lim.io}")
            else:
                _write(d / "io.max", f"{dev} rbps={lim.io} wbps={lim.io}")

    def attach(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into every group; its future children inherit them.

        Call it before unsharing namespaces: after a user-namespace unshare the caller
        may no longer have the rights to write cgroup.procs.
        """
        val = str(pid) if pid else "0"  # "0" = the writer, whatever its PID namespace
        for d in self._unique():
            _write(d / "cgroup.procs", val)

    def read(self) -> dict:
        """Exact figures for the whole group; keys absent when this host cannot tell.

        ``write_bytes`` needs an io group: on v2 whenever the io controller is ours; on
        v1 only with an io limit (v1 blkio does not see buffered writeback, so without
        a limit it would read ~0 and rusage is the better source).
        """
        out: dict[str, float | int] = {}
        d = self.dirs.get("memory")
        if d is not None:
            try:
                if self.kinds["memory"] == "v1":
                    out["peak_memory"] = int(_read(d / "memory.max_usage_in_bytes"))
                    out["oom_kills"] = _kv(_read(d / "memory.oom_control")).get("oom_kill", 0)
                else:
                    try:
                        out["peak_memory"] = int(_read(d / "memory.peak"))
                    except FileNotFoundError:  # < 5.19: only the current figure
                        out["peak_memory"] = int(_read(d / "memory.current"))
                    out["oom_kills"] = _kv(_read(d / "memory.events")).get("oom_kill", 0)
            except OSError:
                pass
        d = self.dirs.get("pids")
        if d is not None:
            try:
                out["peak_pids"] = int(_read(d / "pids.peak"))
            except (OSError, ValueError):
                pass
            try:
                out["pids_max_hits"] = _kv(_read(d / "pids.events")).get("max", 0)
            except OSError:
                pass
        d = self.dirs.get("cpuacct")
        if d is not None:
            try:
                if self.kinds["cpuacct"] == "v1":
                    # usage is exact (scheduler runtime); the user/sys split is sampled
                    # at ticks, so scale the split to the exact total, as the kernel's
                    # cputime_adjust does for rusage and for v2's cpu.stat.
                    total = int(_read(d / "cpuacct.usage")) / 1e9
                    u = int(_read(d / "cpuacct.usage_user"))
                    s = int(_read(d / "cpuacct.usage_sys"))
                    out["cpu_user"] = total * u / (u + s) if u + s else total
                    out["cpu_sys"] = total * s / (u + s) if u + s else 0.0
                else:
                    st = _kv(_read(d / "cpu.stat"))
                    out["cpu_user"] = st.get("user_usec", 0) / 1e6
                    out["cpu_sys"] = st.get("system_usec", 0) / 1e6
            except OSError:
                pass
        d = self.dirs.get("cpu")
        out["cpu_throttled"] = 0.0  # no quota, no throttling
        if d is not None:
            try:
                st = _kv(_read(d / "cpu.stat"))
                if self.kinds["cpu"] == "v1":
                    out["cpu_throttled"] = st.get("throttled_time", 0) / 1e9
                else:
                    out["cpu_throttled"] = st.get("throttled_usec", 0) / 1e6
            except OSError:
                pass
        d = self.dirs.get("io")
        v2 = self.dirs.get("v2")
        try:
            if d is not None and self.kinds["io"] == "v1":
                total = 0
                for line in _read(d / "blkio.throttle.io_service_bytes_recursive").splitlines():
                    parts = line.split()
                    if len(parts) == 3 and parts[1] == "Write":
                        total += int(parts[2])
                out["write_bytes"] = total
            elif v2 is not None and "io" in self.host.v2.controllers:  # type: ignore[union-attr]
                total = 0
                for m in re.finditer(r"\bwbytes=(\d+)", _read(v2 / "io.stat")):
                    total += int(m.group(1))
                out["write_bytes"] = total
        except OSError:
            pass
        return out

    def procs(self) -> list[int]:
        """The processes in the group now, in any of its hierarchies: what a test left
        running, listed before ``kill`` so the report can name them."""
        return sorted({p for d in self._unique() for p in _procs(d)})

    def kill(self) -> None:
        """Kill every process in the group, however it got there; returns once empty."""
        dirs = self._unique()
        v2 = self.dirs.get("v2")
        if v2 is not None and self.host.v2_kill:
            try:
                _write(v2 / "cgroup.kill", "1")
            except OSError:
                pass
            else:
                _wait_empty([v2], 2.0)
            # On a hybrid host a process could have left the unified group only: look
            # at every hierarchy before trusting cgroup.kill alone.
            if not any(_populated(d) for d in dirs):
                return
        freezer: tuple[Path, str] | None = None
        if v2 is not None:
            freezer = (v2, "v2")
        elif "freezer" in self.dirs:
            freezer = (self.dirs["freezer"], "v1")
        _kill_loop(dirs, freezer)
        _wait_empty(dirs, 2.0)

    def remove(self) -> None:
        """rmdir every group; already-gone is fine; a busy one is killed and retried."""
        killed = False
        for d in self._unique():
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                        self.leftover.append(str(d))
                        break
                    if not killed:
                        self.kill()
                        killed = True
                    time.sleep(0.005)

    def __repr__(self) -> str:
        return f"TestCgroup({self.run_id}/{self.name}: {', '.join(map(str, self._unique()))})"


#: Run-dir file listing the absolute path of every run-level parent a run made. The run
#: groups live under each fork server's own cgroup of each hierarchy, which need not be
#: the sweeper's (another terminal, CI job or systemd scope): this is how a sweep from
#: elsewhere still finds them.
RECORD = "cgroups"


def _rundir(run_id: str) -> Path:
    return Path(f"/tmp/{PREFIX}{run_id}")


def _record_parent(run_id: str, parent: Path) -> None:
    """Append ``parent`` to the run dir's record, if the run dir is the controller's.

    Only when the run dir exists and is ours: tests of this module use run ids with no
    run dir, and a UML guest's /tmp is not the host's. One short O_APPEND write per
    parent and process, so concurrent fork servers never interleave within a line.
    """
    d = _rundir(run_id)
    try:
        st = os.stat(d, follow_symlinks=False)
        if not os.path.isdir(d) or st.st_uid != os.geteuid():
            return
        fd = os.open(d / RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError:
        return
    try:
        os.write(fd, (str(parent) + "\n").encode())
    except OSError:
        pass
    finally:
        os.close(fd)


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
