"""`jail` tier: own mount, PID, IPC, UTS and network namespaces (+ a user namespace
when not root), an overlay root entered with pivot_root, and a PID 1 that is not the test.

Two layouts. **Holder** (root with the shared loopback, a root without a split, nothing
to ``keep``: almost every test as root), for the sandbox built ahead of each test::

    fork server ── holder A (PID 1 of its PID namespace, in the loopback netns)
               │       └── zygote = runner (own mount, IPC, UTS namespaces; the test)
               └── holder B (the same: the next test's sandbox is built here)

A holder is a spawner (spawner.py) that is PID 1 of a PID namespace of its own; two
take turns, so a test never shares its PID namespace with the sandbox built ahead (it
sees ``/proc`` as ``[1, itself]``, as with an init). Its zygote makes its own mount, IPC
and UTS namespaces, builds and enters its root (``enter_built``), confines itself and
waits for its job: the test runs in it, with no init and no second fork. What the init
does in the other layout is shared out: the runner scans its own upper layer before
"end" (a ``changes`` frame, ``enter_built``); the holder reaps the test's orphans as
they die, and the server kills and reports the holder's children it did not fork as
zygotes (``Spawner.orphans``), and waits until they are gone; it also waits for a
runner that still holds a socket (``holds_sockets``).
One thing the init does better: the runner scans its own layer, so a test whose process
dies before its end (a crash, ``os._exit``, a signal, its timeout) or that gave up root
(``setuid``) lists no changes (its outcome says why it ended). Measured (bench.py, a
quiet host): ``jail`` minus the fork floor 8.30 / 7.89 ms a test → 4.05 / 2.56 ms. The init's own cost was its copy of the warm heap (the server's fork
of it and its exit), not the PID namespace (bench/jail_layouts.py).

**Init per test** (everything else: unprivileged, ``network="ip"``, a split root,
``keep``, the first test of a worker, a sandbox not built ahead)::

    fork server ── init (PID 1 inside) ── runner (PID 2 inside: calls run())
                                      └── whatever the test starts

Why a PID 1 that is not the test (init or holder): PID 1 of a namespace ignores every
signal it has no handler for, so a test that runs ``os.kill(os.getpid(), SIGTERM)`` as
PID 1 would not die. The init reaps
everything, reports the runner's real wait status (``{"t": "exit"}``, base.py), lists
what the test left running (``{"t": "leftover"}``), and when it exits the kernel kills
the rest of the namespace. It also lists what the test changed in the overlay: the
upper layer lives on a tmpfs of the test's own mount namespace, so nothing is ever
mounted on the host and nothing can be left mounted there, whatever happens to the fork
server. That tmpfs is mounted on one directory of the worker's, every test's own
mount namespace over the same one: no directory is made or removed on the host per
test (~0.5 ms of a disk's journal). Its last frame is ``{"t": "released", "changes",
"disk_bytes"}``: once the runner has written its own last frame (and its end byte,
``child.end_notify_fd``) and every other process of the namespace is killed, the init
checks the sandbox and the server answers, while the kernel still tears the runner, the
init and the namespaces down.

How the init is created without a middle process (a fork costs ~1.5 ms in a process
that imported pytest):

- root: the fork server ``unshare(CLONE_NEWPID)``s, forks (the child is PID 1 of the new
  namespace) and ``setns``es back to its own PID namespace for the next test.
- unprivileged: ``clone(CLONE_NEWUSER|CLONE_NEWPID|...)`` (namespaces.clone_fork): the
  child is init of a PID namespace owned by its new user namespace.
- unprivileged with ``network="ip"``: the test must join the user namespace that owns
  the run's switch first (facets.net), so one middle process does that and forks the init.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# Everything the init and the runner use is imported here, in the warm fork server: a
# module first imported in a test's child costs ~1.5 ms there, every test. (pyroute2,
# ~100 ms, is imported by ``net.warm_ip`` in the server, and only for network="ip".)
from pytest_isolate import child, wire
from pytest_isolate.facets import caps, devices, keep, mounts, net, netlink, overlay_changes  # noqa: F401 - devices: see above
from pytest_isolate.facets import namespaces as ns
from pytest_isolate.tiers.base import (
    HOLDER_ENTRY,
    Box,
    Tier,
    WorkerContext,
    exec_cmdline,
    fork_child,
    holds_sockets,
    kill_tree,
    rusage_dict,
    still_running,
)
from pytest_isolate.tiers.chroot import TMP_DIRS, lower_for, overlay_available

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
# Resolved here, in the server: a first attribute lookup in every child costs ~0.1 ms.
_prctl = _libc.prctl

#: Under the worker dir: where each test's init mounts its tmpfs (in its own namespace).
BOX_DIR = "box"
#: How often the init reaps orphans while the runner lives (zombies would count
#: against the zone's ``pids`` budget).
REAP_INTERVAL = 0.05


def _set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Die with the fork server: an orphaned init would keep its namespace alive."""
    _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _privileged() -> bool:
    return os.geteuid() == 0 and ns.in_initial_userns()


_unshare_probe: dict[int, str | None] = {}


def _probe_unshare(flags: int) -> str | None:
    """Can a child of ours unshare ``flags``? (containers without CAP_SYS_ADMIN cannot)."""
    if flags in _unshare_probe:
        return _unshare_probe[flags]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - forked child
        os.close(r)
        try:
            ns.unshare(flags)
            os.write(w, b"ok")
        except OSError as exc:
            os.write(w, str(exc).encode()[:500])
        os._exit(0)
    os.close(w)
    try:
        msg = os.read(r, 1024).decode(errors="replace")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    reason = None if msg == "ok" else (
        f"cannot create namespaces ({msg or 'probe died'}); a container needs CAP_SYS_ADMIN "
        "or --privileged, or run unprivileged with user namespaces enabled"
    )
    _unshare_probe[flags] = reason
    return reason


def list_procs(exclude: tuple[int, ...] = (1,)) -> list[dict[str, Any]]:
    """Live (non-zombie) processes visible in our /proc, with their command lines."""
    out: list[dict[str, Any]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                st = f.read()
            state = st[st.rindex(b")") + 2 : st.rindex(b")") + 3]
            if state in (b"Z", b"X"):
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            cmdline = " ".join(argv) or exec_cmdline(int(name))  # none yet: inside execve
            if not cmdline:
                continue  # died meanwhile
        except (OSError, ValueError):
            continue
        out.append({"pid": int(name), "cmdline": cmdline[:500]})
    return out


class JailTier(Tier):
    name = "jail"
    #: Capabilities the runner drops (see caps.JAIL_DROP / caps.ZONE_DROP).
    drop_caps: tuple[int, ...] = caps.JAIL_DROP
    dev_mode = "bind"
    mask = False
    #: Read-only inside (the zone's mask covers these and more). /proc/sys holds
    #: core_pattern, modprobe and binfmt_misc: root writing one of them makes the host
    #: kernel run a program of its choosing, outside every namespace. Residual risk: the
    #: jail keeps CAP_SYS_ADMIN on purpose (tests mount in their own mount namespace),
    #: and with it root can remount this bind read-write or mount a fresh procfs, so
    #: this stops a stray write (``sysctl -w`` in a test), not a deliberate escape
    #: (tests/escapes/test_matrix.py tries the remount; the zone drops CAP_SYS_ADMIN).
    readonly_proc: tuple[str, ...] = ("/proc/sys", "/proc/sysrq-trigger")

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self._pidns_fd: int | None = None
        self._binds: dict[tuple[str, tuple[str, ...] | None, bool], list[tuple[Path, bool]]] = {}
        self._uid, self._gid = os.geteuid(), os.getegid()
        self._privileged = _privileged()
        self._box_dir = ctx.workdir / BOX_DIR
        #: The loopback-only network namespace consecutive tests share (``_loopback``).
        self._loopback_fd: int | None = None
        self._loopback_failed = False

    @classmethod
    def availability(cls) -> str | None:
        ov = overlay_available()
        if ov:
            return ov
        if _privileged():
            return _probe_unshare(ns.JAIL_FLAGS)
        reason = ns.userns_available()
        if reason:
            return f"the {cls.name} tier runs unprivileged only in a user namespace: {reason}"
        return None

    def close(self) -> None:
        if self._pidns_fd is not None:
            os.close(self._pidns_fd)
            self._pidns_fd = None
        if self._loopback_fd is not None:
            os.close(self._loopback_fd)
            self._loopback_fd = None
        with contextlib.suppress(OSError):  # never made, or a sandbox's init still has it
            self._box_dir.rmdir()

    # -- host side ------------------------------------------------------------------

    def prepare(self, box: Box) -> None:
        if box.spec.network == "ip":
            net.warm_ip()  # here, in the server: never first in a test's child
        if not self._box_dir.is_dir():
            self._box_dir.mkdir(parents=True, exist_ok=True)
        lower = lower_for(box)
        userns = not self._privileged
        # Planned here, per test, from the current mount table: a mount that appeared
        # below an overlay layer since the last test would make that layer fail.
        # One read of the mount table for the three questions (a split, its layers, the
        # project's own layer): mountinfo is regenerated on every read.
        mps = mounts.mountpoints() if userns else None
        split = mounts.plan_split(lower, mps) if mounts.needs_split(lower, userns, mps) else None
        project = False
        if split is not None:
            split, project = mounts.with_project(split, lower, self.ctx.rootdir, mps)
        hidden = mounts.hidden_by(split) if split is not None else None
        key = (os.fspath(lower), tuple(hidden) if hidden is not None else None, project)
        binds = self._binds.get(key)
        if binds is None:
            binds = self._binds[key] = mounts.needed_binds(
                lower, self.ctx.rootdir, self.ctx.basetemp, hidden=hidden,
                layered=Path(os.path.realpath(self.ctx.rootdir)) if project else None,
            )
        cwd = os.getcwd()
        if box.spec.rootfs and not any(Path(cwd).is_relative_to(p) for p, _ in binds):
            cwd = os.fspath(self.ctx.rootdir)
        box.state["jail_cwd"] = cwd
        box.state["jail_plan"] = (split, binds)
        box.state["jail_net"] = self._loopback(box)

    def _loopback(self, box: Box) -> int | None:
        """The network namespace this test joins instead of making its own, or None.

        A network namespace costs more to make and to dismantle (the kernel's netns
        work queue) than every other namespace of a jail together, so consecutive tests
        of a worker run as root with loopback only share one, made once. Nothing of a
        test's stays in it: its sockets close with its processes (the init waits for a
        runner that still holds one), what they leave in the kernel (TIME_WAIT) is
        destroyed after it (``_empty_loopback``), and it cannot change the namespace
        itself, having no ``CAP_NET_ADMIN`` (no link, address, route or netfilter rule)
        and a read-only ``/proc/sys``. Unprivileged, each test's user namespace would own
        its network namespace, so it gets one of its own; ``network="ip"`` gives each
        test its own address."""
        if not self._privileged or box.spec.network == "ip" or self._loopback_failed:
            return None
        if self._loopback_fd is None:
            try:
                self._loopback_fd, _ = ns.new_netns(netlink.loopback_up)
            except OSError:
                self._loopback_failed = True  # each test makes its own, as before
                return None
        return self._loopback_fd

    def holder_netns(self) -> int | None:
        """The shared loopback namespace this tier's holders join, or None: no holder
        (unprivileged, the namespace could not be made, ``PYTEST_ISOLATE_HOLDER=0``)."""
        if not _holders_on() or not self._privileged:
            return None
        if self._loopback_fd is None and not self._loopback_failed:
            try:
                self._loopback_fd, _ = ns.new_netns(netlink.loopback_up)
            except OSError:
                self._loopback_failed = True
        return self._loopback_fd

    def entry(self, box: Box) -> tuple[str, str] | None:
        """A sandbox a holder's zygote builds itself, from this plan: root, the shared
        loopback, a root without a split (a split is planned per test from the host's
        mount table) and nothing to keep (``keep`` is collected by the init)."""
        if not _holders_on() or not self._privileged:
            return None
        split, binds = box.state["jail_plan"]
        if split is not None or box.state.get("jail_net") is None or box.spec.keep:
            return None
        plan = {
            "binds": [[os.fspath(p), ro] for p, ro in binds],
            "lower": os.fspath(lower_for(box)),
            "disk": box.spec.disk,
            "hostname": box.hostname,
            **self._holder_plan(box),
        }
        box.state["holder"] = True
        return f"{HOLDER_ENTRY}{self.name}:{json.dumps(plan)}", box.state["jail_cwd"]

    def _holder_plan(self, box: Box) -> dict[str, Any]:
        """What else a holder's zygote needs of this box to confine itself (zone: its
        cgroup, which it joins itself)."""
        return {}

    def _join_host_side(self, plan: dict[str, Any]) -> None:
        """In a holder's zygote, still in the host's mount namespace and before its job:
        what ``_after_fork`` does from the host in the other layout (zone: the cgroup)."""

    def enter_built(self, plan_s: str, cwd: str, result_fd: int) -> None:
        """In a holder's zygote, which will run the test itself: own mount, IPC and UTS
        namespaces (PID and network are the holder's), the root built and entered, the
        runner's confinement (``_init`` and ``_confine_runner`` in the other layout)."""
        plan_d = json.loads(plan_s)
        self._join_host_side(plan_d)
        ns.unshare(ns.CLONE_NEWNS | ns.CLONE_NEWIPC | ns.CLONE_NEWUTS)
        lower = Path(plan_d["lower"])
        binds = [(Path(p), ro) for p, ro in plan_d["binds"]]
        plan, layout = self._build_root(plan_d["disk"], lower, binds, None, plan_d["hostname"])
        upfd = os.open(plan.upper, os.O_RDONLY | os.O_DIRECTORY)
        lowfd = os.open(lower, os.O_PATH | os.O_DIRECTORY)
        mounts.enter_root(plan.merged)

        def scan() -> None:
            """What the test changed in its root, sent before "end" (an init scans it
            after the runner in the init-per-test layout)."""
            frame: dict[str, Any] = {"t": "changes"}
            try:
                changes, _ = overlay_changes.scan_root(
                    layout, f"/proc/self/fd/{upfd}", f"/proc/self/fd/{lowfd}", "/", list(TMP_DIRS)
                )
                vfs = os.fstatvfs(upfd)
                frame.update(changes=changes, disk_bytes=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize)
            except OSError:
                pass
            wire.send(result_fd, frame)

        child.at_end.append(scan)
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir("/")
        self._confine_runner()

    def _build_root(
        self, disk: Any, lower: Path, binds: list[tuple[Path, bool]], split: Any, hostname: str
    ) -> tuple[mounts.RootPlan, Any]:
        """In the sandbox's own mount and UTS namespaces (an init, or a holder's zygote):
        the test's writable layer on a tmpfs only this mount namespace sees, the overlay
        root, the sandbox's hostname (resolvable)."""
        mounts.make_private("/")
        scratch = self._box_dir
        mounts.mount_tmpfs(scratch, size=disk, mode=0o700)
        for sub in ("upper", "work", "root"):
            os.mkdir(scratch / sub, 0o755)
        plan = mounts.RootPlan(
            merged=scratch / "root",
            upper=scratch / "upper",
            work=scratch / "work",
            lower=lower,
            binds=binds,
            dev=self.dev_mode,
            mask=self.mask,
            readonly=self.readonly_proc,
            userns=not self._privileged,
            overlay_flags=mounts.MS_NODEV,
        )
        layout = mounts.build_root(plan, split)
        _add_hosts_entry(plan.merged, hostname, scratch, lower)
        ns.sethostname(hostname)
        return plan, layout

    def _sync_needed(self, box: Box) -> bool:
        """Must the child wait until the host side has done something to it (cgroup)?"""
        return False

    def _after_fork(self, box: Box, pid: int) -> None:
        """Host-side work on the new child while it waits (zone: join the cgroup)."""

    def spawn(self, box: Box, run: Callable[[], NoReturn]) -> int:
        go_r = go_w = -1
        if self._sync_needed(box):
            go_r, go_w = os.pipe()
        switch = self.ctx.switch_netns if box.spec.network == "ip" else None

        waited = [go_w < 0]

        def host_done() -> None:
            """Wait (once per process tree) until the host side is done with the child it
            forked: its cgroup (zone) holds it, so whatever it forks from here on."""
            if not waited[0]:
                waited[0] = True
                os.close(go_w)
                os.read(go_r, 1)  # released once the host side is done (or gone: EOF)
                os.close(go_r)

        def init_entry(unshare_flags: int, maps: bool) -> NoReturn:
            self._init(box, run, unshare_flags, maps, switch, host_done)

        try:
            if self._privileged:
                if self._pidns_fd is None:
                    self._pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                ns.unshare(ns.CLONE_NEWPID)
                try:
                    pid = fork_child(
                        lambda: _guarded(lambda: init_entry(ns.JAIL_FLAGS & ~ns.CLONE_NEWPID, False), box.result_fd)
                    )
                finally:
                    ns.setns(self._pidns_fd, ns.CLONE_NEWPID)
            elif switch is None:
                pid = ns.clone_fork(ns.JAIL_FLAGS | ns.CLONE_NEWUSER)
                if pid == 0:
                    _guarded(lambda: init_entry(0, True), box.result_fd)
            else:
                pid = fork_child(
                    lambda: _guarded(lambda: self._middle(box, switch, init_entry, host_done), box.result_fd)
                )
            if go_w >= 0:
                try:
                    self._after_fork(box, pid)
                except BaseException:
                    os.kill(pid, signal.SIGKILL)
                    raise
        finally:
            if go_w >= 0:
                os.close(go_r)
                os.close(go_w)  # EOF releases the child
        box.state["jail_pid"] = pid
        return pid

    def kill(self, box: Box, pid: int) -> None:
        # SIGKILL of a PID namespace's init kills every process in it; in the middle
        # process layout, kill_tree reaches the init as a descendant.
        kill_tree(pid)

    def finish(self, box: Box, pid: int, status: int, rusage: resource.struct_rusage | None) -> None:
        # The init's last frame (the server keeps it); none if it died before (killed on
        # timeout, crashed).
        frame = box.state.get("released") or {}
        changes = frame.get("changes")
        if isinstance(changes, list):
            box.state["changes"] = changes[: overlay_changes.MAX_CHANGES + 1]
        if isinstance(frame.get("kept"), list):
            box.state["kept"] = frame["kept"]
        used = frame.get("disk_bytes")
        if isinstance(used, int) and not isinstance(used, bool):
            box.usage["disk_bytes"] = used
        if box.state.get("jail_net") is not None:
            self._empty_loopback(box)

    def _empty_loopback(self, box: Box) -> None:
        """After a test in the shared network namespace (every process of its sandbox is
        gone): the TCP sockets it closed, left in TIME_WAIT and the other closing
        states, go too, as they would with a namespace of its own. A session or module
        fixture that binds a fixed port without ``SO_REUSEADDR`` binds it once
        in-process; each sandbox sets it up again, and the next test's bind failed with
        ``EADDRINUSE`` for 60 s after a connection the server side closed first. A
        kernel that cannot destroy them: from here on each test makes its own
        namespace, and the sandbox built ahead in this one is dropped
        (``box.state["jail_net_dropped"]``, ``ForkServer.run_test``)."""
        if self._loopback_fd is None:
            return
        try:
            if ns.in_netns(self._loopback_fd, netlink.clear_orphaned_tcp):
                return
        except OSError:
            pass
        os.close(self._loopback_fd)
        self._loopback_fd = None
        self._loopback_failed = True
        box.state["jail_net_dropped"] = True

    # -- in the child ---------------------------------------------------------------

    def _middle(
        self, box: Box, switch: str, init_entry: Callable[[int, bool], NoReturn], host_done: Callable[[], None]
    ) -> NoReturn:
        """Unprivileged + network="ip": join the switch's user namespace, fork the init.
        The host side works on this process (zone: its cgroup), so the init is forked
        only once that is done."""
        _set_pdeathsig()
        net.enter_switch_userns(switch)
        ns.unshare(ns.CLONE_NEWPID)
        host_done()
        child = fork_child(
            lambda: _guarded(lambda: init_entry(ns.JAIL_FLAGS & ~ns.CLONE_NEWPID, False), box.result_fd)
        )
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 70)

    def _init(
        self, box: Box, run: Callable[[], NoReturn], unshare_flags: int, maps: bool, switch: str | None,
        host_done: Callable[[], None],
    ) -> NoReturn:
        """PID 1 of the test's namespaces: build the root, fork the runner, reap, report.

        The root is built while the host side still works on this process (zone: moves
        it into its cgroup, ~2.4 ms of the kernel's waiting on cgroup v1); the runner is
        forked only once it is done (``host_done``)."""
        _set_pdeathsig()
        if maps:
            ns.write_id_maps(self._uid, self._gid)
        shared = box.state.get("jail_net")
        if shared is not None:
            ns.setns(shared, ns.CLONE_NEWNET)
            os.close(shared)  # no handle on it for the test
            unshare_flags &= ~ns.CLONE_NEWNET
        if unshare_flags:
            ns.unshare(unshare_flags)
        split, binds = box.state["jail_plan"]
        lower = lower_for(box)
        plan, layout = self._build_root(box.spec.disk, lower, binds, split, box.hostname)
        ignore = list(TMP_DIRS)
        if shared is None:
            netlink.loopback_up()
        if switch is not None:
            address, prefixlen = net.address_for(self.ctx.extra.get("worker_index", 0), box.index)
            net.attach_ip(switch, address, prefixlen)
        upfd = os.open(plan.upper, os.O_RDONLY | os.O_DIRECTORY)
        lowfd = os.open(lower, os.O_PATH | os.O_DIRECTORY)
        mounts.enter_root(plan.merged)
        try:
            os.chdir(box.state["jail_cwd"])
        except OSError:
            os.chdir("/")
        end_r, end_w = os.pipe()  # non-inheritable: an exec in the test drops it
        private = (upfd, lowfd, end_r)

        def runner() -> NoReturn:
            for fd in private:
                os.close(fd)
            child.end_notify_fd = end_w
            self._confine_runner()
            run()

        host_done()
        rpid = fork_child(runner)
        os.close(end_w)
        status, ru, ended = _wait_runner(rpid, end_r)
        _finish_namespace(box, rpid, status, ru, ended)
        if shared is not None and ended and holds_sockets(rpid):
            # The next test shares this network namespace: a port the runner still
            # holds while it exits would be taken for that test.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(rpid, 0)
        released: dict[str, Any] = {"t": "released"}
        try:
            changes, _ = overlay_changes.scan_root(layout, f"/proc/self/fd/{upfd}", f"/proc/self/fd/{lowfd}", "/", ignore)
            vfs = os.fstatvfs(upfd)  # the test's tmpfs: uppers, and a split root's dirs
            released.update(changes=changes, disk_bytes=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize)
            if box.spec.keep:
                uppers = overlay_changes.uppers(layout, f"/proc/self/fd/{upfd}")
                released["kept"] = keep.collect(uppers, box.spec.keep, f"/proc/self/fd/{lowfd}")
        except OSError:
            pass
        # The host side has all it needs: it answers now, while the kernel tears the
        # runner, this init and the namespaces down (~5 ms a test, off its path).
        wire.send(box.result_fd, released)
        _reap_all()
        os._exit(0)

    def _confine_runner(self) -> None:
        """Last steps in the runner, after the root is in place (base.py's order)."""
        os.setpgid(0, 0)
        if self._privileged:
            caps.drop(self.drop_caps)
        else:
            self._as_the_user()

    def _as_the_user(self) -> None:
        """Unprivileged: the test runs as the user who started pytest, as in-process: the
        same uid and gid, no capability. As uid 0 of the sandbox's user namespace, with
        its capabilities, it passed permission checks that fail in-process (a file made
        read-only, ``chmod 000``), its own "am I root" checks said yes, and paths built
        from ``os.getuid()`` differed (platformdirs' ``/tmp/runtime-0``)."""
        ns.enter_own_ids(self._uid, self._gid)
        caps.drop(range(caps.last_cap() + 1))


def _holders_on() -> bool:
    """The holder layout (module docstring), unless ``PYTEST_ISOLATE_HOLDER=0``: the
    init-per-test layout, kept for what the holder cannot do, timed against it in bench/."""
    return os.environ.get("PYTEST_ISOLATE_HOLDER", "1") != "0"


def _guarded(body: Callable[[], NoReturn], result_fd: int) -> NoReturn:
    """Run a child body; on any exception tell the host side why, then exit 70."""
    try:
        body()
    except BaseException as exc:  # noqa: BLE001 - never fall back into the server's stack
        try:
            traceback.print_exc()
            wire.send(result_fd, {"t": "internal", "error": "".join(traceback.format_exception(exc))})
        finally:
            os._exit(70)
    os._exit(0)


def _add_hosts_entry(root: Path, hostname: str, scratch: Path, lower: Path) -> bool:
    """Make the sandbox's hostname resolvable, as it is on a normal host.

    Why: ``socket.gethostbyname(socket.gethostname())`` is common in tests and would fail
    (there is no DNS in the sandbox's network namespace). The file is a copy on the
    test's tmpfs bound over ``/etc/hosts`` rather than an edit through the overlay, so
    the upper layer stays empty for a test that writes nothing (its scan is then free).
    """
    target = root / "etc" / "hosts"
    try:
        if not target.is_file():
            return False
        with open(os.path.join(lower, "etc/hosts"), "rb") as f:
            data = f.read()
        copy = scratch / "hosts"
        with open(copy, "wb") as f:
            f.write(data + f"\n127.0.1.1\t{hostname}\n".encode())
        mounts.bind(copy, target)
        return True
    except OSError:
        return False


def _wait_runner(target: int, end_r: int) -> tuple[int, resource.struct_rusage | None, bool]:
    """As PID 1: until the runner is done; reap orphans meanwhile.

    ``(status, rusage, ended)``. ``ended``: the runner wrote its last frame and is now
    only exiting (``child.end_notify_fd``): status 0, its own rusage went up with its
    "end" frame. Otherwise the runner died on its own (crash, signal, exit code) and its
    wait status is the truth.
    """
    pidfd = os.pidfd_open(target)
    watch = [end_r, pidfd]
    try:
        while True:
            ready, _, _ = select.select(watch, [], [], REAP_INTERVAL)
            if end_r in ready:
                if os.read(end_r, 1):
                    return 0, None, True
                watch.remove(end_r)  # closed without a word: its wait status will tell
            while True:
                try:
                    pid, status, ru = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    return 0, None, False
                if pid == 0:
                    break
                if pid == target:
                    return status, ru, False
    finally:
        os.close(end_r)
        os.close(pidfd)


def _reap_all() -> None:
    while True:
        try:
            os.wait4(-1, 0)
        except ChildProcessError:
            return


def _finish_namespace(box: Box, runner: int, status: int, ru: resource.struct_rusage | None, ended: bool) -> None:
    """The runner is done: freeze the rest, report it, kill it, reap it.

    After a runner that ``ended`` (still exiting, see ``_wait_runner``) and left nothing,
    nothing is waited for: the scan of the root may start at once. Anything it left
    might still be the runner's child, so then everything is reaped first."""
    # What is on its way out is given a moment first (``still_running``).
    still_running(int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) not in (1, runner))
    try:
        os.kill(-1, signal.SIGSTOP)  # from PID 1: every other process of the namespace
    except ProcessLookupError:
        pass
    left = list_procs(exclude=(1, runner) if ended else (1,))
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wire.send(box.result_fd, {"t": "exit", "status": status, "rusage": rusage_dict(ru)})
    if left:
        wire.send(box.result_fd, {"t": "leftover", "procs": left})
    if left or not ended:
        _reap_all()
