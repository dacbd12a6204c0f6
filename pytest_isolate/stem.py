"""The stem: a copy of the controller, taken before it is configured, that host
workers are forked from (as stem cells, before they specialise; not the ``process``
tier's zygotes, which the spawner forks per test inside a worker).

Why: a host worker used to be two fresh interpreters in a row, an execnet gateway
(~45 ms to its first answer) and then the fork server it starts (~100 ms of interpreter
start and ``import pytest``), and both sat between the session's start and its first
test. The stem is forked once, in ``pytest_load_initial_conftests``: pytest is
imported there, and nothing of this run is configured yet (no conftest, no plugin's
``pytest_configure``). A worker is forked from it: the gateway first, which forks its
fork server before it starts execnet's threads, and then serves execnet as a fresh
gateway would. The server configures and collects as its own session, as before; it
just does not pay for the interpreter again.

What a fresh interpreter would not have had is undone in each child: the controller's
pytest capture on ``sys.stdout``/``sys.stderr``, its ``warnings.catch_warnings``, its
assertion-rewriting hook, the signal dispositions of the stem, and the controller's
other open files (the stem closes them). The environment (the C ``environ``), working
directory and stderr are the controller's at the moment the worker is asked for, as a
spawned gateway's would be. The stem imports the gateway's and the server's modules
while the controller configures. When the interpreter itself would start
differently (an interpreter variable such as ``PYTHONPATH`` changed since the fork), or
the controller is not a plain single-threaded untraced process, there is no stem and
workers start fresh. ``PYTEST_ISOLATE_STEM=0`` turns it off.

Every process forked here ends in ``os._exit``: its stack is the controller's, and
returning would run the controller's pytest a second time.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

#: Environment variables a starting interpreter reads: a change after the fork means a
#: fresh worker would not start like the forked one.
START_PREFIXES = ("PYTHON", "LD_", "GLIBC_TUNABLES", "MALLOC_")
#: The ``warnings`` module as it was before pytest's ``catch_warnings`` of the
#: configuration phase (this module is imported with the plugin, before that).
_WARNINGS = (list(warnings.filters), warnings.showwarning, getattr(warnings, "_showwarnmsg_impl", None))
#: Set in the fork server, fresh or forked: a server never starts a stem.
disabled = False
#: In a gateway forked from the stem: (pid, command fd, event fd) of the fork server
#: it forked before execnet started; ``remote.serve`` takes it instead of spawning one.
server: tuple[int, int, int] | None = None
#: In a UML guest's worker: the read ends of its server's stdout and stderr pipes, which
#: ``remote.serve`` relays to the controller (``uml_init.fork_server``).
server_output: tuple[int, int] | None = None

_current: Stem | None = None
#: ``/proc/<pid>/comm`` of the stem and its gateways, for ``ps`` and leak checks: their
#: command line is the controller's. The server keeps the controller's name, as its
#: test children should.
STEM_NAME = b"isolate-stem"
GATEWAY_NAME = b"isolate-gateway"


def usable() -> str | None:
    """Why this process cannot be forked from safely, or None."""
    if disabled:
        return "this is a fork server"
    if os.environ.get("PYTEST_ISOLATE_STEM", "1") == "0":
        return "PYTEST_ISOLATE_STEM=0"
    if not (sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")):
        return "no pidfd_open or send_fds"
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return "the controller has threads"  # fork would copy their locks, not them
    except OSError:
        return "no /proc"
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return "the controller is traced"  # coverage run, a debugger: a fresh worker is not
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None and any(monitoring.get_tool(i) for i in range(6)):
        return "the controller is monitored"
    return None


def start() -> bool:
    """Fork the stem, once per process; where ``usable`` says no there is none.
    True: this call started it (and the caller stops it)."""
    global _current
    if _current is not None or usable() is not None:
        return False
    _current = Stem()
    return True


def current() -> Stem | None:
    return _current


def release() -> None:
    """The session is ending: no worker will be asked for; see ``Stem.release``."""
    if _current is not None:
        _current.release()


def stop() -> None:
    global _current
    z, _current = _current, None
    if z is not None:
        z.close()


class Stem:
    """The controller's end: asks the stem for gateways, and stops it."""

    def __init__(self) -> None:
        self.env = c_environ()
        with open("/proc/self/comm", "rb") as f:
            comm = f.read().rstrip(b"\n")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()  # type: ignore[union-attr]  # else the children write it again
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the stem, which never returns
            code = 1
            try:
                ours.close()
                _stem(theirs, parent, comm)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.sock = ours

    def ask(self, start: dict[str, Any] | None = None) -> tuple[int, int] | None:
        """Ask for a gateway without waiting (``take`` gets it, ``drop`` does not): the
        caller works while the stem forks it, and may still be importing. ``start``:
        what its fork server configures with before its set-up comes
        (``forkserver.main``). None: spawn one."""
        env = c_environ()
        if any(
            env.get(k) != self.env.get(k)
            for k in set(env) | set(self.env)
            if k.startswith(START_PREFIXES)
        ):
            return None
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        err = os.dup(2)
        try:
            req = json.dumps({"env": env, "cwd": os.getcwd(), "start": start}).encode()
            socket.send_fds(self.sock, [req], [to_r, from_w, err])
        except OSError:
            for fd in (to_w, from_r):
                os.close(fd)
            return None
        finally:
            for fd in (to_r, from_w, err):
                os.close(fd)
        return to_w, from_r

    def drop(self, asked: tuple[int, int]) -> None:
        """A gateway asked for and not taken (the caller was interrupted): end it."""
        with contextlib.suppress(OSError):
            _, fds, _, _ = socket.recv_fds(self.sock, 1024, 1)
            for fd in fds:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)
        for fd in asked:
            os.close(fd)

    def take(self, asked: tuple[int, int], group: Any) -> Any:
        """The gateway ``ask`` asked for, registered in ``group``; None: spawn one."""
        from execnet import gateway_bootstrap
        from execnet.xspec import XSpec

        to_w, from_r = asked
        try:
            msg, fds, _, _ = socket.recv_fds(self.sock, 1024, 1)
        except OSError:
            for fd in (to_w, from_r):
                os.close(fd)
            return None
        if not msg or not fds:
            for fd in (to_w, from_r, *fds):
                os.close(fd)
            return None
        spec = XSpec("popen")
        group.allocate_id(spec)
        spec.execmodel = group.remote_execmodel.backend
        io = _forked_io(os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb"), group.execmodel, _Forked(int(msg), fds[0]))
        try:
            gw = gateway_bootstrap.bootstrap(io, spec)
        except Exception:  # noqa: BLE001 - the forked gateway is gone: spawn one instead
            io.kill()
            io.wait()
            return None
        except BaseException:
            io.kill()
            io.wait()
            raise
        gw.spec = spec
        group._register(gw)
        return gw

    def release(self) -> None:
        """No more gateways: EOF ends the stem, which then exits while the session ends."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def close(self) -> None:
        """End the stem and reap it (its gateways are reaped by it, or by init). Waited
        for on a pidfd: its exit takes a few ms, and polling would round that up."""
        self.release()
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            pidfd = -1  # reaped already
        if pidfd >= 0:
            try:
                select.select([pidfd], [], [], 1.0)
            finally:
                os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


class _Forked:
    """What execnet and ``Worker.close`` ask of a gateway's ``Popen``, for a process that
    is the stem's child: its pid, and a pidfd to wait on and kill through."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                if timeout == 0:
                    return None
                import subprocess

                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            self.returncode = 0  # the stem reaps it: the status is not ours to read
            os.close(self.pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


def _forked_io(outfile: Any, infile: Any, execmodel: Any, popen: _Forked) -> Any:
    """execnet's pipe IO, waiting on and killing the gateway as ``_Forked`` does (its
    base class is imported here: a controller without a stem needs no execnet yet)."""
    from execnet.gateway_base import Popen2IO

    class ForkedIO(Popen2IO):
        def __init__(self, outfile: Any, infile: Any, execmodel: Any, popen: _Forked) -> None:
            super().__init__(outfile, infile, execmodel)
            self.popen = popen

        def wait(self) -> int | None:
            try:
                return self.popen.wait()
            except OSError:
                return None

        def kill(self) -> None:
            with contextlib.suppress(OSError):
                self.popen.kill()

    return ForkedIO(outfile, infile, execmodel, popen)


def c_environ() -> dict[str, str]:
    """The process's environment as a child it spawned would get it: the C ``environ``,
    which ``os.environ`` writes through to but does not read back (readline, imported
    by pytest's capture, sets ``LINES`` and ``COLUMNS`` there)."""
    import ctypes

    env = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    out: dict[str, str] = {}
    i = 0
    while (entry := env[i]) is not None:
        key, _, value = entry.partition(b"=")
        out[os.fsdecode(key)] = os.fsdecode(value)
        i += 1
    return out


def environment() -> dict[str, dict[str, str]]:
    """This process's environment as its tests see it: ``os.environ`` (``py``) and what
    a process they spawn inherits (``c``, see ``c_environ``). They differ: readline sets
    ``LINES`` and ``COLUMNS`` in the C ``environ`` only."""
    return {"py": dict(os.environ), "c": c_environ()}


def adopt(env: dict[str, dict[str, str]]) -> None:
    """Make this process's environment ``env`` (``environment()`` of the controller),
    both views: ``os.environ`` without writing through, the C ``environ`` for the
    processes tests spawn.

    Why: a sandbox's session configures again from the controller's environment, which
    its own configuration has changed already; an entry that builds on its own value
    (pytest-env's ``PATH=/opt/bin:{PATH}``, a conftest prepending to a variable) was
    applied twice. And the fresh view of the C ``environ`` put the terminal's
    ``COLUMNS`` into ``os.environ``, where ``shutil.get_terminal_size`` (argparse's help,
    rich) reads it; in-process it is not there."""
    import ctypes

    ctypes.CDLL(None).clearenv()
    for key, value in env["c"].items():
        os.putenv(key, value)
    data = os.environ._data  # type: ignore[attr-defined]
    data.clear()
    for key, value in env["py"].items():
        data[os.environ.encodekey(key)] = os.environ.encodevalue(value)  # type: ignore[attr-defined]


# --- below: runs in the stem and the processes it forks ---------------------------


def _set_name(name: bytes) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME


def _stem(sock: socket.socket, parent: int, comm: bytes) -> None:  # pragma: no cover - a child
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    _set_name(STEM_NAME)
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the controller's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A spawned worker inherited stdin, stdout and stderr only: the controller's other
    # files (pytest's capture files, a pipe someone waits on for EOF) are not ours to
    # keep. Safe for the Python objects that own them: they are reachable from the
    # controller's frames below this one, which never return, so never closed again;
    # what is garbage already is finalized first, while its numbers are still its own.
    import gc

    gc.collect()
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)

    def reap(*_: Any) -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    signal.signal(signal.SIGCHLD, reap)
    # While the controller configures and collects: what every gateway and fork server
    # imports first (the server re-reads what it took from the environment at import,
    # ``audit.refresh_environment``: the run's is the controller's once it asks).
    with contextlib.suppress(Exception):
        import execnet.gateway_base  # noqa: F401

        from pytest_isolate import forkserver  # noqa: F401
    try:
        _serve(sock, comm)
    finally:
        # Released at the session's end (``release``) while gateways still run: they end
        # with their workers, and are reaped here, not left to init as zombies.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue


def _serve(sock: socket.socket, comm: bytes) -> None:  # pragma: no cover - a child
    """Fork a gateway per request until the controller hangs up."""
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        except OSError:
            return
        if not msg:
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _gateway(sock, json.loads(msg), fds, comm)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - said on the gateway's stderr, as python would
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(code)
        try:
            pidfd = os.pidfd_open(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for fd in fds:
            os.close(fd)
        try:
            socket.send_fds(sock, [str(pid).encode()], [pidfd])
        except OSError:
            return
        finally:
            os.close(pidfd)


def _as_fresh(env: dict[str, str], cwd: str) -> None:
    """Undo in a forked child what a fresh interpreter would not have."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import ctypes

    os.environ.clear()
    ctypes.CDLL(None).clearenv()  # what os.environ did not know of (the stem's LINES, ...)
    os.environ.update(env)
    os.chdir(cwd)
    # The controller's capture replaced these: a fresh process writes to its fds.
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__
    filters, show, impl = _WARNINGS
    warnings.filters[:] = filters
    warnings.showwarning = show
    if impl is not None:
        warnings._showwarnmsg_impl = impl  # type: ignore[attr-defined]
    warnings._filters_mutated()  # type: ignore[attr-defined]
    # The controller's assertion rewriter answers to its config; the server installs its own.
    from _pytest.assertion.rewrite import AssertionRewritingHook

    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, AssertionRewritingHook)]


def _gateway(sock: socket.socket, req: dict[str, Any], fds: list[int], comm: bytes) -> None:  # pragma: no cover
    """A gateway: fork the fork server now, while single-threaded; then serve execnet."""
    global server
    sock.close()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    # (A subreaper, as the server's parent must be, once ``remote.serve`` runs: before
    # the server has its set-up, so before it can fork anything.)
    _as_fresh(req["env"], req["cwd"])
    server = fork_server(req.get("start"), lambda: _set_name(comm))  # its pipes: not inherited
    _set_name(GATEWAY_NAME)
    # What ``python -c "import sys;exec(eval(sys.stdin.readline()))"`` does for execnet.
    with os.fdopen(os.dup(0), "r", closefd=True) as stdin:  # closed: no ResourceWarning
        line = stdin.readline()
    exec(eval(line), {"__name__": "__main__"})  # noqa: S307 - execnet's own bootstrap


def fork_server(
    start: dict[str, Any] | None, setup: Callable[[], None] | None = None
) -> tuple[int, int, int]:  # pragma: no cover
    """Fork the fork server from this single-threaded gateway, before execnet starts:
    (pid, command fd, event fd), what ``remote.serve`` takes as ``server``. ``setup``
    runs first in the server (its name). Also what a UML guest's worker does
    (``uml_init.fork_server``)."""
    cmd_r, cmd_w = os.pipe()
    evt_r, evt_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(cmd_w)
            os.close(evt_r)
            if setup is not None:
                setup()
            code = run_server(cmd_r, evt_w, start)
        finally:
            os._exit(code)
    os.close(cmd_r)
    os.close(evt_w)
    return pid, cmd_w, evt_r


def run_server(cmd_fd: int, evt_fd: int, start: dict[str, Any] | None) -> int:  # pragma: no cover - a child
    """The fork server, as ``remote.serve`` would have started it: its own session,
    no stdin or stdout; it ends as an interpreter ends (exit functions, flushed output).
    Also what a UML guest's worker forks (``uml_init.fork_server``)."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    code = 0
    try:
        from pytest_isolate import forkserver

        forkserver.main(cmd_fd, evt_fd, start)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - said as the interpreter would
        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code
