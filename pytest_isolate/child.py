"""Runs inside the sandbox: one item's full protocol, reports sent up a pipe.

This is the last step of the confinement order: by the time ``run_items`` is called the
tier has already confined the process. It never returns; it ``os._exit``s so no
``atexit`` handler or pytest session teardown of the (forked) parent runs twice.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import io
import os
import resource
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Generator, Iterator
from typing import Any, NoReturn

import pytest
from _pytest import faulthandler as _pytest_faulthandler
from _pytest.runner import CallInfo

from pytest_isolate import frozen, wire
from pytest_isolate.facets import keep, rlimits
from pytest_isolate.observe import audit
from pytest_isolate.session import adapters, extras
from pytest_isolate.session.adapters import NextAttempt, Reruns
from pytest_isolate.spec import IsolationSpec

#: Signal the fork server sends a timed-out runner so it dumps its Python stack.
STACK_SIGNAL = signal.SIGRTMIN + 3
#: Starts the line a runner writes into its stack file when the test took its result
#: channel away: the one place left that the fork server reads (outcome._faults).
CHANNEL_NOTE = "pytest-isolate channel: "
#: Room kept in a report frame for what JSON adds around the captured output.
_FRAME_SLACK = 1 << 20
_getpid = os.getpid
_exit = os._exit
_os_write = os.write
_dup, _dup2, _os_open, _os_close = os.dup, os.dup2, os.open, os.close
#: What the tier asked this runner to do once its test ran to the end (passed or
#: failed), before its last frame (the uml tier: record the pages it wrote,
#: ``facets.prefault``). Set in the child.
at_end: list[Callable[[], None]] = []


class Forwarder:
    """Sends what pytest logs in a child to the controller instead.

    Registered once in the fork server (registering a plugin costs ~1 ms: pytest parses
    it for fixtures) and inherited by every child; ``fd`` is -1 in the server itself,
    which never runs tests, and set to the test's pipe in the child.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.fd = -1
        #: The controller's stdout (host workers, from the direct link): a test's
        #: uncaptured stdout goes there, its stderr to the server's stderr (``term_fd``),
        #: as in-process. -1: both to ``term_fd`` (a UML guest has no host fd).
        self.term_out = -1
        #: The controller's stdin when it is the same terminal (``workermanage``): a
        #: test's debugger reads it, as in-process. -1: stdin stays ``/dev/null``.
        self.term_in = -1
        #: Registered beside the forwarder (a plugin of its own: its hooks are wrappers).
        self.terminal = TerminalRelay(config)
        #: What plugins measure per test and the controller needs (``session.carry``).
        self.carry: Any = None
        #: In a child whose test makes attempts (``adapters.Reruns``): the test started.
        self.attempts = False
        self.started: str | None = None
        #: A failed report, sent once ``pytest_exception_interact`` is over.
        self.held: pytest.TestReport | None = None
        #: The process that runs the test (set in the runner): a process the test forked
        #: that returns into pytest is not it, and must not report as the test.
        self.runner = 0
        #: Called as the sandbox's last test's teardown starts (``_keep_up_for``).
        self.before_teardown: Callable[[], None] | None = None

    def check_runner(self) -> None:
        """End a process the test forked that returned into pytest's protocol instead of
        exiting: in-process it would run the rest of the session a second time; here it
        would report as the test (first, while the test still runs) and run its next job.
        It says so on the channel, which the test's own frames share, and exits."""
        if self.fd < 0 or self.runner in (0, _getpid()):
            return
        with contextlib.suppress(BaseException):
            wire.send(self.fd, {"t": "stray", "pid": _getpid()})
        _exit(0)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self) -> None:
        step, self.before_teardown = self.before_teardown, None
        if step is not None:
            step()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        """A second start of the same test within one job is another attempt
        (pytest-rerunfailures): it gets a sandbox of its own."""
        if self.fd < 0 or not self.attempts:
            return
        if nodeid == self.started:
            raise NextAttempt
        self.started = nodeid

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.fd < 0:
            return
        self.check_runner()
        self.flush_report()
        if self.terminal.writer is not None:
            # What the terminal reporter's logging, muted here, would have done in this
            # process first: ask about the report's status. Implementations may change the
            # report there, from what only this process knows (pytest 9 fails a passed
            # test that had failed subtests, counted here).
            self.config.hook.pytest_report_teststatus(report=report, config=self.config)
        if report.failed and not self.config.getvalue("usepdb"):
            # pytest calls pytest_exception_interact with it next, where plugins may
            # still change it (pytest-ruff puts its own longrepr there): sent after.
            # (With --pdb the debugger shows it in this process, in pytest's order.)
            self.held = report
            return
        self.send_report(report)

    @pytest.hookimpl(wrapper=True)
    def pytest_exception_interact(self) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            self.flush_report()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logfinish(self) -> None:
        self.flush_report()

    def flush_report(self) -> None:
        report, self.held = self.held, None
        if report is not None and self.fd >= 0:
            self.send_report(report)

    def send_report(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        extras.plain_text(report, data)
        data = extras.pack(data)
        frame = wire.encode({"t": "report", "data": data})
        if len(frame) > wire.MAX_MESSAGE - _FRAME_SLACK:
            frame = wire.encode(_fitted({"t": "report", "data": data}))
        wire.write_frame(self.fd, frame)

    def send_xml(self, kind: str, name: object, value: object) -> None:
        """What junitxml's fixtures record in a child (an attribute of the testcase, a
        property of the suite): the controller's LogXML writes it."""
        if self.fd >= 0:
            wire.send(self.fd, {"t": "xml", "kind": kind, "name": str(name), "value": str(value)})

    @pytest.hookimpl(tryfirst=True)
    def pytest_warning_recorded(self, warning_message: Any, when: str, nodeid: str, location: Any) -> None:
        if self.fd < 0:
            return
        wire.send(
            self.fd,
            {
                "t": "warning",
                "message": str(warning_message.message),
                "category": getattr(warning_message.category, "__name__", "UserWarning"),
                "category_module": getattr(warning_message.category, "__module__", "builtins"),
                "filename": warning_message.filename,
                "lineno": warning_message.lineno,
                "when": when,
                "nodeid": nodeid,
                "location": list(location) if location else None,
            },
        )


class _RelayFile(io.TextIOBase):
    """The file under the child's terminal writer: text waits here until the relay sends it."""

    def __init__(self, relay: TerminalRelay, term_fd: int, tty: bool | None = None) -> None:
        self.relay = relay
        self.term_fd = term_fd
        #: Whether the user's stdout is a terminal, when ``term_fd`` cannot say (a UML
        #: guest's is a pipe to its worker): the controller's word.
        self.tty = tty
        self.pending: list[str] = []
        #: Straight to this process's stdout (the user's terminal) instead: while a
        #: debugger has the terminal (``TerminalRelay.pytest_exception_interact``).
        self.direct = False

    def write(self, s: str) -> int:
        if self.direct:
            with contextlib.suppress(OSError):
                _os_write(1, s.encode(errors="replace"))
            return len(s)
        self.pending.append(s)
        return len(s)

    def flush(self) -> None:
        # Sent at every flush, not only with the next report: a test that dies halfway
        # through a phase still shows what that phase had written.
        self.relay.send()

    def isatty(self) -> bool:
        # Markup as for the user's terminal (the controller writes the text there).
        if self.tty is not None:
            return self.tty
        try:
            return os.isatty(self.term_fd)
        except OSError:
            return False


class TerminalRelay:
    """Sends what a test's code writes to pytest's terminal writer to the controller.

    In-process, ``--setup-show``/``--setup-plan``, live logging and plugins that call
    ``terminalreporter.write`` during setup, call or teardown write to the user's
    terminal between the test's reports. The server's terminal writer is a sink, so the
    child swaps in a writer whose text goes up the pipe as ``term`` frames; the
    controller writes each before the report it preceded.

    What the child's own terminal reporter writes when reports are logged (the
    progress, the letters, verbose words) is not relayed: the controller logs the same
    reports and writes that itself. So the sink is put back around those hooks.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.fd = -1
        self.file: _RelayFile | None = None
        self.writer: Any = None
        self.sink: Any = None

    def prepare(self, term_fd: int, told: dict[str, Any] | None = None) -> None:
        """In the fork server, once: the writer every child starts with (~0.3 ms a child
        otherwise). Its buffer stays empty here; each child fills its own copy. ``told``:
        the controller's stdout as it sees it (``isatty``, ``columns``), for a server
        whose ``term_fd`` is not that stdout (a UML guest's)."""
        if self.config.pluginmanager.get_plugin("terminalreporter") is None:
            return
        from _pytest.config import create_terminal_writer

        told = told or {}
        tty, columns = told.get("isatty"), told.get("columns")
        self.file = _RelayFile(self, term_fd, tty if isinstance(tty, bool) else None)
        self.writer = create_terminal_writer(self.config, self.file)  # type: ignore[arg-type]
        self.writer.fullwidth = columns if isinstance(columns, int) and columns >= 40 else _terminal_width(term_fd)
        _color_log_levels(self.config, self.writer)
        self._quiet_reporter()

    def _quiet_reporter(self) -> None:
        """The terminal reporter's own logging hooks do nothing in a child: what they
        write is muted (below) and the controller logs the same reports with its own,
        so in the sandbox they only cost the test's critical path (~0.2 ms and the
        copy-on-write faults of every page they touch). Done here, in the server, once:
        the hook implementations are shared by every child forked from it."""
        pm = self.config.pluginmanager
        tr = pm.get_plugin("terminalreporter")
        for name in ("pytest_runtest_logstart", "pytest_runtest_logreport", "pytest_runtest_logfinish"):
            for impl in getattr(pm.hook, name).get_hookimpls():
                if impl.plugin is tr and not impl.wrapper and not impl.hookwrapper:
                    impl.function = _nothing

    def start(self, fd: int) -> None:
        """In a test child: text from here on goes up ``fd``."""
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None or self.writer is None:
            return
        self.fd = fd
        self.sink, tr._tw = tr._tw, self.writer

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_exception_interact(self, node: Any, call: Any, report: Any) -> Any:
        """``--pdb`` on a failure: the debugger takes the user's terminal in this
        process, so what pytest writes before it (the failure, "entering PDB") goes
        there at once, in the order it has in-process, not with the report later."""
        file = self.file
        if file is None or not self.config.getvalue("usepdb"):
            return (yield)
        self.send()
        file.direct = True
        try:
            return (yield)
        finally:
            file.direct = False
            # Shown in the debugger: pytest's summary leaves it out (``_pdbshown``).
            if hasattr(report, "_pdbshown") and self.fd >= 0:
                with contextlib.suppress(OSError):
                    wire.send(self.fd, {"t": "pdbshown", "when": str(report.when)})

    def send(self) -> None:
        if self.file is None or not self.file.pending or self.fd < 0:
            return
        text = "".join(self.file.pending)
        self.file.pending.clear()
        wire.send(self.fd, {"t": "term", "text": text})

    @contextlib.contextmanager
    def _muted(self) -> Iterator[None]:
        tr = self.config.pluginmanager.get_plugin("terminalreporter") if self.writer is not None else None
        if tr is None:
            yield
            return
        self.send()
        tr._tw = self.sink
        try:
            yield
        finally:
            tr._tw = self.writer

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_logstart(self) -> Generator[None, object, object]:
        with self._muted():
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_logreport(self) -> Generator[None, object, object]:
        with self._muted():
            return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_logfinish(self) -> Generator[None, object, object]:
        with self._muted():
            return (yield)


def _nothing(*args: object) -> None:
    return None


def _color_log_levels(config: pytest.Config, writer: Any) -> None:
    """Logging's level colors as for the user's terminal.

    pytest's logging plugin chooses them once, in ``pytest_configure``, from a terminal
    writer on ``sys.stdout``: the fork server's is ``/dev/null``, so under
    ``--color=auto`` on a terminal captured and live log lines had no colors. Its level
    formats are made again with markup when the writer the test's text goes through has
    it (``--color=yes`` and ``PY_COLORS=1`` had them already; a ``--color=no`` formatter
    has no colors to give)."""
    if not writer.hasmarkup:
        return
    from _pytest.logging import ColoredLevelFormatter

    plugin = config.pluginmanager.get_plugin("logging-plugin")
    for name in ("caplog_handler", "report_handler", "log_cli_handler"):
        fmt = getattr(getattr(plugin, name, None), "formatter", None)
        tw = getattr(fmt, "_terminalwriter", None)
        if not isinstance(fmt, ColoredLevelFormatter) or tw is None or tw.hasmarkup:
            continue
        tw.hasmarkup = True  # the formatter's own writer: it only marks levels up
        for level, opts in fmt.LOGLEVEL_COLOROPTS.items():
            fmt.add_color_level(level, *opts)


def _fitted(msg: dict[str, Any]) -> dict[str, Any]:
    """A report frame cut to what the fork server accepts from a sandbox.

    pytest's reports repeat the captured output of every phase so far, so a test that
    prints 40 MB makes a teardown report beyond ``wire.MAX_MESSAGE``, which the server
    would refuse as the test's doing. The largest sections lose their middle (their
    start and end stay, as a terminal scrollback would keep them), then the failure
    text if that is still too much; the report says what was cut."""
    limit = wire.MAX_MESSAGE - _FRAME_SLACK
    size = len(wire.encode(msg))
    if size <= limit:
        return msg
    data = dict(msg["data"])
    sections = [list(s) for s in data.get("sections") or ()]
    for _ in range(64):
        if size <= limit:
            break
        big = max(range(len(sections)), key=lambda i: len(str(sections[i][1])), default=None)
        if big is None or len(str(sections[big][1])) < 4096:
            break
        text = str(sections[big][1])
        keep = len(text) // 4
        cut = len(text) - 2 * keep
        sections[big][1] = (
            f"{text[:keep]}\n[... {cut} characters cut by pytest-isolate: the report would exceed the "
            f"{wire.MAX_MESSAGE} bytes a sandbox may send ...]\n{text[-keep:]}"
        )
        data["sections"] = sections
        size = len(wire.encode({"t": "report", "data": data}))
    if size > limit and data.get("longrepr") is not None:
        text = str(data["longrepr"])[: limit // 8]
        data["longrepr"] = (
            f"{text}\n[... the rest of this failure cut by pytest-isolate: the report exceeded the "
            f"{wire.MAX_MESSAGE} bytes a sandbox may send]"
        )
    return {"t": "report", "data": data}


#: Bound at import: a test may wipe ``sys.modules``, and the error it then causes in
#: pytest must still be described (an import here would run in the wiped interpreter).
_extract_tb = traceback.extract_tb
_exception_only = traceback.format_exception_only
_format_list = traceback.format_list


def _failure(exc: BaseException) -> str:
    """What failed in the runner outside the test's own phases, for its failure text.

    In-process this is pytest's INTERNALERROR (a test that wiped ``sys.modules`` breaks
    pytest's reporting): the exception and where pytest or a plugin raised it, without
    the plugin's own frames, which only say that the sandbox ran the protocol."""
    frames = [f for f in _extract_tb(exc.__traceback__) if "/pytest_isolate/" not in f.filename]
    where = "".join(_format_list(frames[-3:])).rstrip()
    what = "".join(_exception_only(type(exc), exc)).strip()
    text = f"pytest failed in the sandbox outside the test's phases: {what}"
    return f"{text}\n{where}" if where else text


def _terminal_width(term_fd: int) -> int:
    """The user's terminal width as the controller's writer sees it (``COLUMNS``, else the
    terminal's size): the child's own stdout is pytest's capture file."""
    try:
        cols = os.environ.get("COLUMNS")
        width = int(cols) if cols else os.get_terminal_size(term_fd).columns
    except (ValueError, OSError):
        width = 80
    return width if width >= 40 else 80


#: Set by a tier whose init waits for the runner (jail, zone): after the runner's last
#: frame the init need not wait for the kernel to tear a warm pytest heap down (~2.5 ms)
#: before it checks the sandbox and releases the test (jail.py, ``_wait_runner``).
end_notify_fd = -1

def _main_thread_is_this_one() -> None:
    """A forked child's ``threading.main_thread().native_id`` is still its parent's
    (CPython updates the ident after ``fork()``, not the native id), so
    ``threading.get_native_id() == threading.main_thread().native_id``, true in-process,
    would be false in every sandbox."""
    main = threading.main_thread()
    if main is threading.current_thread() and hasattr(main, "_set_native_id"):
        main._set_native_id()


def _usage_now() -> dict[str, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_user": me.ru_utime + kids.ru_utime,
        "cpu_sys": me.ru_stime + kids.ru_stime,
        "max_rss": max(me.ru_maxrss, kids.ru_maxrss) * 1024,
        "write_bytes": float((me.ru_oublock + kids.ru_oublock) * 512),
    }


def _repoint_capture(config: pytest.Config) -> None:
    """pytest's fd capture, suspended between tests, keeps a copy of what fds 0, 1 and 2
    were when it started: the server's (``/dev/null``, its log). Whenever capture is
    suspended in the test's own process (a debugger, ``capsys.disabled()``, between
    phases) the fds go back to those copies. Here they become this child's 0, 1 and 2
    (the user's terminal, as in-process). So does the copy of stderr pytest's
    faulthandler took at configuration, where ``faulthandler_timeout`` dumps a slow
    test's stacks."""
    key = getattr(_pytest_faulthandler, "fault_handler_stderr_fd_key", None)
    fd = config.stash.get(key, None) if key is not None else None
    if isinstance(fd, int) and fd > 2:
        with contextlib.suppress(OSError):
            os.dup2(2, fd)
    capman = config.pluginmanager.get_plugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    for name in ("in_", "out", "err"):
        cap = getattr(capturing, name, None)
        target, saved = getattr(cap, "targetfd", None), getattr(cap, "targetfd_save", None)
        if isinstance(target, int) and isinstance(saved, int) and target in (0, 1, 2):
            with contextlib.suppress(OSError):
                os.dup2(target, saved)


def _stop_frame(exc: BaseException) -> dict[str, Any]:
    """What the controller needs to stop its session as this one would have."""
    if isinstance(exc, KeyboardInterrupt):
        return {"t": "stop", "kind": "interrupt", "msg": str(exc)}
    code = getattr(exc, "returncode", None)
    return {"t": "stop", "kind": "exit", "msg": str(getattr(exc, "msg", exc)),
            "returncode": code if isinstance(code, int) and not isinstance(code, bool) else None}


def _own_basetemp(factory: Any, seq: Any) -> None:
    """A sandbox is a session of its own, as an xdist worker is: its session-scoped
    fixtures run again, so it gets a base temp dir of its own too (xdist gives each
    worker one). With one shared by all sandboxes, what a session fixture built there
    ("copy the sources unless they exist, then build") was found by the next
    sandbox's fixture, half of the state it relied on gone with the last sandbox's
    memory (sphinx's tests: an incremental build, no warnings, no doctrees)."""
    if factory is None:
        return
    # Named now, made when first asked for (pytest's own "given basetemp" path): most
    # tests never ask, and a mkdir on the test's path cost ~1 ms a test here. The name
    # is the sandbox's number in its worker (``seq``), unique in the worker's own dir
    # (pytest empties a given basetemp that exists) and short: a test's ``tmp_path`` is
    # then about as long as under pytest-xdist (``popen-gw0/``), where the suites' unix
    # socket paths (at most 107 bytes) already fit. Named after the test, werkzeug's
    # unix socket test failed for a user whose ``pytest-of-<name>`` is longer than root's.
    name = str(seq) if isinstance(seq, int) and not isinstance(seq, bool) else f"x{os.urandom(6).hex()}"
    factory._given_basetemp = factory.getbasetemp() / name
    factory._basetemp = None


#: Trees no project's rootdir stands for: a rootdir there would make them writable.
_NOT_A_PROJECT = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/proc", "/sbin", "/sys", "/usr")


def pytest_writes(config: pytest.Config) -> list[str]:
    """What pytest itself writes for a test, at every tier: its cache dir (``cache.set``
    values are carried to the controller's, ``cache.mkdir`` dirs are the test's) and the
    staging dirs it makes beside it. Not an escape in-process, and not one here."""
    cachedir = getattr(getattr(config, "cache", None), "_cachedir", None)
    if cachedir is None:
        return []
    return [str(cachedir), os.path.join(str(cachedir.parent), "pytest-cache-files-*")]


def project_writes(config: pytest.Config, spec: dict[str, Any]) -> list[str]:
    """At ``process`` the project's tree is the test's to write, as in-process: the tier
    confines no file, and a test that writes its output, a golden file or a cache there
    did nothing outside what it runs on (tests under /tmp never saw this; real projects
    live elsewhere). So is the user's cache dir (``$XDG_CACHE_HOME``, else ``~/.cache``):
    disposable by definition, it is where black, parso, matplotlib or pre-commit keep
    what they build on first use, in-process too. From ``chroot`` up such writes stay in
    the overlay and are reported so, but for the paths the test keeps
    (``isolate_keep``): those reach the host on the user's word."""
    out = [keep.literal_prefix(p) for p in spec.get("keep") or ()]
    if spec.get("tier") == "process":
        cache = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(cache):  # unset, or relative: invalid, says the XDG spec
            cache = os.path.join(os.path.expanduser("~"), ".cache")
        roots = (str(config.rootpath), os.path.realpath(str(config.rootpath)), cache, os.path.realpath(cache))
        for root in dict.fromkeys(roots):
            if root not in _NOT_A_PROJECT and not root.startswith(tuple(d + "/" for d in _NOT_A_PROJECT[1:])):
                out.append(root)
    return [p for p in out if p != "/"]


def match_depth(expected: int | None) -> None:
    """Give the test the recursion budget it has in-process.

    The caller (``run_items``) calls the test's protocol from deeper in the stack than
    pytest does in-process: below it lie the fork server's loop, the tier's fork and the
    stem (~25 frames more at `process`, ~30 at `jail`). A test that recurses until
    ``RecursionError`` (structlog's ``test_recursive`` counts the frames it got) or sets
    a low limit (``sys.setrecursionlimit(100)`` raises at a depth of more than 100) would
    see less room than in-process. So the limit is raised by the difference, and
    ``sys.getrecursionlimit``/``setrecursionlimit`` speak in the in-process numbers.
    ``expected``: the controller's depth at the same point (``plugin._caller_depth``).
    Threads the test starts begin at depth 0 and get that much more room."""
    global _depth_delta
    if expected is None or _depth_delta:
        return
    f = sys._getframe(1)
    here = 0
    while f is not None:
        here += 1
        f = f.f_back
    delta = here - expected
    if delta <= 0:
        return
    real_get, real_set = sys.getrecursionlimit, sys.setrecursionlimit
    real_set(real_get() + delta)
    _depth_delta = delta

    def getrecursionlimit() -> int:
        return real_get() - delta

    def setrecursionlimit(limit: int, /) -> None:
        real_set(limit + delta if isinstance(limit, int) and limit > 0 else limit)

    for fake, real in ((getrecursionlimit, real_get), (setrecursionlimit, real_set)):
        fake.__doc__, fake.__qualname__ = real.__doc__, real.__qualname__
    sys.getrecursionlimit, sys.setrecursionlimit = getrecursionlimit, setrecursionlimit


#: Frames this child adds below the test in-process (``match_depth``), once applied.
_depth_delta = 0


def _keep_up_for(session: Any, after: pytest.Item, forwarder: Forwarder) -> Callable[[], None]:
    """Until the returned undo: pytest's teardown of the sandbox's last test keeps up what
    ``after`` shares, unless the session is about to fail or stop (then everything comes
    down, reported, as in-process). Done in the setup state, not by passing ``after`` as
    the protocol's ``nextitem``: plugins take ``nextitem=None`` for "the last test of this
    process" (pytest-testmon sends its batched coverage then), which it is.

    As the teardown starts, the nodes ``after`` descends from are taken out of pytest's
    setup stack, so ``teardown_exact(None)`` tears down the rest; the undo puts them
    back. No frame of ours is then below a fixture's teardown error (a wrapper around
    ``teardown_exact`` showed in its traceback)."""
    state = session._setupstate
    kept: dict[Any, Any] = {}

    def before_teardown() -> None:
        if session.shouldfail or session.shouldstop:
            return
        chain = after.listchain()
        for node in list(state.stack):
            if len(kept) >= len(chain) or node is not chain[len(kept)]:
                break
            kept[node] = state.stack.pop(node)

    def undo() -> None:
        forwarder.before_teardown = None
        if kept:
            rest = dict(state.stack)
            state.stack.clear()
            state.stack.update(kept)
            state.stack.update(rest)

    forwarder.before_teardown = before_teardown
    return undo


_NO_PARAM = object()


def _reparametrizes(item: pytest.Item, after: pytest.Item) -> bool:
    """Whether ``after`` takes a shared fixture of ``item``'s with another parameter (a
    parametrized module fixture's next instance). In-process pytest tears the old
    instance down while it sets ``after`` up, and an error there is ``after``'s setup
    error, which a sandbox of its own cannot give; kept up and its error sent on, it met
    the next instance's at the module's end and was lost. So this sandbox tears
    everything down with its test, reported: one test early, never lost. The
    comparison is pytest's own for its fixture cache."""
    mine = getattr(getattr(item, "callspec", None), "params", None) or {}
    theirs = getattr(getattr(after, "callspec", None), "params", None) or {}
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", None) or {}
    for name, value in mine.items():
        other = theirs.get(name, _NO_PARAM)
        fixturedefs = defs.get(name) or ()
        if other is _NO_PARAM or not fixturedefs or getattr(fixturedefs[-1], "scope", "function") == "function":
            continue
        try:
            if not bool(value == other):
                return True
        except (ValueError, RuntimeError, TypeError):
            if value is not other:
                return True
    return False


class _Chain:
    """Stands for a next item to ``SetupState.teardown_exact``, which asks it only for
    the nodes it descends from: those stay up."""

    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes

    def listchain(self) -> list[Any]:
        return self.nodes


def _teardown_rest(item: pytest.Item, result_fd: int, forwarder: Forwarder) -> None:
    """What pytest kept up for the next test, torn down as this sandbox ends. In-process
    it stays up and comes down after a later test (the last of its class, module,
    package or session, or the last to run), whose teardown report has its errors. So
    each node comes down on its own here, and its errors go to the controller with its
    node id (``deferred``), which puts them in that later test's report
    (``answer.DeferredTeardowns``): reported once, where in-process pytest reports them,
    whichever sandbox had the fixture set up. Nothing it writes is shown: a fixture's
    teardown that prints or logs (or ``--setup-show``'s ``TEARDOWN``) wrote once per
    sandbox to the user's terminal, where in-process it is captured once."""
    state = item.session._setupstate  # type: ignore[attr-defined]
    errors: list[tuple[str, CallInfo[None]]] = []
    with _silenced(forwarder):
        while state.stack:
            nodes = list(state.stack)
            call = CallInfo.from_call(functools.partial(state.teardown_exact, _Chain(nodes[:-1])), when="teardown")
            if call.excinfo is not None:
                errors.append((nodes[-1].nodeid, call))
    for nodeid, call in errors:
        with contextlib.suppress(Exception):
            report = pytest.TestReport.from_item_and_call(item, call)
            data = item.config.hook.pytest_report_to_serializable(config=item.config, report=report)
            extras.plain_text(report, data)
            data = _fitted({"t": "report", "data": extras.pack(data)})["data"]
            wire.send(result_fd, {"t": "deferred", "node": nodeid, "data": data})


@contextlib.contextmanager
def _silenced(forwarder: Forwarder) -> Iterator[None]:
    """Until the end: what this process writes to its stdout and stderr (Python's and the
    file descriptors) or to pytest's terminal writer goes nowhere. What was written
    before goes where it goes."""
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    relay = forwarder.terminal
    with contextlib.suppress(BaseException):
        relay.send()
    relay_fd, relay.fd = relay.fd, -1  # what its writer is given waits, and is dropped
    saved: list[tuple[int, int]] = []
    try:
        null = _os_open(os.devnull, os.O_WRONLY)
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved.append((fd, _dup(fd)))
                    _dup2(null, fd)
        finally:
            _os_close(null)
    except OSError:
        pass
    try:
        yield
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        for fd, copy in saved:
            with contextlib.suppress(OSError):
                _dup2(copy, fd)
                _os_close(copy)
        if relay.file is not None:
            relay.file.pending.clear()
        relay.fd = relay_fd


def run_items(
    config: pytest.Config,
    forwarder: Forwarder,
    items: dict[str, pytest.Item],
    job: dict[str, Any] | None,
    result_fd: int,
    stack_fd: int,
    term_fd: int,
    enforced_by_cgroup: bool,
    go_fd: int = -1,
) -> NoReturn:
    """Run jobs in this (already confined) process, then exit.

    ``job`` is ``{"nodeid", "spec", "next"}``; ``None`` means "wait for the first job on
    ``go_fd``" (a pre-forked child). While a job names a ``next`` item, fixtures stay up
    for it (``scope="module"``/``"session"``): the child reports ``item_done`` and waits
    on ``go_fd`` for that next job.
    """
    code = 0
    session = None
    try:
        # Everything up to the job does not depend on it: a pre-forked child does it
        # while it waits, off the test's critical path.
        # Uncaptured output (-s, or anything outside pytest's capture) goes where the
        # user's terminal is, as it would in-process.
        os.dup2(forwarder.term_out if forwarder.term_out >= 0 else term_fd, 1)
        os.dup2(term_fd, 2)
        if forwarder.term_in >= 0:
            os.dup2(forwarder.term_in, 0)
        _repoint_capture(config)
        # The server ignores SIGINT (the controller handles Ctrl-C); tests get Python's
        # usual handler back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        faulthandler.enable(file=stack_fd, all_threads=True)
        faulthandler.register(STACK_SIGNAL, file=stack_fd, all_threads=True, chain=False)
        forwarder.fd = result_fd
        forwarder.runner = _getpid()
        forwarder.terminal.start(result_fd)
        # Which pipe the channel is, and its number here: the server names it in the
        # failure of a test that writes onto it, closes it or replaces it.
        wire.guard(result_fd)
        # Its pid too, as its own PID namespace numbers it: the server finds the test's
        # process by it (a timed-out test's stack). Its name stays the controller's, as
        # in-process (``ps``, psutil's ``name()``).
        wire.send(result_fd, {"t": "channel", "fd": result_fd, "pid": _getpid()})
        _main_thread_is_this_one()
        # The server's frozen heap is the test's as it would be in-process: its
        # gc.collect() frees cycles through what existed before the fork (anyio's
        # "does not leak the event loop" test), at the cost of walking it then.
        frozen.thaw()
        factory = getattr(config, "_tmp_path_factory", None)  # none under -p no:tmpdir
        basetemp = str(factory.getbasetemp() if factory is not None else config.option.basetemp)
        # A pre-forked child arms the audit layer while it waits, deaf until its job has
        # come and its own set-up below is done (nothing in it depends on the job).
        early = job is None
        if early:
            audit.arm(result_fd, [basetemp, *pytest_writes(config)], str(config.rootpath), paused=True)
            job = wire.recv(go_fd)
        _own_basetemp(factory, job.get("seq"))
        # A tier with a cgroup (zone, uml) enforces memory and pids for the whole tree.
        rlimits.apply(
            IsolationSpec.from_dict(job["spec"]), cgroup_memory=enforced_by_cgroup, cgroup_pids=enforced_by_cgroup
        )
        if forwarder.carry is not None:
            forwarder.carry.begin()
        # Last: from here on the audit layer watches, and our own set-up is not the test's.
        project = project_writes(config, job["spec"])
        if early:
            audit.resume(project)
        else:
            audit.arm(result_fd, [basetemp, *pytest_writes(config), *project], str(config.rootpath))
        match_depth(job.get("depth"))
        while True:
            item = items[job["nodeid"]]
            session = item.session
            loc = job.get("location")
            if loc and "location" not in item.__dict__:  # pytest's cached property: the controller's
                item.__dict__["location"] = (loc[0], loc[1], loc[2])
            nxt = items.get(job["next"]) if job.get("next") else None
            # The test pytest runs next, when it is not this sandbox's: in-process what
            # it descends from (its class, module, package, session) stays up, and the
            # teardown errors of their fixtures belong to a later test's report. The
            # same here; this sandbox ends after the test, so it tears them down
            # afterwards and sends their errors on (``_teardown_rest``).
            # The failures so far: ``--maxfail`` reached brings everything down, reported.
            teardown = job.get("teardown") or {}
            after = items.get(teardown["after"]) if nxt is None and teardown.get("after") else None
            if after is not None and _reparametrizes(item, after):
                # Everything comes down with this test, reported: what earlier sandboxes
                # sent on for the nodes pytest keeps up is this report's now.
                for node in item.listchain():
                    if node in after.listchain():
                        wire.send(result_fd, {"t": "deferred", "node": node.nodeid, "data": None})
                after = None
            if isinstance(teardown.get("failed"), int):
                session.testsfailed = teardown["failed"]
            if job.get("dependency"):
                adapters.apply(adapters.dependency_module(config), items, job["dependency"])
            forwarder.attempts = Reruns.applies(item)
            forwarder.started = None
            if forwarder.attempts:
                Reruns.resume(item, int(job.get("attempt") or 0))
            undo = _keep_up_for(session, after, forwarder) if after is not None else None
            try:
                try:
                    config.hook.pytest_runtest_protocol(item=item, nextitem=nxt)
                finally:
                    if undo is not None:
                        undo()
            except NextAttempt:
                Reruns.end(item)
                wire.send(result_fd, {"t": "next_attempt"})
                break
            except (pytest.exit.Exception, KeyboardInterrupt) as exc:
                # pytest.exit() in a test or fixture (or pdb's "quit"), Ctrl-C: in-process
                # the session stops here. The controller stops it after this test's
                # reports; what is set up is torn down here, as at that session's end.
                with contextlib.suppress(BaseException):
                    session._setupstate.teardown_exact(None)  # type: ignore[attr-defined]
                wire.send(result_fd, _stop_frame(exc))
                break
            forwarder.check_runner()
            if after is not None:
                _teardown_rest(item, result_fd, forwarder)
            if nxt is None or go_fd < 0:
                break
            sys.stdout.flush()
            sys.stderr.flush()
            forwarder.terminal.send()
            wire.send(result_fd, {"t": "item_done", "rusage": _usage_now()})
            try:
                job = wire.recv(go_fd)
            except EOFError:
                # The controller moved on (e.g. -x): tear down what was kept up.
                session._setupstate.teardown_exact(None)  # type: ignore[attr-defined]
                break
    except BaseException as exc:  # noqa: BLE001 - report, never fall back into the server
        forwarder.check_runner()
        code = 70
        lost = wire.channel_lost(result_fd)
        if lost is not None:
            # Nothing more can go up the channel; the stack file is read by the server.
            with contextlib.suppress(BaseException):
                _os_write(stack_fd, f"\n{CHANNEL_NOTE}{lost}\n".encode())
        else:
            with contextlib.suppress(BaseException):
                wire.send(result_fd, {"t": "internal", "error": _failure(exc)})
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    with contextlib.suppress(BaseException):
        forwarder.terminal.send()
    if forwarder.carry is not None:
        with contextlib.suppress(BaseException):
            forwarder.carry.send(result_fd)
    if code == 0:
        for fn in at_end:
            with contextlib.suppress(BaseException):
                fn()
        # Our own figures, so the server need not wait for the kernel to tear this
        # process down (~3 ms for a warm pytest heap) before answering.
        try:
            wire.send(result_fd, {"t": "end", "rusage": _usage_now()})
            if end_notify_fd >= 0:
                os.write(end_notify_fd, b"e")
        except OSError:
            pass
    os._exit(code)
