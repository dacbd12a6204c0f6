"""Controller side: pools of isolated workers, dispatch, worker death, clean-up.

One worker (execnet gateway + fork server) serves every host tier — process, chroot,
jail and zone differ only in how the forked child confines itself — so a suite mixing
tiers still collects once. UML needs a worker per guest configuration, since the
worker lives inside the guest.

A worker's process management is ``workermanage.py``; the switch shared by the run's
controllers ``facets/switch.py``; the sweep of this run's and dead runs' host objects
``leftovers.py``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import execnet
import pytest

from pytest_isolate import frozen
from pytest_isolate.facets.switch import SharedSwitch, sweep_stale_switches
from pytest_isolate.leftovers import _write_owner, sweep, sweep_stale
from pytest_isolate.session import adapters, rewritten
from pytest_isolate.session.carry import Carry
from pytest_isolate.spec import IsolationSpec
from pytest_isolate.workermanage import Worker, WorkerDied

#: Extra seconds beyond a test's own timeout before the controller stops trusting the
#: fork server to report (it enforces the timeout itself; this guards a wedged worker).
GUARD = 60.0


def pool_key(spec: IsolationSpec) -> tuple[Any, ...]:
    if spec.tier == "uml":
        return ("uml", spec.kernel, spec.memory, spec.cpus, spec.network)
    return ("host",)


#: What CI systems, ``timeout``, ``docker stop`` and Kubernetes send to cancel a job
#: (SIGTERM), and what a closed terminal or SSH session sends (SIGHUP).
CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class CancelSignals:
    """SIGTERM and SIGHUP handled as Ctrl-C while the controller lives.

    By default either signal kills pytest where it stands: no ``finally`` runs, so the
    running sandbox's mounts, the switch namespace, the cgroups and the run dir stay
    until some later run sweeps them. Raised as ``KeyboardInterrupt`` instead, they take
    the path Ctrl-C takes: the test being waited for is abandoned, pytest prints its
    interrupted summary and exits with 2, and ``Controller.shutdown(fast=True)`` stops
    the workers and sweeps the run.

    Installed only for a signal whose disposition is still the default. ``SIG_IGN``
    means whoever started pytest (``nohup``, a supervisor) wants the run to survive that
    signal; a Python handler means the user's own code (a conftest, a plugin) decided
    what the signal does, and replacing it would silently break their shutdown logic.
    Whatever their handler raises into the controller is handled as any exception is
    (``Controller.abort``, or the interrupt path for ``KeyboardInterrupt``), and the
    session end sweeps the run either way. A handler that is not Python's (set by C
    code: ``getsignal`` returns None) is left alone for the same reason.

    Only in the controller: the fork server and the sandboxes are other processes, which
    are stopped by the controller (and see it go if it is killed outright).
    """

    def __init__(self) -> None:
        #: Signal -> the disposition it had before ours, for those we took over.
        self.previous: dict[int, Any] = {}
        #: Cancel signals that arrived while ``closing``: re-sent once it is over.
        self.deferred: list[int] | None = None

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there (a controller made by a thread's pytest)
        for sig in CANCEL_SIGNALS:
            if sig in self.previous or signal.getsignal(sig) is not signal.SIG_DFL:
                continue
            signal.signal(sig, self._handle)
            self.previous[sig] = signal.SIG_DFL

    def _handle(self, signum: int, frame: Any) -> None:
        if self.deferred is not None:
            # Shutting down: the sweep finishes first, or it would leave half the run.
            self.deferred.append(signum)
            return
        raise KeyboardInterrupt(f"Interrupted by {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def closing(self) -> Any:
        """Defer cancel signals for the duration; then restore the previous handlers and
        re-send a deferred signal, now handled as it would have been without us (by
        default: the process ends, with nothing of the run left behind)."""
        outer = self.deferred is None
        if outer:
            self.deferred = []
        try:
            yield
        finally:
            if outer:
                deferred, self.deferred = self.deferred or [], None
                self.restore()
                for sig in dict.fromkeys(deferred):
                    os.kill(os.getpid(), sig)

    def restore(self) -> None:
        """Put the previous handlers back, unless someone replaced ours meanwhile (a test
        that ran in-process): theirs stays."""
        for sig, prev in self.previous.items():
            with contextlib.suppress(ValueError, TypeError):
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, prev)
        self.previous.clear()


class Controller:
    """Owns the run directory, the workers, and the end-of-session sweep."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        # Made at the first isolated test, after collection: what exists now lives until
        # the session ends, and every full collection would walk it again (a tenth of
        # this process's time per isolated test, where each result is a few dicts).
        frozen.freeze()
        self.run_id = secrets.token_hex(4)
        #: How deep pytest calls a test's protocol in this process (``child.match_depth``).
        self.depth: int | None = None
        self.rundir = Path(f"/tmp/pytest-isolate-{self.run_id}")
        self.group = execnet.Group()
        self.workers: dict[tuple[Any, ...], Worker] = {}
        #: Workers asked to end their sessions before this one ends (``finishing``).
        self.stopping: list[Worker] = []
        self._switch: Any = None
        self.canaries: Any = None
        self._armed = False
        # First: from here on a cancel (SIGTERM, SIGHUP) unwinds through ``shutdown``.
        self.cancel = CancelSignals()
        self.cancel.install()
        try:
            self._start(config)
        except BaseException:
            # Cancelled or failed half-way: nobody holds this controller to shut it down.
            self.shutdown(fast=True)
            raise

    def _start(self, config: pytest.Config) -> None:
        sweep_stale()
        self.rundir.mkdir(mode=0o755)
        _write_owner(self.rundir)
        factory = getattr(config, "_tmp_path_factory", None)
        # ``-p no:tmpdir`` (packaging's suite runs so): no tmp_path for anyone, but the
        # sandboxes still want a writable base of their own; the run dir's goes with it.
        self.basetemp = factory.getbasetemp() if factory is not None else self.rundir / "basetemp"
        self.basetemp.mkdir(exist_ok=True)
        #: What plugins measured inside sandboxes (coverage, ...), merged per test.
        self.carry = Carry(config)
        #: Workers that could not start, by pool key: the reason their tests fail with.
        self.broken: dict[tuple[Any, ...], str] = {}
        #: (nodeid, pool key) of a test sent and not yet collected (``prefetch``).
        self.pending: tuple[str, tuple[Any, ...]] | None = None
        self.count = 0
        self.uml_kernel: str | None = config.getoption("isolate_uml_kernel", None) or config.getini(
            "isolate_uml_kernel"
        ) or None
        self.needs_switch = False

    def arm(self) -> None:
        """Plant the run's tripwires, once: before the first worker is spawned, or once a
        forked one was asked for (its server configures meanwhile, ~15 ms that would
        otherwise wait for them). Before any test either way."""
        if self._armed:
            return
        self._armed = True
        from pytest_isolate.observe.canaries import Canaries

        self.canaries = Canaries(self.rundir, self.run_id, settle=False)
        # Sandboxes have the environment of the workers: tests can find the tripwires
        # (the escape matrix targets them on purpose).
        os.environ.update(self.canaries.env)

    def canary_env(self) -> dict[str, str]:
        return dict(self.canaries.env) if self.canaries is not None else {}

    def canary_escapes(self, tier: str) -> list[dict[str, Any]]:
        """Tripwire contacts since the last test, as escape records of this test."""
        if self.canaries is None:
            return []
        contacts = self.canaries.contacts()
        if not contacts:
            return []
        from pytest_isolate.observe.escapes import verdicts

        return verdicts(tier, [], [], [], contacts)

    def switch_path(self) -> str | None:
        if not self.needs_switch:
            return None
        if self._switch is None:
            self._switch = SharedSwitch.open(self.switch_id())
        return self._switch.path

    def switch_id(self) -> str:
        """Under pytest-xdist every worker of the run joins one switch (named from xdist's
        test-run uid), so tests running in parallel can reach each other."""
        uid = (getattr(self.config, "workerinput", None) or {}).get("testrunuid")
        return f"x{str(uid)[:10]}" if uid else self.run_id

    def worker_index(self, local: int) -> int:
        """Address block of a worker: unique across the xdist workers sharing a switch."""
        wid = str((getattr(self.config, "workerinput", None) or {}).get("workerid", "gw0"))
        n = int(wid[2:]) if wid.startswith("gw") and wid[2:].isdigit() else 0
        return (n * 4 + local) % 64

    def worker(self, spec: IsolationSpec) -> Worker:
        key = pool_key(spec)
        w = self.workers.get(key)
        if w is None:
            self.count += 1
            w = Worker(self, self.count, key, spec)
            self.workers[key] = w
        w.ready()
        return w

    def launch(self, spec: IsolationSpec) -> None:
        """Start the worker ``spec`` will need without waiting for it (``worker`` does)."""
        key = pool_key(spec)
        if key not in self.workers:
            self.count += 1
            self.workers[key] = Worker(self, self.count, key, spec, early=True)

    def collected(self, needs_switch: bool) -> None:
        """Collection is over: what the first test needs that was not known at launch."""
        frozen.freeze()  # see __init__: the collected items are here to stay now
        if self.canaries is not None:
            self.canaries.contacts()  # the controller's own collection is nobody's escape
        if needs_switch and not self.needs_switch:
            self.needs_switch = True
            for w in self.workers.values():
                if not w.uml:
                    w.update({"t": "ctx", "switch_netns": self.switch_path()})

    def run(
        self, nodeid: str, spec: IsolationSpec, group: str | None = None, nextid: str | None = None,
        attempt: int = 0, location: tuple[str, int | None, str] | None = None,
        teardown: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run one test; a dead worker yields a failure for that test and is replaced.

        ``group``/``nextid``: with ``scope="module"``/``"session"`` the sandbox child keeps
        its fixtures up for ``nextid`` when that test belongs to the same group.
        ``teardown``: the test pytest runs next and the failures so far, so the sandbox
        reports the teardown in-process would have (``child.run_items``)."""
        if self.pending is not None and self.pending[0] == nodeid:
            return self.collect(nodeid, spec)
        self.discard_pending()
        failed = self.submit(nodeid, spec, group, nextid, attempt, location, teardown)
        return failed if failed is not None else self.collect(nodeid, spec)

    def submit(
        self, nodeid: str, spec: IsolationSpec, group: str | None = None, nextid: str | None = None,
        attempt: int = 0, location: tuple[str, int | None, str] | None = None,
        teardown: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Send a test to its worker without waiting; a "done" error if it cannot start.

        ``location``: the item's, as this process computed it for its own reports; the
        sandbox's item takes it instead of computing it again (~0.5 ms of a child's
        time, or of its zygote's)."""
        key = pool_key(spec)
        if key in self.broken:
            return {"t": "done", "nodeid": nodeid, "error": self.broken[key]}
        try:
            w = self.worker(spec)
        except Exception as exc:  # noqa: BLE001 - its own error, e.g. a UML kernel that will not boot
            # Once: every later test of this worker fails with the same reason instead
            # of paying another start (a suite of thousands would take minutes to fail).
            why = _error_line(str(exc))
            self.broken[key] = f"isolated worker could not start: {why} (its output: in the failure of {nodeid})"
            self.drop(key, error=why)
            full = str(exc) if isinstance(exc, WorkerDied) else f"{type(exc).__name__}: {exc}"
            return {"t": "done", "nodeid": nodeid, "error": f"isolated worker could not start: {why}\n{full}"}
        cmd = {"t": "run", "nodeid": nodeid, "spec": spec.to_dict(), "group": group, "next": nextid, "attempt": attempt}
        if location is not None:
            cmd["location"] = list(location)
        if teardown is not None:
            cmd["teardown"] = teardown
        if self.depth is not None:
            cmd["depth"] = self.depth
        dependency = self.config.pluginmanager.get_plugin(adapters.Dependencies.NAME)
        if dependency is not None:
            earlier = dependency.for_job(nodeid)
            if earlier:
                cmd["dependency"] = earlier
        w.send(cmd)
        self.pending = (nodeid, key)
        return None

    def collect(self, nodeid: str, spec: IsolationSpec) -> dict[str, Any]:
        """The result of the test ``submit`` sent."""
        key = pool_key(spec)
        self.pending = None
        w = self.workers[key]
        try:
            done = w.collect(spec.timeout + GUARD if spec.timeout else None)
        except WorkerDied as exc:
            self.drop(key, error=str(exc).splitlines()[0])
            return {"t": "done", "nodeid": nodeid, "error": str(exc), "worker_died": True}
        if spec.tier == "uml" and spec.scope == "test":
            self.drop(key)
        return done

    def abort(self, nodeid: str, spec: IsolationSpec, exc: BaseException) -> dict[str, Any]:
        """Something raised into the controller while it waited for ``nodeid`` (another
        plugin's timer or signal handler): the test fails with it, and its worker, left
        mid-test, is stopped; the next test gets a fresh one."""
        self.pending = None
        self.drop(pool_key(spec), error=f"{type(exc).__name__} raised in the controller")
        text = str(exc).strip() or type(exc).__name__
        return {
            "t": "done",
            "nodeid": nodeid,
            "error": f"{type(exc).__name__} raised in the controller while the test ran isolated: {text}",
        }

    def prefetch(
        self, nodeid: str, spec: IsolationSpec, location: tuple[str, int | None, str] | None = None,
        teardown: dict[str, Any] | None = None,
    ) -> None:
        """Start the next test while this process logs the last one: the fork server and
        the sandbox then work in parallel with pytest's reporting here.

        Only for host workers with a direct socket (a UML guest is its own machine and
        keeps strict turns) and only when the worker is already up. The plugin asks for
        this only after a test that passed: a failure may stop the session (``-x``,
        ``--maxfail``), and then no further test must have run.
        """
        w = self.workers.get(pool_key(spec))
        if w is None or w.link is None or self.pending is not None:
            return
        self.submit(nodeid, spec, location=location, teardown=teardown)

    def discard_pending(self) -> None:
        """Wait out a prefetched test nobody will log (pytest moved elsewhere): its
        result must not be taken for the next test's."""
        if self.pending is None:
            return
        _, key = self.pending
        self.pending = None
        w = self.workers.get(key)
        if w is not None:
            try:
                w.collect(None)
            except WorkerDied:
                self.drop(key)

    def finishing(self) -> None:
        """The session's last test is over: the workers end their sessions (plugins
        save coverage data, ...) while this one logs it. The session end collects
        what they leave (``pytest_testnodedown``); a test that still comes gets a new
        worker."""
        if self.pending is not None:
            return
        for key in list(self.workers):
            w = self.workers.pop(key)
            w.stop()
            self.stopping.append(w)

    def drop(self, key: tuple[Any, ...], fast: bool = False, error: str | None = None) -> None:
        w = self.workers.pop(key, None)
        if w is not None:
            w.error = error
            w.close(fast or error is not None)

    def shutdown(self, fast: bool = False) -> None:
        """Stop every worker and sweep what carries the run id. A cancel signal that
        arrives meanwhile waits until the sweep is done (``CancelSignals.closing``)."""
        with self.cancel.closing():
            self._shutdown(fast)

    def _shutdown(self, fast: bool) -> None:
        self.pending = None
        # First: no test is watched any more, and the tripwires' removal (~2 ms) then
        # overlaps the workers' ends.
        if self.canaries is not None:
            with contextlib.suppress(Exception):
                self.canaries.close()
            for key in self.canaries.env:
                os.environ.pop(key, None)
            self.canaries = None
        for key in list(self.workers):
            self.drop(key, fast)
        rewritten.close()  # its thread writes into the run dir
        while self.stopping:
            self.stopping.pop(0).close(fast)
        carry = getattr(self, "carry", None)
        if carry is not None:
            with contextlib.suppress(Exception):
                carry.finish()
        with contextlib.suppress(Exception):
            self.group.terminate(timeout=5)
        if self._switch is not None:
            with contextlib.suppress(Exception):
                self._switch.close()
        if "pytest_isolate.facets.net" in sys.modules:
            # A cancel inside ``SharedSwitch.open`` may leave the lock file of a switch
            # not yet recorded in ``_switch``; one still held by a user stays.
            with contextlib.suppress(Exception):
                sweep_stale_switches(self.switch_id())
        sweep(self.run_id, self.rundir, loaded_only=True)


def _error_line(text: str) -> str:
    """The line that says why a worker could not start: the last line of the worker's
    own output (the exception that ended it) when there is one, else the first."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "worker died"
    if "--- last output ---" in text:
        return lines[-1]
    return lines[0]
