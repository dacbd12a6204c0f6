"""Children made before their test is sent: zygotes, sandboxes built ahead, kept children.

Making a sandbox costs more than a trivial test takes to run, and it does not depend on
the test before it. So while a test runs, the fork server has its next child made: a
`process` zygote, forked by the spawner (``spawner.py``), or the whole sandbox of the
test collected next (`chroot` to `uml`), built here or entered by a spawner's child. One
child at a time waits for its job, a scope group's kept child included. ``Ahead`` holds
that child and the spawner, replaces the spawner when a test kills it, and guesses
which test comes next; the fork server asks it for a waiting child before it makes one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

from pytest_isolate import frozen
from pytest_isolate.child import Forwarder, run_items
from pytest_isolate.outcome import CGROUP_TIERS
from pytest_isolate.spawner import Spawner, SpawnerGone
from pytest_isolate.spec import IsolationSpec
from pytest_isolate.tiers.base import HOLDER_ENTRY, Box, Tier, kill_tree

#: Tiers whose next sandbox is built while the current test runs (``build_ahead``).
AHEAD_TIERS = ("chroot", "jail", "zone", "uml")
#: Tiers whose children the spawner forks (so this server's pages stay its own).
SPAWNER_TIERS = ("process", "chroot")
#: Sandboxes built ahead for nothing before a server stops building ahead.
AHEAD_MISSES = 3


def _hostname(nodeid: str) -> str:
    """A short, valid UTS name from the test id (tests that print it see which test)."""
    name = nodeid.rsplit("::", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-").lower()
    return (name or "isolated")[:63]


@dataclass
class _Slot:
    seq: int
    r: int
    w: int
    stack_fd: int
    pid: int = 0  # a waiting child's pid
    go: int = -1  # a waiting child's job pipe
    group: str | None = None  # "zygote", or the scope group a kept child serves
    tier: Tier | None = None
    box: Box | None = None
    spawned: bool = False  # forked by the spawner (a zygote, or a chroot built ahead)
    parent: Spawner | None = None  # which spawner forked it (a jail holder, or the spawner)


def _collect_and_freeze() -> None:
    """``gc.freeze()`` before a fork, after collecting what is garbage by now.

    Freezing moves every tracked object to the permanent generation, garbage included:
    a cycle a test's bookkeeping left since the last fork is then never collected. Frozen
    once per test, the server grew by ~7 KiB a test (130 MB over 20,000 ``chroot``
    tests, tests/test_soak.py). Collecting first costs little: everything older is
    frozen already, so the collection walks only what was made since the last freeze.
    """
    gc.collect()
    frozen.freeze()


class Ahead:
    """The fork server's waiting child and spawner, owned by its ``ForkServer``."""

    def __init__(
        self,
        config: pytest.Config,
        forwarder: Forwarder,
        term_fd: int,
        private_fds: list[int],
        close_private: Callable[[], None],
        tier: Callable[[str], Tier],
    ) -> None:
        self.config = config
        self.forwarder = forwarder
        self.term_fd = term_fd
        #: The server's own list of fds no test child may hold: the spawner's socket
        #: joins it while there is a spawner. ``close_private`` closes them in a child.
        self.private_fds = private_fds
        self._close_private = close_private
        self.tier = tier
        self.items: dict[str, pytest.Item] = {}
        self.following: dict[str, pytest.Item] = {}  # nodeid -> the item collected after it
        self.seq = 0
        #: A child waiting for its next job: a pre-forked zygote, a sandbox built ahead or
        #: a kept scope child.
        self.waiting: _Slot | None = None
        self.spawner: Spawner | None = None
        self.spawner_wanted = False
        #: `jail`'s and `zone`'s holders (tiers/jail.py): spawners that are PID 1 of a
        #: PID namespace each, two per tier taking turns, so that a test never shares
        #: its PID namespace with the sandbox built ahead. Per tier: each joins its
        #: tier's own shared loopback namespace.
        self.holders: dict[str, list[Spawner]] = {}
        self.last_holder: dict[str, Spawner] = {}
        self.ahead_misses = 0
        #: The running test's fds: a child forked meanwhile closes them (``_close_busy``).
        self.busy: tuple[int, ...] = ()
        os.register_at_fork(after_in_child=self._close_busy)
        self.pidfds: dict[int, int] = {}  # spawner-made zygote -> its pidfd
        self.want_zygote = False

    def collected(self, items: dict[str, pytest.Item], order: list[pytest.Item]) -> None:
        """The session's items by nodeid, and in collection ``order``: the likely next test."""
        self.items = items
        self.following = dict(zip(items, order[1:], strict=False))

    def take(self, nodeid: str, spec: IsolationSpec, group: str | None) -> _Slot | None:
        """The waiting child, when it can run this test: a zygote (`process`), the kept
        child of this scope group, or the sandbox built ahead for it. Otherwise it is
        released, and None says: make one."""
        waiting = self.waiting
        if waiting is not None and (
            (waiting.group == "zygote" and spec.tier == "process")
            or (group and waiting.group == group)
            or (waiting.group == f"ahead:{nodeid}" and waiting.box is not None and waiting.box.spec == spec)
        ):
            self.waiting = None  # reuse it: a zygote, the kept child of this group, or built ahead
            if waiting.group.startswith("ahead:"):
                self.ahead_misses = 0
            return waiting
        if waiting is not None and waiting.group.startswith("ahead:"):
            self.ahead_misses += 1  # the controller runs another order (xdist, -p randomly)
        self.drop_waiting()
        return None

    def after_test(self, nodeid: str) -> None:
        """After ``nodeid``'s answer is sent, with no test's fd open: a spawner that died is
        replaced, and the next `process` test's zygote made if it is still to make."""
        if self.spawner_wanted and self.spawner is None and self.waiting is None and not self.pidfds:
            self.start_spawner()  # the last one died; no test's fd is open now
        if self.want_zygote and self.waiting is None:
            try:
                self.make_zygote()
            except SpawnerGone:
                pass  # made afresh, or the test forks its own, next time

    def new_slot(self) -> _Slot:
        """Per-test plumbing: message pipe, stack-dump file.

        The stack file is a memfd: a file made and removed per test costs ~0.5 ms of
        this disk's journal (and nothing of it is left if the server dies)."""
        self.seq += 1
        r, w = os.pipe()
        os.set_blocking(r, False)
        stack_fd = os.memfd_create("isolate-stack")
        return _Slot(self.seq, r, w, stack_fd)

    def make_zygote(self) -> None:
        """Pre-fork the next `process`-tier child, while the current test runs: fork and
        the child's set-up leave the per-test critical path. The spawner forks it, so
        this server's pages stay its own (see ``spawner``)."""
        slot = self.new_slot()
        go_r, go_w = os.pipe()
        try:
            if self.spawner is None:
                raise SpawnerGone("no spawner (it died, or no test of this run asked for the process tier)")
            self.spawner.spawn(slot.w, slot.stack_fd, go_r)
        except BaseException:
            for fd in (go_r, go_w, slot.r, slot.w, slot.stack_fd):
                os.close(fd)
            if self.spawner is not None:
                self._spawner_gone()
            raise
        os.close(go_r)
        os.close(slot.w)
        slot.w = -1
        slot.go, slot.group, slot.spawned = go_w, "zygote", True  # its pid: ``named``
        self.waiting = slot

    def named(self, slot: _Slot) -> int:
        """The pid of a zygote asked of the spawner, read when first needed, with a
        pidfd opened while it still waits for its job: once it has run, the spawner
        reaps it and the pid is gone (not our child: no zombie holds it for us)."""
        parent = slot.parent or self.spawner
        if slot.pid == 0 and parent is not None:
            slot.pid = parent.next_pid()
            self.pidfds[slot.pid] = os.pidfd_open(slot.pid)
        return slot.pid

    def start_spawner(self) -> None:
        """Fork the spawner now, before any test: every fd this server opens for a test
        (pipes, pidfds, stack files) would otherwise be inherited by it and by every
        zygote it makes, and a job pipe held open there never reaches EOF."""
        from pytest_isolate.plugin import SPEC_KEY

        if self.spawner is None and any(
            (spec := item.stash.get(SPEC_KEY, None)) is not None and spec.tier in SPAWNER_TIERS
            for item in self.items.values()
        ):
            self.spawner = Spawner(self._zygote, self.private_fds)
            self.private_fds.append(self.spawner.sock.fileno())
            self.spawner_wanted = True

    def _zygote(self, result_w: int, stack_fd: int, go_r: int, root: str, cwd: str) -> NoReturn:
        """In the spawner's new child: wait for a job, run it (``run_items``). ``root``:
        a `chroot` sandbox's root, mounted by the server, entered first (tiers/chroot.py)."""
        cgroup_memory = False  # a zone's cgroup, not an rlimit, holds its memory budget
        try:
            if root.startswith(HOLDER_ENTRY):  # a holder's zygote builds its own sandbox
                name, plan = root[len(HOLDER_ENTRY) :].split(":", 1)
                self.tier(name).enter_built(plan, cwd, result_w)  # type: ignore[attr-defined]
                cgroup_memory = name in CGROUP_TIERS
            elif root:
                os.setpgid(0, 0)
                os.chroot(root)
                os.chdir(cwd)
            else:
                os.setpgid(0, 0)
            run_items(self.config, self.forwarder, self.items, None, result_w, stack_fd, self.term_fd, cgroup_memory, go_r)
        finally:
            os._exit(70)

    def drop_orphaned_zygote(self, spawner: Spawner) -> None:
        """The waiting child of a spawner that died is ours now (we are the subreaper):
        end it quietly, it is nobody's leftover (a sandbox built ahead: its root too)."""
        z = self.waiting
        if z is None or not z.spawned or (z.parent or self.spawner) is not spawner:
            self.gone(spawner)
            return
        self.waiting = None
        pid = z.pid or (spawner.named[0] if spawner.named else 0)
        if pid:
            with contextlib.suppress(OSError):
                kill_tree(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            fd = self.pidfds.pop(pid, -1)
            if fd >= 0:
                os.close(fd)
        if z.tier is not None and z.box is not None:
            with contextlib.suppress(Exception):
                z.tier.finish(z.box, pid, 0, None)
        for fd in (z.go, z.r, z.stack_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.gone(spawner)

    def _spawner_gone(self) -> None:
        """The spawner died (a test may kill anything it can see): the server forks
        its own children until ``after_test`` can start a new one with no test's fd open."""
        spawner, self.spawner = self.spawner, None
        if spawner is not None:
            self._let_go(spawner)

    def _let_go(self, spawner: Spawner) -> None:
        with contextlib.suppress(ValueError):
            self.private_fds.remove(spawner.sock.fileno())
        with contextlib.suppress(Exception):
            kill_tree(spawner.pid)
        with contextlib.suppress(Exception):
            spawner.close()

    def pidfd(self, pid: int) -> int:
        """A pidfd of ``pid``: the one opened when the spawner made it, or a new one."""
        fd = self.pidfds.pop(pid, -1)
        return fd if fd >= 0 else os.pidfd_open(pid)

    def spawners(self) -> list[Spawner]:
        return [*([self.spawner] if self.spawner is not None else []), *self.all_holders()]

    def all_holders(self) -> list[Spawner]:
        return [h for hs in self.holders.values() for h in hs]

    def parent_of(self, pid: int) -> Spawner | None:
        """The spawner (or jail holder) that forked ``pid``, if one did."""
        return next((sp for sp in self.spawners() if pid in sp.children), None)

    def gone(self, spawner: Spawner) -> None:
        """``spawner`` died: the server forks its own, or makes a new holder next time."""
        hs = next((hs for hs in self.holders.values() if spawner in hs), None)
        if hs is not None:
            hs.remove(spawner)
            self._let_go(spawner)
        else:
            self._spawner_gone()

    def holder(self, tier: Tier) -> Spawner | None:
        """The holder whose turn it is (made on first use), or None: no holder."""
        netns = tier.holder_netns()  # type: ignore[attr-defined]
        if netns is None:
            return None
        hs = self.holders.setdefault(tier.name, [])
        # Not the last one used: the running test may be its zygote (at most one
        # sandbox waits, so the test before the running one is over).
        sp = next((h for h in hs if h is not self.last_holder.get(tier.name)), None)
        if sp is None:
            _collect_and_freeze()
            sp = Spawner(self._zygote, self.private_fds, netns)
            self.private_fds.append(sp.sock.fileno())
            hs.append(sp)
        self.last_holder[tier.name] = sp
        return sp

    def reap(self, pid: int) -> tuple[int, Any]:
        """wait4() for our own children; the spawner's report for its zygotes."""
        parent = self.parent_of(pid)
        if parent is not None:
            try:
                return parent.status(pid)
            except SpawnerGone:
                self.gone(parent)
        # Ours, or the spawner's orphan: it died and we are the subreaper.
        try:
            _, status, ru = os.wait4(pid, 0)
        except ChildProcessError:
            return signal.SIGKILL, None
        return status, ru

    def build_ahead(self, nodeid: str, spec: IsolationSpec, busy: tuple[int, ...]) -> None:
        """While this test runs, build the sandbox of the one collected after it.

        A `chroot`/`jail`/`zone` sandbox costs far more to build (namespaces, overlay,
        cgroup, an init and a second fork) than a trivial test takes to run, and it does
        not depend on the test before it: built now, on the other CPU, its child then
        waits for its job like a zygote. The controller runs tests in collection order
        unless something reorders them (pytest-xdist, a random-order plugin): after
        ``AHEAD_MISSES`` sandboxes built for nothing, this server stops guessing.
        ``busy``: the running test's fds, which the new sandbox must not hold.
        """
        from pytest_isolate.plugin import SPEC_KEY, scope_group

        if spec.tier not in AHEAD_TIERS or self.ahead_misses >= AHEAD_MISSES or self.waiting is not None:
            return
        nxt = self.following.get(nodeid)
        nspec = nxt.stash.get(SPEC_KEY, None) if nxt is not None else None
        if nxt is None or nspec is None or nspec.tier != spec.tier or scope_group(nxt, nspec) is not None:
            return
        slot = self.new_slot()
        box = Box(nxt.nodeid, nspec, slot.seq, _hostname(nxt.nodeid), slot.w)
        tier = self.tier(nspec.tier)
        go_r, go_w = os.pipe()
        cgroup_memory = nspec.tier in CGROUP_TIERS

        def run() -> NoReturn:
            self._close_private()
            os.close(slot.r)
            run_items(
                self.config, self.forwarder, self.items, None,
                slot.w, slot.stack_fd, self.term_fd, cgroup_memory, go_r,
            )

        self.busy = (*busy, go_w)  # go_w: see ForkServer.run_test
        try:
            tier.prepare(box)
            pid = self._spawned_ahead(tier, box, slot, go_r)
            if pid is None:
                _collect_and_freeze()
                pid = tier.spawn(box, run)
        except Exception:  # noqa: BLE001 - a guess that failed: the test will be built in turn
            for fd in (go_r, go_w, slot.r, slot.w, slot.stack_fd):
                os.close(fd)
            self.ahead_misses = AHEAD_MISSES
            return
        finally:
            self.busy = ()
        os.close(go_r)
        os.close(slot.w)
        slot.w = -1
        slot.pid, slot.go, slot.group, slot.tier, slot.box = pid, go_w, f"ahead:{nxt.nodeid}", tier, box
        self.waiting = slot

    def _spawned_ahead(self, tier: Tier, box: Box, slot: _Slot, go_r: int) -> int | None:
        """A sandbox built ahead whose child the spawner can fork (`chroot`: the root is
        mounted here, the child only enters it): asked of the spawner, 0 (its pid is
        read when first needed, ``named``). None: fork it here (the tier needs it, or
        there is no spawner). Forked here, every child costs this server ~1.5 ms of
        copy-on-write faults on its own pages and the page-table copy of the fork."""
        where = tier.entry(box)
        if where is None:
            return None
        parent = self.holder(tier) if where[0].startswith(HOLDER_ENTRY) else self.spawner
        if parent is None:
            box.state.pop("holder", None)
            return None
        try:
            parent.spawn(slot.w, slot.stack_fd, go_r, *where)
        except SpawnerGone:
            self.gone(parent)
            box.state.pop("holder", None)
            return None
        slot.spawned = True
        slot.parent = parent
        return slot.pid  # 0 until named

    def _close_busy(self) -> None:
        """After every fork here: a child forked while a test runs lets go of its fds.
        Once: the numbers may be reused in the child before it forks again."""
        busy, self.busy = self.busy, ()
        for fd in busy:
            with contextlib.suppress(OSError):
                os.close(fd)

    def drop_waiting(self) -> None:
        """Release the waiting child: EOF on its job pipe makes it tear down and exit."""
        z, self.waiting = self.waiting, None
        if z is None:
            return
        with contextlib.suppress(SpawnerGone):
            self.named(z)
        os.close(z.go)
        deadline = time.monotonic() + 30
        with contextlib.suppress(OSError):
            pidfd = self.pidfd(z.pid)
            try:
                while not select.select([pidfd], [], [], 0.05)[0]:
                    if time.monotonic() > deadline:  # a teardown that hangs
                        kill_tree(z.pid)
            finally:
                os.close(pidfd)
        with contextlib.suppress(ChildProcessError, SpawnerGone):
            self.reap(z.pid)
        if z.tier is not None and z.box is not None:
            with contextlib.suppress(Exception):
                z.tier.finish(z.box, z.pid, 0, None)
        for fd in (z.r, z.stack_fd):
            os.close(fd)
