"""The fork server: a warm, single-threaded pytest session that forks one child per test.

Started by ``remote.py`` (inside an execnet gateway) with ``subprocess``, so it has no
threads and ``fork()`` is safe. It re-parses the controller's command line exactly as
an xdist worker does, collects once, and then serves ``run`` commands: for each test it
asks the tier to spawn a confined child, waits for it (timeout, crash), reads the
child's reports, and answers with one ``done`` message carrying reports and readings
(made in ``outcome.py``). A child made before its test is sent (a zygote, a sandbox
built ahead) comes from ``ahead.py``.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import pytest

from pytest_isolate import stem, wire
from pytest_isolate.ahead import Ahead, _collect_and_freeze, _hostname
from pytest_isolate.child import STACK_SIGNAL, Forwarder, run_items
from pytest_isolate.observe import audit, usage
from pytest_isolate.outcome import CGROUP_TIERS, _cgroup, _frame_ok, done_message
from pytest_isolate.session import adapters, junit, node, rewritten
from pytest_isolate.session.carry import SandboxCarry
from pytest_isolate.session.node import SERVER_KEY
from pytest_isolate.spawner import Spawner, SpawnerGone
from pytest_isolate.spec import IsolationSpec
from pytest_isolate.tiers.base import (
    Box,
    Tier,
    Unavailable,
    WorkerContext,
    children,
    descendants,
    describe_procs,
    holds_sockets,
    kill_tree,
    still_running,
)

#: Seconds a timed-out test is given to dump its stack before its tree is killed.
STACK_GRACE = 1.0
#: How often a running test's process tree is sampled (tiers without a cgroup).
SAMPLE_INTERVAL = 0.05
#: How often zombies the server adopted are reaped while a test runs. A process whose
#: parent died reparents to the server (a subreaper) at `process` and `chroot`; in-process
#: init adopts it and reaps it at once, and a test may wait for its pid to go (psutil's
#: test_zombie_process kills a zombie's parent, then polls until the zombie is gone).
ADOPTED_REAP_INTERVAL = 0.05
#: How long a runner that said "end" is given to close its sockets (``_wait``).
SOCKETS_GRACE = 5.0


def load_tier(name: str, ctx: WorkerContext) -> Tier:
    """Tier classes are imported lazily: a host that cannot run UML never imports it."""
    if name == "process":
        from pytest_isolate.tiers.process import ProcessTier as cls
    elif name == "chroot":
        from pytest_isolate.tiers.chroot import ChrootTier as cls
    elif name == "jail":
        from pytest_isolate.tiers.jail import JailTier as cls
    elif name == "zone":
        from pytest_isolate.tiers.zone import ZoneTier as cls
    elif name == "uml":
        from pytest_isolate.tiers.uml import UmlTier as cls
    else:
        raise ValueError(f"unknown tier {name!r}")
    return cls(ctx)


class ForkServer:
    """pytest plugin registered in the server's config; owns the serve loop."""

    def __init__(self, config: pytest.Config, cmd_fd: int, evt_fd: int, term_fd: int, init: dict[str, Any]) -> None:
        self.config = config
        self.cmd_fd = cmd_fd
        self.evt_fd = evt_fd
        #: The server's links to the controller: closed first thing in every test child,
        #: so a test cannot forge results or commands on them.
        self.private_fds = [cmd_fd, evt_fd]
        self.term_fd = term_fd
        #: In a UML guest: the write end of the pipe for the tests' uncaptured stdout
        #: (``uml_init.fork_server``); -1 elsewhere.
        self.guest_out: int = init.get("guest_out", -1)
        #: The controller's stdout as it sees it (a guest's: its ``term_fd`` is a pipe).
        self.told_terminal: dict[str, Any] | None = init.get("terminal")
        #: What its tests see (``stem.adopt``): the controller's environment, tripwires in.
        self.environ = init.get("environ")
        if self.environ:
            for view in self.environ.values():
                view.update(init.get("env") or {})
        c = init["ctx"]
        self.ctx = WorkerContext(
            run_id=c["run_id"],
            rundir=Path(c["rundir"]),
            workdir=Path(c["workdir"]),
            rootdir=Path(c["rootdir"]),
            basetemp=Path(c["basetemp"]),
            invocation_dir=Path(c["invocation_dir"]),
            switch_netns=c.get("switch_netns"),
            extra=dict(c.get("extra") or {}),
        )
        self.sampling = (config.getoption("isolate_readings", None) or config.getini("isolate_readings") or "on") == "on"
        self.forwarder = Forwarder(config)
        self.forwarder.carry = SandboxCarry(config, init.get("carry") or {})
        config.pluginmanager.register(self.forwarder, "isolate-forwarder")
        config.pluginmanager.register(self.forwarder.terminal, "isolate-terminal")
        self.tiers: dict[str, Tier] = {}
        self.items: dict[str, pytest.Item] = {}
        #: Children still being torn down by the kernel after their test was answered:
        #: runners that said "end", and inits that "released" their sandbox (value: its
        #: box, for ``tier.release`` once the last of it is gone).
        self.exiting: dict[int, Box | None] = {}
        #: The child waiting for its next job (a zygote, a sandbox built ahead, a kept
        #: scope child) and the spawner that forks zygotes.
        self.ahead = Ahead(
            config, self.forwarder, term_fd, self.private_fds, self._close_private, self.tier
        )
        #: The worker attributes hidden while tests run (``node.hide_worker``).
        self.worker_attrs: dict[str, Any] = {}

    # -- pytest hooks -------------------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        # The server's own terminal output would only be noise (and children write to
        # the user's terminal): give the reporter a sink.
        tr = config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            from _pytest._io import TerminalWriter

            tr._tw = TerminalWriter(open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
        junit.stand_in(config, self.forwarder)
        adapters.server_configured(config)
        if self.environ:
            stem.adopt(self.environ)  # the controller's, not configured a second time

    @pytest.hookimpl(tryfirst=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        # Before junitxml's own unconfigure (see ``junit.withdraw``).
        junit.withdraw(config)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self) -> None:
        """Last: every plugin has decided it runs in a worker by now (pytest-cov does here)."""
        self.worker_attrs = node.hide_worker(self.config)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self) -> Any:
        """After every plugin's own ``pytest_sessionfinish`` (the outermost wrapper):
        what they left in ``workeroutput`` goes to the controller's
        ``pytest_testnodedown``, as an xdist worker's does. Before them, the session is
        a worker again (``node.hide_worker``)."""
        node.show_worker(self.config, self.worker_attrs)
        try:
            return (yield)
        finally:
            with contextlib.suppress(OSError):
                wire.send(self.evt_fd, {"t": "nodedown", "workeroutput": node.server_output(self.config)})

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = {item.nodeid: item for item in session.items}
        self.ahead.collected(self.items, session.items)
        rewritten.pyc_again()
        # The collected files' sources, read once here, before any child is forked:
        # in-process, a test's module is in linecache from the moment pytest computes the
        # test's location; a child that cannot open a file any more (a test that lowered
        # RLIMIT_NOFILE, or used up its descriptors) showed "???" instead of its code.
        for path in dict.fromkeys(str(getattr(item, "path", "")) for item in session.items):
            with contextlib.suppress(Exception):
                linecache.getlines(path)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        # Create basetemp once, here: children inherit the cached path. Left to each child,
        # pytest would wipe and re-create it per test, deleting earlier tests' tmp_path.
        factory = getattr(self.config, "_tmp_path_factory", None)
        if factory is not None:
            factory.getbasetemp()
        # The gateway opens these too, so a test's captured output outlives this server
        # (a test that kills its worker still shows what it printed).
        fds = [f.fileno() for f in self._capture_files()]
        wire.send(self.evt_fd, {"t": "ready", "pid": os.getpid(), "items": len(self.items), "capture_fds": fds})
        self._connect_direct()
        # After the direct link, which brings the controller's stdout: pytest's markup and
        # width follow it (``pytest > out.txt`` on a terminal has none), not our stderr.
        out = self.forwarder.term_out
        self.forwarder.terminal.prepare(out if out >= 0 else self.term_fd, self.told_terminal)
        if self.guest_out >= 0:
            # A UML guest's: a pipe its worker relays to the controller's stdout (the
            # test's uncaptured prints); stderr goes the same way through ``term_fd``.
            self.forwarder.term_out = self.guest_out
        self.ahead.start_spawner()
        try:
            self.serve()
        finally:
            self.ahead.drop_waiting()
            self._reap_exiting()
            for sp in self.ahead.spawners():
                with contextlib.suppress(Exception):
                    sp.close()
            for tier in self.tiers.values():
                with contextlib.suppress(Exception):
                    tier.close()
        return True

    def _connect_direct(self) -> None:
        """Switch commands and results to the controller's own socket, when it offered one.

        Through execnet each message crosses two IO threads (the controller's and the
        gateway's) and a relay: ~1 ms a hop here, twice per test. A host worker's
        controller is on the same machine, so it listens on a socket in the worker dir;
        the gateway stays for start-up and for telling the controller how this server
        died. UML workers have no such path (another kernel) and keep execnet.
        """
        path = self.ctx.extra.get("direct")
        if not path:
            return
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(path)
        _, fds, _, _ = socket.recv_fds(sock, 1, 2)
        for fd in fds:
            os.set_inheritable(fd, False)
        if fds:
            self.forwarder.term_out = fds[0]  # see ``Forwarder.term_out``
        if len(fds) > 1:
            self.forwarder.term_in = fds[1]  # see ``Forwarder.term_in``
        fd = sock.detach()
        os.set_inheritable(fd, False)
        self.private_fds.append(fd)
        self.cmd_fd = self.evt_fd = fd

    # -- serving ------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                cmd = wire.recv(self.cmd_fd)
            except EOFError:
                return
            if cmd["t"] == "shutdown":
                return
            if cmd["t"] == "ctx":  # known only after the controller collected (early start)
                self.ctx.switch_netns = cmd.get("switch_netns")
                continue
            if cmd["t"] == "run":
                try:
                    msg = self.run_test(cmd)
                except Unavailable as exc:  # the tier cannot give this spec here
                    msg = {"t": "done", "nodeid": cmd["nodeid"], "unavailable": str(exc)}
                except Exception:  # noqa: BLE001 - the server must survive a bad test
                    msg = {"t": "done", "nodeid": cmd["nodeid"], "error": traceback.format_exc()}
                wire.send(self.evt_fd, msg)
                self.ahead.after_test(cmd["nodeid"])

    def tier(self, name: str) -> Tier:
        if name not in self.tiers:
            self.tiers[name] = load_tier(name, self.ctx)
        return self.tiers[name]

    def _capture_files(self) -> list[Any]:
        """pytest's global capture tmpfiles, shared with forked children (same open file
        description), so the output of a child that crashed can still be read here."""
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        gc = getattr(capman, "_global_capturing", None)
        files = []
        for cap in (getattr(gc, "out", None), getattr(gc, "err", None)):
            tmp = getattr(cap, "tmpfile", None)
            # ``--capture=fd`` only: with ``--capture=sys`` (packaging's suite) the
            # capture is in the child's memory, no file to share, nothing to read here.
            try:
                shared = tmp is not None and hasattr(tmp, "buffer") and tmp.name != os.devnull and tmp.fileno() >= 0
            except (AttributeError, OSError, ValueError):
                shared = False
            if shared:
                files.append(tmp)
        return files

    def _close_private(self) -> None:
        """In a forked child: let go of the server's links (see ``private_fds``)."""
        for fd in self.private_fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def run_test(self, cmd: dict[str, Any]) -> dict[str, Any]:
        nodeid = cmd["nodeid"]
        # pytest-xdist < 3.6 appends "@<group>" to the ids of --dist=loadgroup items.
        item = self.items.get(nodeid) or self.items.get(nodeid.rsplit("@", 1)[0])
        if item is None:
            return {"t": "done", "nodeid": nodeid, "error": f"{nodeid}: not collected by the isolated worker"}
        spec = IsolationSpec.from_dict(cmd["spec"])
        tier = self.tier(spec.tier)
        group = cmd.get("group")
        job = {
            "nodeid": nodeid,
            "spec": cmd["spec"],
            "next": cmd.get("next") if group else None,
            "attempt": cmd.get("attempt", 0),
            "location": cmd.get("location"),
            "depth": cmd.get("depth"),
            "dependency": cmd.get("dependency"),
            "teardown": cmd.get("teardown"),
        }
        ahead = self.ahead
        waiting = ahead.take(nodeid, spec, group)
        ahead.want_zygote = spec.tier == "process" and not job["next"]
        slot = waiting or ahead.new_slot()
        job["seq"] = slot.seq  # the sandbox's number: its base temp dir's name (child.py)
        r, stack_fd = slot.r, slot.stack_fd
        box = slot.box if waiting is not None and waiting.box is not None else Box(
            nodeid, spec, slot.seq, _hostname(nodeid), slot.w
        )
        captures = self._capture_files()
        for f in captures:
            f.seek(0)
            f.truncate()
        cgroup_memory = spec.tier in CGROUP_TIERS
        go_r, go_w = os.pipe() if group and waiting is None else (-1, -1)

        def run() -> NoReturn:
            self._close_private()
            os.close(r)
            run_items(
                self.config, self.forwarder, self.items, job,
                slot.w, stack_fd, self.term_fd, cgroup_memory, go_r,
            )

        msgs: list[dict[str, Any]] = []
        leftovers_early: list[dict[str, Any]] = []
        status: int | None = 0
        ru = None
        timed_out = False
        kept = False
        pid = 0
        parent: Spawner | None = None
        t0 = time.perf_counter()
        try:
            if waiting is not None:
                pid = ahead.named(waiting)
                # Its parent, taken now: making the next child below may find the spawner
                # dead (this test may kill it at once) and replace it before ``_wait``.
                parent = ahead.parent_of(pid)
                wire.send(waiting.go, job)
                if ahead.want_zygote:
                    with contextlib.suppress(SpawnerGone):  # next time: forked here
                        ahead.make_zygote()
                if waiting.group.startswith("ahead:"):
                    ahead.build_ahead(nodeid, spec, busy=(r, stack_fd, waiting.go))
            else:
                tier.prepare(box)
                # Everything the warm server allocated becomes permanent for the GC: a
                # child's collection then never walks (and copy-on-write faults) the
                # inherited heap — measured 20 ms → 2 ms per child that collects.
                _collect_and_freeze()
                self._reap_exiting()
                # The job pipe's write end stays here only: held by a process between us
                # and the runner (a namespace's init), it would never reach EOF.
                ahead.busy = (go_w,) if go_w >= 0 else ()
                try:
                    pid = tier.spawn(box, run)
                finally:
                    ahead.busy = ()
                os.close(slot.w)
                slot.w = -1
                if go_r >= 0:
                    os.close(go_r)
                    slot.pid, slot.go, slot.group, slot.tier, slot.box = pid, go_w, group, tier, box
                if not group:
                    ahead.build_ahead(nodeid, spec, busy=(r, stack_fd))
            # The last tests' clean-up (their roots' unmounting) while this one runs.
            for t in self.tiers.values():
                t.tidy()
            status, ru, timed_out = self._wait(box, tier, pid, r, msgs, spec.timeout, stack_fd, parent)
            if status == "kept":  # the child keeps fixtures up for the next item of its group
                kept = True
                status = 0
                slot.group = group
                ahead.waiting = slot
            elif status is None:  # the runner ended cleanly and is exiting: don't wait
                leftovers_early = self._kill_descendants(pid)
                if (spawner := ahead.parent_of(pid)) is not None:
                    spawner.forget(pid)  # the spawner reaps it
                    if box.state.get("holder"):
                        box.state["released"] = next((m for m in reversed(msgs) if m.get("t") == "changes"), {})
                else:
                    self.exiting[pid] = None
                status = 0
            elif status == "released":  # the init emptied its sandbox and is exiting with it
                box.state["released"] = msgs[-1]  # what it found there (jail.py)
                self.exiting[pid] = box
                status = 0
        finally:
            if slot.w >= 0:
                os.close(slot.w)
                slot.w = -1
            if not kept and slot.go >= 0:
                # The job pipe of a child that ran its last job (a zygote, a sandbox
                # built ahead, a kept child that ended or died): nothing more is sent on
                # it. Held open, it is one fd a test, and every later child inherits them.
                os.close(slot.go)
                slot.go = -1
            wall = time.perf_counter() - t0
            if not kept:
                exclude = [*self.exiting, *(p["pid"] for p in leftovers_early)]
                # A holder's orphans are in the shared network namespace that ``finish``
                # empties of closed sockets: they go first (an init killed them itself).
                holder = parent if box.state.get("holder") else None
                left = self._reap_orphans(exclude=exclude, holder=holder) if holder is not None else None
                if left is not None:
                    # Killed is not gone: one that frees a big heap first still holds its
                    # sockets, and the next test binds in this network namespace.
                    still_running([p["pid"] for p in (*leftovers_early, *left)], SOCKETS_GRACE)
                try:
                    if pid:
                        tier.finish(box, pid, status, ru)  # type: ignore[arg-type]
                finally:
                    leftovers = leftovers_early + (left if left is not None else self._reap_orphans(exclude=exclude))
                    os.close(r)
            else:
                leftovers = []
        if box.state.get("jail_net_dropped"):
            # The shared network namespace could not be emptied of this test's sockets
            # (jail.py, ``_empty_loopback``): a sandbox built ahead in it is built again.
            w = ahead.waiting
            if w is not None and w.box is not None and w.box.state.get("jail_net") is not None:
                ahead.drop_waiting()
        result = done_message(self.config, item, box, msgs, status, ru, timed_out, wall, stack_fd, captures, leftovers)  # type: ignore[arg-type]
        if not kept:
            os.close(stack_fd)
        return result

    def _wait(
        self, box: Box, tier: Tier, pid: int, r: int, msgs: list[dict[str, Any]], timeout: float | None, stack_fd: int,
        parent: Spawner | None = None,
    ) -> tuple[int | None, Any, bool]:
        """Wait for the test; ``(None, None, False)`` means the runner said "end" and the
        tier is direct, so its exit need not be waited for. ``parent``: the spawner that
        forked the runner, if one did."""
        # One reader per sandbox: a kept child's next item continues its stream.
        reader = box.state.get("reader")
        if reader is None:
            reader = box.state["reader"] = wire.Reader(limit=wire.MAX_MESSAGE, check=_frame_ok, strict=False)
        pidfd = self.ahead.pidfd(pid)
        deadline = time.monotonic() + timeout if timeout else None
        timed_out = False
        # Tiers without a cgroup are sampled from /proc while the test runs: peak memory
        # of the whole tree and peak process count. A test shorter than one interval
        # costs nothing (rusage has its figures).
        sampler = None
        if self.sampling and not _cgroup(box):
            sampler = usage.TreeSampler(box.spec.memory)
        box.state["sampler"] = sampler
        next_sample = time.monotonic() + SAMPLE_INTERVAL
        next_reap = time.monotonic() + ADOPTED_REAP_INTERVAL
        # The command pipe too: when it hangs up the controller is gone (SIGKILLed, its
        # host lost), nobody will read this test's result, and the test must not run on.
        watch = [r, pidfd, self.cmd_fd]
        # A test may kill whatever it sees, its parent too: for a zygote, the spawner.
        # Then the test dies with it, as when a test kills the fork server.
        spawner = parent
        if spawner is not None and spawner not in self.ahead.spawners():  # found dead meanwhile
            spawner = None
            box.state["spawner_killed"] = True
            tier.kill(box, pid)
            deadline = None
        if spawner is not None:
            watch.append(spawner.sock.fileno())
        try:
            while True:
                now = time.monotonic()
                wait = None if deadline is None else max(0.0, deadline - now)
                if sampler is not None:
                    if now >= next_sample:
                        sampler.sample(pid)
                        next_sample = now + SAMPLE_INTERVAL
                    wait = min(wait, next_sample - now) if wait is not None else max(0.0, next_sample - now)
                wait = max(0.0, min(wait, next_reap - now) if wait is not None else next_reap - now)
                ready, _, _ = select.select(watch, [], [], wait)
                if time.monotonic() >= next_reap:
                    self._reap_adopted(pid)
                    next_reap = time.monotonic() + ADOPTED_REAP_INTERVAL
                if self.cmd_fd in ready:
                    watch.remove(self.cmd_fd)  # a command waits (read after the test), or:
                    if _hung_up(self.cmd_fd):
                        tier.kill(box, pid)
                        deadline = None
                if spawner is not None and spawner.sock.fileno() in ready:
                    try:
                        spawner.poll()
                    except SpawnerGone:
                        watch.remove(spawner.sock.fileno())
                        self.ahead.drop_orphaned_zygote(spawner)
                        spawner = None
                        box.state["spawner_killed"] = True
                        tier.kill(box, pid)
                        deadline = None
                if r in ready:
                    self._drain(r, reader, msgs)
                    last = msgs[-1].get("t") if msgs else None
                    if last == "item_done":
                        return "kept", None, False  # type: ignore[return-value]
                    if (tier.direct or box.state.get("holder")) and last == "end":
                        if box.state.get("holder") and holds_sockets(pid):
                            # Its network namespace is the next test's: a port it
                            # still holds while it exits would be taken for that test's.
                            select.select([pidfd], [], [], SOCKETS_GRACE)
                        return None, None, False
                    if last == "released":
                        return "released", None, False  # type: ignore[return-value]
                if pidfd in ready:
                    break
                if not ready and deadline is not None and not timed_out and time.monotonic() >= deadline:
                    timed_out = True
                    self._dump_stack(self._runner(box, pid, msgs), stack_fd)
                    tier.kill(box, pid)
                    deadline = None
            status, ru = self.ahead.reap(pid)
            self._drain(r, reader, msgs)
            if _hung_up(r):  # every writer is gone: a partial frame left is garbage
                msgs.extend(reader.close())
            return status, ru, timed_out
        finally:
            os.close(pidfd)

    @staticmethod
    def _drain(r: int, reader: wire.Reader, msgs: list[dict[str, Any]]) -> None:
        # Non-blocking: a daemon the test left may keep the write end open forever.
        while True:
            try:
                data = os.read(r, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                return
            msgs.extend(reader.feed(data))

    @staticmethod
    def _runner(box: Box, pid: int, msgs: list[dict[str, Any]]) -> int | None:
        """The process that runs the test, in the tree of ``pid`` (the sandbox's top,
        an init above it from ``jail`` up): the outermost one numbered as the runner
        numbered itself in its first frame (a kept child's comes with its first test)."""
        ns = next((m["pid"] for m in msgs if m.get("t") == "channel"), box.state.get("runner_ns_pid"))
        box.state["runner_ns_pid"] = ns
        if ns is None:
            return None
        best: tuple[int, int] | None = None
        for p in [pid, *descendants(pid)]:
            chain = _ns_pids(p)
            if chain and chain[-1] == ns and (best is None or len(chain) < best[0]):
                best = (len(chain), p)
        return best[1] if best else None

    def _dump_stack(self, runner: int | None, stack_fd: int) -> None:
        if runner is None:
            return
        try:
            os.kill(runner, STACK_SIGNAL)
        except OSError:
            return
        end = time.monotonic() + STACK_GRACE
        size = -1
        while time.monotonic() < end:
            time.sleep(0.05)
            new = os.fstat(stack_fd).st_size
            if new and new == size:
                break
            size = new

    def _reap_exiting(self) -> None:
        for pid in list(self.exiting):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._gone(pid)

    def _gone(self, pid: int) -> None:
        """An exiting child was reaped: what its sandbox held can go now (zone: cgroup)."""
        box = self.exiting.pop(pid, None)
        if box is not None:
            with contextlib.suppress(Exception):
                self.tier(box.spec.tier).release(box)

    def _reap_adopted(self, runner: int) -> None:
        """Reap the zombies among our children while a test runs: orphans of the test's
        processes, adopted by us. Never one whose status is waited for elsewhere: the
        runner, the spawner, the child waiting for its job, one still exiting, a tier's
        own. (Live orphans are left to ``_reap_orphans`` after the test.)"""
        ahead = self.ahead
        keep = {runner, *self.exiting}
        keep |= {sp.pid for sp in ahead.spawners()}
        if ahead.waiting is not None:
            keep.add(ahead.waiting.pid)
        for t in self.tiers.values():
            keep |= t.own_pids()
        for p in children(os.getpid()):
            if p not in keep and _zombie(p):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p, os.WNOHANG)

    def _kill_descendants(self, pid: int) -> list[dict[str, Any]]:
        """Live descendants of a runner that is about to exit would outlive its test."""
        return self._kill(descendants(pid))

    def _reap_orphans(self, exclude: list[int] = (), holder: Spawner | None = None) -> list[dict[str, Any]]:  # type: ignore[assignment]
        """Processes a test left behind reparent to us (we are a subreaper): kill and
        report them, so nothing of one test outlives it. ``holder``: the jail holder
        the test ran in, whose PID namespace its orphans reparent to (no other holder
        ran a test since its own orphans were taken)."""
        skip = set(exclude)
        # The spawner's children are its zygotes (waiting, or exiting cleanly), one of
        # which it may be forking right now: never taken. What they started is: a
        # runner that is still exiting has not handed its children to us yet. A child
        # waiting for its job (zygote, sandbox built ahead, kept scope) is not walked.
        ahead = self.ahead
        spawner = ahead.spawner.pid if ahead.spawner is not None else None
        waiting = ahead.waiting.pid if ahead.waiting is not None else None
        # A released init's subtree is its own to end (it already killed the rest).
        keep = {spawner, waiting, *(p for p, box in self.exiting.items() if box is not None)}
        keep |= {h.pid for h in ahead.all_holders()}
        for t in self.tiers.values():
            keep |= t.own_pids()
        # The zygotes' subtrees first, then our own children: an orphan of an exiting
        # zygote moves from the first place to the second (we are its subreaper), so
        # read in that order it is seen in one or the other; read the other way round
        # it could move between the two reads and be seen in neither (a daemon then
        # counted as the next test's).
        mine = [q for z in children(spawner) for q in descendants(z)] if spawner is not None else []
        if holder is not None and holder in ahead.all_holders():
            mine += self._holder_leftovers(holder)
        mine += [q for p in children(os.getpid()) if p not in keep for q in (p, *descendants(p))]
        mine = list(dict.fromkeys(mine))
        found = self._kill([p for p in mine if p not in skip and not _zombie(p)])
        # Reap what died (killed orphans, zombies): nothing may be reported twice.
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self._gone(pid)
        return found

    def _holder_leftovers(self, h: Spawner) -> list[int]:
        """A jail holder is PID 1 of its namespace: what a test left there reparents to
        it, not to us. Its children that it did not fork as zygotes are such orphans;
        what its zygotes started is the test's too."""
        try:
            orphans = h.orphans()
        except SpawnerGone:
            self.ahead.gone(h)
            return []
        kids = children(h.pid)
        orphans = [z for z in orphans if z in kids]  # still its children, nobody else
        zygotes = [z for z in kids if z not in orphans]
        return [q for z in zygotes for q in descendants(z)] + [q for z in orphans for q in (z, *descendants(z))]

    def _kill(self, pids: list[int]) -> list[dict[str, Any]]:
        found = describe_procs(still_running(pids))
        for p in found:
            kill_tree(p["pid"])
        for p in found:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p["pid"], os.WNOHANG)
        return found


def _ns_pids(pid: int) -> list[int]:
    """``pid``'s numbers in each PID namespace it is in, outermost first (``NSpid``)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def _hung_up(fd: int) -> bool:
    """Every writer of pipe ``fd`` is gone (POLLHUP; unread data does not hide it)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def main(cmd_fd: int | None = None, evt_fd: int | None = None, start: dict[str, Any] | None = None) -> None:
    """The fork server's life; its pipes are in argv when spawned, given when forked
    from the stem (``stem.run_server``).

    A forked server is given ``start`` (command line, directory, paths) with its fork
    and configures before the rest of its set-up comes (``Worker._launch``); a spawned
    one reads all of it first."""

    stem.disabled = True
    if cmd_fd is None or evt_fd is None:
        cmd_fd, evt_fd = int(sys.argv[1]), int(sys.argv[2])
    try:
        init = start if start is not None else wire.recv(cmd_fd)
    except EOFError:
        return  # the gateway ended before the set-up came (``Stem.drop``): nothing to serve
    guest_out = init.get("guest_out", -1)  # set in a guest, not by the controller
    sys.argv[:] = init.get("argv") or sys.argv
    os.chdir(init["dir"])
    sys.path[:] = init["sys_path"]
    rewritten.stop()  # the controller's job, not a server's
    rewritten.no_pyc_until_collected()
    if init.get("pyc_share"):
        rewritten.use(init["pyc_share"])  # a guest's: what the controller rewrote
    # Orphans of a test reparent to us, so nothing a test started can outlive it.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: the gateway died
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller handles Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    term_fd = os.dup(2)
    log = os.open(init["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log, 2)
    for fd in (log, devnull):
        os.close(fd)
    for fd in (cmd_fd, evt_fd, term_fd):
        os.set_inheritable(fd, False)

    from _pytest.config import _prepareconfig

    config = _prepareconfig(list(init["args"]), None)
    if start is not None:
        try:
            init = wire.recv(cmd_fd)
        except EOFError:
            return
    init["guest_out"] = guest_out
    # The tripwires' names: planted after a forked server's environment was taken.
    os.environ.update(init.get("env") or {})
    # Imported before the run's environment was final when forked from the stem: the
    # audit hook reads the run's tripwires from it.
    audit.refresh_environment()
    # Plugins are imported now (pytest rewrote them), not yet configured.
    adapters.in_server()
    opt = config.option
    opt.basetemp = init["ctx"]["basetemp"]
    for name, value in (("numprocesses", None), ("dist", "no"), ("looponfail", False), ("tx", None)):
        if hasattr(opt, name):
            setattr(opt, name, value)
    config.workerinput = dict(init["workerinput"])  # type: ignore[attr-defined]
    config.workeroutput = {}  # type: ignore[attr-defined]
    config.stash[SERVER_KEY] = True
    server = ForkServer(config, cmd_fd, evt_fd, term_fd, init)
    config.pluginmanager.register(server, "isolate-forkserver")
    try:
        config.hook.pytest_cmdline_main(config=config)
    finally:
        with contextlib.suppress(Exception):
            for p in descendants(os.getpid()):
                kill_tree(p)


if __name__ == "__main__":
    main()
