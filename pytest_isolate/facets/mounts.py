"""Mounts: the overlay root every chroot/jail/zone test gets.

The test sees the host (or ``spec.rootfs``) through an overlay whose upper layer is a
throwaway tmpfs: it can write anywhere, nothing reaches the host, and the upper dir is an
exact list of what it changed (read afterwards by ``facets.overlay_changes``). ``/proc``,
``/sys`` and ``/dev`` are mounted fresh or bound in; pytest's basetemp is bound read-write
at its own path so ``tmp_path`` works and is kept as usual.

Propagation is the trap here: a bind of a *shared* mount joins its peer group, so an
unmount inside the sandbox would propagate back and unmount the host's ``/dev/pts``.
Every recursive bind is therefore made private immediately, before anything else
happens below it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

#: pivot_root(2) syscall numbers; glibc has no wrapper before 2.38 on every arch.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def _check(ret: int, what: str) -> None:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(p: str | os.PathLike[str] | None) -> bytes | None:
    return None if p is None else os.fsencode(p)


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2); raises OSError naming the target."""
    ret = _libc.mount(
        _b(source), _b(target), fstype.encode() if fstype else None, flags, data.encode() if data else None
    )
    _check(ret, f"mount {fstype or ''} {source} on {target}")


def umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        fn = getattr(_libc, "pivot_root", None)
        if fn is None:
            raise OSError(errno.ENOSYS, "pivot_root: unknown syscall number on this architecture")
        _check(fn(_b(new_root), _b(put_old)), "pivot_root")
        return
    _check(_libc.syscall(nr, _b(new_root), _b(put_old)), "pivot_root")


def make_private(path: str | os.PathLike[str] = "/", recursive: bool = True) -> None:
    """Stop mount events below ``path`` from reaching (or coming from) any peer."""
    mount(None, path, None, MS_PRIVATE | (MS_REC if recursive else 0))


def make_slave(path: str | os.PathLike[str] = "/", recursive: bool = True) -> None:
    """Keep receiving the host's mount events below ``path`` but never send any back."""
    mount(None, path, None, MS_SLAVE | (MS_REC if recursive else 0))


_ST_TO_MS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)


def _locked_flags(path: str | os.PathLike[str]) -> int:
    """The per-mount flags of ``path`` as MS_* bits.

    A read-only remount must repeat them: in a user namespace the kernel refuses
    (EPERM) a remount that would clear a flag the more privileged mount had.
    """
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS if f & st)


def bind(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    readonly: bool = False,
    recursive: bool = False,
    private: bool = True,
    extra_flags: int = 0,
) -> None:
    """Bind ``src`` on ``dst``; private by default so nothing propagates back to the host."""
    mount(src, dst, None, MS_BIND | (MS_REC if recursive else 0))
    if private:
        make_private(dst, recursive=True)
    if readonly or extra_flags:
        remount_bind(dst, readonly=readonly, extra_flags=extra_flags)


def remount_bind(dst: str | os.PathLike[str], *, readonly: bool = True, extra_flags: int = 0) -> None:
    flags = MS_REMOUNT | MS_BIND | _locked_flags(dst) | extra_flags | (MS_RDONLY if readonly else 0)
    mount(None, dst, None, flags)


def _ovl_escape(p: str | os.PathLike[str]) -> str:
    return os.fspath(p).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def mount_overlay(
    merged: str | os.PathLike[str],
    lower: str | os.PathLike[str],
    upper: str | os.PathLike[str],
    work: str | os.PathLike[str],
    userns: bool = False,
    flags: int = 0,
) -> None:
    """overlayfs ``lower`` (read-only) + ``upper`` (the test's writes) on ``merged``.

    In a user namespace the kernel cannot set ``trusted.*`` xattrs, so overlay must keep
    its whiteout/opaque markers in ``user.overlay.*`` (``userxattr``, Linux 5.11+).
    """
    opts = f"lowerdir={_ovl_escape(lower)},upperdir={_ovl_escape(upper)},workdir={_ovl_escape(work)}"
    if userns:
        opts += ",userxattr"
    mount("overlay", merged, "overlay", flags, opts)


def mount_tmpfs(target: str | os.PathLike[str], size: int | None = None, mode: int = 0o755, extra: str = "") -> None:
    opts = f"mode={mode:o}"
    if size:
        opts += f",size={size}"
    if extra:
        opts += "," + extra
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, opts)


def mount_proc(target: str | os.PathLike[str]) -> None:
    """A fresh procfs: it shows the PID namespace of the *mounting* process."""
    mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount_sysfs(target: str | os.PathLike[str], readonly: bool = True) -> None:
    """A fresh sysfs (its ``class/net`` shows the mounter's network namespace).

    Falls back to a read-only recursive bind of the host's ``/sys`` when the kernel
    refuses a new sysfs (e.g. when the network namespace is not ours).
    """
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if readonly else 0)
    try:
        mount("sysfs", target, "sysfs", flags)
    except OSError:
        bind("/sys", target, recursive=True, readonly=readonly)


# --- masking (zone) -------------------------------------------------------------------

#: Made read-only inside the sandbox (after docker's readonlyPaths).
PROC_READONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq")
#: Covered entirely: files by /dev/null, dirs by an empty read-only tmpfs
#: (after docker's maskedPaths, plus kmsg).
PROC_MASKED = (
    "/proc/kcore",
    "/proc/kmsg",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/asound",
    "/proc/acpi",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/sys/kernel/debug",
    "/sys/kernel/security",
)


def mask_paths(root: str | os.PathLike[str], null_dev: str | os.PathLike[str] = "/dev/null") -> list[str]:
    """Make ``PROC_READONLY`` read-only and cover ``PROC_MASKED`` below ``root``.

    Why: uid 0 in a namespace still reaches ``/proc/sysrq-trigger`` (reboot the host),
    ``/proc/sys`` (core_pattern runs a host program) and ``/proc/kcore``. Returns the
    paths it protected; missing ones are skipped (they differ per kernel config).
    """
    r = os.fspath(root).rstrip("/")
    done = _readonly_binds(r, PROC_READONLY)
    for p in PROC_MASKED:
        t = r + p
        try:
            st = os.lstat(t)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            mount("tmpfs", t, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0,mode=555")
        else:
            bind(null_dev, t, readonly=True, private=False)
        done.append(p)
    _private_pass(r)
    return done


def readonly_paths(root: str | os.PathLike[str], paths: Iterable[str]) -> list[str]:
    """Make ``paths`` (absolute, as seen inside) below ``root`` read-only; mask_paths'
    first half, for a tier that wants e.g. ``/proc/sys`` read-only without the masks.

    Why a recursive bind of the path onto itself: procfs has no per-directory read-only
    mount option, and a bind is a mount of its own whose flags do not touch the rest of
    /proc. Missing paths are skipped; returns the ones made read-only.
    """
    r = os.fspath(root).rstrip("/")
    done = _readonly_binds(r, paths)
    _private_pass(r)
    return done


def _readonly_binds(r: str, paths: Iterable[str]) -> list[str]:
    done: list[str] = []
    for p in paths:
        t = r + p
        if not os.path.lexists(t):
            continue
        bind(t, t, recursive=True, readonly=True, private=False)
        done.append(p)
    return done


def _private_pass(r: str) -> None:
    # One pass instead of one per bind: nothing was mounted below them in between.
    for top in ("/proc", "/sys"):
        if os.path.ismount(r + top):
            make_private(r + top, recursive=True)


# --- the root ---------------------------------------------------------------------------


@dataclass
class Layer:
    """One piece of a split root (see ``plan_split``); ``path`` is the same inside and out."""

    path: str
    kind: str  # overlay | dir | symlink | file | tmpfs | rbind | special
    target: str = ""  # symlink target
    key: str = ""  # subdir of the upper/work dirs (overlay layers)


@dataclass
class RootPlan:
    """How to build one test's root (host paths; ``merged`` is where it is mounted)."""

    merged: Path
    upper: Path
    work: Path
    lower: Path = Path("/")
    #: (host path, read_only) bound at the same path inside, parents first.
    binds: list[tuple[Path, bool]] = field(default_factory=list)
    dev: str = "bind"  # "bind": the host /dev; "minimal": devices.populate; "none"
    proc: bool = True
    sys: bool = True
    mask: bool = False
    #: Paths inside made read-only once /proc and /sys are mounted (``readonly_paths``);
    #: with ``mask`` the ones in PROC_READONLY are already.
    readonly: tuple[str, ...] = ()
    userns: bool = False
    #: Overlay-mount flags (MS_NODEV: a node the test makes in its root opens nothing).
    overlay_flags: int = 0


@dataclass
class RootLayout:
    """What build_root made, for ``overlay_changes.scan_root``."""

    #: Mount points it created (inside paths), not the test's changes.
    created: list[str] = field(default_factory=list)
    #: Split mode only: overlay layers and the tmpfs dirs that hold them.
    layers: list[Layer] = field(default_factory=list)

    @property
    def split(self) -> bool:
        return bool(self.layers)


#: Dirs that get a fresh tmpfs instead of a per-entry split when mounts sit below them
#: (the host's /tmp may hold hundreds of entries: one overlay each would be slow).
FRESH_DIRS = ("/tmp", "/var/tmp", "/run")
#: Split no deeper than this; below it a dir is bound read-only.
MAX_SPLIT_DEPTH = 4
_SPECIAL = ("/proc", "/sys", "/dev")


def mountpoints() -> list[str]:
    """Every mount point of this mount namespace (as this process's root sees them)."""
    out: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            out.append(_unescape(line.split()[4]))
    return out


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def needs_split(lower: str | os.PathLike[str], userns: bool, mps: Sequence[str] | None = None) -> bool:
    """Must the root be assembled from several overlays?

    In a user namespace every mount inherited from the host is *locked*, and overlayfs
    refuses a lower layer with a locked mount below it ("failed to clone lowerpath"): an
    unprivileged process could otherwise see what the mount hides. So ``/`` (which has
    /proc, /sys, ... below it) cannot be one lower layer there.
    """
    if not userns:
        return False
    low = os.path.realpath(lower).rstrip("/")
    return any(m.startswith(low + "/") for m in (mountpoints() if mps is None else mps))


def hidden_by(layers: Sequence[Layer]) -> list[str]:
    """Paths of a split root whose host content is not visible (or not writable) inside."""
    return [layer.path for layer in layers if layer.kind in ("tmpfs", "rbind")]


def plan_split(lower: str | os.PathLike[str], mps: Sequence[str] | None = None) -> list[Layer]:
    """Cover ``lower`` with layers none of which has a mount point below it.

    A dir without mounts below it is one overlay; a dir with mounts below becomes a
    plain dir holding its entries as layers of their own (recursively; a mount root is
    itself a valid lower layer). /proc, /sys, /dev are left to build_root; /tmp, /var/tmp
    and /run get a fresh tmpfs instead of a split. Top-level files are bound read-only,
    symlinks recreated.
    """
    low = os.path.realpath(lower).rstrip("/")
    mps = [m for m in (mountpoints() if mps is None else mps) if m.startswith(low + "/")]
    layers: list[Layer] = []

    def has_below(host: str) -> bool:
        return any(m.startswith(host + "/") for m in mps)

    def visit(inside: str, depth: int) -> None:
        layers.append(Layer(inside, "dir"))
        try:
            names = sorted(os.listdir(low + inside if inside != "/" else low or "/"))
        except OSError:
            return
        for name in names:
            p = (inside.rstrip("/") + "/" + name) if inside != "/" else "/" + name
            host = low + p
            if p in _SPECIAL:
                layers.append(Layer(p, "special"))
                continue
            try:
                st = os.lstat(host)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                layers.append(Layer(p, "symlink", target=os.readlink(host)))
            elif stat.S_ISDIR(st.st_mode):
                if not has_below(host):
                    layers.append(Layer(p, "overlay", key=str(len(layers))))
                elif p in FRESH_DIRS:
                    layers.append(Layer(p, "tmpfs"))
                elif depth >= MAX_SPLIT_DEPTH:
                    layers.append(Layer(p, "rbind"))
                else:
                    visit(p, depth + 1)
            elif stat.S_ISREG(st.st_mode):
                layers.append(Layer(p, "file"))

    visit("/", 0)
    return layers


def with_project(
    layers: list[Layer], lower: str | os.PathLike[str], rootdir: str | os.PathLike[str] | None,
    mps: Sequence[str] | None = None,
) -> tuple[list[Layer], bool]:
    """A split root plus the project (pytest's rootdir) as an overlay layer of its own,
    mounted over the layer that holds it; True when it was added.

    Why: in a user namespace overlayfs cannot copy up a directory whose owner has no id
    there. A test that writes into its project copies up every directory between the
    layer's root and the file, so a project below a directory root owns (``/srv/ci/``,
    ``/var/lib/jenkins/``, a checkout in ``/tmp/build/``) refused every write
    (``EOVERFLOW``), and below a fresh tmpfs (``/tmp`` with mounts below it) it was a
    read-only bind. A layer of its own starts at the project: only the project's own
    directories are copied up. Not added where the host's root is not the lower layer
    (a prepared rootfs binds the project), where the project is a layer already, or
    where something is mounted below it (overlayfs refuses such a lower layer there).
    """
    if os.path.realpath(lower).rstrip("/") or rootdir is None:
        return layers, False
    root = os.path.realpath(rootdir)
    if root == "/" or any(layer.path == root for layer in layers):
        return layers, False
    if any(m.startswith(root + "/") for m in (mountpoints() if mps is None else mps)):
        return layers, False
    return [*layers, Layer(root, "overlay", key=str(len(layers)))], True


def needed_binds(
    lower: Path,
    rootdir: Path | None,
    basetemp: Path | None,
    extra: Iterable[Path] = (),
    hidden: Sequence[str] | None = None,
    layered: Path | None = None,
) -> list[tuple[Path, bool]]:
    """Paths the already-running Python and pytest need inside the root, parents first.

    With the host ``/`` as the one lower layer, only directories on *other* filesystems
    need binding (overlayfs shows just the root filesystem, not its submounts: a venv
    on ``/home`` or a rootdir on a ``/tmp`` tmpfs would vanish). With a prepared rootfs
    (debootstrap) the interpreter, its ``sys.path`` and the rootdir are all bound
    read-only. In a split root (``hidden`` not None) every filesystem has its own layer,
    so only what lies under ``hidden`` (fresh tmpfs dirs, read-only binds) is bound.
    basetemp is always bound read-write so ``tmp_path`` writes are kept. Nothing is
    bound in ``layered``, a layer of its own (``with_project``): it shows all of it, and
    a read-only bind over it (``python -m pytest`` puts the project on ``sys.path``)
    would hide the layer.
    """
    candidates: list[Path] = [Path(sys.prefix), Path(sys.base_prefix)]
    candidates += [Path(p) for p in sys.path if p and os.path.isdir(p)]
    candidates += list(extra)
    if rootdir is not None:
        candidates.append(Path(rootdir))
    host_root = os.stat("/").st_dev
    custom = os.path.realpath(lower) != "/"
    ro: list[Path] = []
    for c in candidates:
        try:
            c = Path(os.path.realpath(c))
            st = os.stat(c)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or c == Path("/"):
            continue
        if layered is not None and c.is_relative_to(layered):
            continue
        if hidden is not None:
            if not any(c.is_relative_to(h) for h in hidden):
                continue
        elif not custom and st.st_dev == host_root and not _is_mountpoint_below(c):
            continue
        ro.append(c)
    ro = _outermost(ro)
    out: list[tuple[Path, bool]] = [(p, True) for p in ro]
    if basetemp is not None:
        out.append((Path(os.path.realpath(basetemp)), False))
    out.sort(key=lambda t: len(t[0].parts))
    return out


def _is_mountpoint_below(p: Path) -> bool:
    """True when some ancestor of ``p`` (not ``/``) is on another filesystem than ``/``."""
    root = os.stat("/").st_dev
    for a in [p, *p.parents]:
        if a == Path("/"):
            return False
        try:
            if os.stat(a).st_dev != root:
                return True
        except OSError:
            return False
    return False


def _outermost(paths: Sequence[Path]) -> list[Path]:
    """Drop paths already covered by another bind of the same filesystem above them."""
    out: list[Path] = []
    for p in sorted(set(paths), key=lambda x: len(x.parts)):
        if any(p != q and p.is_relative_to(q) and os.stat(p).st_dev == os.stat(q).st_dev for q in out):
            continue
        out.append(p)
    return out


def _inside(merged: Path, host_path: str | os.PathLike[str]) -> Path:
    return merged / os.fspath(host_path).lstrip("/")


def _ensure_mountpoint(target: Path, is_dir: bool, created: list[str], merged: Path) -> None:
    if os.path.lexists(target):
        return
    # Record the topmost component we create, so the change list can ignore it.
    missing = target
    while not os.path.lexists(missing.parent):
        missing = missing.parent
    created.append("/" + os.fspath(missing.relative_to(merged)))
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(target.parent, exist_ok=True)
        target.touch()


def _build_split(plan: RootPlan, layers: list[Layer]) -> None:
    m = plan.merged
    low = os.path.realpath(plan.lower).rstrip("/")
    # pivot_root needs a mount point; the dir lives on the tmpfs of upper/work.
    bind(m, m, private=True)
    for layer in layers:
        t = _inside(m, layer.path)
        host = low + layer.path
        if layer.kind == "dir":
            if layer.path != "/":
                os.mkdir(t, 0o755)
        elif layer.kind == "special":
            os.mkdir(t, 0o755)
        elif layer.kind == "symlink":
            os.symlink(layer.target, t)
        elif layer.kind == "file":
            t.touch(0o644)
            bind(host, t, readonly=True)
        elif layer.kind == "tmpfs":
            os.mkdir(t, 0o755)
            mount_tmpfs(t, mode=0o1777)
        elif layer.kind == "rbind":
            os.mkdir(t, 0o755)
            bind(host, t, recursive=True, readonly=True)
        else:  # overlay
            if not os.path.lexists(t):  # the project's (``with_project``) may be in view
                os.makedirs(t, 0o755)
            up, wk = plan.upper / layer.key, plan.work / layer.key
            os.mkdir(up)
            os.mkdir(wk)
            mount_overlay(t, host or "/", up, wk, userns=plan.userns, flags=plan.overlay_flags)


def build_root(plan: RootPlan, split: list[Layer] | None = None) -> RootLayout:
    """Mount the root and everything inside it at ``plan.merged``.

    One overlay of ``plan.lower`` normally; in a user namespace with mounts below the
    lower dir, the layers of ``split`` (``plan_split``). Does not enter the root: the
    chroot tier calls ``chroot``; jail/zone call ``enter_root`` (pivot_root + detach).
    """
    from pytest_isolate.facets import devices

    m = plan.merged
    layout = RootLayout()
    if split:
        _build_split(plan, split)
        layout.layers = split
    else:
        mount_overlay(m, plan.lower, plan.upper, plan.work, userns=plan.userns, flags=plan.overlay_flags)
    created = layout.created
    for host_path, ro in plan.binds:
        t = _inside(m, host_path)
        _ensure_mountpoint(t, True, created, m)
        bind(host_path, t, readonly=ro, recursive=True)
    if plan.proc:
        _ensure_mountpoint(m / "proc", True, created, m)
        mount_proc(m / "proc")
    if plan.sys:
        _ensure_mountpoint(m / "sys", True, created, m)
        mount_sysfs(m / "sys", readonly=True)
    if plan.dev == "bind":
        _ensure_mountpoint(m / "dev", True, created, m)
        bind("/dev", m / "dev", recursive=True)
    elif plan.dev == "minimal":
        _ensure_mountpoint(m / "dev", True, created, m)
        devices.populate(m / "dev", userns=plan.userns)
    if plan.mask:
        mask_paths(m, null_dev=m / "dev" / "null" if plan.dev != "none" else "/dev/null")
    extra_ro = [p for p in plan.readonly if not (plan.mask and p in PROC_READONLY)]
    if extra_ro:
        readonly_paths(m, extra_ro)
    return layout


def enter_root(new_root: str | os.PathLike[str]) -> None:
    """pivot_root into ``new_root`` and detach the old root.

    ``chroot`` alone leaves the old root reachable (a second chroot with a dir fd kept
    outside climbs back out); after pivot_root + detaching the old root there is no
    path left to it from this mount namespace. Uses the ``pivot_root(".", ".")`` trick
    so no put_old directory has to be created in the test's upper layer.
    """
    os.chdir(new_root)
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")


def detach_tree(path: str | os.PathLike[str]) -> None:
    """Lazily unmount ``path`` and everything below it (MNT_DETACH is recursive)."""
    try:
        umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise


def remove_tree(path: str | os.PathLike[str]) -> bool:
    """Delete ``path`` recursively without ever crossing into another filesystem.

    Why not shutil.rmtree: it follows a directory into whatever is mounted on it, so a
    leftover bind of basetemp or ``/dev`` under a sandbox dir would be emptied on the
    host. A bind from the same filesystem has the same st_dev, so mount points are
    taken from mountinfo too. Returns False when something could not be removed (it is
    left in place).
    """
    p = os.path.realpath(path)
    mps = set(mountpoints())
    try:
        top = os.lstat(p)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(top.st_mode):
        try:
            os.unlink(p)
            return True
        except OSError:
            return False
    ok = True

    def rm(d: str, dev: int) -> None:
        nonlocal ok
        try:
            entries = list(os.scandir(d))
        except OSError:
            ok = False
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                ok = False
                continue
            if st.st_dev != dev or e.path in mps:
                ok = False  # a mount point: leave it (and its parents) alone
                continue
            if stat.S_ISDIR(st.st_mode):
                rm(e.path, dev)
                try:
                    os.rmdir(e.path)
                except OSError:
                    ok = False
            else:
                try:
                    os.unlink(e.path)
                except OSError:
                    ok = False

    rm(p, top.st_dev)
    try:
        os.rmdir(p)
    except OSError:
        ok = False
    return ok


def mounts_below(prefix: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``prefix`` in this mount namespace, deepest first."""
    pre = os.fspath(prefix).rstrip("/")
    out: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == pre or mp.startswith(pre + "/"):
                out.append(mp)
    out.sort(key=len, reverse=True)
    return out

