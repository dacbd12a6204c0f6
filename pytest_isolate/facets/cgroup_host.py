"""What this host's cgroups can enforce, and where a run's groups go: probed once.

Apart from the per-test group (``facets.cgroups``) because it changes with hosts, not
with tests: which hierarchies are mounted, which controllers are ours to use (kernel,
systemd, container, delegation), and what making a run parent takes there. ``detect``
probes once per process; ``CgroupHost.missing`` says in one line why ``Limits`` cannot
be enforced; the parents made are recorded in the run dir for ``facets.cgroup_sweep``.

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
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Every host object of a run is named PREFIX + run_id, so ``cgroup_sweep.sweep`` finds it.
PREFIX = "pytest-isolate-"
#: v1 hierarchies we create groups in. cpuset/devices are left alone (cpuset needs
#: cpus/mems copied before a task can join; devices is the zone's business via mounts).
V1_USED = ("memory", "cpu", "cpuacct", "pids", "blkio", "freezer")
#: v2 controllers enabled for test groups when the host offers them.
V2_WANTED = ("memory", "pids", "cpu", "io")
_LIMIT_CTRL = {"memory": "memory", "pids": "pids", "cpu": "cpu", "io": "io"}
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


#: Run-dir file listing the absolute path of every run-level parent a run made. The run
#: groups live under each fork server's own cgroup of each hierarchy, which need not be
#: the sweeper's (another terminal, CI job or systemd scope): this is how a sweep from
#: elsewhere still finds them.
RECORD = "cgroups"


def _rundir(run_id: str) -> Path:
    return Path(f"/tmp/{PREFIX}{run_id}")


def _record_parent(run_id: str, parent: Path) -> None:
    """Append ``parent`` to the run dir's record, if the run dir is the controller's.

    Only when the run dir exists and is ours: tests of the cgroup facet use run ids with no
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
