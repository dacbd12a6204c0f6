"""Worker management: one execnet gateway with its fork server, started and stopped.

Process management, as pytest-xdist's ``workermanage.py``: a ``Worker`` starts the
gateway and sends the fork server its set-up (``_launch``), waits until the server has
collected and connected (``ready``), sends commands and receives answers (through the
gateway, or on a direct socket to a host fork server), says how it died
(``WorkerDied``), and stops it and everything below it (``close``). Which worker serves
which test, and what a dead one means for the run, is the controller's
(``controller.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import execnet
import pytest

from pytest_isolate import remote, stem, wire
from pytest_isolate.session import node, rewritten
from pytest_isolate.spec import IsolationSpec
from pytest_isolate.tiers.base import kill_tree

if TYPE_CHECKING:
    from pytest_isolate.controller import Controller

#: RAM a UML guest needs beside the test's own memory budget.
GUEST_OVERHEAD = 192 << 20
#: How long a worker may take to start and collect before it is declared dead.
START_TIMEOUT = 300.0


class WorkerDied(Exception):
    """The worker process (gateway or fork server) is gone; str() says how."""


def _remote_sys_path() -> list[str]:
    """The controller's ``sys.path``, in its order: a sandbox imports what the test
    would import in-process (the user's ``tests`` package from the working directory,
    not one of the same name elsewhere). The package's own location goes last, for a
    process that cannot find it otherwise (an editable install is found by an import
    hook that ``sys.path`` does not show, and ``-S`` skips it anyway)."""
    pkg_parent = str(Path(wire.__file__).resolve().parent.parent)
    return [*sys.path, pkg_parent] if pkg_parent not in sys.path else list(sys.path)


def _terminal_in(out: int, config: pytest.Config) -> list[int]:
    """The controller's stdin, for a test's debugger (``--pdb``, ``breakpoint()``), when
    it is the terminal the sandbox's stdout already is: a terminal gives a sandbox no
    more than the one it has (``TIOCSTI`` works on either fd), and no other file of the
    user's is handed in. Otherwise the sandbox's stdin stays ``/dev/null``, and a
    debugger there reads end-of-file and quits, as one would in-process on a
    non-terminal stdin."""
    # pytest's capture keeps stdin on /dev/null while it runs; the real one is its copy.
    capman = config.pluginmanager.get_plugin("capturemanager")
    saved = getattr(getattr(getattr(capman, "_global_capturing", None), "in_", None), "targetfd_save", None)
    stdin = saved if isinstance(saved, int) else 0
    try:
        if not (os.isatty(stdin) and os.isatty(out)) or os.fstat(stdin).st_rdev != os.fstat(out).st_rdev:
            return []
        return [os.dup(stdin)]
    except OSError:
        return []


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
        #: The controller's stdout, for the server once it connects (``_accept``).
        self._term_out = -1
        #: A guest's: this process's stdout and stderr, for its tests' uncaptured output.
        self._guest_fds: tuple[int, int] | None = None
        #: Frames to send first once the server is up (``Controller.collected``).
        self._queued: list[dict[str, Any]] = []
        self._ready = False
        self.node: node.SandboxNode | None = None
        #: Why the worker ended, for ``pytest_testnodedown`` (None: stopped by us).
        self.error: str | None = None
        #: "shutdown" was sent ahead of ``close`` (``stop``).
        self._stopping = False
        #: A guest booting before execnet runs over its launcher's pipes (``_boot_early``):
        #: the launcher's IO, its spec, the server's ``start`` and ``extra``.
        self._booting: tuple[Any, Any, dict[str, Any], dict[str, Any]] | None = None
        try:
            self._launch(spec, early)
        except BaseException:
            self.close(fast=True)
            raise
        if not early:
            # Else started before the controller collects: the server imports pytest and
            # collects on the other CPU meanwhile; ``ready`` waits at the first test.
            self.ready()

    def _gateway_spec(self, spec: IsolationSpec, start: dict[str, Any]) -> str:
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
            server_start=start,
        )

    def _makegateway(self, spec: IsolationSpec, start: dict[str, Any]) -> execnet.Gateway:
        """Forked from the stem when there is one (a host worker without a fresh
        interpreter's start-up), else spawned.

        A forked server is given ``start`` at once and configures while this process
        plants the run's tripwires (``Controller.arm``); it gets the rest of its set-up
        when they exist. A spawned one inherits them: they are planted first."""
        z = stem.current() if not self.uml else None
        asked = z.ask(start) if z is not None else None
        try:
            self.ctl.arm()  # while the stem forks (or still imports, early in a short run)
        except BaseException:
            if z is not None and asked is not None:
                z.drop(asked)
            raise
        if z is not None and asked is not None:
            gw = z.take(asked, self.ctl.group)
            if gw is not None:
                return gw
        return self.ctl.group.makegateway(self._gateway_spec(spec, start))

    def _launch(self, spec: IsolationSpec, early: bool = False) -> None:
        """Start the gateway and send the server its set-up; ``ready`` waits for it."""
        cfg = self.ctl.config
        extra: dict[str, Any] = {"worker_index": self.ctl.worker_index(self.index)}
        if not self.uml:
            self._listener = _listen(self.workdir / "ctl.sock")
            extra["direct"] = self._listener.getsockname()
            # Now: capture is off while a worker starts (see ``plugin.pytest_sessionstart``).
            self._term_out = os.dup(1)
        else:
            self._guest_fds = (os.dup(1), os.dup(2))
        # What the server needs to configure (``forkserver.main``); the rest follows.
        start = {
            "args": [*cfg.invocation_params.args, *self.ctl.carry.server_args()],
            "dir": str(cfg.invocation_params.dir),
            # A test reads pytest's argv in the sandbox too (a spawned server's would be
            # its own "-c" and pipe numbers).
            "argv": list(sys.argv),
            "sys_path": _remote_sys_path(),
            "log": str(self.workdir / "server.log"),
        }
        if self.uml:
            # What this process rewrote, for the guest's server to read instead.
            share = rewritten.share(self.ctl.rundir / "pyc", cfg)
            if share is not None:
                start["pyc_share"] = str(share.directory)
        if self.uml and early:
            self._boot_early(spec, start, extra)
            return
        self.gw = self._makegateway(spec, start)  # the tripwires are planted by now
        self._begin(start, extra)

    def _boot_early(self, spec: IsolationSpec, start: dict[str, Any], extra: dict[str, Any]) -> None:
        """Start a guest's launcher now and execnet over its pipes at the first test
        (``ready``): the guest boots, and its server imports pytest and configures
        (``uml_init.fork_server``), while this process collects, and nothing here
        waits for the boot (~0.8 s to execnet's first answer). A run that ends before
        its first test (a collection error, nothing selected) only stops the launcher."""
        from execnet import gateway_io
        from execnet.xspec import XSpec

        self.ctl.arm()  # the tripwires' names go to the server with the rest of its set-up
        xspec = XSpec(self._gateway_spec(spec, start))
        group = self.ctl.group
        group.allocate_id(xspec)
        xspec.execmodel = group.remote_execmodel.backend
        self._booting = (gateway_io.create_io(xspec, execmodel=group.execmodel), xspec, start, extra)

    def _connect_booted(self) -> None:
        """execnet over the pipes of the launcher ``_boot_early`` started."""
        from execnet import gateway_bootstrap

        assert self._booting is not None
        io, xspec, start, extra = self._booting
        gw = gateway_bootstrap.bootstrap(io, xspec)  # a failure: ``close`` stops the launcher
        self._booting = None
        gw.spec = xspec
        self.ctl.group._register(gw)
        self.gw = gw
        self._begin(start, extra)

    def _begin(self, start: dict[str, Any], extra: dict[str, Any]) -> None:
        """The server's code and set-up, sent through the gateway."""
        assert self.gw is not None
        cfg = self.ctl.config
        self.ch = self.gw.remote_exec(remote)
        # The server is this session's worker, as an xdist worker is its controller's:
        # the controller's plugins fill its input (``session/node.py``).
        self.node, workerinput = node.workerinput(cfg, self.gw, self.ctl.run_id)
        self.ch.send({
            **start,
            "carry": self.ctl.carry.server_init(),
            # The tripwires' names (a forked server's environment predates them).
            "env": self.ctl.canary_env(),
            # What its tests see, once its own configuration is done (``stem.adopt``).
            # A guest's processes get its os.environ (``uml_init``), C environ alike.
            "environ": {"py": dict(os.environ), "c": dict(os.environ)} if self.uml else stem.environment(),
            # Inside UML every syscall is slow: skip site (sys.path is sent anyway).
            "python_flags": ["-S"] if self.uml else [],
            # A guest cannot look at this process's stdout: whether it is a terminal and
            # how wide, for pytest's markup and width in its tests' terminal output.
            "terminal": _terminal_facts(self._guest_fds[0]) if self._guest_fds else None,
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
        if self._booting is not None:
            self._connect_booted()
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
        # First on the link, before any frame: the controller's stdout, where a test's
        # uncaptured prints (-s) go in-process; a server has only stderr of its own.
        out, self._term_out = self._term_out, -1
        if out >= 0:
            fds = [out, *_terminal_in(out, self.ctl.config)]
            try:
                socket.send_fds(conn, [b"o"], fds)
            finally:
                for fd in fds:
                    os.close(fd)
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
        while True:
            try:
                raw = self.ch.receive(timeout)
            except self.ch.TimeoutError:
                raise WorkerDied(f"no answer from the isolated worker within {timeout:g}s") from None
            except (EOFError, OSError, execnet.RemoteError) as exc:
                raise WorkerDied(self._death(str(exc))) from None
            if isinstance(raw, (tuple, list)) and raw and raw[0] == "server":
                self.server_pid = int(raw[1])  # spawned; it reports "ready" once it has collected
                continue
            if isinstance(raw, (tuple, list)) and raw and raw[0] == "out":
                self._guest_output(raw)
                continue
            if isinstance(raw, (tuple, list)) and raw and raw[0] == "exit":
                output = raw[2] if len(raw) > 2 else []
                raise WorkerDied(self._death(_server_end(raw[1]), output))
            return json.loads(raw)

    def _guest_output(self, raw: Sequence[Any]) -> None:
        """What a guest's test wrote uncaptured, written where it goes in-process: this
        process's stdout or stderr as they were when the worker started."""
        fds = self._guest_fds
        data = raw[2] if len(raw) > 2 else b""
        if not fds or raw[1] not in (1, 2) or not isinstance(data, bytes):
            return
        fd = fds[raw[1] - 1]
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(fd, data) :]

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
            text = log.read_text(encoding="utf-8", errors="replace").strip()
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

    def stop(self) -> None:
        """Ask the server to end its session now; ``close`` collects what it leaves."""
        if self._ready and self.ch is not None and not self._stopping:
            with contextlib.suppress(Exception):
                self.send({"t": "shutdown"})
            self._stopping = True

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
        if self._term_out >= 0:
            os.close(self._term_out)
            self._term_out = -1
        if fast and self.server_pid and not self.uml:
            with contextlib.suppress(OSError):
                kill_tree(self.server_pid)
        workeroutput: dict[str, Any] | None = None
        if self.ch is not None:
            if not self._stopping:
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
        if self._booting is not None:  # a launcher execnet never ran over
            popen = self._booting[0].popen
            pid = popen.pid
            self._booting = None
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
        if self._guest_fds is not None:
            for fd in self._guest_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._guest_fds = None
        self.gw = self.ch = None


def _terminal_facts(fd: int) -> dict[str, Any]:
    """Whether ``fd`` is a terminal, and the width pytest's own writer uses."""
    import shutil

    try:
        tty = os.isatty(fd)
    except OSError:
        tty = False
    return {"isatty": tty, "columns": shutil.get_terminal_size().columns}


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
