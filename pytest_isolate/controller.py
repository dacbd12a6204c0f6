"""Controller side: pools of isolated workers, dispatch, worker death, clean-up.

One worker (execnet gateway + fork server) serves every host tier — process, chroot,
jail and zone differ only in how the forked child confines itself — so a suite mixing
tiers still collects once. UML needs a worker per guest configuration, since the
worker lives inside the guest.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import secrets
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import execnet
import pytest

from pytest_isolate import remote, wire
from pytest_isolate.session import node
from pytest_isolate.session.carry import Carry
from pytest_isolate.spec import IsolationSpec
from pytest_isolate.tiers.base import kill_tree

#: RAM a UML guest needs beside the test's own memory budget.
GUEST_OVERHEAD = 192 << 20
#: How long a worker may take to start and collect before it is declared dead.
START_TIMEOUT = 300.0
#: Extra seconds beyond a test's own timeout before the controller stops trusting the
#: fork server to report (it enforces the timeout itself; this guards a wedged worker).
GUARD = 60.0


class WorkerDied(Exception):
    """The worker process (gateway or fork server) is gone; str() says how."""


def pool_key(spec: IsolationSpec) -> tuple[Any, ...]:
    if spec.tier == "uml":
        return ("uml", spec.kernel, spec.memory, spec.cpus, spec.network)
    return ("host",)


def _remote_sys_path() -> list[str]:
    pkg_parent = str(Path(wire.__file__).resolve().parent.parent)
    return [pkg_parent, *(p for p in sys.path if p != pkg_parent)]


class Worker:
    """One execnet gateway with its fork server."""

    def __init__(
        self, ctl: Controller, index: int, key: tuple[Any, ...], spec: IsolationSpec, early: bool = False
    ) -> None:
        self.ctl = ctl
        self.index = index
        self.key = key
        self.workdir = ctl.rundir / f"w{index}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.basetemp = ctl.basetemp / f"iso{index}"
        # Made here, not only by the server's tmp_path factory: under -p no:tmpdir there
        # is none, and chroot/jail/zone bind this dir into every sandbox.
        self.basetemp.mkdir(parents=True, exist_ok=True)
        self.uml = key[0] == "uml"
        self.gw: execnet.Gateway | None = None
        self.ch: Any = None
        self.server_pid: int | None = None
        #: Direct socket to a host fork server (see ``ForkServer._connect_direct``).
        self.link: socket.socket | None = None
        self._reader = wire.Reader()
        self._inbox: list[Any] = []
        self._listener: socket.socket | None = None
        #: Frames to send first once the server is up (``Controller.collected``).
        self._queued: list[dict[str, Any]] = []
        self._ready = False
        self.node: node.SandboxNode | None = None
        #: Why the worker ended, for ``pytest_testnodedown`` (None: stopped by us).
        self.error: str | None = None
        try:
            self._launch(spec)
        except BaseException:
            self.close(fast=True)
            raise
        if not early:
            # Else started before the controller collects: the server imports pytest and
            # collects on the other CPU meanwhile; ``ready`` waits at the first test.
            self.ready()

    def _gateway_spec(self, spec: IsolationSpec) -> str:
        if not self.uml:
            return f"popen//python={sys.executable}"
        from pytest_isolate.tiers import uml_gateway, uml_kernel

        # The test's memory budget is a cgroup limit inside the guest; the guest's RAM
        # needs room above it for its kernel, init and the worker, or the whole guest
        # runs out of memory before the budget is reached.
        opts = uml_gateway.UmlOptions(
            kernel=uml_kernel.find_kernel(spec.kernel or self.ctl.uml_kernel),
            memory=(spec.memory + GUEST_OVERHEAD) if spec.memory else 256 << 20,
            cpus=spec.cpus,
            network=spec.network,
        )
        return uml_gateway.gateway_spec(
            opts,
            self.workdir / "uml",
            # Not its realpath: a venv's bin/python is a symlink into the base install,
            # and the venv (sys.prefix, its site-packages, the sys.executable a test
            # runs) is found through the pyvenv.cfg beside the path it was started by.
            sys.executable,
            basetemp=self.ctl.basetemp,
            writable=[self.workdir],  # server.log must reach the host for failure reports
            switch=self.ctl.switch_path() if spec.network == "ip" else None,
        )

    def _launch(self, spec: IsolationSpec) -> None:
        """Start the gateway and send the server its set-up; ``ready`` waits for it."""
        cfg = self.ctl.config
        extra: dict[str, Any] = {"worker_index": self.ctl.worker_index(self.index)}
        if not self.uml:
            self._listener = _listen(self.workdir / "ctl.sock")
            extra["direct"] = self._listener.getsockname()
        self.gw = self.ctl.group.makegateway(self._gateway_spec(spec))
        self.ch = self.gw.remote_exec(remote)
        # The server is this session's worker, as an xdist worker is its controller's:
        # the controller's plugins fill its input (``session/node.py``).
        self.node, workerinput = node.workerinput(cfg, self.gw, self.ctl.run_id)
        self.ch.send({
            "args": [*cfg.invocation_params.args, *self.ctl.carry.server_args()],
            "carry": self.ctl.carry.server_init(),
            "dir": str(cfg.invocation_params.dir),
            # The package's own location first: an editable install is found by an
            # import hook that sys.path does not show (and -S skips it anyway).
            "sys_path": _remote_sys_path(),
            # Inside UML every syscall is slow: skip site (sys.path is sent anyway).
            "python_flags": ["-S"] if self.uml else [],
            "workerinput": workerinput,
            "ctx": {
                "run_id": self.ctl.run_id,
                "rundir": str(self.ctl.rundir),
                "workdir": str(self.workdir),
                "rootdir": str(cfg.rootpath),
                "basetemp": str(self.basetemp),
                "invocation_dir": str(cfg.invocation_params.dir),
                "switch_netns": self.ctl.switch_path(),
                "extra": extra,
            },
        })

    def ready(self) -> None:
        """Wait until the fork server has collected and connected (once)."""
        if self._ready:
            return
        listener, self._listener = self._listener, None
        try:
            msg = self.receive(START_TIMEOUT)
            if msg.get("t") != "ready":
                # The server's session ended before it could serve (its collection
                # failed, or a plugin ended it): its log says why.
                raise WorkerDied(self._death(f"the fork server's session ended before it was ready ({msg.get('t')!r})"))
            self.server_pid = msg["pid"]
            if listener is not None:
                self.link = self._accept(listener)
        finally:
            if listener is not None:
                with contextlib.suppress(OSError):
                    os.unlink(listener.getsockname())
                listener.close()
        self._ready = True
        for cmd in self._queued:
            self.send(cmd)
        self._queued.clear()

    def _await_server_pid(self, timeout: float) -> None:
        """The gateway names the server as soon as it has spawned it (remote.py)."""
        end = time.monotonic() + timeout
        while self.server_pid is None and time.monotonic() < end:
            try:
                raw = self.ch.receive(0.05)
            except self.ch.TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - the gateway is gone: nothing left to stop
                return
            if isinstance(raw, (tuple, list)) and raw and raw[0] == "server":
                self.server_pid = int(raw[1])

    def update(self, cmd: dict[str, Any]) -> None:
        """Send now if the server is up, else first thing once it is."""
        if self._ready:
            self.send(cmd)
        else:
            self._queued.append(cmd)

    def _accept(self, listener: socket.socket) -> socket.socket:
        """The server connects right after "ready"; if it died instead, say how."""
        listener.settimeout(0.05)
        end = time.monotonic() + 30
        while True:
            try:
                conn, _ = listener.accept()
                break
            except TimeoutError:
                if time.monotonic() > end:
                    raise WorkerDied("the fork server never connected to the controller") from None
                if not os.path.exists(f"/proc/{self.server_pid}"):
                    self.receive(5)  # raises with the server's exit and log
        conn.setblocking(True)
        return conn

    def send(self, cmd: dict[str, Any]) -> None:
        data = wire.encode(cmd)
        if self.link is None:
            self.ch.send(data)
            return
        try:
            self.link.sendall(data)
        except OSError:
            pass  # the server is gone: the next receive says how

    def receive_link(self, timeout: float | None) -> dict[str, Any]:
        """The next message on the direct socket; at EOF the gateway tells how it died."""
        assert self.link is not None
        while not self._inbox:
            if timeout is not None:
                ready, _, _ = select.select([self.link], [], [], timeout)
                if not ready:
                    raise WorkerDied(f"no answer from the isolated worker within {timeout:g}s")
            try:
                data = self.link.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                self.link.close()
                self.link = None
                self.receive(30)  # the server's death, as the gateway saw it
                raise WorkerDied(self._death("fork server closed its socket"))
            self._inbox.extend(self._reader.feed(data))
        return self._inbox.pop(0)

    def receive(self, timeout: float | None) -> dict[str, Any]:
        try:
            raw = self.ch.receive(timeout)
        except self.ch.TimeoutError:
            raise WorkerDied(f"no answer from the isolated worker within {timeout:g}s") from None
        except (EOFError, OSError, execnet.RemoteError) as exc:
            raise WorkerDied(self._death(str(exc))) from None
        if isinstance(raw, (tuple, list)) and raw and raw[0] == "server":
            self.server_pid = int(raw[1])  # spawned; it reports "ready" once it has collected
            return self.receive(timeout)
        if isinstance(raw, (tuple, list)) and raw and raw[0] == "exit":
            output = raw[2] if len(raw) > 2 else []
            raise WorkerDied(self._death(_server_end(raw[1]), output))
        return json.loads(raw)

    def _death(self, why: str, output: Sequence[str] = ()) -> str:
        """The one line why, then the test's captured output and the worker's log tail."""
        printed = "".join(
            f"\n--- captured {name} before the worker died ---\n{text.rstrip()}"
            for name, text in zip(("stdout", "stderr"), output, strict=False)
            if text.strip()
        )
        tail = ""
        if self.uml:
            with contextlib.suppress(Exception):
                from pytest_isolate.tiers import uml_gateway

                tail = uml_gateway.console_tail(self.workdir / "uml")
        log = self.workdir / "server.log"
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace").strip()
            if text:
                # The server's pytest prefixes an error at start-up as its own internal
                # error; it is the error of the session it was configuring (a plugin's,
                # a conftest's), shown as the traceback it is.
                lines = [ln.removeprefix("INTERNALERROR> ") for ln in text.splitlines()[-30:]]
                tail = (tail + "\n" if tail else "") + "\n".join(lines)
        why = why.strip().splitlines()[-1] if why.strip() else "worker died"
        return f"isolated worker died ({why})" + printed + (f"\n--- last output ---\n{tail}" if tail else "")

    def _workeroutput(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """What the server's session left in ``config.workeroutput``: its last frame,
        sent once its session has finished (``ForkServer.pytest_sessionfinish``)."""
        end = time.monotonic() + timeout
        with contextlib.suppress(WorkerDied):
            while (left := end - time.monotonic()) > 0:
                msg = self.receive_link(left) if self.link is not None else self.receive(left)
                if msg.get("t") == "nodedown":
                    return msg.get("workeroutput") or {}
        return None

    def collect(self, timeout: float | None) -> dict[str, Any]:
        """The answer to the last ``run`` sent."""
        return self.receive_link(timeout) if self.link is not None else self.receive(timeout)

    def close(self, fast: bool = False) -> None:
        """Stop the worker and everything below it: politely, or at once (``fast``, on
        Ctrl-C, when a test may still be running and the user is waiting)."""
        if not self._ready and self.ch is not None and not self.uml:
            self._await_server_pid(2.0)  # started early and never used: stop it at once
            fast = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._listener.getsockname())
            self._listener.close()
            self._listener = None
        if fast and self.server_pid and not self.uml:
            with contextlib.suppress(OSError):
                kill_tree(self.server_pid)
        workeroutput: dict[str, Any] | None = None
        if self.ch is not None:
            with contextlib.suppress(Exception):
                self.send({"t": "shutdown"})
            if not fast and self._ready:
                workeroutput = self._workeroutput()
        if self.link is not None:
            self.link.close()  # EOF: the server stops too if the message was lost
            self.link = None
        if self.node is not None:
            nodedown, self.node = self.node, None
            try:
                node.nodedown(self.ctl.config, nodedown, workeroutput, self.error)
            except Exception as exc:  # noqa: BLE001 - another plugin's hook: say it, go on
                _say(self.ctl.config, f"isolate: pytest_testnodedown raised {type(exc).__name__}: {exc}")
        pid = None
        if self.gw is not None:
            popen = getattr(getattr(self.gw, "_io", None), "popen", None)
            pid = getattr(popen, "pid", None)
            with contextlib.suppress(Exception):
                self.gw.exit()
                self.gw.join(timeout=5)
        if self.server_pid and not self.uml:
            # The server is in its own session; wait for it to clean up, then insist.
            end = time.monotonic() + 5
            while time.monotonic() < end and os.path.exists(f"/proc/{self.server_pid}"):
                time.sleep(0.02)
            with contextlib.suppress(OSError):
                kill_tree(self.server_pid)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM if self.uml else signal.SIGKILL)
            with contextlib.suppress(Exception):
                popen.wait(timeout=10)  # type: ignore[union-attr]
        if self.uml:
            with contextlib.suppress(Exception):
                from pytest_isolate.tiers import uml_gateway

                uml_gateway.close_guest(self.workdir / "uml")
        self.gw = self.ch = None


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
        gc.freeze()
        self.run_id = secrets.token_hex(4)
        self.rundir = Path(f"/tmp/pytest-isolate-{self.run_id}")
        self.group = execnet.Group()
        self.workers: dict[tuple[Any, ...], Worker] = {}
        self._switch: Any = None
        self.canaries: Any = None
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
        from pytest_isolate.observe.canaries import Canaries

        self.canaries: Canaries | None = Canaries(self.rundir, self.run_id, settle=False)
        # Sandboxes inherit the environment of the workers: tests can find the
        # tripwires (the escape matrix targets them on purpose).
        os.environ.update(self.canaries.env)

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
        gc.freeze()  # see __init__: the collected items are here to stay now
        if self.canaries is not None:
            self.canaries.contacts()  # the controller's own collection is nobody's escape
        if needs_switch and not self.needs_switch:
            self.needs_switch = True
            for w in self.workers.values():
                if not w.uml:
                    w.update({"t": "ctx", "switch_netns": self.switch_path()})

    def run(
        self, nodeid: str, spec: IsolationSpec, group: str | None = None, nextid: str | None = None,
        attempt: int = 0,
    ) -> dict[str, Any]:
        """Run one test; a dead worker yields a failure for that test and is replaced.

        ``group``/``nextid``: with ``scope="module"``/``"session"`` the sandbox child keeps
        its fixtures up for ``nextid`` when that test belongs to the same group."""
        if self.pending is not None and self.pending[0] == nodeid:
            return self.collect(nodeid, spec)
        self.discard_pending()
        failed = self.submit(nodeid, spec, group, nextid, attempt)
        return failed if failed is not None else self.collect(nodeid, spec)

    def submit(
        self, nodeid: str, spec: IsolationSpec, group: str | None = None, nextid: str | None = None,
        attempt: int = 0,
    ) -> dict[str, Any] | None:
        """Send a test to its worker without waiting; a "done" error if it cannot start."""
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
        w.send({"t": "run", "nodeid": nodeid, "spec": spec.to_dict(), "group": group, "next": nextid, "attempt": attempt})
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

    def prefetch(self, nodeid: str, spec: IsolationSpec) -> None:
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
        self.submit(nodeid, spec)

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
        for key in list(self.workers):
            self.drop(key, fast)
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
        if self.canaries is not None:
            with contextlib.suppress(Exception):
                self.canaries.close()
            for key in self.canaries.env:
                os.environ.pop(key, None)
            self.canaries = None
        sweep(self.run_id, self.rundir, loaded_only=True)


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


class SharedSwitch:
    """A run's switch namespace, shared by every controller of the run (xdist workers).

    Each user holds a shared ``flock`` on the switch's lock file for as long as it uses
    it; whoever can take the lock exclusively is the last one and deletes the switch.
    A lock nobody holds at all marks a switch left by runs that died: swept on sight.

    As root the switch is a mount under /run/netns that every user finds by name.
    Unprivileged it lives only as long as a holder process (``net.Switch._create_held``):
    the first user starts one tied to the lock file, not to itself, and writes
    ``<pid> <start time>`` into the lock file; later users join that holder's netns
    (their tests join its user namespace, as the first user's do). The holder exits by
    itself once nobody holds the lock shared, even if every user was SIGKILLed.
    """

    def __init__(self, switch: Any, fd: int, lock: Path, holder: int | None = None) -> None:
        self.switch = switch
        self.path = switch.path
        self.fd = fd
        self.lock = lock
        self.holder = holder  # pid of the unprivileged switch's holder, ours or not

    @classmethod
    def open(cls, switch_id: str) -> SharedSwitch:
        while True:
            opened = cls._try_open(switch_id)
            if opened is not None:
                return opened

    @classmethod
    def _try_open(cls, switch_id: str) -> SharedSwitch | None:
        """One attempt; None when the lock file was replaced meanwhile (retry)."""
        import fcntl

        from pytest_isolate.facets import net

        lock = Path(f"/tmp/pytest-isolate-switch-{switch_id}.lock")
        fd = _open_lock(lock)
        try:
            # A second lock file serialises creation; the users' lock above stays shared.
            mutex = _open_lock(Path(f"{lock}.create"))
        except BaseException:
            os.close(fd)
            raise
        try:
            fcntl.flock(mutex, fcntl.LOCK_EX)
            # Shared before looking: an unprivileged holder lives while anyone holds it.
            fcntl.flock(fd, fcntl.LOCK_SH)
            # The last user (or sweep_stale) unlinks both files: ours may be stale ones.
            if not (_same_file(fd, lock) and _same_file(mutex, Path(f"{lock}.create"))):
                os.close(fd)
                return None
            path = os.path.join(net.NETNS_DIR, net.switch_name(switch_id))
            holder = None
            if os.path.exists(path) and _is_mountpoint(path):
                switch = net.Switch(run_id=switch_id, path=path)
            else:
                holder, held = _published_holder(fd, switch_id)
                if held is not None:
                    switch = net.Switch(run_id=switch_id, path=held)
                else:
                    switch = net.Switch.create(switch_id, lock=str(lock))
                    if switch.holder is not None:
                        holder = switch.holder.pid
                    # Who made it, and where (``sweep_stale_switches``): the holder's
                    # pid and start time, or "- -" for a mounted switch.
                    os.ftruncate(fd, 0)
                    who = f"{holder} {_starttime(holder)}" if holder is not None else "- -"
                    os.pwrite(fd, f"{who} {' '.join(_identity())}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.close(mutex)
        return cls(switch, fd, lock, holder)

    def close(self) -> None:
        import fcntl

        from pytest_isolate.facets import net

        try:
            mutex = _open_lock(Path(f"{self.lock}.create"))
        except OSError:
            mutex = -1
        try:
            if mutex >= 0:
                fcntl.flock(mutex, fcntl.LOCK_EX)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # others still use it (closing our fd lets go of the lock)
            # The last user: newcomers from now on make a switch of their own.
            if _same_file(self.fd, self.lock):
                self.lock.unlink(missing_ok=True)
            if mutex >= 0 and _same_file(mutex, Path(f"{self.lock}.create")):
                Path(f"{self.lock}.create").unlink(missing_ok=True)
            if self.holder is None:
                self.switch.close()
                with contextlib.suppress(OSError):  # only if empty; /run/netns may be ours
                    os.rmdir(os.path.dirname(self.path))
                return
            os.close(self.fd)  # lets the holder take the lock and exit
            self.fd = -1
            net.wait_holder_gone(self.holder, self.switch.run_id)
            holder = getattr(self.switch, "holder", None)
            if holder is not None:  # ours: reap it, drop the pipe
                with contextlib.suppress(Exception):
                    holder.wait(timeout=1)
                if holder.stdout is not None:
                    holder.stdout.close()
                self.switch.holder = None
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if mutex >= 0:
                os.close(mutex)


def _server_end(code: Any) -> str:
    """How the fork server ended, in words: a signal by name (a test that may signal
    its worker, at ``process``, ``chroot`` or in a ``uml`` guest, can kill it)."""
    if isinstance(code, int) and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"fork server killed by {name}; a test that can signal its worker may have done it"
    return f"fork server exited with code {code}"


def _error_line(text: str) -> str:
    """The line that says why a worker could not start: the last line of the worker's
    own output (the exception that ended it) when there is one, else the first."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "worker died"
    if "--- last output ---" in text:
        return lines[-1]
    return lines[0]


def _say(config: pytest.Config, line: str) -> None:
    """One line on the user's terminal, outside any test."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)


def _listen(path: Path) -> socket.socket:
    """A socket only this user can connect to: it carries commands to the fork server."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock.bind(str(path))
    os.chmod(path, 0o600)  # before listen(): nobody can connect until then
    sock.listen(1)
    return sock


def _open_lock(path: Path) -> int:
    """Open (or create) a lock file of ours; one of another user is refused, since its
    content tells us which namespace to hand to tests."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(f"{path} belongs to another user")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _published_holder(fd: int, switch_id: str) -> tuple[int | None, str | None]:
    """(pid, netns path) of the live holder the lock file names, or (None, None)."""
    from pytest_isolate.facets import net

    try:
        pid_s, start = os.pread(fd, 200, 0).decode().split()[:2]
        pid = int(pid_s)
    except (OSError, ValueError, UnicodeDecodeError):
        return None, None
    if _starttime(pid) != start:  # gone, or a recycled pid
        return None, None
    path = net.held_switch_path(pid, switch_id)
    return (pid, path) if path is not None else (None, None)


def sweep_stale_switches(switch_id: str = "*") -> list[str]:
    """Remove switches (and their lock files) that nobody holds: users hold the lock
    shared for as long as they use the switch (``SharedSwitch``). ``switch_id``: only
    that one (a controller's own at its end, left by an ``open`` cut short)."""
    import fcntl

    removed = []
    me = _identity()
    for lock in Path("/tmp").glob(f"pytest-isolate-switch-{switch_id}.lock"):
        sid = lock.name.removeprefix("pytest-isolate-switch-").removesuffix(".lock")
        try:
            # Read-only: inside a sandbox whose root is an overlay of the host's, opening
            # for writing would copy the file up, and our lock would be on the copy.
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fields = os.pread(fd, 200, 0).decode(errors="replace").split()
            # Made in another pid namespace or kernel: not ours to judge (``owner_dead``).
            foreign = len(fields) >= 4 and tuple(fields[2:4]) != me
            if not foreign:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError included: someone uses it
            foreign = True
        if foreign:
            os.close(fd)
            continue
        with contextlib.suppress(Exception):
            from pytest_isolate.facets import net

            removed += net.sweep(sid)
        lock.unlink(missing_ok=True)
        Path(f"{lock}.create").unlink(missing_ok=True)
        os.close(fd)
    return removed


def _is_mountpoint(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


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
        with open("/proc/sys/kernel/random/boot_id") as f:
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
    tmp.write_text(f"{pid} {_starttime(pid)} {boot} {pidns}\n")
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
    removed: list[str] = sweep_stale_switches()
    me = _identity()
    for owner in Path("/tmp").glob("pytest-isolate-*/owner"):
        try:
            text = owner.read_text()
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
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return []
    mine = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    for p in sorted(set(mine), key=len, reverse=True):
        libc.umount2(p.encode(), 2)  # MNT_DETACH
    return mine
